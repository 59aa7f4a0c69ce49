"""Latency and throughput of a student in each runtime, with one harness.

Backends: ``torch`` (eager), ``torch_compile`` (torch.compile; skipped with the reason when it
cannot compile here), ``onnxruntime`` (the provider that actually loaded, CPU threads fixed,
plus ``onnxruntime_fp16`` when the run has model.fp16.onnx) and ``trt`` (engine, CUDA).

Method: inputs are placed where each runtime wants them before timing (device memory for CUDA,
a bound CPU buffer for ONNX Runtime); each backend is warmed up (``warmup`` calls and at least
0.2 s); then ``iters`` calls per backend are timed in blocks that alternate between backends
(5 rounds), so load from other processes on a shared machine hits all backends alike. A block
starts after a 20 ms pause and one untimed call, and ONNX Runtime's CPU threads do not spin
when idle: otherwise one runtime's spinning threads are timed as the other's latency (measured
here: torch eager 10x slower when interleaved call by call with a spinning ORT session). Torch
and ONNX Runtime use the same number of CPU threads. Every call waits for its result (CUDA
synchronised). Figures: p50/p90/p99/mean in ms per batch, throughput = batch x calls / total time.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..device import versions
from ..errors import BadInput, MissingCapability
from ..recipe import BenchConfig
from ..files import atomic_write_json, commit, temp_path
from ..report import commit_point
from ..run import BENCH_JSON, BENCH_PNG, Run, Target, resolve_target
from .onnx import read_metadata
from .runtime import OrtPredictor, Predictor, TorchPredictor

log = logging.getLogger("distillctl")
BACKENDS = ("torch", "torch_compile", "onnxruntime", "trt")
MIN_WARMUP_S = BenchConfig.model_fields["warmup_s"].default  # one default: the recipe's
ROUNDS = 5  # blocks per backend: interleaved so a burst of load from elsewhere hits every backend
SETTLE_S = 0.02
# After a switch the first calls of a backend are slow (its thread pool slept through the other backend's
# block): measured on a quiet 2-core machine, ONNX Runtime batch 1 with 30 timed calls in 5 blocks and one
# untimed call after each switch had p90/p50 of 2.0 on every run (1.24 with 300 calls), which reads as
# interference. These re-warm calls are not timed.
REWARM_CALLS = 3
REWARM_S = 0.005


# ----------------------------------------------------------------------------- the harness


def measure(fn: Callable[[], None], *, warmup: int, iters: int, min_warmup_s: float = MIN_WARMUP_S) -> list[float]:
    """Per-call latencies in ms of ``fn`` after warm-up."""
    return measure_interleaved({"fn": fn}, warmup=warmup, iters=iters, min_warmup_s=min_warmup_s)["fn"]


def measure_interleaved(fns: dict[str, Callable[[], None]], *, warmup: int, iters: int,
                        min_warmup_s: float = MIN_WARMUP_S, rounds: int = ROUNDS) -> dict[str, list[float]]:
    """``iters`` timed calls per function, taken in blocks that alternate between the functions.

    Each block starts after a short pause and one untimed call, so threads the previous runtime
    left spinning (OpenMP, ONNX Runtime pools) have gone idle before the clock starts.
    """
    for fn in fns.values():
        t_end = time.perf_counter() + min_warmup_s
        done = 0
        while done < warmup or time.perf_counter() < t_end:
            fn()
            done += 1
    times: dict[str, list[float]] = {k: [] for k in fns}
    rounds = max(1, min(rounds, iters))
    per_block = -(-iters // rounds)
    switch = len(fns) > 1
    for _ in range(rounds):
        for name, fn in fns.items():
            todo = min(per_block, iters - len(times[name]))
            if todo <= 0:
                continue
            if switch:  # let the other backend's threads go quiet, then wake this one's before timing
                time.sleep(SETTLE_S)
                t_wake = time.perf_counter() + REWARM_S
                for _ in range(REWARM_CALLS):
                    fn()
                while time.perf_counter() < t_wake:
                    fn()
            for _ in range(todo):
                t0 = time.perf_counter_ns()
                fn()
                times[name].append((time.perf_counter_ns() - t0) / 1e6)
    return times


def summarize(times_ms: list[float], batch: int) -> dict:
    a = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": round(float(p50), 4), "p90": round(float(p90), 4), "p99": round(float(p99), 4),
            "mean": round(float(a.mean()), 4), "std": round(float(a.std()), 4), "min": round(float(a.min()), 4),
            "iters": int(a.size), "throughput_img_s": round(float(batch * a.size / (a.sum() / 1e3)), 2)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(torch_device: torch.device, threads: int) -> dict:
    out = {"type": torch_device.type, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": threads}
    if torch_device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(torch_device)
        out["cuda"] = torch.version.cuda
    return out


# ----------------------------------------------------------------------------- targets


@dataclass
class BenchTarget:
    label: str
    run: Optional[Run]  # where bench.json goes (None: next to the file)
    input_size: int
    sources: dict[str, Path] = field(default_factory=dict)  # backend/format -> file
    bench: BenchConfig = field(default_factory=BenchConfig)
    where: Optional[Path] = None  # the artifact itself, for a target outside any run


def bench_target(target: Target | str | None) -> BenchTarget:
    """What to time for a TARGET: a run folder (its student and exports), a .safetensors, a .onnx or an engine."""
    from . import trt as trt_format

    t = target if isinstance(target, Target) else resolve_target(target)
    run = t.run
    bench = run.recipe.bench if run is not None else BenchConfig()
    if t.kind == "run":
        run.verify()  # a damaged file of the run is exit 2 before anything is timed or written
        size = int(run.student_config()["pretrained_cfg"]["input_size"][-1])
        bt = BenchTarget(run.root.name, run, size, bench=bench)
        bt.sources["torch"] = bt.sources["torch_compile"] = run.student_dir
        arts = run.artifacts()
        for fmt, key in (("onnxruntime", "onnx"), ("onnxruntime_fp16", "onnx_fp16"), ("onnxruntime_int8", "onnx_int8"),
                         ("trt", "trt"), ("trt_fp16", "trt_fp16"), ("trt_int8", "trt_int8")):
            if key in arts:
                bt.sources[fmt] = arts[key]
        return bt
    p = t.path
    if t.kind == "safetensors":
        from ..run import read_student_config

        size = int(read_student_config(p.parent)["pretrained_cfg"]["input_size"][-1])
        bt = BenchTarget(t.label, run, size, bench=bench, where=p)
        bt.sources["torch"] = bt.sources["torch_compile"] = p
        return bt
    if t.kind == "onnx":
        meta = read_metadata(p)
        if "input_size" not in meta:
            raise BadInput(f"{p} has no input_size in metadata_props (not exported by distillctl)")
        prec = meta.get("precision", "fp32")
        fmt = "onnxruntime" if prec == "fp32" else f"onnxruntime_{prec}"
        return BenchTarget(t.label, run, int(meta["input_size"][-1]), {fmt: p}, bench, where=p)
    side = trt_format.read_sidecar(p)
    return BenchTarget(t.label, run, int(side["input_size"][-1]), {"trt": p}, bench, where=p)


def _open(fmt: str, src: Path, device: str, torch_device: torch.device, threads: int) -> Predictor:
    if fmt in ("torch", "torch_compile"):
        from ..run import load_student_folder

        model, _ = load_student_folder(src, torch_device)
        predictor = TorchPredictor(model, torch_device, name=fmt)
        if fmt == "torch_compile":
            predictor.model = torch.compile(model)
            predictor.provider = f"torch.compile(inductor)-{torch_device.type}"
        return predictor
    if fmt.startswith("onnxruntime"):
        return OrtPredictor(src, device, threads=threads, name=fmt, spinning=False)
    from .trt import TrtPredictor

    return TrtPredictor(src, device)


# ----------------------------------------------------------------------------- entry point


def run_bench(targets: list, *, batch_sizes: Optional[list[int]] = None, backends: Optional[list[str]] = None,
              device: str = "auto", warmup: Optional[int] = None, iters: Optional[int] = None,
              threads: Optional[int] = None, write_card: bool = True) -> dict:
    """Latency/throughput per format and batch size; writes bench.json and bench.png into each run folder
    (next to the file for an artifact outside any run) and refreshes the run's model card."""
    from . import trt as trt_format
    from ..device import resolve_device

    from ..recipe import bench_options

    bench_options(batch_sizes=batch_sizes, warmup=warmup, iters=iters, threads=threads)  # bounds, named options
    resolved = [bench_target(t) for t in (targets or [None])]
    explicit = backends is not None
    if explicit:
        backends = [b.strip() for x in backends for b in str(x).split(",") if b.strip()]
        for b in backends:
            if b not in BACKENDS:
                raise BadInput(f"unknown bench backend '{b}'; choose from {', '.join(BACKENDS)}")
    torch_device = resolve_device(device)
    first = resolved[0].bench
    warmup = first.warmup if warmup is None else warmup
    iters = first.iters if iters is None else iters
    warmup_s = first.warmup_s
    from ..device import choose_threads, cpu_load

    load_before = cpu_load()
    threads = choose_threads(threads or first.threads, load_before)  # the cores other processes leave free
    sizes = [int(b) for b in (batch_sizes or first.batch_sizes)]

    latency, throughput, providers, skipped, speedup, compile_s = {}, {}, {}, {}, {}, {}
    prefix = len(resolved) > 1
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in resolved:
            # `bench.backends: []` only skips the bench stage of `run`; asked for, bench uses the defaults
            wanted = list(backends if explicit else (t.bench.backends or BenchConfig().backends))
            for base in ("onnxruntime", "trt"):  # every precision the run exported for a backend asked for
                if base in wanted:
                    extra = [f"{base}_{p}" for p in ("fp16", "int8") if f"{base}_{p}" in t.sources]
                    i = wanted.index(base) + 1
                    wanted[i:i] = extra
            if not explicit and not ({"torch", "torch_compile"} & t.sources.keys()):
                wanted = list(t.sources)  # a lone artifact file: bench what it is
            predictors: dict[str, Predictor] = {}
            for fmt in wanted:
                key = f"{t.label}/{fmt}" if prefix else fmt
                if fmt.startswith("trt"):  # asked for explicitly (or an engine target): a missing TensorRT is exit 4
                    try:
                        trt_format.require(device)
                    except MissingCapability as err:
                        if explicit or t.sources.keys() == {"trt"}:
                            raise
                        skipped[key] = err.message
                        continue
                if fmt not in t.sources:
                    skipped[key] = (f"no artifact for {fmt} in {t.label}: run `distillctl export "
                                    f"--format {'trt' if fmt == 'trt' else 'onnx'}` first"
                                    if t.run and fmt in ("onnxruntime", "trt") else f"not applicable to {t.label}")
                    continue
                predictors[key] = _open(fmt, t.sources[fmt], device, torch_device, threads)
            for b in sizes:
                x = np.random.default_rng(0).standard_normal((b, 3, t.input_size, t.input_size)).astype(np.float32)
                fns = {}
                for key, r in predictors.items():
                    try:
                        t0 = time.perf_counter()
                        fn = r.timed_call(x)
                        fn()  # torch.compile compiles here
                        if r.name == "torch_compile":
                            compile_s.setdefault(key, {})[str(b)] = round(time.perf_counter() - t0, 2)
                        fns[key] = fn
                    except Exception as err:
                        if r.name != "torch_compile" and not isinstance(err, BadInput):
                            raise
                        skipped[f"{key}[{b}]" if r.name != "torch_compile" else key] = \
                            f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
                times = measure_interleaved(fns, warmup=warmup, iters=iters, min_warmup_s=warmup_s)
                for key, ts in times.items():
                    s = summarize(ts, b)
                    latency.setdefault(key, {})[str(b)] = {k: s[k] for k in ("p50", "p90", "p99", "mean")}
                    throughput.setdefault(key, {})[str(b)] = s["throughput_img_s"]
                    providers[key] = predictors[key].provider
            del predictors  # free sessions/engines before the next target
    finally:
        torch.set_num_threads(saved_threads)
    for key, per in latency.items():
        base_key = key.rsplit("/", 1)[0] + "/torch" if prefix else "torch"
        if base_key in latency and key != base_key:
            speedup[key] = {b: round(latency[base_key][b]["p50"] / v["p50"], 3)
                            for b, v in per.items() if b in latency[base_key]}
    if not latency:
        raise BadInput("nothing could be measured: " + ("; ".join(f"{k}: {v}" for k, v in skipped.items())
                                                     or "no backend applies to the targets")
                       + ". The previous bench.json, if any, is unchanged")
    load = interference(latency, load_before, cpu_load(), threads)
    if load["contaminated"]:
        log.warning("warning: the timings look disturbed by other load (" + "; ".join(load["reasons"]) +
                    "); latency ratios are not reported from this measurement")
    result = {
        "targets": [str(t.run.root if t.run is not None else t.where) for t in resolved],
        "latency_ms": latency, "throughput_img_s": throughput,
        "speedup_vs_torch_p50": {} if load["contaminated"] else speedup,
        "device": device_info(torch_device, threads), "versions": versions(), "providers": providers,
        "load": load,
        "skipped": skipped, "compile_s": compile_s, "settings": {"batch_sizes": sizes, "warmup": warmup, "iters": iters, "threads": threads,
                                         "rounds": ROUNDS, "settle_s": SETTLE_S, "rewarm_calls": REWARM_CALLS, "rewarm_s": REWARM_S,
                                         "min_warmup_s": warmup_s, "ort_spinning": False},
    }
    files = {}
    for t in resolved:
        mine = {k: v for k, v in latency.items() if not prefix or k.startswith(t.label + "/")}
        doc = dict(result, latency_ms=mine, throughput_img_s={k: throughput[k] for k in mine})
        if t.run is not None:
            with t.run.writing(), commit_point():  # bench.json, its chart and the card change together
                path = t.run.write_json(BENCH_JSON, doc)
                chart = write_chart(doc, t.run.bench_png)
                if write_card and Run.is_run(t.run.root):
                    from .card import write_model_card

                    write_model_card(t.run)
        else:
            path = t.where.with_name(f"{t.where.name}.{BENCH_JSON}")
            with commit_point():
                atomic_write_json(path, doc)
                chart = write_chart(doc, t.where.with_name(f"{t.where.name}.{BENCH_PNG}"))
        files[t.label] = {"bench_json": str(path), "chart": str(chart) if chart else None}
    result["files"] = files
    print_table(result)
    return result


