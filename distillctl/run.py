"""The run folder: one owner for every path, file name, read and write inside it.

Layout of ``RUN/`` (nothing outside this module spells these names)::

    recipe.yaml          the resolved recipe, written once when the run is created
    manifest.json        versions, seed, device, recipe hash, start/end, status, stages, amendments
    metrics.jsonl        one JSON object per logged step and per epoch, each exactly once
    checkpoint.pt        the trainer state (student, training-only modules, optimizer, RNG, ...)
    best.safetensors     the student weights of the best validation epoch
    student/             model.safetensors + config.json: the bare student, timm's local-dir layout
    teacher/             a nested run: the teacher that `distillctl run` trained for this run
    export/              model.onnx, model.fp16.onnx, model.int8.onnx, model.engine (+ .json), timing cache
    export.json  bench.json  bench.png  MODEL_CARD.md  training_curves.png
    tracking.json  tensorboard/  mlflow/  wandb/    only with tracking.backends

Writes are atomic (a temporary sibling, then a rename: a kill never leaves a half-written file under
a final name), use ordinary modes (0644 under the usual umask), never follow a symlink planted inside
the folder, and happen only while the process holds the folder's exclusive lock. Temporary files
left by a killed process are removed when the next writer takes the lock; temporaries of this
process are removed when its command ends, however it ends (``cleanup_temps``).
"""
from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import BadInput
from .files import (FILE_MODE, PENDING, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json_file,
                    storage_error)
from .recipe import Recipe

_HELD: dict[str, list] = {}  # run folders this process holds the lock of: resolved path -> [fd, depth]

RECIPE_FILE = "recipe.yaml"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.safetensors"
STUDENT_DIR = "student"
TEACHER_DIR = "teacher"
EXPORT_DIR = "export"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# the INT8 ONNX exists in two encodings: ONNX Runtime's (uint8 activations) and TensorRT's (symmetric int8)
ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx",
              "int8_trt": "model.int8.trt.onnx"}
ENGINE_FILES = {"fp32": "model.engine", "fp16": "model.fp16.engine", "int8": "model.int8.engine"}
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
TIMING_CACHE_FILE = "trt_timing.cache"
EXPORT_JSON = "export.json"
BENCH_JSON = "bench.json"
BENCH_PNG = "bench.png"
CARD_FILE = "MODEL_CARD.md"
CURVES_PNG = "training_curves.png"
LATEST = "latest"
TRACKING_FILE = "tracking.json"  # ids of the tracked MLflow / W&B runs, so a resume continues them
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlflow"  # MLflow's default SQLite store and its artifacts (W&B writes its own wandb/)

# Recipe keys a resumed run may change with --amend: they steer the optimisation or the reports,
# never the shapes of the models, the data or the method's modules.
AMENDABLE = ("train.lr", "train.min_lr", "train.grad_clip", "train.epochs", "train.log_every", "train.ema_decay",
             "train.early_stop_patience", "teacher.train.lr", "teacher.train.min_lr", "teacher.train.grad_clip",
             "teacher.train.epochs", "teacher.train.log_every", "teacher.train.early_stop_patience",
             "export.", "bench.", "tracking.")


def runs_dir() -> Path:
    """Where new run folders go and where ``latest`` lives (``$DISTILLCTL_RUNS``, default ``runs``)."""
    return Path(os.environ.get("DISTILLCTL_RUNS", "runs"))


# ----------------------------------------------------------------------------- the student on disk

def read_student_config(folder: Path) -> dict:
    """``config.json`` of a student folder, checked for the keys loading needs."""
    cfg = read_json_file(Path(folder) / CONFIG_FILE, "a student folder holds model.safetensors and config.json")
    missing = [k for k in ("architecture", "num_classes", "pretrained_cfg") if k not in cfg]
    pc = cfg.get("pretrained_cfg")
    if not missing and not (isinstance(pc, dict) and isinstance(pc.get("input_size"), list)):
        missing.append("pretrained_cfg.input_size")
    if missing:
        raise BadInput(f"{Path(folder) / CONFIG_FILE} lacks {', '.join(missing)}; it was not written by distillctl "
                       "or is damaged (re-export the student)")
    return cfg


