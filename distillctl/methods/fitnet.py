"""fitnet: Romero, Ballas, Kahou, Chassang, Gatta, Bengio. "FitNets: Hints for Thin Deep Nets".
ICLR 2015, arXiv:1412.6550.

A regressor maps one intermediate student feature map (the "guided" layer) onto the teacher's
matching map (the "hint") and the student minimises their mean squared error. For heterogeneous
pairs both sides are first made into token sequences of the same length: the student's map is
adaptively average-pooled to the teacher's grid (class token dropped; timm returns token models'
stage maps as ``[B, C, H, W]`` without it) and a linear layer maps the student width to the
teacher width. Kept as the known-weak control: pixel-wise matching across architectures is what
OFA-KD, HCD, TAS and MLDR-KD improve on.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from .base import Distiller, MethodConfig
from .registry import register


class FitNetConfig(MethodConfig):
    stage: int = Field(3, ge=1, le=4, description="student stage guided by the teacher's matching stage (1..4)")
    w_fitnet: float = Field(1.0, ge=0, description="weight of the hint MSE")
    w_ce: float = Field(1.0, ge=0)


@register
class FitNet(Distiller):
    name = "fitnet"
    paper = "Romero et al. 2015, FitNets: Hints for Thin Deep Nets (arXiv:1412.6550)"
    Config = FitNetConfig

    def __init__(self, student, teacher, cfg: FitNetConfig, pair):
        super().__init__(student, teacher, cfg, pair)
        cs = pair.student.stage_shapes[cfg.stage - 1][0]
        ct = pair.teacher.stage_shapes[cfg.stage - 1][0]
        self._s_index = pair.student.stage_indices[cfg.stage - 1]
        self._t_index = pair.teacher.stage_indices[cfg.stage - 1]
        self.regressor = nn.Linear(cs, ct)

    def forward(self, xs, xt, y):
        cfg = self.cfg
        out = self.student_forward(xs, [self._s_index])
        zs = out.logits  # [B, C]
        ft = self.teacher_forward(xt, [self._t_index]).feats[0]  # [B, Ct, Ht, Wt], no grad
        fs = F.adaptive_avg_pool2d(out.feats[0], ft.shape[-2:])  # [B, Cs, Ht, Wt]
        fs = self.regressor(fs.flatten(2).transpose(1, 2))  # [B, Ht*Wt, Ct]
        ft = ft.flatten(2).transpose(1, 2)  # [B, Ht*Wt, Ct]
        return zs, {
            "loss_ce": cfg.w_ce * self.ce(zs, y),
            "loss_fitnet": cfg.w_fitnet * F.mse_loss(fs.float(), ft.float()),
        }
