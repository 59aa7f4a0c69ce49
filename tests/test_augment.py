"""Augmentation: Mixup/CutMix on the device (targets, images, determinism), timm's ImageFolder
pipeline (sizes, range, RandAugment / TrivialAugment / erasing), and soft targets through the
soft-label code paths of the methods, on tiny real timm models (as tests/test_methods.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillctl.augment import (
    FILL_MEAN, BatchMixer, UnitErasing, eval_preprocess, folder_transform, mix_batch, mix_generator, soft_targets,
)
from distillctl.compat import import_timm
from distillctl.data import build_data
from distillctl.errors import BadInput
from distillctl.recipe import AugmentConfig, DataConfig, load_recipe

timm = import_timm()
C = 10


def _batch(b=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g)
    y = torch.randperm(C, generator=g)[:b] if b <= C else torch.randint(0, C, (b,), generator=g)
    return x, y


def _lam_from_targets(y_soft, y):
    """The kept fraction of each sample, read from its soft target (partner labels differ)."""
    return y_soft[torch.arange(len(y)), y]


# ----------------------------------------------------------------------------- Mixup / CutMix


def test_mixup_images_and_targets_follow_the_ratio():
    x, y = _batch()  # 8 distinct labels, so each sample's partner has another class
    cfg = AugmentConfig(mixup_alpha=1.0)
    xm, ys = mix_batch(x, y, C, cfg, mix_generator(0))
    assert ys.shape == (8, C) and ys.dtype == torch.float32
    assert torch.allclose(ys.sum(-1), torch.ones(8))
    lam = _lam_from_targets(ys, y)
    assert torch.allclose(lam, lam[0].expand(8)) and 0 < lam[0] < 1  # batch mode: one ratio
    lam = lam[0].item()
    assert torch.allclose(ys, lam * F.one_hot(y, C) + (1 - lam) * F.one_hot(y.flip(0), C))
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert not torch.equal(xm, x) and torch.equal(x, _batch()[0])  # the input batch is left as it was


def test_cutmix_pastes_one_box_whose_area_is_the_ratio():
    x, y = _batch(size=32)
    cfg = AugmentConfig(cutmix_alpha=1.0)
    gen = mix_generator(3)
    seen = 0
    for _ in range(20):
        xm, ys = mix_batch(x, y, C, cfg, gen)
        assert torch.allclose(ys.sum(-1), torch.ones(8))
        lam = _lam_from_targets(ys, y)
        pasted = (xm != x).any(1)  # [B, H, W]: where the partner's pixels are
        assert torch.equal(xm[:, :, ~pasted[0]], x[:, :, ~pasted[0]])  # outside the box: untouched
        assert torch.equal(xm.permute(0, 2, 3, 1)[pasted], x.flip(0).permute(0, 2, 3, 1)[pasted])
        assert all(torch.equal(pasted[i], pasted[0]) for i in range(8))  # batch mode: one box
        rows, cols = pasted[0].any(1).nonzero().flatten(), pasted[0].any(0).nonzero().flatten()
        if len(rows):
            box = torch.zeros_like(pasted[0])
            box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
            assert torch.equal(pasted[0], box)  # a filled rectangle
            seen += 1
        area = pasted[0].float().mean().item()
        assert lam[0].item() == pytest.approx(1 - area, abs=1e-6)  # the target is the kept area
    assert seen > 10


def test_elem_and_pair_modes_mix_per_sample():
    x, y = _batch(b=10, size=16)
    cfg = AugmentConfig(mixup_alpha=1.0, mixup_mode="elem", mixup_prob=0.5)
    xm, ys = mix_batch(x, y, C, cfg, mix_generator(1))
    lam = _lam_from_targets(ys, y)
    assert torch.allclose(ys.sum(-1), torch.ones(10))
    assert (lam == 1).any() and (lam < 1).any() and len(set(lam.tolist())) > 2  # own ratio, some left alone
    assert torch.allclose(xm, lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x.flip(0), atol=1e-6)
    assert torch.equal(xm[lam == 1], x[lam == 1])

    cfg = AugmentConfig(mixup_alpha=1.0, cutmix_alpha=1.0, mixup_mode="pair", mixup_prob=1.0)
    for seed in range(5):
        xm, ys = mix_batch(x, y, C, cfg, mix_generator(seed))
        lam = _lam_from_targets(ys, y)
        assert torch.allclose(lam, lam.flip(0))  # sample i and its partner B-1-i share the ratio


def test_switch_between_mixup_and_cutmix_and_ratio_distribution():
    x, y = _batch(size=16)
    cfg = AugmentConfig(mixup_alpha=1.0, cutmix_alpha=1.0, mixup_switch_prob=0.5)
    gen = mix_generator(0)
    kinds, lams = [], []
    for _ in range(200):
        xm, ys = mix_batch(x, y, C, cfg, gen)
        same = (xm == x).all(1).float().mean().item()  # CutMix keeps pixels exactly, Mixup none
        kinds.append("cutmix" if same > 0 else "mixup")
        if kinds[-1] == "mixup":
            lams.append(_lam_from_targets(ys, y)[0].item())
    assert 60 < kinds.count("cutmix") < 140
    assert abs(np.mean(lams) - 0.5) < 0.08  # Beta(1, 1) is uniform

    peaked = AugmentConfig(mixup_alpha=0.2)  # Beta(0.2, 0.2): mostly close to 0 or 1
    lam = [_lam_from_targets(mix_batch(x, y, C, peaked, gen)[1], y)[0].item() for _ in range(200)]
    assert np.mean([min(v, 1 - v) < 0.1 for v in lam]) > 0.5


def test_off_and_probability_zero_leave_the_batch():
    x, y = _batch()
    for cfg in (AugmentConfig(), AugmentConfig(mixup_alpha=1.0, mixup_prob=0.0)):
        xm, ys = mix_batch(x, y, C, cfg, mix_generator(0))
        assert xm is x and torch.equal(ys, F.one_hot(y, C).float())
    assert not AugmentConfig().mixing and AugmentConfig(cutmix_alpha=0.5).mixing


def test_deterministic_and_resumable_from_generator_state(tmp_path):
    x, y = _batch(size=16)
    cfg = AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_mode="elem")
    a, b = BatchMixer(cfg, C, seed=5), BatchMixer(cfg, C, seed=5)
    for _ in range(3):
        (xa, ya), (xb, yb) = a(x, y), b(x, y)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    torch.save(a.state(), tmp_path / "mix.pt")  # as in a checkpoint, read back with weights_only
    expected = [a(x, y) for _ in range(2)]
    resumed = BatchMixer(cfg, C, seed=999)
    resumed.load_state(torch.load(tmp_path / "mix.pt", weights_only=True))
    for xe, ye in expected:
        xr, yr = resumed(x, y)
        assert torch.equal(xr, xe) and torch.equal(yr, ye)
    other_rank = BatchMixer(cfg, C, seed=5, rank=1)
    assert not torch.equal(other_rank(x, y)[1], BatchMixer(cfg, C, seed=5)(x, y)[1])


def test_label_smoothing_folds_in_like_timm_and_matches_cross_entropy():
    x, y = _batch()
    cfg = AugmentConfig(mixup_alpha=1.0)
    _, plain = mix_batch(x, y, C, cfg, mix_generator(2))
    _, smooth = mix_batch(x, y, C, cfg, mix_generator(2), smoothing=0.1)
    assert torch.allclose(smooth, plain * 0.9 + 0.1 / C) and torch.allclose(smooth.sum(-1), torch.ones(8))
    lam = _lam_from_targets(plain, y)[0]
    # timm's mixup_target: lam * smooth(onehot(y)) + (1 - lam) * smooth(onehot(y_flip))
    timm_style = lam * soft_targets(y, C, 0.1) + (1 - lam) * soft_targets(y.flip(0), C, 0.1)
    assert torch.allclose(smooth, timm_style)
    z = torch.randn(8, C)
    # one smoothing, two equivalent places: in the targets, or in the loss (never both)
    by_loss = F.cross_entropy(z, plain, label_smoothing=0.1)
    by_targets = -(smooth * F.log_softmax(z, -1)).sum(-1).mean()
    assert by_loss.item() == pytest.approx(by_targets.item(), rel=1e-6)


# ----------------------------------------------------------------------------- ImageFolder (timm)


@pytest.fixture
def folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = (30, 40) if i % 2 else (44, 26)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    return tmp_path


def _img(h=30, w=40, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("keys", [
    {},
    {"auto_augment": "rand-m9-mstd0.5-inc1"},
    {"auto_augment": "trivialaugment"},
    {"auto_augment": "augmix-m5-w4-d2"},
    {"color_jitter": 0.4, "rrc_scale": (0.35, 1.0)},
    {"re_prob": 1.0, "re_mode": "pixel", "re_count": 2},
    {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "hflip": True, "mixup_alpha": 0.8},
])
def test_imagefolder_train_pipeline_yields_unit_range_batches(folder, keys):
    cfg = DataConfig(dataset="imagefolder", root=str(folder), image_size=24, batch_size=4, val_batch_size=4,
                     num_workers=0, augment=AugmentConfig(**keys))
    d = build_data(cfg, seed=0, device=torch.device("cpu"))
    d.train.set_epoch(0)
    batches = list(d.train)
    assert len(batches) == 2
    for x, y in batches:
        assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and y.shape == (4,)
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05
    names = [type(t).__name__ for t in d.train.ds.tf.transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and names[-1] in ("PILToTensor", "UnitErasing")
    expect = {"rand-m9-mstd0.5-inc1": "RandAugment", "trivialaugment": "TrivialAugmentWide",
              "augmix-m5-w4-d2": "AugMixAugment"}.get(keys.get("auto_augment"))
    if expect:
        assert expect in names
    assert ("ColorJitter" in names) == ("color_jitter" in keys)
    assert ("UnitErasing" in names) == ("re_prob" in keys)


def test_augment_ops_change_the_image():
    img = _img(32, 32)
    base = folder_transform(32, True, AugmentConfig(rrc_scale=(1.0, 1.0)))  # full-image crop: a plain resize
    x0 = base(img)
    assert x0.dtype == torch.uint8 and x0.shape == (3, 32, 32)
    for keys in ({"auto_augment": "rand-m9-n3-mstd0.5-inc1"}, {"auto_augment": "trivialaugment"},
                 {"color_jitter": 0.8}):
        tf = folder_transform(32, True, AugmentConfig(rrc_scale=(1.0, 1.0), **keys))
        outs = [tf(img) for _ in range(8)]
        assert any(not torch.equal(o, x0) for o in outs), keys


@pytest.mark.parametrize("mode", ["const", "rand", "pixel"])
def test_random_erasing_fills_in_unit_space(mode):
    torch.manual_seed(0)
    import random

    random.seed(0)
    img = torch.full((3, 40, 40), 255, dtype=torch.uint8)  # white image
    erase = UnitErasing(1.0, mode, 1)
    for _ in range(10):
        out = erase(img.clone())
        hit = (out != 255).any(0)
        frac = hit.float().mean().item()
        assert out.dtype == torch.uint8 and 0.005 < frac <= 1 / 3 + 0.02  # timm's 2% .. 1/3 of the area
        box = out[:, hit]  # [3, N] erased pixels
        if mode == "const":  # the mean colour (0 in normalised space), not black
            assert box.T.unique(dim=0).tolist() == [[round(255 * m) for m in FILL_MEAN]]
        elif mode == "rand":  # one colour per box, clamped into range
            assert box.T.unique(dim=0).shape[0] == 1
        else:
            assert box.T.unique(dim=0).shape[0] > 10 and box.float().std() > 20  # noise around the mean
        assert torch.equal(out[:, ~hit], img[:, ~hit])  # outside the box: unchanged


def test_eval_transform_is_resize_then_center_crop_and_timm_can_rebuild_it():
    from torchvision import transforms

    for size, (h, w) in ((24, (30, 40)), (32, (50, 37)), (224, (300, 260))):
        img = _img(h, w, seed=size)
        got = folder_transform(size, False, AugmentConfig(re_prob=1.0, auto_augment="trivialaugment"))(img)
        ref = transforms.Compose([transforms.Resize(math.floor(size / 0.875)), transforms.CenterCrop(size),
                                  transforms.PILToTensor()])(img)
        assert got.shape == (3, size, size) and torch.equal(got, ref)  # no train-time op leaks into eval
        pre = eval_preprocess(size)
        assert pre == {"input_size": [3, size, size], "interpolation": "bilinear", "crop_pct": 0.875,
                       "crop_mode": "center"}
        data_cfg = timm.data.resolve_data_config(pretrained_cfg=dict(pre, mean=(0, 0, 0), std=(1, 1, 1)))
        rebuilt = timm.data.create_transform(**data_cfg, is_training=False, normalize=False)
        assert torch.equal(rebuilt(img), got)


def test_per_image_keys_are_imagefolder_only():
    for keys, name in (({"re_prob": 0.25}, "data.augment.re_prob"), ({"auto_augment": "trivialaugment"},
                                                                     "data.augment.auto_augment")):
        with pytest.raises(BadInput, match=name.replace(".", r"\.") + ".*ImageFolder"):
            build_data(DataConfig(dataset="digits", image_size=8, augment=AugmentConfig(**keys)), seed=0,
                       device=torch.device("cpu"))
    # Mixup/CutMix are fine on the in-memory path (they run in the step, on the device)
    build_data(DataConfig(dataset="digits", image_size=8, augment=AugmentConfig(mixup_alpha=0.8)), seed=0,
               device=torch.device("cpu"))


def test_recipe_checks_augment_keys(tmp_path):
    from pathlib import Path

    smoke = Path(__file__).resolve().parents[1] / "recipes" / "ci_smoke.yaml"
    with pytest.raises(BadInput, match="auto_augment.*rand-m9-foo.*not a timm policy"):
        load_recipe(smoke, ["data.augment.auto_augment=rand-m9-foo"])
    with pytest.raises(BadInput, match="set one of them"):
        load_recipe(smoke, ["data.augment.auto_augment=rand-m9-mstd0.5-inc1", "data.augment.color_jitter=0.4"])
    with pytest.raises(BadInput, match="re_mode"):
        load_recipe(smoke, ["data.augment.re_mode=noise"])
    with pytest.raises(BadInput, match="rrc_scale"):
        load_recipe(smoke, ["data.augment.rrc_scale=[0.9, 0.2]"])
    r = load_recipe(smoke, ["data.augment.mixup_alpha=0.8", "data.augment.cutmix_alpha=1.0"])
    assert r.data.augment.mixing and r.data.augment.mixup_mode == "batch"


# ----------------------------------------------------------------------------- soft targets in the methods

SIZE = 32


def _method(name, **params):
    from distillctl.methods import build_method, registry
    from distillctl.methods.base import PairInfo
    from distillctl.models import probe

    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=C)
    cls = registry.get(name)
    teacher = timm.create_model("test_vit", num_classes=C, img_size=SIZE) if cls.needs_teacher else None
    pair = PairInfo(C, probe(student, SIZE), probe(teacher, SIZE) if teacher is not None else None,
                    label_smoothing=0.1, epochs=2)
    method = build_method(name, student, teacher, cls.Config(**params), pair)
    with torch.no_grad():  # confident, uneven logits: at init they are near uniform and CE ~ log C for any target
        student.get_classifier().weight.normal_(0, 2.0)
    method.train()
    method.progress = 100.0  # past any warm-up
    return method


def _mixed(b=4):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(b, 3, SIZE, SIZE, generator=g)
    y = torch.tensor([0, 1, 2, 3])[:b]  # partners (B-1-i) have other classes: the targets are really soft
    xm, ys = mix_batch(x, y, C, AugmentConfig(mixup_alpha=1.0), mix_generator(4))
    lam = _lam_from_targets(ys, y)[0].item()
    assert 0.05 < lam < 0.95 and abs(lam - 0.5) > 0.05  # a clear mix with a clear argmax
    return xm, y, ys, lam


def _forward(method, x, y):
    with torch.no_grad():
        return method(x, x, y)


def _all_methods():
    from distillctl.methods import registry

    return registry.names()


@pytest.mark.parametrize("name", _all_methods())
def test_soft_targets_train_every_method(name):
    """Every method takes ``y [B, C]``: finite losses, gradients, and a CE term linear in the target."""
    method = _method(name)
    xm, y, ys, lam = _mixed()
    zs, losses = method(xm, xm, ys)
    assert zs.shape == (4, C)
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), f"{name}: {k} = {v}"
    sum(losses.values()).backward()
    assert method.student.get_classifier().weight.grad.abs().sum() > 0
    # CE against a mixed target = the same mix of the CEs against each one-hot target
    _, la = _forward(method, xm, soft_targets(y, C))
    _, lb = _forward(method, xm, soft_targets(y.flip(0), C))
    _, lh = _forward(method, xm, y)
    assert losses["loss_ce"].item() == pytest.approx(lam * la["loss_ce"].item() + (1 - lam) * lb["loss_ce"].item(),
                                                     rel=1e-4)
    assert la["loss_ce"].item() == pytest.approx(lh["loss_ce"].item(), rel=1e-5)  # one-hot soft == hard labels
    assert abs(la["loss_ce"].item() - lb["loss_ce"].item()) > 0.05  # the two targets are told apart, so the
    assert abs(losses["loss_ce"].item() - lh["loss_ce"].item()) > 0.01  # mix above is a real check


def test_ofa_soft_labels_use_their_argmax_as_target_mask():
    from distillctl.methods.ofa import ofa_loss, target_mask

    method = _method("ofa", gamma=1.5)
    xm, y, ys, lam = _mixed()
    hard = ys.argmax(-1)
    assert torch.equal(hard, y if lam > 0.5 else y.flip(0))
    assert torch.equal(target_mask(ys, C), F.one_hot(hard, C).float())
    zs, losses = _forward(method, xm, ys)
    zt = method.teacher_forward(xm).logits
    cfg = method.cfg
    assert losses["loss_kd"].item() == pytest.approx(cfg.w_kd * ofa_loss(zs, zt, hard, 1.5, cfg.temperature).item(),
                                                     rel=1e-5)
    _, by_hard = _forward(method, xm, hard)
    assert losses["loss_ofa"].item() == pytest.approx(by_hard["loss_ofa"].item(), rel=1e-5)  # branch losses too
    assert losses["loss_ce"].item() == pytest.approx(F.cross_entropy(zs, ys, label_smoothing=0.1).item(), rel=1e-5)


def test_dkd_soft_labels_decouple_at_their_argmax():
    from distillctl.methods.dkd import dkd_terms

    method = _method("dkd", warmup_epochs=0.0)
    xm, y, ys, lam = _mixed()
    hard = ys.argmax(-1)
    zs, losses = _forward(method, xm, ys)
    zt = method.teacher_forward(xm).logits
    tckd, nckd = dkd_terms(zs, zt, hard, method.cfg.temperature)
    t2 = method.cfg.temperature ** 2
    assert losses["loss_tckd"].item() == pytest.approx(t2 * method.cfg.alpha * tckd.item(), rel=1e-5)
    assert losses["loss_nckd"].item() == pytest.approx(t2 * method.cfg.beta * nckd.item(), rel=1e-5)
    assert losses["loss_ce"].item() == pytest.approx(F.cross_entropy(zs, ys, label_smoothing=0.1).item(), rel=1e-5)


def test_hcd_soft_labels_reach_fused_ce_and_orthogonality_mask():
    method = _method("hcd")
    xm, y, ys, lam = _mixed()
    hard = ys.argmax(-1)
    _, soft = _forward(method, xm, ys)
    _, by_hard = _forward(method, xm, hard)
    # OL masks the argmax of the soft labels; KD and SDD do not look at labels at all
    for k in ("loss_ol", "loss_kd", "loss_sdd"):
        assert soft[k].item() == pytest.approx(by_hard[k].item(), rel=1e-5), k
    # the CE on the student and on every fused sub-logit takes the soft target (linear in it)
    _, la = _forward(method, xm, soft_targets(y, C))
    _, lb = _forward(method, xm, soft_targets(y.flip(0), C))
    assert soft["loss_ce"].item() == pytest.approx(lam * la["loss_ce"].item() + (1 - lam) * lb["loss_ce"].item(),
                                                   rel=1e-4)
    zs = method.student(xm)
    student_only = F.cross_entropy(zs, ys, label_smoothing=0.1).item()
    assert soft["loss_ce"].item() > student_only + 0.1  # the fused sub-logit CE is in there as well

