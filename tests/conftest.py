import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

# Tiny models run fastest on one thread, and subprocesses must not oversubscribe the cores.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it
# No test reaches the network: the Hugging Face hub (timm's pretrained weights, hf-hub: names) is told so before
# anything imports it, so a fetch fails at once instead of waiting on a connection that cannot be made.
os.environ["HF_HUB_OFFLINE"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)


# The files that take most of the suite's time, long ones first (seconds of one worker, 2026-12-04, in this
# order: 26, 12, 16, 16, 23, 9, 6, 5, 5, 5). xdist's loadfile hands files out in collection order as workers
# free up, so the long ones go first and the short ones fill in at the end (with its default order, by
# number of tests, one worker was still busy 6 s after the other had finished; in this order they end within
# a second). test_export comes after test_cli: it reuses the student test_int8 trains in its first 17 s
# (exportkit.shared_cache), which is ready by then, instead of waiting for it on the other worker.
LONGEST_FIRST = ("test_int8.py", "test_faults.py", "test_run_folder.py", "test_cli.py", "test_export.py",
                 "test_fp16.py", "test_tracking.py", "test_artifacts.py", "test_bench.py", "test_evaluate.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run inside a temporary folder so runs/ and runs/latest land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTILLCTL_RUNS", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory):
    """A teacher checkpoint for ci_smoke's ViT (random init: for tests of mechanics, not accuracy)."""
    from safetensors.torch import save_file

    from distillctl.compat import import_timm
    from distillctl.recipe import load_recipe

    timm = import_timm()
    r = load_recipe(RECIPES / "ci_smoke.yaml")
    torch.manual_seed(0)
    t = timm.create_model(r.teacher.model, num_classes=10, **r.teacher.kwargs)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, str(path))
    return str(path)


def snapshot(root) -> dict:
    """Every entry under ``root``: relative path -> (kind, mode, bytes or link target)."""
    out = {}
    root = Path(root)
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("link", st.st_mode, os.readlink(p))
        elif p.is_file():
            out[str(p.relative_to(root))] = ("file", st.st_mode, p.read_bytes())
        else:
            out[str(p.relative_to(root))] = ("dir", st.st_mode, None)
    return out


_FORK_SERVER = None


def _fork_server():
    """multiprocessing's fork server for this process, preloading ``forkhost`` (started on first use)."""
    global _FORK_SERVER
    if _FORK_SERVER is None:
        import multiprocessing

        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["forkhost"])
        # Python 3.11's fork server imports its preload before it applies the caller's sys.path, so it finds
        # tests/forkhost.py through PYTHONPATH, set only while it starts
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), old) if p)
        try:
            forkserver.ensure_running()
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH")
            else:
                os.environ["PYTHONPATH"] = old
        _FORK_SERVER = ctx
    return _FORK_SERVER


class Forked:
    """The CLI's console entry (``distillctl.cli.main``) in a process forked from a clean host (``forkhost``).

    A real, separate process, for the tests whose point is what happens to a process (SIGKILL at any
    moment, SIGTERM, two writers racing, two ranks), without the ~3 s of CPU a fresh interpreter spends
    importing torch and timm: the host has them loaded and forks with one thread. The interface is the part
    of ``subprocess.Popen`` the tests use. Tests of interpreter start-up, of the console script itself, and
    the torchrun launcher use ``cli``/Popen.
    """

    def __init__(self, *args, cwd=None, env=None):
        import tempfile

        import forkhost

        self.args = [str(a) for a in args]
        folder = Path(tempfile.mkdtemp(prefix="forked-"))
        self._out, self._err = folder / "stdout", folder / "stderr"
        self._proc = _fork_server().Process(target=forkhost.main, args=(
            self.args, None if cwd is None else str(cwd), dict(env or {}), str(self._out), str(self._err)))
        self._proc.start()
        self.pid = self._proc.pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            self.returncode = self._proc.exitcode
        return self.returncode

    def wait(self, timeout=None):
        self._proc.join(timeout)
        if self.poll() is None:
            self.kill()
            raise TimeoutError(f"{self.args[:2]} still running after {timeout} s: {self.stderr_text[-2000:]}")
        return self.returncode

    def send_signal(self, sig) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.poll() is None:
            self._proc.kill()
            self._proc.join()
            self.poll()

    @staticmethod
    def _read(path: Path) -> str:
        return path.read_text(errors="replace") if path.is_file() else ""

    @property
    def stdout_text(self) -> str:
        return self._read(self._out)

    @property
    def stderr_text(self) -> str:
        return self._read(self._err)

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self.stdout_text, self.stderr_text


def cli(*args, timeout=300, env=None, cwd=None):
    """Run the real console entry point in a subprocess; returns CompletedProcess."""
    import subprocess

    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("CI", "true")
    return subprocess.run([sys.executable, "-m", "distillctl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=cwd)


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args, cwd=None):
    """The CLI in this process (Typer's runner): same commands, exit codes and streams, no interpreter start-up.

    For tests where a separate process is not the point; kills, signals and torchrun use ``cli``.
    """
    from typer.testing import CliRunner

    from distillctl.cli import app

    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, [str(a) for a in args], env={"CI": "true"}, prog_name="distillctl")
    finally:
        os.chdir(old)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return Result(r.exit_code, r.stdout, r.stderr)
