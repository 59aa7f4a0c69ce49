"""The training loop: precision, EMA, checkpoints, resume, signals, DDP.

One loop serves supervised training (method ``ce``, no teacher) and every distillation
method: it calls ``method(xs, xt, y) -> (logits, {"loss_<term>": tensor})``, sums the
dict, steps, and logs each term. Checkpoints are written atomically at the end of every
epoch and on SIGINT/SIGTERM; a NaN/Inf loss stops the run with the last good checkpoint
left in place.
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from .errors import BadInput, Diverged, Interrupted, MissingCapability
from .recipe import TrainConfig
from .runs import CHECKPOINT_FILE, METRICS_FILE, append_jsonl, temp_path_for


# ----------------------------------------------------------------------------- devices / DDP


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when present else cpu; cuda asked for but absent is exit 4."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MissingCapability("--device cuda was asked for but no CUDA device is visible to torch "
                                    f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise BadInput(f"--device must be auto, cpu or cuda, got {name!r}")


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch.distributed as td

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    # no weight decay on norms and biases (1-d tensors)
    decay = [p for p in params if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in params if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


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


# ----------------------------------------------------------------------------- checkpoints


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


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = temp_path_for(path)
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BadInput(f"cannot read checkpoint {path}: {err}") from None


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


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rich.console import Console

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=True)
    prog.start()
    prog.add_task(desc, total=total, info="")
    return prog


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fit(method: nn.Module, data, cfg: TrainConfig, *, run_dir: Path, device: torch.device,
        student_view: nn.Module, teacher_view: Optional[nn.Module], dist: Dist = Dist(),
        resume: bool = False, show_progress: bool = False, recipe_hash: str = "") -> dict:
    """Train ``method`` (a Distiller) for ``cfg.epochs``; returns final validation metrics."""
    student = method.student
    ckpt_path = Path(run_dir) / CHECKPOINT_FILE
    metrics_path = Path(run_dir) / METRICS_FILE
    use_cuda = device.type == "cuda"
    if use_cuda and cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if use_cuda else None
    amp = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    params = list(method.parameters())
    opt = build_optimizer(params, cfg)
    steps = len(data.train)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps))
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(student, decay=cfg.ema_decay)
    eval_model = lambda: ema.module if ema is not None else student  # noqa: E731

    start_epoch, start_step, global_step = 0, 0, 0
    if resume and ckpt_path.is_file():
        st = load_checkpoint(ckpt_path)
        if recipe_hash and st.get("recipe_hash") not in (None, recipe_hash):
            raise BadInput(f"{ckpt_path} was written for recipe {st.get('recipe_hash')}, not {recipe_hash}: "
                           "resume with the same recipe and --set overrides")
        method.load_state_dict({**{f"student.{k}": v for k, v in st["student"].items()},
                                **st["training_modules"]})
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        if ema is not None and st.get("ema") is not None:
            ema.load_state_dict(st["ema"])
        start_epoch, start_step, global_step = st["epoch"], st["step"], st["global_step"]
        _set_rng_state(st["rng"])
        if hasattr(data.train, "load_state"):
            data.train.load_state(st.get("data_rng"))
        if start_step >= steps:
            start_epoch, start_step = start_epoch + 1, 0
        log(f"resumed from {ckpt_path}: epoch {start_epoch + 1}/{cfg.epochs}, step {start_step}")

    def checkpoint(epoch: int, step: int) -> None:
        if not dist.main:
            return
        save_checkpoint(ckpt_path, {
            "student": student.state_dict(),
            "training_modules": {k: v for k, v in method.state_dict().items() if not k.startswith("student.")},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch, "step": step, "global_step": global_step, "rng": _rng_state(),
            "data_rng": data.train.state() if hasattr(data.train, "state") else None,
            "recipe_hash": recipe_hash,
        })

    step_fn = method
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # only the student and its training-only modules: the teacher is not part of `method`
        step_fn = DDP(method, device_ids=[device.index] if use_cuda else None, find_unused_parameters=True)
    if cfg.compile:
        step_fn = torch.compile(step_fn)

    has_teacher = getattr(method, "teacher", None) is not None and teacher_view is not None
    bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check
    last: dict = {}
    val: dict = {}
    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            data.train.set_epoch(epoch, start_step)
            method.train()
            prog = _progress(show_progress and dist.main, steps, f"epoch {epoch + 1}/{cfg.epochs}")
            t_log, n_log, n_steps_logged, sums = time.perf_counter(), 0, 0, {}
            for step, (x, y) in enumerate(data.train, start=start_step):
                if step >= steps:
                    break
                method.progress = epoch + step / steps
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if use_cuda and cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                xs = student_view(x)
                xt = teacher_view(x) if has_teacher else None
                with amp():
                    _, losses = step_fn(xs, xt, y)
                    loss = sum(losses.values())
                bad |= ~torch.isfinite(loss.detach())  # no host sync here
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                if ema is not None:
                    ema.update(student, step=global_step)
                global_step += 1
                n_log += y.numel()
                n_steps_logged += 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                sums["loss"] = sums.get("loss", 0.0) + loss.detach().float()
                done = step + 1
                if done % cfg.log_every == 0 or done == steps or stop.signum:
                    if bad.item():  # host sync: once per log interval
                        raise Diverged(f"non-finite loss at epoch {epoch + 1}, step {done}; the last good "
                                       f"checkpoint is kept at {ckpt_path}. Lower train.lr or set train.grad_clip.")
                    dt = time.perf_counter() - t_log
                    row = {"epoch": epoch + 1, "step": done, "global_step": global_step,
                           "lr": opt.param_groups[0]["lr"], "img_s": n_log * dist.world_size / max(dt, 1e-9)}
                    row.update({k: (v / n_steps_logged).item() for k, v in sums.items()})
                    last = row
                    if dist.main:
                        append_jsonl(metrics_path, row)
                    if prog:
                        prog.update(prog.task_ids[0], completed=done, info=f"loss {row['loss']:.3f}")
                    t_log, n_log, n_steps_logged, sums = time.perf_counter(), 0, 0, {}
                elif prog:
                    prog.update(prog.task_ids[0], completed=done)
                if stop.signum:
                    if prog:
                        prog.stop()
                    checkpoint(epoch, done)
                    raise Interrupted(f"interrupted by signal {stop.signum} at epoch {epoch + 1}, step {done}; "
                                      f"checkpoint written to {ckpt_path}. Continue with --resume.")
            start_step = 0
            if prog:
                prog.stop()
            if dist.main:
                val = evaluate(eval_model(), data.val, student_view, device, amp())
                row = {"epoch": epoch + 1, "global_step": global_step, "top1": val["top1"], "top5": val["top5"],
                       "lr": opt.param_groups[0]["lr"]}
                append_jsonl(metrics_path, row)
                terms = " ".join(f"{k}={v:.4f}" for k, v in last.items() if k.startswith("loss"))
                log(f"epoch {epoch + 1}/{cfg.epochs} {terms} top1={val['top1']:.4f} top5={val['top5']:.4f} "
                    f"img/s={last.get('img_s', 0):.0f}")
            checkpoint(epoch + 1, 0)
            if dist.world_size > 1:
                torch.distributed.barrier()
    if not val and dist.main:  # resumed a finished run
        val = evaluate(eval_model(), data.val, student_view, device, amp())
    return {"top1": val.get("top1"), "top5": val.get("top5"), "eval_model": eval_model(),
            "img_s": last.get("img_s")}