def student_config(recipe: Recipe, num_classes: int, mean, std, *, class_names: Optional[list] = None,
                   preprocess: Optional[dict] = None, extra: Optional[dict] = None,
                   recipe_hash: Optional[str] = None) -> dict:
    """``config.json`` of a student: timm's local-model keys (architecture, num_classes, pretrained_cfg) + ours.

    ``pretrained_cfg`` carries the exact evaluation preprocessing (input size, interpolation, crop,
    mean/std) so ``timm.data.resolve_data_config`` rebuilds the transform the reported accuracy used.
    """
    size = recipe.student.image_size or recipe.data.image_size
    pc = {"input_size": [3, size, size], "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
          **(preprocess or {}), "mean": [float(v) for v in mean], "std": [float(v) for v in std],
          "num_classes": num_classes}
    cfg = {"architecture": recipe.student.model, "num_classes": num_classes,
           "model_args": dict(recipe.student.kwargs), "pretrained_cfg": pc}
    if class_names:
        cfg["label_names"] = list(class_names)
        pc["label_names"] = list(class_names)
    cfg["distillctl"] = {"recipe_hash": recipe_hash or recipe.hash(), "method": recipe.method.name,
                         "teacher": recipe.teacher.model if recipe.teacher else None, **(extra or {})}
    return cfg


def save_student_folder(folder: Path, model, config: dict) -> Path:
    """Write the student's weights (contiguous CPU tensors) and its config into ``folder``, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "architecture": config["architecture"], "num_classes": str(config["num_classes"])}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in config.get("distillctl", {}).items()})
    path = folder / WEIGHTS_FILE
    save_weights(path, sd, meta)
    atomic_write_json(folder / CONFIG_FILE, config)
    return path


def save_weights(path: Path, state: dict, metadata: Optional[dict] = None) -> None:
    """Serialized in memory, then written, flushed to disk and renamed into place (``atomic_write_bytes``): a
    refused write reaches us as the OSError it is (exit 2), never as a library's message about it."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(state, metadata=metadata))


def load_student_folder(path: Path, device="cpu"):
    """Recreate the student with timm from config.json and load the weights strictly -> (model, config)."""
    from .compat import import_timm
    from .models import load_into, read_state_dict

    timm = import_timm()
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / WEIGHTS_FILE if path.is_dir() else path
    cfg = read_student_config(folder)
    try:
        model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=int(cfg["num_classes"]),
                                  **(cfg.get("model_args") or {}))
    except Exception as err:
        raise BadInput(f"{folder / CONFIG_FILE} names a model timm cannot build ({cfg['architecture']}: "
                       f"{type(err).__name__}: {str(err)[:200]})") from None
    load_into(model, read_state_dict(weights), source=str(weights))
    return model.to(device).eval(), cfg


def sidecar_of(engine: Path) -> Path:
    """The JSON that travels with a TensorRT engine (the engine stays TensorRT's plan, byte for byte)."""
    return Path(engine).with_name(Path(engine).name + ".json")


# ----------------------------------------------------------------------------- names

