"""Where a command runs: the torch device, the DDP process group, seeding, and the versions report.

Training, evaluation, export and bench all ask this module which device to use, so none of
them imports another stage to find out.
"""
from __future__ import annotations

import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import BadInput, MissingCapability


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when present else cpu; cuda asked for but absent is exit 4."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MissingCapability("--device cuda was asked for but no CUDA device is visible to torch "
                                    f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise BadInput(f"--device must be auto, cpu or cuda, got {name!r}")


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch.distributed as td

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True


# the distributions that may provide each module (onnxruntime-gpu and the CUDA-specific TensorRT wheels
# install the same import name)
_DISTRIBUTIONS = {"timm": ("timm",), "onnx": ("onnx",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
                  "safetensors": ("safetensors",),
                  "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11")}


def _library_version(mod: str) -> Optional[str]:
    """The version of ``mod``: its ``__version__`` when it is imported already, else its installed
    distribution's (training records onnx's version without paying for importing it)."""
    import importlib.metadata as md

    loaded = sys.modules.get(mod)
    if loaded is not None and getattr(loaded, "__version__", None):
        return str(loaded.__version__)
    for dist in _DISTRIBUTIONS.get(mod, (mod,)):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    """Python, torch and the libraries an artifact depends on, plus CUDA/GPU when present."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for mod in _DISTRIBUTIONS:
        v = _library_version(mod)
        if v is not None:
            out[mod] = v
    from . import __version__

    out["distillctl"] = __version__
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# ----------------------------------------------------------------------------- CPU threads

def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _cgroup_quota() -> Optional[float]:
    """CPUs' worth of time a cgroup quota allows (cgroup v2 ``cpu.max``, v1 ``cfs_quota_us``), or None."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity set), capped by a cgroup CPU quota."""
    cpus = len(_affinity())
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cpu_times(cpus: list[int]) -> tuple[float, float]:
    """(total, idle) jiffies summed over ``cpus`` (the per-CPU lines of /proc/stat)."""
    wanted = {f"cpu{c}" for c in cpus}
    total = idle = 0.0
    with open("/proc/stat") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in wanted:
                values = [float(v) for v in parts[1:9]]
                total += sum(values)
                idle += values[3] + values[4]  # idle + iowait
    return total, idle


def cpu_load(sample_s: float = 0.2) -> dict:
    """How busy this process's CPUs are right now: cores' worth of work others do there, over ``sample_s``.

    Read from /proc/stat for the CPUs in this process's affinity set while it sleeps, so it measures the
    others; load on CPUs this process may not use does not count. Where /proc is missing (macOS,
    Windows) the load is unknown.
    """
    cpus = _affinity()
    cores = usable_cores()
    try:
        t0, i0 = _cpu_times(cpus)
        time.sleep(sample_s)
        t1, i1 = _cpu_times(cpus)
        if t1 - t0 <= 0:
            raise ValueError("no /proc/stat lines for this process's CPUs")
        busy = max(0.0, 1.0 - (i1 - i0) / (t1 - t0)) * len(cpus)
        load1 = os.getloadavg()[0]
    except (OSError, ValueError, IndexError):
        return {"cores": cores, "busy_cores": None, "loadavg_1m": None}
    return {"cores": cores, "busy_cores": round(min(busy, cores), 2), "loadavg_1m": round(load1, 2)}


def choose_threads(requested: Optional[int] = None, load: Optional[dict] = None) -> int:
    """Intra-op threads for this process: ``requested``, else the cores other processes leave free.

    Measured (benchmarks/threads.py, README): with every core given to torch and one core taken by
    another process, OpenMP's spinning barriers make a training step or a batch-1 call ~9x slower;
    passive waits (``OMP_WAIT_POLICY=PASSIVE``, which the CLI sets) remove most of it, and leaving the
    busy cores to their owner removes the rest. ``OMP_NUM_THREADS``, when set, is obeyed.
    """
    if requested:
        return int(requested)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:  # the user (or a launcher such as torchrun) already decided
        return int(env)
    load = load or cpu_load()
    cores = load["cores"]
    busy = load.get("busy_cores")
    if busy is None:
        return cores
    return max(1, min(cores, cores - int(round(busy))))
