"""ONNX builder: one self-contained file with a dynamic batch and the student's metadata.

torch.onnx's dynamo exporter is tried first; when it fails the TorchScript exporter is tried
and the failure is recorded (``exporter`` and ``fallback_reason`` in the report). Both write a
single file (``external_data=False``: resnet18 would otherwise come out as model.onnx +
model.onnx.data), print nothing on stdout (``--json`` owns it), and the result is checked with
``onnx.checker`` before it is renamed into place.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..errors import BadInput, ExportFailed
from ..files import commit, discard, raise_if_refused, temp_path, track
from .runtime import INPUT_NAME, OUTPUT_NAME

TORCHSCRIPT_MAX_OPSET = 20  # the legacy exporter's ceiling (torch 2.x)
# metadata_props values are strings; these keys hold JSON (lists, numbers)
JSON_KEYS = {"input_size", "mean", "std", "num_classes", "top1", "top5", "crop_pct", "class_names", "calibration_count"}


def _export_params() -> set[str]:
    return set(inspect.signature(torch.onnx.export).parameters)


def _dynamo_export(model: torch.nn.Module, x: torch.Tensor, path: Path, opset: Optional[int]) -> None:
    kw = dict(dynamo=True, external_data=False, verbose=False, input_names=[INPUT_NAME],
              output_names=[OUTPUT_NAME], dynamic_shapes=({0: "batch"},))
    if opset:
        kw["opset_version"] = opset
    torch.onnx.export(model, (x,), str(path), **kw)


def _torchscript_export(model: torch.nn.Module, x: torch.Tensor, path: Path, opset: Optional[int]) -> None:
    kw = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
              opset_version=min(opset or 17, TORCHSCRIPT_MAX_OPSET))
    if "dynamo" in _export_params():
        kw["dynamo"] = False
    torch.onnx.export(model, (x,), str(path), **kw)


EXPORTERS = {"dynamo": _dynamo_export, "torchscript": _torchscript_export}


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        discard(p)


def _set_metadata(proto, metadata: dict) -> None:
    from .. import __version__

    del proto.metadata_props[:]
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = k
        entry.value = v if isinstance(v, str) else json.dumps(v)
    proto.producer_name = "distillctl"
    proto.producer_version = __version__


def _save_checked(proto, dest: Path) -> None:
    """Write ``proto`` as one file, check it by path, then rename into place."""
    import onnx

    tmp = temp_path(dest, ".tmp.onnx")
    try:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as err:
        _remove(tmp)
        raise ExportFailed(f"the exported ONNX graph for {dest.name} does not pass onnx.checker: {err}") from None
    commit(tmp, dest)
    dest.with_name(dest.name + ".data").unlink(missing_ok=True)  # a stale sidecar from an older export


def export_onnx(model: torch.nn.Module, dest: Path, *, image_size: int, metadata: dict,
                opset: Optional[int] = None, example_batch: int = 2,
                exporters: tuple[str, ...] = ("dynamo", "torchscript")) -> dict:
    """Export ``model`` (eval, CPU) to ``dest``; returns what was done (exporter, opset, fallbacks)."""
    import onnx

    if "dynamo" not in _export_params():  # torch < 2.5 has only the TorchScript exporter
        exporters = tuple(e for e in exporters if e != "dynamo")
    dest = Path(dest)
    model = model.to("cpu").eval()
    # batch >= 2 so the exporter never specialises the batch dimension to 0/1
    x = torch.randn(max(2, example_batch), 3, image_size, image_size)
    with torch.no_grad():
        model(x)
    tmp = temp_path(dest, ".tmp.onnx")
    track(tmp.with_name(tmp.name + ".data"))  # some exporters write the weights beside the graph
    failures = []
    used = None
    t0 = time.perf_counter()
    for kind in exporters:
        try:
            with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation chatter from the exporters
                EXPORTERS[kind](model, x, tmp, opset)
            used = kind
            break
        except Exception as err:
            _remove(tmp)
            raise_if_refused(dest, err)  # no other exporter can write to a full disk
            failures.append({"exporter": kind, "error": f"{type(err).__name__}: {str(err).strip()[:800]}"})
            print(f"note: the {kind} ONNX exporter failed ({type(err).__name__}); "
                  + ("trying the next one" if kind != exporters[-1] else "no exporter left"), file=sys.stderr)
    if used is None:
        detail = "; ".join(f"{f['exporter']}: {f['error'][:300]}" for f in failures)
        raise ExportFailed(f"ONNX export of {type(model).__name__} failed with every exporter ({detail})",
                           details=failures)
    try:
        proto = onnx.load(str(tmp))  # loads model.onnx.data too if an exporter still wrote one
    finally:
        _remove(tmp)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].dim_param:
        raise ExportFailed(f"the {used} exporter produced a fixed batch dimension; a dynamic one is required")
    _set_metadata(proto, {**metadata, "exporter": used})
    _save_checked(proto, dest)
    return {"path": str(dest), "exporter": used, "fallback_reason": failures[0]["error"] if failures else None,
            "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "ir_version": proto.ir_version, "export_s": round(time.perf_counter() - t0, 3),
            "bytes": dest.stat().st_size}


_MISSING_KERNEL = re.compile(r"implementation for (\w+)\(")


def failed_path(dest: Path) -> Path:
    """Where an artifact that failed a check is kept: ``model.int8.onnx`` -> ``model.int8.failed.onnx``
    (a staged name, ``model.staged.onnx``, fails as ``model.failed.onnx``)."""
    dest = Path(dest)
    name = dest.name.replace(".staged.", ".")
    stem = name[:-len(".onnx")] if name.endswith(".onnx") else name
    return dest.with_name(f"{stem}.failed.onnx")


def metadata_of(proto) -> dict:
    """``metadata_props`` of a loaded proto as raw strings."""
    return {p.key: p.value for p in proto.metadata_props}


def guard_destination(src: Path, dest: Path, precision: str) -> None:
    """Refuse a ``dest`` that is the source or holds another precision's artifact (each keeps its own file)."""
    import onnx

    src, dest = Path(src), Path(dest)
    if not Path(src).is_file():
        raise BadInput(f"ONNX file not found: {src}; export the FP32 model first")
    if not dest.name.endswith(".onnx"):
        raise BadInput(f"the {precision} artifact must be an .onnx file, got {dest.name}")
    if dest.exists() and dest.resolve() == src.resolve():
        raise BadInput(f"the {precision} artifact would overwrite its FP32 source {src}; give it its own name")
    if dest.is_file():
        try:
            held = metadata_of(onnx.load(str(dest), load_external_data=False)).get("precision")
        except Exception:  # unreadable leftovers are replaced
            held = None
        if held and held != precision:
            raise BadInput(f"{dest} holds the {held} artifact; the {precision} one needs its own file name")


