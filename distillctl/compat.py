"""Compatibility shims that must run before torchvision (and so timm) is imported.

Some environments pair a CPU-only torch with a CUDA build of torchvision (the only
torchvision wheel published for a given torch release may be a CUDA one). Its compiled
extension then fails to load, the ``torchvision::nms`` operator is never defined, and
``import torchvision`` dies in its meta registrations with
"operator torchvision::nms does not exist". timm imports torchvision, so timm dies too.

``ensure_torchvision()`` detects exactly that case and defines the two operator schemas
torchvision registers Python-side kernels for (``nms`` and ``qnms``), so the import
succeeds. Detection, not assumption: when the extension loads (a matching torchvision),
nothing is touched. Calling ``nms`` in the patched case raises, which is fine: distillctl
never uses detection ops.
"""
from __future__ import annotations

import importlib.util
import os

_DONE = False
PATCHED = False  # True when the schemas had to be defined here (reported by `doctor`)


def _extension_loads() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to fix (timm will report its own error)
    pkg_dir = spec.submodule_search_locations[0]
    libs = [f for f in os.listdir(pkg_dir) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    if not libs:
        return False
    try:
        torch.ops.load_library(os.path.join(pkg_dir, libs[0]))
    except (OSError, RuntimeError):
        return False
    return hasattr(torch.ops.torchvision, "nms")


def ensure_torchvision() -> None:
    """Make ``import torchvision`` work with a mismatched (CUDA-only) build. Idempotent."""
    global _DONE, PATCHED
    if _DONE:
        return
    _DONE = True
    import sys

    if "torchvision" in sys.modules:
        return
    if _extension_loads():
        return
    import torch

    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept alive below
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    )
    globals()["_LIB"] = lib  # the Library object must outlive this call
    PATCHED = True


def import_timm():
    """Import timm after the torchvision fix; the one way distillctl imports timm."""
    ensure_torchvision()
    import timm

    return timm
