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
import math
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from .errors import BadInput

RECIPE_VERSION = 1


# ----------------------------------------------------------------------------- limits
# A recipe is a page of settings. These bounds are far above any real recipe and far below what
# would exhaust a machine, so hostile or mistyped input is refused before any work starts.

MAX_RECIPE_BYTES = 1 << 20  # the recipe file
MAX_SET_BYTES = 16 << 10  # one --set KEY=VALUE
MAX_DEPTH = 32  # nesting levels: sections, kwargs, lists (a scalar counts as one level)
MAX_NODES = 20_000  # values in the whole recipe, counted after YAML aliases are expanded (~100x a real one)
MAX_ALIASES = 100  # *alias references in one document
MAX_INT = 2 ** 63 - 1  # anything larger cannot reach torch or JSON intact
MAX_QUOTE = 200  # characters of a user value quoted in an error message
MAX_LISTED_ERRORS = 8  # validation errors listed in one message (the rest are counted)

MAX_IMAGE_SIZE = 4096  # pixels per side, any model's input
MAX_BATCH = 65536
MAX_WORKERS = 256
MAX_THREADS = 1024
MAX_EPOCHS = 100_000
MAX_SEED = 2 ** 31 - 1  # numpy, random and torch all take it
MAX_CLASSES = 100_000
MAX_SYNTHETIC = 1_000_000
MAX_PARITY_IMAGES = 100_000
MAX_BATCH_BYTES = 16 << 30  # one float32 input batch [B, 3, S, S]
MAX_IN_MEMORY_BYTES = 16 << 30  # digits/synthetic images held as float32 while they are made
MAX_PARAMS = 5_000_000_000  # parameters of one model (20 GB in float32)
MAX_PATH = 4096
MAX_NAME = 100
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")

# timm.create_model arguments that the recipe sets through its own keys (or that would load files
# or reach the network behind the recipe's back), so `kwargs` may not carry them.
RESERVED_KWARGS = {
    "pretrained": "use the section's `pretrained`",
    "num_classes": "the class count comes from the data (data.num_classes for synthetic data)",
    "checkpoint_path": "use the section's `weights` (a local .safetensors or .pth)",
    "pretrained_cfg": "use `weights` or `pretrained`",
    "pretrained_cfg_overlay": "use `weights` or `pretrained`",
    "pretrained_model_args": "use `weights` or `pretrained`",
    "cache_dir": "hub downloads use timm's default cache",
    "device": "use the command's --device",
    "dtype": "use train.precision",
    "in_chans": "distillctl feeds every model RGB images [B, 3, S, S]",
    "scriptable": "not a model setting",
    "exportable": "not a model setting",
    "no_jit": "not a model setting",
}


