"""Progress a person can read anywhere: one bar per stage in a terminal, plain lines everywhere else.

In a terminal (stderr is a TTY, not ``--json``, not ``CI``): one bar for the whole stage, labelled
with the stage (``teacher 1/2``, ``distill 2/2``), with the overall ETA; epoch summaries print above
it. Anywhere else (``| tee``, ``nohup``, cluster jobs, CI): a plain line on every logged step and at
least every ``every_s`` seconds, so an hour-long epoch is never an hour of silence.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

log = logging.getLogger("distillctl")


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """``start(total, done)`` -> ``update(done, ...)`` per step -> ``note(msg)`` per epoch -> ``stop()``.

    ``label=None`` prints nothing but the notes (library use, tests).
    """

    def __init__(self, label: Optional[str], *, bar: bool = False, every_s: float = 30.0):
        self.label = label
        self.use_bar = bar and label is not None
        self.every_s = every_s
        self.total = 0
        self._bar = None
        self._task = None
        self._t0 = self._last = time.monotonic()
        self._done0 = 0

    def start(self, total: int, done: int = 0) -> None:
        self.total, self._done0 = total, done
        self._t0 = self._last = time.monotonic()
        if self.use_bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True),
                            transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=total, completed=done, info="")

    def eta(self, done: int) -> Optional[float]:
        rate = (done - self._done0) / max(time.monotonic() - self._t0, 1e-9)
        return (self.total - done) / rate if rate > 0 else None

    def update(self, done: int, *, epoch: Optional[int] = None, epochs: Optional[int] = None,
               row: Optional[dict] = None) -> None:
        if self.label is None:
            return
        info = ""
        if row is not None:
            info = f"epoch {epoch}/{epochs} loss {row['loss']:.4f}"
        if self._bar is not None:
            kw = {"info": info} if info else {}
            self._bar.update(self._task, completed=done, **kw)
            return
        now = time.monotonic()
        if row is None and now - self._last < self.every_s:
            return
        self._last = now
        eta = self.eta(done)
        parts = [self.label, f"step {done}/{self.total}"]
        if row is not None:
            parts += [f"epoch {epoch}/{epochs}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.3g}",
                      f"{row['img_s']:.0f} img/s"]
        parts.append(f"ETA {_hms(eta)}" if eta is not None else "ETA ?")
        log.info(" | ".join(parts))

    def note(self, msg: str) -> None:
        text = f"{self.label}: {msg}" if self.label else msg
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            log.info(text)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
