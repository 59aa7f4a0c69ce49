"""distillctl: cross-architecture knowledge distillation with a deployable, verified student.

The Python API (the CLI is a thin layer over it; everything logs through the ``distillctl`` logger):

- ``load_student(path)``: the bare timm student of a run folder or student folder -> ``(model, config)``.
- ``eval_transform(config)``: timm's evaluation transform for that student (the preprocessing its
  reported accuracy used), for PIL images.
- ``distillctl.recipe.load_recipe(path, overrides)``: a validated, typed recipe.
- ``distillctl.flows``: ``prepare``/``execute`` and ``train_run``, ``distill_run``, ``full_run``.
- ``distillctl.export.export_run(run, formats)``, ``distillctl.export.bench.run_bench(targets)``.

Imports stay lazy so ``import distillctl`` and ``distillctl --help`` do not load torch.
"""
from __future__ import annotations

__version__ = "0.2.0"


def load_student(path, device: str = "cpu"):
    """``(model, config)``: the student of a run folder, a student folder or its ``model.safetensors``.

    The model is rebuilt with ``timm.create_model`` from ``config.json`` and loaded strictly, in eval mode.
    """
    from pathlib import Path

    from .run import Run, load_student_folder

    p = Path(path)
    if p.is_dir() and Run.is_run(p):
        return Run.open(p).load_student(device)
    return load_student_folder(p, device)


def eval_transform(config: dict):
    """timm's evaluation transform (resize, crop, to tensor, normalise) from a student's ``config.json``."""
    from .compat import import_timm

    import_timm()
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config(pretrained_cfg=config["pretrained_cfg"]))
