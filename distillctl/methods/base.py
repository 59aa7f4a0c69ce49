"""The Distiller contract shared by every method.

A method owns three kinds of module:
- ``student``: the shipped network (a plain timm model, never modified or wrapped);
- ``teacher``: frozen, always in eval mode, held outside the module tree so it is never
  saved, never counted as a parameter and never wrapped by DDP;
- everything else registered on the method (projectors, heads, mappers): training-only, given the
  authors' reference initialisation once the method is built (``init_training_modules``).

``forward(xs, xt, y)`` returns the student logits and a dict of already weighted losses
keyed ``loss_<term>``; the trainer sums the dict and logs each key (the mdistiller shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import AfterValidator, BaseModel, ConfigDict

from ..errors import BadInput
from ..models import ModelShapes, Outputs, forward_all
from .heads import init_training_module


def _check_stages(v: list[int]) -> list[int]:
    bad = [s for s in v if s not in (1, 2, 3, 4)]
    if bad:
        raise ValueError(f"stages are student stages 1..4, got {bad}; for example stages: [1, 2, 3, 4]")
    dup = sorted({s for s in v if v.count(s) > 1})
    if dup:
        raise ValueError(f"stages must be unique, stage(s) {dup} appear more than once in {v}")
    return sorted(v)


# A validated, sorted, non-empty list of student stages (shared by every multi-stage method's config).
Stages = Annotated[list[int], AfterValidator(_check_stages)]


class MethodConfig(BaseModel):
    """Base for each method's typed parameters (the recipe's ``method`` block)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PairInfo:
    """What a method may know about its pair, measured once by ``models.probe``."""

    num_classes: int
    student: ModelShapes
    teacher: Optional[ModelShapes]
    label_smoothing: float = 0.0
    epochs: int = 1


class _InitAfterBuild(type):
    """Metaclass hook: once a method's whole constructor chain has run, initialise its training-only modules."""

    def __call__(cls, *args, **kwargs):
        method = super().__call__(*args, **kwargs)
        method.init_training_modules()
        return method


class Distiller(nn.Module, metaclass=_InitAfterBuild):
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_teacher: ClassVar[bool] = True

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], cfg: MethodConfig, pair: PairInfo):
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise BadInput(f"method '{self.name}' needs a teacher: set teacher.model (and teacher.weights) in the recipe")
        self.student = student
        self.cfg = cfg
        self.pair = pair
        self.progress = 0.0  # epochs completed, fractional; set by the trainer before each step
        self.__dict__["teacher"] = teacher  # not a submodule (see module docstring)
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    # -- pair checks ------------------------------------------------------------------
    @classmethod
    def check_pair(cls, pair: PairInfo) -> None:
        """Raise BadInput when this method cannot serve the teacher/student pair."""

    # -- helpers for subclasses ---------------------------------------------------------
    def ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with the run's label smoothing."""
        return F.cross_entropy(logits, y, label_smoothing=self.pair.label_smoothing)

    @torch.no_grad()
    def teacher_forward(self, xt: torch.Tensor, indices=None) -> Outputs:
        """Teacher logits and pre-logits (and stage maps when ``indices``), one forward, no grad."""
        self.teacher.eval()
        return forward_all(self.teacher, xt, indices)

    def student_forward(self, xs: torch.Tensor, indices=None) -> Outputs:
        return forward_all(self.student, xs, indices)

    def training_modules(self) -> dict[str, nn.Module]:
        """Modules that exist only for training (everything but the student)."""
        return {n: m for n, m in self.named_children() if n != "student"}

    def init_training_modules(self) -> None:
        """The reference initialisation for every training-only module, in one place (called after construction).

        The student and the teacher keep timm's init; modules a method borrows from them (TAS runs
        the teacher's last stage) are skipped by parameter identity.
        """
        keep = {id(p) for p in self.student.parameters()}
        if self.teacher is not None:
            keep |= {id(p) for p in self.teacher.parameters()}
        for module in self.training_modules().values():
            init_training_module(module, keep)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (within the method) that take no weight decay: whatever the student and each
        training-only module list in their own ``no_weight_decay()`` (a ViT's ``cls_token``, ``pos_embed``).
        timm's optimizer factory reads this and also exempts every bias and norm."""
        out: set[str] = set()
        for prefix, module in [("student", self.student), *self.training_modules().items()]:
            fn = getattr(module, "no_weight_decay", None)
            if callable(fn):
                out |= {f"{prefix}.{name}" for name in fn()}
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, xs: torch.Tensor, xt: Optional[torch.Tensor], y: torch.Tensor):
        raise NotImplementedError


def kl_div(p_teacher_logits: torch.Tensor, q_student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p(zt, T) || p(zs, T)) summed over classes, averaged over the batch (log_softmax throughout)."""
    log_p = F.log_softmax(p_teacher_logits / temperature, dim=-1)
    log_q = F.log_softmax(q_student_logits / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
