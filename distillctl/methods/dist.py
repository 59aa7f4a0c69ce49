"""dist: Huang, You, Wang, Qian, Xu. "Knowledge Distillation from A Stronger Teacher". NeurIPS 2022,
arXiv:2205.10536.

Exactly matching a much stronger teacher's probabilities (KL) is hard and not needed. DIST
relaxes the match to a relation: the Pearson correlation between student and teacher
predictions, both across the classes of each sample (inter-class relation) and across the samples
of each class (intra-class relation). Correlation ignores shifts and scales of the predictions, so
the student keeps the teacher's ranking and relative confidences without copying its exact values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import Distiller, MethodConfig
from .registry import register


def pearson(u: torch.Tensor, v: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation along ``dim``: ``<u', v'> / (|u'| |v'| + eps)`` with ``u' = u - mean u``.

    The authors' denominator (eps added to the product of the norms), not torch's
    ``cosine_similarity``, which clamps each norm separately: the two differ measurably when a
    class column's centred probabilities are tiny (the intra-class relation at T = 1).
    """
    u, v = u - u.mean(dim, keepdim=True), v - v.mean(dim, keepdim=True)
    return (u * v).sum(dim) / (u.norm(dim=dim) * v.norm(dim=dim) + eps)


def dist_terms(zs: torch.Tensor, zt: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra) = (1 - mean_b rho(qs[b,:], qt[b,:]), 1 - mean_c rho(qs[:,c], qt[:,c])), unweighted."""
    qs = F.softmax(zs.float() / temperature, dim=-1)  # [B, C]
    qt = F.softmax(zt.float().detach() / temperature, dim=-1)
    inter = 1.0 - pearson(qs, qt, dim=1).mean()
    intra = 1.0 - pearson(qs, qt, dim=0).mean()
    return inter, intra


class DISTConfig(MethodConfig):
    temperature: float = Field(4.0, gt=0, description="tau")
    beta: float = Field(1.0, ge=0, description="weight of the inter-class relation")
    gamma: float = Field(1.0, ge=0, description="weight of the intra-class relation")
    w_kd: float = Field(2.0, ge=0, description="w: overall weight of the relation terms")
    w_ce: float = Field(1.0, ge=0)


@register
class DIST(Distiller):
    name = "dist"
    paper = "Huang et al. 2022, Knowledge Distillation from A Stronger Teacher (arXiv:2205.10536)"
    Config = DISTConfig

    def forward(self, xs, xt, y):
        cfg = self.cfg
        zs = self.student(xs)  # [B, C]
        zt = self.teacher_forward(xt).logits  # [B, C], no grad
        inter, intra = dist_terms(zs, zt, cfg.temperature)
        scale = cfg.w_kd * cfg.temperature ** 2
        return zs, {
            "loss_ce": cfg.w_ce * self.ce(zs, y),
            "loss_inter": scale * cfg.beta * inter,
            "loss_intra": scale * cfg.gamma * intra,
        }
