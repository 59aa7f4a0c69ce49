"""The process ``conftest.Forked`` forks the CLI from: multiprocessing's fork server, preloading this module.

Forking the test process itself copied whatever its other threads held (mlflow's and TensorBoard's writer
threads, ONNX Runtime's pools, execnet's reader) into the child; one child once waited forever on such a
lock. The fork server imports this module (torch, timm, distillctl; not ONNX Runtime, whose import starts a
thread) and runs nothing else, so it forks with a single thread, and each child starts with those
imports done instead of paying ~3 s for them. ``main`` refuses to run (exit 70) if the host had a second thread or did not preload this module.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from distillctl.compat import import_timm

import_timm()
import distillctl.cli  # loaded here, so no child pays for these imports
import distillctl.export
import distillctl.flows

IMPORT_PID = os.getpid()  # the fork server's, when it preloaded this module
HOST_THREADS = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1


def main(args: list, cwd, env: dict, out_path: str, err_path: str) -> None:
    """Run ``distillctl ARGS`` (its console entry) with stdout and stderr in the two files."""
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the child's streams until it exits
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    if IMPORT_PID == os.getpid():
        print("forkhost: imported in the child, not preloaded by the fork server", file=sys.stderr)
        sys.exit(70)
    if HOST_THREADS != 1:
        print(f"forkhost: the fork server had {HOST_THREADS} threads; a forked child could deadlock",
              file=sys.stderr)
        sys.exit(70)
    os.environ.update({"CI": "true", "OMP_NUM_THREADS": "1", **env})
    torch.set_num_threads(1)
    if cwd is not None:
        os.chdir(cwd)
    sys.argv = ["distillctl", *args]
    distillctl.cli.main()  # leaves by SystemExit: multiprocessing makes its code the exit code
