"""Reporting machinery shared by the CLI commands: exit codes, ``--json``, clean stdout.

Under ``--json`` the process's stdout carries exactly one JSON document: while a command
runs, file descriptor 1 is pointed at stderr (so even native libraries that print cannot
pollute it), and the document is written to the real stdout at the end.
"""
from __future__ import annotations

import json
import math
import os
import sys
import traceback
from typing import Callable

from .errors import DistillError


def show_progress(json_out: bool) -> bool:
    return sys.stderr.isatty() and not json_out and not os.environ.get("CI")


def _clean(obj):
    """JSON-safe: NaN/Inf become null, paths and other objects become strings."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _human(doc: dict) -> str:
    lines = []
    metrics = doc.get("metrics") or {}
    for k, v in metrics.items():
        lines.append(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    for fmt, p in (doc.get("parity") or {}).items():
        if isinstance(p, dict):
            lines.append(f"parity {fmt}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in p.items()))
    for fmt, per_b in (doc.get("latency_ms") or {}).items():
        for b, st in per_b.items():
            thr = (doc.get("throughput_img_s") or {}).get(fmt, {}).get(b)
            thr_s = f", {thr:.0f} img/s" if isinstance(thr, (int, float)) else ""
            lines.append(f"latency {fmt} batch {b}: p50 {st['p50']:.3f} ms, p90 {st['p90']:.3f} ms, "
                         f"p99 {st['p99']:.3f} ms{thr_s}")
    for k, v in (doc.get("artifacts") or {}).items():
        lines.append(f"{k}: {v}")
    if doc.get("run_dir"):
        lines.append(f"run folder: {doc['run_dir']}")
    return "\n".join(lines)


def execute(command: str, json_out: bool, fn: Callable[[], dict], human: Callable[[dict], str] | None = None):
    """Run ``fn`` and report: one JSON document (``--json``) or a short summary; exit with the documented code."""
    import typer

    saved_fd = None
    if json_out:
        sys.stdout.flush()
        saved_fd = os.dup(1)
        os.dup2(2, 1)
    code, body, error = 0, {}, None
    try:
        body = fn() or {}
    except DistillError as err:
        code, error = err.exit_code, err.message
        if isinstance(err.details, dict):  # e.g. a failed gate's figures (parity, metrics, gates)
            body = err.details
    except KeyboardInterrupt:
        code, error = 130, "interrupted"
    except typer.Exit:
        raise
    except Exception as err:  # a bug: keep the traceback for the report
        traceback.print_exc(file=sys.stderr)
        code, error = 1, f"internal error ({type(err).__name__}: {err}); this is a bug in distillctl, please report it"
    finally:
        if saved_fd is not None:
            sys.stdout.flush()
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
    if error:
        print(f"error: {error}", file=sys.stderr)
    doc = {"command": command, "status": "ok" if code == 0 else "error", "exit_code": code}
    if error:
        doc["error"] = error
    doc.update({k: v for k, v in body.items() if k not in doc})
    if json_out:
        sys.stdout.write(json.dumps(_clean(doc)) + "\n")
        sys.stdout.flush()
    elif code == 0:
        text = (human or _human)(body)
        if text:
            print(text)
    raise typer.Exit(code)
