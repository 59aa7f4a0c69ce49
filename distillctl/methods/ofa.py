"""ofa: Hao, Guo, Han, Tang, Hu, Wang, Xu. "One-for-All: Bridge the Gap Between Heterogeneous
Architectures in Knowledge Distillation". NeurIPS 2023, arXiv:2310.19444.

Hint-based losses fail across architectures because a CNN's and a ViT's intermediate features
live in different spaces. OFA-KD sidesteps feature matching: every selected student stage gets an
auxiliary branch (the shared stage projector, then ``Linear(D -> C)``) that maps the stage into
the logit space, where architecture-specific detail is gone. Each branch and the student's own
head learn the teacher's final distribution through the OFA loss, a cross-entropy against the
teacher whose target-class probability is enhanced by an exponent gamma (gamma = 1 is plain
cross-entropy against the teacher's distribution). The branches are training-only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from .base import Distiller, MethodConfig, Stages
from .heads import shared_dim, stage_projector
from .registry import register


def target_mask(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot ``[B, C]`` of the label; soft labels (mixup, smoothing) use their argmax."""
    if y.dim() > 1:
        y = y.argmax(-1)
    return F.one_hot(y, num_classes).float()


def ofa_loss(z: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, gamma: float = 1.0,
             temperature: float = 1.0) -> torch.Tensor:
    """OFA loss: ``mean_b sum_c -[(p(zt,T)_c + m_c)^gamma - m_c] * log p(z,T)_c`` with ``m = one-hot(y)``.

    ``z`` [B, C] learns from ``zt`` [B, C]. ``zt`` is used as given: detach it when it must stay a
    constant (teacher logits already carry no grad). Non-target probabilities are raised to
    gamma too (m_c = 0 there), as in the released code.
    """
    z, zt = z.float(), zt.float()
    m = target_mask(y, z.shape[-1])
    p_t = F.softmax(zt / temperature, dim=-1)
    target = (p_t + m).pow(gamma) - m  # [B, C]
    return -(target * F.log_softmax(z / temperature, dim=-1)).sum(-1).mean()


class OFAConfig(MethodConfig):
    stages: Stages = Field([1, 2, 3, 4], min_length=1,
                              description="student stages (1..4) that get an auxiliary branch")
    temperature: float = Field(1.0, gt=0)
    gamma: float = Field(1.0, gt=0, description="target enhancement exponent (1.5 is the ImageNet setting)")
    w_ce: float = Field(1.0, ge=0)
    w_kd: float = Field(1.0, ge=0, description="OFA loss on the student's own logits")
    w_ofa: float = Field(1.0, ge=0, description="OFA loss on each stage branch (summed over stages)")


@register
class OFA(Distiller):
    name = "ofa"
    paper = "Hao et al. 2023, One-for-All: Bridge the Gap Between Heterogeneous Architectures in KD (arXiv:2310.19444)"
    Config = OFAConfig

    def __init__(self, student, teacher, cfg: OFAConfig, pair):
        super().__init__(student, teacher, cfg, pair)
        d = shared_dim(pair.student, pair.teacher)
        self.branches = nn.ModuleList(
            nn.Sequential(stage_projector(pair.student, s, d), nn.Linear(d, pair.num_classes)) for s in cfg.stages
        )
        self._indices = [pair.student.stage_indices[s - 1] for s in cfg.stages]

    def forward(self, xs, xt, y):
        cfg = self.cfg
        out = self.student_forward(xs, self._indices)  # logits [B, C], feats [B, Ci, Hi, Wi] per stage
        zs = out.logits
        zt = self.teacher_forward(xt).logits  # [B, C], no grad
        branch = sum(ofa_loss(head(f), zt, y, cfg.gamma, cfg.temperature) for head, f in zip(self.branches, out.feats))
        return zs, {
            "loss_ce": cfg.w_ce * self.ce(zs, y),
            "loss_kd": cfg.w_kd * ofa_loss(zs, zt, y, cfg.gamma, cfg.temperature),
            "loss_ofa": cfg.w_ofa * branch,
        }
