"""Run folders: atomic writes, the manifest, ``runs/latest``, and target resolution.

Every file under a run folder is written to a temporary name and renamed into place, so a
kill never leaves a half-written file under a final name.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from .errors import BadInput

RUNS_DIR = Path(os.environ.get("DISTILLCTL_RUNS", "runs"))

# Files inside a run folder (one place for the names).
RECIPE_FILE = "recipe.yaml"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
STUDENT_DIR = "student"
TEACHER_DIR = "teacher"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def temp_path_for(path: Path) -> Path:
    """A temporary sibling for writers that need a path (torch.save, onnx export); rename with os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=float) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
    return rows


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for mod in ("timm", "onnx", "onnxruntime", "safetensors", "tensorrt"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    from . import __version__

    out["distillctl"] = __version__
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def new_run_dir(name: str, out: Optional[str]) -> Path:
    if out:
        d = Path(out)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        d = RUNS_DIR / f"{name}-{stamp}"
        i = 1
        while d.exists():
            d = RUNS_DIR / f"{name}-{stamp}-{i}"
            i += 1
    d.mkdir(parents=True, exist_ok=True)
    return d


def set_latest(run_dir: Path) -> None:
    """Point ``runs/latest`` at ``run_dir`` (a symlink, replaced atomically)."""
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    link = RUNS_DIR / "latest"
    target = os.path.relpath(Path(run_dir).resolve(), RUNS_DIR.resolve())
    tmp = RUNS_DIR / f".latest.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError:  # filesystems without symlinks: a text pointer
        atomic_write_text(RUNS_DIR / "latest.txt", str(Path(run_dir).resolve()))


def latest_run() -> Optional[Path]:
    link = RUNS_DIR / "latest"
    if link.exists():
        return link.resolve()
    txt = RUNS_DIR / "latest.txt"
    if txt.is_file():
        p = Path(txt.read_text().strip())
        return p if p.exists() else None
    return None


def resolve_run(run: Optional[str]) -> Path:
    """A run folder from an explicit path or ``runs/latest``."""
    if run:
        p = Path(run)
        if not p.is_dir():
            raise BadInput(f"run folder not found: {p}")
        if not (p / RECIPE_FILE).is_file():
            raise BadInput(f"{p} is not a distillctl run folder (no {RECIPE_FILE})")
        return p
    p = latest_run()
    if p is None:
        raise BadInput(f"no run given and {RUNS_DIR}/latest does not exist: run `distillctl distill RECIPE` first")
    return p


class Manifest:
    """The run manifest: versions, seed, device, recipe hash, start/end, status."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / MANIFEST_FILE
        self.data: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def start(self, *, command: str, recipe_hash: str, seed: int, device: str) -> None:
        self.data.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.data.update(command=command, recipe_hash=recipe_hash, seed=seed, device=device,
                         versions=versions(), status="running", argv=sys.argv)
        self.data.pop("ended", None)
        self.save()

    def update(self, **kw) -> None:
        self.data.update(kw)
        self.save()

    def end(self, status: str, **kw) -> None:
        self.data.update(status=status, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **kw)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)
