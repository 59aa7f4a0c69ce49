"""Experiment tracking: one small adapter over TensorBoard, MLflow and Weights & Biases.

Off by default (``tracking.backends: []``). Each backend is an optional extra
(``pip install 'distillctl[tensorboard]'``, ``[mlflow]``, ``[wandb]``); asking for one that is not
installed fails at ``Tracker.open``, before any training, with exit 4 and the extra to install.

What each backend receives:
- metrics: every numeric key of a row (``loss_<term>``, ``lr``, ``img_s``, ``top1``...) at the
  given step;
- the resolved recipe as parameters (dotted keys, ``train.lr``); TensorBoard gets it as a text
  table;
- the exported artifacts (files or folders); TensorBoard gets a text table of their paths.

Nothing reaches the network unless the recipe says so: MLflow's default store is SQLite inside
the run folder (``RUN/mlflow/mlflow.db``, artifacts in ``RUN/mlflow/artifacts``; MLflow 3 keeps
its ``file:`` store only in maintenance mode), MLflow's telemetry is switched off, and W&B runs
offline (``RUN/wandb``; ``wandb sync`` uploads it later). The ids of the MLflow and W&B runs are
kept in ``RUN/tracking.json`` so a resumed run continues the same tracked run.
"""
from __future__ import annotations

import inspect
import json
import logging
import numbers
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from .errors import BadInput, Interrupted, MissingCapability
from .recipe import TrackingConfig
from .run import MLFLOW_DIR, TENSORBOARD_DIR, TRACKING_FILE  # the run folder's names live with its owner

