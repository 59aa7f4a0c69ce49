"""Accuracy of a trained or exported student: a run folder, a .safetensors, a .onnx or an engine.

The data comes from a recipe: ``--recipe``, else the run the artifact belongs to. The input size and
normalisation come from the artifact itself (config.json, ONNX ``metadata_props`` or the engine's
sidecar JSON), so an artifact is always fed what it was exported for.
"""
from __future__ import annotations

import logging
from typing import Optional

from .errors import BadInput
from .recipe import Recipe, load_recipe
from .run import Target, resolve_target

log = logging.getLogger("distillctl")


def _recipe_for(t: Target, recipe: Optional[str]) -> Recipe:
    if recipe:
        return load_recipe(recipe)
    if t.run is None:
        raise BadInput(f"cannot tell which data to evaluate {t.path} on: it is not inside a run folder; "
                       "pass --recipe RECIPE")
    return t.run.recipe


def _image_input(meta: dict, path) -> None:
    """An artifact must take one [B, 3, S, S] image batch: refuse anything else before reading data."""
    size = meta.get("input_size")
    ok = isinstance(size, (list, tuple)) and len(size) == 3 and int(size[0]) == 3 and int(size[1]) == int(size[2]) > 0
    if not ok:
        raise BadInput(f"{path} does not take an RGB image batch [B, 3, S, S] (input_size {size!r}); "
                       "only image classifiers exported by distillctl can be evaluated")


def evaluate_target(target: Optional[str], recipe: Optional[str] = None, device: str = "auto") -> dict:
    """top-1/top-5 of TARGET on its recipe's validation split, in the runtime the target is for."""
    import torch

    from .data import build_data
    from .device import resolve_device
    from .export.runtime import OrtPredictor, TorchPredictor, accuracy
    from .models import InputView

    t = resolve_target(target)
    if t.kind == "trt":
        from .export.trt import require

        require(device)  # exit 4 before anything else when TensorRT or CUDA is absent
    torch_device = resolve_device(device)
    rec = _recipe_for(t, recipe)

    if t.kind in ("run", "safetensors"):
        from .run import load_student_folder

        model, cfg = t.run.load_student(torch_device) if t.kind == "run" else load_student_folder(t.path, torch_device)
        pc = cfg["pretrained_cfg"]
        meta = {"input_size": pc["input_size"], "mean": pc["mean"], "std": pc["std"],
                "num_classes": cfg["num_classes"], "recipe_hash": cfg.get("distillctl", {}).get("recipe_hash")}
        predictor = TorchPredictor(model, torch_device, name="torch" if t.kind == "run" else "safetensors")
        label = str(t.path)
    elif t.kind == "onnx":
        from .export.onnx import read_metadata

        meta = read_metadata(t.path)
        missing = [k for k in ("input_size", "mean", "std", "num_classes") if k not in meta]
        if missing:
            raise BadInput(f"{t.path} lacks {', '.join(missing)} in metadata_props; it was not exported by distillctl "
                           "(export it with `distillctl export --format onnx`)")
        _image_input(meta, t.path)
        predictor = OrtPredictor(t.path, device, name="onnx")
        shape = predictor.session.get_inputs()[0].shape
        if len(shape) != 4 or shape[1] != 3:
            raise BadInput(f"{t.path} takes input of shape {shape}, not an image batch [B, 3, S, S]")
        label = str(t.path)
    else:
        from .export.trt import TrtPredictor, read_sidecar

        meta = read_sidecar(t.path)
        _image_input(meta, t.path)
        predictor = TrtPredictor(t.path, device)
        label = str(t.path)

    data = build_data(rec.data, seed=rec.seed, device=torch.device("cpu"))
    if int(meta["num_classes"]) != data.num_classes:
        raise BadInput(f"{label} predicts {meta['num_classes']} classes but {rec.data.dataset} has {data.num_classes}; "
                       "pass the --recipe it was trained with")
    accepted = t.run.accepted_hashes() if t.run is not None and not recipe else {rec.hash()}
    hash_match = meta.get("recipe_hash") in (None, *accepted)
    if not hash_match:
        log.info(f"note: {label} was exported from recipe {meta['recipe_hash']}, evaluating with recipe "
                 f"{rec.hash()} ({rec.data.dataset})")
    view = InputView(int(meta["input_size"][-1]), meta["mean"], meta["std"])
    metrics, _ = accuracy(predictor, data.val, view)
    return {"target": label, "format": {"run": "torch"}.get(t.kind, t.kind), "metrics": metrics,
            "provider": predictor.provider, "device": str(torch_device), "dataset": rec.data.dataset, "split": "val",
            "recipe_hash": rec.hash(), "recipe_hash_match": hash_match}
