"""Library entry points behind the CLI: train, distill, and the chained ``run``.

Each takes a validated Recipe and a run folder and returns a plain dict (the body of the
``--json`` document). The CLI only parses options, calls these and reports.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from .errors import BadInput
from .recipe import Recipe, StudentConfig, method_config
from .runs import (CHECKPOINT_FILE, RECIPE_FILE, STUDENT_DIR, TEACHER_DIR, Manifest, atomic_write_text,
                   set_latest)


def _describe(view) -> str:
    return view.describe()


def _build(recipe: Recipe, device: torch.device, dist, *, supervised: bool):
    """Data, student (+ teacher and views), measured shapes, method. Every input check happens here."""
    from .data import build_data
    from .methods import build_method
    from .methods.base import PairInfo
    from .models import create_model, make_view, probe

    data = build_data(recipe.data, seed=recipe.seed, device=device, rank=dist.rank, world_size=dist.world_size)
    nc = data.num_classes
    student = create_model(recipe.student, nc, allow_new_head=supervised)
    s_view = make_view(student, recipe.student, recipe.data.image_size)
    name = "ce" if supervised else recipe.method.name
    teacher = t_view = t_shapes = None
    if not supervised and recipe.teacher is not None:
        if not recipe.teacher.weights and not recipe.teacher.pretrained:
            raise BadInput("the teacher has no weights: set teacher.weights to a local .safetensors/.pth file, "
                           "or use `distillctl run` with teacher.train_if_missing: true")
        teacher = create_model(recipe.teacher, nc)
        t_view = make_view(teacher, recipe.teacher, recipe.data.image_size)
    from .methods import registry

    cls = registry.get(name)
    if cls.needs_teacher and teacher is None:
        raise BadInput(f"method '{name}' needs a teacher section in the recipe (teacher.model, teacher.weights)")
    try:
        s_shapes = probe(student, s_view.size)
    except BadInput:
        raise
    except Exception as err:
        raise BadInput(f"student {recipe.student.model} cannot run at {s_view.size}px: {err}") from None
    if teacher is not None:
        try:
            t_shapes = probe(teacher, t_view.size)
        except Exception as err:
            raise BadInput(f"teacher {recipe.teacher.model} cannot run at {t_view.size}px ({err}); "
                           "set teacher.image_size to the size it expects") from None
        if t_shapes.num_classes != nc:
            raise BadInput(f"teacher predicts {t_shapes.num_classes} classes, data has {nc}")
    pair = PairInfo(num_classes=nc, student=s_shapes, teacher=t_shapes,
                    label_smoothing=recipe.train.label_smoothing, epochs=recipe.train.epochs)
    cfg = registry.get(name).Config() if supervised else method_config(recipe)
    method = build_method(name, student, teacher, cfg, pair)
    method.to(device)
    if teacher is not None:
        teacher.to(device)
        t_view.to(device)
    s_view.to(device)
    return data, method, s_view, t_view


def _prepare_dir(recipe: Recipe, run_dir: Path, resume: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    rfile = run_dir / RECIPE_FILE
    if resume:
        if not (run_dir / CHECKPOINT_FILE).is_file():
            raise BadInput(f"nothing to resume in {run_dir}: no {CHECKPOINT_FILE}")
    elif (run_dir / CHECKPOINT_FILE).is_file():
        raise BadInput(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    atomic_write_text(rfile, recipe.to_yaml())


def _train(recipe: Recipe, run_dir: Path, *, command: str, supervised: bool, device: str = "auto",
           resume: bool = False, progress: bool = False) -> dict:
    from .export.student import save_student, student_config
    from .models import count_params
    from .train import evaluate, fit, init_distributed, log, resolve_device, seed_everything

    dev = resolve_device(device)
    dist, dev = init_distributed(dev)
    seed_everything(recipe.seed + dist.rank, recipe.train.deterministic)
    run_dir = Path(run_dir)
    if dist.main:
        _prepare_dir(recipe, run_dir, resume)
    manifest = Manifest(run_dir) if dist.main else None
    if manifest:
        manifest.start(command=command, recipe_hash=recipe.hash(), seed=recipe.seed, device=str(dev))
        set_latest(run_dir)
    try:
        data, method, s_view, t_view = _build(recipe, dev, dist, supervised=supervised)
        extra = sum(count_params(m) for m in method.training_modules().values())
        teacher_metrics = {}
        if dist.main:
            log(f"{command}: {recipe.name} [{recipe.hash()}] method={method.name} data={data.name} "
                f"({data.train_size} train / {data.val_size} val, {data.num_classes} classes) device={dev}")
            log(f"  student {recipe.student.model}: {count_params(method.student) / 1e6:.2f}M params, "
                f"input {_describe(s_view)}")
            if method.teacher is not None:
                log(f"  teacher {recipe.teacher.model}: {count_params(method.teacher) / 1e6:.2f}M params, "
                    f"input {_describe(t_view)}")
                teacher_metrics = evaluate(method.teacher, data.val, t_view, dev)
                log(f"  teacher top1={teacher_metrics['top1']:.4f} top5={teacher_metrics['top5']:.4f}")
            log(f"  training-only modules: {extra / 1e6:.2f}M params")
        t0 = time.perf_counter()
        res = fit(method, data, recipe.train, run_dir=run_dir, device=dev, student_view=s_view,
                  teacher_view=t_view, dist=dist, resume=resume, show_progress=progress,
                  recipe_hash=recipe.hash())
        train_s = time.perf_counter() - t0
        out = {"run_dir": str(run_dir), "artifacts": {"checkpoint": str(run_dir / CHECKPOINT_FILE)}, "metrics": {}}
        if dist.main:
            cfg = student_config(recipe, data.num_classes, s_view.mean.flatten().tolist(),
                                 s_view.std.flatten().tolist(), {"top1": res["top1"]})
            path = save_student(res["eval_model"], run_dir / STUDENT_DIR, cfg)
            metrics = {"student_top1": res["top1"], "student_top5": res["top5"]}
            if teacher_metrics:
                metrics.update(teacher_top1=teacher_metrics["top1"], teacher_top5=teacher_metrics["top5"])
            out["artifacts"]["safetensors"] = str(path)
            out["metrics"] = metrics
            out["timings"] = {"train_s": train_s, "img_s": res.get("img_s")}
            out["extra_train_params"] = extra
            out["method"] = method.name
            manifest.end("completed", metrics=metrics, timings=out["timings"])
            log(f"  student top1={res['top1']:.4f} top5={res['top5']:.4f} ({train_s:.1f}s) -> {path}")
        return out
    except BaseException as err:
        if manifest is not None:
            from .errors import Diverged, Interrupted

            status = ("interrupted" if isinstance(err, (Interrupted, KeyboardInterrupt))
                      else "diverged" if isinstance(err, Diverged) else "failed")
            manifest.end(status, error=str(err))
        raise


def train_run(recipe: Recipe, run_dir: Path, **kw) -> dict:
    """Supervised training of the recipe's student (a teacher, or a student baseline), method ``ce``."""
    return _train(recipe, run_dir, command="train", supervised=True, **kw)


