"""HCD (methods.md, "HCD"): module shapes and parameter counts by formula, the orthogonality loss
against hand-computed values, every loss term against a loop-by-loop reference, gradient routing,
knob validation, and the shipped HCD recipes."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from distillctl.compat import import_timm
from distillctl.errors import BadInput
from distillctl.methods import build_method, registry
from distillctl.methods.base import PairInfo, kl_div
from distillctl.methods.hcd import HCD, HCDConfig, orthogonality_loss
from distillctl.models import PRE_POOL, count_params, probe

timm = import_timm()
ROOT = Path(__file__).resolve().parents[1]
C10 = 10


# ----------------------------------------------------------------------------- parameter formulas


def sepdown_params(ci: int, co: int) -> int:
    # dw3x3 (no bias) + pw ci->ci + BN(ci) + dw3x3 + pw ci->co + BN(co)
    return 9 * ci + ci * ci + 2 * ci + 9 * ci + ci * co + 2 * co


def cnn_projector_params(c: int, stage: int, d: int) -> int:
    if stage == 4:
        return c * d + d  # 1x1 conv with bias
    total, n_blocks = 0, 4 - stage
    for b in range(n_blocks):
        co = d if b == n_blocks - 1 else 2 * c
        total += sepdown_params(c, co)
        c = co
    return total


def vit_block_params(c: int) -> int:
    # norm1 2c, qkv 3c^2 (no bias), proj c^2 + c, norm2 2c, fc1 4c^2 + 4c, fc2 4c^2 + c
    return 12 * c * c + 10 * c


def token_projector_params(c: int, grid: int, stage: int, d: int) -> int:
    merges = 0
    while grid > 7:
        merges, grid = merges + 1, (grid + 1) // 2
    merge = merges * (8 * c + 4 * c * c)  # LayerNorm(4c) + Linear(4c -> c, no bias)
    blocks = max(1, 4 - stage) * vit_block_params(c)
    out = c * d + d if c != d else 0
    return merge + blocks + 2 * c + out


def cfm_params(d: int, dt: int, hidden: int, n: int, c: int) -> int:
    if hidden == 0:
        return (d + dt) * n * c + n * c
    return (d + dt) * hidden + hidden + hidden * n * c + n * c


# ----------------------------------------------------------------------------- fixtures



@pytest.fixture(scope="module")
def small_vit_teacher():
    torch.manual_seed(0)
    t = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=C10, img_size=32, patch_size=4, depth=2)
    return t, probe(t, 32)


def make_r18_method(teacher, t_shapes, seed=0, ls=0.1, **cfg):
    torch.manual_seed(seed)
    s = timm.create_model("resnet18", pretrained=False, num_classes=C10)
    pair = PairInfo(C10, probe(s, 32), t_shapes, label_smoothing=ls)
    return build_method("hcd", s, teacher, HCDConfig(**cfg), pair)


def batch(b=4, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.randint(0, C10, (b,), generator=g)


# ----------------------------------------------------------------------------- config


def test_registered_and_defaults():
    assert "hcd" in registry.names() and registry.get("hcd") is HCD
    c = HCDConfig()
    assert (c.num_sub_logits, c.stages, c.ol_threshold, c.temperature) == (4, [1, 2, 3, 4], 0.5, 1.0)
    assert (c.w_kd, c.w_sdd, c.w_ol) == (1.0, 6.0, 1.0)
    assert (c.cfm_hidden, c.detach_targets, c.stage_reduce, c.ol_mask) == (None, False, "mean", "zero")
    assert (c.use_sdd, c.use_ol, c.fuse_student_weight, c.fuse_teacher_weight) == (True, True, 1.0, 1.0)
    assert HCDConfig(stages=[4, 2]).stages == [2, 4]


@pytest.mark.parametrize("bad, words", [
    ({"num_sub_logits": 0}, "greater than or equal to 1"),
    ({"stages": [5]}, "stages 1..4"),
    ({"stages": [0, 1]}, "stages 1..4"),
    ({"stages": [1, 2, 2]}, "unique"),
    ({"stages": []}, "at least 1"),
    ({"ol_threshold": 1.5}, "less than or equal to 1"),
    ({"temperature": 0}, "greater than 0"),
    ({"w_sdd": -1}, "greater than or equal to 0"),
    ({"cfm_hidden": -3}, "greater than or equal to 0"),
    ({"stage_reduce": "max"}, "'sum' or 'mean'"),
    ({"ol_mask": "neg"}, "'zero' or 'none'"),
    ({"fuse_student_weight": 0, "fuse_teacher_weight": 0}, "both 0"),
    ({"num_sublogits": 3}, "Extra inputs"),
])
def test_invalid_knobs_raise(bad, words):
    with pytest.raises(ValidationError) as err:
        HCDConfig(**bad)
    assert words in str(err.value)


def test_invalid_knob_in_recipe_is_bad_input():
    from distillctl.recipe import validate_raw

    raw = {"student": {"model": "resnet18"}, "teacher": {"model": "vit_tiny_patch16_224"},
           "method": {"name": "hcd", "stages": [1, 5]}}
    with pytest.raises(BadInput, match=r"method\.stages.*1\.\.4"):
        validate_raw(raw)
    raw["method"] = {"name": "hcd", "num_sub_logit": 3}
    with pytest.raises(BadInput, match="did you mean 'method.num_sub_logits'"):
        validate_raw(raw)


# ----------------------------------------------------------------------------- orthogonality loss


def hand_tensor():
    # sample 0, label 0: masked rows (0,3,4), (0,4,3), (0,4,-3): cosines 0.96, 0, 0.28
    # sample 1, label 2: masked rows (3,4,0), (3,4,0), (-4,3,0): cosines 1, 0, 0
    f = torch.tensor([[[1., 3, 4], [-2, 4, 3], [7, 4, -3]],
                      [[3., 4, 9], [3, 4, -1], [-4, 3, 0]]])
    return f, torch.tensor([0, 2])


def test_ol_hand_computed():
    f, y = hand_tensor()
    # theta 0.5: only (0.96 - 0.5)^2 = 0.2116 in sample 0 and (1 - 0.5)^2 = 0.25 in sample 1, each twice (j,k / k,j),
    # over B * n * (n - 1) = 2 * 3 * 2 = 12 ordered pairs
    expected = 2 * (0.2116 + 0.25) / 12
    assert orthogonality_loss(f, y, 0.5).item() == pytest.approx(expected, abs=1e-6)
    # theta 0, sample 0 alone: 2 * (0.96^2 + 0^2 + 0.28^2) / 6 = 2 * 1.0 / 6
    assert orthogonality_loss(f[:1], y[:1], 0.0).item() == pytest.approx(1 / 3, abs=1e-6)
    # without the mask, sample 1 has cosines 16/sqrt(106 * 26) = 0.3048, 0, 0: all under 0.5
    assert orthogonality_loss(f[1:], y[1:], 0.5, "none").item() == pytest.approx(0.0, abs=1e-7)
    assert orthogonality_loss(f[1:], y[1:], 0.5, "zero").item() == pytest.approx(0.5 / 6, abs=1e-6)


def test_ol_zero_for_mutually_orthogonal_masked_sub_logits():
    g = torch.Generator().manual_seed(0)
    b, n, c = 5, 4, 12
    y = torch.randint(0, c, (b,), generator=g)
    f = torch.zeros(b, n, c)
    for i in range(b):  # n orthogonal directions in the non-target coordinates, random scales
        others = [k for k in range(c) if k != y[i]]
        q, _ = torch.linalg.qr(torch.randn(c - 1, n, generator=g))
        f[i][:, others] = q.T * torch.rand(n, 1, generator=g).add(0.5) * 7
        f[i][:, y[i]] = torch.randn(n, generator=g) * 50  # large and shared: masked away
    assert orthogonality_loss(f, y, 0.0).item() < 1e-10
    assert orthogonality_loss(f, y, 0.5).item() == 0.0
    assert orthogonality_loss(f, y, 0.0, "none").item() > 0.01  # the target entry alone makes them similar


def test_ol_ignores_ground_truth_entry():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(6, 4, 9, generator=g)
    y = torch.randint(0, 9, (6,), generator=g)
    f2 = f.clone()
    f2[torch.arange(6), :, y] = torch.randn(6, 4, generator=g) * 100
    assert torch.equal(orthogonality_loss(f, y, 0.0), orthogonality_loss(f2, y, 0.0))
    assert not torch.allclose(orthogonality_loss(f, y, 0.0, "none"), orthogonality_loss(f2, y, 0.0, "none"))
    f.requires_grad_(True)
    orthogonality_loss(f, y, 0.0).backward()
    assert f.grad[torch.arange(6), :, y].abs().max().item() == 0.0
    assert f.grad.abs().sum().item() > 0


def test_ol_leading_stage_axis_and_single_sub_logit():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(3, 4, 5, 7, generator=g)  # [S, B, n, C]
    y = torch.randint(0, 7, (4,), generator=g)
    per_stage = orthogonality_loss(f, y, 0.2)
    assert per_stage.shape == (3,)
    for s in range(3):
        assert per_stage[s].item() == pytest.approx(orthogonality_loss(f[s], y, 0.2).item(), rel=1e-6)
    assert torch.equal(orthogonality_loss(f[:, :, :1], y, 0.2), torch.zeros(3))  # n = 1: no pair


# ----------------------------------------------------------------------------- shapes and parameter counts


@pytest.fixture(scope="module")
def vit_s_and_r18():
    """ViT-S/16 (random init, no download) probed at 224, ResNet18 probed at 32 and at 224."""
    torch.manual_seed(0)
    t = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=100)
    s = timm.create_model("resnet18", pretrained=False, num_classes=100)
    return t, s, probe(t, 224), {32: probe(s, 32), 224: probe(s, 224)}


@pytest.mark.parametrize("size", [32, 224])
def test_vit_s_to_resnet18_modules(vit_s_and_r18, size):
    t, s, t_shapes, s_shapes = vit_s_and_r18
    ss = s_shapes[size]
    g = size // 32  # ResNet18 stage maps: 8, 4, 2, 1 at 32 px; 56, 28, 14, 7 at 224 px
    assert ss.stage_shapes == [(64, 8 * g, 8 * g), (128, 4 * g, 4 * g), (256, 2 * g, 2 * g), (512, g, g)]
    assert (t_shapes.dim, ss.dim) == (384, 512)
    pair = PairInfo(100, ss, t_shapes, label_smoothing=0.1)
    m = build_method("hcd", s, t, HCDConfig(), pair)
    d, dt, n, c = 512, 384, 4, 100
    widths = [64, 128, 256, 512]
    for i, w in enumerate(widths, start=1):
        assert count_params(m.projectors[f"stage{i}"]) == cnn_projector_params(w, i, d)
        assert count_params(m.cfms[f"stage{i}"]) == cfm_params(d, dt, dt, n, c)
    total = sum(cnn_projector_params(w, i, d) for i, w in enumerate(widths, 1)) + 4 * cfm_params(d, dt, dt, n, c)
    assert sum(count_params(v) for v in m.training_modules().values()) == total
    assert set(m.training_modules()) == {"projectors", "cfms"}
    # the teacher is held outside the module tree: no teacher parameter is counted or saved
    assert count_params(m) == count_params(s) + total
    assert not any(k.startswith("teacher") for k in m.state_dict())
    # shapes through every stage, including the 1x1 stage-4 map at 32 px (eval: a probe, no training step)
    m.eval()
    with torch.no_grad():
        for i, (w, h, _) in enumerate(ss.stage_shapes, start=1):
            hs = m.projectors[f"stage{i}"](torch.randn(2, w, h, h))
            assert hs.shape == (2, d)
            assert m.cfms[f"stage{i}"](hs, torch.randn(2, dt)).shape == (2, n, c)


def test_resnet18_32px_paper_cfm_variants(vit_s_and_r18):
    t, s, t_shapes, s_shapes = vit_s_and_r18
    pair = PairInfo(100, s_shapes[32], t_shapes)
    m0 = build_method("hcd", s, t, HCDConfig(cfm_hidden=0, num_sub_logits=2, stages=[3, 4]), pair)
    assert list(m0.projectors) == ["stage3", "stage4"]
    assert count_params(m0.cfms) == 2 * cfm_params(512, 384, 0, 2, 100)
    m1 = build_method("hcd", s, t, HCDConfig(cfm_hidden=64, stages=[1]), pair)
    assert count_params(m1.cfms) == cfm_params(512, 384, 64, 4, 100)


def test_cnn_teacher_to_vit_student_modules():
    torch.manual_seed(0)
    t = timm.create_model("resnet18", pretrained=False, num_classes=C10)
    s = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=C10, img_size=32, patch_size=4, depth=4)
    pair = PairInfo(C10, probe(s, 32), probe(t, 32), label_smoothing=0.1)
    assert pair.student.kind == "token" and pair.student.stage_shapes == [(192, 8, 8)] * 4
    m = build_method("hcd", s, t, HCDConfig(), pair)
    d, dt = 512, 512  # D = max(192, 512)
    for i in range(1, 5):
        assert count_params(m.projectors[f"stage{i}"]) == token_projector_params(192, 8, i, d)
        assert count_params(m.cfms[f"stage{i}"]) == cfm_params(d, dt, dt, 4, C10)
    x, y = batch(2)
    zs, losses = m(x, x, y)
    assert zs.shape == (2, C10)
    losses["loss_sdd"].backward()
    assert all(p.grad is not None for p in m.projectors.parameters())


# ----------------------------------------------------------------------------- losses


def reference_losses(m, xs, y, ls):
    """Loop-by-loop recomputation of methods.md's formulas from the method's own modules."""
    cfg = m.cfg
    with torch.no_grad():
        t_out = m.teacher(xs)
        t_pre = m.teacher.forward_head(m.teacher.forward_features(xs), pre_logits=True)
        idx = [m.pair.student.stage_indices[s - 1] for s in cfg.stages]
        info_idx = [i for i in idx if i != PRE_POOL]  # stage 4 of a CNN is its pre-pool map (ResNet: layer4)
        final, inter = m.student.forward_intermediates(xs, indices=info_idx, output_fmt="NCHW")
        feats = [final if i == PRE_POOL else inter[info_idx.index(i)] for i in idx]
        zs = m.student.forward_head(final)
        n, t = cfg.num_sub_logits, cfg.temperature
        ce, sdd, ol = [], [], []
        for s, feat in zip(cfg.stages, feats):
            z = m.cfms[f"stage{s}"](m.projectors[f"stage{s}"](feat), t_pre)  # [B, n, C]
            ce_j, sdd_j = 0.0, 0.0
            for j in range(n):
                f = cfg.fuse_student_weight * z[:, j] + cfg.fuse_teacher_weight * t_out
                ce_j += F.cross_entropy(f, y, label_smoothing=ls) / n
                sdd_j += t * t * kl_div(f, zs, t) / n
            fused = cfg.fuse_student_weight * z + cfg.fuse_teacher_weight * t_out[:, None]
            pairs = []
            for b in range(len(y)):
                rows = fused[b].clone()
                rows[:, y[b]] = 0
                rows = rows / rows.norm(dim=1, keepdim=True)
                for j in range(n):
                    for k in range(n):
                        if j != k:
                            pairs.append(max(0.0, (rows[j] @ rows[k]).item() - cfg.ol_threshold) ** 2)
            ce.append(ce_j), sdd.append(sdd_j), ol.append(sum(pairs) / len(pairs))
        red = sum if cfg.stage_reduce == "sum" else (lambda v: sum(v) / len(v))
        return zs, {
            "loss_ce": F.cross_entropy(zs, y, label_smoothing=ls) + red(ce),
            "loss_kd": cfg.w_kd * t * t * kl_div(t_out, zs, t),
            "loss_sdd": cfg.w_sdd * red(sdd),
            "loss_ol": cfg.w_ol * red(ol),
        }


@pytest.mark.parametrize("cfg", [
    {},
    {"num_sub_logits": 3, "stages": [2, 4], "temperature": 2.0, "stage_reduce": "mean", "w_kd": 0.5,
     "w_sdd": 3.0, "w_ol": 2.0, "ol_threshold": 0.1, "fuse_student_weight": 0.5, "fuse_teacher_weight": 2.0},
])
def test_losses_match_loop_reference(small_vit_teacher, cfg):
    t, t_shapes = small_vit_teacher
    m = make_r18_method(t, t_shapes, ls=0.1, **cfg).eval()  # eval: BN uses running stats in both computations
    x, y = batch(4)
    with torch.no_grad():
        zs, losses = m(x, x, y)
    zs_ref, ref = reference_losses(m, x, y, 0.1)
    assert torch.allclose(zs, zs_ref, atol=1e-5)
    assert set(losses) == {"loss_ce", "loss_kd", "loss_sdd", "loss_ol"}
    for k, v in ref.items():
        assert losses[k].item() == pytest.approx(float(v), rel=1e-4, abs=1e-6), k
    assert losses["loss_ol"].item() > 0  # fused sub-logits share zt: they start out similar


def test_switches_drop_their_loss_keys(small_vit_teacher):
    t, t_shapes = small_vit_teacher
    x, y = batch(2)
    for cfg, keys in [({"use_ol": False}, {"loss_ce", "loss_kd", "loss_sdd"}),
                      ({"use_sdd": False}, {"loss_ce", "loss_kd", "loss_ol"}),
                      ({"use_sdd": False, "use_ol": False}, {"loss_ce", "loss_kd"})]:
        m = make_r18_method(t, t_shapes, **cfg).eval()
        with torch.no_grad():
            _, losses = m(x, x, y)
        assert set(losses) == keys, cfg


def test_soft_one_hot_labels_equal_hard_labels(small_vit_teacher):
    t, t_shapes = small_vit_teacher
    m = make_r18_method(t, t_shapes).eval()
    x, y = batch(3)
    with torch.no_grad():
        _, hard = m(x, x, y)
        _, soft = m(x, x, F.one_hot(y, C10).float())
    for k in hard:
        assert soft[k].item() == pytest.approx(hard[k].item(), rel=1e-5), k


# ----------------------------------------------------------------------------- gradients


def test_gradients_reach_student_projectors_cfms_not_teacher(small_vit_teacher):
    t, t_shapes = small_vit_teacher
    t_before = {k: v.clone() for k, v in t.state_dict().items()}
    m = make_r18_method(t, t_shapes).train()
    assert m.pair.student.stage_shapes[3] == (512, 1, 1)  # ResNet18 at 32 px: 1x1 stage-4 map
    assert not t.training
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = batch(4)
    _, losses = m(x, x, y)
    sum(losses.values()).backward()
    for name, group in [("student", m.student), ("projectors", m.projectors), ("cfms", m.cfms)]:
        for pn, p in group.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pn}"
        assert sum(p.grad.abs().sum().item() for p in group.parameters()) > 0, name
    assert all(p.grad is None for p in t.parameters())
    assert not any(p.requires_grad for p in t.parameters())
    opt.step()
    m.train()
    assert not t.training  # train() on the method never flips the teacher
    for k, v in t.state_dict().items():
        assert torch.equal(v, t_before[k]), k
    # each stage's CFM is trained by the OL alone as well
    m.zero_grad()
    _, losses = m(x, x, y)
    losses["loss_ol"].backward()
    assert all(m.cfms[f"stage{i}"].mlp[0].weight.grad.abs().sum() > 0 for i in range(1, 5))


@pytest.mark.parametrize("detach", [False, True])
def test_detach_targets_controls_sdd_gradient_into_cfm(small_vit_teacher, detach):
    t, t_shapes = small_vit_teacher
    m = make_r18_method(t, t_shapes, detach_targets=detach).train()
    x, y = batch(4)
    _, losses = m(x, x, y)
    cfm = list(m.cfms.parameters())
    g_cfm = torch.autograd.grad(losses["loss_sdd"], cfm, retain_graph=True, allow_unused=True)
    mass = sum(0.0 if g is None else g.abs().sum().item() for g in g_cfm)
    if detach:
        assert mass == 0.0
    else:
        assert mass > 0.0
    # either way the SDD term trains the student through its logits
    g_fc = torch.autograd.grad(losses["loss_sdd"], m.student.fc.weight)[0]
    assert g_fc.abs().sum().item() > 0


def test_student_state_dict_is_bare_timm(small_vit_teacher):
    t, t_shapes = small_vit_teacher
    m = make_r18_method(t, t_shapes)
    fresh = timm.create_model("resnet18", pretrained=False, num_classes=C10)
    fresh.load_state_dict(m.student.state_dict(), strict=True)
    assert {k.split(".")[0] for k in m.state_dict()} == {"student", "projectors", "cfms"}


# ----------------------------------------------------------------------------- pair checks


def test_check_pair_rejects_unservable_pairs(small_vit_teacher):
    t, t_shapes = small_vit_teacher
    s = timm.create_model("resnet18", pretrained=False, num_classes=C10)
    s_shapes = probe(s, 32)
    with pytest.raises(BadInput, match="needs a teacher"):
        HCD.check_pair(PairInfo(C10, s_shapes, None))
    other = probe(timm.create_model("test_resnet", pretrained=False, num_classes=7), 32)
    with pytest.raises(BadInput, match="7 classes"):
        HCD.check_pair(PairInfo(C10, s_shapes, other))
    flat = type(s_shapes)(**{**s_shapes.__dict__, "stage_shapes": s_shapes.stage_shapes[:2]})
    with pytest.raises(BadInput, match="four student stage maps"):
        HCD.check_pair(PairInfo(C10, flat, t_shapes))


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name, teacher, student", [
    ("vit_to_r18", "vit_small_patch16_224", "resnet18"),
    ("swin_to_r18", "swin_tiny_patch4_window7_224", "resnet18"),
    ("vit_to_mbv2", "vit_small_patch16_224", "mobilenetv2_100"),
])
def test_hcd_recipes_hold_the_paper_protocol(name, teacher, student):
    from distillctl.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert (r.teacher.model, r.student.model, r.method.name) == (teacher, student, "hcd")
    assert r.method.params() == HCDConfig().model_dump(mode="json")
    assert (r.data.dataset, r.data.image_size, r.data.batch_size) == ("cifar100", 224, 128)
    tr = r.train
    assert (tr.optimizer, tr.nesterov, tr.momentum, tr.lr, tr.warmup_epochs) == ("sgd", True, 0.9, 0.05, 3)
    assert (tr.schedule, tr.min_lr, tr.weight_decay, tr.epochs, tr.label_smoothing) == ("cosine", 1e-3, 2e-3, 300, 0.1)
    assert r.data.augment.hflip and r.data.augment.random_resized_crop
    assert r.export.formats == ["safetensors", "onnx", "trt"]
    assert r.student.mean is None and not r.student.pretrained  # ImageNet stats, trained from scratch
    assert r.teacher.weights and r.teacher.weights.endswith(".safetensors")


def test_teacher_finetune_recipe():
    from distillctl.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "vit_s_teacher_cifar100.yaml")
    assert r.student.model == "vit_small_patch16_224" and r.method.name == "ce" and r.teacher is None
    assert r.data.dataset == "cifar100" and r.data.image_size == 224
    assert r.train.optimizer == "adamw" and r.train.label_smoothing == 0.1
    assert math.isclose(r.train.lr, 1e-4)
