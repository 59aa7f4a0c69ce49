"""The commands that train: ``train``, ``distill`` and the chained ``run``, with resume.

``prepare`` turns a command line into a ``Run`` and checks the request against the folder before
anything is written (a refused ``--resume`` leaves the folder byte-identical). ``execute`` then holds
the folder's lock and drives the manifest's status; ``train_run``, ``distill_run`` and ``full_run``
do the work and return the body of the ``--json`` document. ``full_run`` chains
teacher (if it must be trained) -> distill -> export -> bench and, resumed, continues whichever
stage was interrupted.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from .errors import BadInput, Collapsed, Diverged, DistillError, Interrupted
from .recipe import Recipe, StudentConfig, apply_overrides, load_recipe, method_config, read_raw, validate_raw
from .report import commit_point, raise_if_interrupted
from .run import AMENDABLE, TEACHER_DIR, Run, student_config

log = logging.getLogger("distillctl")

COMMANDS = ("train", "distill", "run")


# ----------------------------------------------------------------------------- preparing a run


def _flat(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def recipe_changes(old: Recipe, new: Recipe) -> dict[str, tuple]:
    """Dotted keys whose resolved values differ between two recipes: key -> (old, new)."""
    a, b = _flat(old.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def amendable(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in AMENDABLE)


def prepare(command: str, source: Optional[str], *, overrides: Optional[list[str]] = None, out: Optional[str] = None,
            resume: bool = False, amend: bool = False) -> Run:
    """The run a command line names, checked against the folder; nothing is written here.

    New run: ``source`` is a recipe file. ``--resume``: ``source`` is the run folder, or a recipe that
    must agree with the run's (the run then comes from ``--out`` or ``runs/latest``). ``--amend``
    lets a resume change the keys in ``run.AMENDABLE`` (a safer lr, a clip, more epochs), recorded
    in the manifest.
    """
    overrides = list(overrides or [])
    if amend and not resume:
        raise BadInput("--amend changes a run being resumed; use it with --resume")
    if not resume:
        if not source:
            raise BadInput(f"give a RECIPE: distillctl {command} RECIPE (or --resume RUN to continue a run)")
        if Path(source).is_dir():
            raise BadInput(f"{source} is a folder; to continue a run use: distillctl {command} --resume {source}")
        run = Run.new(load_recipe(source, overrides), out)
        run.is_new = True
        _require_tracking(run.recipe)
        return run

    given = None
    folder: Optional[str] = out
    if source and Path(source).is_dir():
        if out and Path(out).resolve() != Path(source).resolve():
            raise BadInput(f"--resume {source} and --out {out} name different run folders; give one of them")
        folder = source
    elif source:
        given = source
    run = Run.open(folder)
    run.verify(metrics=False)  # a damaged file is exit 2 now, not after the folder has been touched
    if run.has_checkpoint():
        run.load_checkpoint()  # likewise the checkpoint (kept in memory for the resumed fit)
    made_by = run.manifest.get("command")
    if made_by and made_by != command:
        raise BadInput(f"{run.root} was made by `distillctl {made_by}`; continue it with "
                       f"`distillctl {made_by} --resume {run.root}`")
    if given or overrides:
        raw = read_raw(given) if given else json.loads(json.dumps(run.recipe.model_dump(mode="json")))
        requested = validate_raw(apply_overrides(raw, overrides))
        changes = recipe_changes(run.recipe, requested)
        if changes:
            shown = "; ".join(f"{k}: run has {a!r}, asked for {b!r}" for k, (a, b) in list(changes.items())[:5])
            more = f" (and {len(changes) - 5} more)" if len(changes) > 5 else ""
            if not amend:
                raise BadInput(f"the recipe given with --resume differs from {run.root}'s own ({shown}{more}); "
                               f"continue with the run's recipe (`distillctl {command} --resume {run.root}`), or pass "
                               "--amend to change optimisation keys such as train.lr, train.grad_clip, train.epochs")
            bad = [k for k in changes if not amendable(k)]
            if bad:
                raise BadInput(f"--amend can change only {', '.join(AMENDABLE)}; these keys would change what the "
                               f"run trains: {', '.join(bad[:8])}. Start a new run for them")
            run.pending_amendment = (requested, changes)
    _require_tracking(run.pending_amendment[0] if run.pending_amendment else run.recipe)
    return run


def _require_tracking(recipe: Recipe) -> None:
    if recipe.tracking.backends:
        from .tracking import require_backends

        require_backends(recipe.tracking)  # a missing library is exit 4 before any folder is written


def stages_to_redo(changes: dict) -> list[str]:
    """The stages of `run` an amendment makes stale: what it changes, and everything downstream."""
    order = ["teacher", "distill", "export", "bench"]
    first = len(order)
    for key in changes:
        if key.startswith("teacher.train."):
            first = min(first, 0)
        elif key.startswith("train."):
            first = min(first, 1)
        elif key.startswith("export."):
            first = min(first, 2)
        elif key.startswith("bench."):
            first = min(first, 3)
    return order[first:]


def status_of(err: BaseException) -> str:
    if isinstance(err, (Interrupted, KeyboardInterrupt)):
        return "interrupted"
    if isinstance(err, Collapsed):
        return "collapsed"
    if isinstance(err, Diverged):
        return "diverged"
    return "failed"


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    """Wait for every torchrun process (a no-op in a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.barrier()


def execute(command: str, run: Run, body: Callable[[Run], dict], *, device: str) -> dict:
    """Run ``body`` holding ``run``'s lock; the manifest says running -> completed / interrupted / failed."""
    if not _is_main():  # torchrun: rank 0 owns the folder, the others only compute
        return body(run)
    from .device import resolve_device

    where = str(resolve_device(device))  # a missing CUDA is exit 4 before the folder is touched
    with run.writing():
        if getattr(run, "is_new", False) and (Run.is_run(run.root) or run.has_checkpoint()):
            # another process created it between our check and our lock
            raise BadInput(f"{run.root} already holds a run (another process started it); continue it with "
                           "--resume, or choose another --out")
        if not Run.is_run(run.root):
            run.create(command)
        pending = getattr(run, "pending_amendment", None)
        if pending:
            run.amend(*pending)
            reset = stages_to_redo(pending[1])
            for name in reset:
                if run.stage_status(name) is not None:
                    run.set_stage(name, "pending")
            log.info(f"amended {run.root}: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in pending[1].items())
                     + (f"; stages to run again: {', '.join(reset)}" if reset else ""))
        run.start(device=where)
        try:
            out = body(run)
        except BaseException as err:
            msg = err.message if isinstance(err, DistillError) else ("interrupted" if isinstance(err, KeyboardInterrupt)
                                                                      else f"{type(err).__name__}: {err}")
            try:
                run.end(status_of(err), error=msg)
            except DistillError as also:  # e.g. the disk is full: report the first failure, not this one
                log.warning(f"warning: could not record the failure in {run.root}: {also.message}")
            if isinstance(err, (Interrupted, KeyboardInterrupt)) and not run.nested:
                advice = f"continue with `distillctl {command} --resume {run.root}`"
                text = msg.replace("Continue with --resume.", "").rstrip().rstrip(".;")
                raise Interrupted(f"{text}; {advice}" if text != "interrupted" else f"interrupted; {advice}") from None
            raise
        run.end("completed", metrics=out.get("metrics", {}), timings=out.get("timings", {}))
        return out


@contextmanager
def stage(run: Run, name: str, timings: Optional[dict] = None):
    """One stage of `run` in the manifest: running, then completed or how it ended; with ``timings``, its
    wall time on completion as ``timings[name + "_s"]``."""
    t0 = time.perf_counter()
    try:  # the mark is inside the try: a signal right after it still records the stage as interrupted
        if _is_main():
            run.set_stage(name, "running")
        yield
        raise_if_interrupted()  # a signal whose KeyboardInterrupt a library swallowed still ends the stage
    except BaseException as err:
        if _is_main():
            run.set_stage(name, status_of(err))
        raise
    if _is_main():
        run.set_stage(name, "completed")
    if timings is not None:
        timings[f"{name}_s"] = time.perf_counter() - t0


# ----------------------------------------------------------------------------- training


def _build(recipe: Recipe, device, dist, *, supervised: bool):
    """Data, student (+ teacher and views), measured shapes, method. Every input check happens here."""
    from .data import build_data
    from .methods import build_method, registry
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


def _train(run: Run, recipe: Recipe, *, supervised: bool, role: str, device: str, resume: bool,
           progress: bool, label: Optional[str]) -> dict:
    """Build, train with ``fit``, save the student into ``run``; returns the stage's document."""
    from .device import init_distributed, resolve_device, seed_everything
    from .models import count_params
    from .progress import Progress
    from .train import Checks, evaluate, fit

    dev = resolve_device(device)
    dist, dev = init_distributed(dev)
    seed_everything(recipe.seed + dist.rank, recipe.train.deterministic)
    data, method, s_view, t_view = _build(recipe, dev, dist, supervised=supervised)
    if dist.main:
        run.mark_started_work()
    extra = sum(count_params(m) for m in method.training_modules().values())
    teacher_metrics = {}
    if dist.main:
        log.info(f"{label or role}: {recipe.name} [{recipe.hash()}] method={method.name} data={data.name} "
                 f"({data.train_size} train / {data.val_size} val, {data.num_classes} classes) device={dev} "
                 f"-> {run.root}")
        log.info(f"  {role} {recipe.student.model}: {count_params(method.student) / 1e6:.2f}M params, "
                 f"input {s_view.describe()}")
        if method.teacher is not None:
            log.info(f"  teacher {recipe.teacher.model}: {count_params(method.teacher) / 1e6:.2f}M params, "
                     f"input {t_view.describe()}")
            teacher_metrics = evaluate(method.teacher, data.val, t_view, dev)
            log.info(f"  teacher top1={teacher_metrics['top1']:.4f} top5={teacher_metrics['top5']:.4f}")
        if extra:
            log.info(f"  training-only modules: {extra / 1e6:.2f}M params")
    from .augment import BatchMixer

    mixer = BatchMixer(recipe.data.augment, data.num_classes, seed=recipe.seed, rank=dist.rank)
    tracker = _tracker(run, recipe, resume) if dist.main else None
    t0 = time.perf_counter()
    bar = Progress(label or role, bar=progress and dist.main) if dist.main else Progress(None)
    try:
        res = fit(method, data, recipe.train, run=run, device=dev, student_view=s_view, teacher_view=t_view,
                  dist=dist, resume=resume, progress=bar,
                  checks=Checks(data.num_classes, teacher_metrics.get("top1"), supervised=supervised),
                  tracker=tracker, mix=mixer if mixer.active else None)
    except BaseException as err:
        if tracker is not None:
            tracker.close("killed" if isinstance(err, (Interrupted, KeyboardInterrupt)) else "failed")
        raise
    if tracker is not None:
        tracker.close("finished")
    train_s = time.perf_counter() - t0
    out = {"run_dir": str(run.root), "artifacts": {"checkpoint": str(run.checkpoint_file)}, "metrics": {}}
    if dist.main:
        cfg = student_config(recipe, data.num_classes, s_view.mean.flatten().tolist(), s_view.std.flatten().tolist(),
                             class_names=getattr(data, "class_names", None),
                             preprocess=getattr(data, "preprocess", None),
                             extra={"top1": res["top1"], "weights": res["chosen"]}, recipe_hash=run.recipe.hash())
        if res["trained"] or not run.student_weights.is_file():
            # a new student: what was exported or measured from the previous one no longer describes it.
            # One commit: an interrupt that came before leaves the previous student and its exports as they were
            with commit_point():
                removed = run.invalidate_exports()
                if removed:
                    log.info(f"  removed what described the previous student: {', '.join(removed)}")
                path = run.save_student(res["eval_model"], cfg)
        else:  # resumed a finished run: the student on disk (and its exports) stay as they are
            path = run.student_weights
        metrics = {"student_top1": res["top1"], "student_top5": res["top5"]}
        if teacher_metrics:
            metrics.update(teacher_top1=teacher_metrics["top1"], teacher_top5=teacher_metrics["top5"])
        out["artifacts"]["safetensors"] = str(path)
        out["metrics"] = metrics
        out["timings"] = {"train_s": train_s, "img_s": res.get("img_s")}
        out["extra_train_params"] = extra
        out["method"] = method.name
        out["num_classes"] = data.num_classes
        out["exported_weights"] = res["chosen"]
        if res.get("early_stopped_at"):
            out["early_stopped_at"] = res["early_stopped_at"]
        run.update(metrics=metrics, exported_weights=res["chosen"])
        chosen = res["chosen"]
        which = f"best epoch {chosen['epoch']}" if chosen["weights"] == "best" else "last epoch"
        log.info(f"  {role} top1={res['top1']:.4f} top5={res['top5']:.4f} ({train_s:.1f}s, {which}) -> {path}")
    return out


def _tracker(run: Run, recipe: Recipe, resume: bool, *, step: Optional[int] = None):
    """The run's experiment tracker (a no-op unless ``tracking.backends``); a teacher shares its parent's store."""
    from .tracking import Tracker

    if not recipe.tracking.backends:
        return None
    if step is None and resume and run.has_checkpoint():
        step = int(run.load_checkpoint()["global_step"])
    store = run.root.parent if run.nested else run.root
    name = f"{run.root.parent.name}/{run.root.name}" if run.nested else run.root.name
    return Tracker.open(recipe.tracking, run.root, name, recipe.model_dump(mode="json"), resume_step=step,
                        store_dir=store)


def train_run(run: Run, *, device: str = "auto", resume: bool = False, progress: bool = False,
              label: Optional[str] = None) -> dict:
    """Supervised training of the run recipe's student (a teacher, or a student baseline), method ``ce``."""
    role = "teacher" if run.nested else "model"
    return _train(run, run.recipe, supervised=True, role=role, device=device, resume=resume, progress=progress,
                  label=label or "train")


def distill_run(run: Run, *, device: str = "auto", resume: bool = False, progress: bool = False,
                recipe: Optional[Recipe] = None, label: Optional[str] = None) -> dict:
    """Distil the teacher into the student with the recipe's method (``recipe``: the run's, unless given)."""
    return _train(run, recipe or run.recipe, supervised=False, role="student", device=device, resume=resume,
                  progress=progress, label=label or "distill")


# ----------------------------------------------------------------------------- the chained run


def teacher_recipe(recipe: Recipe) -> Recipe:
    """The supervised recipe that trains the teacher (``run`` when the teacher has no weights yet)."""
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


def needs_teacher_training(recipe: Recipe) -> bool:
    t = recipe.teacher
    if t is None or t.pretrained or (t.weights and Path(t.weights).expanduser().is_file()):
        return False
    if not t.train_if_missing:
        if t.weights:
            raise BadInput(f"teacher weights not found: {t.weights} (set teacher.train_if_missing: true to train one)")
        raise BadInput("the teacher has no weights: set teacher.weights, or teacher.train_if_missing: true")
    return True


def with_teacher_weights(recipe: Recipe, weights: Path) -> Recipe:
    return recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"weights": str(weights)})})


