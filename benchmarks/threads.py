"""How many CPU threads, and how they wait: training-step time and batch-1 latency under each policy,
on a quiet machine and with one competing busy process, measured in one run (interleaved).

Each policy runs in its own child process (the OpenMP wait policy is read when the runtime starts),
so a round is: for each load (quiet, then one `yes > /dev/null` competitor) and each policy, one
child that times a quickstart-sized training step (resnet18 at 32 px, batch 64, the trainer's own
``train_step``) and the batch-1 latency of the same student in PyTorch eager and ONNX Runtime.
Rounds repeat, so a burst of load from elsewhere hits every policy alike. Printed: the median over
rounds, and each cell relative to the default policy on the quiet machine.

    python benchmarks/threads.py                     # 3 rounds, ~5 min on 2 cores
    python benchmarks/threads.py --rounds 1 --steps 5 --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (environment, torch threads or None for torch's default)
POLICIES = {
    "default": ({}, None),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "threads=1": ({}, 1),
    "passive+threads=cores-1": ({"OMP_WAIT_POLICY": "PASSIVE"}, "cores-1"),
    "distillctl": ({"OMP_WAIT_POLICY": "PASSIVE"}, "auto"),  # what distillctl does: free cores, passive waits
}


def child(a) -> dict:
    """Runs inside one child process: the measurements for its policy."""
    import numpy as np
    import torch

    from distillctl.compat import import_timm
    from distillctl.device import cpu_load, choose_threads
    from distillctl.methods import build_method, registry
    from distillctl.methods.base import PairInfo
    from distillctl.models import InputView, probe
    from distillctl.recipe import TrainConfig
    from distillctl.train import make_step, train_step

    cores = os.cpu_count() or 1
    want = a.threads
    if want == "cores-1":
        n = max(1, cores - 1)
    elif want == "auto":
        n = choose_threads(None)
    else:
        n = int(want) if want else torch.get_num_threads()
    torch.set_num_threads(n)
    timm = import_timm()
    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10)
    pair = PairInfo(10, probe(student, 32), None)
    method = build_method("ce", student, None, registry.get("ce").Config(), pair)
    view = InputView(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    step = make_step(method, TrainConfig(epochs=1, lr=0.01), device=torch.device("cpu"), student_view=view,
                     teacher_view=None, steps_per_epoch=10 ** 6)
    x = torch.rand(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    for _ in range(2):
        train_step(step, [(x, y)])
    steps = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        train_step(step, [(x, y)])
        steps.append(1e3 * (time.perf_counter() - t0))
    student.eval()
    x1 = torch.randn(1, 3, 32, 32)
    lat = []
    with torch.inference_mode():
        for _ in range(10):
            student(view(x1))
        for _ in range(a.calls):
            t0 = time.perf_counter()
            student(x1)
            lat.append(1e3 * (time.perf_counter() - t0))
    out = {"threads": n, "step_ms": statistics.median(steps), "eager_b1_ms": statistics.median(lat),
           "eager_b1_p90_ms": float(np.percentile(lat, 90)), "load": cpu_load()}
    try:
        import onnxruntime as ort

        path = Path(a.onnx)
        so = ort.SessionOptions()
        so.intra_op_num_threads = n
        if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE":
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        xn = x1.numpy()
        for _ in range(10):
            sess.run(None, {"input": xn})
        ort_lat = []
        for _ in range(a.calls):
            t0 = time.perf_counter()
            sess.run(None, {"input": xn})
            ort_lat.append(1e3 * (time.perf_counter() - t0))
        out["ort_b1_ms"] = statistics.median(ort_lat)
    except Exception as err:  # noqa: BLE001 - the benchmark reports what it could not measure
        out["ort_error"] = f"{type(err).__name__}: {err}"
    return out


def _onnx(path: Path) -> None:
    import torch

    from distillctl.compat import import_timm
    from distillctl.export.onnx import export_onnx

    torch.manual_seed(0)
    model = import_timm().create_model("resnet18", num_classes=10).eval()
    export_onnx(model, path, image_size=32, metadata={"recipe_hash": "bench"}, exporters=("torchscript",))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per child")
    p.add_argument("--calls", type=int, default=100, help="timed batch-1 calls per child and runtime")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", default=None, help=argparse.SUPPRESS)
    p.add_argument("--onnx", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return {}
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="distillctl-threads-"))
    onnx = work / "resnet18.onnx"
    _onnx(onnx)
    names = [n.strip() for n in a.policies.split(",") if n.strip()]
    cells: dict = {}
    for _ in range(a.rounds):
        for load in ("quiet", "busy"):
            # `yes` itself (not a shell around it): killing it must stop the competitor
            hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if load == "busy" else None
            try:
                for name in names:
                    env_extra, threads = POLICIES[name]
                    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
                    env.update(env_extra)
                    cmd = [sys.executable, __file__, "--child", "--steps", str(a.steps), "--calls", str(a.calls),
                           "--onnx", str(onnx)] + (["--threads", str(threads)] if threads else [])
                    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                    if r.returncode != 0:
                        raise SystemExit(f"{name} failed: {r.stderr[-2000:]}")
                    cells.setdefault((load, name), []).append(json.loads(r.stdout.strip().splitlines()[-1]))
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    keys = ("step_ms", "eager_b1_ms", "ort_b1_ms")
    table = {}
    for (load, name), runs in cells.items():
        table[f"{load}/{name}"] = {k: statistics.median(r[k] for r in runs if k in r) for k in keys
                                   if any(k in r for r in runs)}
        table[f"{load}/{name}"]["threads"] = runs[-1]["threads"]
        table[f"{load}/{name}"]["busy_cores_seen"] = statistics.median(r["load"]["busy_cores"] for r in runs)
    base = table.get("quiet/default", {})
    doc = {"cores": os.cpu_count(), "rounds": a.rounds, "cells": table,
           "vs_quiet_default": {c: {k: round(v[k] / base[k], 2) for k in keys if k in v and k in base}
                                for c, v in table.items()}}
    if a.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"# {doc['cores']} cores, {a.rounds} rounds, median per cell; x = ratio to quiet/default")
        print(f"{'load/policy':<34} {'thr':>3} {'step ms':>9} {'x':>6} {'eager b1 ms':>12} {'x':>6} "
              f"{'ORT b1 ms':>10} {'x':>6} {'busy seen':>9}")
        for c, v in table.items():
            r = doc["vs_quiet_default"][c]
            print(f"{c:<34} {v['threads']:>3} {v.get('step_ms', 0):>9.1f} {r.get('step_ms', 0):>6.2f} "
                  f"{v.get('eager_b1_ms', 0):>12.2f} {r.get('eager_b1_ms', 0):>6.2f} {v.get('ort_b1_ms', 0):>10.2f} "
                  f"{r.get('ort_b1_ms', 0):>6.2f} {v['busy_cores_seen']:>9.2f}")
    return doc


if __name__ == "__main__":
    main()
