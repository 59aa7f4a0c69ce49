"""Run one recipe once per method under the same protocol and tabulate the results.

Every method gets the same recipe: seed, data (and so data order), student, teacher, training
budget and schedule. Only the ``method`` block changes: ``method.name`` is set to each method in
turn, and the recipe's method parameters (after ``--set`` overrides) are kept where the method
has a parameter of that name and dropped otherwise (recorded per row as ``dropped_params``).
Methods that need no teacher (``ce``) run without the teacher section. A teacher the recipe
asks to train (``teacher.train_if_missing``) is trained once and shared by every method.

Output folder: one run folder per method (``<out>/<method>/``), ``<out>/teacher/`` when a
teacher was trained, and ``compare.json``, ``compare.md`` and ``compare.png``.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from .errors import BadInput, DistillError, Interrupted
from .recipe import Recipe, apply_overrides, read_raw, suggest, validate_raw
from .runs import (CHECKPOINT_FILE, METRICS_FILE, atomic_write_bytes, atomic_write_json, atomic_write_text,
                   new_run_dir, read_jsonl)

JSON_FILE, TABLE_FILE, CHART_FILE = "compare.json", "compare.md", "compare.png"


# ----------------------------------------------------------------------------- recipes



def _check_methods(methods: list[str]) -> list[str]:
    from .methods import registry

    names = [m.strip() for m in methods if m and m.strip()]
    if not names:
        raise BadInput(f"no methods to compare; pass --methods with some of: {', '.join(registry.names())}")
    seen = set()
    for m in names:
        if m not in registry.names():
            raise BadInput(f"unknown method '{m}'{suggest(m, registry.names())}; "
                           f"available: {', '.join(registry.names())}")
        if m in seen:
            raise BadInput(f"method '{m}' is listed twice in --methods")
        seen.add(m)
    return names


def method_recipes(raw: dict, methods: list[str], overrides: list[str]) -> dict[str, tuple[Recipe, list[str]]]:
    """One validated recipe per method (and the method parameters dropped for it), before any work starts."""
    from .methods import registry

    base = apply_overrides(copy.deepcopy(raw), overrides)
    section = base.get("method") or {}
    if not isinstance(section, dict):
        raise BadInput("the recipe's `method` must be a mapping with `name` and the method's parameters")
    params = {k: v for k, v in section.items() if k != "name"}
    out = {}
    for name in methods:
        cls = registry.get(name)
        fields = cls.Config.model_fields
        kept = {k: v for k, v in params.items() if k in fields}
        dropped = sorted(k for k in params if k not in fields)
        r = copy.deepcopy(base)
        r["method"] = {"name": name, **kept}
        if not cls.needs_teacher:
            r.pop("teacher", None)  # the baseline runs alone: no teacher weights needed, none evaluated
        try:
            recipe = validate_raw(r)
        except BadInput as err:
            raise BadInput(f"{name}: {err.message}") from None
        out[name] = (recipe, dropped)
    return out


# ----------------------------------------------------------------------------- measurements


def _step_ms(run_dir: Path, batch_size: int) -> Optional[float]:
    """Median training step time from the run's logged throughput (the first interval, warm-up, skipped)."""
    rates = [r["img_s"] for r in read_jsonl(Path(run_dir) / METRICS_FILE) if r.get("img_s")]
    if len(rates) > 1:
        rates = rates[1:]
    if not rates:
        return None
    return 1000.0 * batch_size / statistics.median(rates)


def _row(name: str, recipe: Recipe, dropped: list[str], res: dict) -> dict:
    m = res.get("metrics") or {}
    timings = res.get("timings") or {}
    return {
        "method": name,
        "status": "ok",
        "top1": m.get("student_top1"),
        "top5": m.get("student_top5"),
        "teacher_top1": m.get("teacher_top1"),
        "train_s": timings.get("train_s"),
        "step_ms": _step_ms(Path(res["run_dir"]), recipe.data.batch_size),
        "extra_train_params": res.get("extra_train_params"),
        "run_dir": res.get("run_dir"),
        "recipe_hash": recipe.hash(),
        "method_params": recipe.method.params(),
        "dropped_params": dropped,
    }


# ----------------------------------------------------------------------------- reporting


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.2f}"
    if kind == "s":
        return f"{v:.1f}"
    if kind == "ms":
        return f"{v:.1f}"
    if kind == "params":
        return f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v:,}"
    return str(v)


