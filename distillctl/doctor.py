"""``doctor``: what this machine can actually run, not only what is installed.

ONNX Runtime lists GPU providers it cannot load (a CPU-only machine with onnxruntime-gpu lists
TensorRT and CUDA) and falls back to CPU without an exception, so each listed provider is tried
on a one-node model and ``get_providers()`` tells whether it really loaded.
"""
from __future__ import annotations

import contextlib
import os
import platform
import re
import sys
import tempfile

_LOAD_ERROR = re.compile(r"Failed to load library \S+ with error: ([^\n\x1b]+)")


@contextlib.contextmanager
def _captured_stderr():
    """Capture file descriptor 2 (C++ logs write there directly, below Python's sys.stderr)."""

    class Log:
        text = ""

    log = Log()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield log
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            log.text = tmp.read().decode(errors="replace")


def _tiny_model() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime distillctl supports
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _ort_report() -> dict:
    try:
        import onnxruntime as ort
    except Exception as err:
        return {"installed": False, "error": f"{type(err).__name__}: {err}"}
    import numpy as np

    out = {"installed": True, "version": ort.__version__, "device": ort.get_device(),
           "available_providers": ort.get_available_providers(), "loads": {}}
    blob = _tiny_model()
    for prov in out["available_providers"]:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        providers = [prov, "CPUExecutionProvider"] if prov != "CPUExecutionProvider" else [prov]
        try:
            # ORT prints its fallback banner on stdout and the reason (a missing libcublas...) in its C++ log
            with _captured_stderr() as log, contextlib.redirect_stdout(sys.stderr):
                sess = ort.InferenceSession(blob, sess_options=so, providers=providers)
            used = sess.get_providers()[0]
            sess.run(None, {"x": np.ones((1, 4), np.float32)})
            out["loads"][prov] = used == prov
            if used != prov:
                reasons = _LOAD_ERROR.findall(log.text)
                out.setdefault("fallbacks", {})[prov] = (f"fell back to {used}"
                                                        + (f": {reasons[0]}" if reasons else ""))
        except Exception as err:
            out["loads"][prov] = False
            out.setdefault("fallbacks", {})[prov] = f"{type(err).__name__}: {str(err)[:200]}"
    out["usable_providers"] = [p for p, ok in out["loads"].items() if ok]
    return out


def _torch_report() -> dict:
    import torch

    out = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "threads": torch.get_num_threads(), "devices": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            props = torch.cuda.get_device_properties(i)
            out["devices"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                   "compute_capability": f"{cap[0]}.{cap[1]}",
                                   "memory_gib": round(props.total_memory / (1 << 30), 1)})
        out["cudnn"] = torch.backends.cudnn.version()
        out["bf16"] = torch.cuda.is_bf16_supported()
    out["mps_available"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return out


def doctor_report() -> dict:
    """Versions, devices, ONNX Runtime providers that load, TensorRT, and the torchvision shim."""
    from . import __version__, compat
    from .export import trt as trt_format

    report = {"distillctl": __version__, "python": platform.python_version(), "platform": platform.platform()}
    report["torch"] = _torch_report()
    try:
        timm = compat.import_timm()
        report["timm"] = timm.__version__
    except Exception as err:
        report["timm"] = f"import failed: {type(err).__name__}: {err}"
    report["torchvision_shim_patched"] = compat.PATCHED
    for mod in ("torchvision", "onnx", "onnxscript", "safetensors"):
        try:
            report[mod] = __import__(mod).__version__
        except Exception as err:
            report[mod] = f"missing ({type(err).__name__})"
    report["onnxruntime"] = _ort_report()
    trt = trt_format.probe()
    if not trt["installed"]:
        trt["hint"] = trt_format.INSTALL_HINT
    elif not trt["cuda_device"]:
        trt["hint"] = "TensorRT is installed but no CUDA device is visible"
    report["tensorrt"] = trt
    ort = report["onnxruntime"]
    report["summary"] = {
        "cuda": report["torch"]["cuda_available"],
        "onnxruntime_gpu": bool(ort.get("installed")) and any(p != "CPUExecutionProvider"
                                                              for p in ort.get("usable_providers", [])),
        "tensorrt": bool(trt.get("usable")),
    }
    return report
