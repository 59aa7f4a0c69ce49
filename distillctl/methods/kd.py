"""kd: Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network". NIPS DL Workshop 2015, arXiv:1503.02531.

The student matches the teacher's temperature-softened class distribution:
``w_ce * CE(zs, y) + w_kd * T^2 * KL(p(zt, T) || p(zs, T))``.
"""
from __future__ import annotations

from pydantic import Field

from .base import Distiller, MethodConfig, kl_div
from .registry import register


class KDConfig(MethodConfig):
    temperature: float = Field(4.0, gt=0)
    w_ce: float = Field(0.1, ge=0)
    w_kd: float = Field(0.9, ge=0)


@register
class KD(Distiller):
    name = "kd"
    paper = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network (arXiv:1503.02531)"
    Config = KDConfig

    def forward(self, xs, xt, y):
        zs = self.student(xs)  # [B, C]
        zt = self.teacher_forward(xt).logits  # [B, C], no grad
        t = self.cfg.temperature
        return zs, {
            "loss_ce": self.cfg.w_ce * self.ce(zs, y),
            "loss_kd": self.cfg.w_kd * t * t * kl_div(zt, zs, t),
        }
