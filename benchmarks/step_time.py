"""Training-step time of distillation methods relative to kd and ce, on one pair and one batch.

A step is ``distillctl.train.train_step``, the trainer's own step: the two input views, teacher
forward (inside the method, no grad) + student forward + training-only modules + backward +
optimizer step. Every method gets the same models' architecture, the same batch and the same
optimizer (built by ``make_step`` from one TrainConfig); steps are interleaved across methods (one step of each method per
round) so that load from other processes on a shared machine hits all methods alike; the
median over rounds after warm-up is reported.

    python benchmarks/step_time.py                                  # CPU, quickstart scale (32 px)
    python benchmarks/step_time.py --methods ce,kd,hcd,ofa --steps 30
    python benchmarks/step_time.py --device cuda --image-size 224 \
        --teacher vit_small_patch16_224 --teacher-kwargs '{}' --precision bf16 --batch 128
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from distillctl.compat import import_timm  # noqa: E402
from distillctl.methods import build_method, registry  # noqa: E402
from distillctl.methods.base import PairInfo  # noqa: E402
from distillctl.models import InputView, count_params, model_norm, probe  # noqa: E402
from distillctl.recipe import ModelConfig, TrainConfig  # noqa: E402
from distillctl.train import make_step, train_step  # noqa: E402

QUICK_TEACHER_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="ce,kd,hcd", help="comma-separated registered method names")
    p.add_argument("--teacher", default="vit_tiny_patch16_224")
    p.add_argument("--teacher-kwargs", default=None,
                   help="JSON timm kwargs for the teacher; default: quickstart ViT (img_size=32, patch_size=4, depth=4) "
                        "at 32 px, none otherwise")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--student-kwargs", default="{}")
    p.add_argument("--image-size", type=int, default=32, help="student and teacher input size")
    p.add_argument("--teacher-image-size", type=int, default=None, help="default: --image-size")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=15, help="timed rounds (one step of each method per round)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype (CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    timm = import_timm()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for but CUDA is not available")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in registry.names()]
    if unknown:
        sys.exit(f"unknown method(s) {unknown}; registered: {registry.names()}")
    t_kwargs = json.loads(a.teacher_kwargs) if a.teacher_kwargs is not None else (
        QUICK_TEACHER_KWARGS if a.image_size == 32 and a.teacher == "vit_tiny_patch16_224" else {})
    s_kwargs = json.loads(a.student_kwargs)
    t_size = a.teacher_image_size or a.image_size
    torch.manual_seed(0)

    # One teacher for everyone (frozen, eval); each method gets a fresh student of the same init.
    teacher = timm.create_model(a.teacher, pretrained=False, num_classes=a.num_classes, **t_kwargs).to(dev)
    s0 = timm.create_model(a.student, pretrained=False, num_classes=a.num_classes, **s_kwargs).to(dev)
    pair = PairInfo(a.num_classes, probe(s0, a.image_size), probe(teacher, t_size), label_smoothing=0.1, epochs=1)
    s_state = s0.state_dict()

    # the trainer's own optimisation settings (timm optimizer, schedule, scaler), identical for every method
    cfg = TrainConfig(epochs=1, lr=1e-3, weight_decay=1e-4, precision=a.precision, channels_last=True)
    s_view = InputView(a.image_size, *model_norm(s0, ModelConfig(model=a.student))).to(dev)
    t_view = InputView(t_size, *model_norm(teacher, ModelConfig(model=a.teacher))).to(dev)
    runs = {}
    for name in methods:
        student = timm.create_model(a.student, pretrained=False, num_classes=a.num_classes, **s_kwargs).to(dev)
        student.load_state_dict(s_state)
        cls = registry.get(name)
        method = build_method(name, student, teacher if cls.needs_teacher else None, cls.Config(), pair).to(dev)
        method.train()
        step = make_step(method, cfg, device=dev, student_view=s_view, teacher_view=t_view,
                         steps_per_epoch=10 ** 6)
        extra = sum(count_params(m) for m in method.training_modules().values())
        runs[name] = {"step": step, "times": [], "extra_params": extra}

    gen = torch.Generator().manual_seed(0)
    x01 = torch.rand(a.batch, 3, a.image_size, a.image_size, generator=gen).to(dev)
    y = torch.randint(0, a.num_classes, (a.batch,), generator=gen).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(r) -> float:
        sync()
        t0 = time.perf_counter()
        train_step(r["step"], [(x01, y)])
        sync()  # the step is done only when the device is
        return time.perf_counter() - t0

    for _ in range(a.warmup):
        for r in runs.values():
            step(r)
    for _ in range(a.steps):
        for r in runs.values():
            r["times"].append(step(r))

    med = {n: statistics.median(r["times"]) for n, r in runs.items()}
    result = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "teacher": a.teacher, "teacher_kwargs": t_kwargs, "student": a.student,
        "image_size": a.image_size, "teacher_image_size": t_size, "batch": a.batch,
        "precision": a.precision if dev.type == "cuda" else "fp32",
        "step": "distillctl.train.train_step",
        "steps": a.steps, "warmup": a.warmup,
        "methods": {
            n: {
                "median_ms": 1e3 * med[n],
                "min_ms": 1e3 * min(runs[n]["times"]),
                "iqr_ms": 1e3 * _iqr(runs[n]["times"]),
                "extra_params": runs[n]["extra_params"],
                "vs_kd": med[n] / med["kd"] if "kd" in med else None,
                "vs_ce": med[n] / med["ce"] if "ce" in med else None,
                "vs_kd_min": min(runs[n]["times"]) / min(runs["kd"]["times"]) if "kd" in runs else None,
            } for n in runs
        },
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return result


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def print_table(res: dict) -> None:
    print(f"# step time: {res['teacher']} {res['teacher_kwargs'] or ''} ({res['teacher_image_size']} px) -> "
          f"{res['student']} ({res['image_size']} px), batch {res['batch']}, {res['precision']}, "
          f"device {res['device']} ({res['threads']} threads), median of {res['steps']} steps after "
          f"{res['warmup']} warm-up; torch {res['versions']['torch']}, timm {res['versions']['timm']}")
    print(f"{'method':<8} {'median ms':>10} {'IQR ms':>8} {'min ms':>8} {'train-only params':>18} "
          f"{'x kd':>6} {'x ce':>6} {'x kd (min)':>10}")

    def r(v):
        return f"{v:.2f}" if v is not None else "-"

    for n, m in res["methods"].items():
        print(f"{n:<8} {m['median_ms']:>10.1f} {m['iqr_ms']:>8.1f} {m['min_ms']:>8.1f} {m['extra_params']:>18,} "
              f"{r(m['vs_kd']):>6} {r(m['vs_ce']):>6} {r(m['vs_kd_min']):>10}")


if __name__ == "__main__":
    main()
