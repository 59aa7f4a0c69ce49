"""TensorRT engines (on a machine with TensorRT and CUDA), exit 4 without them, and doctor's capability report."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distillctl.errors import MissingCapability
from distillctl.export import trt as trt_format
from distillctl.export import export_run
from distillctl.run import Run

try:
    from exportkit import make_run, tiny_recipe
except ImportError:  # tests collected as a package
    from tests.exportkit import make_run, tiny_recipe

HAVE_TRT = trt_format.probe().get("usable", False)
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT and a CUDA device")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("trt") / "run", tiny_recipe(), train_steps=10 if HAVE_TRT else 0)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT and CUDA are present")
def test_trt_export_without_tensorrt_is_exit_4_before_any_work(run):
    with pytest.raises(MissingCapability) as info:
        export_run(Run.open(run), ["trt"])
    assert info.value.exit_code == 4
    assert "pip install 'distillctl[tensorrt]'" in info.value.message or "CUDA" in info.value.message
    assert not (run / "export").exists()  # failed before the ONNX export


def test_doctor_reports_what_loads():
    from distillctl.doctor import doctor_report

    rep = doctor_report()
    ort = rep["onnxruntime"]
    assert ort["loads"]["CPUExecutionProvider"] is True
    assert set(ort["loads"]) == set(ort["available_providers"])
    # a listed GPU provider that cannot load is reported as such, with the reason
    for prov, ok in ort["loads"].items():
        if not ok:
            assert prov in ort["fallbacks"]
    assert rep["summary"]["cuda"] == torch.cuda.is_available()
    assert rep["tensorrt"]["installed"] or rep["tensorrt"]["hint"] == trt_format.INSTALL_HINT
    assert isinstance(rep["torchvision_shim_patched"], bool)
    json.dumps(rep)  # the --json document


@needs_trt
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_build_parity_and_sidecar(run, precision):
    import tensorrt as trt

    res = export_run(Run.open(run), ["trt"], precision=precision, dynamic_batch="1:4:16", device="auto")
    engine = res["artifacts"]["trt"]
    side = json.loads(open(res["artifacts"]["trt_sidecar"]).read())
    assert side["tensorrt"] == trt.__version__ and side["gpu"] and side["precision"] == precision
    assert side["profile"]["input"] == {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [16, 3, 32, 32]}
    # a plain plan: standard TensorRT deserialises the file as it is
    blob = open(engine, "rb").read()
    assert trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(blob) is not None
    p = res["parity"]["trt"]
    if precision == "fp32":
        assert p["max_abs_diff"] < 1e-3 and p["top1_agreement"] == 1.0
    else:
        assert p["top1_agreement"] >= 0.99
    # batches 1 and 7 inside the profile, 40 beyond it (chunked by the runner)
    runner = trt_format.TrtPredictor(engine)
    x = np.random.default_rng(0).standard_normal((40, 3, 32, 32)).astype(np.float32)
    ref = trt_format.TrtPredictor(engine)(x)
    assert ref.shape == (40, 10)
    for b in (1, 7):
        assert np.abs(runner(x[:b]) - ref[:b]).max() < 1e-3


@needs_trt
@pytest.mark.tensorrt
def test_timing_cache_is_reused(run):
    export_run(Run.open(run), ["trt"], device="auto")
    res = export_run(Run.open(run), ["trt"], device="auto")
    assert res["details"]["trt"]["timing_cache_reused"] is True


@needs_trt
@pytest.mark.tensorrt
def test_bench_and_eval_of_an_engine(run):
    from distillctl.evaluate import evaluate_target
    from distillctl.export.bench import run_bench

    export_run(Run.open(run), ["trt"], dynamic_batch="1:8:32", device="auto")
    engine = Run.open(run).engine()
    ev = evaluate_target(str(engine))
    assert ev["format"] == "trt" and ev["provider"].startswith("TensorRT")
    res = run_bench([str(run)], backends=["torch", "onnxruntime", "trt"], batch_sizes=[1, 32], iters=20)
    assert set(res["latency_ms"]["trt"]) == {"1", "32"}
