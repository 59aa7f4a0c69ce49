"""The training loop: one ``train_step`` and a ``fit`` that orchestrates epochs, checks and checkpoints.

One loop serves supervised training (method ``ce``, no teacher) and every distillation method:
``method(xs, xt, y) -> (logits, {"loss_<term>": tensor})``; the step sums the dict, steps, and the
loop logs each term. ``fit`` checkpoints atomically at the end of every epoch and on SIGINT/SIGTERM,
keeps the best epoch's student weights, and stops with a documented error when training goes wrong:
a non-finite or exploding loss (``Diverged``), or a student that ends near chance while its teacher
is far above it (``Collapsed``). The rule is in ``collapse_verdict``.
"""
from __future__ import annotations

import logging
import math
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from .device import Dist
from .errors import BadInput, Collapsed, Diverged, Interrupted
from .recipe import TrainConfig

log = logging.getLogger("distillctl")

# A logged loss this many times its first logged value (and above 10) is an explosion, not noise:
# normal training lowers the loss; the ramps of DKD's warm-up stay far below this.
EXPLODE_FACTOR = 100.0


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(method: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on biases, norms and what the model lists in no_weight_decay()."""
    from .compat import import_timm

    import_timm()
    from timm.optim import create_optimizer_v2

    if cfg.optimizer == "sgd":
        opt = "sgd" if cfg.nesterov and cfg.momentum > 0 else "momentum"
        return create_optimizer_v2(method, opt=opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    return create_optimizer_v2(method, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step multiplier: linear warm-up, then cosine to min_lr / step decay / constant."""
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    floor = cfg.min_lr / cfg.lr

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return cfg.step_gamma ** ((step // steps_per_epoch) // cfg.step_size)
        t = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, batches, view: nn.Module, device: torch.device, amp=None) -> dict:
    """top-1 / top-5 of ``model`` over a batch source yielding [0, 1] images."""
    was = model.training
    model.eval()
    correct1 = correct5 = n = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp or nullcontext():
            logits = model(view(x))
        k = min(5, logits.shape[-1])
        top = logits.float().topk(k, dim=-1).indices  # [B, k]
        hit = top.eq(y[:, None])
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(-1).sum().item()
        n += y.numel()
    model.train(was)
    return {"top1": correct1 / max(1, n), "top5": correct5 / max(1, n), "n": n}


def collapse_verdict(student_top1: float, teacher_top1: Optional[float], num_classes: int) -> Optional[str]:
    """Why a distilled student counts as collapsed, or None.

    Collapsed: the teacher is far above chance (at least a quarter of the way from chance to 100 %)
    and the student recovered less than a tenth of the teacher's margin over chance. Supervised runs
    (no teacher) are never judged by this rule.
    """
    if teacher_top1 is None or num_classes < 2:
        return None
    chance = 1.0 / num_classes
    if teacher_top1 < chance + 0.25 * (1 - chance):
        return None
    if student_top1 - chance < 0.1 * (teacher_top1 - chance):
        return (f"student top-1 {student_top1:.4f} is at chance level ({chance:.4f}) while the teacher reaches "
                f"{teacher_top1:.4f}")
    return None


def _learned(history: list[float], checks: "Checks") -> bool:
    """An earlier epoch reached half of the teacher's margin over chance."""
    if checks.teacher_top1 is None or not checks.num_classes:
        return False
    chance = 1.0 / checks.num_classes
    return any(h - chance >= 0.5 * (checks.teacher_top1 - chance) for h in history)


# ----------------------------------------------------------------------------- one step


@dataclass
class Step:
    """Everything one optimisation step needs; ``make_step`` builds it, ``train_step`` runs it."""

    method: nn.Module  # the Distiller (its student and training-only modules)
    model: nn.Module  # what is called: the method, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    student_view: nn.Module
    teacher_view: Optional[nn.Module]
    device: torch.device
    amp: Callable = nullcontext
    grad_clip: Optional[float] = None
    channels_last: bool = False
    ema: Optional[nn.Module] = None
    mix: Optional[Callable] = None  # (x01, y) -> (x01, y_soft): Mixup/CutMix on the [0, 1] batch
    params: list = field(default_factory=list)


def make_step(method: nn.Module, cfg: TrainConfig, *, device: torch.device, student_view: nn.Module,
              teacher_view: Optional[nn.Module], steps_per_epoch: int, dist: Dist = Dist(),
              mix: Optional[Callable] = None) -> Step:
    """Optimizer (timm), schedule, scaler, EMA and wrappers for ``method`` on ``device``."""
    cuda = device.type == "cuda"
    if cuda and cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if cuda else None
    amp = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else nullcontext
    opt = build_optimizer(method, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))
    ema = None
    if cfg.ema:
        from .compat import import_timm

        import_timm()
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(method.student, decay=cfg.ema_decay)
    model = method
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # only the student and its training-only modules: the teacher is not part of `method`
        model = DDP(method, device_ids=[device.index] if cuda else None, find_unused_parameters=True)
    if cfg.compile:
        model = torch.compile(model)
    has_teacher = getattr(method, "teacher", None) is not None and teacher_view is not None
    return Step(method=method, model=model, optimizer=opt, scheduler=sched,
                scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
                student_view=student_view, teacher_view=teacher_view if has_teacher else None, device=device,
                amp=amp, grad_clip=cfg.grad_clip, channels_last=cuda and cfg.channels_last, ema=ema, mix=mix,
                params=[p for p in method.parameters() if p.requires_grad])


def train_step(s: Step, batches: list[tuple[torch.Tensor, torch.Tensor]], global_step: int = 0):
    """One optimizer step over ``batches`` (gradient accumulation when there are several).

    Returns ``(loss, losses)``: the mean total and the mean of each term over the micro-batches, as
    detached device tensors (no host sync here).
    """
    n = len(batches)
    s.optimizer.zero_grad(set_to_none=True)
    total = None
    sums: dict = {}
    for i, (x, y) in enumerate(batches):
        x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
        if s.mix is not None:
            x, y = s.mix(x, y)
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xs = s.student_view(x)  # both networks see the same (augmented, mixed) crop
        xt = s.teacher_view(x) if s.teacher_view is not None else None
        # DDP: reduce gradients once, on the last micro-batch
        sync = s.model.no_sync() if i < n - 1 and hasattr(s.model, "no_sync") else nullcontext()
        with sync:
            with s.amp():
                _, losses = s.model(xs, xt, y)
                loss = sum(losses.values())
            s.scaler.scale(loss / n).backward()
        total = loss.detach().float() if total is None else total + loss.detach().float()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
    if s.grad_clip:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.params, s.grad_clip)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.scheduler.step()
    if s.ema is not None:
        s.ema.update(s.method.student, step=global_step)
    return total / n, {k: v / n for k, v in sums.items()}


