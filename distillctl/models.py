"""Teacher and student creation over timm, stage features, input views.

Stage features come from timm's own ``forward_intermediates`` / ``feature_info``, never
from per-architecture tables. "Stage i" (1..4) is chosen from ``feature_info``:
- models whose feature maps change resolution (ResNet, MobileNet, Swin, ConvNeXt): the last
  feature of each of the last four resolutions (the stride-2 stem is never a stage);
- isotropic models (ViT, Mixer: one feature per block, one resolution): four evenly spaced
  blocks ending at the last one.
Stage 4 of a CNN is then its own pre-pool feature map (``forward_features``) whenever that map
has the last stage's resolution: where the reference code takes it. For ResNets that is
``layer4`` itself; for MobileNetV2/EfficientNet it is after ``conv_head`` + ``bn2`` (1280 channels
for MobileNetV2) instead of timm's last ``feature_info`` entry (``blocks.6``, 320).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .compat import import_timm
from .errors import BadInput
from .recipe import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- weights


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely: safetensors, or torch.load(weights_only=True)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BadInput(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickle refused, wrong format
        raise BadInput(f"cannot load weights from {path}: {err}") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model", "student"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise BadInput(f"{path} does not hold a state dict")
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], *, source: str, allow_new_head: bool = False) -> None:
    """Strictly load ``sd``; with ``allow_new_head``, a classifier of another class count is re-initialised."""
    own = model.state_dict()
    if allow_new_head:
        head = _classifier_keys(model)
        dropped = [k for k in head if k in sd and sd[k].shape != own[k].shape]
        if dropped:
            print(f"note: {source}: classifier {', '.join(dropped)} has another class count; "
                  f"it is re-initialised for fine-tuning", file=sys.stderr)
            sd = {k: v for k, v in sd.items() if k not in dropped}
            sd.update({k: own[k] for k in dropped})
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        parts = []
        if bad:
            parts.append("shape mismatch: " + ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:4]))
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise BadInput(f"weights {source} do not fit {type(model).__name__}: " + "; ".join(parts)
                       + ". Check the model name, num_classes and kwargs in the recipe.")
    model.load_state_dict(sd, strict=True)


def _classifier_keys(model: nn.Module) -> list[str]:
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    if clf is None:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names.get(id(clf))
    if prefix is None:
        return []
    return [f"{prefix}.{k}" for k in clf.state_dict()]


def create_model(cfg: ModelConfig, num_classes: int, *, allow_new_head: bool = False) -> nn.Module:
    """timm model by name with the recipe's kwargs; weights from a local file or (if asked) the hub.

    This is where recipe values reach timm, so anything timm raises while building becomes BadInput
    naming the model and its kwargs (a ``patch_size: 0`` is a ZeroDivisionError deep inside timm).
    """
    from .recipe import StudentConfig, TeacherConfig, check_model, clip, model_build_error

    where = "teacher" if isinstance(cfg, TeacherConfig) else "student" if isinstance(cfg, StudentConfig) else "model"
    timm = import_timm()
    check_model(cfg, where, num_classes)  # name, then a meta-device build: bad kwargs and size before any memory
    kwargs = dict(cfg.kwargs)
    pretrained = cfg.pretrained and not cfg.weights
    try:
        model = timm.create_model(cfg.model, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except BadInput:
        raise
    except Exception as err:  # the boundary of user input: timm's own errors are the recipe's to fix
        if pretrained:
            raise BadInput(f"could not fetch pretrained weights for {cfg.model} ({type(err).__name__}: "
                           f"{clip(err)}). Offline machines need a local weights file in the "
                           f"recipe's `{where}.weights`.") from None
        raise BadInput(model_build_error(cfg, where, err)) from None
    if cfg.weights:
        load_into(model, read_state_dict(cfg.weights), source=str(cfg.weights), allow_new_head=allow_new_head)
    return model


# ----------------------------------------------------------------------------- views


class InputView(nn.Module):
    """One model's view of a [0, 1] batch: resize to its size, normalise with its mean/std."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.size = int(size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        if x01.shape[-1] != self.size or x01.shape[-2] != self.size:
            x01 = F.interpolate(x01, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x01 - self.mean) / self.std

    def describe(self) -> str:
        m = ", ".join(f"{v:.3f}" for v in self.mean.flatten().tolist())
        s = ", ".join(f"{v:.3f}" for v in self.std.flatten().tolist())
        return f"{self.size}px mean=({m}) std=({s})"


