"""``distillctl run``: train the teacher if needed -> distil -> evaluate -> export -> bench.

The command a new user runs first and the one CI pipelines call; the ``--json`` document
is the union of the stages' documents.
"""
from __future__ import annotations

import time
from pathlib import Path

from .pipeline import distill_run, ensure_teacher
from .recipe import Recipe
from .train import log


def full_run(recipe: Recipe, run_dir: Path, *, device: str = "auto", progress: bool = False) -> dict:
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    recipe, teacher_res = ensure_teacher(recipe, run_dir, device=device, progress=progress)
    out = distill_run(recipe, run_dir, device=device, progress=progress)
    artifacts = dict(out["artifacts"])
    if teacher_res is not None:
        artifacts["teacher"] = teacher_res["artifacts"]["safetensors"]
        out["timings"]["teacher_train_s"] = teacher_res["timings"]["train_s"]
    formats = [f for f in recipe.export.formats]
    if formats:
        from .export.api import export_run

        exp = export_run(run_dir, formats, device=device)
        artifacts.update(exp.get("artifacts", {}))
        out["parity"] = exp.get("parity", {})
        out["metrics"].update({k: v for k, v in exp.get("metrics", {}).items() if k not in out["metrics"]})
    if recipe.bench.backends:
        from .export.bench import run_bench

        bench = run_bench([str(run_dir)], device=device)
        out.update({k: v for k, v in bench.items() if k in ("latency_ms", "throughput_img_s", "device",
                                                          "versions", "providers")})
    try:
        from .export.card import write_model_card

        artifacts["model_card"] = str(write_model_card(run_dir))
    except ImportError:
        pass
    out["artifacts"] = artifacts
    out["timings"]["total_s"] = time.perf_counter() - t0
    log(f"run finished in {out['timings']['total_s']:.1f}s: {run_dir}")
    return out