def short(value: Any, limit: int = MAX_QUOTE) -> str:
    """``repr`` of a user value, cut to ``limit`` characters (safe on huge nested values)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 8, 8
    r.maxstring = r.maxother = r.maxlong = limit
    try:
        text = r.repr(value)
    except Exception:  # a value whose repr fails (e.g. an int past Python's digit limit)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: Any, limit: int = MAX_QUOTE) -> str:
    """Text (or an exception's text) on one line, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_path_text(v: Optional[str]) -> Optional[str]:
    if v is None:
        return v
    if not v or len(v) > MAX_PATH or "\x00" in v:
        raise ValueError(f"expected a file system path of 1 to {MAX_PATH} characters without NUL bytes")
    try:
        Path(v).expanduser()
    except RuntimeError as err:  # '~nobody/...': no such user
        raise ValueError(f"cannot expand {short(v)}: {err}") from None
    return v


PathText = Annotated[Optional[str], AfterValidator(_check_path_text)]
ImageSize = Annotated[int, Field(ge=8, le=MAX_IMAGE_SIZE)]
Batch = Annotated[int, Field(ge=1, le=MAX_BATCH)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class _Strict(BaseModel):
    # allow_inf_nan: a NaN or Inf setting is never meant (`lr: .inf` would only diverge later)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AugmentConfig(_Strict):
    """Augmentation keys. Crop/flip and Mixup/CutMix work for every dataset (on the training device);
    auto_augment, color_jitter and random erasing are timm's per-image ops, ImageFolder only."""

    hflip: bool = False
    random_crop_padding: int = Field(0, ge=0, le=MAX_IMAGE_SIZE,
                                     description="CIFAR-style pad-and-crop, in pixels at image_size")
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
    root: PathText = None
    download: bool = False
    image_size: ImageSize = Field(32, description="student input size")
    batch_size: Batch = 64
    val_batch_size: Batch = 256
    num_workers: int = Field(2, ge=0, le=MAX_WORKERS)
    val_fraction: float = Field(0.2, gt=0, lt=1, description="held-out split for digits/synthetic")
    train_per_class: Optional[int] = Field(None, ge=1, le=MAX_SYNTHETIC,
                                           description="low-data: keep this many labelled images per class")
    subset_seed: Seed = 0
    num_classes: Optional[int] = Field(None, ge=2, le=MAX_CLASSES, description="synthetic only; read from the data otherwise")
    synthetic_size: int = Field(512, ge=16, le=MAX_SYNTHETIC)
    on_device: bool = True
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="after")
    def _check_sizes(self) -> "DataConfig":
        if self.dataset == "synthetic" and self.synthetic_size < 2 * (self.num_classes or 10):
            raise ValueError(f"synthetic_size {self.synthetic_size} gives some of the {self.num_classes or 10} "
                             "classes fewer than 2 images (one for train, one for val); raise synthetic_size")
        n = {"digits": 1797, "synthetic": self.synthetic_size}.get(self.dataset)
        if n is not None and n * 3 * self.image_size ** 2 * 4 > MAX_IN_MEMORY_BYTES:
            raise ValueError(f"{self.dataset} at image_size {self.image_size} is {_gib(n * 3 * self.image_size ** 2 * 4)} "
                             f"in memory (limit {_gib(MAX_IN_MEMORY_BYTES)}); lower data.image_size")
        return self


class ModelConfig(_Strict):
    model: str = Field(min_length=1, max_length=MAX_PATH, description="timm model name")
    weights: PathText = Field(None, description="local .safetensors or .pth (weights only)")
    pretrained: bool = Field(False, description="timm hub weights (needs network)")
    image_size: Optional[ImageSize] = Field(None, description="input size; default data.image_size")
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")

    @field_validator("std")
    @classmethod
    def _check_std(cls, v):
        if v is not None and not all(s > 0 for s in v):
            raise ValueError(f"std divides the input, so each value must be > 0, got {list(v)}")
        return v

    @field_validator("kwargs")
    @classmethod
    def _check_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        for k in v:
            if k in RESERVED_KWARGS:
                raise ValueError(f"kwargs may not set '{k}': {RESERVED_KWARGS[k]}")
        return v


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1, le=MAX_EPOCHS)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, le=MAX_EPOCHS)
    min_lr: float = Field(0.0, ge=0)
    step_size: int = Field(30, ge=1, le=MAX_EPOCHS, description="epochs between x step_gamma decays (schedule: step)")
    step_gamma: float = Field(0.1, gt=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: Optional[float] = Field(None, gt=0)
    ema: bool = False
    ema_decay: float = Field(0.999, gt=0, lt=1)
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="autocast dtype on CUDA; CPU runs fp32")
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    log_every: int = Field(20, ge=1, le=1_000_000)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, le=1_000_000_000)
    accumulate: int = Field(1, ge=1, le=MAX_BATCH, description="micro-batches per optimizer step; lr is per "
                                                               "effective batch (data.batch_size x accumulate x processes)")
    best_metric: Literal["top1", "top5"] = Field("top1", description="validation metric that picks the best epoch")
    export_weights: Literal["best", "last"] = Field("best", description="which epoch's student is exported")
    early_stop_patience: Optional[int] = Field(None, ge=1, le=MAX_EPOCHS, description="stop after this many epochs "
                                                                                      "without a best_metric gain")


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
    formats: list[Literal["safetensors", "onnx", "trt"]] = Field(["safetensors", "onnx"], max_length=8)
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    onnx_fp16: bool = Field(False, description="also write model.fp16.onnx")
    int8_calibration: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how INT8 activation ranges are calibrated (ONNX Runtime's static quantizer)")
    int8_calibration_images: int = Field(256, ge=8, le=100_000, description="training images seen by the "
                                         "INT8 calibration, through the student's evaluation preprocessing")
    opset: Optional[int] = Field(None, ge=13, le=25)
    onnx_exporter: Literal["dynamo", "torchscript"] = Field(
        "dynamo", description="torch.onnx's exporter tried first (the other is the fallback); torchscript is "
                              "~5x faster to export a CNN but deprecated in torch")
    dynamic_batch: str = Field("1:8:32", max_length=64, description="MIN:OPT:MAX batch for the ONNX/TensorRT profile")
    parity_images: int = Field(256, ge=1, le=MAX_PARITY_IMAGES)
    max_parity_diff: Optional[float] = Field(None, gt=0)
    min_top1: Optional[float] = Field(None, ge=0, le=1)
    max_latency_ms: Optional[float] = Field(None, gt=0)
    workspace_gib: float = Field(4.0, gt=0, le=1024)

    @field_validator("dynamic_batch")
    @classmethod
    def _check_batch(cls, v: str) -> str:
        parse_dynamic_batch(v)
        return v


class BenchConfig(_Strict):
    batch_sizes: list[Batch] = Field([1, 32], min_length=1, max_length=32)
    backends: list[Literal["torch", "torch_compile", "onnxruntime", "trt"]] = Field(
        ["torch", "onnxruntime"], max_length=8, description="[] skips the bench stage of `distillctl run`")
    warmup: int = Field(10, ge=0, le=100_000)
    warmup_s: float = Field(0.2, ge=0, le=600, description="and at least this many seconds of warm-up calls per "
                            "backend and batch size (clocks and thread pools settle)")
    iters: int = Field(50, ge=1, le=1_000_000)
    threads: Optional[int] = Field(None, ge=1, le=MAX_THREADS, description="CPU threads for torch and ONNX Runtime")


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


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
    name: str = Field("run", description="run folder prefix: letters, digits, '.', '_', '-'")
    seed: Seed = 0
    data: DataConfig = DataConfig()
    teacher: Optional[TeacherConfig] = None
    student: StudentConfig
    method: MethodSection = MethodSection()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    bench: BenchConfig = BenchConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        # the run folder is derived from it, so it must stay one plain path component
        if len(v) > MAX_NAME or not NAME_RE.fullmatch(v):
            raise ValueError(f"expected 1 to {MAX_NAME} letters, digits, '.', '_' or '-' starting with a letter, "
                             f"digit or '_' (it names the run folder), such as vit_to_r18")
        return v

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if self.version != RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version} is not supported (expected {RECIPE_VERSION})")
        sizes = {"data.image_size": self.data.image_size}
        if self.student.image_size:
            sizes["student.image_size"] = self.student.image_size
        if self.teacher is not None and self.teacher.image_size:
            sizes["teacher.image_size"] = self.teacher.image_size
        where, size = max(sizes.items(), key=lambda kv: kv[1])
        for key, b in (("data.batch_size", self.data.batch_size), ("data.val_batch_size", self.data.val_batch_size)):
            if b * 3 * size * size * 4 > MAX_BATCH_BYTES:
                raise ValueError(f"{key} {b} at {where} {size} is {_gib(b * 3 * size * size * 4)} per float32 batch "
                                 f"(limit {_gib(MAX_BATCH_BYTES)}); lower {key} or {where}")
        s = self.student.image_size or self.data.image_size
        b = max(self.bench.batch_sizes + [parse_dynamic_batch(self.export.dynamic_batch)[2]])
        if b * 3 * s * s * 4 > MAX_BATCH_BYTES:
            raise ValueError(f"bench/export batch {b} at student size {s} is {_gib(b * 3 * s * s * 4)} per float32 "
                             f"batch (limit {_gib(MAX_BATCH_BYTES)}); lower bench.batch_sizes or export.dynamic_batch")
        return self

    def hash(self) -> str:
        """Stable short hash of the resolved recipe (sorted JSON of every value)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_dynamic_batch(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(p) for p in str(text).split(":"))
    except ValueError:
        raise ValueError(f"expected MIN:OPT:MAX batch sizes such as 1:8:32, got {short(text)}") from None
    if not (1 <= lo <= opt <= hi <= MAX_BATCH):
        raise ValueError(f"batch sizes must satisfy 1 <= MIN <= OPT <= MAX <= {MAX_BATCH}, got {short(text)}")
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


# ----------------------------------------------------------------------------- bounded YAML


class _Limit(Exception):
    """A size, depth or alias limit was hit while composing YAML (``mark``: where)."""

    def __init__(self, what: str, mark):
        super().__init__(what)
        self.what, self.mark = what, mark


class _Counting(yaml.composer.Composer):
    """Composition that counts, so hostile YAML is refused before any of it is built.

    Each node is counted with its aliases expanded (an alias adds the size of what it names), so
    an alias bomb stops at ``MAX_NODES`` after a few dozen events instead of expanding later in
    validation, hashing or a deep copy. Nesting stops at ``MAX_DEPTH``, long before Python's
    recursion limit.
    """

    def __init__(self):
        yaml.composer.Composer.__init__(self)
        self._nodes = self._depth = self._aliases = 0
        self._size: dict[str, int] = {}  # anchor -> expanded node count
        self._open: set[str] = set()  # anchors whose node is still being composed

    def _count(self, n: int, mark) -> None:
        self._nodes += n
        if self._nodes > MAX_NODES:
            raise _Limit(f"more than {MAX_NODES} values (aliases expanded)", mark)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Limit(f"more than {MAX_ALIASES} aliases", event.start_mark)
            if event.anchor in self._open:
                raise _Limit(f"alias *{short(event.anchor, 40)} refers to a value that contains it", event.start_mark)
            self._count(self._size.get(event.anchor, 1), event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Limit(f"values nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._count(1, event.start_mark)
        anchor, before = event.anchor, self._nodes
        if anchor is not None:
            self._open.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if anchor is not None:
            self._open.discard(anchor)
            self._size[anchor] = self._nodes - before + 1
        return node


class _NoDuplicateKeys(yaml.constructor.SafeConstructor):
    """Safe construction that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    k = (key_node.tag, key_node.value)
                    if k in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"found duplicate key {short(key_node.value, 60)}", key_node.start_mark)
                    seen.add(k)
        return super().construct_mapping(node, deep=deep)