def distill_run(recipe: Recipe, run_dir: Path, **kw) -> dict:
    """Distil the recipe's teacher into its student with the recipe's method."""
    return _train(recipe, run_dir, command="distill", supervised=False, **kw)


def teacher_recipe(recipe: Recipe) -> Recipe:
    """The supervised recipe that trains the teacher (used by ``run`` when teacher weights are absent)."""
    t = recipe.teacher
    student = StudentConfig(model=t.model, weights=t.weights if t.weights and Path(t.weights).is_file() else None,
                            pretrained=t.pretrained, image_size=t.image_size, mean=t.mean, std=t.std,
                            kwargs=t.kwargs)
    size = t.image_size or recipe.data.image_size
    # crop padding is in pixels of the training size: keep the same relative shift at the teacher's size
    pad = recipe.data.augment.random_crop_padding
    pad = max(1, round(pad * size / recipe.data.image_size)) if pad else 0
    augment = recipe.data.augment.model_copy(update={"random_crop_padding": pad})
    data = recipe.data.model_copy(update={"image_size": size, "train_per_class": None, "augment": augment})
    return recipe.model_copy(update={"name": f"{recipe.name}-teacher", "teacher": None, "student": student,
                                     "data": data, "train": t.train or recipe.train,
                                     "method": recipe.method.__class__(name="ce")})


def ensure_teacher(recipe: Recipe, run_dir: Path, *, device: str, progress: bool) -> tuple[Recipe, Optional[dict]]:
    """Train the teacher first when the recipe has no teacher weights and asks for that."""
    t = recipe.teacher
    if t is None or t.pretrained or (t.weights and Path(t.weights).expanduser().is_file()):
        return recipe, None
    if not t.train_if_missing:
        if t.weights:
            raise BadInput(f"teacher weights not found: {t.weights} (set teacher.train_if_missing: true to train one)")
        raise BadInput("the teacher has no weights: set teacher.weights, or teacher.train_if_missing: true")
    res = train_run(teacher_recipe(recipe), Path(run_dir) / TEACHER_DIR, device=device, progress=progress)
    teacher = t.model_copy(update={"weights": res["artifacts"]["safetensors"]})
    return recipe.model_copy(update={"teacher": teacher}), res
