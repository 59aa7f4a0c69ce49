"""MODEL_CARD.md for a run: what was distilled into what, how well, how faithful the exports are, how fast.

Everything comes from files already in the run folder (recipe.yaml, manifest.json,
metrics.jsonl, student/config.json, export.json, bench.json); sections whose file is missing
say which command produces it. Training curves are drawn from metrics.jsonl into
training_curves.png next to the card.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ..recipe import load_recipe
from ..runs import (METRICS_FILE, RECIPE_FILE, STUDENT_DIR, Manifest, atomic_write_text, read_jsonl, resolve_run,
                    temp_path_for)
from .api import EXPORT_JSON
from .bench import BENCH_JSON, BENCH_PNG

CARD_FILE = "MODEL_CARD.md"
CURVES_PNG = "training_curves.png"


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def _pct(v) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "–"


def write_curves(rows: list[dict], path: Path) -> Optional[Path]:
    """Loss terms per step and validation top-1/top-5 per epoch, as a PNG."""
    steps = [r for r in rows if "step" in r and any(k.startswith("loss") for k in r)]
    evals = [r for r in rows if "top1" in r]
    if not steps and not evals:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    terms = sorted({k for r in steps for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    for k in terms:
        pts = [(r.get("global_step", r["step"]), r[k]) for r in steps if k in r]
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=k, linewidth=2 if k == "loss" else 1)
    ax1.set_xlabel("step")
    ax1.set_title("training losses", fontsize=10)
    if terms:
        ax1.legend(fontsize=8)
    for k in ("top1", "top5"):
        pts = [(r.get("epoch", i + 1), r[k]) for i, r in enumerate(evals) if k in r]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"val {k}")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.set_title("validation accuracy", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    tmp = temp_path_for(path).with_suffix(".png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def _floats(values) -> list:
    return [round(float(v), 4) for v in values or []]


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_model_card(run_dir) -> Path:
    """Write ``RUN/MODEL_CARD.md`` (and ``training_curves.png``) from the run's files; returns the card path."""
    from ..methods import registry
    from .student import read_config

    run = resolve_run(str(run_dir) if run_dir else None)
    recipe = load_recipe(run / RECIPE_FILE)
    manifest = Manifest(run).data
    cfg = read_config(run / STUDENT_DIR) if (run / STUDENT_DIR / "config.json").is_file() else {}
    export = _read(run / EXPORT_JSON)
    bench = _read(run / BENCH_JSON)
    rows = read_jsonl(run / METRICS_FILE)
    curves = write_curves(rows, run / CURVES_PNG)

    dc = cfg.get("distillctl", {})
    pc = cfg.get("pretrained_cfg", {})
    teacher = recipe.teacher.model if recipe.teacher else None
    method = recipe.method.name
    paper = getattr(registry.get(method), "paper", "") if method in registry.names() else ""
    mm = manifest.get("metrics") or {}
    em = (export or {}).get("metrics", {})
    out = [f"# {recipe.student.model}" + (f" distilled from {teacher}" if teacher else "") + f" ({recipe.name})", ""]
    out.append(_table(["", ""], [
        ["Student", f"`{recipe.student.model}` (timm), {cfg.get('num_classes', '?')} classes, input "
                    f"{'x'.join(map(str, pc.get('input_size', [])))}"],
        ["Teacher", f"`{teacher}`" if teacher else "none (supervised)"],
        ["Method", f"`{method}`" + (f": {paper}" if paper else "")],
        ["Recipe", f"`{recipe.name}`, hash `{recipe.hash()}`" + (
            f" (student saved by `{dc['recipe_hash']}`)" if dc.get("recipe_hash") not in (None, recipe.hash()) else "")],
        ["Data", f"`{recipe.data.dataset}` at {recipe.data.image_size}px"
                 + (f", {recipe.data.train_per_class} labelled images per class" if recipe.data.train_per_class else "")],
        ["Preprocessing", f"RGB in [0, 1], resize to {pc.get('input_size', ['?'])[-1]}px, (x - mean) / std with "
                          f"mean {_floats(pc.get('mean'))} std {_floats(pc.get('std'))}"],
        ["Training", f"{recipe.train.epochs} epochs, {recipe.train.optimizer} lr {recipe.train.lr}, "
                     f"{manifest.get('device', '?')}, {manifest.get('started', '?')} → {manifest.get('ended', '?')} "
                     f"({manifest.get('status', '?')})"],
    ]))

    out += ["", "## Accuracy (validation split)", ""]
    acc = []
    if mm.get("teacher_top1") is not None:
        acc.append(["teacher (PyTorch)", _pct(mm.get("teacher_top1")), _pct(mm.get("teacher_top5"))])
    acc.append(["student (PyTorch)", _pct(em.get("student_top1", mm.get("student_top1"))),
                _pct(em.get("student_top5", mm.get("student_top5")))])
    for name in (export or {}).get("parity", {}):
        acc.append([f"student, {name}", _pct(em.get(f"{name}_top1")), _pct(em.get(f"{name}_top5"))])
    out.append(_table(["model", "top-1", "top-5"], acc))

    out += ["", "## Exported artifacts and parity with the PyTorch student", ""]
    if export:
        details = export.get("details", {})
        par_rows = []
        for name, path in export["artifacts"].items():
            p = export["parity"].get(name)
            prec = "fp16" if name.endswith("fp16") or (name == "trt" and export.get("precision") == "fp16") else "fp32"
            if p:
                par_rows.append([name, f"`{Path(path).relative_to(run) if Path(path).is_relative_to(run) else path}`",
                                 prec, f"{p['max_abs_diff']:.3g}", f"{p['mean_abs_diff']:.3g}",
                                 _pct(p["top1_agreement"]), f"{p.get('tolerance', float('nan')):.3g}",
                                 export.get("providers", {}).get(name, "")])
        out.append(_table(["artifact", "file", "precision", "max abs diff", "mean abs diff", "top-1 agreement",
                           "tolerance", "runtime"], par_rows))
        n = next(iter(export["parity"].values()), {}).get("n")
        out.append(f"\nLogits compared on {n} validation images. ONNX: "
                   f"{details.get('onnx', {}).get('exporter', '?')} exporter, opset {details.get('onnx', {}).get('opset', '?')}, "
                   f"dynamic batch; metadata (recipe hash, input size, mean/std, classes) in `metadata_props`.")
        if "trt" in details:
            t = details["trt"]
            out.append(f"TensorRT {t.get('tensorrt')} engine on {t.get('gpu')} (CUDA {t.get('cuda')}), {t.get('precision')}, "
                       f"batch profile {t.get('dynamic_batch')}.")
        failed = [g for g in export.get("gates", []) if not g["passed"]]
        if failed:
            out.append("\n**Failed gates:** " + "; ".join(f"{g['artifact']} {g['gate']} {g['value']:.4g} "
                                                          f"(limit {g['op']} {g['limit']:.4g})" for g in failed))
    else:
        out.append("Not exported yet: `distillctl export RUN --format onnx`.")

    out += ["", "## Latency", ""]
    if bench and bench.get("latency_ms"):
        dev = bench["device"]
        hw = dev.get("gpu") or f"{dev.get('cpu')} ({dev.get('threads')} threads)"
        v = bench.get("versions", {})
        out.append(f"Hardware: {hw}. torch {v.get('torch')}, onnxruntime {v.get('onnxruntime', '–')}"
                   + (f", TensorRT {v['tensorrt']}" if v.get("tensorrt") else "") + ". "
                   f"{bench['settings']['iters']} timed calls per cell after warm-up, backends interleaved.\n")
        lat_rows = []
        for fmt, per in bench["latency_ms"].items():
            for b, s in per.items():
                lat_rows.append([fmt, bench.get("providers", {}).get(fmt, ""), b, f"{s['p50']:.3f}", f"{s['p90']:.3f}",
                                 f"{s['p99']:.3f}", f"{bench['throughput_img_s'][fmt][b]:.0f}"])
        out.append(_table(["format", "runtime", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s"], lat_rows))
        if (run / BENCH_PNG).is_file():
            out.append(f"\n![latency]({BENCH_PNG})")
        for k, why in bench.get("skipped", {}).items():
            out.append(f"\n- skipped {k}: {why}")
    else:
        out.append("Not measured yet: `distillctl bench RUN`.")

    out += ["", "## Training curves", ""]
    out.append(f"![training curves]({CURVES_PNG})" if curves else "No metrics.jsonl rows in this run.")

    size = pc.get("input_size", [3, 224, 224])[-1]
    out += ["", "## Use", "", "```python",
            "import timm  # the student folder is a timm local model (weights + config.json)",
            f'model = timm.create_model("local-dir:{(run / STUDENT_DIR).resolve()}", pretrained=True).eval()',
            "", "import numpy as np, onnxruntime as ort",
            f'sess = ort.InferenceSession("{(run / "export" / "model.onnx").resolve()}", providers=["CPUExecutionProvider"])',
            f"x = np.random.rand(1, 3, {size}, {size}).astype(np.float32)  # RGB in [0, 1]",
            f"mean, std = np.array({_floats(pc.get('mean'))}, np.float32), np.array({_floats(pc.get('std'))}, np.float32)",
            "logits = sess.run(None, {\"input\": (x - mean[:, None, None]) / std[:, None, None]})[0]",
            "```", "",
            "## Limitations", "",
            f"Accuracy is measured on the `{recipe.data.dataset}` validation split only; the model was not evaluated "
            "for other data, resolutions or domains. Latency figures hold for the hardware and versions named above.",
            ""]
    card = run / CARD_FILE
    atomic_write_text(card, "\n".join(out))
    return card
