"""safetensors builder: the bare student re-saved with its metadata and proven loadable by plain timm.

The run's student folder (model.safetensors + config.json) is timm's local-model layout.
Checks: a fresh ``timm.create_model(arch, num_classes=N)`` takes the file with ``strict=True``,
and, where this timm has it, ``timm.create_model("local-dir:RUN/student", pretrained=True)``
rebuilds the same weights from the folder alone.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..compat import import_timm
from ..errors import ExportFailed
from .job import Artifact, ExportJob
from .runtime import TorchPredictor


def _timm_local_dir(timm, folder: Path, reference: dict[str, torch.Tensor]) -> str:
    """'ok', 'unsupported' (older timm), or raise when the folder does not rebuild the same weights."""
    try:
        from timm.models._hub import load_model_config_from_path  # noqa: F401 - feature detection
    except ImportError:
        return f"unsupported by timm {timm.__version__}"
    try:
        model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True)
    except Exception as err:
        raise ExportFailed(f"timm cannot load {folder} as a local model: {type(err).__name__}: {err}") from None
    sd = model.state_dict()
    bad = [k for k, v in reference.items() if k not in sd or not torch.equal(sd[k], v)]
    if bad or len(sd) != len(reference):
        raise ExportFailed(f"timm's local-dir load of {folder} differs from the student (e.g. {bad[:3]})")
    return "ok"


def build(ctx: ExportJob) -> list[Artifact]:
    from safetensors.torch import load_file

    timm = import_timm()
    cfg = dict(ctx.config)
    cfg["distillctl"] = {**cfg.get("distillctl", {}), "top1": ctx.student_metrics["top1"],
                         "top5": ctx.student_metrics["top5"], "val_images": ctx.student_metrics["n"],
                         "dataset": ctx.recipe.data.dataset}
    path = ctx.run.save_student(ctx.student, cfg)
    folder = ctx.run.student_dir
    ctx.config = cfg

    # the contract's check: plain timm, strict, nothing of ours in between
    fresh = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"],
                              **cfg.get("model_args", {}))
    sd = load_file(str(path))
    try:
        fresh.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ExportFailed(f"{path} does not strict-load into timm.create_model('{cfg['architecture']}', "
                           f"num_classes={cfg['num_classes']}): {err}") from None
    local_dir = _timm_local_dir(timm, folder, fresh.state_dict())
    ctx.log(f"  safetensors: {path} (strict load into timm ok, timm local-dir: {local_dir})")
    return [Artifact("safetensors", path, "fp32", TorchPredictor(fresh.eval(), ctx.torch_device, name="safetensors"),
                     {"strict_load": "ok", "timm_local_dir": local_dir, "tensors": len(sd),
                      "bytes": path.stat().st_size})]