def safe_name(name: str) -> str:
    """A run-folder name from a recipe name: no separators, no leading dot, at most 80 characters."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-")[:80]
    return s or "run"


# ----------------------------------------------------------------------------- the run

class Run:
    """A run folder: its paths, its recipe (read once), manifest, metrics, checkpoint, student and lock."""

    def __init__(self, root: Path, recipe: Optional[Recipe] = None, *, nested: bool = False):
        self.root = Path(root)
        self.nested = nested  # a teacher trained for another run (RUN/teacher): never `latest`
        self._recipe = recipe
        self._manifest: Optional[dict] = None
        self.pending_amendment: Optional[tuple] = None  # (recipe, changes) set by flows.prepare for --amend
        self._checkpoint: Optional[dict] = None

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    # -- construction -----------------------------------------------------------------
    @staticmethod
    def is_run(path: Path) -> bool:
        return (Path(path) / RECIPE_FILE).is_file()

    @classmethod
    def open(cls, path: Optional[str | Path] = None) -> "Run":
        """An existing run folder (default: ``runs/latest``); its recipe is read (and checked) once."""
        if path is None or str(path) == "":
            p = latest_run()
            if p is None:
                raise BadInput(f"no run given and {runs_dir() / LATEST} does not exist: run `distillctl run RECIPE` "
                               "or `distillctl distill RECIPE` first, or name the run folder")
        else:
            p = Path(path)
        if not p.is_dir():
            raise BadInput(f"run folder not found: {p}")
        if not cls.is_run(p):
            raise BadInput(f"{p} is not a distillctl run folder (no {RECIPE_FILE})")
        run = cls(p)
        run.recipe  # noqa: B018 - read and validate now: a damaged recipe is exit 2 before any work
        run.nested = bool(run.manifest.get("nested"))  # RUN/teacher of a `distillctl run`
        return run

    @classmethod
    def new(cls, recipe: Recipe, out: Optional[str | Path] = None) -> "Run":
        """A run folder for a new run of ``recipe``; checks ``out`` but writes nothing yet (see ``writing``).

        Under torchrun every rank names the same folder (the launcher's run id stands in for the time)
        and only rank 0 checks it: the others never write.
        """
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if distributed and int(os.environ.get("RANK", "0")) != 0:
            rid = safe_name(os.environ.get("TORCHELASTIC_RUN_ID", "ddp"))
            return cls(Path(out) if out else runs_dir() / f"{safe_name(recipe.name)}-{rid}", recipe)
        if out:
            root = Path(out)
            if root.exists() and not root.is_dir():
                raise BadInput(f"--out {root} exists and is not a folder; choose a folder path")
            if root.is_dir():
                if cls.is_run(root) or (root / CHECKPOINT_FILE).exists():
                    raise BadInput(f"{root} already holds a run; continue it with --resume, or choose another --out")
                if any(root.iterdir()):
                    raise BadInput(f"--out {root} is not empty; choose a new or empty folder")
        else:
            stamp = safe_name(os.environ.get("TORCHELASTIC_RUN_ID", "ddp")) if distributed else \
                time.strftime("%Y%m%d-%H%M%S")
            base = runs_dir() / f"{safe_name(recipe.name)}-{stamp}"
            root, i = base, 1
            while root.exists() and not distributed:  # under torchrun every rank must name the same folder
                root = base.with_name(f"{base.name}-{i}")
                i += 1
        return cls(root, recipe)

    def child(self, name: str, recipe: Optional[Recipe] = None) -> "Run":
        """A nested run (the teacher of `distillctl run`); it never moves ``latest``."""
        if name != TEACHER_DIR:
            raise ValueError(name)
        return Run(self.root / name, recipe, nested=True)

    @property
    def teacher(self) -> "Run":
        return self.child(TEACHER_DIR)

    # -- the recipe ----------------------------------------------------------------------
    @property
    def recipe(self) -> Recipe:
        if self._recipe is None:
            from .recipe import load_recipe

            path = self.root / RECIPE_FILE
            try:
                self._recipe = load_recipe(path)
            except BadInput as err:
                raise BadInput(f"the run's {path} is unreadable or invalid ({err.message}); it was not modified") from None
        return self._recipe

    def amend(self, new: Recipe, changes: dict) -> None:
        """Replace the recipe with ``new`` (only AMENDABLE keys differ) and record the change in the manifest."""
        old_hash = self.recipe.hash()
        self._recipe = new
        self._write(RECIPE_FILE, new.to_yaml())
        self.manifest.setdefault("amendments", []).append(
            {"at": _now(), "from_hash": old_hash, "to_hash": new.hash(),
             "changes": {k: [a, b] for k, (a, b) in changes.items()}})
        self.manifest["recipe_hash"] = new.hash()
        self.save_manifest()

    def accepted_hashes(self) -> set[str]:
        """The run's recipe hash and every hash it had before an --amend (a checkpoint may carry any)."""
        out = {self.recipe.hash()}
        out.update(a.get("from_hash") for a in self.manifest.get("amendments", []))
        return {h for h in out if h}

    # -- paths ---------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        """``RUN/parts...``, refusing a symlink anywhere below the run root (never write through one)."""
        p = self.root
        for part in parts:
            p = p / part
            if p.is_symlink():
                raise BadInput(f"refusing to use {p}: it is a symbolic link inside the run folder {self.root} "
                               "(remove it; distillctl never writes through links)")
        return p

    def _dir(self, *parts: str) -> Path:
        d = self.path(*parts)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error(d, err) from None
        return d

    @property
    def checkpoint_file(self) -> Path:
        return self.path(CHECKPOINT_FILE)

    @property
    def best_file(self) -> Path:
        return self.path(BEST_FILE)

    def _model_parts(self) -> tuple[str, ...]:
        # a run's trained network lives in RUN/student/; the teacher run nested in RUN/teacher/ keeps its
        # network at its own root, so RUN/teacher/ itself is the teacher's timm local-dir folder
        return () if self.nested else (STUDENT_DIR,)

    @property
    def student_dir(self) -> Path:
        return self.path(*self._model_parts())

    @property
    def student_weights(self) -> Path:
        return self.path(*self._model_parts(), WEIGHTS_FILE)

    @property
    def export_dir(self) -> Path:
        return self._dir(EXPORT_DIR)

    def onnx_file(self, precision: str = "fp32") -> Path:
        return self.path(EXPORT_DIR, ONNX_FILES[precision])

    def failed_file(self, final: Path) -> Path:
        """Where an artifact that failed its gate is kept: ``model.onnx`` -> ``model.failed.onnx``."""
        final = Path(final)
        return final.with_name(f"{final.stem}.failed{final.suffix}")

    def engine(self, precision: str = "fp32") -> Path:
        """Each precision keeps its own engine: model.engine, model.fp16.engine, model.int8.engine."""
        return self.path(EXPORT_DIR, ENGINE_FILES[precision])

    @property
    def timing_cache(self) -> Path:
        return self.path(EXPORT_DIR, TIMING_CACHE_FILE)

    @property
    def card_file(self) -> Path:
        return self.path(CARD_FILE)

    @property
    def curves_png(self) -> Path:
        return self.path(CURVES_PNG)

    @property
    def bench_png(self) -> Path:
        return self.path(BENCH_PNG)

    def resolve(self, name: Path | str) -> Path:
        """A path as a report stores it (relative to the run folder, or absolute) -> a usable path."""
        p = Path(name)
        return p if p.is_absolute() else self.root / p

    def read_report(self, name: str) -> Optional[dict]:
        """export.json / bench.json for reading; a damaged one is treated as absent (with a warning): reports
        are rewritten by the command that makes them, so they must never block it."""
        try:
            return self.read_json(name)
        except BadInput as err:
            import logging

            logging.getLogger("distillctl").warning(f"warning: {err.message}")
            return None

    def relative(self, path: Path | str) -> str:
        """``path`` relative to the run folder when inside it (what the card and reports print)."""
        try:
            return str(Path(path).resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)

    def artifacts(self) -> dict[str, Path]:
        """Every exported artifact present now, by the names the --json document uses."""
        out = {}
        if self.student_weights.is_file():
            out["safetensors"] = self.student_weights
        for prec, key in (("fp32", "onnx"), ("fp16", "onnx_fp16"), ("int8", "onnx_int8"), ("int8_trt", "onnx_int8_trt")):
            if self.path(EXPORT_DIR, ONNX_FILES[prec]).is_file():
                out[key] = self.path(EXPORT_DIR, ONNX_FILES[prec])
        for prec, key in (("fp32", "trt"), ("fp16", "trt_fp16"), ("int8", "trt_int8")):
            if self.path(EXPORT_DIR, ENGINE_FILES[prec]).is_file():
                out[key] = self.path(EXPORT_DIR, ENGINE_FILES[prec])
        return out

    # -- writing -------------------------------------------------------------------------
    def _write(self, name: str, text: str) -> Path:
        p = self.path(name)
        atomic_write_text(p, text)
        return p

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path(name)
        atomic_write_json(p, obj)
        return p

    def write_bytes(self, name: str, data: bytes) -> Path:
        p = self.path(name)
        atomic_write_bytes(p, data)
        return p

    def read_json(self, name: str) -> Optional[dict]:
        """A report of the run (export.json, bench.json), or None when absent; malformed is exit 2."""
        p = self.path(name)
        return read_json_file(p) if p.exists() else None

    @contextmanager
    def writing(self) -> Iterator["Run"]:
        """Hold the folder's exclusive lock while writing it; stale temporaries are removed on entry.

        A second process asking for the same folder gets exit 2 at once (no waiting, no interleaving).
        Re-entrant within one process (``run`` holds the lock while its export and bench stages take it).
        """
        self._dir()
        key = str(self.root.resolve())
        if key in _HELD:
            _HELD[key][1] += 1
            try:
                yield self
            finally:
                _HELD[key][1] -= 1
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise BadInput(f"another distillctl process is writing {self.root}; wait for it to finish "
                           "(one process at a time writes a run folder)") from None
        _HELD[key] = [fd, 1]
        try:
            self._remove_stale_temps()
            yield self
        finally:
            del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _remove_stale_temps(self) -> None:
        # we hold the lock: no other writer exists, so every temporary here is a killed process's leftover
        import shutil

        for d in (self.root, self.root / STUDENT_DIR, self.root / EXPORT_DIR):
            if d.is_dir() and not d.is_symlink():
                for f in [*d.glob(".*.tmp"), *d.glob(".*.tmp.*"), *d.glob("*.staged.*")]:
                    if f.is_file() and f not in PENDING:
                        f.unlink(missing_ok=True)
                for w in d.glob(".int8-*"):  # the INT8 quantizer's work folder of a killed export
                    if w.is_dir() and not w.is_symlink():
                        shutil.rmtree(w, ignore_errors=True)

    def create(self, command: str) -> None:
        """Write a new run's recipe and manifest (call inside ``writing``)."""
        self._write(RECIPE_FILE, self.recipe.to_yaml())
        self._manifest = {"command": command, "recipe_hash": self.recipe.hash(), "seed": self.recipe.seed,
                          "created": _now(), "status": "created", "stages": {}}
        if self.nested:
            self._manifest["nested"] = True
        self.save_manifest()

    # -- manifest ------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            p = self.path(MANIFEST_FILE)
            self._manifest = read_json_file(p) if p.exists() else {}
        return self._manifest

    def save_manifest(self) -> None:
        self.write_json(MANIFEST_FILE, self.manifest)

    def start(self, *, device: str, stage: Optional[str] = None) -> None:
        """Status ``running`` with this process's versions, device and command line."""
        from .device import versions

        m = self.manifest
        m.setdefault("started", _now())
        m.update(status="running", device=device, versions=versions(), argv=list(sys.argv),
                 recipe_hash=self.recipe.hash(), seed=self.recipe.seed)
        m.pop("ended", None)
        m.pop("error", None)
        if stage:
            m.setdefault("stages", {})[stage] = "running"
        self.save_manifest()

    def set_stage(self, stage: str, status: str) -> None:
        self.manifest.setdefault("stages", {})[stage] = status
        self.save_manifest()

    def stage_status(self, stage: str) -> Optional[str]:
        return self.manifest.get("stages", {}).get(stage)

    def update(self, **fields) -> None:
        self.manifest.update(fields)
        self.save_manifest()

    def end(self, status: str, **fields) -> None:
        self.manifest.update(status=status, ended=_now(), **fields)
        self.save_manifest()

    def mark_started_work(self) -> None:
        """The run has begun real work: top-level runs become ``runs/latest``."""
        if not self.nested:
            set_latest(self.root)

    # -- metrics -------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        """Append one row; a torn last line (a kill during an append) is closed off first, never glued to."""
        p = self.path(METRICS_FILE)
        line = json.dumps(row, default=float) + "\n"
        try:
            fd = os.open(p, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise BadInput(f"refusing to append to {p}: it is a symbolic link") from None
            raise storage_error(p, err) from None
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line
            os.write(fd, line.encode())
        except OSError as err:
            raise storage_error(p, err) from None
        finally:
            os.close(fd)

    def metrics_rows(self) -> list[dict]:
        """Every row of metrics.jsonl. A torn last line is skipped; a malformed line elsewhere is exit 2."""
        p = self.path(METRICS_FILE)
        if not p.exists():
            return []
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise BadInput(f"{p} is unreadable ({err})") from None
        lines = text.split("\n")
        rows = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError:
                if i == len(lines) - 1:  # no newline after it: a torn final append
                    continue
                raise BadInput(f"{p}, line {i + 1}, is not a JSON object (damaged file); it was not modified. "
                               "Resuming the run rewrites it from the checkpoint") from None
            rows.append(row)
        return rows

    def truncate_metrics(self, epochs_done: int, global_step: int) -> int:
        """Keep the rows the checkpoint covers (steps <= global_step, epochs <= epochs_done); returns rows dropped.

        Rows logged after the last checkpoint are logged again by the resumed run, so keeping them would
        count them twice; damaged lines are dropped too.
        """
        p = self.path(METRICS_FILE)
        if not p.exists():
            return 0
        kept, dropped = [], 0
        for line in p.read_text(errors="replace").split("\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                assert isinstance(row, dict)
            except (ValueError, AssertionError):
                dropped += 1
                continue
            is_epoch = "top1" in row and "step" not in row
            if (is_epoch and row.get("epoch", 0) <= epochs_done) or \
                    (not is_epoch and row.get("global_step", 0) <= global_step):
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            atomic_write_text(p, "".join(k + "\n" for k in kept))
        return dropped

    def clear_metrics(self) -> None:
        p = self.path(METRICS_FILE)
        if p.exists():
            p.unlink()

    # -- checkpoint ----------------------------------------------------------------------
    def has_checkpoint(self) -> bool:
        return self.checkpoint_file.is_file()

    def save_checkpoint(self, state: dict) -> None:
        import torch

        self._checkpoint = None
        # in memory first: torch.save writing to a file that cannot grow fails with whatever its zip writer
        # makes of it ("unexpected pos 576 vs 534", "iostream error"), not with the OSError (exit 2)
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.checkpoint_file, buf.getbuffer())

    def load_checkpoint(self) -> dict:
        """The trainer state (read once; ``flows.prepare`` reads it before a resume touches the folder)."""
        if self._checkpoint is not None:
            return self._checkpoint
        import torch

        p = self.checkpoint_file
        try:
            st = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:
            raise BadInput(f"cannot read checkpoint {p} ({type(err).__name__}: {str(err)[:200]}); it is damaged or "
                           "not a distillctl checkpoint. It was not modified") from None
        if not isinstance(st, dict) or not {"student", "epoch", "global_step"} <= set(st):
            raise BadInput(f"{p} is not a distillctl trainer checkpoint (missing student/epoch/global_step)")
        self._checkpoint = st
        return st

    def save_best(self, model, info: dict) -> None:
        sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_weights(self.best_file, sd, {k: json.dumps(v) for k, v in info.items()})

    def load_best(self) -> Optional[tuple[dict, dict]]:
        """``(state_dict, info)`` of the best epoch's weights (info: what ``save_best`` recorded), or None."""
        from .models import read_state_dict

        if not self.best_file.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.best_file), framework="pt") as f:
                info = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        except Exception:  # noqa: BLE001 - unreadable: treated as absent, the last epoch is exported
            return None
        return read_state_dict(self.best_file), info

    # -- the student -----------------------------------------------------------------------
    def save_student(self, model, config: dict) -> Path:
        return save_student_folder(self._dir(*self._model_parts()), model, config)

    def student_config(self) -> dict:
        return read_student_config(self.student_dir)

    def load_student(self, device="cpu"):
        if not self.student_weights.is_file():
            raise BadInput(f"{self.student_weights} not found: the run has no student yet "
                           "(did `distillctl distill` or `distillctl run` finish?)")
        model, cfg = load_student_folder(self.student_dir, device)
        if cfg["architecture"] != self.recipe.student.model:
            raise BadInput(f"{self.student_dir} holds a {cfg['architecture']} but the run's recipe says "
                           f"{self.recipe.student.model}")
        return model, cfg

    def verify(self, *, metrics: bool = True) -> None:
        """Read the files a command relies on; a damaged one is exit 2 before anything is written.

        ``metrics=False`` for a resume: it rewrites metrics.jsonl from the checkpoint (damaged lines go).
        Reports (export.json, bench.json) are not checked: the commands that write them replace them.
        """
        self.recipe  # noqa: B018
        self.manifest  # noqa: B018
        if metrics:
            self.metrics_rows()
        if self.student_weights.exists():
            self.student_config()

    def invalidate_exports(self) -> list[str]:
        """Remove the artifacts and reports derived from the current student (it is about to be replaced),
        and mark the export and bench stages as not done. Returns what was removed, relative to the run."""
        removed = []
        export = self.path(EXPORT_DIR)
        if export.is_dir():
            for f in sorted(export.iterdir()):
                if f.is_file() and f.name != TIMING_CACHE_FILE:
                    removed.append(self.relative(f))
                    f.unlink()
        for name in (EXPORT_JSON, BENCH_JSON, BENCH_PNG):
            p = self.path(name)
            if p.is_file():
                removed.append(name)
                p.unlink()
        stages = self.manifest.get("stages", {})
        for stage in ("export", "bench"):
            if stage in stages:
                stages[stage] = "pending"
        if removed:
            self.save_manifest()
        return removed

    def metrics_summary(self) -> dict:
        return dict(self.manifest.get("metrics") or {})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ----------------------------------------------------------------------------- latest

