"""Run one recipe once per method under the same protocol and tabulate the results.

Every method gets the same recipe: seed, data (and so data order), student, teacher, training
budget and schedule. Only the ``method`` block changes: ``method.name`` is set to each method in
turn, and the recipe's method parameters (after ``--set`` overrides) are kept where the method
has a parameter of that name and dropped otherwise (recorded per row as ``dropped_params``).
Methods that need no teacher (``ce``) run without the teacher section. A teacher the recipe
asks to train (``teacher.train_if_missing``) is trained once and shared by every method.

Output folder: one run folder per method (``<out>/<method>/``), ``<out>/teacher/`` when a
teacher was trained, and ``compare.json``, ``compare.md`` and ``compare.png``.

A method whose student collapses (exit 6: ``train.collapse_verdict``) or fails keeps its row, marked
with the reason; the chart draws the chance level, so a chance-level bar cannot pass for a result.
The command exits 6 when any method collapsed or diverged, after writing the table.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from .errors import BadInput, Collapsed, Diverged, DistillError, Interrupted
from .recipe import Recipe, apply_overrides, read_raw, suggest, validate_raw
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text
from .report import commit_point
from .run import TEACHER_DIR, Run

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


def _step_ms(run: Run, batch_size: int) -> Optional[float]:
    """Median optimizer-step time from the run's logged throughput (the first interval, warm-up, skipped);
    ``batch_size`` is the images per step (data.batch_size x train.accumulate)."""
    rates = [r["img_s"] for r in run.metrics_rows() if r.get("img_s")]
    if len(rates) > 1:
        rates = rates[1:]
    if not rates:
        return None
    return 1000.0 * batch_size / statistics.median(rates)


def _row(name: str, recipe: Recipe, dropped: list[str], res: dict, run: Run) -> dict:
    m = res.get("metrics") or {}
    timings = res.get("timings") or {}
    return {
        "method": name,
        "status": "ok",
        "top1": m.get("student_top1"),
        "top5": m.get("student_top5"),
        "teacher_top1": m.get("teacher_top1"),
        "train_s": timings.get("train_s"),
        "step_ms": _step_ms(run, recipe.data.batch_size * recipe.train.accumulate),
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
            what = "COLLAPSED" if r["status"] == "collapsed" else ("DIVERGED" if r["status"] == "diverged"
                                                                     else "failed")
            cells = [r["method"], f"{what}: " + r.get("error", "")[:300]] + [""] * (len(head) - 2)
        else:
            cells = [r["method"], _fmt(r["top1"], "pct"), _fmt(r["top5"], "pct"), _fmt(r["train_s"], "s"),
                     _fmt(r["step_ms"], "ms"), _fmt(r["extra_train_params"], "params")]
            if base is not None:
                cells.insert(2, f"{100 * (r['top1'] - base):+.2f}" if r.get("top1") is not None else "-")
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def render_chart(rows: list[dict], title: str, num_classes: Optional[int] = None) -> bytes:
    """PNG bar chart of top-1 and top-5 per method (Agg canvas: no display, no global backend change)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in rows if r.get("top1") is not None or r["status"] in ("collapsed", "diverged")]
    names = [r["method"] if r["status"] == "ok" else f"{r['method']}\n{r['status'].upper()}" for r in ok]
    top1 = [100 * (r.get("top1") or 0) for r in ok]
    top5 = [100 * (r.get("top5") or 0) for r in ok]
    fig = Figure(figsize=(max(4.0, 1.1 * len(ok) + 2), 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(ok))
    w = 0.38
    colors = ["tab:blue" if r["status"] == "ok" else "tab:red" for r in ok]
    b1 = ax.bar([x - w / 2 for x in xs], top1, w, label="top-1", color=colors)
    ax.bar([x + w / 2 for x in xs], top5, w, label="top-5", alpha=0.6)
    for rect, v in zip(b1, top1):
        ax.annotate(f"{v:.1f}", (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center",
                    va="bottom", fontsize=7)
    teacher = next((r["teacher_top1"] for r in ok if r.get("teacher_top1") is not None), None)
    if teacher is not None:
        ax.axhline(100 * teacher, color="gray", linestyle="--", linewidth=1, label=f"teacher {100 * teacher:.1f}")
    if num_classes:
        ax.axhline(100 / num_classes, color="tab:red", linestyle=":", linewidth=1,
                   label=f"chance {100 / num_classes:.1f}")
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
    row and the others still run; after the table is written, a failed row is the command's exit code
    (6 when a student collapsed or diverged, else the first failed row's code).
    """
    from . import flows
    from .run import runs_dir, safe_name

    names = _check_methods(list(methods))
    raw = read_raw(recipe_path)
    recipes = method_recipes(raw, names, list(overrides or []))  # every recipe valid before any training
    first = next(iter(recipes.values()))[0]
    if out_dir:
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise BadInput(f"--out {out} exists and is not a folder")
        busy = [n for n in names if Run.is_run(out / n) or (out / n).exists()]
        if busy:
            raise BadInput(f"{out} already holds runs for {', '.join(busy)}; choose another --out")
    else:
        out = runs_dir() / f"compare-{safe_name(first.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    runs = {n: Run.new(recipes[n][0], out / n) for n in names}  # checks every folder before any work

    # one teacher for every method (trained here once if the recipe asks for that)
    with_teacher = [n for n in names if recipes[n][0].teacher is not None]
    teacher_res = None
    if with_teacher and flows.needs_teacher_training(recipes[with_teacher[0]][0]):
        teacher, teacher_res = flows.train_teacher(out / TEACHER_DIR, recipes[with_teacher[0]][0], device=device,
                                                   progress=progress, label="teacher")
        for n in with_teacher:
            r, dropped = recipes[n]
            recipes[n] = (flows.with_teacher_weights(r, teacher.student_weights), dropped)
            runs[n] = Run.new(recipes[n][0], out / n)

    rows, errors = [], []
    num_classes = None
    t_start = time.perf_counter()
    for i, n in enumerate(names):
        recipe, dropped = recipes[n]
        try:
            res = flows.execute("distill", runs[n], lambda r: flows.distill_run(
                r, device=device, progress=progress, label=f"{n} {i + 1}/{len(names)}"), device=device)
        except (Interrupted, KeyboardInterrupt):
            raise
        except DistillError as err:
            errors.append(err)
            status = "collapsed" if isinstance(err, Collapsed) else (
                "diverged" if isinstance(err, Diverged) else "error")
            row = {"method": n, "status": status, "error": err.message, "exit_code": err.exit_code,
                   "run_dir": str(out / n), "dropped_params": dropped}
            if isinstance(err.details, dict):
                hist = err.details.get("history") or []
                row["top1"] = hist[-1] if hist else None
                num_classes = num_classes or err.details.get("num_classes")
            rows.append(row)
            continue
        num_classes = num_classes or res.get("num_classes")
        rows.append(_row(n, recipe, dropped, res, runs[n]))
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
        "num_classes": num_classes,
        "rows": rows,
        "table": table,
        "total_s": time.perf_counter() - t_start,
        "artifacts": {"json": str(out / JSON_FILE), "table": str(out / TABLE_FILE), "chart": str(out / CHART_FILE)},
    }
    chart = render_chart(rows, title, num_classes)
    with commit_point():  # the table, the chart and compare.json describe the same rows, or none is rewritten
        atomic_write_text(out / TABLE_FILE, f"# {title}\n\n{table}\n")
        atomic_write_bytes(out / CHART_FILE, chart)
        atomic_write_json(out / JSON_FILE, doc)
    broken = [r for r in rows if r["status"] != "ok"]
    if broken:  # a comparison with a failed row is not a result to pass on: exit with the row's code
        text = ("compare: " + "; ".join(f"{r['method']} {r['status']} ({_brief(r['error'])})" for r in broken)
                + f". The table marks them; see {out / TABLE_FILE} (full messages in {out / JSON_FILE})")
        if any(r["status"] in ("collapsed", "diverged") for r in broken):
            raise Diverged(text, details=doc)
        err = DistillError(text, details=doc)
        err.exit_code = broken[0].get("exit_code") or 1
        raise err
    return doc


def _brief(message: str, limit: int = 200) -> str:
    """A row's error for the one-line summary: whole when short, else cut at a word boundary with '...'."""
    text = " ".join(str(message).split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