def interference(latency: dict, before: dict, after: dict, threads: int) -> dict:
    """Whether other processes disturbed the timings: the load seen around them, and the spread of each cell.

    Contaminated when another process kept at least half a core busy before or after (with fewer
    free cores than the threads used), or when any cell's p90 is more than 1.5x its p50 (a quiet
    machine keeps p90/p50 near 1). Ratios between runtimes are only reported from clean runs.
    """
    reasons = []
    for when, seen in (("before", before), ("after", after)):
        busy = seen.get("busy_cores")
        if busy is not None and busy >= 0.5 and seen["cores"] - busy < threads:
            reasons.append(f"{busy:.1f} of {seen['cores']} cores busy elsewhere {when} timing")
    spread = {f"{k}[{b}]": round(v["p90"] / v["p50"], 2) for k, per in latency.items() for b, v in per.items()
              if v["p50"] > 0}
    wide = {c: r for c, r in spread.items() if r > 1.5}
    if wide:
        reasons.append("p90/p50 > 1.5 in " + ", ".join(f"{c} ({r})" for c, r in list(wide.items())[:4]))
    return {"before": before, "after": after, "threads": threads, "p90_over_p50": spread,
            "contaminated": bool(reasons), "reasons": reasons}


# ----------------------------------------------------------------------------- reporting


