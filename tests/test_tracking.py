"""Tracking: what the adapter writes is read back with each library's own reader.

TensorBoard: its EventAccumulator. MLflow: MlflowClient on the store inside the run folder.
W&B (offline): the run's .wandb file, parsed record by record with W&B's own protobuf schema.
A backend's tests skip, saying why, only when its library is not installed (``pip install
'.[test]'`` brings tensorboard, mlflow and wandb).
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import sys
from pathlib import Path

import pytest

from distillctl.errors import BadInput, MissingCapability
from distillctl.recipe import TrackingConfig, load_recipe
from distillctl.tracking import TRACKING_FILE, Tracker, flatten_params

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
AVAILABLE = [b for b in ("tensorboard", "mlflow", "wandb") if importlib.util.find_spec(b) is not None]

# what a two-epoch training would log: train rows every 2 steps, one validation row per epoch
TRAIN_ROWS = [
    {"epoch": 1, "step": 2, "global_step": 2, "lr": 0.05, "img_s": 812.5, "loss_ce": 2.25, "loss_kd": 1.5, "loss": 3.75},
    {"epoch": 1, "step": 4, "global_step": 4, "lr": 0.04, "img_s": 901.0, "loss_ce": 1.75, "loss_kd": 1.25, "loss": 3.0},
    {"epoch": 2, "step": 2, "global_step": 6, "lr": 0.02, "img_s": 877.0, "loss_ce": 1.25, "loss_kd": 1.0, "loss": 2.25},
]
VAL_ROWS = [{"epoch": 1, "global_step": 4, "top1": 0.375, "top5": 0.875}, {"epoch": 2, "global_step": 6, "top1": 0.5,
                                                                         "top5": 0.9375}]


def _need(backend: str):
    if backend not in AVAILABLE:
        pytest.skip(f"{backend} is not installed (pip install '.[{backend}]' or '.[test]'); its read-back is not run")


class _NoNetwork:
    """Record every socket connection to a non-loopback address made in this process."""

    def __init__(self, monkeypatch):
        self.attempts = []
        real = socket.socket.connect

        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
                self.attempts.append(address)
                raise OSError(f"test: network access to {address} refused")
            return real(sock, address)

        monkeypatch.setattr(socket.socket, "connect", connect)


def _artifacts(run_dir: Path) -> dict[str, Path]:
    from safetensors.torch import save_file
    import torch

    student = run_dir / "student"
    student.mkdir(parents=True)
    save_file({"w": torch.arange(6, dtype=torch.float32).view(2, 3)}, str(student / "model.safetensors"))
    (student / "config.json").write_text(json.dumps({"architecture": "test_resnet"}))
    return {"weights": student / "model.safetensors", "student": student}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One tracked 'training' with every installed backend, as the trainer would drive it."""
    if not AVAILABLE:
        pytest.skip("none of tensorboard, mlflow, wandb is installed (pip install '.[test]')")
    mp = pytest.MonkeyPatch()
    guard = _NoNetwork(mp)
    run_dir = tmp_path_factory.mktemp("run")
    recipe = load_recipe(RECIPES / "ci_smoke.yaml", ["tracking.backends=[" + ",".join(AVAILABLE) + "]"])
    params = recipe.model_dump(mode="json")
    try:
        with Tracker.open(recipe.tracking, run_dir, "ci-smoke-0", params) as tracker:
            assert tracker.enabled
            # in the trainer's order: train rows of an epoch, then its validation row (steps never go back)
            for row in sorted(TRAIN_ROWS + VAL_ROWS, key=lambda r: (r["global_step"], "top1" in r)):
                tracker.log(row, row["global_step"])
            arts = _artifacts(run_dir)
            tracker.log_artifacts(arts)
    finally:
        mp.undo()
    return {"run_dir": run_dir, "recipe": recipe, "params": params, "artifacts": arts, "net": guard.attempts,
            "ids": json.loads((run_dir / TRACKING_FILE).read_text())}


def test_nothing_reaches_the_network(tracked):
    assert tracked["net"] == []
    assert tracked["ids"]["backends"] == AVAILABLE


def test_tracking_is_off_by_default(tmp_path):
    recipe = load_recipe(RECIPES / "ci_smoke.yaml")
    assert recipe.tracking.backends == []
    tracker = Tracker.open(recipe.tracking, tmp_path / "run", "r", recipe.model_dump(mode="json"))
    assert not tracker.enabled
    tracker.log({"loss": 1.0}, 1)
    tracker.log_artifacts({"missing": tmp_path / "nope"})  # a no-op tracker checks nothing
    tracker.close()
    assert not (tmp_path / "run").exists()