# ----------------------------------------------------------------------------- checkpoint state


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_as_tuple(st["python"]))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], st["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- the loop


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits 130."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class Checks:
    """What ``fit`` judges a run by: the teacher's accuracy (for the collapse rule) and the class count."""

    num_classes: int
    teacher_top1: Optional[float] = None
    supervised: bool = False  # a model trained alone (no teacher): judged by supervised_verdict


def supervised_verdict(top1: float, checks: "Checks") -> Optional[str]:
    """Why a model trained alone counts as collapsed, or None: it ended within a whisker of chance
    (less than max(2 points, half the chance rate) above it), i.e. it learned nothing. A teacher that
    `run` trains and that learned nothing cannot teach; a baseline like that is no baseline."""
    if not checks.supervised or checks.num_classes < 2:
        return None
    chance = 1.0 / checks.num_classes
    if top1 < chance + max(0.02, 0.5 * chance):
        return f"top-1 {top1:.4f} after training is at chance level ({chance:.4f}): the model learned nothing"
    return None


def _agree(flags: list[float], dist: Dist, device: torch.device, *, source_main: bool) -> list[float]:
    """The same decision on every process: rank 0's flags (``source_main``) or the max over ranks.

    With one process this is the identity. Every rank calls it at the same step, so no rank raises,
    stops or checkpoints while another enters the next collective (gloo errors, NCCL hangs).
    """
    if dist.world_size <= 1:
        return flags
    t = torch.tensor(flags, dtype=torch.float32, device=device)
    if source_main:
        torch.distributed.broadcast(t, src=0)
    else:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def _restore_lr(s: Step, cfg: TrainConfig, steps_per_epoch: int) -> None:
    """After loading optimizer and scheduler state, make the recipe's lr schedule the one in force.

    ``load_state_dict`` brings back the checkpoint's base lr; after ``--resume --amend --set train.lr=...``
    (or ``min_lr``, ``epochs``) the amended schedule must apply from the next step on.
    """
    factor = lr_factor(cfg, steps_per_epoch)
    s.scheduler.base_lrs = [cfg.lr for _ in s.optimizer.param_groups]
    for g in s.optimizer.param_groups:
        g["initial_lr"] = cfg.lr
        g["lr"] = cfg.lr * factor(s.scheduler.last_epoch)
    s.scheduler.lr_lambdas = [factor for _ in s.optimizer.param_groups]


def fit(method: nn.Module, data, cfg: TrainConfig, *, run, device: torch.device, student_view: nn.Module,
        teacher_view: Optional[nn.Module], dist: Dist = Dist(), resume: bool = False, progress=None,
        checks: Optional[Checks] = None, tracker=None, mix: Optional[Callable] = None) -> dict:
    """Train ``method`` (a Distiller) for ``cfg.epochs`` in ``run`` (a ``distillctl.run.Run``).

    Returns the final validation metrics, the weights to export (the best epoch's by default), what was
    chosen, and whether any step was trained. Raises Diverged, Collapsed (exit 6) and Interrupted (130).
    """
    from .progress import Progress

    student = method.student
    checks = checks or Checks(num_classes=getattr(getattr(method, "pair", None), "num_classes", 0) or 0)
    accumulate = max(1, cfg.accumulate)
    steps = len(data.train) // accumulate or 1
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    s = make_step(method, cfg, device=device, student_view=student_view, teacher_view=teacher_view,
                  steps_per_epoch=steps, dist=dist, mix=mix)
    eval_model = (lambda: s.ema.module) if s.ema is not None else (lambda: student)
    amp_eval = s.amp

    start_epoch, start_step, global_step = 0, 0, 0
    best = {"epoch": None, "metric": cfg.best_metric, "value": None}
    first_loss = None
    history: list[float] = []  # validation top-1 per epoch
    finished = False  # an early-stopped run is finished: resuming it must not train on
    note = ""
    if resume and run.has_checkpoint():
        st = run.load_checkpoint()
        if st.get("recipe_hash") not in (None, *run.accepted_hashes()):
            raise BadInput(f"{run.checkpoint_file} was written for recipe {st.get('recipe_hash')}, not this run's "
                           f"{run.recipe.hash()}: resume the run with its own recipe")
        method.load_state_dict({**{f"student.{k}": v for k, v in st["student"].items()},
                                **st["training_modules"]})
        s.optimizer.load_state_dict(st["optimizer"])
        s.scheduler.load_state_dict(st["scheduler"])
        _restore_lr(s, cfg, steps)
        s.scaler.load_state_dict(st["scaler"])
        if s.ema is not None and st.get("ema") is not None:
            s.ema.load_state_dict(st["ema"])
        start_epoch, start_step, global_step = st["epoch"], st["step"], st["global_step"]
        best = st.get("best") or best
        first_loss = st.get("first_loss")
        history = list(st.get("history") or [])
        # an amended recipe (more epochs, another patience) may train on; the same recipe may not
        finished = bool(st.get("finished")) and st.get("recipe_hash") == run.recipe.hash()
        _set_rng_state(st["rng"])
        if hasattr(data.train, "load_state"):
            data.train.load_state(st.get("data_rng"))
        if hasattr(mix, "load_state"):
            mix.load_state(st.get("mix_rng"))
        if dist.main:
            dropped = run.truncate_metrics(start_epoch, global_step)
            note = f", dropped {dropped} metrics rows logged after it" if dropped else ""
            # start_step == steps: the signal came after the epoch's last step; its validation runs on resume
            if start_epoch >= cfg.epochs or finished:
                log.info(f"resumed from {run.checkpoint_file}: the run was already finished "
                         f"({start_epoch} of {cfg.epochs} epochs){note}")
            else:
                log.info(f"resumed from {run.checkpoint_file}: epoch {start_epoch + 1}/{cfg.epochs}, "
                         f"step {start_step}{note}")
    elif resume and dist.main:
        log.info(f"--resume: {run.root} has no checkpoint yet, so the run starts from the beginning")
        run.clear_metrics()
    first_step = global_step

    def checkpoint(epoch: int, step: int, done: bool = False) -> None:
        if not dist.main:
            return
        run.save_checkpoint({
            "student": student.state_dict(),
            "training_modules": {k: v for k, v in method.state_dict().items() if not k.startswith("student.")},
            "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
            "scaler": s.scaler.state_dict(), "ema": s.ema.state_dict() if s.ema is not None else None,
            "epoch": epoch, "step": step, "global_step": global_step, "rng": _rng_state(),
            "data_rng": data.train.state() if hasattr(data.train, "state") else None,
            "recipe_hash": run.recipe.hash(), "best": best, "first_loss": first_loss, "history": history,
            "mix_rng": mix.state() if hasattr(mix, "state") else None, "finished": done,
        })

    def kept() -> str:
        if dist.main and run.has_checkpoint():
            return (f"the last good checkpoint ({run.load_checkpoint()['epoch']} epochs done) is kept at "
                    f"{run.checkpoint_file}")
        return "no checkpoint had been written yet, so there is none to keep"

    advice = ("Lower the learning rate (train.lr; teacher.train.lr for the teacher `distillctl run` trains) or set "
              "train.grad_clip, then rerun, or continue with --resume --amend --set train.lr=...")
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check
    last: dict = {}
    val: dict = {}
    stopped_early = None
    bar = progress or Progress(None)
    bar.start(total=cfg.epochs * steps, done=start_epoch * steps + start_step)
    try:
        with _StopFlag() as stop:
            for epoch in range(start_epoch, 0 if finished else cfg.epochs):
                data.train.set_epoch(epoch, start_step * accumulate)
                method.train()
                t_log, n_log, n_steps_logged, sums = time.perf_counter(), 0, 0, {}
                it = iter(data.train)
                for step in range(start_step, steps):
                    batches = []
                    for _ in range(accumulate):
                        try:
                            batches.append(next(it))
                        except StopIteration:
                            break
                    if not batches:
                        break
                    method.progress = epoch + step / steps
                    loss, losses = train_step(s, batches, global_step)
                    bad |= ~torch.isfinite(loss)  # no host sync here
                    global_step += 1
                    n_log += sum(int(y.shape[0]) for _, y in batches)
                    n_steps_logged += 1
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + v
                    sums["loss"] = sums.get("loss", 0.0) + loss
                    done = step + 1
                    # one process reacts to a signal at once; several agree at the log points
                    if done % cfg.log_every == 0 or done == steps or (stop.signum and dist.world_size == 1):
                        mean_loss = (sums["loss"] / n_steps_logged).item()  # host sync: once per interval
                        exploded = first_loss is not None and mean_loss > EXPLODE_FACTOR * max(first_loss, 0.1) \
                            and mean_loss > 10
                        nonfinite, exploded, signalled = _agree(
                            [float(bad.item()), float(exploded), float(bool(stop.signum))], dist, device,
                            source_main=False)
                        if nonfinite:
                            raise Diverged(f"non-finite loss at epoch {epoch + 1}, step {done}; {kept()}. {advice}")
                        if exploded:
                            raise Diverged(f"the loss exploded at epoch {epoch + 1}, step {done}: {mean_loss:.4g} "
                                           f"against {first_loss:.4g} at the start; {kept()}. {advice}")
                        dt = time.perf_counter() - t_log
                        row = {"epoch": epoch + 1, "step": done, "global_step": global_step,
                               "lr": s.optimizer.param_groups[0]["lr"],
                               "img_s": n_log * dist.world_size / max(dt, 1e-9)}
                        row.update({k: (v / n_steps_logged).item() for k, v in sums.items()})
                        last = row
                        if first_loss is None:
                            first_loss = row["loss"]
                        if dist.main:
                            run.append_metrics(row)
                            if tracker is not None:
                                tracker.log(row, global_step)
                        t_log, n_log, n_steps_logged, sums = time.perf_counter(), 0, 0, {}
                        bar.update(epoch * steps + done, epoch=epoch + 1, epochs=cfg.epochs, row=row)
                        if signalled:
                            checkpoint(epoch, done)
                            raise Interrupted(f"interrupted by signal {stop.signum or 'on another process'} at "
                                              f"epoch {epoch + 1}, step {done}; checkpoint written to "
                                              f"{run.checkpoint_file}. Continue with --resume.")
                    else:
                        bar.update(epoch * steps + done)
                start_step = 0
                collapsed = early = 0.0
                verdict = None
                if dist.main:
                    val = evaluate(eval_model(), data.val, student_view, device, amp_eval())
                    history.append(val["top1"])
                    row = {"epoch": epoch + 1, "global_step": global_step, "top1": val["top1"],
                           "top5": val["top5"], "lr": s.optimizer.param_groups[0]["lr"]}
                    run.append_metrics(row)
                    if tracker is not None:
                        tracker.log(row, global_step)
                    terms = " ".join(f"{k}={v:.4f}" for k, v in last.items() if k.startswith("loss"))
                    bar.note(f"epoch {epoch + 1}/{cfg.epochs} {terms} top1={val['top1']:.4f} "
                             f"top5={val['top5']:.4f} img/s={last.get('img_s', 0):.0f}")
                    value = val[cfg.best_metric]
                    if best["value"] is None or value > best["value"]:
                        best = {"epoch": epoch + 1, "metric": cfg.best_metric, "value": value}
                        run.save_best(eval_model(), {"epoch": epoch + 1, cfg.best_metric: value})
                    # a student that clearly learned (half way from chance to the teacher) and then fell back
                    # to chance is not worth more epochs; otherwise the exported weights are judged at the end
                    verdict = collapse_verdict(val["top1"], checks.teacher_top1, checks.num_classes)
                    collapsed = float(bool(verdict) and _learned(history[:-1], checks))
                    early = float(bool(cfg.early_stop_patience) and best["epoch"] is not None
                                  and epoch + 1 - best["epoch"] >= cfg.early_stop_patience)
                collapsed, early = _agree([collapsed, early], dist, device, source_main=True)
                if collapsed:
                    # checkpoint.pt stays at the previous epoch: the collapsed state is not written over it
                    raise _collapse(f"training collapsed at epoch {epoch + 1}: {verdict or 'see rank 0'}",
                                    run, best, checks, history)
                if early:
                    stopped_early = epoch + 1
                checkpoint(epoch + 1, 0, done=bool(early) or epoch + 1 == cfg.epochs)
                if dist.world_size > 1:
                    torch.distributed.barrier()
                if stop.signum and not early and epoch + 1 < cfg.epochs:
                    # the signal came during validation or the checkpoint: stop here, resumable
                    raise Interrupted(f"interrupted by signal {stop.signum} after epoch {epoch + 1}; checkpoint "
                                      f"written to {run.checkpoint_file}. Continue with --resume.")
                if stopped_early:
                    if dist.main:
                        bar.note(f"early stop after epoch {stopped_early}: no {cfg.best_metric} gain for "
                                 f"{cfg.early_stop_patience} epochs (best {best['value']:.4f} at epoch "
                                 f"{best['epoch']})")
                    break
    finally:
        bar.stop()
    if not val and dist.main:  # resumed a finished run
        val = evaluate(eval_model(), data.val, student_view, device, amp_eval())
    exported = eval_model()
    chosen = {"weights": "last", "epoch": len(history) or None}
    if cfg.export_weights == "best" and best["epoch"] is not None and dist.main:
        loaded = run.load_best()
        if loaded is None or loaded[1].get("epoch") != best["epoch"]:
            # the file is missing or from another epoch (a kill between it and the checkpoint): trust neither
            log.warning(f"warning: {run.best_file} does not hold the best epoch ({best['epoch']}); the last "
                        "epoch's weights are exported instead")
        else:
            if best["epoch"] != len(history):
                import copy

                exported = copy.deepcopy(eval_model())
                exported.load_state_dict(loaded[0], strict=True)
                val = evaluate(exported, data.val, student_view, device, amp_eval())
            chosen = {"weights": "best", "epoch": best["epoch"], "metric": best["metric"], "value": best["value"]}
    verdict, flag = None, 0.0
    if dist.main:  # judged on the weights that would be handed over, however training ended
        verdict = collapse_verdict(val["top1"], checks.teacher_top1, checks.num_classes) or \
            supervised_verdict(val["top1"], checks)
        flag = float(bool(verdict))
    if _agree([flag], dist, device, source_main=True)[0]:
        raise _collapse(f"training ended collapsed: {verdict or 'see rank 0'}", run, best, checks, history)
    return {"top1": val.get("top1"), "top5": val.get("top5"), "eval_model": exported, "img_s": last.get("img_s"),
            "chosen": chosen, "early_stopped_at": stopped_early, "history": history,
            "trained": global_step > first_step}


def _collapse(what: str, run, best: dict, checks: "Checks", history: list[float]) -> Collapsed:
    good = best["value"] is not None and best["metric"] == "top1" and \
        collapse_verdict(best["value"], checks.teacher_top1, checks.num_classes) is None and \
        supervised_verdict(best["value"], checks) is None
    where = (f"the last good weights are {run.best_file} (epoch {best['epoch']}, top-1 {best['value']:.4f})"
             if good else "no epoch was above chance, so there is no good checkpoint to keep")
    return Collapsed(f"{what}; {where}. The student was not exported. Check the recipe (lower train.lr, "
                     "train.grad_clip, the method's loss weights)",
                     details={"history": history, "best": best, "num_classes": checks.num_classes})
