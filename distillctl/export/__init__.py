"""Export: build the requested formats of a run's student, prove each one, apply the gates.

One table (``FORMATS``) drives validation and building; each format has one builder in its own
module (weights.py, onnx.py, trt.py) that returns Artifacts with a predictor. Every artifact with a
predictor is then run over the recipe's validation split and compared with the PyTorch student:
accuracy over the whole split, logit parity over its first ``export.parity_images`` images (max and
mean absolute difference, top-1 agreement).

Parity tolerances (a violation is a failed gate, exit 3):

=========  ====================================================  =====================
precision  max |logit diff|                                      top-1 agreement
=========  ====================================================  =====================
fp32       1e-4 x max(1, max |student logit|)                    >= 0.99
fp16       2e-2 x max(1, max |student logit|)                    >= 0.95
int8       0.25 x max(1, max |student logit|)                    >= 0.97
=========  ====================================================  =====================

FP32 runtimes reorder float sums, so their error grows with the logit scale: 1e-4 relative
is ~10x what ONNX Runtime's CPU provider shows on resnet18 and far below what a wrong op
gives; FP16 artifacts measure ~4e-4 of the logit scale on resnet18, 50x below their bound.
INT8 (static QDQ, per-channel weights, minmax or percentile calibration on 256 training images)
measured at most 0.165 of the logit scale and >= 0.983 agreement on resnet18, test_resnet, a small
ViT and a small Swin; a MobileNetV3 broken by INT8 gave <= 0.72 agreement: agreement is what
separates a good INT8 student from a broken one, the max-diff bound only catches gross failures.
``max_parity_diff`` replaces the max-diff bound with an absolute one, stated for FP32
artifacts; other precisions get the same multiple as their defaults, so one recipe value gates
all. ``min_top1`` is a floor on each artifact's top-1; ``max_latency_ms`` bounds the p50
batch-1 latency of the deployment artifact (the engine if built, else the ONNX file at
``precision``, else the safetensors student in PyTorch) on the export device.

Artifacts are built under a staging name (``model.staged.onnx``) and get their final name only when
every gate on them passes; one that fails is kept as ``model.failed.onnx`` for inspection, and a
previous artifact under the final name is removed, so a final name always means "passed".
``export.json`` accumulates: an FP16 export adds ``onnx_fp16`` to what an FP32 export recorded.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import BadInput, DistillError, GateFailed
from ..recipe import parse_dynamic_batch
from ..report import commit_point
from ..run import EXPORT_JSON, Run, sidecar_of

log = logging.getLogger("distillctl")

TOLERANCE = {"fp32": {"max_abs_rel": 1e-4, "min_agreement": 0.99},
             "fp16": {"max_abs_rel": 2e-2, "min_agreement": 0.95},
             "int8": {"max_abs_rel": 0.25, "min_agreement": 0.97}}
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Format:
    name: str
    build: Callable  # (ExportJob) -> list[Artifact]
    needs: tuple[str, ...] = ()  # formats built first (their artifacts feed this one)
    check: Optional[Callable[[str], object]] = None  # capability check, before any work


def _formats() -> dict[str, Format]:
    from . import onnx as onnx_format
    from . import trt as trt_format
    from . import weights as safetensors_format

    return {
        "safetensors": Format("safetensors", safetensors_format.build),
        "onnx": Format("onnx", onnx_format.build),
        "trt": Format("trt", trt_format.build, needs=("onnx",), check=trt_format.require),
    }


FORMAT_NAMES = ("safetensors", "onnx", "trt")


def plan(formats: list[str]) -> list[str]:
    """Requested formats plus what they need, in build order; unknown names are bad input."""
    table = _formats()
    if not formats:
        raise BadInput(f"no export format given; choose from {', '.join(table)}")
    order: list[str] = []

    def add(name: str) -> None:
        if name not in table:
            raise BadInput(f"unknown export format '{name}'; choose from {', '.join(table)}")
        for dep in table[name].needs:
            add(dep)
        if name not in order:
            order.append(name)

    for f in formats:
        for part in str(f).split(","):
            if part.strip():
                add(part.strip())
    return order


@dataclass
class Gate:
    name: str
    artifact: str
    value: float
    limit: float
    op: str  # "<=" or ">="
    passed: bool = field(init=False)

    def __post_init__(self):
        self.passed = self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def describe(self) -> str:
        return f"{self.artifact} {self.name} {self.value:.6g} (limit {self.op} {self.limit:.6g})"


def check_options(precision, max_parity_diff, min_top1, max_latency_ms, opset) -> None:
    if precision not in PRECISIONS:
        raise BadInput(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if max_parity_diff is not None and not max_parity_diff > 0:
        raise BadInput(f"max_parity_diff must be > 0, got {max_parity_diff}")
    if min_top1 is not None and not 0 <= min_top1 <= 1:
        raise BadInput(f"min_top1 is a fraction in [0, 1], got {min_top1}")
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise BadInput(f"max_latency_ms must be > 0, got {max_latency_ms}")
    if opset is not None and not 13 <= opset <= 25:
        raise BadInput(f"--opset must be between 13 and 25, got {opset}")


def staged(final: Path) -> Path:
    """The name an artifact is built under until its gates pass: ``model.onnx`` -> ``model.staged.onnx``.

    Tracked like a temporary: if the export ends before ``_settle`` names it, it is removed (and its sidecar).
    """
    from ..files import track

    final = Path(final)
    path = final.with_name(f"{final.stem}.staged{final.suffix}")
    track(path)
    track(sidecar_of(path))
    return path


def _settle(run: Run, art, final: Optional[Path], passed: bool) -> Path:
    """Give a staged artifact its final name (passed) or its ``.failed`` name; returns where it ended.

    Artifacts built in place (the student folder, which is the training output) stay where they are.
    """
    from ..files import commit

    src = Path(art.path)
    if final is None:
        return src
    dest = final if passed else run.failed_file(final)
    commit(src, dest)
    if sidecar_of(src).exists():
        commit(sidecar_of(src), sidecar_of(dest))
    if not passed:  # a final name always means "passed its gates"
        Path(final).unlink(missing_ok=True)
        sidecar_of(final).unlink(missing_ok=True)
    return dest


def _track_artifacts(run: Run, paths: dict) -> None:
    """Attach the artifacts that passed to the run's tracked experiment (continuing its tracked run)."""
    from ..tracking import Tracker

    steps = [r.get("global_step", 0) for r in run.metrics_rows()]
    tracker = Tracker.open(run.recipe.tracking, run.root, run.root.name, run.recipe.model_dump(mode="json"),
                           resume_step=max(steps, default=0), store_dir=run.root)
    with tracker:
        tracker.log_artifacts({n: Path(p) for n, p in paths.items()})


