"""``export_run``: build the requested formats of a run's student, prove each one, apply the gates.

One table (``FORMATS``) drives validation and building; each format has one builder in its
own module (weights.py, onnx.py, trt.py) that returns Artifacts with a runner. Every artifact
with a runner is then run over the recipe's validation split and compared with the PyTorch
student: accuracy over the whole split, logit parity over its first ``export.parity_images``
images (max and mean absolute difference, top-1 agreement).

Parity tolerances (a violation is a failed gate, exit 3):

=========  ====================================================  =====================
precision  max |logit diff|                                      top-1 agreement
=========  ====================================================  =====================
fp32       1e-4 x max(1, max |student logit|)                    >= 0.99
fp16       2e-2 x max(1, max |student logit|)                    >= 0.95
=========  ====================================================  =====================

FP32 runtimes reorder float sums, so their error grows with the logit scale: 1e-4 relative
is ~10x what ONNX Runtime's CPU provider shows on resnet18 and far below what a wrong op
gives; FP16 artifacts measure ~4e-4 of the logit scale on resnet18, 50x below their bound.
``max_parity_diff`` replaces the max-diff bound with an absolute one, stated for FP32
artifacts; FP16 artifacts get 200x it (the ratio of the defaults), so one recipe value gates
both. ``min_top1`` is a floor on each artifact's top-1; ``max_latency_ms`` bounds the p50
batch-1 latency of the deployment artifact (the engine if built, else the ONNX file at
``precision``, else the safetensors student in PyTorch) on the export device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import BadInput, GateFailed
from ..recipe import load_recipe, parse_dynamic_batch
from ..runs import RECIPE_FILE, STUDENT_DIR, Manifest, atomic_write_json, resolve_run, versions
from . import onnx as onnx_format
from . import trt as trt_format
from . import weights as safetensors_format
from .context import Artifact, ExportContext

EXPORT_JSON = "export.json"

TOLERANCE = {"fp32": {"max_abs_rel": 1e-4, "min_agreement": 0.99},
             "fp16": {"max_abs_rel": 2e-2, "min_agreement": 0.95}}


@dataclass(frozen=True)
class Format:
    name: str
    build: Callable[[ExportContext], list[Artifact]]
    needs: tuple[str, ...] = ()  # formats built first (their artifacts feed this one)
    check: Optional[Callable[[str], object]] = None  # capability check, before any work


FORMATS: dict[str, Format] = {
    "safetensors": Format("safetensors", safetensors_format.build),
    "onnx": Format("onnx", onnx_format.build),
    "trt": Format("trt", trt_format.build, needs=("onnx",), check=trt_format.require),
}
PRECISIONS = ("fp32", "fp16")


def _plan(formats: list[str]) -> list[str]:
    """Requested formats plus what they need, in build order; unknown names are bad input."""
    if not formats:
        raise BadInput(f"no export format given; choose from {', '.join(FORMATS)}")
    order: list[str] = []

    def add(name: str) -> None:
        if name not in FORMATS:
            raise BadInput(f"unknown export format '{name}'; choose from {', '.join(FORMATS)}")
        for dep in FORMATS[name].needs:
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


def _check_options(precision, max_parity_diff, min_top1, max_latency_ms, opset) -> None:
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


def _load_student(run_dir: Path, recipe):
    from .student import load_student

    folder = run_dir / STUDENT_DIR
    if not (folder / "model.safetensors").is_file():
        raise BadInput(f"{folder}/model.safetensors not found: the run has no exported student yet "
                       "(did `distillctl distill` finish?)")
    model, cfg = load_student(folder, "cpu")  # strict: a leaked or missing key fails here
    if cfg["architecture"] != recipe.student.model:
        raise BadInput(f"{folder} holds a {cfg['architecture']} but the run's recipe says {recipe.student.model}")
    saved = cfg.get("distillctl", {}).get("recipe_hash")
    if saved and saved != recipe.hash():
        ExportContext.log(f"warning: the student was saved by recipe {saved}, the run's {RECIPE_FILE} hashes to "
                          f"{recipe.hash()}")
    return model, cfg


def _view(cfg: dict):
    from ..models import InputView

    pc = cfg["pretrained_cfg"]
    return InputView(pc["input_size"][-1], pc["mean"], pc["std"])


def export_run(run_dir: Path, formats: list[str], *, precision: Optional[str] = None, dynamic_batch: Optional[str] = None,
               opset: Optional[int] = None, max_parity_diff: Optional[float] = None, min_top1: Optional[float] = None,
               max_latency_ms: Optional[float] = None, device: str = "auto") -> dict:
    """Export a run's student to ``formats`` and prove every artifact; writes ``RUN/export.json``.

    Options left ``None`` (and empty ``formats``) come from the recipe's ``export`` section. Raises BadInput (2),
    GateFailed (3, after export.json is written), MissingCapability (4), ExportFailed (5).
    """
    from ..data import build_data
    from ..train import resolve_device
    from .bench import measure, summarize
    from .runtime import TorchRunner, accuracy, parity

    run_dir = resolve_run(str(run_dir) if run_dir else None)
    recipe = load_recipe(run_dir / RECIPE_FILE)
    ex = recipe.export
    precision = precision or ex.precision
    dynamic_batch = dynamic_batch or ex.dynamic_batch
    opset = opset if opset is not None else ex.opset
    max_parity_diff = max_parity_diff if max_parity_diff is not None else ex.max_parity_diff
    min_top1 = min_top1 if min_top1 is not None else ex.min_top1
    max_latency_ms = max_latency_ms if max_latency_ms is not None else ex.max_latency_ms
    _check_options(precision, max_parity_diff, min_top1, max_latency_ms, opset)
    try:
        batch = parse_dynamic_batch(dynamic_batch)
    except ValueError as err:
        raise BadInput(f"--dynamic-batch: {err}") from None
    order = _plan(formats or list(ex.formats))
    torch_device = resolve_device(device)
    for name in order:  # fail on a missing capability before minutes of work
        if FORMATS[name].check:
            FORMATS[name].check(device)

    t0 = time.perf_counter()
    student, cfg = _load_student(run_dir, recipe)
    view = _view(cfg)
    data = build_data(recipe.data, seed=recipe.seed, device=torch.device("cpu"))
    if data.num_classes != cfg["num_classes"]:
        raise BadInput(f"the student predicts {cfg['num_classes']} classes, {recipe.data.dataset} has {data.num_classes}")
    ExportContext.log(f"export {run_dir}: {cfg['architecture']} -> {', '.join(order)} ({precision}, batch {dynamic_batch})")
    reference = TorchRunner(student, torch_device, name="torch")
    ref_metrics, ref_logits = accuracy(reference, data.val, view, keep=ex.parity_images)
    student.to("cpu")
    ctx = ExportContext(run_dir=run_dir, recipe=recipe, student=student, config=cfg, precision=precision,
                        batch=batch, opset=opset, device=device, torch_device=torch_device,
                        student_metrics=ref_metrics)
    for name in order:
        for art in FORMATS[name].build(ctx):
            ctx.artifacts[art.name] = art

    metrics = {"student_top1": ref_metrics["top1"], "student_top5": ref_metrics["top5"], "val_images": ref_metrics["n"]}
    teacher = (Manifest(run_dir).data.get("metrics") or {}).get("teacher_top1")
    if teacher is not None:
        metrics["teacher_top1"] = teacher
    par, gates = {}, []
    for name, art in ctx.artifacts.items():
        if art.runner is None:
            continue
        m, logits = accuracy(art.runner, data.val, view, keep=ex.parity_images)
        p = par[name] = parity(ref_logits, logits)
        metrics[f"{name}_top1"], metrics[f"{name}_top5"] = m["top1"], m["top5"]
        tol = TOLERANCE[art.precision]
        if max_parity_diff is not None:  # stated for FP32; FP16 gets the same multiple as the defaults
            bound = max_parity_diff * tol["max_abs_rel"] / TOLERANCE["fp32"]["max_abs_rel"]
        else:
            bound = tol["max_abs_rel"] * max(1.0, p["ref_max_abs_logit"])
        p["tolerance"] = bound
        gates.append(Gate("parity max_abs_diff", name, p["max_abs_diff"], bound, "<="))
        gates.append(Gate("parity top1_agreement", name, p["top1_agreement"], tol["min_agreement"], ">="))
        if min_top1 is not None:
            gates.append(Gate("top1", name, m["top1"], min_top1, ">="))
        ExportContext.log(f"  {name}: top1={m['top1']:.4f} max|diff|={p['max_abs_diff']:.3g} "
                          f"mean|diff|={p['mean_abs_diff']:.3g} agreement={p['top1_agreement']:.4f}")

    # latency of the artifact that would be deployed, at batch 1
    preference = ["trt", "onnx_fp16" if precision == "fp16" else "onnx", "onnx", "safetensors"]
    primary = next(n for n in preference if n in ctx.artifacts)
    x = torch.randn(1, 3, ctx.input_size, ctx.input_size).numpy()
    lat = summarize(measure(ctx.artifacts[primary].runner.timed_call(x), warmup=recipe.bench.warmup,
                            iters=recipe.bench.iters), 1)
    if max_latency_ms is not None:
        gates.append(Gate("latency p50 ms (batch 1)", primary, lat["p50"], max_latency_ms, "<="))

    failed = [g for g in gates if not g.passed]
    result = {
        "run_dir": str(run_dir),
        "artifacts": {name: str(a.path) for name, a in ctx.artifacts.items()},
        "parity": par,
        "metrics": metrics,
        "latency_ms": {primary: {"1": {k: lat[k] for k in ("p50", "p90", "p99", "mean")}}},  # bench's shape
        "throughput_img_s": {primary: {"1": lat["throughput_img_s"]}},
        "precision": precision, "dynamic_batch": dynamic_batch, "device": str(torch_device),
        "providers": {"torch": reference.provider,
                      **{n: a.runner.provider for n, a in ctx.artifacts.items() if a.runner is not None}},
        "details": {n: a.info for n, a in ctx.artifacts.items()},
        "gates": [{"gate": g.name, "artifact": g.artifact, "value": g.value, "limit": g.limit, "op": g.op,
                   "passed": g.passed} for g in gates],
        "status": "gate_failed" if failed else "ok",
        "export_s": round(time.perf_counter() - t0, 2),
        "recipe_hash": recipe.hash(), "versions": versions(),
    }
    if "trt" in ctx.artifacts:
        result["artifacts"]["trt_sidecar"] = str(trt_format.sidecar_path(ctx.artifacts["trt"].path))
    atomic_write_json(run_dir / EXPORT_JSON, result)
    if failed:
        raise GateFailed("export gate failed: " + "; ".join(g.describe() for g in failed)
                         + f". Artifacts and figures are in {run_dir / EXPORT_JSON}.", details=result)
    return result
