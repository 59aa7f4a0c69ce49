"""ce: the student trained alone with (label-smoothed) cross-entropy.

The baseline every comparison needs; also what ``distillctl train`` runs to make a teacher.
"""
from __future__ import annotations

from .base import Distiller, MethodConfig
from .registry import register


class CEConfig(MethodConfig):
    pass


@register
class CE(Distiller):
    name = "ce"
    paper = "supervised baseline (cross-entropy, label smoothing per train.label_smoothing)"
    Config = CEConfig
    needs_teacher = False

    def forward(self, xs, xt, y):
        zs = self.student(xs)  # [B, C]
        return zs, {"loss_ce": self.ce(zs, y)}
