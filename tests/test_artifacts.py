"""Artifacts that describe themselves: class names and the exact evaluation preprocessing travel in
config.json and the ONNX metadata, timm's own transform from them reproduces the reported top-1, and
the model card's snippet runs as it is printed."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_cli

CLASSES = ["apple", "banana", "cherry"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A real ImageFolder (non-square images: resize and crop matter), a trained student, its ONNX file."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 10)):
        for c, name in enumerate(CLASSES):
            d = tmp / "data" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = np.zeros((40, 52, 3), np.uint8)
                img[..., c] = 150 + rng.integers(0, 100)  # the class is the dominant colour
                img += rng.integers(0, 60, img.shape, dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    recipe = tmp / "r.yaml"
    recipe.write_text(f"""
name: folder
data: {{dataset: imagefolder, root: {tmp / 'data'}, image_size: 32, batch_size: 12, val_batch_size: 16, num_workers: 0}}
student: {{model: test_resnet}}
method: {{name: ce}}
train: {{epochs: 3, lr: 0.05, log_every: 2}}
export: {{formats: [safetensors, onnx], parity_images: 30, onnx_exporter: torchscript}}  # ~0.3 s, not ~3 s
""")
    r = run_cli("train", str(recipe), "--out", str(tmp / "run"), cwd=tmp)
    assert r.returncode == 0, r.stderr
    r = run_cli("export", str(tmp / "run"), "--format", "onnx", "--json", cwd=tmp)
    assert r.returncode == 0, r.stderr
    return tmp


def test_class_names_and_preprocessing_travel_with_the_student(folder_run):
    from distillctl.export.onnx import read_metadata

    cfg = json.loads((folder_run / "run" / "student" / "config.json").read_text())
    assert cfg["label_names"] == CLASSES and cfg["pretrained_cfg"]["label_names"] == CLASSES
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["crop_pct"] == 0.875 and pc["crop_mode"] == "center"
    assert pc["interpolation"] in ("bilinear", "bicubic") and len(pc["mean"]) == 3
    meta = read_metadata(folder_run / "run" / "export" / "model.onnx")
    assert meta["class_names"] == CLASSES and meta["crop_pct"] == 0.875


def test_timm_transform_from_the_config_reproduces_the_reported_top1(folder_run):
    """What a deployer does: timm's transform from config.json, image by image; same top-1 as `eval`."""
    import torch
    from PIL import Image

    import distillctl

    r = run_cli("eval", str(folder_run / "run"), "--json", cwd=folder_run)
    reported = json.loads(r.stdout)["metrics"]
    model, cfg = distillctl.load_student(folder_run / "run")
    tf = distillctl.eval_transform(cfg)
    hits = n = 0
    with torch.no_grad():
        for c, name in enumerate(cfg["label_names"]):
            for p in sorted((folder_run / "data" / "val" / name).iterdir()):
                x = tf(Image.open(p).convert("RGB")).unsqueeze(0)
                hits += int(model(x).argmax()) == c
                n += 1
    assert n == reported["n"] == 30
    assert hits / n == pytest.approx(reported["top1"], abs=1 / n)


def _snippet(card: str) -> str:
    use = card.split("## Use", 1)[1]
    return re.search(r"```python\n(.*?)```", use, re.S).group(1)


def test_the_model_cards_snippet_runs_as_printed(folder_run):
    from PIL import Image

    run = folder_run / "run"
    card = (run / "MODEL_CARD.md").read_text()
    assert str(folder_run) not in card  # paths are relative to the run folder
    src = next((folder_run / "data" / "val" / "banana").iterdir())
    Image.open(src).save(run / "image.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    p = subprocess.run([sys.executable, "-c", _snippet(card)], cwd=run, capture_output=True, text=True, env=env,
                       timeout=300)
    (run / "image.png").unlink()
    assert p.returncode == 0, p.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in p.stdout.strip().splitlines())
    assert set(lines) == {"pytorch", "onnx"} and lines["pytorch"] in CLASSES and lines["onnx"] == lines["pytorch"]
