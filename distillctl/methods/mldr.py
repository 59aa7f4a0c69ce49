"""mldr: Yang, Ye, Lin, Li, Wen, Hao, Chen. "Multi-Level Decoupled Relational Distillation for
Heterogeneous Architectures". Preprint 2025, arXiv:2502.06189.

MLDR-KD distils relations rather than raw probabilities, at the logit level and at the feature
level. DFRA (decoupled fine-grained relation alignment) compares, between student and teacher
logits, the class-to-class relation inside each sample and the sample-to-sample relation inside
each class (each a column-softmaxed outer product, matched with KL), plus the ordinary
probability KL that keeps confidence in the correct class. At the feature level each student
stage is projected (the shared stage projector) to a descriptor and a stage classifier; MSDF
(multi-scale dynamic fusion) weighs the stage logits per sample and per class with a softmax over
stages, and the fused logits are aligned with DFRA too. Projectors, stage heads and the MSDF gate
are training-only.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from ..errors import BadInput
from .base import Distiller, MethodConfig, Stages, kl_div
from .heads import shared_dim, stage_projector
from .registry import register

# A relation of L items per row costs L*L elements. Beyond this, one row alone is too big to hold.
MAX_ROW_RELATION = 1 << 26  # 67M elements (256 MiB in fp32): L up to 8192


def _relation_kl_rows(a: torch.Tensor, b: torch.Tensor, k: float) -> torch.Tensor:
    """Sum over rows n and columns j of KL(col_j softmax(k b_n b_n^T) || col_j softmax(k a_n a_n^T)).

    ``a``, ``b``: [N, L]. Column j of ``k a a^T`` is ``(k a_j) * a``, so the relation is built by
    broadcasting: [N, L(i), L(j)], softmax over i.
    """
    rs = k * a.unsqueeze(2) * a.unsqueeze(1)  # [N, L, L]
    rt = k * b.unsqueeze(2) * b.unsqueeze(1)
    log_s = F.log_softmax(rs, dim=1)  # softmax down each column
    log_t = F.log_softmax(rt, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum()


def relation_kl(a: torch.Tensor, b: torch.Tensor, k: float, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Mean over rows and columns of the column-wise relation KL (teacher ``b`` || student ``a``).

    Rows are processed in chunks of at most ``chunk_elems`` relation elements; each chunk is
    recomputed in backward (activation checkpointing), so peak memory stays at one chunk
    instead of N * L^2 for the whole call.
    """
    n, length = a.shape
    if length * length > MAX_ROW_RELATION:
        raise BadInput(f"mldr: a relation over {length} items needs {length * length:,} elements per row "
                       f"(limit {MAX_ROW_RELATION:,}); with this many classes set method.w_class=0 "
                       "(drop the class relation) or use another method")
    rows = max(1, chunk_elems // (length * length))
    if rows >= n:
        total = _relation_kl_rows(a, b, k)
    else:
        total = a.new_zeros(())
        for s in range(0, n, rows):
            part = (a[s:s + rows], b[s:s + rows])
            if torch.is_grad_enabled() and a.requires_grad:
                total = total + checkpoint(_relation_kl_rows, *part, k, use_reentrant=False)
            else:
                total = total + _relation_kl_rows(*part, k)
    return total / (n * length)


def dfra_terms(zs: torch.Tensor, zt: torch.Tensor, temperature: float = 1.0,
               chunk_elems: int = 1 << 24, class_relation: bool = True,
               sample_relation: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class relation KL, sample relation KL, probability KL), unweighted, teacher || student.

    ``a = zs/T``, ``b = zt/T``, ``k = 1/sqrt(C)`` for both relations. A disabled relation is 0.
    """
    c = zs.shape[-1]
    k = 1.0 / math.sqrt(c)
    a, b = zs.float() / temperature, zt.float().detach() / temperature
    zero = a.new_zeros(())
    cls_rel = relation_kl(a, b, k, chunk_elems) if class_relation else zero  # per sample: [C, C]
    smp_rel = relation_kl(a.t(), b.t(), k, chunk_elems) if sample_relation else zero  # per class: [B, B]
    prob = kl_div(zt.float().detach(), zs.float(), temperature)
    return cls_rel, smp_rel, prob


class MSDF(nn.Module):
    """Multi-scale dynamic fusion: per-stage, per-class weights from each stage's descriptor.

    A shared MLP ``P -> 4C -> C`` scores every stage; softmax over the stage axis gives
    ``w_i [B, C]`` with ``sum_i w_i = 1``; fused logits ``zf = sum_i w_i * z_i``.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, 4 * num_classes), nn.GELU(), nn.Linear(4 * num_classes, num_classes))

    def weights(self, descriptors: torch.Tensor) -> torch.Tensor:
        """[S, B, P] -> [S, B, C], summing to 1 over S."""
        return F.softmax(self.gate(descriptors), dim=0)

    def forward(self, descriptors: torch.Tensor, stage_logits: torch.Tensor) -> torch.Tensor:
        """descriptors [S, B, P], stage_logits [S, B, C] -> fused logits [B, C]."""
        return (self.weights(descriptors) * stage_logits).sum(0)