def print_table(result: dict) -> None:
    """A rich table on stderr (stdout is reserved for --json)."""
    from rich.console import Console
    from rich.table import Table

    dev = result["device"]
    n = dev["threads"]
    where = dev.get("gpu") or f"{dev['cpu']} ({n} thread{'' if n == 1 else 's'})"
    table = Table(title=f"latency on {where}", title_justify="left")
    for col in ("format", "runtime", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "img/s", "x torch"):
        table.add_column(col, justify="left" if col in ("format", "runtime") else "right", no_wrap=True)
    for key, per in result["latency_ms"].items():
        for b, s in per.items():
            sp = result["speedup_vs_torch_p50"].get(key, {}).get(b)
            runtime = str(result["providers"].get(key, "")).replace("ExecutionProvider", " EP")
            table.add_row(key, runtime, b, f"{s['p50']:.3f}", f"{s['p90']:.3f}",
                          f"{s['p99']:.3f}", f"{s['mean']:.3f}", f"{result['throughput_img_s'][key][b]:.0f}",
                          f"{sp:.2f}" if sp else "")
    console = Console(stderr=True, width=max(120, Console(stderr=True).width))
    if result["latency_ms"]:
        console.print(table)
    for key, why in result["skipped"].items():
        console.print(f"skipped {key}: {why}", markup=False, highlight=False)