class _PyLoader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, _Counting, _NoDuplicateKeys,
                yaml.resolver.Resolver):
    def __init__(self, stream):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        _Counting.__init__(self)
        _NoDuplicateKeys.__init__(self)
        yaml.resolver.Resolver.__init__(self)


_CParser = getattr(getattr(yaml, "_yaml", None), "CParser", None)
if _CParser is not None:
    class _CLoader(_Counting, _NoDuplicateKeys, yaml.resolver.Resolver, _CParser):
        """libyaml scans and parses (fast on a 1 MiB file); composition stays the counting one above."""

        def __init__(self, stream):
            _CParser.__init__(self, stream)
            _Counting.__init__(self)
            _NoDuplicateKeys.__init__(self)
            yaml.resolver.Resolver.__init__(self)


def _load(text: str) -> Any:
    loader = (_CLoader if _CParser is not None else _PyLoader)(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _refusal(lim: _Limit, source: str) -> BadInput:
    line = f" at line {lim.mark.line + 1}" if lim.mark is not None else ""
    return BadInput(f"{source}: refused: {lim.what}{line}; a recipe is a small mapping of settings")


def safe_yaml(text: str, source: str) -> Any:
    """Parse YAML text with the bounded safe loader. Raises BadInput naming ``source`` and the line."""
    try:
        return _load(text)
    except _Limit as lim:
        raise _refusal(lim, source) from None
    except yaml.YAMLError as err:
        why = clip(str(err).replace('in "<unicode string>", ', "").replace("<unicode string>", source), 400)
        raise BadInput(f"{source} is not valid YAML: {why}") from None
    except Exception as err:  # e.g. an integer past Python's digit limit: still the user's text
        why = clip(str(err).split(";")[0], 200)
        raise BadInput(f"{source}: cannot read a value ({type(err).__name__}: {why})") from None


def check_shape(raw: Any, source: str = "recipe") -> None:
    """Refuse a raw recipe that is too deep or too large, has non-text keys or non-finite numbers.

    Iterative (no recursion) and counting each visit, so shared or cyclic Python structures are
    bounded too; every raw dict goes through it before validation.
    """
    stack = [(raw, 1, "")]
    nodes = 0
    while stack:
        obj, depth, loc = stack.pop()
        nodes += 1
        where = f" at {loc}" if loc else ""
        if nodes > MAX_NODES:
            raise BadInput(f"{source}: refused: more than {MAX_NODES} values; a recipe is a small mapping of settings")
        if depth > MAX_DEPTH:
            raise BadInput(f"{source}: refused: values nested deeper than {MAX_DEPTH} levels{where}")
        if isinstance(obj, dict):
            for k, v in obj.items():
                if not isinstance(k, str):
                    raise BadInput(f"{source}: key {short(k, 60)}{where} must be text; quote it (YAML reads "
                                   "yes/no/on/off as booleans and bare digits as numbers)")
                stack.append((v, depth + 1, f"{loc}.{clip(k, 40)}" if loc else clip(k, 40)))
        elif isinstance(obj, (list, tuple)):
            stack.extend((v, depth + 1, f"{loc}[{i}]") for i, v in enumerate(obj))
        elif isinstance(obj, bool) or obj is None or isinstance(obj, str):
            continue
        elif isinstance(obj, int) and not -MAX_INT - 1 <= obj <= MAX_INT:
            raise BadInput(f"{source}: the number{where} is out of range (beyond 64-bit integers)")
        elif isinstance(obj, float) and not math.isfinite(obj):
            raise BadInput(f"{source}: {obj}{where} is not a finite number")


# ----------------------------------------------------------------------------- loading


def _parse_value(text: str) -> Any:
    if text == "":
        return ""
    try:
        return _load(text)
    except _Limit as lim:  # a hostile value stays an error, never a string
        raise _refusal(lim, "--set value") from None
    except Exception:
        return text  # not YAML: take it as the literal text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``KEY=VALUE`` dotted overrides (values parsed as YAML scalars) to a raw dict."""
    for item in overrides or []:
        if len(item) > MAX_SET_BYTES:
            raise BadInput(f"--set {short(item.split('=', 1)[0], 60)}: {len(item)} characters is too long "
                           f"(limit {MAX_SET_BYTES}); put large settings in the recipe file")
        if "=" not in item:
            raise BadInput(f"--set expects KEY=VALUE (for example train.epochs=2), got {short(item)}")
        key, value = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts) or len(parts) >= MAX_DEPTH:
            raise BadInput(f"--set key {short(key)} is not a dotted recipe key such as train.epochs")
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise BadInput(f"--set {short(key)}: '{clip(p, 60)}' is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _format_errors(err: ValidationError, method_name: Optional[str], where: str) -> str:
    lines = []
    keys = valid_keys(method_name)
    errors = err.errors(include_url=False)
    for e in errors[:MAX_LISTED_ERRORS]:
        loc = ".".join(clip(p, 60) for p in e["loc"])
        if where:
            loc = f"{where}.{loc}" if loc else where
        if e["type"] == "extra_forbidden":
            hint = suggest(loc, keys) if len(loc) <= 100 else ""
            lines.append(f"unknown key '{loc}'{hint}")
        else:
            got = e.get("input")
            msg = clip(e["msg"], 300).removeprefix("Value error, ")
            got_s = "" if isinstance(got, dict) or short(got) in msg else f" (got {short(got)})"
            lines.append(f"{loc}: {msg}{got_s}" if loc else f"{msg}{got_s}")
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"and {len(errors) - MAX_LISTED_ERRORS} more errors")
    return "; ".join(lines)