def render_table(rows: list[dict]) -> str:
    """Markdown table (readable as plain text): one row per method, delta top-1 against ``ce`` when present."""
    base = next((r["top1"] for r in rows if r["method"] == "ce" and r.get("top1") is not None), None)
    head = ["method", "top-1 %", "top-5 %", "train s", "step ms", "extra train params"]
    if base is not None:
        head.insert(2, "vs ce")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r["status"] != "ok":
            cells = [r["method"], "failed: " + r.get("error", "")] + [""] * (len(head) - 2)
        else:
            cells = [r["method"], _fmt(r["top1"], "pct"), _fmt(r["top5"], "pct"), _fmt(r["train_s"], "s"),
                     _fmt(r["step_ms"], "ms"), _fmt(r["extra_train_params"], "params")]
            if base is not None:
                cells.insert(2, f"{100 * (r['top1'] - base):+.2f}" if r.get("top1") is not None else "-")
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def render_chart(rows: list[dict], title: str) -> bytes:
    """PNG bar chart of top-1 and top-5 per method (Agg canvas: no display, no global backend change)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in rows if r["status"] == "ok" and r.get("top1") is not None]
    names = [r["method"] for r in ok]
    top1 = [100 * r["top1"] for r in ok]
    top5 = [100 * (r["top5"] or 0) for r in ok]
    fig = Figure(figsize=(max(4.0, 1.1 * len(ok) + 2), 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(ok))
    w = 0.38
    b1 = ax.bar([x - w / 2 for x in xs], top1, w, label="top-1")
    ax.bar([x + w / 2 for x in xs], top5, w, label="top-5", alpha=0.6)
    for rect, v in zip(b1, top1):
        ax.annotate(f"{v:.1f}", (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center",
                    va="bottom", fontsize=7)
    teacher = next((r["teacher_top1"] for r in ok if r.get("teacher_top1") is not None), None)
    if teacher is not None:
        ax.axhline(100 * teacher, color="gray", linestyle="--", linewidth=1, label=f"teacher {100 * teacher:.1f}")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ----------------------------------------------------------------------------- entry point


def compare(recipe_path: str, methods: list[str], overrides: list[str], out_dir: Optional[Path] = None,
            device: str = "auto", *, progress: bool = False) -> dict:
    """Run ``recipe_path`` once per method (same seed, data order and budget); write and return the table.

    ``overrides`` are ``KEY=VALUE`` recipe overrides applied to every run (method parameters are
    kept for the methods that have them). Returns a dict with ``rows`` (one per method: ``top1``,
    ``top5``, ``train_s``, ``step_ms``, ``extra_train_params``, ...), ``table`` (markdown), the
    ``run_dir`` and the ``artifacts`` (json, table, chart). A method that fails is reported in its
    row and the others still run; if every method fails the first error is raised.
    """
    from .pipeline import distill_run, ensure_teacher

    names = _check_methods(list(methods))
    raw = read_raw(recipe_path)
    recipes = method_recipes(raw, names, list(overrides or []))  # every recipe valid before any training
    first = next(iter(recipes.values()))[0]
    out = new_run_dir(f"compare-{first.name}", str(out_dir) if out_dir else None)
    busy = [n for n in names if (out / n / CHECKPOINT_FILE).is_file()]
    if busy:
        raise BadInput(f"{out} already holds runs for {', '.join(busy)}; choose another --out")

    # one teacher for every method (trained here once if the recipe asks for that)
    with_teacher = [n for n in names if recipes[n][0].teacher is not None]
    teacher_res = None
    if with_teacher:
        shared, teacher_res = ensure_teacher(recipes[with_teacher[0]][0], out, device=device, progress=progress)
        for n in with_teacher:
            r, dropped = recipes[n]
            recipes[n] = (r.model_copy(update={"teacher": shared.teacher}), dropped)

    rows, errors = [], []
    t_start = time.perf_counter()
    for n in names:
        recipe, dropped = recipes[n]
        try:
            res = distill_run(recipe, out / n, device=device, progress=progress)
        except (Interrupted, KeyboardInterrupt):
            raise
        except DistillError as err:
            errors.append(err)
            rows.append({"method": n, "status": "error", "error": err.message, "exit_code": err.exit_code,
                         "run_dir": str(out / n), "dropped_params": dropped})
            continue
        rows.append(_row(n, recipe, dropped, res))
    if errors and len(errors) == len(names):
        raise errors[0]

    table = render_table(rows)
    ref = recipes[with_teacher[0]][0] if with_teacher else first  # the teacher as the distilling runs saw it
    title = f"{ref.name}: {ref.teacher.model if ref.teacher else '-'} -> {ref.student.model}, " \
            f"epochs {ref.train.epochs}, seed {ref.seed}"
    doc = {
        "recipe": str(recipe_path),
        "run_dir": str(out),
        "methods": names,
        "overrides": list(overrides or []),
        "protocol": {"seed": ref.seed, "dataset": ref.data.dataset, "student": ref.student.model,
                     "teacher": ref.teacher.model if ref.teacher else None, "epochs": ref.train.epochs,
                     "batch_size": ref.data.batch_size, "device": device},
        "teacher_run": teacher_res.get("run_dir") if teacher_res else None,
        "rows": rows,
        "table": table,
        "total_s": time.perf_counter() - t_start,
        "artifacts": {"json": str(out / JSON_FILE), "table": str(out / TABLE_FILE), "chart": str(out / CHART_FILE)},
    }
    atomic_write_text(out / TABLE_FILE, f"# {title}\n\n{table}\n")
    atomic_write_bytes(out / CHART_FILE, render_chart(rows, title))
    atomic_write_json(out / JSON_FILE, doc)
    return doc
