"""How a command ends: the exit code, the ``--json`` document, a summary a person reads, clean-up.

Every command runs through ``execute``. While it runs:
- under ``--json`` stdout carries exactly one JSON document: file descriptor 1 (and ``sys.stdout``)
  point at stderr, so even native libraries that print cannot pollute it; the document is written
  to the real stdout at the end;
- log records of the ``distillctl`` logger go to stderr;
- SIGTERM behaves like Ctrl-C (exit 130 with the document); the training loop installs its own
  handler to checkpoint first;
- whatever way it ends, the temporary files it created are removed (``run.cleanup_temps``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from typing import Callable

from .errors import DistillError

log = logging.getLogger("distillctl")


def show_progress(json_out: bool) -> bool:
    return sys.stderr.isatty() and not json_out and not os.environ.get("CI")


class _StderrHandler(logging.StreamHandler):
    """Always the current sys.stderr (tests and redirections replace it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _pct(v) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "?"


def summary_text(doc: dict) -> str:
    """The end of a train/distill/run/export: headline, parity verdicts, latency, where things are, what next."""
    lines = []
    m = doc.get("metrics") or {}
    if "student_top1" in m:
        head = f"student top-1 {_pct(m['student_top1'])}"
        if m.get("teacher_top1") is not None:
            head = f"teacher top-1 {_pct(m['teacher_top1'])} -> " + head
        if m.get("student_top5") is not None:
            head += f" (top-5 {_pct(m['student_top5'])})"
        lines.append(head)
    gates = doc.get("gates") or []
    for fmt, p in (doc.get("parity") or {}).items():
        if not isinstance(p, dict):
            continue
        mine = [g for g in gates if g.get("artifact") == fmt]
        verdict = "ok" if all(g.get("passed") for g in mine) else "FAILED"
        lines.append(f"  {fmt:<12} parity {verdict}: max |diff| {p.get('max_abs_diff', float('nan')):.2g} "
                     f"(limit {p.get('tolerance', float('nan')):.2g}), top-1 agreement {_pct(p.get('top1_agreement'))}"
                     + (f", top-1 {_pct(m.get(f'{fmt}_top1'))}" if m.get(f"{fmt}_top1") is not None else ""))
    lat = doc.get("latency_ms") or {}
    cells = [(fmt, b, st) for fmt, per in lat.items() for b, st in per.items() if str(b) == "1"]
    if cells:
        best = min(cells, key=lambda c: c[2]["p50"])
        torch1 = (lat.get("torch") or {}).get("1")
        load = doc.get("load") or {}
        ratio = ""
        if torch1 and best[0] != "torch" and not load.get("contaminated"):
            ratio = f", {torch1['p50'] / best[2]['p50']:.1f}x PyTorch eager"
        lines.append(f"  latency: {best[0]} batch 1 p50 {best[2]['p50']:.2f} ms{ratio}")
        if load.get("contaminated"):
            why = "; ".join(load.get("reasons") or []) or "the machine was busy while timing"
            lines.append(f"  (latency ratios are not reported: {why})")
    arts = doc.get("artifacts") or {}
    shown = [k for k in ("safetensors", "onnx", "onnx_fp16", "onnx_int8", "trt") if k in arts]
    for k in shown:
        lines.append(f"  {k:<12} {arts[k]}")
    if arts.get("model_card"):
        lines.append(f"  model card   {arts['model_card']}")
    run_dir = doc.get("run_dir")
    if run_dir:
        lines.append(f"run folder: {run_dir}")
        lines.append(f"next: distillctl eval {run_dir} | distillctl export {run_dir} --format trt | "
                     f"distillctl bench {run_dir}")
    return "\n".join(lines)


def _human(doc: dict) -> str:
    if any(k in doc for k in ("metrics", "parity", "artifacts")):
        text = summary_text(doc)
        if text:
            return text
    lines = []
    for fmt, per_b in (doc.get("latency_ms") or {}).items():
        for b, st in per_b.items():
            lines.append(f"latency {fmt} batch {b}: p50 {st['p50']:.3f} ms, p90 {st['p90']:.3f} ms")
    return "\n".join(lines)


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool):
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)


_PENDING: list[int] = []  # signals turned into KeyboardInterrupt and not yet caught by execute()