def write_chart(doc: dict, path: Path) -> Optional[Path]:
    """p50 latency (with p90 whiskers) and throughput per format and batch size, as a PNG."""
    if not doc["latency_ms"]:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmts = list(doc["latency_ms"])
    sizes = sorted({int(b) for per in doc["latency_ms"].values() for b in per})
    fig = Figure(figsize=(4 + 1.6 * len(sizes), 4.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    width = 0.8 / len(fmts)
    xs = np.arange(len(sizes))
    for i, f in enumerate(fmts):
        per = doc["latency_ms"][f]
        p50 = [per.get(str(b), {}).get("p50", np.nan) for b in sizes]
        p90 = [per.get(str(b), {}).get("p90", np.nan) for b in sizes]
        err = np.clip(np.array(p90) - np.array(p50), 0, None)
        ax1.bar(xs + i * width, p50, width, yerr=[np.zeros_like(err), err], capsize=3, label=f)
        ax2.bar(xs + i * width, [doc["throughput_img_s"][f].get(str(b), np.nan) for b in sizes], width, label=f)
    for ax, title in ((ax1, "latency p50 ms (whisker: p90)"), (ax2, "throughput img/s")):
        ax.set_xticks(xs + 0.4 - width / 2, [f"batch {b}" for b in sizes])
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
    ax1.legend(fontsize=8)
    dev = doc["device"]
    fig.suptitle(dev.get("gpu") or f"{dev['cpu']}, {dev['threads']} threads", fontsize=9)
    fig.tight_layout()
    tmp = temp_path(path, ".tmp.png")
    fig.savefig(tmp, dpi=110)
    commit(tmp, path)
    return path


if __name__ == "__main__":  # pragma: no cover - python -m distillctl.export.bench RUN...
    import json

    print(json.dumps(run_bench(sys.argv[1:] or []), indent=2))
