import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

# Tiny models run fastest on one thread, and subprocesses must not oversubscribe the cores.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run inside a temporary folder so runs/ and runs/latest land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTILLCTL_RUNS", raising=False)
    return tmp_path


def cli(*args, timeout=300, env=None, cwd=None):
    """Run the real console entry point in a subprocess; returns CompletedProcess."""
    import subprocess

    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("CI", "true")
    return subprocess.run([sys.executable, "-m", "distillctl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=cwd)
