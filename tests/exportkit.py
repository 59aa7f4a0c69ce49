"""Run folders for the export/bench/eval tests: a real recipe, a real (briefly trained) timm student.

Built here rather than by the trainer so these tests do not wait for it; the layout is the
one distillctl.pipeline writes (recipe.yaml, manifest.json, metrics.jsonl, student/).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from distillctl.compat import import_timm
from distillctl.data import build_data
from distillctl.export.student import save_student, student_config
from distillctl.models import IMAGENET_MEAN, IMAGENET_STD, InputView
from distillctl.recipe import validate_raw
from distillctl.runs import METRICS_FILE, RECIPE_FILE, STUDENT_DIR, Manifest, append_jsonl, atomic_write_text


def tiny_recipe(model: str = "resnet18", dataset: str = "digits", size: int = 32, **export) -> dict:
    return {
        "name": "export-test", "seed": 0,
        "data": {"dataset": dataset, "image_size": size, "batch_size": 64, "val_batch_size": 128, "num_workers": 0},
        "student": {"model": model},
        "method": {"name": "ce"},
        "train": {"epochs": 1, "lr": 0.05},
        "export": {"formats": ["safetensors", "onnx"], "parity_images": 256, **export},
        "bench": {"batch_sizes": [1, 4], "warmup": 2, "iters": 8, "threads": 1},
    }


def make_run(run_dir: Path, raw: dict | None = None, train_steps: int = 0) -> Path:
    """Write recipe.yaml, a manifest, metrics.jsonl and student/ (optionally after ``train_steps`` SGD steps)."""
    timm = import_timm()
    recipe = validate_raw(raw or tiny_recipe())
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RECIPE_FILE, recipe.to_yaml())
    torch.manual_seed(0)
    data = build_data(recipe.data, seed=0, device=torch.device("cpu"))
    model = timm.create_model(recipe.student.model, num_classes=data.num_classes)
    view = InputView(recipe.data.image_size, IMAGENET_MEAN, IMAGENET_STD)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.train.lr, momentum=0.9)
    step = 0
    model.train()
    while step < train_steps:
        for x, y in data.train:
            loss = F.cross_entropy(model(view(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            append_jsonl(run_dir / METRICS_FILE, {"epoch": 1, "step": step, "global_step": step, "loss_ce": loss.item(),
                                                  "loss": loss.item(), "lr": recipe.train.lr, "img_s": 100.0})
            if step >= train_steps:
                break
    model.eval()
    append_jsonl(run_dir / METRICS_FILE, {"epoch": 1, "global_step": step, "top1": 0.5, "top5": 0.9, "lr": 0.0})
    cfg = student_config(recipe, data.num_classes, IMAGENET_MEAN, IMAGENET_STD, {"top1": None})
    save_student(model, run_dir / STUDENT_DIR, cfg)
    m = Manifest(run_dir)
    m.start(command="distill", recipe_hash=recipe.hash(), seed=0, device="cpu")
    m.end("completed", metrics={"student_top1": 0.5, "teacher_top1": 0.9})
    return run_dir


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_onnx(run_dir: Path, exporter: str = "torchscript") -> Path:
    """RUN/export/model.onnx with the metadata export_run writes, through one exporter (torchscript: ~1 s)."""
    from distillctl.export.context import ExportContext
    from distillctl.export.onnx import ONNX_FILE, export_onnx
    from distillctl.export.student import load_student
    from distillctl.recipe import load_recipe

    run_dir = Path(run_dir)
    model, cfg = load_student(run_dir / STUDENT_DIR)
    ctx = ExportContext(run_dir=run_dir, recipe=load_recipe(run_dir / RECIPE_FILE), student=model, config=cfg,
                        precision="fp32", batch=(1, 8, 32), opset=None, device="cpu",
                        torch_device=torch.device("cpu"), student_metrics={})
    dest = ctx.out_dir / ONNX_FILE
    export_onnx(model, dest, image_size=ctx.input_size, metadata={**ctx.metadata(), "precision": "fp32"},
                exporters=(exporter,))
    return dest
