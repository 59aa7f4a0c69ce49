"""The latency harness on a real run folder: PyTorch eager vs ONNX Runtime, files, chart, model card."""
from __future__ import annotations

import os
import time

import pytest

from distillctl.errors import BadInput, MissingCapability
from distillctl.export import trt as trt_format
from distillctl.export.bench import run_bench, summarize
from distillctl.run import BENCH_JSON, BENCH_PNG, CURVES_PNG, Run
from distillctl.export.card import write_model_card

try:
    from exportkit import make_run, read_json, tiny_recipe, write_onnx
except ImportError:  # tests collected as a package
    from tests.exportkit import make_run, read_json, tiny_recipe, write_onnx

NO_TRT = not trt_format.probe().get("usable", False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("bench") / "run", tiny_recipe(), train_steps=4)
    write_onnx(run)
    return run


@pytest.fixture(scope="module")
def bench(run):
    return run_bench([str(run)], batch_sizes=[1, 4], warmup=2, iters=12, threads=1, device="cpu")


def test_latency_document_shape(bench):
    assert set(bench["latency_ms"]) == {"torch", "onnxruntime"}  # the recipe's bench.backends
    for fmt, per in bench["latency_ms"].items():
        assert set(per) == {"1", "4"}  # JSON keys are strings
        for b, s in per.items():
            assert 0 < s["p50"] <= s["p90"] <= s["p99"]
            assert s["mean"] > 0
            # throughput is batch x calls / total time, i.e. batch / mean latency
            assert bench["throughput_img_s"][fmt][b] == pytest.approx(int(b) * 1e3 / s["mean"], rel=1e-3)
    assert bench["providers"]["onnxruntime"] == "CPUExecutionProvider"
    assert bench["providers"]["torch"] == "torch-cpu"
    assert bench["device"]["type"] == "cpu" and bench["device"]["threads"] == 1
    assert {"torch", "onnxruntime", "timm"} <= set(bench["versions"])
    load = bench["load"]
    assert load["threads"] == bench["settings"]["threads"] and {"before", "after", "p90_over_p50"} <= set(load)
    if load["contaminated"]:  # another process disturbed the timing: no ratio is claimed from it
        assert bench["speedup_vs_torch_p50"] == {} and load["reasons"]
    else:
        sp = bench["speedup_vs_torch_p50"]["onnxruntime"]
        t, o = bench["latency_ms"]["torch"]["1"]["p50"], bench["latency_ms"]["onnxruntime"]["1"]["p50"]
        assert sp["1"] == pytest.approx(t / o, rel=1e-2)
    assert bench["settings"]["iters"] == 12 and bench["settings"]["rounds"] == 5
    assert bench["settings"]["min_warmup_s"] == 0.02  # the recipe's bench.warmup_s


def test_the_table_names_the_thread_count_in_words(bench, capsys):
    from distillctl.export.bench import print_table

    print_table(bench)  # measured with threads=1
    err = capsys.readouterr().err
    assert "(1 thread)" in err and "1 threads" not in err and "onnxruntime" in err
    print_table({**bench, "device": {**bench["device"], "threads": 2}})
    assert "(2 threads)" in capsys.readouterr().err


def test_warmup_s_is_honoured():
    """bench.warmup_s is the least warm-up time per backend: calls keep coming until it has passed."""
    from distillctl.export import bench as bench_mod

    calls = []

    def call():
        calls.append(warmup_s)
        time.sleep(0.002)

    for warmup_s in (0.0, 0.05):
        bench_mod.measure_interleaved({"f": call}, warmup=1, iters=1, min_warmup_s=warmup_s)
    assert calls.count(0.0) == 2  # one warm-up call, one timed
    assert calls.count(0.05) >= 10  # 0.05 s of 2 ms calls


def test_files_written_into_the_run(bench, run):
    doc = read_json(run / BENCH_JSON)
    assert doc["latency_ms"] == bench["latency_ms"]
    png = (run / BENCH_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert bench["files"][run.name]["chart"] == str(run / BENCH_PNG)


def test_onnx_file_target(run):
    res = run_bench([str(run / "export" / "model.onnx")], batch_sizes=[2], warmup=1, iters=5, threads=1, device="cpu")
    assert list(res["latency_ms"]) == ["onnxruntime"] and list(res["latency_ms"]["onnxruntime"]) == ["2"]


def test_missing_artifact_is_skipped_with_reason(run, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("export"))
    res = run_bench([str(bare)], batch_sizes=[1], warmup=1, iters=3, threads=1, device="cpu")
    assert list(res["latency_ms"]) == ["torch"]
    assert "distillctl export" in res["skipped"]["onnxruntime"]


@pytest.mark.skipif(not NO_TRT, reason="TensorRT and CUDA are present")
def test_trt_asked_for_without_tensorrt_is_exit_4(run):
    with pytest.raises(MissingCapability) as info:
        run_bench([str(run)], backends=["trt"], batch_sizes=[1], iters=2)
    assert info.value.exit_code == 4 and "distillctl[tensorrt]" in info.value.message


def test_bad_options(run):
    with pytest.raises(BadInput):
        run_bench([str(run)], backends=["tflite"])
    with pytest.raises(BadInput):
        run_bench([str(run)], batch_sizes=[0])


def test_interleaved_blocks_give_every_backend_iters_calls():
    from distillctl.export.bench import measure_interleaved

    calls = []
    times = measure_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                warmup=1, iters=7, min_warmup_s=0.0)
    assert [len(v) for v in times.values()] == [7, 7]
    from itertools import groupby

    from distillctl.export.bench import REWARM_CALLS

    body = calls[2:]  # after one warm-up call each: alternating blocks of re-warm calls + at most 2 timed calls
    blocks = [(name, len(list(g))) for name, g in groupby(body)]
    assert [name for name, _ in blocks] == ["a", "b"] * 4  # 7 calls in blocks of 2: four blocks each
    assert all(n >= REWARM_CALLS + 1 for _, n in blocks)  # every block re-warms before it is timed


