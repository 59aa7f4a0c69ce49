"""INT8 QDQ quantization of a real (briefly trained) resnet18 student at 32 px on digits, by ONNX Runtime's quantizer.

Thresholds come from measurements on this student (notes/export.md, 60 SGD steps, 256 calibration
images, minmax): FP32 top-1 0.9805; ONNX Runtime target 0.9777 (max |logit diff| 0.021 of the logit
scale, top-1 agreement 0.992); TensorRT target 0.9749 (0.027, 0.994). Bounds below leave about 3x.
Re-measured on an AVX2-only CPU (no VNNI), where this environment trains a slightly different student
(FP32 0.9749): 7-bit ONNX Runtime weights 0.9666 (0.022, 0.992); full-range weights there gave 0.964
agreement and 0.27 (the u8s8 saturation this test now catches); TensorRT encoding, simulated, 0.9749.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from distillctl.data import build_data
from distillctl.errors import BadInput, ExportFailed
from distillctl.export import onnx as onnx_format
from distillctl.export.int8 import quantize_int8
from distillctl.export.runtime import val_arrays
from distillctl.models import IMAGENET_MEAN, IMAGENET_STD, InputView
from distillctl.recipe import load_recipe

try:
    from exportkit import make_run, shared_cache, tiny_recipe, write_onnx
except ImportError:  # tests collected as a package
    from tests.exportkit import make_run, shared_cache, tiny_recipe, write_onnx


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("int8") / "run", tiny_recipe("resnet18"), train_steps=60,
                   cache=shared_cache(tmp_path_factory))
    src = write_onnx(run, exporter="dynamo")
    recipe = load_recipe(run / "recipe.yaml")
    data = build_data(recipe.data, seed=0, device=torch.device("cpu"))
    view = InputView(recipe.data.image_size, IMAGENET_MEAN, IMAGENET_STD)
    val = list(val_arrays(data.val, view))
    train = [x for x, _ in val_arrays(data.train, view)]  # calibration: training images, the student's preprocessing
    return {"run": run, "src": src, "train": train, "xv": np.concatenate([x for x, _ in val]),
            "yv": np.concatenate([y for _, y in val])}


def _logits(path, x, simulate_qdq=False):
    so = ort.SessionOptions()
    if simulate_qdq:  # TensorRT's numbers: Q/DQ as float fake-quant, not ORT's saturating x86 u8s8 kernels
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    return np.concatenate([sess.run(None, {"input": x[i:i + 128]})[0] for i in range(0, len(x), 128)])


@pytest.fixture(scope="module")
def fp32_logits(student):
    return _logits(student["src"], student["xv"])


@pytest.fixture(scope="module", params=["onnxruntime", "tensorrt"])
def quantized(request, student):
    dest = student["src"].with_name(f"model.int8.{request.param}.onnx")
    info = quantize_int8(student["src"], dest, iter(student["train"]), target=request.param)
    return request.param, dest, info


def _inits(model):
    return {t.name: t for t in model.graph.initializer}


def test_int8_is_a_quarter_of_fp32_and_loads_in_ort(student, quantized):
    target, dest, info = quantized
    assert dest.is_file() and info["path"] == str(dest)
    assert 3.8 < student["src"].stat().st_size / dest.stat().st_size < 4.1  # measured 3.95
    assert info["count"] == 256 and info["count_requested"] == 256 and info["method"] == "minmax"
    assert info["preprocessed"] is True
    assert info["quantized_ops"]["Conv"] == 20 and info["quantized_ops"]["Gemm"] == 1  # every conv, the classifier
    model = onnx.load(str(dest))
    onnx.checker.check_model(str(dest), full_check=True)
    for vi in (model.graph.input[0], model.graph.output[0]):
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # callers feed and read float32
        assert vi.type.tensor_type.shape.dim[0].dim_param  # batch stays dynamic
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 20 and ops.count("DequantizeLinear") > 40
    assert not any(f.endswith(".onnx") and f.startswith(".") for f in os.listdir(dest.parent))  # no temp left


def test_conv_weights_are_int8_per_output_channel(quantized):
    target, dest, _ = quantized
    model = onnx.load(str(dest))
    inits = _inits(model)
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 20
    for conv in convs:
        deq = dq[conv.input[1]]  # the weight arrives through a DequantizeLinear of a stored int8 tensor
        w, scale, zp = (inits[name] for name in deq.input)
        assert w.data_type == onnx.TensorProto.INT8
        cout = w.dims[0]
        assert list(scale.dims) == [cout] and list(zp.dims) == [cout]  # one scale per output channel
        assert {a.name: a.i for a in deq.attribute}.get("axis", 1) == 0
        wv = numpy_helper.to_array(w)
        assert not numpy_helper.to_array(zp).any() and wv.min() >= -127  # symmetric: zero point 0, [-127, 127]
        assert len(np.unique(numpy_helper.to_array(scale))) > 1
        if len(conv.input) > 2:  # bias: int32 behind a DQ for ONNX Runtime, float32 for TensorRT
            bias_t = dq[conv.input[2]].input[0] if conv.input[2] in dq else conv.input[2]
            want = onnx.TensorProto.FLOAT if target == "tensorrt" else onnx.TensorProto.INT32
            assert inits[bias_t].data_type == want


def test_activation_encoding_matches_the_target(quantized):
    target, dest, info = quantized
    model = onnx.load(str(dest))
    inits = _inits(model)
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    types = {z.data_type for z in zps}
    if target == "tensorrt":  # TensorRT: signed int8, zero point 0 everywhere; ReLUs stay explicit
        assert types == {onnx.TensorProto.INT8}
        assert all(not numpy_helper.to_array(z).any() for z in zps)
        assert info["quantized_ops"].get("Relu") == 17
    else:  # ONNX Runtime's x86 kernels: uint8 activations, ReLUs folded into the ranges
        assert types == {onnx.TensorProto.UINT8}
        assert "Relu" not in [n.op_type for n in model.graph.node]


def test_metadata_keeps_fp32_facts_and_adds_calibration(student, quantized):
    target, dest, _ = quantized
    fp32 = onnx_format.read_metadata(student["src"])
    meta = onnx_format.read_metadata(dest)
    for key in ("recipe_hash", "architecture", "input_size", "mean", "std", "num_classes", "exporter"):
        assert meta[key] == fp32[key], key
    assert fp32["precision"] == "fp32" and meta["precision"] == "int8"
    assert meta["calibration_method"] == "minmax" and meta["calibration_count"] == 256
    assert meta["calibration_per_channel"] == "true" and meta["int8_target"] == target
    assert "weights int8 symmetric per channel" in meta["quantization"]


def test_int8_top1_and_parity_close_to_fp32(student, fp32_logits, quantized):
    target, dest, _ = quantized
    y = student["yv"]
    logits = _logits(dest, student["xv"], simulate_qdq=target == "tensorrt")
    top1_32 = (fp32_logits.argmax(1) == y).mean()
    top1_8 = (logits.argmax(1) == y).mean()
    assert top1_32 > 0.9  # trained: agreement is meaningful
    assert top1_8 >= top1_32 - 0.02  # measured drop 0.003 (onnxruntime), 0.006 (tensorrt)
    assert (logits.argmax(1) == fp32_logits.argmax(1)).mean() >= 0.97  # measured 0.992 / 0.994
    scale = max(1.0, float(np.abs(fp32_logits).max()))
    rel = np.abs(logits - fp32_logits).max() / scale
    assert 1e-3 < rel < 0.08  # really quantized, yet near: measured 0.021 / 0.027


def test_fp32_source_is_untouched(student):
    before = hashlib.sha256(student["src"].read_bytes()).hexdigest()
    dest = student["src"].with_name("model.int8.again.onnx")
    batches = (torch.from_numpy(x) for x in student["train"][:2])  # torch batches are taken as they come
    quantize_int8(student["src"], dest, batches, count=64, method="percentile")
    assert hashlib.sha256(student["src"].read_bytes()).hexdigest() == before
    assert onnx_format.read_metadata(student["src"])["precision"] == "fp32"
    assert onnx_format.read_metadata(dest)["calibration_count"] == 64


def test_calibration_method_and_count_change_the_ranges(student, quantized):
    """percentile clips the tails minmax keeps: the activation scales differ; count caps the images used."""
    target, dest, _ = quantized
    other = dest.with_name(f"model.int8.{target}.pct.onnx")
    info = quantize_int8(student["src"], other, iter(student["train"]), method="percentile", count=100, target=target)
    assert info["count"] == 100 and info["batches"] == 2  # 64 + 36: the last batch is cut
    scales = lambda p: {t.name: float(numpy_helper.to_array(t)) for t in onnx.load(str(p)).graph.initializer
                        if t.name.endswith("_scale") and not t.dims}
    a, b = scales(dest), scales(other)
    shared = set(a) & set(b)
    assert len(shared) > 20
    assert sum(b[k] < a[k] - 1e-9 for k in shared) > len(shared) / 2  # percentile ranges are narrower
    assert onnx_format.read_metadata(other)["calibration_percentile"] == "99.999"


@pytest.mark.parametrize("batches,needle", [
    ([], "calibration data is empty"),
    ([np.zeros((4, 3, 16, 16), np.float32)], "has shape [4, 3, 16, 16], expected [B, 3, 32, 32]"),
    ([np.zeros((3, 32, 32), np.float32)], "has shape [3, 32, 32]"),
    ([np.zeros((4, 3, 32, 32), np.uint8)], "is uint8, expected float32"),
    ([np.full((4, 3, 32, 32), np.nan, np.float32)], "NaN or Inf"),
    ([np.zeros((4, 3, 32, 32), np.float32), np.zeros((4, 1, 32, 32), np.float32)], "batch 1 has shape [4, 1, 32, 32]"),
])
def test_bad_calibration_input_is_bad_input(student, tmp_path, batches, needle):
    dest = student["src"].with_name("model.int8.bad.onnx")
    with pytest.raises(BadInput) as info:
        quantize_int8(student["src"], dest, iter(batches), count=256)
    assert info.value.exit_code == 2 and needle in info.value.message, info.value.message
    assert not dest.exists() and not onnx_format.failed_path(dest).exists()
    assert not [f for f in os.listdir(dest.parent) if f.startswith(".int8-")]  # the work folder is gone


@pytest.mark.parametrize("kwargs,needle", [
    ({"method": "kl"}, "must be one of minmax, entropy, percentile"),
    ({"count": 0}, "count must be a whole number >= 1"),
    ({"target": "cuda"}, "target must be one of onnxruntime, tensorrt"),
    ({"percentile": 20.0}, "percentile must be in (50, 100]"),
])
def test_bad_settings_are_bad_input(student, kwargs, needle):
    with pytest.raises(BadInput) as info:
        quantize_int8(student["src"], student["src"].with_name("model.int8.x.onnx"), iter(student["train"]), **kwargs)
    assert needle in info.value.message


def test_never_writes_over_another_precisions_file(student, tmp_path):
    src = student["src"]
    with pytest.raises(BadInput, match="would overwrite its FP32 source"):
        quantize_int8(src, src, iter(student["train"]))
    fp16 = src.with_name("model.fp16.onnx")
    onnx_format.export_fp16(src, fp16)
    before = fp16.read_bytes()
    with pytest.raises(BadInput, match="holds the fp16 artifact"):
        quantize_int8(src, fp16, iter(student["train"]))
    assert fp16.read_bytes() == before
    with pytest.raises(BadInput, match="is a fp16 model"):
        quantize_int8(fp16, src.with_name("model.int8.from16.onnx"), iter(student["train"]))


def test_a_file_failing_its_check_is_kept_as_failed_never_final(student, tmp_path):
    """The shared last step: a graph ONNX Runtime rejects ends as <name>.failed.onnx, exit 5, dest absent."""
    model = onnx.load(str(student["src"]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv.input[1] = "missing_weight"  # a real defect: the conv reads a tensor nothing produces
    dest = tmp_path / "model.int8.onnx"
    with pytest.raises(ExportFailed) as info:
        onnx_format.finalise_artifact(model, dest, what="INT8")
    assert info.value.exit_code == 5 and "model.int8.failed.onnx" in info.value.message
    assert not dest.exists() and (tmp_path / "model.int8.failed.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.failed.onnx"]  # no temp file either
    onnx_format.finalise_artifact(onnx.load(str(student["src"])), dest, what="INT8")  # a good one replaces it
    assert dest.is_file() and not (tmp_path / "model.int8.failed.onnx").exists()


def test_quantizer_output_stays_off_stdout(student, capfd):
    """--json owns stdout: ORT's calibrators print progress, which must go to stderr."""
    capfd.readouterr()
    quantize_int8(student["src"], student["src"].with_name("model.int8.quiet.onnx"), iter(student["train"][:1]),
                  method="percentile", count=32)
    out, err = capfd.readouterr()
    assert out == ""
    assert "percentile" in err  # ORT's own progress line, moved


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DISTILLCTL_SLOW_TESTS"),
                    reason="the KL search over 2048 bins runs in Python, ~1 s per tensor; set DISTILLCTL_SLOW_TESTS=1")
def test_entropy_uses_2048_bins_not_minmax(student):
    """With ORT's default 128 bins entropy returns the min/max ranges unchanged; with 2048 it clips."""
    a = student["src"].with_name("model.int8.mm.onnx")
    b = student["src"].with_name("model.int8.kl.onnx")
    quantize_int8(student["src"], a, iter(student["train"]), method="minmax")
    quantize_int8(student["src"], b, iter(student["train"]), method="entropy")
    scales = lambda p: {t.name: float(numpy_helper.to_array(t)) for t in onnx.load(str(p)).graph.initializer
                        if t.name.endswith("_scale") and not t.dims}
    sa, sb = scales(a), scales(b)
    assert sum(abs(sa[k] - sb[k]) > 1e-6 * sa[k] for k in sa) > len(sa) / 2
