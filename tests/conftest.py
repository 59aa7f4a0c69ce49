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


class Forked:
    """The CLI's console entry (``distillctl.cli.main``) in a forked copy of this test process.

    A real, separate process, for the tests whose point is what happens to a process (SIGKILL at any
    moment, SIGTERM, two writers racing), without the ~3 s of CPU a fresh interpreter spends importing
    torch and timm: the child starts with them loaded. It runs with one intra-op thread (as the tests'
    subprocesses do; OpenMP pools must not cross a fork) and leaves by ``os._exit``, so nothing of the
    test process (atexit, pytest) runs in it. The interface is the part of ``subprocess.Popen`` the tests
    use. Tests of interpreter start-up, of the console script itself, and torchrun use ``cli``/Popen.
    """

    def __init__(self, *args, cwd=None, env=None):
        import tempfile

        self.args = [str(a) for a in args]
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115 - live as long as self
        self.returncode = None
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            self._child(cwd, env)

    def _child(self, cwd, env) -> None:
        code = 70
        try:
            os.dup2(self._out.fileno(), 1)
            os.dup2(self._err.fileno(), 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the child's stdout until os._exit
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.environ.update({"CI": "true", "OMP_NUM_THREADS": "1", **(env or {})})
            torch.set_num_threads(1)
            if cwd is not None:
                os.chdir(cwd)
            sys.argv = ["distillctl", *self.args]
            from distillctl.cli import main

            try:
                main()
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:  # noqa: BLE001 - reported on the child's stderr, as an interpreter would
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        import time

        t0 = time.monotonic()
        while self.poll() is None:
            if timeout is not None and time.monotonic() - t0 > timeout:
                self.kill()
                raise TimeoutError(f"{self.args[:2]} still running after {timeout} s")
            time.sleep(0.005)
        return self.returncode

    def send_signal(self, sig) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)
        if self.returncode is None:
            os.waitpid(self.pid, 0)
            self.returncode = -signal.SIGKILL

    def _read(self, f) -> str:
        f.seek(0)
        return f.read().decode(errors="replace")

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
