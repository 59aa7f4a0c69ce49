"""One interface over the runtimes an exported student runs in: PyTorch, ONNX Runtime (TensorRT in trt.py).

A predictor takes a normalised float32 batch ``[B, 3, S, S]`` (numpy) and returns float32 logits
``[B, C]``. ``timed_call(x)`` returns a zero-argument callable that runs one inference on inputs
already placed where the runtime wants them and waits for it to finish, which is what the
latency harness times. ``score`` walks a validation split once per predictor for accuracy and
logit parity against a reference.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import BadInput, MissingCapability

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class Predictor:
    """Base class: ``name`` (format), ``provider`` (what actually executes), ``max_batch``."""

    name = "predictor"
    provider = "unknown"
    max_batch: Optional[int] = None

    def _predict(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self.max_batch or len(x)
        if len(x) <= step:
            return self._predict(x)
        return np.concatenate([self._predict(x[i:i + step]) for i in range(0, len(x), step)])

    def timed_call(self, x: np.ndarray) -> Callable[[], None]:  # pragma: no cover - interface
        raise NotImplementedError


class TorchPredictor(Predictor):
    """A torch module in eval mode on ``device``; fp32 math (no TF32) so it can serve as the parity reference."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", name: str = "torch"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.name = name
        self.provider = f"torch-{self.device.type}"

    def _predict(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), _no_tf32():
            return self.model(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def timed_call(self, x: np.ndarray) -> Callable[[], None]:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        model, cuda = self.model, self.device.type == "cuda"

        def run() -> None:
            with torch.inference_mode():
                model(xt)
            if cuda:
                torch.cuda.synchronize(xt.device)

        return run


class _no_tf32:
    """fp32 matmul/conv on CUDA for the duration (TF32 would cost ~1e-3 of parity)."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


# ----------------------------------------------------------------------------- ONNX Runtime

GPU_PROVIDERS = ("CUDAExecutionProvider",)


def ort_plan(device: str) -> tuple[list, bool]:
    """Providers to ask ONNX Runtime for, and whether falling back to CPU is an error (exit 4).

    ``cpu``: CPU only. ``cuda``: CUDA then CPU, and a fallback fails. ``auto``: CUDA when torch sees a
    GPU and ONNX Runtime lists the provider, a fallback is recorded and tolerated.
    """
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"], False
    available = ort.get_available_providers()
    if device == "auto":
        if torch.cuda.is_available() and "CUDAExecutionProvider" in available:
            return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"], False
        return ["CPUExecutionProvider"], False
    if device == "cuda" or device.startswith("cuda:"):
        idx = int(device.split(":")[1]) if ":" in device else 0
        if "CUDAExecutionProvider" not in available:
            raise MissingCapability(f"--device {device}: this onnxruntime build has no CUDAExecutionProvider "
                                    f"(available: {', '.join(available)}); install onnxruntime-gpu")
        return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"], True
    raise BadInput(f"--device must be auto, cpu or cuda, got {device!r}")


def create_session(path: Path, device: str = "auto", *, threads: Optional[int] = None, fp32_exact: bool = True,
                   spinning: Optional[bool] = None, simulate_qdq: bool = False):
    """An InferenceSession whose provider is checked: ONNX Runtime falls back to CPU silently otherwise.

    ``spinning=False`` stops idle intra-op threads from busy-waiting after each run: when ONNX Runtime
    shares cores with another runtime (the interleaved benchmark), their spinning would be timed as
    the other runtime's latency.

    ``simulate_qdq=True`` turns graph optimisations off, so QuantizeLinear/DequantizeLinear run as
    float fake-quantization instead of being fused into ONNX Runtime's integer kernels: the numbers
    another runtime (TensorRT) computes from the same file, free of the x86 u8s8 saturation.

    Returns ``(session, provider_used, fell_back)``.
    """
    import onnxruntime as ort

    providers, strict = ort_plan(device)
    if fp32_exact:  # TF32 on the CUDA provider would blur the FP32 parity figures
        providers = [(p[0], {**p[1], "use_tf32": "0"}) if isinstance(p, tuple) else p for p in providers]
    so = ort.SessionOptions()
    so.log_severity_level = 3  # the provider-load failure is reported by us, below, not as C++ log noise
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if simulate_qdq:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if spinning is None:  # follow the process's OpenMP policy (the CLI sets PASSIVE)
        spinning = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # ORT prints its fallback banner on stdout
            sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as err:
        raise BadInput(f"ONNX Runtime cannot load {path}: {err}") from None
    wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    used = sess.get_providers()[0]
    fell_back = used != wanted
    if fell_back:
        msg = (f"ONNX Runtime fell back from {wanted} to {used} for {Path(path).name} (the CUDA/cuDNN "
               f"libraries this onnxruntime build needs did not load; see `distillctl doctor`)")
        if strict:
            raise MissingCapability(msg + "; use --device cpu to run on the CPU")
        print(f"warning: {msg}", file=sys.stderr)
    return sess, used, fell_back


class OrtPredictor(Predictor):
    name = "onnxruntime"

    def __init__(self, path: Path, device: str = "auto", *, threads: Optional[int] = None, name: str = "onnx",
                 spinning: Optional[bool] = None, simulate_qdq: bool = False):
        self.path = Path(path)
        self.name = name
        self.session, self.provider, self.fell_back = create_session(self.path, device, threads=threads,
                                                                     spinning=spinning, simulate_qdq=simulate_qdq)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def _predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0].astype(np.float32, copy=False)

    def timed_call(self, x: np.ndarray) -> Callable[[], None]:
        import onnxruntime as ort

        x = np.ascontiguousarray(x, dtype=np.float32)
        io = self.session.io_binding()
        if self.provider == "CUDAExecutionProvider":
            # inputs and outputs stay on the GPU: the timing excludes host<->device copies
            held = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
            io.bind_ortvalue_input(self.input_name, held)
            io.bind_output(self.output_name, "cuda", 0)
        else:
            held = x
            io.bind_cpu_input(self.input_name, x)
            io.bind_output(self.output_name, "cpu")
        sess = self.session

        def run() -> None:
            sess.run_with_iobinding(io)  # synchronous: ORT waits for the stream at the end of Run

        run.keep_alive = held  # the bound input buffer must outlive the binding
        return run


# ----------------------------------------------------------------------------- accuracy + parity


class _Accuracy:
    def __init__(self):
        self.correct1 = self.correct5 = self.n = 0

    def add(self, logits: np.ndarray, y: np.ndarray) -> None:
        k = min(5, logits.shape[-1])
        top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        hit = top == y[:, None]
        self.correct1 += int(hit[:, 0].sum())
        self.correct5 += int(hit.any(-1).sum())
        self.n += len(y)

    def result(self) -> dict:
        n = max(1, self.n)
        return {"top1": self.correct1 / n, "top5": self.correct5 / n, "n": self.n}


def val_arrays(batches, view: torch.nn.Module):
    """Yield ``(x, y)`` numpy pairs: x normalised float32 on the CPU, y int labels."""
    with torch.inference_mode():
        for x, y in batches:
            xn = view.to(x.device)(x.float())
            yield np.ascontiguousarray(xn.cpu().numpy(), dtype=np.float32), y.cpu().numpy()


def accuracy(predictor: Predictor, batches, view: torch.nn.Module, keep: int = 0) -> tuple[dict, np.ndarray]:
    """top-1/top-5 of ``predictor`` over the whole split, and its logits for the first ``keep`` images."""
    acc, kept = _Accuracy(), []
    n_kept = 0
    for x, y in val_arrays(batches, view):
        out = predictor(x)
        acc.add(out, y)
        if n_kept < keep:
            kept.append(out[:keep - n_kept])
            n_kept += len(kept[-1])
    logits = np.concatenate(kept) if kept else np.zeros((0, 0), np.float32)
    return acc.result(), logits


def parity(reference: np.ndarray, logits: np.ndarray) -> dict:
    """Logit agreement of an artifact with the PyTorch student on the same images."""
    if reference.shape != logits.shape:
        raise BadInput(f"the artifact returned logits of shape {logits.shape}, the student {reference.shape}")
    d = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()), "n": int(len(reference)),
            "ref_max_abs_logit": float(np.abs(reference).max())}
