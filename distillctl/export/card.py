"""MODEL_CARD.md for a run: what was distilled into what, how well, how faithful the exports are, how fast.

Everything comes from the run folder (its recipe, manifest, metrics, student config, export and
bench reports), read through ``distillctl.run.Run``; sections whose report is missing say which
command produces it. Training curves are drawn into the run's curves PNG next to the card. Every
path in the card is relative to the run folder, so the folder can be moved or shipped as it is.
``export`` and ``bench`` rewrite the card whenever they change what it reports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..files import atomic_write_text, commit, temp_path
from ..run import BENCH_JSON, EXPORT_JSON, Run


def _threads(n) -> str:
    return "1 thread" if n == 1 else f"{n} threads"


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
    tmp = temp_path(path, ".tmp.png")
    fig.savefig(tmp, dpi=100)
    commit(tmp, path)
    return path


def _floats(values) -> list:
    return [round(float(v), 4) for v in values or []]


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_model_card(run: Run) -> Path:
    """Write the run's MODEL_CARD.md (and training curves) from what the folder holds; returns the card path."""
    from ..methods import registry

    recipe = run.recipe
    manifest = run.manifest
    cfg = run.student_config() if run.student_weights.is_file() else {}
    export = run.read_report(EXPORT_JSON)
    bench = run.read_report(BENCH_JSON)
    rows = run.metrics_rows()
    curves = write_curves(rows, run.curves_png)

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
            prec = next((q for q in ("fp16", "int8") if name.endswith(q)), "fp32")
            if p:
                par_rows.append([name, f"`{path}`",  # export.json names files relative to the run folder
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
        hw = dev.get("gpu") or f"{dev.get('cpu')} ({_threads(dev.get('threads'))})"
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
        load = bench.get("load") or {}
        if load.get("contaminated"):
            out.append("\n**Measured on a busy machine** (" + "; ".join(load.get("reasons", [])) + "): these figures "
                       "show that machine at that moment; no speed-up between runtimes is claimed from them. "
                       "Re-run `distillctl bench` on a quiet machine.")
        elif bench.get("speedup_vs_torch_p50"):
            best = max(((k, b, r) for k, per in bench["speedup_vs_torch_p50"].items() for b, r in per.items()),
                       key=lambda c: c[2])
            out.append(f"\nFastest against PyTorch eager: {best[0]} at batch {best[1]}, {best[2]:.1f}x "
                       f"(quiet machine, {_threads(load.get('threads', '?'))}, p90/p50 <= 1.5 in every cell).")
        if run.bench_png.is_file():
            out.append(f"\n![latency]({run.relative(run.bench_png)})")
        for k, why in bench.get("skipped", {}).items():
            out.append(f"\n- skipped {k}: {why}")
    else:
        out.append("Not measured yet: `distillctl bench RUN`.")

    out += ["", "## Training curves", ""]
    out.append(f"![training curves]({run.relative(curves)})" if curves else "No training metrics in this run.")

    student_rel = run.relative(run.student_dir)
    onnx_rel = run.relative(run.onnx_file("fp32"))
    out += ["", "## Use", "",
            "From this folder (the paths are relative to it), in an environment with `pip install distillctl`:", "",
            "```python",
            "import distillctl  # loads the student with timm (and makes timm importable beside a CPU-only torch)",
            "import numpy as np, onnxruntime as ort, torch",
            "from PIL import Image",
            "",
            f'model, config = distillctl.load_student("{student_rel}")  # the bare timm student, eval mode',
            "transform = distillctl.eval_transform(config)  # the exact evaluation preprocessing (timm's transform)",
            "labels = config.get(\"label_names\") or [str(i) for i in range(config[\"num_classes\"])]",
            "",
            "x = transform(Image.open(\"image.png\").convert(\"RGB\")).unsqueeze(0)  # [1, 3, H, W], normalised",
            "with torch.no_grad():",
            "    print(\"pytorch:\", labels[int(model(x).argmax())])",
            f'sess = ort.InferenceSession("{onnx_rel}", providers=["CPUExecutionProvider"])',
            "print(\"onnx:\", labels[int(sess.run(None, {\"input\": x.numpy()})[0].argmax())])",
            "```", "",
            "## Limitations", "",
            f"Accuracy is measured on the `{recipe.data.dataset}` validation split only; the model was not evaluated "
            "for other data, resolutions or domains. Latency figures hold for the hardware and versions named above.",
            ""]
    card = run.card_file
    atomic_write_text(card, "\n".join(out))
    return card