def _sigterm_as_interrupt(signum, frame):
    _PENDING.append(signum)
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt when a signal reached this command's handler but its KeyboardInterrupt never
    came back up (swallowed by library code: a finaliser, a callback, a broad ``except``). Called where a
    stage or a command would otherwise report success, so an interrupted command never ends 0."""
    if _PENDING:
        raise KeyboardInterrupt


@contextlib.contextmanager
def commit_point():
    """Where a command makes its results final (renames, reports): all of it happens, or none of it.

    A signal that arrived before (its KeyboardInterrupt possibly swallowed by library code, which then
    carried on) stops the command here, so nothing of an interrupted command takes a final name. A
    SIGINT/SIGTERM arriving inside the block is held until the block is done and then delivered to the
    handler that was in place, so the files it writes change together. Outside the main thread (embedded
    use) signals cannot be held; the check still runs.
    """
    raise_if_interrupted()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum, frame):
        held.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not None}  # a handler installed outside Python is left alone
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])  # the handler in place decides: KeyboardInterrupt, or the default


def _redeliver_swallowed(previous):
    """An unraisable hook: Python drops an exception raised inside a finaliser or an import-lock callback
    ("Exception ignored in ..."), and a signal's KeyboardInterrupt raised there would be lost, letting
    an interrupted command run on to exit 0. Such a loss sends the same signal again, from a timer
    thread, so the handler runs once more at the main thread's next ordinary step."""
    def hook(info):
        if isinstance(info.exc_value, KeyboardInterrupt) and _PENDING:
            threading.Timer(0.01, os.kill, (os.getpid(), _PENDING[-1])).start()
            return
        previous(info)
    return hook


def execute(command: str, json_out: bool, fn: Callable[[], dict], human: Callable[[dict], str] | None = None):
    """Run ``fn`` and report: one JSON document (``--json``) or a short summary; exit with the documented code."""
    import typer

    from .files import cleanup_temps

    setup_logging()
    code, body, error = 0, {}, None
    old_term = old_int = None
    _PENDING.clear()
    try:
        old_term = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            old_int = signal.signal(signal.SIGINT, _sigterm_as_interrupt)
    except ValueError:  # not the main thread (embedded use)
        pass
    old_hook, sys.unraisablehook = sys.unraisablehook, _redeliver_swallowed(sys.unraisablehook)
    try:
        with _stdout_to_stderr(json_out):
            try:
                body = fn() or {}
                raise_if_interrupted()
            except DistillError as err:
                code, error = err.exit_code, err.message
                if isinstance(err.details, dict):  # e.g. a failed gate's figures (parity, metrics, gates)
                    body = err.details
            except KeyboardInterrupt:
                _PENDING.clear()
                code, error = 130, "interrupted (Ctrl-C or SIGTERM); temporary files were removed"
            except typer.Exit:
                raise
            except RecursionError:
                code, error = 2, "the input is nested too deeply to process; simplify it"
            except MemoryError:
                code, error = 2, "the request needs more memory than this machine has; reduce its sizes"
            except Exception as err:
                from .files import disk_error_in, storage_error

                disk = disk_error_in(err)
                if disk is not None:  # the file system refused us, wherever it surfaced: exit 2, not a bug
                    code, error = 2, storage_error(disk.filename or "a file", disk,
                                                   lead="the file system refused").message
                else:  # a bug: keep the traceback for the report
                    traceback.print_exc(file=sys.stderr)
                    code, error = 1, (f"internal error ({type(err).__name__}: {str(err)[:500]}); this is a bug in "
                                      "distillctl, please report it with the traceback above")
            finally:
                cleanup_temps()
    finally:
        sys.unraisablehook = old_hook
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)
    if error:
        from .recipe import clip

        error = clip(error, 2000)  # one line, bounded, whatever the message carried
        print(f"error: {error}", file=sys.stderr)
    doc = {"command": command, "status": "ok" if code == 0 else "error", "exit_code": code}
    if error:
        doc["error"] = error
    doc.update({k: v for k, v in body.items() if k not in doc})
    if json_out:
        from .files import json_safe

        sys.stdout.write(json.dumps(json_safe(doc)) + "\n")
        sys.stdout.flush()
    elif code == 0:
        text = (human or _human)(body)
        if text:
            print(text)
    raise typer.Exit(code)