def train_teacher(root: Path, recipe: Recipe, *, device: str, progress: bool, label: str) -> tuple[Run, Optional[dict]]:
    """Train (or finish training) the teacher that ``recipe`` asks for, as a nested run at ``root``.

    Returns the teacher's run and its document (None when it was already trained).
    """
    if Run.is_run(root):
        child = Run.open(root)
        child.nested = True
        expected = teacher_recipe(recipe)
        changes = recipe_changes(child.recipe, expected)
        if changes:  # the parent's teacher.train.* was amended: carry it into the teacher's own run
            bad = [k for k in changes if not amendable(k)]
            if bad:
                raise BadInput(f"the teacher in {root} was trained with another recipe ({', '.join(bad[:5])} differ); "
                               "start a new run")
            child.pending_amendment = (expected, changes)
        elif child.manifest.get("status") == "completed" and child.student_weights.is_file():
            return child, None
        resume = True
    else:
        child = Run(root, teacher_recipe(recipe), nested=True)
        resume = False
    doc = execute("train", child, lambda r: train_run(r, device=device, resume=resume, progress=progress,
                                                       label=label), device=device)
    return child, doc


def stages_of(recipe: Recipe) -> list[str]:
    out = ["teacher"] if needs_teacher_training(recipe) else []
    out.append("distill")
    if recipe.export.formats:
        out.append("export")
    if recipe.bench.backends:
        out.append("bench")
    return out


