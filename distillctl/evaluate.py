"""Accuracy of a trained or exported student: a run folder, a .safetensors, a .onnx or an engine.

The data comes from a recipe: ``--recipe``, else the run folder the artifact sits in. The input
size and normalisation come from the artifact itself (config.json, ONNX ``metadata_props`` or the
engine's sidecar JSON), so an artifact is always fed what it was exported for.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from .errors import BadInput
from .recipe import Recipe, load_recipe
from .runs import RECIPE_FILE, STUDENT_DIR, resolve_run


def _recipe_for(path: Path, recipe: Optional[str]) -> Recipe:
    if recipe:
        return load_recipe(recipe)
    from .export.context import run_folder_of

    run = run_folder_of(path)
    if run is None:
        raise BadInput(f"cannot tell which data to evaluate {path} on: it is not inside a run folder; "
                       "pass --recipe RECIPE")
    return load_recipe(run / RECIPE_FILE)


def _classify(target: Optional[str]) -> tuple[str, Path]:
    """(format, path) for a target; format is torch (run folder), safetensors, onnx or trt."""
    from .export.trt import ENGINE_SUFFIXES

    if not target:
        return "torch", resolve_run(None)
    p = Path(target)
    if not p.exists():
        raise BadInput(f"eval target not found: {p}")
    if p.is_dir():
        if (p / RECIPE_FILE).is_file():
            return "torch", resolve_run(str(p))
        if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
            return "safetensors", p / "model.safetensors"
        raise BadInput(f"{p} is neither a run folder (no {RECIPE_FILE}) nor a student folder "
                       "(model.safetensors + config.json)")
    if p.suffix == ".safetensors":
        return "safetensors", p
    if p.suffix == ".onnx":
        return "onnx", p
    if p.suffix in ENGINE_SUFFIXES:
        return "trt", p
    raise BadInput(f"cannot evaluate {p}: expected a run folder, .safetensors, .onnx or {'/'.join(ENGINE_SUFFIXES)}")


def evaluate_target(target: Optional[str], recipe: Optional[str] = None, device: str = "auto") -> dict:
    """top-1/top-5 of TARGET on its recipe's validation split, in the runtime the target is for."""
    from .data import build_data
    from .export.runtime import OrtRunner, TorchRunner, accuracy
    from .models import InputView
    from .train import resolve_device

    fmt, path = _classify(target)
    label = str(path)
    if fmt == "trt":
        from .export.trt import require

        require(device)  # exit 4 before anything else when TensorRT or CUDA is absent
    torch_device = resolve_device(device)
    if fmt == "torch":
        rec = load_recipe(recipe) if recipe else load_recipe(path / RECIPE_FILE)
        path = path / STUDENT_DIR
    else:
        rec = _recipe_for(path, recipe)

    if fmt in ("torch", "safetensors"):
        from .export.student import load_student

        model, cfg = load_student(path, torch_device)
        pc = cfg["pretrained_cfg"]
        meta = {"input_size": pc["input_size"], "mean": pc["mean"], "std": pc["std"],
                "num_classes": cfg["num_classes"], "recipe_hash": cfg.get("distillctl", {}).get("recipe_hash")}
        runner = TorchRunner(model, torch_device, name=fmt)
    elif fmt == "onnx":
        from .export.onnx import read_metadata

        meta = read_metadata(path)
        missing = [k for k in ("input_size", "mean", "std", "num_classes") if k not in meta]
        if missing:
            raise BadInput(f"{path} lacks {', '.join(missing)} in metadata_props; it was not exported by distillctl "
                           "(export it with `distillctl export --format onnx`)")
        runner = OrtRunner(path, device, name="onnx")
    else:
        from .export.trt import TrtRunner, read_sidecar

        meta = read_sidecar(path)
        runner = TrtRunner(path, device)

    data = build_data(rec.data, seed=rec.seed, device=torch.device("cpu"))
    if int(meta["num_classes"]) != data.num_classes:
        raise BadInput(f"{path} predicts {meta['num_classes']} classes but {rec.data.dataset} has {data.num_classes}; "
                       "pass the --recipe it was trained with")
    hash_match = meta.get("recipe_hash") in (None, rec.hash())
    if not hash_match:
        print(f"note: {path.name} was exported from recipe {meta['recipe_hash']}, evaluating with recipe "
              f"{rec.hash()} ({rec.data.dataset})", file=sys.stderr)
    view = InputView(int(meta["input_size"][-1]), meta["mean"], meta["std"])
    metrics, _ = accuracy(runner, data.val, view)
    return {"target": label, "format": fmt, "metrics": metrics, "provider": runner.provider,
            "device": str(torch_device), "dataset": rec.data.dataset, "split": "val",
            "recipe_hash": rec.hash(), "recipe_hash_match": hash_match}
