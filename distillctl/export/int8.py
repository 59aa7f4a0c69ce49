"""INT8: static QDQ quantization of the FP32 ONNX student with ONNX Runtime's own quantizer.

QDQ format (QuantizeLinear/DequantizeLinear around float ops), weights stored as int8 per output
channel behind a DequantizeLinear (~4x smaller than FP32), activations per tensor. Two targets,
because the two runtimes want different encodings of the same ranges (measured, notes/export.md):

==============  ==========================  ===================================================
target          activations                 why
==============  ==========================  ===================================================
onnxruntime     uint8, asymmetric; int32    ONNX Runtime's x86 CPU kernels fuse DQ-Conv-Q into
                bias                        QLinearConv only for uint8 activations: resnet18 at
                                            32 px runs 2.2x faster than FP32 this way and 2.8x
                                            slower than FP32 with symmetric int8 activations
tensorrt        int8, symmetric (zero       TensorRT's explicit quantization accepts symmetric
                point 0); float bias        int8 only (weights in [-127, 127]) and has no int32
                                            dequantize for biases; ReLUs stay explicit
==============  ==========================  ===================================================

Weights are symmetric int8 for both; for ONNX Runtime in a 7-bit range (``reduce_range``): its x86
kernels multiply uint8 activations by int8 weights with VPMADDUBSW, whose 16-bit pair sums saturate
on CPUs without VNNI (AVX2, AVX-512 before VNNI). Measured on such a CPU (AMD EPYC, AVX2 only),
resnet18 at 32 px: full-range weights gave top-1 agreement 0.964 with FP32 and a max logit error of
0.27 of the logit scale; 7-bit weights 0.992 and 0.022, at the same speed (0.67 vs 0.74 ms at batch
1, 9.6 vs 9.5 ms at 32). A file built on a VNNI machine runs on any CPU this way. TensorRT's GPU
kernels accumulate in int32 without that saturation: its encoding keeps the full range, and
ONNX Runtime checks it with graph optimisations off (``create_session(simulate_qdq=True)``:
Q/DQ run as float fake-quantization, as TensorRT computes, not through the saturating kernels). Ranges come from ``count`` normalised images ([B, 3, S, S]
float32, the student's own preprocessing) by ``minmax`` (default; with the symmetric target this
is TensorRT's "max"), ``entropy`` (KL over 2048 bins, as TensorRT's entropy calibrator) or
``percentile``. Calibration runs here with ORT's calibrator, in chunks so histogram methods hold
at most ``CHUNK_IMAGES`` images' activations at a time, and reaches the quantizer through ORT's
calibration cache (``quantize_static(calibration_cache_path=...)``): quantize_static's own
calibration cannot be given the bin count, and its entropy with the default 128 bins returns the
min/max range unchanged.

The graph goes through ORT's quantization pre-processing (symbolic shape inference, basic graph
optimisation) when that succeeds. The result keeps the FP32 file's metadata plus
``precision=int8`` and the calibration settings, is checked (onnx.checker, loads in ONNX Runtime's
CPU provider) under a temporary name and only then renamed to ``dest``; a result that fails a
check is kept as ``<name>.failed.onnx`` and never under ``dest``.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import inspect
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInput, ExportFailed, MissingCapability
from ..files import StorageError, discard, raise_if_refused, storage_error, track

METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("onnxruntime", "tensorrt")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
CHUNK_IMAGES = 64  # images per calibrator pass: bounds the activations histogram methods hold
ENTROPY_BINS = 2048  # histogram bins for the KL search (TensorRT's entropy calibrator uses 2048 -> 128)


@dataclass(frozen=True)
class Int8Settings:
    """How the INT8 file is calibrated and encoded (all of it goes into the file's metadata)."""

    method: str = "minmax"
    count: int = 256  # calibration images
    per_channel: bool = True  # weight scales per output channel
    target: str = "onnxruntime"
    percentile: float = 99.999  # method == "percentile" only

    def check(self) -> None:
        if self.method not in METHODS:
            raise BadInput(f"INT8 calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise BadInput(f"INT8 calibration count must be a whole number >= 1, got {self.count!r}")
        if self.target not in TARGETS:
            raise BadInput(f"INT8 target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise BadInput(f"INT8 calibration percentile must be in (50, 100], got {self.percentile}")

    @property
    def symmetric_activations(self) -> bool:
        return self.target == "tensorrt"

    @property
    def reduce_range(self) -> bool:
        """7-bit weights for ONNX Runtime: its x86 u8s8 kernels saturate on CPUs without VNNI otherwise."""
        return self.target == "onnxruntime"

    def scheme(self) -> str:
        act = "int8 symmetric" if self.symmetric_activations else "uint8 asymmetric"
        wts = "per channel" if self.per_channel else "per tensor"
        if self.reduce_range:
            wts += " (7-bit range)"
        bias = "float32" if self.target == "tensorrt" else "int32"
        return f"QDQ; activations {act} per tensor; weights int8 symmetric {wts}; bias {bias}"


class _Calibration:
    """The caller's batches, checked and capped at ``count`` images, handed out in chunks."""

    def __init__(self, batches: Iterable, input_name: str, chw: tuple[int, int, int], count: int):
        self.input_name, self.chw, self.count = input_name, chw, count
        self.seen = 0
        self.batches = 0
        self._it: Iterator = iter(batches)
        self._head = self._next_batch()  # fail on an empty or malformed iterator before any ORT work
        if self._head is None:
            raise BadInput(f"the INT8 calibration data is empty: expected float32 batches "
                           f"[B, {', '.join(map(str, chw))}] of normalised images (the student's "
                           "preprocessing); pass training images")

    def _check(self, x) -> np.ndarray:
        try:
            arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
        except Exception as err:
            raise BadInput(f"INT8 calibration batch {self.batches} is not an array "
                           f"({type(x).__name__}: {err})") from None
        want = f"[B, {', '.join(map(str, self.chw))}]"
        if arr.ndim != 4 or tuple(arr.shape[1:]) != self.chw or arr.shape[0] < 1:
            raise BadInput(f"INT8 calibration batch {self.batches} has shape {list(arr.shape)}, expected {want} "
                           "(the FP32 model's input); feed images through the student's own preprocessing")
        if not np.issubdtype(arr.dtype, np.floating):
            raise BadInput(f"INT8 calibration batch {self.batches} is {arr.dtype}, expected float32 normalised "
                           "images; uint8 pixels must go through the student's preprocessing (/255, mean/std) first")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise BadInput(f"INT8 calibration batch {self.batches} contains NaN or Inf values")
        return arr

    def _next_batch(self) -> np.ndarray | None:
        if self.seen >= self.count:
            return None
        x = next(self._it, None)
        if x is None:
            return None
        arr = self._check(x)[: self.count - self.seen]  # the last batch is cut to the requested count
        self.seen += len(arr)
        self.batches += 1
        return arr

    def chunks(self, images: int) -> Iterator["_Chunk"]:
        """Readers for ORT's calibrator, each handing out about ``images`` images."""
        while self._head is not None:
            yield _Chunk(self, images)

    def take(self) -> np.ndarray | None:
        arr, self._head = self._head, None
        if arr is not None:
            self._head = self._next_batch()
        return arr


class _Chunk:
    """One calibrator pass: ORT's CalibrationDataReader protocol (``get_next`` -> feed dict or None)."""

    def __init__(self, source: _Calibration, images: int):
        self.source, self.left = source, images

    def get_next(self):
        if self.left <= 0:
            return None
        arr = self.source.take()
        if arr is None:
            return None
        self.left -= len(arr)
        return {self.source.input_name: arr}


def _input_chw(proto) -> tuple[str, tuple[int, int, int]]:
    if len(proto.graph.input) != 1:
        raise BadInput(f"INT8 quantization expects a model with one input, found {len(proto.graph.input)}")
    vi = proto.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
    if len(dims) != 4 or min(dims[1:]) < 1:
        raise BadInput(f"INT8 quantization expects an input [batch, C, H, W] with fixed C, H, W; {vi.name} is {dims}")
    return vi.name, (dims[1], dims[2], dims[3])


def _preprocess(src: Path, dest: Path) -> str | None:
    """ORT's quantization pre-processing into ``dest``; the reason when it fails (then src is quantized as is)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dest))
        return None
    except Exception as err:
        dest.unlink(missing_ok=True)
        return f"{type(err).__name__}: {str(err).strip()[:300]}"


def quantizable_op_types(keep_float: Iterable[str] = ()) -> list[str]:
    """ONNX Runtime's quantizable op types (quantize_static's default set) minus ``keep_float``."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QLinearOpsRegistry) | set(QDQRegistry)) - set(keep_float))


def _calibrate(model: Path, reader: _Calibration, s: Int8Settings, op_types: list[str], work: Path):
    """Activation ranges (ORT TensorsData) over the calibration images, one chunk at a time."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[s.method]
    options = {"symmetric": s.symmetric_activations}
    if s.method == "entropy":
        options.update(num_bins=ENTROPY_BINS, num_quantized_bins=128)
    if s.method == "percentile":
        options.update(num_bins=ENTROPY_BINS, percentile=s.percentile)
    calibrator = create_calibrator(model, op_types, augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=method, extra_options=options)
    for chunk in reader.chunks(CHUNK_IMAGES):  # histograms and min/max merge across passes
        calibrator.collect_data(chunk)
    ranges = calibrator.compute_data()
    del calibrator
    return method, ranges


def _quantized_ops(proto) -> dict[str, int]:
    """How many nodes of each type read at least one dequantized input (the ops that run on int8 data)."""
    dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    ops = collections.Counter(n.op_type for n in proto.graph.node
                              if n.op_type not in QDQ_OPS and any(i in dq_out for i in n.input))
    return dict(sorted(ops.items()))


@contextlib.contextmanager
def _quiet_quantizer():
    """ORT's calibrators print progress on stdout (owned by --json) and log advice through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        root.setLevel(level)


# ONNX Runtime's work files for one quantization (a shape-inferred copy, the calibration graph with every
# activation as an output, the result) take up to about 3x the FP32 file at once: measured with a 5 MB student
# on a small file system, 12 MB free failed and 15 MB succeeded. The library writes some of them without
# checking, so a full disk shows up later as "DecodeError: ... Wire format was corrupt".
WORK_SPACE_FACTOR = 3.0
# the largest single work file is about the FP32 file's size (measured for a 1.5 MB test_resnet under a file-size
# limit: 1.04x the FP32 file succeeded, 1.0x failed); below 1.1x a limit is refused before the quantizer starts
WORK_FILE_FACTOR = 1.1


def _file_size_limit() -> int | None:
    """The process's file-size limit in bytes (``ulimit -f``), or None when there is none."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _room_error(folder: Path, src_bytes: int) -> StorageError | None:
    """A StorageError when the quantizer's work files cannot fit before it starts: a file-size limit below the
    largest of them, or less free space in ``folder`` than all of them take; else None."""
    limit = _file_size_limit()
    if limit is not None and limit < WORK_FILE_FACTOR * src_bytes:  # ONNX Runtime ignores some refused writes
        return StorageError(f"the file-size limit of this process (ulimit -f, {limit / 2 ** 20:.1f} MB) is below the "
                            f"size of ONNX Runtime's INT8 work files (about {WORK_FILE_FACTOR:g}x the "
                            f"{src_bytes / 2 ** 20:.1f} MB FP32 file). Nothing under a final name was changed; raise "
                            "the limit, then run the command again")
    free, need = shutil.disk_usage(folder).free, int(WORK_SPACE_FACTOR * src_bytes)
    if free >= need:
        return None
    return StorageError(f"not enough free space in {folder} for INT8 quantization: ONNX Runtime's work files need "
                        f"about {need / 2 ** 20:.0f} MB ({WORK_SPACE_FACTOR:g}x the FP32 file), {free / 2 ** 20:.0f} "
                        "MB is free. Nothing under a final name was changed; free space, then run the command again")


def quantize_int8(src: Path, dest: Path, calibration: Iterable[np.ndarray], *, method: str = "minmax",
                  count: int = 256, per_channel: bool = True, target: str = "onnxruntime",
                  percentile: float = 99.999, keep_float: Iterable[str] = ()) -> dict:
    """Write ``dest``: the INT8 QDQ version of the FP32 ONNX file ``src``, calibrated on ``calibration``.

    ``calibration`` yields float32 batches [B, 3, S, S] already normalised like the student's input;
    at most ``count`` images are used. ``target`` picks the encoding (module docstring);
    ``keep_float`` names op types left in float (no Q/DQ on their inputs). Returns
    what was done (sizes, settings, op counts, timings). Raises BadInput for bad settings or
    calibration data, MissingCapability for an ONNX Runtime without calibration caches,
    ExportFailed when quantization fails or the result fails a check.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from .onnx import _set_metadata, finalise_artifact, guard_destination, metadata_of

    s = Int8Settings(method=method, count=count, per_channel=per_channel, target=target, percentile=percentile)
    s.check()
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise MissingCapability(f"INT8 export needs an onnxruntime whose quantize_static takes calibration_cache_path "
                                f"(1.31 has it); installed: {ort.__version__}. Upgrade onnxruntime")
    src, dest = Path(src), Path(dest)
    guard_destination(src, dest, "int8")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fp32 = onnx.load(str(src))
    if any(n.op_type in QDQ_OPS for n in fp32.graph.node):
        raise BadInput(f"{src.name} already contains QuantizeLinear/DequantizeLinear nodes; quantize the FP32 file")
    meta = metadata_of(fp32)
    if meta.get("precision", "fp32") != "fp32":
        raise BadInput(f"{src.name} is a {meta['precision']} model; INT8 quantization starts from the FP32 file")
    input_name, chw = _input_chw(fp32)
    del fp32
    reader = _Calibration(calibration, input_name, chw, s.count)
    src_bytes = src.stat().st_size
    short = _room_error(dest.parent, src_bytes)
    if short is not None:
        raise short

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=dest.parent) as work, _quiet_quantizer():
        work = Path(work)
        pre_error = _preprocess(src, work / "preprocessed.onnx")
        model = work / "preprocessed.onnx" if pre_error is None else src
        # ONNX Runtime writes its shape-inferred copy beside the model it reads: beside the FP32 source itself
        # when preprocessing failed. It is removed below, or when the command ends if the process is stopped.
        inferred = track(model.with_name(f"{model.stem}-inferred{model.suffix}"))
        try:
            op_types = quantizable_op_types(keep_float)
            calib_method, ranges = _calibrate(model, reader, s, op_types, work)
            calibrate_s = time.perf_counter() - t0
            cache = work / "ranges.json"
            save_tensors_data(ranges, cache)
            extra = {"ActivationSymmetric": s.symmetric_activations, "WeightSymmetric": True}
            if s.target == "tensorrt":
                extra["QuantizeBias"] = False  # TensorRT has no int32 dequantize; biases stay float
            quantize_static(str(model), str(work / "quantized.onnx"), None, quant_format=QuantFormat.QDQ,
                            per_channel=s.per_channel,
                            activation_type=QuantType.QInt8 if s.symmetric_activations else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=op_types, reduce_range=s.reduce_range,
                            calibrate_method=calib_method, extra_options=extra,
                            calibration_cache_path=str(cache))
            proto = onnx.load(str(work / "quantized.onnx"))
        except BadInput:
            raise  # a malformed batch met while calibrating
        except Exception as err:
            raise_if_refused(Path(work), err)
            if shutil.disk_usage(dest.parent).free < src_bytes:  # the disk filled up, whatever the library says
                raise storage_error(Path(work), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
            raise ExportFailed(f"ONNX Runtime's static quantization of {src.name} failed: "
                               f"{type(err).__name__}: {str(err).strip()[:500]}") from None
        finally:
            discard(inferred)
    calib = {"calibration_method": s.method, "calibration_count": reader.seen,
             "calibration_per_channel": str(s.per_channel).lower(), "int8_target": s.target}
    if s.method == "percentile":
        calib["calibration_percentile"] = str(s.percentile)
    _set_metadata(proto, {**meta, "precision": "int8", **calib,
                          "quantization": f"{s.scheme()}; onnxruntime {ort.__version__}"})
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    finalise_artifact(proto, dest, what="INT8")
    return {"path": str(dest), "bytes": dest.stat().st_size, "fp32_bytes": src.stat().st_size,
            "size_ratio": round(src.stat().st_size / dest.stat().st_size, 3),
            "target": s.target, "method": s.method, "count": reader.seen, "count_requested": s.count,
            "batches": reader.batches, "per_channel": s.per_channel,
            "percentile": s.percentile if s.method == "percentile" else None, "scheme": s.scheme(),
            "preprocessed": pre_error is None, "preprocess_error": pre_error,
            "quantized_ops": _quantized_ops(proto), "qdq_nodes": {k: ops.get(k, 0) for k in QDQ_OPS},
            "calibrate_s": round(calibrate_s, 3), "time_s": round(time.perf_counter() - t0, 3),
            "onnxruntime": ort.__version__}