def _relative_info(run: Run, info: dict) -> dict:
    """A builder's facts with the file paths it names made relative to the run folder."""
    return {k: run.relative(v) if k in ("path", "sidecar", "source_onnx", "timing_cache") and isinstance(v, str)
            else v for k, v in info.items()}


def export_run(run: Run, formats: list[str], *, precision: Optional[str] = None, dynamic_batch: Optional[str] = None,
               opset: Optional[int] = None, max_parity_diff: Optional[float] = None, min_top1: Optional[float] = None,
               max_latency_ms: Optional[float] = None, device: str = "auto", write_card: bool = True,
               calibration: Optional[str] = None, calibration_images: Optional[int] = None) -> dict:
    """Export ``run``'s student to ``formats`` and prove every artifact; writes ``RUN/export.json``.

    Options left ``None`` (and empty ``formats``) come from the recipe's ``export`` section. Raises BadInput (2),
    GateFailed (3, after export.json is written), MissingCapability (4), ExportFailed (5).
    """
    import torch

    from ..data import build_data
    from ..device import resolve_device, versions
    from ..models import InputView
    from .bench import measure, summarize
    from .job import ExportJob
    from .runtime import TorchPredictor, accuracy, parity

    run.verify()  # a damaged file of the run is exit 2 before anything is written
    recipe = run.recipe
    ex = recipe.export
    if calibration is not None or calibration_images is not None:  # command-line INT8 settings, checked as recipe keys
        from ..recipe import ExportConfig

        given = {k: v for k, v in (("int8_calibration", calibration), ("int8_calibration_images", calibration_images))
                 if v is not None}
        try:
            ex = ExportConfig.model_validate({**ex.model_dump(), **given})
        except ValueError as err:
            raise BadInput(f"--calibration / --calibration-images: {str(err).splitlines()[-1].strip()[:300]}") from None
        recipe = recipe.model_copy(update={"export": ex})
    precision = precision or ex.precision
    dynamic_batch = dynamic_batch or ex.dynamic_batch
    opset = opset if opset is not None else ex.opset
    max_parity_diff = max_parity_diff if max_parity_diff is not None else ex.max_parity_diff
    min_top1 = min_top1 if min_top1 is not None else ex.min_top1
    max_latency_ms = max_latency_ms if max_latency_ms is not None else ex.max_latency_ms
    check_options(precision, max_parity_diff, min_top1, max_latency_ms, opset)
    try:
        batch = parse_dynamic_batch(dynamic_batch)
    except ValueError as err:
        raise BadInput(f"--dynamic-batch: {err}") from None
    order = plan(formats or list(ex.formats))
    table = _formats()
    torch_device = resolve_device(device)
    for name in order:  # fail on a missing capability before minutes of work
        if table[name].check:
            table[name].check(device)
    if recipe.tracking.backends:
        from ..tracking import require_backends

        require_backends(recipe.tracking)

    with run.writing():
        t0 = time.perf_counter()
        student, cfg = run.load_student("cpu")  # strict: a leaked or missing key fails here
        saved = cfg.get("distillctl", {}).get("recipe_hash")
        if saved and saved not in run.accepted_hashes():
            log.warning(f"warning: the student was saved by recipe {saved}, the run's recipe hashes to {recipe.hash()}")
        pc = cfg["pretrained_cfg"]
        view = InputView(pc["input_size"][-1], pc["mean"], pc["std"])
        data = build_data(recipe.data, seed=recipe.seed, device=torch.device("cpu"))
        if data.num_classes != cfg["num_classes"]:
            raise BadInput(f"the student predicts {cfg['num_classes']} classes, {recipe.data.dataset} has "
                           f"{data.num_classes}")
        log.info(f"export {run.root}: {cfg['architecture']} -> {', '.join(order)} ({precision}, batch {dynamic_batch})")
        reference = TorchPredictor(student, torch_device, name="torch")
        ref_metrics, ref_logits = accuracy(reference, data.val, view, keep=ex.parity_images)
        student.to("cpu")
        def calibration():
            from ..data import calibration_source
            from .runtime import val_arrays

            src = calibration_source(recipe.data, seed=recipe.seed, count=ex.int8_calibration_images)
            return (x for x, _ in val_arrays(src, view))

        job = ExportJob(run=run, recipe=recipe, student=student, config=cfg, precision=precision, batch=batch,
                        opset=opset, device=device, torch_device=torch_device, student_metrics=ref_metrics,
                        calibration=calibration, formats=tuple(order))
        finals: dict[str, Optional[Path]] = {}
        for name in order:
            for art in table[name].build(job):
                job.artifacts[art.name] = art
                finals[art.name] = art.info.pop("final", None)

        metrics = {"student_top1": ref_metrics["top1"], "student_top5": ref_metrics["top5"],
                   "val_images": ref_metrics["n"]}
        teacher = run.metrics_summary().get("teacher_top1")
        if teacher is not None:
            metrics["teacher_top1"] = teacher
        par, gates = {}, []
        for name, art in job.artifacts.items():
            if art.predictor is None:
                continue
            m, logits = accuracy(art.predictor, data.val, view, keep=ex.parity_images)
            p = par[name] = parity(ref_logits, logits)
            metrics[f"{name}_top1"], metrics[f"{name}_top5"] = m["top1"], m["top5"]
            tol = TOLERANCE[art.precision]
            if max_parity_diff is not None:  # stated for FP32; others get the same multiple as their defaults
                bound = max_parity_diff * tol["max_abs_rel"] / TOLERANCE["fp32"]["max_abs_rel"]
            else:
                bound = tol["max_abs_rel"] * max(1.0, p["ref_max_abs_logit"])
            p["tolerance"] = bound
            gates.append(Gate("parity max_abs_diff", name, p["max_abs_diff"], bound, "<="))
            gates.append(Gate("parity top1_agreement", name, p["top1_agreement"], tol["min_agreement"], ">="))
            if min_top1 is not None:
                gates.append(Gate("top1", name, m["top1"], min_top1, ">="))
            log.info(f"  {name}: top1={m['top1']:.4f} max|diff|={p['max_abs_diff']:.3g} "
                     f"mean|diff|={p['mean_abs_diff']:.3g} agreement={p['top1_agreement']:.4f}")

        # latency of the artifact that would be deployed, at batch 1
        suffix = "" if precision == "fp32" else f"_{precision}"
        preference = [f"trt{suffix}", f"onnx{suffix}", "onnx", "safetensors"]
        primary = next(n for n in preference if n in job.artifacts)
        x = torch.randn(1, 3, job.input_size, job.input_size).numpy()
        lat = summarize(measure(job.artifacts[primary].predictor.timed_call(x), warmup=recipe.bench.warmup,
                                iters=recipe.bench.iters, min_warmup_s=recipe.bench.warmup_s), 1)
        if max_latency_ms is not None:
            gates.append(Gate("latency p50 ms (batch 1)", primary, lat["p50"], max_latency_ms, "<="))

        failed = [g for g in gates if not g.passed]
        bad_artifacts = {g.artifact for g in failed}
        # the commit point: a signal that already came stops the export before any artifact takes its final
        # name; one that comes now waits until the names, export.json and the card are all written
        with commit_point():
            paths = {}
            for name, art in job.artifacts.items():
                paths[name] = _settle(run, art, finals[name], name not in bad_artifacts)

            previous = run.read_report(EXPORT_JSON) or {}
            # export.json names files relative to the run folder (the folder can move; any cwd reads it)
            rel = {n: run.relative(p) for n, p in paths.items()}
            stored = {
                "artifacts": {**previous.get("artifacts", {}),
                              **{n: r for n, r in rel.items() if n not in bad_artifacts}},
                "failed_artifacts": {n: rel[n] for n in sorted(bad_artifacts)},
                "parity": {**previous.get("parity", {}), **par},
                "metrics": {**previous.get("metrics", {}), **metrics},
                "latency_ms": {primary: {"1": {k: lat[k] for k in ("p50", "p90", "p99", "mean")}}},  # bench's shape
                "throughput_img_s": {primary: {"1": lat["throughput_img_s"]}},
                "precision": precision, "dynamic_batch": dynamic_batch, "device": str(torch_device),
                "providers": {**previous.get("providers", {}), "torch": reference.provider,
                              **{n: a.predictor.provider for n, a in job.artifacts.items() if a.predictor is not None}},
                "details": {**previous.get("details", {}), **{n: _relative_info(run, a.info)
                                                              for n, a in job.artifacts.items()}},
                "gates": [g for g in previous.get("gates", []) if g["artifact"] not in job.artifacts] +
                         [{"gate": g.name, "artifact": g.artifact, "value": g.value, "limit": g.limit, "op": g.op,
                           "passed": g.passed} for g in gates],
                "status": "gate_failed" if failed else "ok",
                "export_s": round(time.perf_counter() - t0, 2),
                "recipe_hash": recipe.hash(), "versions": versions(),
            }
            for name in list(stored["artifacts"]):  # drop entries whose file this (or a later) export removed
                if name in bad_artifacts or not run.resolve(stored["artifacts"][name]).exists():
                    stored["artifacts"].pop(name)
            for name in [n for n in paths if n.startswith("trt") and n not in bad_artifacts]:
                if sidecar_of(paths[name]).exists():
                    stored["artifacts"][f"{name}_sidecar"] = run.relative(sidecar_of(paths[name]))
            if write_card:
                stored["artifacts"]["model_card"] = run.relative(run.card_file)
            run.write_json(EXPORT_JSON, stored)
            if write_card:
                from .card import write_model_card

                write_model_card(run)
        if recipe.tracking.backends:
            try:
                _track_artifacts(run, {n: p for n, p in paths.items() if n not in bad_artifacts})
            except DistillError as err:  # the export is done and proven: tracking is a report, not a gate
                log.warning(f"warning: the artifacts were not sent to the tracker: {err.message}")
    # the document names files as the caller named the run folder
    result = {**stored, "run_dir": str(run.root),
              "artifacts": {n: str(run.resolve(r)) for n, r in stored["artifacts"].items()},
              "failed_artifacts": {n: str(run.resolve(r)) for n, r in stored["failed_artifacts"].items()}}
    if failed:
        raise GateFailed("export gate failed: " + "; ".join(g.describe() for g in failed)
                         + f". Failing artifacts are kept as *.failed.*; figures are in {run.path(EXPORT_JSON)}.",
                         details=result)
    return result