def full_run(run: Run, *, device: str = "auto", resume: bool = False, progress: bool = False) -> dict:
    """teacher (if needed) -> distill -> eval -> export (the recipe's formats) -> bench -> model card.

    Resumed, finished stages are skipped and the interrupted one continues.
    """
    t0 = time.perf_counter()
    recipe = run.recipe
    stages = stages_of(recipe)
    labels = {s: f"{s} {i + 1}/{len(stages)}" for i, s in enumerate(stages)}
    done = {s for s in stages if resume and run.stage_status(s) == "completed"}
    if resume:
        log.info(f"resuming {run.root}: " + ", ".join(f"{s} {run.stage_status(s) or 'not started'}" for s in stages))
    timings: dict = {}
    teacher_doc = None
    if "teacher" in stages:
        child = run.child(TEACHER_DIR)
        if "teacher" not in done:
            with stage(run, "teacher", timings):
                run.mark_started_work()
                child, teacher_doc = train_teacher(child.root, run.recipe, device=device, progress=progress,
                                                   label=labels["teacher"])
        _barrier()  # torchrun: the teacher's weights are rank 0's to write
        if not child.student_weights.is_file():
            raise BadInput(f"the teacher stage of {run.root} has no weights at {child.student_weights}")
        recipe = with_teacher_weights(recipe, child.student_weights)
        if teacher_doc:
            timings["teacher_train_s"] = teacher_doc.get("timings", {}).get("train_s")
    distill_doc = None
    if "distill" not in done:
        with stage(run, "distill", timings):
            distill_doc = distill_run(run, device=device, recipe=recipe, progress=progress, resume=resume,
                                      label=labels["distill"])
        timings["train_s"] = distill_doc.get("timings", {}).get("train_s")
    _barrier()
    if not _is_main():  # export, bench and the card are rank 0's
        return distill_doc or {}
    if "export" in stages and "export" not in done:
        from .export import export_run

        with stage(run, "export", timings):
            log.info(f"{labels['export']}: {', '.join(recipe.export.formats)}")
            export_run(run, list(recipe.export.formats), device=device, write_card=False)
    if "bench" in stages and "bench" not in done:
        from .export.bench import run_bench
        from .run import Target

        with stage(run, "bench", timings):
            log.info(f"{labels['bench']}: {', '.join(recipe.bench.backends)}")
            run_bench([Target("run", run.root, run)], device=device, write_card=False)
    from .export.card import write_model_card

    t_card = time.perf_counter()
    card = write_model_card(run)
    timings["card_s"] = time.perf_counter() - t_card
    doc = summary(run)
    doc["artifacts"]["model_card"] = str(card)
    if distill_doc:
        doc["extra_train_params"] = distill_doc.get("extra_train_params")
    timings["total_s"] = time.perf_counter() - t0
    doc["timings"] = timings
    doc["stages"] = {s: run.stage_status(s) for s in stages}
    return doc


def summary(run: Run) -> dict:
    """The ``run`` document from what the folder holds (metrics, artifacts, parity, latency)."""
    doc = {"run_dir": str(run.root), "metrics": run.metrics_summary(),
           "artifacts": {k: str(v) for k, v in run.artifacts().items()}}
    if run.has_checkpoint():
        doc["artifacts"]["checkpoint"] = str(run.checkpoint_file)
    child = run.child(TEACHER_DIR)
    if child.student_weights.is_file():
        doc["artifacts"]["teacher"] = str(child.student_weights)
    from .run import BENCH_JSON, EXPORT_JSON

    export = run.read_report(EXPORT_JSON)
    if export:
        doc["parity"] = export.get("parity", {})
        doc["gates"] = export.get("gates", [])
        for k, v in export.get("metrics", {}).items():
            doc["metrics"].setdefault(k, v)
    bench = run.read_report(BENCH_JSON)
    if bench:
        for k in ("latency_ms", "throughput_img_s", "device", "versions", "providers", "load"):
            if k in bench:
                doc[k] = bench[k]
    return doc