def validate_raw(raw: dict, *, check_models: bool = True) -> Recipe:
    """Validate a raw dict into a Recipe, including the method's own parameters and (with
    ``check_models``) the timm model names and kwargs."""
    from .methods import registry

    if not isinstance(raw, dict):
        raise BadInput("a recipe must be a YAML mapping with sections such as data, student, method, train")
    check_shape(raw)
    method_name = (raw.get("method") or {}).get("name") if isinstance(raw.get("method"), dict) else None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise BadInput("invalid recipe: " + _format_errors(err, method_name if isinstance(method_name, str) else None,
                                                           "")) from None
    name = recipe.method.name
    if name not in registry.names():
        hint = suggest(name, registry.names()) if len(name) <= 100 else ""
        raise BadInput(f"unknown method.name {short(name)}{hint}; available: {', '.join(registry.names())}")
    try:
        cfg = registry.get(name).Config.model_validate(recipe.method.params())
    except ValidationError as err:
        raise BadInput("invalid recipe: " + _format_errors(err, name, "method")) from None
    # store the method's parameters fully resolved (defaults filled in) so the hash covers them
    recipe.method = MethodSection(name=name, **cfg.model_dump(mode="json"))
    if check_models:
        nc = recipe.data.num_classes or {"cifar100": 100}.get(recipe.data.dataset, 10)
        for where, section in (("student", recipe.student), ("teacher", recipe.teacher)):
            if section is not None:
                check_model(section, where, nc)
    return recipe