def test_flatten_params_dotted_keys():
    flat = flatten_params({"train": {"lr": 0.1, "ema": False}, "export": {"formats": ["onnx", "trt"]},
                           "teacher": None, "student": {"kwargs": {}}})
    assert flat == {"train.lr": 0.1, "train.ema": False, "export.formats": '["onnx","trt"]', "teacher": None,
                    "student.kwargs": "{}"}


# ----------------------------------------------------------------------------- TensorBoard


def _tb(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return acc


def _tb_text(acc, tag: str) -> list[str]:
    from tensorboard.util import tensor_util

    return [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(f"{tag}/text_summary")]


def test_tensorboard_scalars_recipe_and_artifacts(tracked):
    _need("tensorboard")
    acc = _tb(tracked["run_dir"])
    scalars = set(acc.Tags()["scalars"])
    assert {"loss_ce", "loss_kd", "loss", "lr", "img_s", "top1", "top5", "epoch"} <= scalars
    assert not scalars & {"step", "global_step"}  # the x axis, not a curve
    assert [(e.step, e.value) for e in acc.Scalars("loss_ce")] == [(2, 2.25), (4, 1.75), (6, 1.25)]
    assert [(e.step, e.value) for e in acc.Scalars("top1")] == [(4, 0.375), (6, 0.5)]
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([0.05, 0.04, 0.02])  # the val rows carry no lr
    recipe_text = _tb_text(acc, "recipe")[0]
    lr = tracked["recipe"].train.lr
    assert f"| train.lr | {lr} |" in recipe_text and "| method.name | kd |" in recipe_text
    assert recipe_text.count("\n") == len(flatten_params(tracked["params"])) + 1  # header + rule + one per key
    arts = _tb_text(acc, "artifacts")[0]
    assert str(tracked["artifacts"]["weights"]) in arts
    assert _tb_text(acc, "status") == ["finished"]


# ----------------------------------------------------------------------------- MLflow


def _mlflow_client(ids: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=ids["mlflow_uri"])


def test_mlflow_store_inside_run_folder(tracked):
    _need("mlflow")
    ids = tracked["ids"]
    db = tracked["run_dir"] / "mlflow" / "mlflow.db"
    assert ids["mlflow_uri"] == f"sqlite:///{db.resolve()}" and db.is_file()
    run = _mlflow_client(ids).get_run(ids["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "ci-smoke-0"
    assert run.info.artifact_uri.startswith((tracked["run_dir"] / "mlflow" / "artifacts").resolve().as_uri())


def test_mlflow_metrics_and_params(tracked):
    _need("mlflow")
    ids = tracked["ids"]
    client = _mlflow_client(ids)
    run_id = ids["mlflow_run_id"]
    hist = client.get_metric_history(run_id, "loss_kd")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(2, 1.5), (4, 1.25), (6, 1.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "top5")] == [(4, 0.875), (6, 0.9375)]
    run = client.get_run(run_id)
    assert set(run.data.metrics) == {"epoch", "lr", "img_s", "loss_ce", "loss_kd", "loss", "top1", "top5"}
    params = run.data.params
    recipe = tracked["recipe"]
    assert params["train.lr"] == str(recipe.train.lr) and params["method.name"] == "kd"
    assert params["student.model"] == recipe.student.model
    assert params["export.formats"] == json.dumps(recipe.export.formats, separators=(",", ":"))
    assert len(params) == len(flatten_params(tracked["params"]))  # every resolved key, more than one batch of 100


def test_mlflow_artifacts_round_trip(tracked, tmp_path):
    _need("mlflow")
    ids = tracked["ids"]
    client = _mlflow_client(ids)
    run_id = ids["mlflow_run_id"]
    listed = {a.path: a for a in client.list_artifacts(run_id, "weights")}
    assert set(listed) == {"weights/model.safetensors"}
    src = tracked["artifacts"]["weights"]
    assert listed["weights/model.safetensors"].file_size == src.stat().st_size
    got = Path(client.download_artifacts(run_id, "weights/model.safetensors", str(tmp_path)))
    assert got.read_bytes() == src.read_bytes()
    assert {a.path for a in client.list_artifacts(run_id, "student")} == {"student/config.json",
                                                                           "student/model.safetensors"}


@pytest.fixture
def file_store_env(monkeypatch):
    """MLflow's file-store opt-out unset while the adapter runs (it sets it for an explicit file: URI)
    and put back as it was afterwards (setitem records the original, delitem clears it now)."""
    monkeypatch.setitem(os.environ, "MLFLOW_ALLOW_FILE_STORE", os.environ.get("MLFLOW_ALLOW_FILE_STORE", ""))
    monkeypatch.delitem(os.environ, "MLFLOW_ALLOW_FILE_STORE")


def test_mlflow_explicit_file_store(tmp_path, file_store_env):
    _need("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    cfg = TrackingConfig(backends=["mlflow"], mlflow_uri=uri, experiment="exp-a")
    with Tracker.open(cfg, tmp_path / "run", "file-store", {"train": {"lr": 0.5}}) as tracker:
        tracker.log({"loss": 0.25}, 7)
    ids = json.loads((tmp_path / "run" / TRACKING_FILE).read_text())
    client = _mlflow_client(ids)
    assert client.get_experiment_by_name("exp-a").experiment_id == ids["mlflow_experiment_id"]
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow_run_id"], "loss")] == [(7, 0.25)]
    assert client.get_run(ids["mlflow_run_id"]).data.params == {"train.lr": "0.5"}
    assert (tmp_path / "mlruns").is_dir() and not (tmp_path / "run" / "mlflow").exists()


def test_failed_run_status(tmp_path, file_store_env):
    _need("mlflow")
    cfg = TrackingConfig(backends=["mlflow"], mlflow_uri=(tmp_path / "mlruns").as_uri())  # fast to create
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker.open(cfg, tmp_path, "crash", {"name": "crash"}) as tracker:
            tracker.log({"loss": float("nan")}, 1)  # a diverged loss is still recorded
            raise RuntimeError("boom")
    ids = json.loads((tmp_path / TRACKING_FILE).read_text())
    client = _mlflow_client(ids)
    assert client.get_run(ids["mlflow_run_id"]).info.status == "FAILED"
    value = client.get_metric_history(ids["mlflow_run_id"], "loss")[0].value
    assert value != value  # NaN


def test_stages_share_a_store_and_resume_continues_the_same_run(tmp_path):
    backends = [b for b in ("tensorboard", "mlflow") if b in AVAILABLE]
    if not backends:
        pytest.skip("tensorboard and mlflow are not installed (pip install '.[test]')")
    cfg = TrackingConfig(backends=backends)
    params = {"name": "resumable", "train": {"epochs": 2}}
    # `run`: the teacher stage in RUN/teacher, then the student in RUN, one store for both
    with Tracker.open(cfg, tmp_path / "teacher", "resumable-teacher", params, store_dir=tmp_path) as teacher:
        teacher.log({"loss": 5.0}, 1)
    first = Tracker.open(cfg, tmp_path, "resumable", params)
    for step in (1, 2, 3, 4):
        first.log({"loss": 10.0 + step}, step)
    first.close("killed")  # interrupted after step 4; the checkpoint is at step 2
    ids_before = json.loads((tmp_path / TRACKING_FILE).read_text())
    second = Tracker.open(cfg, tmp_path, "resumable", params, resume_step=2)
    for step in (3, 4, 5):
        second.log({"loss": 20.0 + step}, step)
    second.close()
    ids_after = json.loads((tmp_path / TRACKING_FILE).read_text())
    if "tensorboard" in backends:
        # what the first attempt logged after the checkpoint (steps 3, 4) is replaced by the second's
        got = [(e.step, e.value) for e in _tb(tmp_path).Scalars("loss")]
        assert got == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0), (5, 25.0)]
        assert [(e.step, e.value) for e in _tb(tmp_path / "teacher").Scalars("loss")] == [(1, 5.0)]
    if "mlflow" in backends:
        assert not (tmp_path / "teacher" / "mlflow").exists()
        assert ids_after["mlflow_run_id"] == ids_before["mlflow_run_id"]  # one MLflow run, not two
        client = _mlflow_client(ids_after)
        exp = client.get_experiment(ids_after["mlflow_experiment_id"])
        runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
        assert set(runs) == {"resumable-teacher", "resumable"}  # two stages, one experiment, one store
        run = client.get_run(ids_after["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.params == {"name": "resumable", "train.epochs": "2"}
        assert runs["resumable-teacher"].info.status == "FINISHED"
        steps = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
        assert (5, 25.0) in steps and (1, 11.0) in steps  # MLflow keeps every logged point


# ----------------------------------------------------------------------------- W&B (offline)


def _wandb_records(run_dir: Path, timeout: float = 60.0) -> list:
    """The offline run's records, once its exit record is on disk.

    ``run.finish()`` returns when W&B's service has handled the exit; its writer may flush the
    file a moment later, so wait for the exit record (a missing one after ``timeout`` fails).
    """
    import time

    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + timeout
    while True:
        records = _parse_wandb(files[0].read_bytes())
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _parse_wandb(data: bytes) -> list:
    """Records of a .wandb file (LevelDB log framing: 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    if len(data) < 7:
        return []  # not even the file header yet
    assert data[:4] == b":W&B"
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):
            break  # a chunk still being written
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(chunks)
            records.append(rec)
    return records


def test_wandb_offline_history_config_artifacts(tracked):
    _need("wandb")
    records = _wandb_records(tracked["run_dir"])
    by_kind: dict = {}
    for r in records:
        by_kind.setdefault(r.WhichOneof("record_type"), []).append(r)
    run = by_kind["run"][0].run
    assert run.display_name == "ci-smoke-0" and run.project == tracked["recipe"].name
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["train"]["lr"] == tracked["recipe"].train.lr and config["method"]["name"] == "kd"
    history = {}
    for r in by_kind["history"]:
        items = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.history.item}
        history[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    assert sorted(history) == [2, 4, 6]
    assert history[2] == {"epoch": 1, "lr": 0.05, "img_s": 812.5, "loss_ce": 2.25, "loss_kd": 1.5, "loss": 3.75}
    assert history[4]["top1"] == 0.375 and history[4]["loss_ce"] == 1.75  # train and val rows of one step merge
    arts = {r.artifact.name: [c.path for c in r.artifact.manifest.contents] for r in by_kind["artifact"]}
    assert arts == {"ci-smoke-0-weights": ["model.safetensors"],
                    "ci-smoke-0-student": ["config.json", "model.safetensors"]}
    assert by_kind["exit"][0].exit.exit_code == 0
    assert tracked["ids"]["wandb_run_id"] == run.run_id


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend, module", [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow"),
                                             ("wandb", "wandb")])
def test_missing_library_is_exit_4_before_anything_opens(tmp_path, monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if it were not installed
    # the missing one last: the installed ones before it must not have been opened either
    cfg = TrackingConfig(backends=[b for b in AVAILABLE if b != backend] + [backend])
    with pytest.raises(MissingCapability) as err:
        Tracker.open(cfg, tmp_path / "run", "r", {"name": "r"})
    assert err.value.exit_code == 4
    assert f"'{backend}'" in err.value.message and f"distillctl[{backend}]" in err.value.message
    assert not (tmp_path / "run").exists()  # checked before any backend created files


def test_recipe_rejects_unknown_and_duplicate_backends(tmp_path):
    with pytest.raises(BadInput, match="tracking.backends.0.*tensorboard"):
        load_recipe(RECIPES / "ci_smoke.yaml", ["tracking.backends=[tensorbord]"])
    with pytest.raises(BadInput, match="more than once"):
        load_recipe(RECIPES / "ci_smoke.yaml", ["tracking.backends=[mlflow,mlflow]"])
    with pytest.raises(BadInput, match="unknown key 'tracking.backend'"):
        load_recipe(RECIPES / "ci_smoke.yaml", ["tracking.backend=[mlflow]"])


def test_artifact_that_does_not_exist_is_bad_input(tmp_path):
    _need("tensorboard")
    with Tracker.open(TrackingConfig(backends=["tensorboard"]), tmp_path, "r", {}) as tracker:
        with pytest.raises(BadInput, match="do not exist"):
            tracker.log_artifacts({"onnx": tmp_path / "student" / "model.onnx"})


def test_bad_mlflow_uri_is_bad_input(tmp_path):
    _need("mlflow")
    cfg = TrackingConfig(backends=["mlflow"], mlflow_uri="nosuchscheme://x")
    with pytest.raises(BadInput, match="tracking.mlflow_uri"):
        Tracker.open(cfg, tmp_path, "r", {})


def test_the_trainer_and_export_feed_tensorboard_and_mlflow(tmp_path, teacher_weights):
    """End to end: `distill` logs every loss term, lr, img/s and validation metric; `export` attaches artifacts."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import run_cli

    run = tmp_path / "run"
    r = run_cli("distill", str(RECIPES / "ci_smoke.yaml"), "--set", f"teacher.weights={teacher_weights}",
                "--set", "tracking.backends=[tensorboard,mlflow]", "--set", "train.epochs=2", "--out", str(run),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("export", str(run), "--format", "safetensors,onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"loss", "loss_ce", "loss_kd", "lr", "img_s", "top1", "top5"} <= tags
    assert [e.step for e in ea.Scalars("top1")] == [8, 16]  # one validation per epoch, at its global step
    ids = json.loads((run / TRACKING_FILE).read_text())
    client = MlflowClient(tracking_uri=ids["mlflow_uri"])
    got = client.get_run(ids["mlflow_run_id"])
    assert got.data.params["method.name"] == "kd" and got.data.params["train.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(ids["mlflow_run_id"], "top1")] == [8, 16]
    arts = {a.path for a in client.list_artifacts(ids["mlflow_run_id"])}
    assert {"onnx", "safetensors"} <= arts
