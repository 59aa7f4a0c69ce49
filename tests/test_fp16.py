"""FP16 through ONNX Runtime's converter on a real CNN and a real ViT student (32 px, briefly trained on digits).

Measured on these students (notes/export.md): the converter's FP16 files agree with FP32 on every
digits val image, max |logit diff| about 1e-3 of the logit scale (test_resnet) and 4e-4 (test_vit):
20x and 50x inside the FP16 gate (2e-2 x logit scale, agreement >= 0.95) asserted here.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from distillctl.data import build_data
from distillctl.errors import BadInput, ExportFailed
from distillctl.export import onnx as onnx_format
from distillctl.export.fp16 import ConversionError, convert_float_to_float16, library_block_list
from distillctl.export.runtime import val_arrays
from distillctl.models import IMAGENET_MEAN, IMAGENET_STD, InputView
from distillctl.recipe import validate_raw

try:
    from exportkit import make_run, tiny_recipe, write_onnx
except ImportError:  # tests collected as a package
    from tests.exportkit import make_run, tiny_recipe, write_onnx

STUDENTS = {"cnn": ("test_resnet", 60), "vit": ("test_vit", 150)}
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


@pytest.fixture(scope="module")
def val():
    recipe = validate_raw(tiny_recipe("test_resnet"))  # the digits split every run here uses
    data = build_data(recipe.data, seed=0, device=torch.device("cpu"))
    pairs = list(val_arrays(data.val, InputView(recipe.data.image_size, IMAGENET_MEAN, IMAGENET_STD)))
    return np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])


@pytest.fixture(scope="module", params=sorted(STUDENTS))
def student(request, tmp_path_factory):
    model, steps = STUDENTS[request.param]
    run = make_run(tmp_path_factory.mktemp(f"fp16{request.param}") / "run", tiny_recipe(model), train_steps=steps)
    src = write_onnx(run, exporter="dynamo")
    dest = src.with_name("model.fp16.onnx")
    info = onnx_format.export_fp16(src, dest)
    return {"kind": request.param, "src": src, "dest": dest, "info": info}


def _logits(model, x):
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    return np.concatenate([sess.run(None, {"input": x[i:i + 128]})[0] for i in range(0, len(x), 128)])


def test_fp16_weights_fp32_io_and_metadata(student):
    src, dest, info = student["src"], student["dest"], student["info"]
    model = onnx.load(str(dest))
    onnx.checker.check_model(str(dest), full_check=True)
    assert {t.data_type for t in model.graph.initializer if t.data_type in FLOATS} == {onnx.TensorProto.FLOAT16}
    for vi in (model.graph.input[0], model.graph.output[0]):
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert vi.type.tensor_type.shape.dim[0].dim_param
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2  # only the input and output casts: no op had to stay float32
    assert info["kept_fp32_ops"] == [] and info["bytes"] < 0.65 * src.stat().st_size  # shapes/graph do not halve
    weight_bytes = lambda m, dt: sum(len(t.raw_data) for t in m.graph.initializer if t.data_type == dt)
    half_bytes = weight_bytes(model, onnx.TensorProto.FLOAT16)
    assert half_bytes > 100_000 and half_bytes * 2 == weight_bytes(onnx.load(str(src)), onnx.TensorProto.FLOAT)
    meta, meta32 = onnx_format.read_metadata(dest), onnx_format.read_metadata(src)
    assert meta["precision"] == "fp16" and meta["fp16_converter"].startswith("onnxruntime.transformers.float16")
    for key in ("recipe_hash", "architecture", "input_size", "mean", "num_classes"):
        assert meta[key] == meta32[key]
    assert meta32["precision"] == "fp32"  # the FP32 file is its own artifact, untouched


def test_fp16_parity_and_top1_on_digits(student, val):
    x, y = val
    ref, half = _logits(student["src"], x), _logits(student["dest"], x)
    scale = max(1.0, float(np.abs(ref).max()))
    rel = np.abs(half - ref).max() / scale
    assert 1e-6 < rel < 2e-2  # really float16 (not a copy), inside the FP16 gate; measured ~1e-3 / 4e-4
    assert rel < 5e-3  # and with the margin measured
    assert (half.argmax(1) == ref.argmax(1)).mean() >= 0.95
    top1_32, top1_16 = (ref.argmax(1) == y).mean(), (half.argmax(1) == y).mean()
    assert top1_32 > 0.8 and abs(top1_16 - top1_32) <= 0.005  # trained; measured: identical


def test_keep_fp32_ops_run_between_casts(student, val):
    """The fallback for a missing float16 kernel: the op computes in float32, weights still stored as float16."""
    keep = "MatMul" if student["kind"] == "vit" else "Conv"
    src = onnx.load(str(student["src"]))
    half = convert_float_to_float16(src, {keep})
    producers = {o: n for n in half.graph.node for o in n.output}
    inits = {t.name: t.data_type for t in half.graph.initializer}
    kept = [n for n in half.graph.node if n.op_type == keep]
    assert kept
    for node in kept:
        for name in node.input:
            if not name:
                continue
            p = producers[name]
            assert p.op_type == "Cast" and p.attribute[0].i == onnx.TensorProto.FLOAT
            assert inits.get(p.input[0], onnx.TensorProto.FLOAT16) == onnx.TensorProto.FLOAT16
    x = val[0][:64]
    a, b = _logits(src.SerializeToString(), x), _logits(half.SerializeToString(), x)
    assert np.abs(a - b).max() < 2e-2 * max(1.0, np.abs(a).max())
    assert "TopK" in library_block_list() and "Range" in library_block_list()  # ORT's own defaults stay blocked


def test_converter_leaves_the_callers_proto_alone(student):
    src = onnx.load(str(student["src"]))
    before = src.SerializeToString()
    convert_float_to_float16(src)
    assert src.SerializeToString() == before


def test_graphs_with_local_functions_are_refused(student):
    src = onnx.load(str(student["src"]))
    src.functions.add().CopyFrom(onnx.helper.make_function("local", "f", ["a"], ["b"],
                                                           [onnx.helper.make_node("Identity", ["a"], ["b"])],
                                                           [onnx.helper.make_opsetid("", 20)]))
    with pytest.raises(ConversionError, match="local functions"):
        convert_float_to_float16(src)


def test_fp16_refuses_to_overwrite_other_artifacts(student, tmp_path):
    src, dest = student["src"], student["dest"]
    with pytest.raises(BadInput, match="would overwrite its FP32 source"):
        onnx_format.export_fp16(src, src)
    with pytest.raises(BadInput, match="is a fp16 model"):
        onnx_format.export_fp16(dest, tmp_path / "model.fp16.onnx")
    int8ish = tmp_path / "model.int8.onnx"
    proto = onnx.load(str(src))
    onnx_format._set_metadata(proto, {**onnx_format.metadata_of(proto), "precision": "int8"})
    onnx.save(proto, str(int8ish))
    with pytest.raises(BadInput, match="holds the int8 artifact"):
        onnx_format.export_fp16(src, int8ish)
    with pytest.raises(BadInput, match="not found"):
        onnx_format.export_fp16(tmp_path / "absent.onnx", tmp_path / "model.fp16.onnx")


def test_fp16_export_of_an_unconvertible_graph_is_exit_5(student, tmp_path):
    src = onnx.load(str(student["src"]))
    src.functions.add().CopyFrom(onnx.helper.make_function("local", "f", ["a"], ["b"],
                                                           [onnx.helper.make_node("Identity", ["a"], ["b"])],
                                                           [onnx.helper.make_opsetid("", 20)]))
    bad = tmp_path / "model.onnx"
    onnx.save(src, str(bad))
    with pytest.raises(ExportFailed) as info:
        onnx_format.export_fp16(bad, tmp_path / "model.fp16.onnx")
    assert info.value.exit_code == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # nothing under the final name