STEP_KEYS = ("step", "global_step")  # the x axis, not a metric
STATUSES = ("finished", "failed", "killed")
MLFLOW_PARAM_MAX = 6000  # characters MLflow keeps in one parameter value
_EXTRA = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def flatten_params(params: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b": value}``; lists become compact JSON, scalars stay as they are."""
    flat: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(flatten_params(v, key + "."))
        elif isinstance(v, (list, tuple, dict)):
            flat[key] = json.dumps(v, separators=(",", ":"))
        else:
            flat[key] = v
    return flat


def numeric_items(row: dict) -> dict[str, float]:
    """The metrics of a row: finite or not, every real number except bools and the step counters."""
    out = {}
    for k, v in row.items():
        if k in STEP_KEYS or isinstance(v, bool):
            continue
        if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # a 0-d tensor or numpy scalar
            v = v.item()
        if isinstance(v, numbers.Real):
            out[k] = float(v)
    return out


def require_backends(cfg: TrackingConfig) -> None:
    """Raise MissingCapability (exit 4) naming the extra when a backend in ``cfg.backends`` is not installed."""
    for b in cfg.backends:
        _require(b)


def _require(backend: str) -> None:
    """Import the backend's library now, so a missing one fails before training starts."""
    try:
        if backend == "tensorboard":
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        elif backend == "mlflow":
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage pings from a training job
            import mlflow  # noqa: F401
        else:
            import wandb  # noqa: F401
    except ImportError as err:
        extra = _EXTRA[backend]
        raise MissingCapability(
            f"tracking.backends includes '{backend}' but it cannot be imported ({err}); install it with "
            f"pip install 'distillctl[{extra}]' (or pip install {extra}), or remove '{backend}' from "
            "tracking.backends") from None


def _markdown_table(rows: dict[str, Any]) -> str:
    lines = ["| key | value |", "| --- | --- |"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- backends


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, flat: dict, resume_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / TENSORBOARD_DIR
        # on resume, what the first attempt logged after the checkpoint's step is hidden (purge_step)
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(self.dir), purge_step=purge, flush_secs=30)
        if resume_step is None:
            self.writer.add_text("recipe", _markdown_table(flat), 0)

    def ids(self) -> dict:
        return {"tensorboard_dir": str(self.dir)}

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def log_artifacts(self, paths: dict[str, Path], step: int) -> None:
        self.writer.add_text("artifacts", _markdown_table({k: str(p) for k, p in paths.items()}), step)
        self.writer.flush()

    def close(self, status: str, step: int) -> None:
        self.writer.add_text("status", status, step)
        self.writer.close()


class _MLflow:
    name = "mlflow"
    _STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

    def __init__(self, cfg: TrackingConfig, run_dir: Path, store_dir: Path, run_name: str, experiment: str,
                 flat: dict, run_id: Optional[str]):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        for quiet in ("alembic", "mlflow.store.db.utils"):  # schema-creation chatter on a new SQLite store
            logging.getLogger(quiet).setLevel(logging.WARNING)
        store = store_dir / MLFLOW_DIR
        if cfg.mlflow_uri:
            uri, artifacts = cfg.mlflow_uri, None
            if uri.startswith("file:") or "://" not in uri:
                # asked for by name: MLflow 3 refuses its file store unless this opt-out is set
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        else:
            store.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{store.resolve() / 'mlflow.db'}", (store / "artifacts").resolve().as_uri()
        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                exp_id = self.client.create_experiment(experiment, artifact_location=artifacts)
            else:
                exp_id = exp.experiment_id
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp_id)
            run = None
            if run_id:
                try:
                    run = self.client.get_run(run_id)
                except MlflowException:
                    run = None  # not in this store (another URI): start a new run
            if run is None:
                run = self.client.create_run(exp_id, run_name=run_name, tags={"distillctl.run_dir": str(run_dir)})
                self._log_params(run.info.run_id, flat)
            else:
                self.client.update_run(run.info.run_id, status="RUNNING")
        except MlflowException as err:
            raise BadInput(f"MLflow could not open tracking URI {uri!r}: {err.message}; check tracking.mlflow_uri "
                           "(unset it for a SQLite store inside the run folder)") from None
        self.run_id = run.info.run_id
        self.experiment_id = exp_id

    def _log_params(self, run_id: str, flat: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:MLFLOW_PARAM_MAX]) for k, v in flat.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(run_id, params=params[i:i + 100])

    def ids(self) -> dict:
        return {"mlflow_run_id": self.run_id, "mlflow_experiment_id": self.experiment_id, "mlflow_uri": self.uri}

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_artifacts(self, paths: dict[str, Path], step: int) -> None:
        for name, path in paths.items():
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=name)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path=name)

    def close(self, status: str, step: int) -> None:
        self.client.set_terminated(self.run_id, self._STATUS[status])


class _WandB:
    name = "wandb"
    _EXIT = {"finished": 0, "failed": 1, "killed": 130}

    def __init__(self, cfg: TrackingConfig, store_dir: Path, run_name: str, experiment: str, params: dict,
                 run_id: Optional[str]):
        if cfg.wandb_mode == "offline":
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # offline means no crash reports either
        import wandb

        settings = wandb.Settings(silent=True, console="off", reinit="create_new", x_disable_stats=True,
                                  x_save_requirements=False, save_code=False)
        self.run = wandb.init(mode=cfg.wandb_mode, dir=str(store_dir), project=experiment, name=run_name,
                              id=run_id, resume="allow" if run_id else None, config=params, settings=settings)
        self.prefix = re.sub(r"[^A-Za-z0-9._-]+", "-", run_name)

    def ids(self) -> dict:
        return {"wandb_run_id": self.run.id, "wandb_dir": str(self.run.dir)}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_artifacts(self, paths: dict[str, Path], step: int) -> None:
        import wandb

        for name, path in paths.items():
            art = wandb.Artifact(f"{self.prefix}-{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}", type="distillctl")
            add = art.add_dir if path.is_dir() else art.add_file
            # immutable: the exported files are final, so W&B references them instead of staging a copy
            kw = {"policy": "immutable"} if "policy" in inspect.signature(add).parameters else {}
            add(str(path), **kw)
            self.run.log_artifact(art)

    def close(self, status: str, step: int) -> None:
        self.run.finish(exit_code=self._EXIT[status])


