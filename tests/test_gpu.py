"""What only a CUDA device shows (marked ``gpu``; skipped without one). ``benchmarks/gpu_suite.py`` runs
these first on a GPU machine; its tiny CPU configuration runs here in every suite."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import RECIPES, run_cli

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_gpu_suite_tiny_on_cpu_writes_its_json(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_suite
    finally:
        sys.path.pop(0)
    out = tmp_path / "suite.json"
    doc = gpu_suite.main(["--tiny", "--device", "cpu", "--skip-tests", "--methods", "ce,kd,hcd", "--steps", "1",
                          "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["methods"].keys() == {"ce", "kd", "hcd"} == doc["methods"].keys()
    for r in saved["methods"].values():
        assert r["step_ms"] > 0 and r["img_s"] > 0 and r["tflop_per_step"] > 0
    assert saved["methods"]["kd"]["vs_kd"] == 1.0 and saved["targets"]["hcd_vs_kd (<= 1.15)"] > 0
    assert saved["data_path"]["ratio"] > 0
    assert saved["latency"]["onnxruntime_provider"] == "CPUExecutionProvider"
    assert {"1", "4"} <= set(saved["latency"]["torch"]) and {"1", "4"} <= set(saved["latency"]["onnxruntime"])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_training_step_with_autocast_and_channels_last(precision):
    from distillctl.compat import import_timm
    from distillctl.methods import build_method, registry
    from distillctl.methods.base import PairInfo
    from distillctl.models import InputView, probe
    from distillctl.recipe import TrainConfig
    from distillctl.train import make_step, train_step

    timm = import_timm()
    dev = torch.device("cuda")
    student = timm.create_model("resnet18", num_classes=10).to(dev)
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=10).to(dev)
    pair = PairInfo(10, probe(student, 224), probe(teacher, 224), label_smoothing=0.1)
    method = build_method("hcd", student, teacher, registry.get("hcd").Config(), pair).to(dev)
    view = InputView(224, (0.5,) * 3, (0.5,) * 3).to(dev)
    step = make_step(method, TrainConfig(epochs=1, precision=precision, channels_last=True), device=dev,
                     student_view=view, teacher_view=view, steps_per_epoch=10)
    x = torch.rand(16, 3, 224, 224, device=dev)
    y = torch.randint(0, 10, (16,), device=dev)
    before = student.conv1.weight.detach().clone()
    loss, terms = train_step(step, [(x, y)])
    assert torch.isfinite(loss) and set(terms) == {"loss_ce", "loss_kd", "loss_sdd", "loss_ol"}
    assert not torch.equal(before, student.conv1.weight)
    assert student.conv1.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@cuda
def test_distill_export_and_bench_on_cuda(tmp_path):
    r = run_cli("run", str(RECIPES / "ci_smoke.yaml"), "--device", "cuda", "--out", str(tmp_path / "run"),
                "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["parity"]["onnx"]["top1_agreement"] >= 0.99
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["device"].startswith("cuda")
    assert "torch" in doc["latency_ms"]
