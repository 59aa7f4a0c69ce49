"""The command line as users and CI pipelines see it: exit codes, --json, kill/resume, torchrun.

Commands run in this process (``run_cli``) unless a separate process is the point: a fresh interpreter for
import cost, SIGTERM in training and the torchrun launcher; a forked one (``Forked``) for two ranks."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import RECIPES, Forked, cli, run_cli

SMOKE = str(RECIPES / "ci_smoke.yaml")


def test_help_does_not_import_torch():
    code = "import sys, distillctl.cli; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    assert out == ["False", "False"]


def test_version_and_shell_completion():
    from distillctl import __version__

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"distillctl {__version__}"
    # Typer detects the shell from the process tree unless told not to; under a worker with no shell above it
    # (nohup, some CI runners) detection fails, so the shell is named and detection is switched off
    r = cli("--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}, timeout=60)
    assert r.returncode == 0 and "complete" in r.stdout and "distillctl" in r.stdout.lower(), r.stderr[-2000:]


def test_misspelt_key_exits_2_with_suggestion(tmp_path):
    p = run_cli("validate", SMOKE, "--set", "train.epoch=3", "--json")
    assert p.returncode == 2
    doc = json.loads(p.stdout)
    assert doc["status"] == "error" and doc["exit_code"] == 2 and doc["command"] == "validate"
    assert "train.epoch" in doc["error"] and "train.epochs" in doc["error"]
    assert "Traceback" not in p.stderr and "did you mean 'train.epochs'" in p.stderr


def test_missing_weights_exit_2(tmp_path):
    p = run_cli("distill", SMOKE, "--set", "teacher.weights=/nonexistent/t.safetensors", "--out", str(tmp_path / "r"),
                "--json")
    assert p.returncode == 2, p.stderr
    assert "not found" in json.loads(p.stdout)["error"]
    assert "Traceback" not in p.stderr


def test_cuda_absent_exit_4(tmp_path, teacher_weights):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    p = run_cli("distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", "--device", "cuda",
                "--out", str(tmp_path / "r"))
    assert p.returncode == 4 and "CUDA" in p.stderr
    assert not (tmp_path / "r").exists()  # refused before the folder was touched


def test_methods_json_lists_every_method():
    p = run_cli("methods", "--json")
    doc = json.loads(p.stdout)
    names = [m["name"] for m in doc["methods"]]
    assert {"ce", "kd"} <= set(names)
    kd = next(m for m in doc["methods"] if m["name"] == "kd")
    assert kd["params"] == {"temperature": 4.0, "w_ce": 0.1, "w_kd": 0.9} and "Hinton" in kd["paper"]


def test_distill_json_document_and_strict_student(tmp_path, teacher_weights):
    run = tmp_path / "run"
    p = run_cli("distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", "--out", str(run), "--json",
                cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # exactly one document, nothing else on stdout
    assert doc["command"] == "distill" and doc["status"] == "ok" and doc["exit_code"] == 0
    assert 0.0 <= doc["metrics"]["student_top1"] <= 1.0 and "teacher_top1" in doc["metrics"]
    assert Path(doc["artifacts"]["checkpoint"]).is_file()
    # run folder contents per the contract
    for f in ("recipe.yaml", "manifest.json", "metrics.jsonl", "checkpoint.pt", "student/model.safetensors",
              "student/config.json"):
        assert (run / f).is_file(), f
    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "completed" and man["seed"] == 0 and "torch" in man["versions"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_kd" in r and "loss_ce" in r and "lr" in r and "img_s" in r for r in rows)
    assert any("top1" in r and "top5" in r for r in rows)
    assert (tmp_path / "runs" / "latest").resolve() == run.resolve()
    # the student is the bare timm architecture
    from safetensors.torch import load_file

    from distillctl.compat import import_timm

    fresh = import_timm().create_model("resnet10t", num_classes=10, channels=(32, 64, 128, 256))  # ci_smoke's
    fresh.load_state_dict(load_file(str(run / "student" / "model.safetensors")), strict=True)


def _wait_for(pred, timeout=240, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def _ckpt_epoch(run):
    from distillctl.run import Run

    try:
        return Run(run).load_checkpoint()["epoch"]
    except Exception:
        return -1


def _popen(*args, cwd):
    env = dict(os.environ, CI="true")
    return subprocess.Popen([sys.executable, "-m", "distillctl.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


LONG = ["--set", "train.epochs=3", "--set", "data.synthetic_size=800", "--set", "train.log_every=2"]


def test_sigterm_writes_checkpoint_and_exits_130(tmp_path, teacher_weights):
    run = tmp_path / "run"
    args = ["distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", *LONG, "--out", str(run)]
    p = _popen(*args, "--json", cwd=tmp_path)
    assert _wait_for(lambda: (run / "metrics.jsonl").is_file(), proc=p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    doc = json.loads(out)
    assert doc["exit_code"] == 130 and "--resume" in doc["error"]
    from distillctl.run import Run

    st = Run(run).load_checkpoint()
    assert st["step"] > 0 or st["epoch"] > 0
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"


def _torchrun(*args, cwd):
    env = dict(os.environ, CI="true", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "distillctl.cli", *args, "--device", "cpu"], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_ranks_agree_on_early_stopping(tmp_path, teacher_weights):
    """Rank 0 decides early stopping; every rank must stop at the same epoch (else gloo errors / NCCL hangs).

    The two ranks are started as torchrun starts its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT
    in the environment), as forked processes; the launcher itself is tested by the next test."""
    run = tmp_path / "run"
    args = ["distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", "--set", "train.epochs=5",
            "--set", "train.lr=1e-9", "--set", "train.early_stop_patience=1", "--out", str(run), "--device", "cpu"]
    port = str(_free_port())
    ranks = [Forked(*args, cwd=tmp_path, env={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                             "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in (0, 1)]
    try:
        codes = [p.wait(timeout=300) for p in ranks]
    finally:
        for p in ranks:  # a rank left waiting in a collective by a failing peer does not outlive the test
            p.kill()
    assert codes == [0, 0], [p.stderr_text[-3000:] for p in ranks]
    stderr = ranks[0].stderr_text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # each rank takes half of the 260-image training split: 4 steps of 32 per epoch instead of 8
    steps = [r["step"] for r in rows if "step" in r]
    assert max(steps) == 4
    epochs = [r["epoch"] for r in rows if "top1" in r]  # lr 1e-9: only BN statistics move, gains stop soon
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) < 5
    assert f"early stop after epoch {len(epochs)}" in stderr
    assert (run / "student" / "model.safetensors").is_file()


def test_torchrun_run_trains_the_teacher_then_exports_on_rank_0(tmp_path):
    run = tmp_path / "run"
    p = _torchrun("run", SMOKE, "--set", "data.synthetic_size=160", "--set", "bench.iters=3",
                  "--set", "bench.batch_sizes=[1]", "--out", str(run), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "completed" and set(m["stages"].values()) == {"completed"}
    assert (run / "teacher" / "model.safetensors").is_file() and (run / "export" / "model.onnx").is_file()
    assert p.stderr.count("export 3/4") == 1  # export, bench and the card ran once, on rank 0
