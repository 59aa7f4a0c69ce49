"""The bare student on disk: ``model.safetensors`` + ``config.json`` in timm's local-model layout.

Export never builds a method: it rebuilds the student from the recipe and loads these
weights with ``strict=True``, so a leaked training-only key or a missing one fails loudly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import BadInput
from ..recipe import Recipe
from ..runs import atomic_write_json, temp_path_for

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def student_config(recipe: Recipe, num_classes: int, mean, std, extra: Optional[dict] = None) -> dict:
    size = recipe.student.image_size or recipe.data.image_size
    cfg = {
        "architecture": recipe.student.model,
        "num_classes": num_classes,
        "model_args": dict(recipe.student.kwargs),
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "mean": list(mean),
            "std": list(std),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "num_classes": num_classes,
        },
        "distillctl": {"recipe_hash": recipe.hash(), "method": recipe.method.name,
                       "teacher": recipe.teacher.model if recipe.teacher else None, **(extra or {})},
    }
    return cfg


def save_student(student: nn.Module, dest_dir: Path, config: dict) -> Path:
    """Write the student's weights (plain tensors, contiguous, CPU) and its config, atomically."""
    from safetensors.torch import save_file

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in student.state_dict().items()}
    meta = {"format": "pt", "architecture": config["architecture"], "num_classes": str(config["num_classes"])}
    meta.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in config.get("distillctl", {}).items()})
    path = dest_dir / WEIGHTS_FILE
    tmp = temp_path_for(path)
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(path)
    atomic_write_json(dest_dir / CONFIG_FILE, config)
    return path


def read_config(path: Path) -> dict:
    """config.json next to a model.safetensors (path may be the folder or the file)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise BadInput(f"{cfg_path} not found: a student folder holds {WEIGHTS_FILE} and {CONFIG_FILE}")
    return json.loads(cfg_path.read_text())


def load_student(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Recreate the student with timm from config.json and load the weights strictly."""
    from ..compat import import_timm
    from ..models import load_into, read_state_dict

    timm = import_timm()
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    cfg = read_config(path)
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"],
                              **cfg.get("model_args", {}))
    load_into(model, read_state_dict(weights), source=str(weights))
    return model.to(device).eval(), cfg
