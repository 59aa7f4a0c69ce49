"""dkd: Zhao, Cui, Song, Qiu, Liang. "Decoupled Knowledge Distillation". CVPR 2022, arXiv:2203.08679.

Classical KD couples two kinds of knowledge. DKD splits the KL into a target-class part (TCKD:
the binary distribution "target vs everything else") and a non-target part (NCKD: the
distribution among the non-target classes, renormalised) and weights them independently, so
the dark knowledge in the non-target classes (beta, large) is not suppressed when the teacher is
confident. The distillation weight ramps up linearly over the first ``warmup_epochs`` epochs,
one step per epoch as in the authors' code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import Distiller, MethodConfig
from .ofa import target_mask
from .registry import register

_MASK = -1.0e4  # added to the target logit (after /T) so it vanishes from the non-target softmax


def _binary_log_probs(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """log [p_y, 1 - p_y] ``[B, 2]`` from scaled logits ``z`` [B, C], computed with logsumexp (no log(1 - p))."""
    lse_all = torch.logsumexp(z, dim=-1)
    log_target = (z * m).sum(-1) - lse_all
    log_rest = torch.logsumexp(z + _MASK * m, dim=-1) - lse_all
    return torch.stack([log_target, log_rest], dim=-1)


def dkd_terms(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), both unweighted KL(teacher || student) averaged over the batch, no T^2."""
    t = temperature
    zs, zt = zs.float() / t, zt.float().detach() / t
    m = target_mask(y, zs.shape[-1])
    log_bs, log_bt = _binary_log_probs(zs, m), _binary_log_probs(zt, m)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(-1).mean()
    log_ps = F.log_softmax(zs + _MASK * m, dim=-1)  # softmax over the non-target classes only
    log_pt = F.log_softmax(zt + _MASK * m, dim=-1)
    nckd = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()  # the target entry has p_t = 0 exactly
    return tckd, nckd


class DKDConfig(MethodConfig):
    alpha: float = Field(1.0, ge=0, description="weight of TCKD (target vs non-target)")
    beta: float = Field(8.0, ge=0, description="weight of NCKD (among non-target classes)")
    temperature: float = Field(4.0, gt=0)
    w_ce: float = Field(1.0, ge=0)
    warmup_epochs: float = Field(20.0, ge=0, description="KD weight factor min(epoch / warmup, 1), 1-based epochs")


@register
class DKD(Distiller):
    name = "dkd"
    paper = "Zhao et al. 2022, Decoupled Knowledge Distillation (arXiv:2203.08679)"
    Config = DKDConfig

    def warmup_factor(self) -> float:
        """``min(epoch / warmup_epochs, 1)`` with the 1-based epoch, constant within an epoch (authors' code).

        ``progress`` is the trainer's ``epoch_index + step / steps`` (0-based epoch index), so the
        1-based epoch is ``floor(progress) + 1``: the first epoch already distils at 1 / warmup.
        """
        w = self.cfg.warmup_epochs
        return 1.0 if w <= 0 else min((math.floor(self.progress) + 1) / w, 1.0)

    def forward(self, xs, xt, y):
        cfg = self.cfg
        zs = self.student(xs)  # [B, C]
        zt = self.teacher_forward(xt).logits  # [B, C], no grad
        tckd, nckd = dkd_terms(zs, zt, y, cfg.temperature)
        scale = self.warmup_factor() * cfg.temperature ** 2
        return zs, {
            "loss_ce": cfg.w_ce * self.ce(zs, y),
            "loss_tckd": scale * cfg.alpha * tckd,
            "loss_nckd": scale * cfg.beta * nckd,
        }