def read_raw(path: str | Path) -> dict:
    """The recipe file as a plain mapping (bounded safe YAML), before overrides and validation."""
    path = Path(path)
    try:
        if not path.is_file():
            if path.exists():  # a folder, FIFO or device: never read (a FIFO would block, /dev/zero never ends)
                raise BadInput(f"recipe {path} is not a regular file; pass a .yaml recipe file")
            raise BadInput(f"recipe file not found: {path}")
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise BadInput(f"recipe {path} is {size} bytes (limit {MAX_RECIPE_BYTES}); a recipe is a small "
                           "mapping of settings")
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)  # the file may grow after stat
    except OSError as err:
        raise BadInput(f"cannot read recipe {path}: {clip(err, 200)}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise BadInput(f"recipe {path} is larger than {MAX_RECIPE_BYTES} bytes; a recipe is a small mapping of settings")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadInput(f"recipe {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    raw = safe_yaml(text, f"recipe {path}")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise BadInput(f"recipe {path} must be a YAML mapping with sections such as data, student, method, train "
                       f"(found a {type(raw).__name__})")
    return raw


def switch_method(raw: dict, overrides: list[str]) -> dict:
    """``--set method.name=X`` switches method cleanly: the recipe's parameters that X does not have are
    dropped with a note (those given with ``--set method.KEY`` are kept and validated)."""
    keys = [o.split("=", 1)[0].strip() for o in overrides or [] if "=" in o]
    section = raw.get("method")
    if "method.name" not in keys or not isinstance(section, dict):
        return raw
    from .methods import registry

    name = section.get("name")
    if name not in registry.names():
        return raw  # validation names the unknown method
    fields = registry.get(name).Config.model_fields
    given = {k.split(".", 1)[1] for k in keys if k.startswith("method.")}
    dropped = sorted(k for k in section if k != "name" and k not in fields and k not in given)
    if dropped:
        import logging

        logging.getLogger("distillctl").info(f"note: method {name} has no parameter {', '.join(dropped)}; "
                                             "dropped from the recipe's method section")
        raw["method"] = {k: v for k, v in section.items() if k not in dropped}
    return raw


def load_recipe(path: str | Path, overrides: Optional[list[str]] = None) -> Recipe:
    """Read a recipe file safely, apply ``--set`` overrides, validate. Raises BadInput."""
    return validate_raw(switch_method(apply_overrides(read_raw(path), overrides or []), overrides or []))


def method_config(recipe: Recipe):
    """The typed config object of the recipe's method."""
    from .methods import registry

    return registry.get(recipe.method.name).Config.model_validate(recipe.method.params())


def bench_options(**given: Any) -> dict[str, Any]:
    """Check bench's command-line values (``batch_sizes``, ``warmup``, ``iters``, ``threads``; ``None`` = not
    given) against the bounds of the recipe's ``bench`` section. Returns the given ones. Raises BadInput."""
    given = {k: v for k, v in given.items() if v is not None}
    try:
        BenchConfig.model_validate(given)
    except ValidationError as err:
        e = err.errors(include_url=False)[0]
        opt = "--" + str(e["loc"][0]).replace("_", "-")
        raise BadInput(f"{opt}: {e['msg']} (got {short(e.get('input'))})") from None
    return given


# ----------------------------------------------------------------------------- timm models


def check_model_name(name: str, where: str) -> None:
    """Refuse a model name timm cannot create, suggesting the closest registered names."""
    from .compat import import_timm

    timm = import_timm()
    if name.startswith("hf-hub:"):
        return  # resolved on the hub when the model is created (needs network; refused then if offline)
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):]).expanduser()
        from .run import CONFIG_FILE  # the run folder's owner spells the names (imported late: it imports us)

        if not (folder / CONFIG_FILE).is_file():
            raise BadInput(f"{where}.model {short(name)}: no config.json in {short(str(folder))}")
        return
    arch = name.split(".", 1)[0]  # 'resnet50.a1_in1k' -> 'resnet50' (the pretrained tag is timm's)
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch[:100], timm.list_models(), n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else ""
    family = (re.match(r"[a-z]+", arch.lower()) or re.match("", "")).group(0) or "resnet"
    raise BadInput(f"unknown {where}.model {short(name)}: not a timm model{hint} "
                   f"(timm.list_models('{family[:20]}*') lists the names timm has)")