def model_norm(model: nn.Module, cfg: ModelConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean/std: the recipe's, else the model's pretrained_cfg, else ImageNet statistics."""
    pc = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(cfg.mean or pc.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg.std or pc.get("std") or IMAGENET_STD)
    return mean, std


def make_view(model: nn.Module, cfg: ModelConfig, default_size: int) -> InputView:
    mean, std = model_norm(model, cfg)
    return InputView(cfg.image_size or default_size, mean, std)


# ----------------------------------------------------------------------------- features


def model_kind(model: nn.Module) -> str:
    """'token' for ViT/Swin/Mixer-style models (attention or token mixing), else 'cnn'."""
    cls = type(model).__name__.lower()
    if any(k in cls for k in ("transformer", "mixer", "vit", "eva", "deit", "beit", "mlp")):
        return "token"
    for m in model.modules():
        if type(m).__name__.endswith("Attention"):
            return "token"
    return "cnn"


def stage_indices(model: nn.Module) -> list[int]:
    """feature_info indices of stages 1..4 (see module docstring)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise BadInput(f"{type(model).__name__} exposes no feature_info; it cannot serve a feature-based method")
    reds = [int(i.get("reduction", 0)) for i in info]
    if len(set(reds)) >= 2:
        last_of = {}
        for idx, r in enumerate(reds):
            last_of[r] = idx  # keep the last feature of each resolution
        ordered = sorted(last_of.items())
        idxs = [i for _, i in ordered]
        if reds[0] <= 2 and len(idxs) > 4:
            idxs = idxs[1:]
        idxs = idxs[-4:]
        while len(idxs) < 4:  # fewer than 4 resolutions: repeat the earliest
            idxs.insert(0, idxs[0])
        return idxs
    n = len(reds)
    return [max(0, round(n * k / 4) - 1) for k in range(1, 5)]


# A stage index meaning "the model's pre-pool feature map" (the forward_features output), not a feature_info entry.
PRE_POOL = "pre_pool"


@dataclass
class Outputs:
    logits: torch.Tensor  # [B, C]
    pre_logits: Optional[torch.Tensor] = None  # [B, D]
    feats: list[torch.Tensor] = field(default_factory=list)  # stage maps [B, Ci, Hi, Wi]


def classify(model: nn.Module, pre: torch.Tensor) -> torch.Tensor:
    return model.get_classifier()(pre)


def forward_all(model: nn.Module, x: torch.Tensor, indices: Optional[Sequence[int | str]] = None,
                pre_logits: bool = True) -> Outputs:
    """One forward giving logits, the pre-logits feature and (optionally) stage maps.

    ``indices`` are feature_info indices, or ``PRE_POOL`` for the pre-pool feature map.
    """
    feats = []
    if indices:
        uniq = sorted({i for i in indices if i != PRE_POOL})
        if uniq:
            final, inter = model.forward_intermediates(x, indices=uniq, output_fmt="NCHW", intermediates_only=False)
            by_idx = dict(zip(uniq, inter))
        else:
            final, by_idx = model.forward_features(x), {}
        by_idx[PRE_POOL] = final
        feats = [by_idx[i] for i in indices]
    else:
        final = model.forward_features(x)
    pre = model.forward_head(final, pre_logits=True)
    logits = classify(model, pre)
    return Outputs(logits, pre if pre_logits else None, feats)


@dataclass
class ModelShapes:
    kind: str
    stage_indices: list[int | str]  # feature_info indices, or PRE_POOL
    stage_shapes: list[tuple[int, int, int]]  # (C, H, W) per stage at this input size
    dim: int  # pre-logits width
    num_classes: int
    image_size: int


@torch.no_grad()
def probe(model: nn.Module, image_size: int, with_stages: bool = True) -> ModelShapes:
    """Shapes from one small forward in eval mode (no statistics updated)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    x = torch.zeros(2, 3, image_size, image_size, device=dev)
    kind = model_kind(model)
    idx = stage_indices(model) if with_stages else []
    out = forward_all(model, x, idx + [PRE_POOL] if idx else idx)
    shapes = [tuple(f.shape[1:]) for f in out.feats]
    if idx:
        pre = shapes.pop()
        # a CNN's pre-pool map at the last stage's resolution is its stage 4 (module docstring); token
        # models (tokens, or NHWC for Swin) keep their last feature_info stage
        if kind == "cnn" and len(pre) == 3 and pre[1:] == shapes[-1][1:]:
            idx[-1], shapes[-1] = PRE_POOL, pre
    model.train(was)
    return ModelShapes(kind, idx, shapes, out.pre_logits.shape[-1], out.logits.shape[-1], image_size)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