class MLDRConfig(MethodConfig):
    stages: Stages = Field([1, 2, 3, 4], min_length=1,
                              description="student stages (1..4) projected to stage logits")
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(2.0, ge=0, description="weight of the probability KL inside DFRA")
    w_class: float = Field(1.0, ge=0, description="weight of the class relation inside DFRA (0 skips it)")
    w_sample: float = Field(1.0, ge=0, description="weight of the sample relation inside DFRA (0 skips it)")
    w_ce: float = Field(1.0, ge=0)
    w_logit: float = Field(1.0, ge=0, description="DFRA on the student's logits")
    w_stage: float = Field(1.0, ge=0, description="DFRA on each stage's logits (summed over stages)")
    w_fused: float = Field(1.0, ge=0, description="DFRA on the MSDF-fused logits")
    relation_chunk: int = Field(1 << 24, ge=1024, description="max relation elements held at once (memory bound)")


@register
class MLDR(Distiller):
    name = "mldr"
    paper = ("Yang et al. 2025, Multi-Level Decoupled Relational Distillation for Heterogeneous Architectures "
             "(arXiv:2502.06189)")
    Config = MLDRConfig

    def __init__(self, student, teacher, cfg: MLDRConfig, pair):
        super().__init__(student, teacher, cfg, pair)
        c = pair.num_classes
        if cfg.w_class > 0 and c * c > MAX_ROW_RELATION:  # refuse before training, not at the first step
            raise BadInput(f"mldr: the class relation over {c} classes needs {c * c:,} elements per sample "
                           f"(limit {MAX_ROW_RELATION:,}); set method.w_class=0 to drop it, or use another method")
        p = shared_dim(pair.student, pair.teacher)
        self.projectors = nn.ModuleList(stage_projector(pair.student, s, p) for s in cfg.stages)
        self.stage_heads = nn.ModuleList(nn.Linear(p, pair.num_classes) for _ in cfg.stages)
        self.msdf = MSDF(p, pair.num_classes)
        self._indices = [pair.student.stage_indices[s - 1] for s in cfg.stages]

    def dfra(self, z: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        cls_rel, smp_rel, prob = dfra_terms(z, zt, cfg.temperature, cfg.relation_chunk,
                                            class_relation=cfg.w_class > 0, sample_relation=cfg.w_sample > 0)
        return cfg.w_class * cls_rel + cfg.w_sample * smp_rel + cfg.alpha * prob

    def forward(self, xs, xt, y):
        cfg = self.cfg
        out = self.student_forward(xs, self._indices)
        zs = out.logits  # [B, C]
        zt = self.teacher_forward(xt).logits  # [B, C], no grad
        desc = torch.stack([proj(f) for proj, f in zip(self.projectors, out.feats)])  # [S, B, P]
        z_stage = torch.stack([head(d) for head, d in zip(self.stage_heads, desc)])  # [S, B, C]
        zf = self.msdf(desc, z_stage)  # [B, C]
        return zs, {
            "loss_ce": cfg.w_ce * self.ce(zs, y),
            "loss_dfra": cfg.w_logit * self.dfra(zs, zt),
            "loss_stage": cfg.w_stage * sum(self.dfra(z, zt) for z in z_stage),
            "loss_fused": cfg.w_fused * self.dfra(zf, zt),
        }