def _ort_load_error(path: Path):
    """The exception ONNX Runtime's CPU provider raises opening ``path``, or None."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        return None
    except Exception as err:
        return err


def write_temp(proto, dest: Path) -> Path:
    """``proto`` as one file under a temporary sibling name of ``dest``."""
    import onnx

    tmp = temp_path(dest, ".tmp.onnx")
    try:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
    except Exception as err:
        discard(tmp)
        raise_if_refused(dest, err)
        raise
    return tmp


def place_checked(tmp: Path, dest: Path, *, what: str) -> None:
    """Check ``tmp`` (onnx.checker, ONNX Runtime CPU load), then rename it to ``dest``.

    A file failing a check never gets the final name: it is kept as ``failed_path(dest)`` for
    inspection and ExportFailed (exit 5) says why; success removes a stale ``.failed.onnx``.
    """
    import onnx

    tmp, dest = Path(tmp), Path(dest)
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
        problem = None
    except Exception as err:
        problem = f"does not pass onnx.checker: {err}"
    if problem is None:
        err = _ort_load_error(tmp)
        problem = None if err is None else f"does not load in ONNX Runtime's CPU provider: {err}"
    if problem:
        failed = failed_path(dest)
        commit(tmp, failed)
        raise ExportFailed(f"the {what} model {problem} (kept as {failed} for inspection)")
    commit(tmp, dest)
    failed_path(dest).unlink(missing_ok=True)
    dest.with_name(dest.name + ".data").unlink(missing_ok=True)  # a stale sidecar from an older export


def finalise_artifact(proto, dest: Path, *, what: str) -> None:
    """Write ``proto`` under a temporary name, check it, rename it to ``dest`` (see place_checked)."""
    place_checked(write_temp(proto, dest), dest, what=what)


def export_fp16(src: Path, dest: Path, *, max_retries: int = 8) -> dict:
    """``dest`` (``model.fp16.onnx``): float16 weights and compute, float32 inputs and outputs.

    ONNX Runtime's converter does the work (fp16.py). The result must open in ONNX Runtime's CPU
    provider; an op without a float16 kernel there is kept in float32 (casts around it) and the
    conversion is redone.
    """
    import onnx
    import onnxruntime as ort

    from .fp16 import ConversionError, convert_float_to_float16

    src, dest = Path(src), Path(dest)
    guard_destination(src, dest, "fp16")
    proto = onnx.load(str(src))
    meta = metadata_of(proto)
    if meta.get("precision", "fp32") != "fp32":
        raise BadInput(f"{src.name} is a {meta['precision']} model; FP16 conversion starts from the FP32 file")
    keep: set[str] = set()
    for _ in range(max_retries):
        try:
            half = convert_float_to_float16(proto, keep)
        except (ConversionError, onnx.checker.ValidationError) as err:
            raise ExportFailed(f"FP16 conversion of {src} failed: {err}") from None
        _set_metadata(half, {**meta, "precision": "fp16", "kept_fp32_ops": ",".join(sorted(keep)),
                             "fp16_converter": f"onnxruntime.transformers.float16 {ort.__version__}"})
        tmp = write_temp(half, dest)
        m = _MISSING_KERNEL.search(str(_ort_load_error(tmp) or ""))
        if not m or m.group(1) in keep:
            break  # loads, or fails for another reason: place_checked keeps it as .failed.onnx and says why
        discard(tmp)
        keep.add(m.group(1))
    else:
        raise ExportFailed(f"FP16 conversion kept failing in ONNX Runtime (fp32 ops so far: {sorted(keep)})")
    place_checked(tmp, dest, what="FP16")
    return {"path": str(dest), "kept_fp32_ops": sorted(keep), "bytes": dest.stat().st_size}


def read_metadata(path: Path) -> dict:
    """``metadata_props`` of an ONNX file, JSON values decoded."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise BadInput(f"cannot read {path} as ONNX: {err}") from None
    out = {}
    for p in proto.metadata_props:
        out[p.key] = p.value
        if p.key in JSON_KEYS:  # only these: a hex recipe hash made of digits must stay a string
            try:
                out[p.key] = json.loads(p.value)
            except ValueError:
                pass
    return out


