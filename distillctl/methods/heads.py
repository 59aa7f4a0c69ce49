"""Stage projectors shared by OFA-KD, HCD and MLDR-KD (methods.md, "Shared building blocks").

A projector turns the student's stage-i map into a vector ``[B, D]`` in a space shared with
the teacher, with ``D = max(student pre-logit width, teacher pre-logit width)``. Both kinds
are resolution-agnostic: they work at 32 px (where ResNet18's stage 4 is 1x1) and at 224 px.
"""
from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn as nn

from ..models import ModelShapes

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def init_training_module(module: nn.Module, keep: Collection[int] = ()) -> None:
    """Reference initialisation of a training-only module, in place (methods.md, "Initialisation").

    As the OFA-KD, MLDR-KD and HCD reference code do: convolutions kaiming-normal (fan_out, ReLU),
    Linear layers truncated normal std 0.02 (bounds +-2, timm's ``trunc_normal_`` default), their
    biases zero; norms weight 1, bias 0. Other parameters (a learnable temperature) keep their value.
    A sub-module that owns a parameter whose ``id`` is in ``keep`` (the student's or the teacher's,
    when a method reuses them) is left alone.
    """
    for m in module.modules():
        if any(id(p) in keep for p in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, _NORMS) and m.weight is not None:
            nn.init.ones_(m.weight)
        else:
            continue
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


class SepDown(nn.Module):
    """Separable down-sampling block (OFA design): dw3x3/2 -> pw -> BN -> ReLU -> dw3x3 -> pw -> BN -> ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.body(x)


class CNNStageProjector(nn.Module):
    """Stage i < 4: (4 - i) SepDown blocks, channels doubling, the last giving D; stage 4: 1x1 conv. Then GAP."""

    def __init__(self, c_in: int, stage: int, out_dim: int):
        super().__init__()
        if stage >= 4:
            layers = [nn.Conv2d(c_in, out_dim, 1)]
        else:
            layers, c = [], c_in
            n_blocks = 4 - stage
            for b in range(n_blocks):
                c_out = out_dim if b == n_blocks - 1 else c * 2
                layers.append(SepDown(c, c_out))
                c = c_out
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):  # [B, Ci, Hi, Wi] -> [B, D]
        return self.pool(self.body(x)).flatten(1)


class PatchMerge(nn.Module):
    """2x2 patch merging that keeps the width: [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * c)
        self.reduce = nn.Linear(4 * c, c, bias=False)

    def forward(self, x):
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            x = nn.functional.pad(x, (0, w % 2, 0, h % 2))
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], 1)
        x = self.reduce(self.norm(x.permute(0, 2, 3, 1)))  # [B, H/2, W/2, C]
        return x.permute(0, 3, 1, 2)


def _heads_for(c: int) -> int:
    for h in (8, 6, 4, 3, 2, 1):
        if c % h == 0 and c // h >= 16:
            return h
    return 1


class TokenStageProjector(nn.Module):
    """Token students: merge 2x2 until the grid is <= 7x7, then max(1, 4 - i) transformer blocks, token mean, -> D.

    The stage map arrives as ``[B, C, H, W]`` (timm's NCHW intermediates, class token already set aside).
    """

    def __init__(self, c_in: int, grid: tuple[int, int], stage: int, out_dim: int):
        super().__init__()
        from ..compat import import_timm

        import_timm()
        from timm.models.vision_transformer import Block

        h, w = grid
        merges = []
        while h > 7 or w > 7:
            merges.append(PatchMerge(c_in))
            h, w = (h + 1) // 2, (w + 1) // 2
        self.merge = nn.Sequential(*merges)
        self.blocks = nn.Sequential(*[Block(c_in, _heads_for(c_in)) for _ in range(max(1, 4 - stage))])
        self.norm = nn.LayerNorm(c_in)
        self.out = nn.Linear(c_in, out_dim) if c_in != out_dim else nn.Identity()

    def forward(self, x):  # [B, C, H, W] -> [B, D]
        x = self.merge(x).flatten(2).transpose(1, 2)  # [B, N, C]
        x = self.norm(self.blocks(x)).mean(1)
        return self.out(x)


def stage_projector(student: ModelShapes, stage: int, out_dim: int) -> nn.Module:
    """Projector for the student's stage ``stage`` (1..4), chosen by the student's kind."""
    c, h, w = student.stage_shapes[stage - 1]
    if student.kind == "token":
        return TokenStageProjector(c, (h, w), stage, out_dim)
    return CNNStageProjector(c, stage, out_dim)


def shared_dim(student: ModelShapes, teacher: ModelShapes | None) -> int:
    """D = max(student pre-logit width, teacher pre-logit width)."""
    return max(student.dim, teacher.dim if teacher is not None else 0)