def test_summarize_numbers():
    s = summarize([1.0, 2.0, 3.0, 4.0], batch=2)
    assert s["p50"] == 2.5 and s["mean"] == 2.5 and s["min"] == 1.0
    assert s["p90"] == pytest.approx(3.7) and s["p99"] == pytest.approx(3.97)
    assert s["throughput_img_s"] == pytest.approx(800.0)  # 2 images x 4 calls / 10 ms


def test_model_card(bench, run):
    from distillctl.files import atomic_write_json

    atomic_write_json(run / BENCH_JSON, bench)  # other tests here re-bench the same run
    card = write_model_card(Run.open(run)).read_text()
    assert "# resnet18" in card and "`ce`" in card
    assert "| torch | torch-cpu | 1 |" in card and "| onnxruntime | CPUExecutionProvider | 4 |" in card
    assert "Hardware:" in card and f"![latency]({BENCH_PNG})" in card
    assert f"![training curves]({CURVES_PNG})" in card
    assert (run / CURVES_PNG).read_bytes()[:4] == b"\x89PNG"
    assert "Not exported yet" in card  # no export.json in this run


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DISTILLCTL_SLOW_TESTS"),
                    reason="inductor compiles resnet18 for minutes on a small CPU; set DISTILLCTL_SLOW_TESTS=1")
def test_torch_compile_measured_or_skipped_with_reason(run):
    res = run_bench([str(run)], backends=["torch_compile"], batch_sizes=[1], warmup=1, iters=3, threads=1, device="cpu")
    assert "torch_compile" in res["latency_ms"] or res["skipped"]["torch_compile"]


def test_interference_is_flagged_from_load_and_spread():
    from distillctl.export.bench import interference

    quiet = {"cores": 2, "busy_cores": 0.1, "loadavg_1m": 0.2}
    busy = {"cores": 2, "busy_cores": 1.0, "loadavg_1m": 1.5}
    tight = {"torch": {"1": {"p50": 10.0, "p90": 11.0}}}
    wide = {"torch": {"1": {"p50": 10.0, "p90": 20.0}}}
    assert interference(tight, quiet, quiet, threads=2)["contaminated"] is False
    r = interference(tight, busy, quiet, threads=2)
    assert r["contaminated"] and "busy elsewhere before" in r["reasons"][0]
    assert interference(tight, busy, busy, threads=1)["contaminated"] is False  # a free core was left for it
    r = interference(wide, quiet, quiet, threads=2)
    assert r["contaminated"] and r["p90_over_p50"] == {"torch[1]": 2.0}


def _lowdata():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import lowdata
    finally:
        sys.path.pop(0)
    return lowdata


def test_lowdata_results_of_separate_processes_merge_into_one_paired_table():
    lowdata = _lowdata()
    setting = {"dataset": "digits", "per_class": 10, "seeds": 2, "teacher": "t", "student": "s", "image_size": 16,
               "epochs": 60, "init": "reference", "overrides": []}

    def part(methods):
        return {"setting": dict(setting), "teacher_top1": 0.98, "total_s": 10.0, "teacher_s": 1.0,
                "methods": {m: {"top1": v, "status": ["ok" if x else "Collapsed" for x in v]} for m, v in methods.items()}}

    merged = lowdata.merge_results([part({"ce": [0.90, 0.94], "kd": [0.95, 0.97]}),
                                    part({"ce": [0.90, 0.94], "hcd": [0.96, None]})])
    assert list(merged["methods"]) == ["ce", "kd", "hcd"] and merged["total_s"] == 20.0
    assert merged["methods"]["kd"]["vs_ce_mean"] == pytest.approx(0.04)
    assert merged["methods"]["hcd"]["vs_ce_mean"] == pytest.approx(0.06)  # only the seed where both finished
    other = part({"ce": [0.9, 0.9]})
    other["setting"]["init"] = "pytorch"
    with pytest.raises(SystemExit, match="init"):
        lowdata.merge_results([part({"ce": [0.9, 0.9]}), other])


def test_end_summary_gives_the_ratio_only_from_a_clean_measurement_and_says_why_not():
    from distillctl.report import summary_text

    lat = {"torch": {"1": {"p50": 5.0}}, "onnxruntime": {"1": {"p50": 0.5}}}
    clean = summary_text({"latency_ms": lat, "load": {"contaminated": False}})
    assert "latency: onnxruntime batch 1 p50 0.50 ms, 10.0x PyTorch eager" in clean
    why = "p90/p50 > 1.5 in onnxruntime[1] (2.05)"
    dirty = summary_text({"latency_ms": lat, "load": {"contaminated": True, "reasons": [why]}})
    assert "x PyTorch eager" not in dirty and f"latency ratios are not reported: {why}" in dirty
