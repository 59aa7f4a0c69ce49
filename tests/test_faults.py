"""Faults lose nothing: kill -9 anywhere (even mid-checkpoint), a full disk, a second writer, SIGTERM in
export, NaN before any checkpoint, planted symlinks, torn metrics lines, unusable --out folders."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import RECIPES, Forked, run_cli, snapshot

SMOKE = str(RECIPES / "ci_smoke.yaml")
DETERMINISTIC = ["--set", "train.epochs=2", "--set", "train.log_every=1", "--set", "train.deterministic=true"]


def _kill_when(p, pred, timeout=240, poll=0.001, sig=signal.SIGKILL, wait=True):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if p.poll() is not None:
            return False
        try:
            if pred():
                p.send_signal(sig)
                if wait:
                    p.wait()
                return True
        except OSError:
            pass
        time.sleep(poll)
    p.kill()
    return False


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """RLIMIT_FSIZE for this process inside the block: the kernel's EFBIG, as a full disk gives ENOSPC. Python
    ignores SIGXFSZ, so a write past the limit fails with an OSError instead of killing the process."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _ckpt(run: Path):
    from distillctl.run import Run

    try:
        return Run(run).load_checkpoint()
    except Exception:
        return None


def _temps(run: Path) -> list:
    return [p for p in run.rglob("*") if ".tmp" in p.name or ".staged." in p.name]


