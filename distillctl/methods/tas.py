"""tas: Li, Wang, Yan, Ding, Gao, Xia. "TAS: Distilling Arbitrary Teacher and Student via a Hybrid
Assistant". Preprint 2024, arXiv:2410.12342 (ICCV 2025 as "Fuse Before Transfer").

A CNN student and a transformer/MLP teacher differ in inductive bias and module function, so
their features are far apart. TAS builds a hybrid assistant from pieces of both: the student's
own stages 1-3 (shared weights, trained), a local-to-global bridge (L2G: 1x1 conv to the teacher's
token width, tokens, one transformer block), then the teacher's frozen last stage and head. The
assistant sits between the two in feature space, and knowledge flows teacher -> student,
teacher -> assistant and assistant -> student. Each transfer matches globally pooled features
with a spatially agnostic InfoNCE loss (pixel-wise MSE fails because the spatial layouts differ)
and logits with the OFA loss. The assistant, L2G and the InfoNCE heads are training-only.

Choices where the paper is silent (methods.md): the L2G tokens get no positional embedding (the
1x1 conv keeps the CNN's spatial order and the L2G attention mixes it globally; the teacher's
embedding is tied to its own patch grid); they are resized (bilinear) to the grid the teacher's
last stage expects when the student's stage-3 grid differs (needed for Mixer's token MLPs and
Swin's windows; an identity at the 224 px paper protocol); the "pooled final feature" of every
model is its pre-logits feature (what its own head pools: class token for a ViT, mean for
Swin/Mixer/CNN); InfoNCE is symmetric (both directions averaged, CLIP-style).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ..errors import BadInput
from ..models import classify
from .base import Distiller, MethodConfig, PairInfo
from .heads import _heads_for
from .ofa import ofa_loss
from .registry import register

SUPPORTED = ("CNN student with a token teacher: ViT/DeiT (class token), Swin, MLP-Mixer "
             "(for example vit_small_patch16_224 -> resnet18, swin_tiny_patch4_window7_224 -> resnet18)")


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` [B, d] and ``b`` [B, d].

    Rows are L2-normalised; ``logits = a b^T / temperature`` [B, B]; the positive of row i is
    column i (the same image seen by both models); cross-entropy in both directions, averaged.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.t() / temperature  # [B, B]
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class InfoNCEHead(nn.Module):
    """Linear heads to a common width and a learnable temperature (log-parametrised, floor 0.01)."""

    def __init__(self, dim_a: int, dim_b: int, dim: int, init_temperature: float):
        super().__init__()
        self.head_a = nn.Linear(dim_a, dim)
        self.head_b = nn.Linear(dim_b, dim)
        self.log_inv_temp = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def forward(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        temperature = self.log_inv_temp.clamp(max=math.log(100.0)).exp().reciprocal()
        return info_nce(self.head_a(fa), self.head_b(fb), temperature)


class L2G(nn.Module):
    """Local-to-global bridge: 1x1 conv to the teacher width, tokens (+ teacher prefix), one transformer block."""

    def __init__(self, c_in: int, dim: int, num_heads: int):
        super().__init__()
        from ..compat import import_timm

        import_timm()
        from timm.models.vision_transformer import Block

        self.proj = nn.Conv2d(c_in, dim, 1)
        self.block = Block(dim, num_heads)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], prefix: Optional[torch.Tensor]) -> torch.Tensor:
        """[B, Cs, H, W] -> [B, P + Ht*Wt, D] (P prefix tokens, given as [1, P, D])."""
        x = self.proj(x)  # [B, D, H, W]
        if tuple(x.shape[-2:]) != tuple(grid):
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        if prefix is not None:
            x = torch.cat([prefix.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.block(x)


def _tail_layout(teacher: nn.Module) -> str:
    """'swin' (NHWC stages in ``layers``) or 'blocks' (ViT / Mixer: NLC tokens through ``blocks``)."""
    layers = getattr(teacher, "layers", None)
    if isinstance(layers, nn.Sequential) and len(layers) >= 2 and all(hasattr(s, "blocks") for s in layers):
        return "swin"
    if isinstance(getattr(teacher, "blocks", None), (nn.Sequential, nn.ModuleList)) and hasattr(teacher, "norm"):
        return "blocks"
    raise BadInput(f"tas cannot find the last stage of the teacher {type(teacher).__name__}; "
                   f"supported pairs: {SUPPORTED}")


def _prefix_params(teacher: nn.Module) -> list[torch.Tensor]:
    """The teacher's prefix tokens in timm's order (class, distillation, register tokens)."""
    found = [getattr(teacher, n, None) for n in ("cls_token", "dist_token", "reg_token")]
    found = [p for p in found if p is not None]
    expected = int(getattr(teacher, "num_prefix_tokens", 0) or 0)
    if sum(p.shape[1] for p in found) != expected:
        raise BadInput(f"tas: teacher {type(teacher).__name__} declares {expected} prefix tokens but exposes "
                       f"{len(found)} prefix parameters; supported pairs: {SUPPORTED}")
    return found


class TASConfig(MethodConfig):
    teacher_tail_blocks: int = Field(2, ge=1, description="ViT/Mixer: last blocks reused as the assistant's last stage "
                                                          "(Swin always uses its last stage, layers[-1])")
    temperature: float = Field(1.0, gt=0, description="OFA loss temperature")
    gamma: float = Field(1.0, gt=0, description="OFA target enhancement exponent")
    proj_dim: int = Field(256, ge=8, description="common width of the InfoNCE heads")
    nce_temperature: float = Field(0.07, gt=0.01, le=1, description="initial InfoNCE temperature (learnable)")
    detach_assistant: bool = Field(True, description="the assistant is a constant target in L(a, s)")
    w_ce: float = Field(1.0, ge=0)
    w_ts: float = Field(1.0, ge=0, description="teacher -> student: InfoNCE + OFA")
    w_ta: float = Field(1.0, ge=0, description="teacher -> assistant: InfoNCE + OFA")
    w_as: float = Field(1.0, ge=0, description="assistant -> student: InfoNCE + OFA")


@register
class TAS(Distiller):
    name = "tas"
    paper = "Li et al. 2024, TAS: Distilling Arbitrary Teacher and Student via a Hybrid Assistant (arXiv:2410.12342)"
    Config = TASConfig

    @classmethod
    def check_pair(cls, pair: PairInfo) -> None:
        if pair.teacher is None or pair.student.kind != "cnn" or pair.teacher.kind != "token":
            got = f"student kind '{pair.student.kind}', teacher kind '{pair.teacher.kind if pair.teacher else None}'"
            raise BadInput(f"tas supports only a {SUPPORTED}; got {got}. "
                           "Use ofa, hcd or mldr for other pairs.")

    def __init__(self, student, teacher, cfg: TASConfig, pair):
        super().__init__(student, teacher, cfg, pair)
        self.check_pair(pair)
        self._layout = _tail_layout(teacher)
        if self._layout == "blocks":
            depth = len(teacher.blocks)
            if cfg.teacher_tail_blocks > depth:
                raise BadInput(f"tas: teacher_tail_blocks={cfg.teacher_tail_blocks} exceeds the teacher's depth "
                               f"({depth} blocks); set method.teacher_tail_blocks to at most {depth}")
            self._n_prefix = len(_prefix_params(teacher))
            dim, gh, gw = pair.teacher.stage_shapes[-1]  # isotropic: every block sees the same token grid
        else:
            self._n_prefix = 0
            # Swin: the last stage takes the previous stage's output; measure its shape on the teacher itself.
            with torch.no_grad():
                p = next(teacher.parameters())
                size = pair.teacher.image_size
                x0 = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
                f = teacher.forward_intermediates(x0, indices=[len(teacher.layers) - 2], intermediates_only=True,
                                                  output_fmt="NCHW")[0]
            dim, gh, gw = f.shape[1:]
        self._grid = (int(gh), int(gw))
        heads = getattr(getattr(teacher, "blocks", [None])[-1], "attn", None) if self._layout == "blocks" else None
        num_heads = getattr(heads, "num_heads", None) or _heads_for(dim)
        self._s3 = pair.student.stage_indices[2]
        self.l2g = L2G(pair.student.stage_shapes[2][0], int(dim), num_heads)
        ds, dt = pair.student.dim, pair.teacher.dim
        self.nce_ts = InfoNCEHead(dt, ds, cfg.proj_dim, cfg.nce_temperature)
        self.nce_ta = InfoNCEHead(dt, dt, cfg.proj_dim, cfg.nce_temperature)
        self.nce_as = InfoNCEHead(dt, ds, cfg.proj_dim, cfg.nce_temperature)

    def assistant(self, s3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student stage-3 map [B, Cs, H, W] -> (pre-logits [B, dt], logits [B, C]).

        The teacher's modules are frozen (requires_grad False, eval) but not under no_grad:
        gradients pass through them back to L2G and the student's stages 1-3.
        """
        t = self.teacher  # plain attribute: never registered, never saved
        if self._layout == "blocks":
            prefix = torch.cat(_prefix_params(t), dim=1) if self._n_prefix else None
            x = self.l2g(s3, self._grid, prefix)  # [B, P + N, D]
            for blk in t.blocks[-self.cfg.teacher_tail_blocks:]:
                x = blk(x)
        else:
            x = self.l2g(s3, self._grid, None)  # [B, N, D]
            x = x.reshape(x.shape[0], *self._grid, x.shape[-1])  # Swin stages take [B, H, W, C]
            x = t.layers[-1](x)
        pre = t.forward_head(t.norm(x), pre_logits=True)
        return pre, classify(t, pre)

    def forward(self, xs, xt, y):
        cfg = self.cfg
        out = self.student_forward(xs, [self._s3])
        zs, fs = out.logits, out.pre_logits  # [B, C], [B, ds]
        tout = self.teacher_forward(xt)  # no grad
        zt, ft = tout.logits, tout.pre_logits  # [B, C], [B, dt]
        fa, za = self.assistant(out.feats[0])  # [B, dt], [B, C]
        fa_tgt, za_tgt = (fa.detach(), za.detach()) if cfg.detach_assistant else (fa, za)
        g, temp = cfg.gamma, cfg.temperature
        return zs, {
            "loss_ce": cfg.w_ce * self.ce(zs, y),
            "loss_ts": cfg.w_ts * (self.nce_ts(ft, fs) + ofa_loss(zs, zt, y, g, temp)),
            "loss_ta": cfg.w_ta * (self.nce_ta(ft, fa) + ofa_loss(za, zt, y, g, temp)),
            "loss_as": cfg.w_as * (self.nce_as(fa_tgt, fs) + ofa_loss(zs, za_tgt, y, g, temp)),
        }