def _fresh(path: Path, student_weights: Path, recipe_hash: str) -> bool:
    """An existing FP32 file that was exported from the current student (reusable as a conversion source)."""
    if not path.is_file() or not student_weights.is_file():
        return False
    try:
        meta = read_metadata(path)
    except BadInput:
        return False
    return meta.get("recipe_hash") == recipe_hash and path.stat().st_mtime >= student_weights.stat().st_mtime


def build(job) -> list:
    """Format builder: ``model.onnx`` (FP32); ``model.fp16.onnx`` for fp16 (or ``export.onnx_fp16``);
    ``model.int8.onnx`` for int8 (static QDQ, calibrated on training images), plus the TensorRT
    encoding ``model.int8.trt.onnx`` when an engine is to be built.

    Every file is built under its staging name; the export face renames it once its gates pass.
    An FP16/INT8 export reuses an up-to-date ``model.onnx`` as its source instead of rewriting it.
    """
    from . import staged
    from .job import Artifact
    from .runtime import OrtPredictor

    run = job.run
    meta = {**job.metadata(), "precision": "fp32"}
    final = run.onnx_file("fp32")
    want16 = job.precision == "fp16" or job.recipe.export.onnx_fp16
    out = []
    source = final
    if job.precision == "fp32" or not _fresh(final, run.student_weights, meta["recipe_hash"]):
        dest = staged(final)
        first = job.recipe.export.onnx_exporter
        info = export_onnx(job.student, dest, image_size=job.input_size, metadata=meta, opset=job.opset,
                           example_batch=job.batch[1],
                           exporters=(first, *[e for e in ("dynamo", "torchscript") if e != first]))
        job.log(f"  onnx: {run.relative(final)} ({info['exporter']} exporter, opset {info['opset']}, "
                f"{info['bytes'] / 1e6:.1f} MB)")
        out.append(Artifact("onnx", dest, "fp32", OrtPredictor(dest, job.device, name="onnx"),
                            {**info, "final": final}))
        source = dest
    if want16:
        final16 = run.onnx_file("fp16")
        dest16 = staged(final16)
        info16 = export_fp16(source, dest16)
        job.log(f"  onnx_fp16: {run.relative(final16)} ({info16['bytes'] / 1e6:.1f} MB"
                + (f", fp32 ops: {', '.join(info16['kept_fp32_ops'])}" if info16["kept_fp32_ops"] else "") + ")")
        out.append(Artifact("onnx_fp16", dest16, "fp16", OrtPredictor(dest16, job.device, name="onnx_fp16"),
                            {**info16, "final": final16}))
    if job.precision == "int8":
        from .int8 import quantize_int8

        ex = job.recipe.export
        # ONNX Runtime's encoding (uint8 activations, fused integer kernels on CPU) is the ONNX artifact;
        # TensorRT's (symmetric int8 Q/DQ) is built only as the source of an INT8 engine
        targets = [("onnxruntime", "onnx_int8", "int8")]
        if "trt" in job.formats:
            targets.append(("tensorrt", "onnx_int8_trt", "int8_trt"))
        for target, key, name in targets:
            final8 = run.onnx_file(name)
            dest8 = staged(final8)
            info8 = quantize_int8(source, dest8, job.calibration(), method=ex.int8_calibration,
                                  count=ex.int8_calibration_images, target=target)
            job.log(f"  {key}: {run.relative(final8)} ({info8['bytes'] / 1e6:.1f} MB, {info8['method']} calibration "
                    f"on {info8['count']} training images, {info8['size_ratio']:.2f}x the FP32 size)")
            # the TensorRT encoding runs in ONNX Runtime too (slowly, as float fake-quantization, the way
            # TensorRT computes it): it is gated like every artifact
            predictor = OrtPredictor(dest8, job.device, name=key, simulate_qdq=target == "tensorrt")
            out.append(Artifact(key, dest8, "int8", predictor, {**info8, "final": final8}))
    for a in out:
        a.info["provider"] = a.predictor.provider if a.predictor is not None else None
        a.info["path"] = str(a.info["final"])
    return out