# ----------------------------------------------------------------------------- the adapter


class Tracker:
    """Forwards rows, parameters and artifacts to every enabled backend; a no-op when none is."""

    def __init__(self, sinks: list, run_dir: Optional[Path] = None):
        self.sinks = sinks
        self.run_dir = run_dir
        self.last_step = 0
        self.closed = False

    @classmethod
    def open(cls, cfg: TrackingConfig, run_dir: str | Path, run_name: str, params: dict, *,
             resume_step: Optional[int] = None, store_dir: str | Path | None = None) -> "Tracker":
        """Open one run per backend in ``cfg.backends`` (none: a no-op tracker).

        ``params``: the resolved recipe (``recipe.model_dump(mode="json")``), nested or flat.
        ``resume_step``: the checkpoint's global step a resumed training restarts after; the MLflow/W&B runs
        recorded in ``RUN/tracking.json`` are continued instead of new ones. Raises
        MissingCapability (exit 4) for a backend that is not installed, BadInput for a bad URI.
        ``store_dir`` (default ``run_dir``): where MLflow's default SQLite store and W&B's files go,
        so the stages of one ``run`` (teacher in RUN/teacher, student in RUN) share one store.
        """
        if not cfg.backends:
            return cls([])
        require_backends(cfg)  # every import first: fail before creating anything
        run_dir = Path(run_dir)
        store = Path(store_dir) if store_dir is not None else run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        store.mkdir(parents=True, exist_ok=True)
        ids_path = run_dir / TRACKING_FILE
        known: dict = {}
        if resume_step is not None and ids_path.is_file():
            try:
                known = json.loads(ids_path.read_text())
            except (OSError, ValueError):
                known = {}
        experiment = cfg.experiment or str(params.get("name") or "distillctl")
        flat = flatten_params(params)
        sinks: list = []
        try:
            for b in cfg.backends:
                if b == "tensorboard":
                    sinks.append(_TensorBoard(run_dir, flat, resume_step))
                elif b == "mlflow":
                    sinks.append(_MLflow(cfg, run_dir, store, run_name, experiment, flat, known.get("mlflow_run_id")))
                else:
                    sinks.append(_WandB(cfg, store, run_name, experiment, params, known.get("wandb_run_id")))
        except BaseException:
            for s in sinks:
                s.close("failed", 0)
            raise
        tracker = cls(sinks, run_dir)
        tracker.last_step = resume_step or 0
        ids = {"backends": list(cfg.backends)}
        for s in sinks:
            ids.update(s.ids())
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")
        return tracker

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    def log(self, row: dict, step: int, prefix: str = "") -> None:
        """Log every numeric value of ``row`` (``prefix`` + key) at ``step`` (the global step)."""
        if not self.sinks:
            return
        metrics = {f"{prefix}{k}": v for k, v in numeric_items(row).items()}
        if not metrics:
            return
        self.last_step = max(self.last_step, int(step))
        for s in self.sinks:
            s.log(metrics, int(step))

    def log_artifacts(self, paths: dict[str, str | Path]) -> None:
        """Attach exported files or folders, ``{"onnx": RUN/student/model.onnx, ...}``; each must exist."""
        if not self.sinks:
            return
        paths = {k: Path(p) for k, p in paths.items()}
        missing = [f"{k}: {p}" for k, p in paths.items() if not p.exists()]
        if missing:
            raise BadInput(f"cannot log artifacts that do not exist: {', '.join(missing)}")
        for s in self.sinks:
            s.log_artifacts(paths, self.last_step)

    def close(self, status: str = "finished") -> None:
        """End every backend's run: ``finished``, ``failed`` or ``killed`` (interrupted). Idempotent."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if self.closed:
            return
        self.closed = True
        for s in self.sinks:
            s.close(status, self.last_step)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("finished")
        elif issubclass(exc_type, (Interrupted, KeyboardInterrupt)):
            self.close("killed")
        else:
            self.close("failed")

