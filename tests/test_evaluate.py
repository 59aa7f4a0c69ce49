"""evaluate_target over every kind of target, on a real student and real ONNX Runtime."""
from __future__ import annotations

import shutil

import onnx
import pytest

from distillctl.errors import BadInput, MissingCapability
from distillctl.evaluate import evaluate_target
from distillctl.export import trt as trt_format
from distillctl.run import RECIPE_FILE, set_latest

try:
    from exportkit import make_run, tiny_recipe, write_onnx
except ImportError:  # tests collected as a package
    from tests.exportkit import make_run, tiny_recipe, write_onnx


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("eval") / "run", tiny_recipe(), train_steps=10)
    write_onnx(run)
    return run


@pytest.fixture(scope="module")
def reference(run):
    return evaluate_target(str(run), device="cpu")


def test_run_folder_is_the_pytorch_student(reference, run):
    assert reference["format"] == "torch" and reference["target"] == str(run)
    m = reference["metrics"]
    assert m["n"] == 359  # the digits val split (20% of 1797, stratified)
    assert 0.0 <= m["top1"] <= m["top5"] <= 1.0
    assert reference["recipe_hash_match"] is True


@pytest.mark.parametrize("rel, fmt", [("export/model.onnx", "onnx"), ("student/model.safetensors", "safetensors"),
                                      ("student", "safetensors")])
def test_every_target_kind_scores_the_same(run, reference, rel, fmt):
    res = evaluate_target(str(run / rel), device="cpu")
    assert res["format"] == fmt
    assert res["metrics"]["n"] == reference["metrics"]["n"]
    assert res["metrics"]["top1"] == pytest.approx(reference["metrics"]["top1"], abs=1 / 359)
    assert res["metrics"]["top5"] == pytest.approx(reference["metrics"]["top5"], abs=1 / 359)
    if fmt == "onnx":
        assert res["provider"] == "CPUExecutionProvider"  # the provider that actually ran


def test_default_target_is_runs_latest(run, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLCTL_RUNS", str(tmp_path / "runs"))
    set_latest(run)
    res = evaluate_target(None, device="cpu")
    assert res["format"] == "torch" and res["metrics"] == reference["metrics"]


def test_onnx_outside_a_run_needs_the_recipe(run, reference, tmp_path):
    lone = tmp_path / "student.onnx"
    shutil.copy(run / "export" / "model.onnx", lone)
    with pytest.raises(BadInput) as info:
        evaluate_target(str(lone), device="cpu")
    assert info.value.exit_code == 2 and "--recipe" in info.value.message
    res = evaluate_target(str(lone), recipe=str(run / RECIPE_FILE), device="cpu")
    assert res["metrics"]["top1"] == pytest.approx(reference["metrics"]["top1"], abs=1 / 359)


def test_onnx_without_our_metadata_is_bad_input(run, tmp_path):
    model = onnx.load(str(run / "export" / "model.onnx"))
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    with pytest.raises(BadInput) as info:
        evaluate_target(str(foreign), recipe=str(run / RECIPE_FILE), device="cpu")
    assert "metadata_props" in info.value.message


def test_class_count_mismatch_is_bad_input(run, tmp_path):
    import yaml

    raw = yaml.safe_load((run / RECIPE_FILE).read_text())
    raw["data"] = {**raw["data"], "dataset": "synthetic", "num_classes": 4, "synthetic_size": 64}
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    with pytest.raises(BadInput) as info:
        evaluate_target(str(run / "export" / "model.onnx"), recipe=str(other), device="cpu")
    assert "10 classes" in info.value.message


def test_missing_and_unknown_targets(tmp_path):
    with pytest.raises(BadInput):
        evaluate_target(str(tmp_path / "nope.onnx"))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(BadInput):
        evaluate_target(str(tmp_path / "weights.bin"))


@pytest.mark.skipif(trt_format.probe().get("usable", False), reason="TensorRT and CUDA are present")
def test_engine_without_tensorrt_is_exit_4(run):
    engine = run / "export" / "model.engine"
    engine.write_bytes(b"not a plan")
    try:
        with pytest.raises(MissingCapability) as info:
            evaluate_target(str(engine))
    finally:
        engine.unlink()
    assert info.value.exit_code == 4 and "distillctl[tensorrt]" in info.value.message
