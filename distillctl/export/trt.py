"""TensorRT: the only module that imports ``tensorrt``. Engine build, engine predictor, versions.

Written against the TensorRT 10 and 11 Python APIs (deploy-notes.md, C.1), feature-detected:
- networks are created with flags 0 (explicit batch is the only mode; EXPLICIT_BATCH is gone in 11);
- FP16 comes from the FP16 ONNX file (float16 weights and compute, float32 I/O) parsed into a
  strongly typed network: 11 is always strongly typed and has no BuilderFlag.FP16; on 10 the
  STRONGLY_TYPED flag is set when it exists, else the legacy BuilderFlag.FP16 on the FP32 file;
- INT8 is explicit quantization: the QDQ ONNX file made for TensorRT (int8.py, target
  "tensorrt": symmetric int8, float biases) parsed into a strongly typed network, no precision
  flag and no calibrator (the Q/DQ scales are the calibration); only a TensorRT 10 without
  STRONGLY_TYPED would take the weakly typed route, which needs BuilderFlag.INT8;
- ``build_serialized_network`` + ``set_memory_pool_limit`` (no build_engine / max_workspace_size);
- inference through the name-based tensor API and ``execute_async_v3`` on torch CUDA buffers.
The engine file is TensorRT's plan, byte for byte; our metadata goes to ``model.engine.json``.
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import BadInput, ExportFailed, MissingCapability
from ..files import atomic_write_bytes, atomic_write_json, read_json_file
from ..run import sidecar_of
from .runtime import Predictor

INSTALL_HINT = "pip install 'distillctl[tensorrt]'"


def probe() -> dict:
    """Whether TensorRT imports and a CUDA device is visible; never raises."""
    out: dict = {"installed": False, "cuda_device": torch.cuda.is_available()}
    try:
        import tensorrt as trt
    except Exception as err:  # ImportError, or a broken install failing to load its libraries
        out["error"] = f"{type(err).__name__}: {err}"
        return out
    out.update(installed=True, version=trt.__version__, usable=out["cuda_device"])
    return out


def require(device: str = "auto"):
    """The tensorrt module, or MissingCapability (exit 4) naming what to install."""
    if device == "cpu":
        raise BadInput("TensorRT runs on an NVIDIA GPU; --device cpu cannot build or run an engine")
    try:
        import tensorrt as trt
    except Exception as err:
        raise MissingCapability(f"TensorRT is not available ({type(err).__name__}: {err}). Install it on a machine "
                                f"with an NVIDIA GPU: {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise MissingCapability(f"TensorRT {trt.__version__} is installed but torch sees no CUDA device "
                                f"(torch {torch.__version__}); TensorRT needs an NVIDIA GPU and a CUDA build of torch")
    return trt


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def _logger(trt, verbose: bool = False):
    """A logger that writes to stderr (stdout belongs to --json) and keeps the errors for our message."""

    class StderrLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.limit = int(trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING)

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
            if int(severity) <= self.limit:
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return StderrLogger()


def _strong_typing(trt) -> bool:
    return _major(trt) >= 11 or hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


def _device_info() -> dict:
    idx = torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(idx)
    return {"gpu": torch.cuda.get_device_name(idx), "compute_capability": f"{cap[0]}.{cap[1]}",
            "cuda": torch.version.cuda}


def _int8_source(onnx_int8: Optional[Path]) -> Path:
    """The QDQ file an INT8 engine is parsed from; refuses the ONNX Runtime encoding before TensorRT sees it."""
    from .onnx import read_metadata

    if onnx_int8 is None:
        raise ExportFailed("an INT8 engine is built from an INT8 QDQ ONNX file quantized for TensorRT "
                           "(quantize_int8(..., target='tensorrt')); none was given")
    meta = read_metadata(onnx_int8)
    if meta.get("precision") != "int8" or meta.get("int8_target") != "tensorrt":
        raise BadInput(f"{onnx_int8} is not an INT8 file quantized for TensorRT (precision={meta.get('precision')}, "
                       f"int8_target={meta.get('int8_target')}); TensorRT needs symmetric int8 Q/DQ: quantize the "
                       "FP32 model with target 'tensorrt'")
    return Path(onnx_int8)


def build_engine(onnx_fp32: Path, onnx_fp16: Optional[Path], dest: Path, *, precision: str,
                 batch: tuple[int, int, int], workspace_gib: float, timing_cache: Path,
                 metadata: dict, opt_level: int = 3, verbose: bool = False,
                 onnx_int8: Optional[Path] = None) -> dict:
    """Parse the ONNX file, build a plan for the batch profile, write it and its sidecar JSON."""
    if precision not in ("fp32", "fp16", "int8"):
        raise BadInput(f"TensorRT precision must be fp32, fp16 or int8, got {precision!r}")
    trt = require("cuda")
    side = sidecar_of(dest)
    if side.is_file():  # never overwrite another precision's engine
        held = read_json_file(side).get("precision")
        if held and held != precision:
            raise BadInput(f"{dest} holds the {held} engine; the {precision} engine needs its own file")
    logger = _logger(trt, verbose)
    strongly_typed = precision in ("fp16", "int8") and _strong_typing(trt)
    if precision == "fp16" and strongly_typed and onnx_fp16 is None:
        raise ExportFailed("an FP16 engine on a strongly typed network needs model.fp16.onnx")
    if precision == "int8":
        src = _int8_source(onnx_int8)
    else:
        src = Path(onnx_fp16 if strongly_typed else onnx_fp32)

    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and _major(trt) == 10:  # 11 is always strongly typed and ignores the flag
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportFailed(f"TensorRT {trt.__version__} could not parse {src.name}: " + "; ".join(errs[:5]),
                           details=errs)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = opt_level
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 would cost ~1e-3 of FP32 parity
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT 10 without STRONGLY_TYPED: weak typing
    if precision == "int8" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)  # weakly typed Q/DQ networks need it; no calibrator either way

    lo, opt, hi = batch
    inp = network.get_input(0)
    rest = tuple(inp.shape)[1:]
    if any(d < 0 for d in rest):
        raise ExportFailed(f"input {inp.name} has dynamic dimensions besides the batch: {tuple(inp.shape)}")
    shapes = {"min": (lo, *rest), "opt": (opt, *rest), "max": (hi, *rest)}
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
    config.add_optimization_profile(profile)

    timing_cache = Path(timing_cache)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    cache_reused = timing_cache.is_file()
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # from another GPU or TensorRT version
        cache_reused = False
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportFailed(f"TensorRT {trt.__version__} failed to build the engine: "
                           + ("; ".join(logger.errors[-5:]) or "see the TensorRT log above"), details=logger.errors)
    data = bytes(memoryview(plan))  # the plan, byte for byte: never prefixed with our own header
    atomic_write_bytes(dest, data)
    atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    sidecar = {
        "format": "tensorrt-plan", "tensorrt": trt.__version__, **_device_info(),
        "precision": precision, "strongly_typed": strongly_typed or _major(trt) >= 11,
        # file names only: the sidecar travels with the engine (and src may still carry its staging name)
        "source_onnx": Path(src).name.replace(".staged.", "."), "engine_sha256": hashlib.sha256(data).hexdigest(),
        "quantization": "explicit (Q/DQ from the ONNX file)" if precision == "int8" else None,
        "profile": {inp.name: {k: list(v) for k, v in shapes.items()}}, "dynamic_batch": f"{lo}:{opt}:{hi}",
        "input_name": inp.name, "output_name": network.get_output(0).name,
        "workspace_gib": workspace_gib, "builder_optimization_level": opt_level,
        "timing_cache": Path(timing_cache).name, "timing_cache_reused": cache_reused,
        "build_s": round(time.perf_counter() - t0, 2), **metadata,
    }
    atomic_write_json(sidecar_of(dest), sidecar)
    return sidecar


def read_sidecar(engine: Path) -> dict:
    p = sidecar_of(engine)
    if not p.is_file():
        raise BadInput(f"{p} not found: an engine built by distillctl has a sidecar JSON with its input size, "
                       "mean/std and recipe hash")
    return read_json_file(p)


def _torch_dtype(trt, dt):
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    for name, tdt in table.items():
        if hasattr(trt.DataType, name) and dt == getattr(trt.DataType, name):
            return tdt
    raise ExportFailed(f"TensorRT tensor type {dt} has no torch equivalent")


class TrtPredictor(Predictor):
    """A deserialised engine executed with ``execute_async_v3`` on torch CUDA buffers."""

    name = "trt"

    def __init__(self, engine_path: Path, device: str = "auto"):
        trt = require(device)
        self.trt = trt
        self.logger = _logger(trt)
        self.path = Path(engine_path)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            built = {}
            try:
                built = read_sidecar(self.path)
            except BadInput:
                pass
            raise BadInput(f"TensorRT {trt.__version__} cannot load {self.path} (built with TensorRT "
                           f"{built.get('tensorrt', '?')} on {built.get('gpu', '?')}); engines are tied to one "
                           "TensorRT version and GPU: rebuild it with `distillctl export --format trt`")
        self.ctx = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if n not in ins]
        if len(ins) != 1 or len(outs) != 1:
            raise BadInput(f"{self.path}: expected one input and one output, found {ins} and {outs}")
        self.input, self.output = ins[0], outs[0]
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.in_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input))
        self.out_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output))
        self.stream = torch.cuda.Stream()
        self.provider = f"TensorRT {trt.__version__}"

    def _bind(self, xt: torch.Tensor) -> torch.Tensor:
        self.ctx.set_input_shape(self.input, tuple(xt.shape))
        out = torch.empty(tuple(self.ctx.get_tensor_shape(self.output)), dtype=self.out_dtype, device=xt.device)
        self.ctx.set_tensor_address(self.input, xt.data_ptr())
        self.ctx.set_tensor_address(self.output, out.data_ptr())
        return out

    def _execute(self) -> None:
        if not self.ctx.execute_async_v3(self.stream.cuda_stream):
            raise ExportFailed(f"TensorRT execution of {self.path.name} failed")

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        xt = torch.from_numpy(x).to("cuda", dtype=self.in_dtype).contiguous()
        self.stream.wait_stream(torch.cuda.current_stream())  # the copy ran on the default stream
        return xt

    def _predict(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n < self.min_batch:  # below the profile: pad, then drop the padding
            x = np.concatenate([x, np.zeros((self.min_batch - n, *x.shape[1:]), x.dtype)])
        xt = self._to_device(x)
        out = self._bind(xt)
        self._execute()
        self.stream.synchronize()
        return out[:n].float().cpu().numpy()

    def timed_call(self, x: np.ndarray) -> Callable[[], None]:
        if not self.min_batch <= len(x) <= self.max_batch:
            raise BadInput(f"batch {len(x)} is outside the engine's profile {self.min_batch}..{self.max_batch}; "
                           "rebuild with --dynamic-batch MIN:OPT:MAX covering it")
        xt = self._to_device(np.ascontiguousarray(x, dtype=np.float32))
        out = self._bind(xt)
        torch.cuda.synchronize()

        def run() -> None:
            self._execute()
            self.stream.synchronize()

        run.keep_alive = (xt, out)  # the engine holds raw pointers to these buffers
        return run


def build(job) -> list:
    """Format builder: the precision's engine + its sidecar JSON from the ONNX file(s) built just before.

    Each precision keeps its own engine (``model.engine``, ``model.fp16.engine``, ``model.int8.engine``),
    built under its staging name; the export face renames it once its gates pass.
    """
    from . import staged
    from .job import Artifact

    run = job.run
    onnx32 = job.artifacts.get("onnx")
    onnx16 = job.artifacts.get("onnx_fp16")
    onnx8 = job.artifacts.get("onnx_int8_trt")  # the TensorRT encoding of INT8 (int8.py, target "tensorrt")
    src32 = onnx32.path if onnx32 else run.onnx_file("fp32")
    if not Path(src32).is_file():
        raise ExportFailed("the TensorRT builder needs model.onnx; export the onnx format first")
    final = run.engine(job.precision)
    dest = staged(final)
    sidecar = build_engine(src32, onnx16.path if onnx16 else None, dest, precision=job.precision,
                           batch=job.batch, workspace_gib=job.recipe.export.workspace_gib,
                           timing_cache=run.timing_cache, metadata=job.metadata(),
                           onnx_int8=onnx8.path if onnx8 else None)
    job.log(f"  trt: {run.relative(final)} (TensorRT {sidecar['tensorrt']}, {sidecar['precision']}, batch "
            f"{sidecar['dynamic_batch']}, {sidecar['build_s']:.0f}s)")
    predictor = TrtPredictor(dest, job.device)
    name = "trt" if job.precision == "fp32" else f"trt_{job.precision}"
    return [Artifact(name, dest, job.precision, predictor, {"sidecar": str(sidecar_of(final)), **sidecar,
                                                            "provider": predictor.provider, "final": final})]