_BUILD_CHECKED: dict[str, None] = {}


def check_model(cfg: ModelConfig, where: str, num_classes: int) -> Optional[int]:
    """Name check plus a build on PyTorch's meta device (shapes only, no memory): refuses kwargs timm rejects
    and models larger than ``MAX_PARAMS``. Returns the parameter count when the meta build worked."""
    check_model_name(cfg.model, where)
    if cfg.model.startswith(("hf-hub:", "local-dir:")):
        return None
    key = json.dumps([cfg.model, cfg.kwargs, num_classes], sort_keys=True, default=str)
    if key in _BUILD_CHECKED:
        return _BUILD_CHECKED[key]
    n = _meta_params(cfg, where, num_classes)
    if len(_BUILD_CHECKED) < 256:
        _BUILD_CHECKED[key] = n
    return n


def _meta_params(cfg: ModelConfig, where: str, num_classes: int) -> Optional[int]:
    import torch

    from .compat import import_timm

    timm = import_timm()
    try:
        with torch.device("meta"):
            model = timm.create_model(cfg.model, pretrained=False, num_classes=num_classes, **cfg.kwargs)
    except Exception as err:
        text = str(err)
        if isinstance(err, NotImplementedError) or "meta" in text.lower():
            return None  # this model cannot be built on the meta device: the real build decides
        raise BadInput(model_build_error(cfg, where, err)) from None
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMS:
        raise BadInput(f"{where}.model {cfg.model} with kwargs {short(cfg.kwargs)} has {n / 1e9:.1f}G parameters "
                       f"(limit {MAX_PARAMS / 1e9:.0f}G); check {where}.kwargs")
    return n


def model_build_error(cfg: ModelConfig, where: str, err: BaseException) -> str:
    """The message for timm refusing to build a recipe's model."""
    text = clip(err, 200)
    return (f"timm cannot build {where}.model {cfg.model} with {where}.kwargs {short(cfg.kwargs)}: "
            f"{type(err).__name__}{': ' + text if text else ''}; fix {where}.kwargs (or remove them)")