def set_latest(root: Path) -> None:
    """Point ``runs/latest`` at ``root`` (a relative symlink, replaced atomically)."""
    base = runs_dir()
    try:
        base.mkdir(parents=True, exist_ok=True)
        link = base / LATEST
        target = os.path.relpath(Path(root).resolve(), base.resolve())
        tmp = base / f".{LATEST}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError:  # a file system without symlinks: a text pointer
        atomic_write_text(base / f"{LATEST}.txt", str(Path(root).resolve()))


def latest_run() -> Optional[Path]:
    base = runs_dir()
    link = base / LATEST
    if link.is_symlink() or link.exists():
        p = link.resolve()
        return p if p.is_dir() else None
    txt = base / f"{LATEST}.txt"
    if txt.is_file():
        p = Path(txt.read_text().strip())
        return p if p.is_dir() else None
    return None


# ----------------------------------------------------------------------------- targets

@dataclass
class Target:
    """What a TARGET argument names: a run folder, a student's .safetensors, an .onnx file or an engine."""

    kind: str  # run | safetensors | onnx | trt
    path: Path  # the run root, the weights file, the .onnx file, the engine file
    run: Optional[Run]  # the run folder the artifact belongs to, if any

    @property
    def label(self) -> str:
        return self.run.root.name if self.run is not None else self.path.stem


