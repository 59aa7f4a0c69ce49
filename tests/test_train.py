"""Trainer behaviour: schedules, divergence keeps the last good checkpoint, exact resume."""
import math
from pathlib import Path

import pytest
import torch

from distillctl.errors import Diverged
from distillctl.methods.base import Distiller, MethodConfig, PairInfo
from distillctl.models import InputView
from distillctl.recipe import DataConfig, TrainConfig, validate_raw
from distillctl.run import Run
from distillctl.train import fit, lr_factor


def _run(path) -> Run:
    """A run folder for fit (fit takes its checkpoint, metrics and best weights from it)."""
    recipe = validate_raw({"student": {"model": "test_resnet"}, "method": {"name": "ce"}})
    run = Run(path, recipe)
    run.create("train")
    return run


def load_checkpoint(path) -> dict:
    return Run(Path(path).parent).load_checkpoint()


def test_lr_warmup_then_cosine_to_floor():
    cfg = TrainConfig(epochs=10, lr=0.1, warmup_epochs=2, min_lr=0.001, schedule="cosine")
    f = lr_factor(cfg, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.05) and f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 40 / 80)))
    assert f(100) == pytest.approx(0.01)
    step = lr_factor(TrainConfig(epochs=90, lr=0.1, schedule="step", step_size=30), 5)
    assert step(149) == 1.0 and step(150) == pytest.approx(0.1) and step(300) == pytest.approx(0.01)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class _NanAt(Distiller):
    """CE that turns into NaN once ``progress`` reaches ``at`` epochs (a divergence on cue)."""

    name = "nan_test"
    needs_teacher = False
    at = 1.0

    def forward(self, xs, xt, y):
        z = self.student(xs)
        loss = torch.nn.functional.cross_entropy(z, y)
        if self.progress >= self.at:
            loss = loss * float("nan")
        return z, {"loss_ce": loss}


def _setup(tmp_path, epochs=3):
    from distillctl.data import build_data

    data = build_data(DataConfig(dataset="synthetic", num_classes=3, synthetic_size=60, image_size=8, batch_size=8),
                      seed=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    method = _NanAt(_Tiny(), None, MethodConfig(), PairInfo(3, None, None))
    cfg = TrainConfig(epochs=epochs, lr=0.05, log_every=2)
    view = InputView(8, (0.5,) * 3, (0.5,) * 3)
    return data, method, cfg, view


def test_divergence_exits_6_and_keeps_last_good_checkpoint(tmp_path):
    data, method, cfg, view = _setup(tmp_path)
    method.at = 1.5  # diverges half way through the second epoch
    with pytest.raises(Diverged) as e:
        fit(method, data, cfg, run=_run(tmp_path), device=torch.device("cpu"), student_view=view, teacher_view=None)
    assert e.value.exit_code == 6
    st = load_checkpoint(tmp_path / "checkpoint.pt")
    assert st["epoch"] == 1 and st["step"] == 0  # written after epoch 1, never overwritten
    assert all(torch.isfinite(v).all() for v in st["student"].values())


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    a, c = tmp_path / "a", tmp_path / "c"
    a.mkdir(), c.mkdir()
    data, method, cfg, view = _setup(a)
    method.at = 99
    fit(method, data, cfg, run=_run(a), device=torch.device("cpu"), student_view=view, teacher_view=None)
    full = method.student.state_dict()

    class Stop(Exception):
        pass

    data, method, cfg, view = _setup(c)
    method.at = 99
    orig, calls = method.forward, {"n": 0}

    def forward(xs, xt, y):  # die in epoch 2, after epoch 1's checkpoint, like a kill
        calls["n"] += 1
        if calls["n"] > len(data.train) + 2:
            raise Stop
        return orig(xs, xt, y)

    method.forward = forward
    with pytest.raises(Stop):
        fit(method, data, cfg, run=_run(c), device=torch.device("cpu"), student_view=view, teacher_view=None)
    assert load_checkpoint(c / "checkpoint.pt")["epoch"] == 1
    data, method, cfg, view = _setup(c)
    method.at = 99
    fit(method, data, cfg, run=_run(c), device=torch.device("cpu"), student_view=view, teacher_view=None, resume=True)
    resumed = method.student.state_dict()
    for k in full:
        assert torch.allclose(full[k].float(), resumed[k].float(), atol=1e-6), k
    assert load_checkpoint(c / "checkpoint.pt")["epoch"] == 3


def _fit(path, data, method, cfg, view, **kw):
    return fit(method, data, cfg, run=_run(path), device=torch.device("cpu"), student_view=view, teacher_view=None,
               **kw)


def test_divergence_before_any_checkpoint_says_there_is_none(tmp_path):
    data, method, cfg, view = _setup(tmp_path)
    method.at = 0.2
    with pytest.raises(Diverged) as e:
        _fit(tmp_path, data, method, cfg, view)
    assert "no checkpoint had been written yet" in e.value.message and "kept at" not in e.value.message


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    """2 micro-batches of 8 per step == 1 batch of 16 (same images, same order, lr per effective batch)."""
    from distillctl.data import build_data

    states = []
    for bs, acc in ((16, 1), (8, 2)):
        data = build_data(DataConfig(dataset="synthetic", num_classes=3, synthetic_size=80, image_size=8,
                                     batch_size=bs), seed=0, device=torch.device("cpu"))
        torch.manual_seed(0)
        method = _NanAt(_Tiny(), None, MethodConfig(), PairInfo(3, None, None))
        method.at = 99
        cfg = TrainConfig(epochs=2, lr=0.1, log_every=1, accumulate=acc, weight_decay=1e-3)
        _fit(tmp_path / f"b{bs}", data, method, cfg, InputView(8, (0.5,) * 3, (0.5,) * 3))
        states.append(method.student.state_dict())
        rows = Run(tmp_path / f"b{bs}").metrics_rows()
        assert [r["step"] for r in rows if "step" in r] == [1, 2, 3, 4, 1, 2, 3, 4]  # optimizer steps
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], atol=1e-6), k


