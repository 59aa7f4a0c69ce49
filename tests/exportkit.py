"""Run folders for the export/bench/eval tests: a real recipe, a real (briefly trained) timm student.

Built here rather than by the trainer so these tests do not wait for it; written through
``distillctl.run.Run``, the owner of the layout that training writes.
"""
from __future__ import annotations

import json
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
        "bench": {"batch_sizes": [1, 4], "warmup": 2, "iters": 8, "threads": 1},
    }


def make_run(run_dir: Path, raw: dict | None = None, train_steps: int = 0) -> Path:
    """A run folder with recipe, manifest, metrics and student (optionally after ``train_steps`` SGD steps)."""
    timm = import_timm()
    recipe = validate_raw(raw or tiny_recipe())
    run = Run.new(recipe, run_dir)
    torch.manual_seed(0)
    data = build_data(recipe.data, seed=0, device=torch.device("cpu"))
    model = timm.create_model(recipe.student.model, num_classes=data.num_classes)
    view = InputView(recipe.data.image_size, IMAGENET_MEAN, IMAGENET_STD)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.train.lr, momentum=0.9)
    with run.writing():
        run.create("distill")
        run.start(device="cpu")
        step = 0
        model.train()
        while step < train_steps:
            for x, y in data.train:
                loss = F.cross_entropy(model(view(x)), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                run.append_metrics({"epoch": 1, "step": step, "global_step": step, "loss_ce": loss.item(),
                                    "loss": loss.item(), "lr": recipe.train.lr, "img_s": 100.0})
                if step >= train_steps:
                    break
        model.eval()
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
