"""The run folder as one owner keeps it: resume from the folder alone, refusals that change nothing,
interrupts in every stage of `run`, ordinary file modes, robust reads of damaged files, `latest`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from conftest import RECIPES, run_cli, snapshot

SMOKE = str(RECIPES / "ci_smoke.yaml")
# a few seconds per run: 2 steps per epoch, tiny data
TINY = ["--set", "data.synthetic_size=96", "--set", "train.max_steps_per_epoch=2", "--set", "train.log_every=1",
        "--set", "teacher.train.max_steps_per_epoch=2", "--set", "teacher.train.log_every=1"]


def _distill(tmp_path, teacher_weights, *extra, out="run"):
    return run_cli("distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", *TINY, *extra,
                   "--out", str(tmp_path / out), "--json", cwd=tmp_path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher_weights):
    """A completed distill run (2 epochs) in its own folder."""
    tmp = tmp_path_factory.mktemp("finished")
    r = _distill(tmp, teacher_weights, "--set", "train.epochs=2")
    assert r.returncode == 0, r.stderr
    return tmp / "run"


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _exactly_once(run: Path, epochs: int, steps: int) -> None:
    rows = _rows(run)
    step_rows = [(r["epoch"], r["step"]) for r in rows if "step" in r]
    epoch_rows = [r["epoch"] for r in rows if "top1" in r]
    assert step_rows == [(e, s) for e in range(1, epochs + 1) for s in range(1, steps + 1)]
    assert epoch_rows == list(range(1, epochs + 1))


# ----------------------------------------------------------------------------- resume


def test_refused_resume_leaves_the_folder_byte_identical(finished, tmp_path):
    before = snapshot(finished)
    r = run_cli("distill", "--resume", str(finished), "--set", "train.epochs=31", "--json", cwd=tmp_path)
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    assert "train.epochs" in doc["error"] and "--amend" in doc["error"]
    # a recipe file that is not the run's, resumed into the run
    r = run_cli("distill", str(RECIPES / "quickstart.yaml"), "--resume", "--out", str(finished), cwd=tmp_path)
    assert r.returncode == 2 and "differs" in r.stderr
    assert snapshot(finished) == before
    assert _manifest(finished)["status"] == "completed"


def test_resume_from_the_folder_alone_and_latest(finished, tmp_path, teacher_weights):
    r = run_cli("distill", "--resume", str(finished), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "the run was already finished (2 of 2 epochs)" in r.stderr and "epoch 3/2" not in r.stderr
    _exactly_once(finished, epochs=2, steps=2)
    # the natural guess: the recipe it was made with (+ the same overrides), resolved against runs/latest
    assert (tmp_path / "runs" / "latest").resolve() == finished.resolve()  # the resume did real work
    r = run_cli("distill", SMOKE, "--resume", "--set", f"teacher.weights={teacher_weights}", *TINY,
                "--set", "train.epochs=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_resume_of_another_commands_run_says_which(finished, tmp_path):
    r = run_cli("train", "--resume", str(finished), cwd=tmp_path)
    assert r.returncode == 2 and "distillctl distill --resume" in r.stderr


def test_amend_changes_lr_and_is_recorded(tmp_path, teacher_weights):
    r = _distill(tmp_path, teacher_weights, "--set", "train.schedule=constant")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    r = run_cli("distill", "--resume", str(run), "--set", "train.lr=0.01", "--set", "train.epochs=2", "--amend",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = _manifest(run)
    assert m["amendments"][-1]["changes"] == {"train.epochs": [1, 2], "train.lr": [0.05, 0.01]}
    assert m["recipe_hash"] == m["amendments"][-1]["to_hash"]
    _exactly_once(run, epochs=2, steps=2)
    lrs = {r["epoch"]: r["lr"] for r in _rows(run) if "step" in r}
    assert lrs[1] == pytest.approx(0.05) and lrs[2] == pytest.approx(0.01)  # the amended lr is the one in force
    # what would change the model is never amendable
    r = run_cli("distill", "--resume", str(run), "--set", "student.model=resnet18", "--amend", cwd=tmp_path)
    assert r.returncode == 2 and "student.model" in r.stderr


def test_resume_with_no_checkpoint_starts_from_the_beginning(tmp_path, teacher_weights):
    from distillctl.flows import prepare
    from distillctl.recipe import load_recipe

    recipe = load_recipe(SMOKE, [f"teacher.weights={teacher_weights}"])
    run = prepare("distill", SMOKE, overrides=[f"teacher.weights={teacher_weights}"], out=str(tmp_path / "run"))
    with run.writing():
        run.create("distill")  # a run killed before its first checkpoint
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 1, "step": 1, "global_step": 1, "loss": 1.0}\n')
    assert recipe.hash() == run.recipe.hash()
    r = run_cli("distill", "--resume", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "has no checkpoint yet, so the run starts from the beginning" in r.stderr
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows if "step" in r] == [5, 8]  # logged every 5 of 8 steps; the stale row gone


# ----------------------------------------------------------------------------- run: every stage


def _watch(pred, sig=signal.SIGINT, timeout=180):
    """Send ``sig`` to this process once ``pred()`` holds (a real signal, delivered to the main thread)."""
    fired = threading.Event()

    def loop():
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                ok = pred()
            except (OSError, ValueError):
                ok = False
            if ok:
                fired.set()
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.01)

    threading.Thread(target=loop, daemon=True).start()
    return fired


def _stage(run: Path, name: str) -> bool:
    return _manifest(run).get("stages", {}).get(name) == "running"


RUN_TINY = TINY + ["--set", "teacher.train.epochs=3", "--set", "bench.iters=50", "--set", "bench.batch_sizes=[1,8]",
                   "--set", "export.formats=[safetensors,onnx]"]


STAGE_STARTED = {
    "teacher": lambda run: (run / "teacher" / "metrics.jsonl").is_file(),
    "distill": lambda run: (run / "metrics.jsonl").is_file(),
    "export": lambda run: _stage(run, "export"),
    "bench": lambda run: _stage(run, "bench"),
}


def test_interrupt_in_each_run_stage_then_run_resume(tmp_path):
    """Ctrl-C in the teacher, distill, export and bench stages in turn; each `run --resume` continues the
    interrupted stage; the finished folder is what one uninterrupted run leaves."""
    run = tmp_path / "run"
    args = ["run", SMOKE, *RUN_TINY, "--out", str(run), "--json"]
    for stage, started in STAGE_STARTED.items():
        fired = _watch(lambda: started(run))
        r = run_cli(*args, cwd=tmp_path)
        assert fired.is_set(), f"{stage}: the stage ended before the signal was sent"
        assert r.returncode == 130, (stage, r.stderr[-2000:])
        doc = json.loads(r.stdout)
        assert f"distillctl run --resume {run}" in doc["error"]
        m = _manifest(run)
        assert m["status"] == "interrupted" and m["stages"][stage] == "interrupted", (stage, m["stages"])
        if stage == "teacher":  # latest is the run, never its nested teacher
            assert (tmp_path / "runs" / "latest").resolve() == run.resolve()
        assert not list(run.rglob(".*tmp*")) and not list(run.rglob("*.staged.*"))
        args = ["run", "--resume", "--json"]  # RUN defaults to runs/latest
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = _manifest(run)
    assert m["status"] == "completed" and set(m["stages"].values()) == {"completed"}
    _exactly_once(run, epochs=1, steps=2)
    assert (run / "export" / "model.onnx").is_file() and (run / "bench.json").is_file()
    assert (run / "teacher" / "model.safetensors").is_file()  # the teacher's weights live in teacher/


# ----------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    """One finished `run` (teacher, distill, export, bench, card) and the recipe reads it made.

    Tests read it as it is; a test that changes a run works on a copy (``shutil.copytree``): the folder is
    self-contained (the teacher is found as RUN/teacher, no absolute paths), so a copy is a run of its own.
    """
    import distillctl.recipe as recipe_mod

    tmp = tmp_path_factory.mktemp("complete")
    reads = []
    real = recipe_mod.read_raw

    def counting(path):
        reads.append(Path(path).resolve())
        return real(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipe_mod, "read_raw", counting)
        r = run_cli("run", SMOKE, *RUN_TINY, "--set", "bench.iters=3", "--out", str(tmp / "run"), cwd=tmp)
    assert r.returncode == 0, r.stderr
    return tmp / "run", reads


def test_files_are_written_0644_and_card_paths_are_relative(complete_run, tmp_path):
    made, _ = complete_run
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in made.rglob("*") if p.is_file()]
    assert len(files) > 10
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p
    card = (made / "MODEL_CARD.md").read_text()
    assert str(made.parent) not in card and "](bench.png)" in card and '"export/model.onnx"' in card
    run = shutil.copytree(made, tmp_path / "run", symlinks=True)
    before = (run / "MODEL_CARD.md").stat().st_mtime_ns
    r = run_cli("bench", str(run), "--batch-sizes", "2", "--iters", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (run / "MODEL_CARD.md").stat().st_mtime_ns > before  # bench changed what the card reports
    assert "| torch | torch-cpu | 2 |" in (run / "MODEL_CARD.md").read_text()


def test_latest_only_moves_for_runs_that_started_work(finished, tmp_path, teacher_weights):
    (tmp_path / "runs").mkdir()
    os.symlink(finished, tmp_path / "runs" / "latest")
    r = run_cli("distill", SMOKE, "--set", "teacher.weights=/nonexistent.safetensors", cwd=tmp_path)
    assert r.returncode == 2
    r = run_cli("distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", "--set", "student.model=vit_tiny_patch16_224",
                "--set", "student.image_size=31", cwd=tmp_path)  # fails while building, before any work
    assert r.returncode == 2
    assert (tmp_path / "runs" / "latest").resolve() == finished.resolve()


@pytest.mark.parametrize("rel, command", [
    ("student/config.json", "eval"), ("student/config.json", "export"), ("student/config.json", "bench"),
    ("manifest.json", "export"), ("metrics.jsonl", "export"), ("recipe.yaml", "eval"),
    ("student/model.safetensors", "eval"), ("checkpoint.pt", "resume"), ("export/model.onnx", "eval-onnx"),
])
def test_damaged_files_are_exit_2_naming_the_file(finished, tmp_path, rel, command):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    if rel == "export/model.onnx":
        (run / "export").mkdir(exist_ok=True)
        (run / rel).write_bytes(b"\x08\x01\x12")  # a few bytes of protobuf, then nothing
    elif rel == "metrics.jsonl":
        rows = (run / rel).read_text().splitlines()
        (run / rel).write_text(rows[0] + "\n{\"epoch\": 1, \"st\n" + "\n".join(rows[1:]) + "\n")
    else:
        data = (run / rel).read_bytes()
        (run / rel).write_bytes(data[: len(data) // 2])
    before = snapshot(run)
    args = {"eval": ["eval", str(run)], "export": ["export", str(run), "--format", "onnx"],
            "bench": ["bench", str(run), "--iters", "2"], "resume": ["distill", "--resume", str(run)],
            "eval-onnx": ["eval", str(run / rel)]}[command]
    r = run_cli(*args, "--json", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = json.loads(r.stdout)["error"]
    assert Path(rel).name in err, err
    assert "Traceback" not in r.stderr
    assert snapshot(run) == before  # nothing overwritten


def test_the_recipe_file_is_read_once_per_command(complete_run):
    _, reads = complete_run
    assert reads == [Path(SMOKE).resolve()]  # teacher, distill, export, bench and card all used it in memory


def test_training_and_export_do_not_import_each_other_or_onnx_for_a_version():
    import subprocess
    import sys

    # one fresh interpreter for all four: before each import every distillctl module is dropped again, so each
    # list is what that module pulls in by itself (torch and timm stay loaded; they are not what is checked)
    # first, the versions a manifest records: read from the installed distributions, not by importing them
    code = ("import importlib, json, sys\n"
            "import distillctl.device\n"
            "versions = [distillctl.device.versions(), [m for m in ('onnx', 'onnxruntime') if m in sys.modules]]\n"
            "out = {}\n"
            "for mod in sys.argv[1:]:\n"
            "    for name in [m for m in sys.modules if m == 'distillctl' or m.startswith('distillctl.')]:\n"
            "        del sys.modules[name]\n"
            "    importlib.import_module(mod)\n"
            "    out[mod] = sorted({m.split('.')[1] for m in sys.modules if m.startswith('distillctl.')})\n"
            "print(json.dumps([out, versions]))\n")
    rules = {"distillctl.train": "export", "distillctl.export.bench": "train", "distillctl.export": "train",
             "distillctl.export.card": "flows"}
    out = subprocess.run([sys.executable, "-c", code, *rules], capture_output=True, text=True, check=True).stdout
    seen, (recorded, imported) = json.loads(out)
    import onnx
    import onnxruntime

    from distillctl.compat import import_timm

    timm = import_timm()
    assert imported == []  # a training run's manifest does not pay for importing the export libraries
    assert (recorded["onnx"], recorded["onnxruntime"], recorded["timm"]) == (onnx.__version__, onnxruntime.__version__,
                                                                            timm.__version__)
    assert "tensorrt" not in recorded  # not installed here: absent, not guessed
    assert set(seen) == set(rules) and all(seen.values()), seen
    for mod, forbidden in rules.items():
        assert forbidden not in seen[mod], (mod, seen[mod])
    assert "train" in seen["distillctl.train"] and "export" in seen["distillctl.export.card"]  # the lists are real


def test_amended_run_redoes_the_stale_stages_and_exports_describe_the_new_student(complete_run, tmp_path):
    run = shutil.copytree(complete_run[0], tmp_path / "run", symlinks=True)
    onnx_before = (run / "export" / "model.onnx").stat().st_mtime_ns
    r = run_cli("run", "--resume", str(run), "--amend", "--set", "train.epochs=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "stages to run again: distill, export, bench" in r.stderr
    m = _manifest(run)
    assert set(m["stages"].values()) == {"completed"}
    _exactly_once(run, epochs=2, steps=2)
    assert (run / "export" / "model.onnx").stat().st_mtime_ns > onnx_before  # exported from the new student
    import numpy as np
    import onnxruntime as ort
    import torch

    import distillctl

    model, _ = distillctl.load_student(run)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(str(run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.abs(sess.run(None, {"input": x})[0] - model(torch.from_numpy(x)).numpy()).max() < 1e-3


def test_resuming_a_finished_early_stopped_run_changes_nothing(tmp_path, teacher_weights):
    r = _distill(tmp_path, teacher_weights, "--set", "train.epochs=6", "--set", "train.lr=1e-9",
                 "--set", "train.early_stop_patience=1")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    before = snapshot(run)
    r = run_cli("distill", "--resume", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "the run was already finished" in r.stderr
    after = snapshot(run)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed <= {"manifest.json"}  # status and times; no training, no new student


def test_the_nested_teacher_is_a_run_of_its_own(tmp_path):
    run = tmp_path / "run"
    r = run_cli("run", SMOKE, *RUN_TINY, "--set", "export.formats=[safetensors]", "--set", "bench.backends=[]",
                "--out", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", str(run / "teacher"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["n"] == 20
    r = run_cli("train", "--resume", str(run / "teacher"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (run / "teacher" / "student").exists()  # its network stays at teacher/
    assert (tmp_path / "runs" / "latest").resolve() == run.resolve()  # a teacher never becomes latest


def test_export_json_names_files_relative_to_the_run(tmp_path, teacher_weights):
    r = _distill(tmp_path, teacher_weights)
    assert r.returncode == 0, r.stderr
    r = run_cli("export", "run", "--format", "onnx", cwd=tmp_path)  # a relative RUN
    assert r.returncode == 0, r.stderr
    other = tmp_path / "elsewhere"
    other.mkdir()
    r = run_cli("export", str(tmp_path / "run"), "--format", "onnx", "--precision", "fp16", cwd=other)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "run" / "export.json").read_text())
    assert doc["artifacts"]["onnx"] == "export/model.onnx" and doc["artifacts"]["onnx_fp16"] == "export/model.fp16.onnx"
    assert "| onnx | `export/model.onnx` |" in (tmp_path / "run" / "MODEL_CARD.md").read_text()


def test_damaged_reports_and_metrics_do_not_block_the_commands_that_rewrite_them(tmp_path, teacher_weights):
    r = _distill(tmp_path, teacher_weights, "--set", "train.epochs=2")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    (run / "bench.json").write_text('{"latency_ms": {')
    r = run_cli("bench", str(run), "--batch-sizes", "1", "--iters", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "bench.json").read_text())["latency_ms"]
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(rows[:1] + ['{"epoch": 1, "st'] + rows[1:]) + "\n")
    r = run_cli("distill", "--resume", str(run), "--amend", "--set", "train.epochs=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _exactly_once(run, epochs=3, steps=2)


def test_bench_of_a_run_whose_recipe_skips_bench_measures_the_defaults(tmp_path, teacher_weights):
    r = _distill(tmp_path, teacher_weights, "--set", "bench.backends=[]")
    assert r.returncode == 0, r.stderr
    r = run_cli("bench", str(tmp_path / "run"), "--batch-sizes", "1", "--iters", "2", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "torch" in json.loads(r.stdout)["latency_ms"]


def test_usage_errors_still_print_one_json_document(tmp_path, capsys, monkeypatch):
    import sys

    from distillctl import cli

    monkeypatch.setattr(sys, "argv", ["distillctl", "bench", str(tmp_path), "--threads", "x", "--json"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["command"] == "bench" and doc["exit_code"] == 2 and "--threads" in doc["error"]