def test_best_epoch_is_exported_and_recorded(tmp_path):
    from distillctl.models import read_state_dict

    data, method, cfg, view = _setup(tmp_path, epochs=4)
    method.at = 99
    res = _fit(tmp_path, data, method, cfg, view)
    hist = res["history"]
    best = max(range(len(hist)), key=lambda i: (hist[i], -i))  # the first epoch reaching the best top-1
    assert res["chosen"] == {"weights": "best", "epoch": best + 1, "metric": "top1", "value": hist[best]}
    saved = read_state_dict(tmp_path / "best.safetensors")
    exported = res["eval_model"].state_dict()
    assert all(torch.equal(saved[k], exported[k]) for k in saved)
    assert res["top1"] == pytest.approx(hist[best])


def test_early_stopping_after_patience_without_gain(tmp_path):
    data, method, cfg, view = _setup(tmp_path, epochs=6)
    method.at = 99
    cfg = TrainConfig(epochs=6, lr=1e-12, log_every=2, early_stop_patience=2)  # learns nothing: no gain
    res = _fit(tmp_path, data, method, cfg, view)
    assert res["early_stopped_at"] == 3 and len(res["history"]) == 3


def test_plain_progress_lines_when_not_on_a_terminal(tmp_path, caplog):
    import logging

    from distillctl.progress import Progress

    data, method, cfg, view = _setup(tmp_path, epochs=1)
    method.at = 99
    with caplog.at_level(logging.INFO, logger="distillctl"):
        _fit(tmp_path, data, method, cfg, view, progress=Progress("distill 2/2", bar=False))
    lines = [r.getMessage() for r in caplog.records]
    steps = [m for m in lines if m.startswith("distill 2/2 | step")]
    assert len(steps) == 3 and "ETA" in steps[0] and "img/s" in steps[0]  # every logged step (log_every 2 of 6)
    assert any(m.startswith("distill 2/2: epoch 1/1") and "top1=" in m for m in lines)


def test_optimizer_groups_follow_timm_no_weight_decay():
    """timm's factory: a ViT student's cls_token/pos_embed, biases and norms take no weight decay."""
    from distillctl.compat import import_timm
    from distillctl.methods import build_method, registry
    from distillctl.models import probe
    from distillctl.train import build_optimizer

    timm = import_timm()
    torch.manual_seed(0)
    student = timm.create_model("test_vit", num_classes=10, img_size=32)
    method = build_method("ce", student, None, registry.get("ce").Config(), PairInfo(10, probe(student, 32), None))
    opt = build_optimizer(method, TrainConfig(weight_decay=0.05, nesterov=True))
    names = {id(p): n for n, p in method.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    free = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"student.cls_token", "student.pos_embed"} <= free
    assert all(n.endswith(".weight") for n in decay) and "student.head.weight" in decay
    assert not any(n.endswith(".bias") or ".norm" in n for n in decay)
    assert decay | free == set(names.values())
    assert opt.defaults.get("nesterov") is True and isinstance(opt, torch.optim.SGD)
