"""Run folders for the export/bench/eval tests: a real recipe, a real (briefly trained) timm student.

Built here rather than by the trainer so these tests do not wait for it; written through
``distillctl.run.Run``, the owner of the layout that training writes.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from distillctl.compat import import_timm
from distillctl.data import build_data
from distillctl.models import IMAGENET_MEAN, IMAGENET_STD, InputView
from distillctl.recipe import validate_raw
from distillctl.run import Run, student_config


def tiny_recipe(model: str = "resnet18", dataset: str = "digits", size: int = 32, **export) -> dict:
    return {
        "name": "export-test", "seed": 0,
        "data": {"dataset": dataset, "image_size": size, "batch_size": 64, "val_batch_size": 128, "num_workers": 0},
        "student": {"model": model},
        "method": {"name": "ce"},
        "train": {"epochs": 1, "lr": 0.05},
        "export": {"formats": ["safetensors", "onnx"], "parity_images": 256, **export},
        "bench": {"batch_sizes": [1, 4], "warmup": 2, "warmup_s": 0.02, "iters": 8, "threads": 1},
    }


def shared_cache(tmp_path_factory) -> Path:
    """One folder for the whole session, shared by the xdist workers (each has its own basetemp below it)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "trained-students"
    path.mkdir(exist_ok=True)
    return path


def _train(recipe, data, model, view, train_steps: int) -> list[dict]:
    """``train_steps`` SGD steps on ``model`` in place; returns the metric rows they log."""
    opt = torch.optim.SGD(model.parameters(), lr=recipe.train.lr, momentum=0.9)
    rows, step = [], 0
    model.train()
    while step < train_steps:
        for x, y in data.train:
            loss = F.cross_entropy(model(view(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            rows.append({"epoch": 1, "step": step, "global_step": step, "loss_ce": loss.item(),
                         "loss": loss.item(), "lr": recipe.train.lr, "img_s": 100.0})
            if step >= train_steps:
                break
    model.eval()
    return rows


def _trained(raw: dict, recipe, data, model, view, train_steps: int, cache: Path | None) -> list[dict]:
    """Train ``model``, or, when ``cache`` holds the same training (model, data, lr, steps), load its result.

    The training is deterministic (seeded, one thread), so a cached student is the one this call would train;
    the lock makes the first of the xdist workers asking for it train it while the others wait.
    """
    if cache is None or train_steps == 0:
        return _train(recipe, data, model, view, train_steps)
    from safetensors.torch import load_file, save_file

    key = {k: raw[k] for k in ("seed", "data", "student", "train")} | {"steps": train_steps}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    weights, log = cache / f"{name}.safetensors", cache / f"{name}.json"
    with open(cache / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not log.is_file():
            rows = _train(recipe, data, model, view, train_steps)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
            log.write_text(json.dumps(rows))  # written last: its presence means both files are whole
            return rows
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    return json.loads(log.read_text())


def make_run(run_dir: Path, raw: dict | None = None, train_steps: int = 0, cache: Path | None = None) -> Path:
    """A run folder with recipe, manifest, metrics and student (optionally after ``train_steps`` SGD steps).

    With ``cache`` (see ``shared_cache``) the trained weights are shared by every run asking for the same
    training in this session, so the modules that need one trained student train it once.
    """
    timm = import_timm()
    raw = raw or tiny_recipe()
    recipe = validate_raw(raw)
    run = Run.new(recipe, run_dir)
    torch.manual_seed(0)
    data = build_data(recipe.data, seed=0, device=torch.device("cpu"))
    model = timm.create_model(recipe.student.model, num_classes=data.num_classes)
    view = InputView(recipe.data.image_size, IMAGENET_MEAN, IMAGENET_STD)
    with run.writing():
        run.create("distill")
        run.start(device="cpu")
        rows = _trained(raw, recipe, data, model, view, train_steps, cache)
        for row in rows:
            run.append_metrics(row)
        step = len(rows)
        run.append_metrics({"epoch": 1, "global_step": step, "top1": 0.5, "top5": 0.9, "lr": 0.0})
        cfg = student_config(recipe, data.num_classes, IMAGENET_MEAN, IMAGENET_STD, extra={"top1": None})
        run.save_student(model, cfg)
        run.end("completed", metrics={"student_top1": 0.5, "teacher_top1": 0.9})
    return Path(run_dir)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_onnx(run_dir: Path, exporter: str = "torchscript") -> Path:
    """RUN/export/model.onnx with the metadata export_run writes, through one exporter (torchscript: ~1 s)."""
    from distillctl.export.job import ExportJob
    from distillctl.export.onnx import export_onnx

    run = Run.open(run_dir)
    model, cfg = run.load_student()
    job = ExportJob(run=run, recipe=run.recipe, student=model, config=cfg, precision="fp32", batch=(1, 8, 32),
                    opset=None, device="cpu", torch_device=torch.device("cpu"), student_metrics={})
    dest = run.onnx_file("fp32")
    run.export_dir  # noqa: B018 - creates RUN/export
    export_onnx(model, dest, image_size=job.input_size, metadata={**job.metadata(), "precision": "fp32"},
                exporters=(exporter,))
    return dest