def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, teacher_weights):
    from safetensors.torch import load_file

    common = ["--set", f"teacher.weights={teacher_weights}", *DETERMINISTIC]
    ref = run_cli("distill", SMOKE, *common, "--out", str(tmp_path / "ref"), cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "run"
    args = ["distill", SMOKE, *common, "--out", str(run)]
    kills = [
        # 1. before the first checkpoint: the resume starts the run again, and says so
        lambda: (run / "metrics.jsonl").is_file() and not (run / "checkpoint.pt").exists(),
        # 2. while a checkpoint is being written (its temporary exists)
        lambda: any(run.glob(".checkpoint.pt.*")),
        # 3. mid-epoch, rows logged after the last checkpoint
        lambda: (_ckpt(run) or {}).get("epoch", 0) >= 1 and any(r.get("epoch") == 2 and r.get("step", 0) >= 3
                                                                 for r in _rows(run)),
    ]
    resume = []
    for i, pred in enumerate(kills):
        p = Forked(*args, *resume, cwd=tmp_path)
        assert _kill_when(p, pred), f"kill point {i + 1} was never reached: {p.stderr_text[-2000:]}"
        resume = ["--resume"]
    done = run_cli(*args, "--resume", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    rows = _rows(run)
    steps = [(r["epoch"], r["step"]) for r in rows if "step" in r]
    assert steps == [(e, s) for e in (1, 2) for s in range(1, 9)]  # each step exactly once
    assert [r["epoch"] for r in rows if "top1" in r] == [1, 2]  # each epoch exactly once
    a = load_file(str(tmp_path / "ref" / "student" / "model.safetensors"))
    b = load_file(str(run / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert not _temps(run)
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"


def test_a_second_writer_is_refused_at_once(tmp_path, teacher_weights):
    r = run_cli("distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", "--set", "data.synthetic_size=64",
                "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)"), str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path / "run")
        t0 = time.time()
        for args in (["distill", "--resume", str(tmp_path / "run")],
                     ["export", str(tmp_path / "run"), "--format", "safetensors"]):
            r = run_cli(*args, "--json", cwd=tmp_path)
            assert r.returncode == 2 and "another distillctl process is writing" in json.loads(r.stdout)["error"]
        assert time.time() - t0 < 60  # no waiting
        assert snapshot(tmp_path / "run") == before
    finally:
        holder.kill()


def test_two_distills_on_one_folder_one_wins(tmp_path, teacher_weights):
    args = ["distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", "--set", "train.epochs=2",
            "--out", str(tmp_path / "run")]
    ps = [Forked(*args, cwd=tmp_path) for _ in range(2)]
    try:
        codes = sorted(p.wait(timeout=300) for p in ps)
    finally:
        for p in ps:
            p.kill()
    assert codes == [0, 2], [p.stderr_text[-500:] for p in ps]
    rows = _rows(tmp_path / "run")
    assert [(r["epoch"], r["step"]) for r in rows if "step" in r] == [(1, 5), (1, 8), (2, 5), (2, 8)]


def test_full_disk_is_exit_2_and_leaves_nothing_behind(tmp_path, teacher_weights):
    run = tmp_path / "run"
    args = ["distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", "--set", "train.epochs=2",
            "--out", str(run), "--json"]
    with _file_size_limit(2 << 20):  # 2 MiB per file: the weights cannot be written
        r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert "cannot write" in doc["error"] and "File too large" in doc["error"] and "--resume" in doc["error"]
    assert "Traceback" not in r.stderr
    assert not _temps(run)
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    r = run_cli(*args[:-1], "--resume", cwd=tmp_path)  # space again: the run continues
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("floats", [300_000, 524_000, 524_280, 600_000])
def test_a_write_the_file_system_refuses_is_a_storage_error_at_any_size(tmp_path, floats):
    """Near a 2 MiB limit torch.save's own writer fails in three ways ("iostream error", "unexpected pos ...",
    RuntimeError either way): the checkpoint and weights writers must still say exit 2, keep the old file, and
    leave no temporary. 300k floats fit: the files are written whole."""
    from distillctl.files import StorageError
    from distillctl.run import save_weights

    run = _small_run(tmp_path)
    run.save_checkpoint({"student": {}, "epoch": 0, "global_step": 0})
    weights = tmp_path / "w.safetensors"
    save_weights(weights, {"w": torch.zeros(1)})
    before = (run.checkpoint_file.read_bytes(), weights.read_bytes())
    state = {"w": torch.arange(floats, dtype=torch.float32)}
    outcomes = []
    with _file_size_limit(2 << 20):
        for write in (lambda: run.save_checkpoint({"student": state, "epoch": 1, "global_step": 1}),
                      lambda: save_weights(weights, state)):
            try:
                write()
                outcomes.append("written")
            except StorageError as err:
                assert err.exit_code == 2 and "File too large" in err.message, err.message
                outcomes.append("refused")
    # 524k floats: the checkpoint (a zip) crosses the limit, the bare weights (2 096 000 bytes + header) do not
    assert outcomes == {300_000: ["written"] * 2, 524_000: ["refused", "written"]}.get(floats, ["refused"] * 2)
    from safetensors.torch import load_file

    ckpt, w = run.checkpoint_file.read_bytes(), weights.read_bytes()
    run._checkpoint = None
    if outcomes[0] == "written":
        assert torch.equal(run.load_checkpoint()["student"]["w"], state["w"])
    else:
        assert ckpt == before[0]  # the last good checkpoint, intact
    assert torch.equal(load_file(str(weights))["w"], state["w"]) if outcomes[1] == "written" else w == before[1]
    assert not _temps(tmp_path)


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    """A run with an untrained test_resnet and its FP32 ONNX file (1.5 MB), for the export-side write faults."""
    try:
        from exportkit import make_run, tiny_recipe, write_onnx
    except ImportError:  # tests collected as a package
        from tests.exportkit import make_run, tiny_recipe, write_onnx
    run = make_run(tmp_path_factory.mktemp("small") / "run", tiny_recipe("test_resnet", onnx_exporter="torchscript"))
    return run, write_onnx(run)


def test_onnx_export_to_a_full_disk_is_exit_2_at_once_not_an_exporter_failure(small_onnx, tmp_path):
    """The exporters reported a refused write as their own failure: the next exporter was tried on the same
    full disk, and the command ended 5 ("failed with every exporter") instead of 2 ("cannot write")."""
    import shutil

    from distillctl.export import export_run
    from distillctl.files import StorageError
    from distillctl.run import Run

    run = shutil.copytree(small_onnx[0], tmp_path / "run", ignore=shutil.ignore_patterns("export", "export.json"))
    with _file_size_limit(1 << 20), pytest.raises(StorageError) as info:
        export_run(Run.open(run), ["onnx"], device="cpu")
    assert info.value.exit_code == 2 and "File too large" in info.value.message
    assert "every exporter" not in info.value.message
    assert not (run / "export" / "model.onnx").exists() and not _temps(run)
    res = export_run(Run.open(run), ["onnx"], device="cpu")  # room again: the same command succeeds
    assert res["status"] == "ok" and (run / "export" / "model.onnx").is_file()


def test_int8_work_files_refused_or_short_of_room_are_exit_2(small_onnx, monkeypatch):
    """ONNX Runtime's quantizer writes some work files without checking: a full disk surfaced as exit 5
    "DecodeError: ... Wire format was corrupt". A refused write is exit 2; too little room is refused first."""
    import numpy as np

    from distillctl.export import int8
    from distillctl.files import StorageError

    src = small_onnx[1]
    dest = src.with_name("model.int8.onnx")
    x = [np.random.default_rng(0).standard_normal((16, 3, 32, 32), dtype=np.float32) for _ in range(2)]
    # a file-size limit below the work files' size (the FP32 source, 1.496 MB, is there already): ONNX Runtime
    # ignores some of the refused writes (then "DecodeError"), so it is refused before the quantizer starts
    with _file_size_limit(1_000_000), pytest.raises(StorageError) as info:
        int8.quantize_int8(src, dest, iter(x), count=32)
    assert info.value.exit_code == 2 and "file-size limit of this process (ulimit -f, 1.0 MB)" in info.value.message
    monkeypatch.setattr(int8, "WORK_FILE_FACTOR", 0.0)  # no early check: the refused write itself is caught
    with _file_size_limit(1_500_000), pytest.raises(StorageError) as info:
        int8.quantize_int8(src, dest, iter(x), count=32)
    assert info.value.exit_code == 2 and "File too large" in info.value.message
    # preprocessing failed there, so ONNX Runtime wrote its shape-inferred copy beside the source: removed
    assert sorted(p.name for p in src.parent.iterdir() if not p.name.startswith(".")) == ["model.onnx"]
    monkeypatch.setattr(int8, "WORK_SPACE_FACTOR", 1e9)  # "needs" 1.5 PB: more than any disk here has free
    with pytest.raises(StorageError) as info:
        int8.quantize_int8(src, dest, iter(x), count=32)
    assert "not enough free space" in info.value.message and "1e+09x the FP32 file" in info.value.message
    assert not dest.exists() and not [f for f in os.listdir(dest.parent) if f.startswith(".int8-")]
    monkeypatch.undo()
    assert int8.quantize_int8(src, dest, iter(x), count=32)["count"] == 32 and dest.is_file()


def test_a_refused_write_anywhere_is_exit_2_not_a_bug(capsys):
    """Whatever library wraps it, an OSError of a refused write in the chain of an unexpected exception is a
    storage error (exit 2, "cannot write"), not "internal error ... this is a bug" (exit 1)."""
    import errno

    import typer

    from distillctl import report

    def fn():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/runs/x/bench.png")
        except OSError as err:
            raise RuntimeError("savefig failed") from err

    with pytest.raises(typer.Exit) as info:
        report.execute("bench", True, fn)
    doc = json.loads(capsys.readouterr().out)
    assert info.value.exit_code == 2 and doc["exit_code"] == 2
    assert doc["error"].startswith("the file system refused /data/runs/x/bench.png: No space left on device")
    assert "--resume" in doc["error"] and "bug" not in doc["error"]

    def bug():
        raise RuntimeError("a real bug")

    with pytest.raises(typer.Exit) as info:
        report.execute("bench", True, bug)
    assert info.value.exit_code == 1 and "this is a bug" in json.loads(capsys.readouterr().out)["error"]


def test_a_temporary_that_cannot_be_removed_never_replaces_the_error(tmp_path, capsys):
    """On a read-only file system even unlinking a temporary that was never created fails (EROFS): the
    cleanup after a refused write raised, and the command ended 1 with a traceback instead of exit 2. Here the
    unlink fails with ENOTDIR (the temporary's folder is a file), which an unprivileged test can provoke."""
    import errno

    import typer

    from distillctl import report
    from distillctl.files import storage_error, track

    blocker = tmp_path / "export"
    blocker.write_text("a file where a folder should be")

    def fn():
        track(blocker / ".model.onnx.tmp")  # as temp_path registers a writer's temporary
        raise storage_error(blocker / "model.onnx", OSError(errno.EROFS, os.strerror(errno.EROFS)))

    with pytest.raises(typer.Exit) as info:
        report.execute("export", True, fn)
    doc = json.loads(capsys.readouterr().out)
    assert info.value.exit_code == 2 and doc["exit_code"] == 2 and "Read-only file system" in doc["error"]
    assert blocker.read_text() == "a file where a folder should be"


def test_sigterm_during_export_is_130_with_the_document_and_no_temporaries(tmp_path, teacher_weights):
    run = tmp_path / "run"
    r = run_cli("distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", "--set", "data.synthetic_size=64",
                "--out", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = Forked("export", str(run), "--format", "onnx", "--precision", "int8", "--json", cwd=tmp_path)
    fp32, int8 = run / "export" / "model.staged.onnx", run / "export" / "model.int8.staged.onnx"
    # the FP32 file is staged and the INT8 one not yet written: quantization is under way, the commit is not
    assert _kill_when(p, lambda: fp32.exists() and not int8.exists(), poll=0.002, sig=signal.SIGTERM, wait=False), \
        f"quantization was never seen under way: {p.stderr_text[-2000:]}"
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    doc = json.loads(out)
    assert doc["exit_code"] == 130 and doc["status"] == "error"
    assert not _temps(run) and not (run / "export" / "model.onnx").exists()


def test_nan_before_any_checkpoint_says_so_and_amended_resume_recovers(tmp_path, teacher_weights):
    run = tmp_path / "run"
    r = run_cli("distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", "--set", "train.lr=1e30",
                "--set", "train.log_every=1", "--out", str(run), "--json", cwd=tmp_path)
    assert r.returncode == 6, r.stderr
    err = json.loads(r.stdout)["error"]
    assert "no checkpoint had been written yet" in err and "kept at" not in err
    assert json.loads((run / "manifest.json").read_text())["status"] == "diverged"
    r = run_cli("distill", "--resume", str(run), "--amend", "--set", "train.lr=0.05", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "completed" and m["amendments"][0]["changes"] == {"train.lr": [1e30, 0.05]}


def test_collapsed_student_exits_6_and_compare_flags_it(tmp_path):
    """A student that never learns (lr 1e-9) next to a teacher far above chance is a collapse, not a result."""
    base = ["--set", "teacher.train.epochs=3", "--set", "teacher.train.lr=0.003", "--set", "train.lr=1e-9",
            "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=3", "--set", "export.formats=[safetensors]",
            "--set", "bench.backends=[]"]
    r = run_cli("run", SMOKE, *base, "--out", str(tmp_path / "run"), "--json", cwd=tmp_path)
    assert r.returncode == 6, r.stderr
    doc = json.loads(r.stdout)
    assert "collapsed" in doc["error"] and "chance level" in doc["error"]
    assert not (tmp_path / "run" / "student" / "model.safetensors").exists()  # never handed over
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "collapsed"

    teacher = tmp_path / "run" / "teacher" / "model.safetensors"  # trained above: the next two reuse it
    base += ["--set", f"teacher.weights={teacher}"]
    r = run_cli("run", SMOKE, *base, "--set", "train.epochs=4", "--set", "train.early_stop_patience=1",
                "--out", str(tmp_path / "early"), cwd=tmp_path)
    assert r.returncode == 6 and "collapsed" in r.stderr  # stopping early does not skip the verdict
    assert not (tmp_path / "early" / "teacher").exists()

    r = run_cli("compare", SMOKE, "--methods", "ce,kd", *base, "--out", str(tmp_path / "cmp"), "--json",
                cwd=tmp_path)
    assert r.returncode == 6, r.stderr
    doc = json.loads(r.stdout)
    rows = {row["method"]: row for row in doc["rows"]}
    assert rows["kd"]["status"] == "collapsed" and rows["ce"]["status"] == "ok"  # no teacher: not judged
    assert "COLLAPSED" in (tmp_path / "cmp" / "compare.md").read_text()
    assert doc["num_classes"] == 10 and (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- run-folder files


def _small_run(tmp_path):
    from distillctl.recipe import validate_raw
    from distillctl.run import Run

    run = Run(tmp_path / "run", validate_raw({"student": {"model": "test_resnet"}, "method": {"name": "ce"}}))
    with run.writing():
        run.create("train")
    return run


def test_torn_metrics_line_is_closed_off_and_truncated_on_resume(tmp_path):
    run = _small_run(tmp_path)
    run.append_metrics({"epoch": 1, "step": 1, "global_step": 1, "loss": 1.0})
    with open(run.root / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "step": 2, "glo')  # a kill during an append
    assert [r["step"] for r in run.metrics_rows()] == [1]  # a torn last line is not a row
    run.append_metrics({"epoch": 1, "step": 2, "global_step": 2, "loss": 0.9})
    text = (run.root / "metrics.jsonl").read_text()
    assert '"glo\n{"epoch": 1, "step": 2, "global_step": 2' in text  # closed off, never glued
    assert run.truncate_metrics(epochs_done=0, global_step=2) == 1  # the damaged line goes on resume
    assert [r["step"] for r in run.metrics_rows()] == [1, 2]


def test_symlinks_planted_in_a_run_folder_are_never_written_through(tmp_path):
    from distillctl.errors import BadInput

    run = _small_run(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run.root / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(BadInput, match="symbolic link"):
        run.append_metrics({"epoch": 1, "step": 1, "global_step": 1, "loss": 1.0})
    (run.root / "checkpoint.pt").symlink_to(victim)
    with pytest.raises(BadInput, match="symbolic link"):
        run.save_checkpoint({"student": {}, "epoch": 0, "global_step": 0})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run.root / "export").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(BadInput, match="symbolic link"):
        run.onnx_file("fp32")
    assert victim.read_text() == "precious" and not any(elsewhere.iterdir())


def test_stale_temporaries_of_a_killed_writer_are_removed_by_the_next(tmp_path):
    run = _small_run(tmp_path)
    stale = run.root / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    (run.root / "student").mkdir()
    staged = run.root / "student" / ".model.safetensors.x.tmp"
    staged.write_bytes(b"x")
    with run.writing():
        pass
    assert not stale.exists() and not staged.exists()


@pytest.mark.parametrize("out", ["file", "/proc/distillctl-cannot-write/run"])
def test_unusable_out_is_exit_2(tmp_path, teacher_weights, out):
    if out == "file":
        out = tmp_path / "a-file"
        out.write_text("not a folder")
    r = run_cli("distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", "--out", str(out), "--json",
                cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and json.loads(r.stdout)["error"]


def test_a_teacher_that_learned_nothing_stops_run_with_exit_6(tmp_path):
    r = run_cli("run", SMOKE, "--set", "teacher.train.lr=1e-9", "--set", "export.formats=[safetensors]",
                "--set", "bench.backends=[]", "--out", str(tmp_path / "run"), "--json", cwd=tmp_path)
    assert r.returncode == 6, r.stderr
    assert "learned nothing" in json.loads(r.stdout)["error"]
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["stages"]["teacher"] == "collapsed" and "distill" not in m["stages"]


def test_compare_with_a_failed_method_is_not_exit_0(tmp_path, teacher_weights):
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(bad))
    r = run_cli("compare", SMOKE, "--methods", "ce,kd", "--set", f"teacher.weights={bad}",
                "--set", "data.synthetic_size=64", "--out", str(tmp_path / "cmp"), "--json", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    rows = {row["method"]: row for row in json.loads(r.stdout)["rows"]}
    assert rows["ce"]["status"] == "ok" and rows["kd"]["status"] == "error"
    assert (tmp_path / "cmp" / "compare.md").is_file()  # the table is still written


def test_sigterm_swallowed_by_a_finaliser_still_interrupts(capsys):
    """Python drops an exception raised in a finaliser; a SIGTERM landing there must still end the command 130."""
    import typer

    from distillctl import report

    reached = []

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs here, inside __del__: its KeyboardInterrupt is dropped
                pass

    def fn():
        Finalised()  # collected at once
        time.sleep(3)  # the re-sent signal interrupts this
        reached.append(True)
        return {"done": True}

    with pytest.raises(typer.Exit) as info:
        report.execute("export", True, fn)
    assert info.value.exit_code == 130 and not reached
    assert json.loads(capsys.readouterr().out)["exit_code"] == 130


def test_interrupt_caught_by_library_code_still_ends_the_stage_and_the_command_130(capsys, tmp_path):
    """Library code that catches the KeyboardInterrupt of a real SIGINT and carries on (seen once in the
    export stage) must not turn an interrupted command into exit 0: the stage ends interrupted, the command 130."""
    import typer

    from distillctl import report
    from distillctl.flows import stage
    from distillctl.recipe import load_recipe
    from distillctl.run import Run

    run = Run(tmp_path / "run", load_recipe(SMOKE))
    run.root.mkdir()
    run.create("export")

    def swallowing_library():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:  # e.g. a broad handler inside an exporter
            pass
        return "finished anyway"

    def fn():
        with stage(run, "export"):
            swallowing_library()
        return {"done": True}

    with pytest.raises(typer.Exit) as info:
        report.execute("export", True, fn)
    assert info.value.exit_code == 130
    assert Run(run.root).stage_status("export") == "interrupted"
    assert json.loads(capsys.readouterr().out)["exit_code"] == 130

    with pytest.raises(typer.Exit) as info:  # outside any stage: the command itself ends 130
        report.execute("export", True, lambda: {"r": swallowing_library()})
    assert info.value.exit_code == 130


def _then_a_swallowed_sigterm(real):
    """``real``, then a SIGTERM whose KeyboardInterrupt library code catches and drops (a broad handler)."""
    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except KeyboardInterrupt:
            pass
        return out
    return wrapper


def test_interrupt_swallowed_in_export_never_gives_an_artifact_its_final_name(tmp_path, teacher_weights, monkeypatch,
                                                                              capsys):
    """A SIGTERM whose KeyboardInterrupt library code swallowed (the export then carried on) ends the export at
    its commit point: exit 130, no artifact under its final name, no export.json, no temporaries."""
    import typer

    from distillctl import report
    from distillctl.export import bench, export_run
    from distillctl.run import Run

    run = tmp_path / "run"
    r = run_cli("distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", "--set", "data.synthetic_size=64",
                "--out", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # measure: the export's last step before it names its files
    monkeypatch.setattr(bench, "measure", _then_a_swallowed_sigterm(bench.measure))
    with pytest.raises(typer.Exit) as info:
        report.execute("export", True, lambda: export_run(Run.open(run), ["onnx"], device="cpu"))
    assert info.value.exit_code == 130
    assert json.loads(capsys.readouterr().out)["exit_code"] == 130
    assert not (run / "export" / "model.onnx").exists() and not (run / "export.json").exists()
    assert not _temps(run)


def test_interrupt_swallowed_after_training_saves_no_student_and_resume_finishes(tmp_path, teacher_weights,
                                                                                 monkeypatch):
    """The same for distill: a swallowed signal after the last epoch (the trainer's own handler is gone) ends
    the stage before the student is written; the resume saves it from the finished checkpoint."""
    from distillctl import flows

    run = tmp_path / "run"
    real = flows.student_config
    # student_config: computed just before the student is saved
    monkeypatch.setattr(flows, "student_config", _then_a_swallowed_sigterm(real))
    args = ["distill", SMOKE, "--set", f"teacher.weights={teacher_weights}", "--set", "data.synthetic_size=64",
            "--out", str(run)]
    r = run_cli(*args, "--json", cwd=tmp_path)
    assert r.returncode == 130, r.stderr[-2000:]
    assert not (run / "student").exists() or not any((run / "student").iterdir())
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(flows, "student_config", real)
    r = run_cli(*args, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "student" / "model.safetensors").is_file() and (run / "student" / "config.json").is_file()
    assert [r["epoch"] for r in _rows(run) if "top1" in r] == [1]  # the epoch was not trained again


def test_interrupt_swallowed_before_compare_writes_its_table_writes_none_of_it(tmp_path, monkeypatch):
    """compare's table, chart and compare.json are one commit: a swallowed signal before it writes none."""
    from distillctl import compare

    # render_chart: drawn just before the three files are written
    monkeypatch.setattr(compare, "render_chart", _then_a_swallowed_sigterm(compare.render_chart))
    r = run_cli("compare", SMOKE, "--methods", "ce", "--set", "data.synthetic_size=64", "--out", str(tmp_path / "cmp"),
                "--json", cwd=tmp_path)
    assert r.returncode == 130, r.stderr[-2000:]
    assert not [p.name for p in (tmp_path / "cmp").iterdir() if p.name.startswith("compare")]


def test_a_signal_inside_the_commit_point_waits_for_its_end(capsys):
    """Inside the block the files are written together: the signal is delivered when the block is done."""
    import typer

    from distillctl import report

    done = []

    def fn():
        with report.commit_point():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the held signal does not cut this short
            done.append("block")
        done.append("after")  # never reached: the signal is delivered as the block ends
        return {}

    with pytest.raises(typer.Exit) as info:
        report.execute("export", True, fn)
    assert info.value.exit_code == 130 and done == ["block"]
    assert signal.getsignal(signal.SIGTERM) is not None and json.loads(capsys.readouterr().out)["exit_code"] == 130


def test_compare_summary_cuts_a_long_row_message_at_a_word():
    from distillctl.compare import _brief

    msg = "training ended collapsed: student top-1 0.1000 is at chance level " * 6
    short = _brief(msg, limit=100)
    assert len(short) <= 104 and short.endswith(" ...") and msg.startswith(short[:-4])
    assert msg.split()[len(short[:-4].split()) - 1] == short[:-4].split()[-1]  # the last word is whole
    assert _brief("  a  short\nmessage ") == "a short message"
