"""What a format builder receives (ExportJob) and returns (Artifact)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..recipe import Recipe
from .runtime import Predictor

log = logging.getLogger("distillctl")


@dataclass
class Artifact:
    name: str  # key in ``artifacts`` and ``parity``: safetensors, onnx, onnx_fp16, onnx_int8, trt
    path: Path
    precision: str  # fp32 | fp16 | int8: picks the parity tolerance
    predictor: Optional[Predictor] = None  # scored against the PyTorch student when set
    info: dict = field(default_factory=dict)  # builder facts for export.json (exporter, opset, sidecar...)


@dataclass
class ExportJob:
    run: "object"  # distillctl.run.Run: every path comes from it
    recipe: Recipe
    student: torch.nn.Module  # the bare student, eval mode, CPU
    config: dict  # student/config.json
    precision: str
    batch: tuple[int, int, int]  # MIN, OPT, MAX
    opset: Optional[int]
    device: str  # auto | cpu | cuda (ONNX Runtime / TensorRT placement)
    torch_device: torch.device
    student_metrics: dict  # top1/top5/n of the PyTorch student on the val split
    calibration: Optional[object] = None  # callable -> iterator of normalised training batches (INT8)
    formats: tuple = ()  # every format of this export (a builder may prepare what a later one needs)
    artifacts: dict[str, Artifact] = field(default_factory=dict)  # built so far, in format order

    @property
    def input_size(self) -> int:
        return int(self.config["pretrained_cfg"]["input_size"][-1])

    def metadata(self) -> dict:
        """What travels with every artifact (ONNX metadata_props, the engine's sidecar)."""
        from .. import __version__

        pc, dc = self.config["pretrained_cfg"], self.config.get("distillctl", {})
        meta = {
            "distillctl_version": __version__, "recipe_hash": dc.get("recipe_hash") or self.recipe.hash(),
            "architecture": self.config["architecture"], "input_size": list(pc["input_size"]),
            "mean": list(pc["mean"]), "std": list(pc["std"]), "num_classes": self.config["num_classes"],
            "interpolation": pc.get("interpolation"), "crop_pct": pc.get("crop_pct"),
            "method": dc.get("method") or self.recipe.method.name, "teacher": str(dc.get("teacher")),
            "dataset": self.recipe.data.dataset, "top1": self.student_metrics.get("top1"),
            "input_layout": "NCHW RGB, [0,1] then (x - mean) / std", "dynamic_batch": ":".join(map(str, self.batch)),
        }
        if self.config.get("label_names"):
            meta["class_names"] = list(self.config["label_names"])
        return meta

    @staticmethod
    def log(msg: str) -> None:
        log.info(msg)