def run_of(path: Path) -> Optional[Run]:
    """The run folder an artifact sits in (RUN/student/x, RUN/export/x or RUN/x), if any."""
    path = Path(path)
    for d in (path.parent, path.parent.parent):
        if Run.is_run(d):
            return Run.open(d)
    return None


def resolve_target(target: Optional[str]) -> Target:
    """The one answer to "what does this TARGET name" (eval, bench, card)."""
    if not target:
        run = Run.open(None)
        return Target("run", run.root, run)
    p = Path(target)
    if not p.exists():
        raise BadInput(f"target not found: {p}")
    if p.is_dir():
        if Run.is_run(p):
            run = Run.open(p)
            return Target("run", run.root, run)
        if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file():
            return Target("safetensors", p / WEIGHTS_FILE, run_of(p / WEIGHTS_FILE))
        raise BadInput(f"{p} is neither a run folder (no {RECIPE_FILE}) nor a student folder "
                       f"({WEIGHTS_FILE} + {CONFIG_FILE})")
    kind = {".safetensors": "safetensors", ".onnx": "onnx"}.get(p.suffix)
    if kind is None and p.suffix in ENGINE_SUFFIXES:
        kind = "trt"
    if kind is None:
        raise BadInput(f"cannot use {p}: expected a run folder, a .safetensors, an .onnx or a "
                       f"{'/'.join(ENGINE_SUFFIXES)} file")
    if kind == "safetensors" and not (p.parent / CONFIG_FILE).is_file():
        raise BadInput(f"{p.parent / CONFIG_FILE} not found: a student's .safetensors needs the config.json "
                       "written next to it")
    return Target(kind, p, run_of(p))

