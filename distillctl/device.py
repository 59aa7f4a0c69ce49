"""Where a command runs: the torch device, the DDP process group, seeding, and the versions report.

Training, evaluation, export and bench all ask this module which device to use, so none of
them imports another stage to find out.
"""
from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass

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


def versions() -> dict:
    """Python, torch and the libraries an artifact depends on, plus CUDA/GPU when present."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for mod in ("timm", "onnx", "onnxruntime", "safetensors", "tensorrt"):
        try:
            if mod == "timm":
                from .compat import import_timm

                out[mod] = import_timm().__version__
            else:
                out[mod] = __import__(mod).__version__
        except Exception:
            pass
    from . import __version__

    out["distillctl"] = __version__
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0)
    return out
