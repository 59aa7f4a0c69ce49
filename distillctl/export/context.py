"""What a format builder receives (ExportContext) and returns (Artifact)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..recipe import Recipe
from .runtime import Runner

EXPORT_DIR = "export"  # ONNX files, the engine, its sidecar and timing cache live in RUN/export/


def run_folder_of(path: Path) -> Optional[Path]:
    """The run folder an artifact sits in (RUN/student/x, RUN/export/x or RUN/x), if any."""
    from ..runs import RECIPE_FILE

    for d in (Path(path).parent, Path(path).parent.parent):
        if (d / RECIPE_FILE).is_file():
            return d
    return None


@dataclass
class Artifact:
    name: str  # key in ``artifacts`` and ``parity``: safetensors, onnx, onnx_fp16, trt
    path: Path
    precision: str  # fp32 | fp16: picks the parity tolerance
    runner: Optional[Runner] = None  # scored against the PyTorch student when set
    info: dict = field(default_factory=dict)  # builder facts for export.json (exporter, opset, sidecar...)


@dataclass
class ExportContext:
    run_dir: Path
    recipe: Recipe
    student: torch.nn.Module  # the bare student, eval mode, CPU
    config: dict  # student/config.json
    precision: str
    batch: tuple[int, int, int]  # MIN, OPT, MAX
    opset: Optional[int]
    device: str  # auto | cpu | cuda (ONNX Runtime / TensorRT placement)
    torch_device: torch.device
    student_metrics: dict  # top1/top5/n of the PyTorch student on the val split
    artifacts: dict[str, Artifact] = field(default_factory=dict)  # built so far, in format order

    @property
    def out_dir(self) -> Path:
        d = self.run_dir / EXPORT_DIR
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def input_size(self) -> int:
        return int(self.config["pretrained_cfg"]["input_size"][-1])

    def metadata(self) -> dict:
        """What travels with every artifact (ONNX metadata_props, the engine's sidecar)."""
        from .. import __version__

        pc, dc = self.config["pretrained_cfg"], self.config.get("distillctl", {})
        return {
            "distillctl_version": __version__, "recipe_hash": dc.get("recipe_hash") or self.recipe.hash(),
            "architecture": self.config["architecture"], "input_size": list(pc["input_size"]),
            "mean": list(pc["mean"]), "std": list(pc["std"]), "num_classes": self.config["num_classes"],
            "method": dc.get("method") or self.recipe.method.name, "teacher": str(dc.get("teacher")),
            "dataset": self.recipe.data.dataset, "top1": self.student_metrics.get("top1"),
            "input_layout": "NCHW RGB, [0,1] then (x - mean) / std", "dynamic_batch": ":".join(map(str, self.batch)),
        }

    @staticmethod
    def log(msg: str) -> None:
        print(msg, file=sys.stderr)
