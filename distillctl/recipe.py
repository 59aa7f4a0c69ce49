"""Typed recipes: load (safe YAML) -> dotted overrides -> validation -> stable hash.

A recipe is inert data. Every section is a pydantic model with ``extra="forbid"``, so a
misspelt key is an error that names the key and the closest valid one. The ``method``
block holds ``name`` plus the method's own parameters, validated against that method's
typed config (``distillctl.methods``), never passed around as the whole recipe.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import BadInput

RECIPE_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Strict):
    """Augmentation keys. Crop/flip and Mixup/CutMix work for every dataset (on the training device);
    auto_augment, color_jitter and random erasing are timm's per-image ops, ImageFolder only."""

    hflip: bool = False
    random_crop_padding: int = Field(0, ge=0, description="CIFAR-style pad-and-crop, in pixels at image_size")
    random_resized_crop: bool = Field(False, description="in-memory data; ImageFolder training always crops")
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    auto_augment: Optional[str] = Field(None, description="timm policy such as rand-m9-mstd0.5-inc1, "
                                        "augmix-m5-w4-d2, original, or trivialaugment (ImageFolder)")
    color_jitter: Optional[float] = Field(None, ge=0, description="brightness/contrast/saturation factor (ImageFolder)")
    re_prob: float = Field(0.0, ge=0, le=1, description="random erasing probability per image (ImageFolder)")
    re_mode: Literal["const", "rand", "pixel"] = Field("const", description="erase with the mean colour, "
                                                       "one random colour, or per-pixel noise")
    re_count: int = Field(1, ge=1, description="at most this many erased boxes per image")
    mixup_alpha: float = Field(0.0, ge=0, description="Beta(alpha, alpha) for Mixup; 0 = off")
    cutmix_alpha: float = Field(0.0, ge=0, description="Beta(alpha, alpha) for CutMix; 0 = off")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="probability of mixing a batch (or sample)")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="CutMix instead of Mixup when both are on")
    mixup_mode: Literal["batch", "pair", "elem"] = Field("batch", description="one ratio per batch, pair or sample")

    @field_validator("rrc_scale")
    @classmethod
    def _check_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1] <= 1):
            raise ValueError(f"expected 0 < MIN <= MAX <= 1 (area fractions), for example [0.08, 1.0]; got {list(v)}")
        return v

    @field_validator("auto_augment")
    @classmethod
    def _check_policy(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        from .augment import check_auto_augment

        check_auto_augment(v)  # builds the policy once, so a typo fails at validate time
        return v

    @model_validator(mode="after")
    def _check_jitter(self) -> "AugmentConfig":
        if self.auto_augment is not None and self.color_jitter is not None:
            raise ValueError(f"color_jitter is ignored by timm when auto_augment is set (auto_augment "
                             f"{self.auto_augment!r} already changes colour); set one of them, not both")
        return self

    @property
    def mixing(self) -> bool:
        """True when Mixup or CutMix can change a batch."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mixup_prob > 0


class DataConfig(_Strict):
    dataset: Literal["digits", "cifar10", "cifar100", "imagefolder", "synthetic"] = "digits"
    root: Optional[str] = None
    download: bool = False
    image_size: int = Field(32, ge=8, description="student input size")
    batch_size: int = Field(64, ge=1)
    val_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(2, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1, description="held-out split for digits/synthetic")
    train_per_class: Optional[int] = Field(None, ge=1, description="low-data: keep this many labelled images per class")
    subset_seed: int = 0
    num_classes: Optional[int] = Field(None, ge=2, description="synthetic only; read from the data otherwise")
    synthetic_size: int = Field(512, ge=16)
    on_device: bool = True
    augment: AugmentConfig = AugmentConfig()


class ModelConfig(_Strict):
    model: str
    weights: Optional[str] = Field(None, description="local .safetensors or .pth (weights only)")
    pretrained: bool = Field(False, description="timm hub weights (needs network)")
    image_size: Optional[int] = Field(None, ge=8, description="input size; default data.image_size")
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    step_size: int = Field(30, ge=1, description="epochs between x step_gamma decays (schedule: step)")
    step_gamma: float = 0.1
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: Optional[float] = Field(None, gt=0)
    ema: bool = False
    ema_decay: float = Field(0.999, gt=0, lt=1)
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="autocast dtype on CUDA; CPU runs fp32")
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    log_every: int = Field(20, ge=1)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)
    accumulate: int = Field(1, ge=1, description="micro-batches per optimizer step; lr is per effective batch "
                                                 "(data.batch_size x accumulate x processes)")
    best_metric: Literal["top1", "top5"] = Field("top1", description="validation metric that picks the best epoch")
    export_weights: Literal["best", "last"] = Field("best", description="which epoch's student is exported")
    early_stop_patience: Optional[int] = Field(None, ge=1, description="stop after this many epochs without a "
                                                                       "best_metric gain")


class TeacherConfig(ModelConfig):
    train_if_missing: bool = Field(False, description="`run` trains the teacher when weights are absent")
    train: Optional[TrainConfig] = None


class StudentConfig(ModelConfig):
    pass


class MethodSection(BaseModel):
    """``name`` plus the method's parameters; the parameters are validated by the method's config."""

    model_config = ConfigDict(extra="allow")
    name: str = "kd"

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ExportConfig(_Strict):
    formats: list[Literal["safetensors", "onnx", "trt"]] = ["safetensors", "onnx"]
    precision: Literal["fp32", "fp16"] = "fp32"
    onnx_fp16: bool = Field(False, description="also write model.fp16.onnx")
    opset: Optional[int] = Field(None, ge=13)
    dynamic_batch: str = Field("1:8:32", description="MIN:OPT:MAX batch for the ONNX/TensorRT profile")
    parity_images: int = Field(256, ge=1)
    max_parity_diff: Optional[float] = Field(None, gt=0)
    min_top1: Optional[float] = Field(None, ge=0, le=1)
    max_latency_ms: Optional[float] = Field(None, gt=0)
    workspace_gib: float = Field(4.0, gt=0)

    @field_validator("dynamic_batch")
    @classmethod
    def _check_batch(cls, v: str) -> str:
        parse_dynamic_batch(v)
        return v


class BenchConfig(_Strict):
    batch_sizes: list[int] = [1, 32]
    backends: list[Literal["torch", "torch_compile", "onnxruntime", "trt"]] = ["torch", "onnxruntime"]
    warmup: int = Field(10, ge=0)
    iters: int = Field(50, ge=1)
    threads: Optional[int] = Field(None, ge=1, description="CPU threads for torch and ONNX Runtime")


class TrackingConfig(_Strict):
    """Experiment tracking (off by default): where metrics, the recipe and the artifacts also go."""

    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="any of tensorboard, mlflow, wandb (each an optional extra)")
    experiment: Optional[str] = Field(None, description="MLflow experiment / W&B project; default the recipe name")
    mlflow_uri: Optional[str] = Field(None, description="MLflow tracking URI; default a SQLite store in the "
                                      "run folder (RUN/mlflow/mlflow.db)")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="offline writes RUN/wandb only; "
                                                     "`wandb sync` uploads it later")

    @field_validator("backends")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({b for b in v if v.count(b) > 1})
        if dup:
            raise ValueError(f"each backend once, {dup} appear(s) more than once in {v}")
        return v


class Recipe(_Strict):
    version: int = RECIPE_VERSION
    name: str = "run"
    seed: int = 0
    data: DataConfig = DataConfig()
    teacher: Optional[TeacherConfig] = None
    student: StudentConfig
    method: MethodSection = MethodSection()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    bench: BenchConfig = BenchConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if self.version != RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version} is not supported (expected {RECIPE_VERSION})")
        return self

    def hash(self) -> str:
        """Stable short hash of the resolved recipe (sorted JSON of every value)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_dynamic_batch(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(p) for p in text.split(":"))
    except ValueError:
        raise ValueError(f"expected MIN:OPT:MAX batch sizes such as 1:8:32, got {text!r}") from None
    if not (1 <= lo <= opt <= hi):
        raise ValueError(f"batch sizes must satisfy 1 <= MIN <= OPT <= MAX, got {text!r}")
    return lo, opt, hi


# ----------------------------------------------------------------------------- keys


def _model_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        sub = _submodel(field.annotation)
        if sub is not None:
            keys.extend(_model_keys(sub, key + "."))
    return keys


def _submodel(annotation: Any) -> Optional[type[BaseModel]]:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def valid_keys(method_name: Optional[str] = None) -> list[str]:
    """Every dotted key a recipe may hold (method keys for ``method_name`` when known)."""
    keys = [k for k in _model_keys(Recipe) if k != "method"]
    keys.append("method")
    keys.append("method.name")
    from .methods import registry

    names = [method_name] if method_name in registry.names() else registry.names()
    for n in names:
        keys.extend(f"method.{p}" for p in registry.get(n).Config.model_fields)
    return sorted(set(keys))


def suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # also try matching only the last component within the same section
        head, _, tail = key.rpartition(".")
        same = [c.rpartition(".")[2] for c in candidates if c.rpartition(".")[0] == head]
        close = [f"{head}.{c}" if head else c for c in difflib.get_close_matches(tail, same, n=1, cutoff=0.5)]
    return f" (did you mean '{close[0]}'?)" if close else ""


# ----------------------------------------------------------------------------- loading


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``KEY=VALUE`` dotted overrides (values parsed as YAML scalars) to a raw dict."""
    for item in overrides or []:
        if "=" not in item:
            raise BadInput(f"--set expects KEY=VALUE (for example train.epochs=2), got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise BadInput(f"--set key {key!r} is not a dotted recipe key")
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise BadInput(f"--set {key}: '{p}' is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _format_errors(err: ValidationError, method_name: Optional[str], where: str) -> str:
    lines = []
    keys = valid_keys(method_name)
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if where:
            loc = f"{where}.{loc}" if loc else where
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}'{suggest(loc, keys)}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{loc}: {e['msg']}{got_s}")
    return "; ".join(lines)


def validate_raw(raw: dict) -> Recipe:
    """Validate a raw dict into a Recipe, including the method's own parameters."""
    from .methods import registry

    if not isinstance(raw, dict):
        raise BadInput("a recipe must be a YAML mapping with sections such as data, student, method, train")
    method_name = (raw.get("method") or {}).get("name") if isinstance(raw.get("method"), dict) else None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise BadInput("invalid recipe: " + _format_errors(err, method_name, "")) from None
    name = recipe.method.name
    if name not in registry.names():
        raise BadInput(
            f"unknown method.name '{name}'{suggest(name, registry.names())}; "
            f"available: {', '.join(registry.names())}"
        )
    try:
        cfg = registry.get(name).Config.model_validate(recipe.method.params())
    except ValidationError as err:
        raise BadInput("invalid recipe: " + _format_errors(err, name, "method")) from None
    # store the method's parameters fully resolved (defaults filled in) so the hash covers them
    recipe.method = MethodSection(name=name, **cfg.model_dump(mode="json"))
    return recipe


def read_raw(path: str | Path) -> dict:
    """The recipe file as a plain mapping (safe YAML loader), before overrides and validation."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise BadInput(f"cannot read recipe {path}: {err}") from None
    if not isinstance(raw, dict):
        raise BadInput(f"recipe {path} must be a YAML mapping")
    return raw


def load_recipe(path: str | Path, overrides: Optional[list[str]] = None) -> Recipe:
    """Read a recipe file safely, apply ``--set`` overrides, validate. Raises BadInput."""
    return validate_raw(apply_overrides(read_raw(path), overrides or []))


def method_config(recipe: Recipe):
    """The typed config object of the recipe's method."""
    from .methods import registry

    return registry.get(recipe.method.name).Config.model_validate(recipe.method.params())
