"""Every method's composed loss against the authors' reference code (../shared/golden/losses.json).

Each case names the method, its recipe keys and the input tensors by role; the expected values
(every weighted term, their sum and the gradients of the sum) were computed with the reference
implementation named in the case, never with distillctl. Here each case is fed through the
method's OWN forward: the method is built on a tiny real pair, then the networks that produce
the case's tensors are replaced by stubs returning those tensors (the golden README's recipe),
so what is tested is how the method composes, weights and reduces its terms.

The file is read from the shared folder next to the repository (``X/main`` beside ``X/shared``)
when it exists, else from the byte-identical copy vendored in ``tests/data`` (a clean checkout).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from distillctl.compat import import_timm
from distillctl.methods import build_method, registry
from distillctl.methods.base import PairInfo
from distillctl.methods.tas import info_nce
from distillctl.models import Outputs, probe

timm = import_timm()

SHARED = Path(__file__).resolve().parents[2] / "shared" / "golden" / "losses.json"
VENDORED = Path(__file__).resolve().parent / "data" / "golden_losses.json"


def golden_path() -> Path:
    """The shared golden file when present (the source of truth), else the vendored copy."""
    return SHARED if SHARED.is_file() else VENDORED


GOLDEN = json.loads(golden_path().read_text())
CASES = GOLDEN["cases"]
TOL = GOLDEN["tolerance"]
SIZE = 32


def assert_close(actual: torch.Tensor, expected, what: str) -> None:
    """The golden rule, elementwise: |actual - expected| <= 1e-5 * max(1, |expected|)."""
    exp = torch.tensor(expected, dtype=torch.float64)
    act = actual.detach().double().reshape(exp.shape)
    bound = TOL["abs"] * torch.clamp(exp.abs(), min=1.0)
    err = (act - exp).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (f"{what}: |actual - expected| up to {err.max().item():.3g} "
                                        f"(at flat index {worst}: {act.flatten()[worst].item():.8g} vs "
                                        f"{exp.flatten()[worst].item():.8g})")


class Fixed(nn.Module):
    """A stub network: ignores its inputs and returns a fixed tensor (part of the autograd graph)."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, *args, **kwargs):
        return self.out


def tensor(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def leaf(v) -> torch.Tensor:
    return tensor(v).requires_grad_(True)


def build(case: dict, name: str | None = None, config: dict | None = None):
    """The case's method (or ``name``) with its config (or ``config``) on a tiny real pair of its class count."""
    name = name or case["method"]
    num_classes = case["shapes"]["student_logits"][1]
    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=num_classes)
    cls = registry.get(name)
    teacher = timm.create_model("test_vit", num_classes=num_classes, img_size=SIZE) if cls.needs_teacher else None
    pair = PairInfo(num_classes, probe(student, SIZE), probe(teacher, SIZE) if teacher is not None else None,
                    label_smoothing=case["label_smoothing"])
    if config is None:
        config = case["config"] if name == case["method"] else {}
    return build_method(name, student, teacher, cls.Config(**config), pair)


def stub_networks(method, case: dict) -> dict[str, torch.Tensor]:
    """Replace every producer of a case tensor by a stub; returns the leaves gradients are taken for."""
    inp = case["inputs"]
    leaves = {"student_logits": leaf(inp["student_logits"])}
    zs = leaves["student_logits"]
    batch = zs.shape[0]
    n_stages = len(getattr(method.cfg, "stages", []))
    # stage maps and teacher pre-logits are never used once their consumers are stubbed: any tensor will do
    feats = [torch.zeros(batch, 1, 1, 1) for _ in range(n_stages)]
    zt = tensor(inp["teacher_logits"])
    method.student = Fixed(zs)  # the methods that call the student directly (ce, kd, dkd, dist)
    method.student_forward = lambda xs, indices=None: Outputs(zs, torch.zeros(batch, 1), feats)
    method.teacher_forward = lambda xt, indices=None: Outputs(zt, torch.zeros(batch, 1), [])
    kind = case["method"]
    if kind == "ofa":
        leaves["branch_logits"] = leaf(inp["branch_logits"])
        method.branches = nn.ModuleList(Fixed(leaves["branch_logits"][i]) for i in range(n_stages))
    elif kind == "hcd":
        leaves["sub_logits"] = leaf(inp["sub_logits"])
        method.sub_logits = lambda feats, ht: leaves["sub_logits"]
    elif kind == "mldr":
        leaves["stage_logits"] = leaf(inp["stage_logits"])
        leaves["fused_logits"] = leaf(inp["fused_logits"])
        method.projectors = nn.ModuleList(Fixed(torch.zeros(batch, 1)) for _ in range(n_stages))
        method.stage_heads = nn.ModuleList(Fixed(leaves["stage_logits"][i]) for i in range(n_stages))
        method.msdf = Fixed(leaves["fused_logits"])
    return leaves


LOGIT_CASES = [c for c in CASES if c["method"] != "tas"]


def test_golden_file_source_and_vendored_copy():
    """Says which golden file is used; the vendored copy must stay byte-identical to the shared one."""
    used = golden_path()
    print(f"golden file used: {used}")
    assert VENDORED.is_file(), "tests/data/golden_losses.json is missing: copy ../shared/golden/losses.json there"
    if SHARED.is_file():
        assert used == SHARED
        digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
        assert digest(VENDORED) == digest(SHARED), ("tests/data/golden_losses.json differs from "
                                                    f"{SHARED}; copy the shared file over it")
    else:
        assert used == VENDORED
    assert len(CASES) == 27
    assert {c["method"] for c in CASES} == {"kd", "dkd", "dist", "ofa", "hcd", "mldr", "tas"}


@pytest.mark.parametrize("case", LOGIT_CASES, ids=[c["id"] for c in LOGIT_CASES])
def test_method_forward_matches_reference(case):
    method = build(case)
    method.train()
    method.progress = 1000.0  # DKD: past the warm-up (factor 1), as the golden cases assume
    leaves = stub_networks(method, case)
    batch = leaves["student_logits"].shape[0]
    y = torch.tensor(case["inputs"]["labels"], dtype=torch.int64)
    zs, losses = method(torch.zeros(batch, 3, SIZE, SIZE), torch.zeros(batch, 3, SIZE, SIZE), y)
    assert zs is leaves["student_logits"]
    expected = case["expected"]
    assert set(losses) == set(expected["terms"]), f"loss keys {sorted(losses)} vs {sorted(expected['terms'])}"
    for key, value in expected["terms"].items():
        assert_close(losses[key], value, key)
    total = sum(losses.values())
    assert_close(total, expected["total"], "total")
    total.backward()
    assert set(expected["grad"]) == set(leaves)
    for key, value in expected["grad"].items():
        assert_close(leaves[key].grad, value, f"d total / d {key}")


def run_case(case: dict, config: dict) -> dict[str, float]:
    """The method's loss terms on the case's inputs, built with ``config`` instead of the case's own."""
    method = build(case, config=config)
    method.progress = 1000.0
    leaves = stub_networks(method, case)
    batch = leaves["student_logits"].shape[0]
    y = torch.tensor(case["inputs"]["labels"], dtype=torch.int64)
    x = torch.zeros(batch, 3, SIZE, SIZE)
    with torch.no_grad():
        _, losses = method(x, x, y)
    return {k: float(v) for k, v in losses.items()}


# Every weight factor of a composed loss and the terms it multiplies (methods.md). Many golden cases use a
# weight of 1, where deleting that factor changes nothing; linearity in each weight pins it from the same
# reference values: term(s * w) = term(0) + s * (golden - term(0)), a zero weight removes a whole-term
# factor's term, and every other term is untouched.
WEIGHTS = {
    "kd": {"w_ce": ["loss_ce"], "w_kd": ["loss_kd"]},
    "dkd": {"w_ce": ["loss_ce"], "alpha": ["loss_tckd"], "beta": ["loss_nckd"]},
    "dist": {"w_ce": ["loss_ce"], "w_kd": ["loss_inter", "loss_intra"], "beta": ["loss_inter"],
             "gamma": ["loss_intra"]},
    "ofa": {"w_ce": ["loss_ce"], "w_kd": ["loss_kd"], "w_ofa": ["loss_ofa"]},
    "hcd": {"w_kd": ["loss_kd"], "w_sdd": ["loss_sdd"], "w_ol": ["loss_ol"]},
    "mldr": {"w_ce": ["loss_ce"], "w_logit": ["loss_dfra"], "w_stage": ["loss_stage"], "w_fused": ["loss_fused"],
             "w_class": ["loss_dfra", "loss_stage", "loss_fused"], "w_sample": ["loss_dfra", "loss_stage", "loss_fused"],
             "alpha": ["loss_dfra", "loss_stage", "loss_fused"]},
}
WHOLE_TERM = {"w_ce", "w_kd", "w_ofa", "w_sdd", "w_ol", "w_logit", "w_stage", "w_fused"}
WEIGHT_CASES = [(c, k) for m in WEIGHTS for c in [next(c for c in CASES if c["method"] == m)] for k in WEIGHTS[m]]


@pytest.mark.parametrize("case, key", WEIGHT_CASES, ids=[f"{c['id']}-{k}" for c, k in WEIGHT_CASES])
def test_each_weight_scales_its_terms(case, key):
    golden = case["expected"]["terms"]
    w = case["config"][key]
    at_zero = run_case(case, {**case["config"], key: 0.0})
    scaled = run_case(case, {**case["config"], key: 2.5 * w})
    for term, value in golden.items():
        if term not in WEIGHTS[case["method"]][key]:  # a weight never leaks into another term
            assert scaled[term] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, term)
            assert at_zero[term] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, term)
            continue
        if key in WHOLE_TERM:
            assert at_zero[term] == 0.0, (key, term)
        # the weight has an effect the size of its share of the reference value, and acts linearly
        assert abs(value - at_zero[term]) > 1e-4 * max(1.0, abs(value)), (key, term)
        assert scaled[term] == pytest.approx(at_zero[term] + 2.5 * (value - at_zero[term]), rel=1e-5, abs=1e-6), \
            (key, term)


TAS_CASES = [c for c in CASES if c["method"] == "tas"]


@pytest.mark.parametrize("case", TAS_CASES, ids=[c["id"] for c in TAS_CASES])
def test_tas_info_nce_matches_reference(case):
    inp = case["inputs"]
    a, b = leaf(inp["features_a"]), leaf(inp["features_b"])
    loss = info_nce(a, b, inp["temperature"])
    assert_close(loss, case["expected"]["terms"]["info_nce"], "info_nce")
    assert_close(loss, case["expected"]["total"], "total")
    loss.backward()
    assert_close(a.grad, case["expected"]["grad"]["features_a"], "d / d features_a")
    assert_close(b.grad, case["expected"]["grad"]["features_b"], "d / d features_b")


KD_CASES = [c for c in CASES if c["method"] == "kd"]


@pytest.mark.parametrize("case", KD_CASES, ids=[c["id"] for c in KD_CASES])
def test_ce_method_matches_reference_cross_entropy(case):
    """The ce baseline is the reference CE of the kd cases (their loss_ce divided by w_ce)."""
    method = build(case, "ce")
    leaves = stub_networks(method, case)
    y = torch.tensor(case["inputs"]["labels"], dtype=torch.int64)
    _, losses = method(torch.zeros(len(y), 3, SIZE, SIZE), None, y)
    assert set(losses) == {"loss_ce"}
    assert_close(losses["loss_ce"], case["expected"]["terms"]["loss_ce"] / case["config"]["w_ce"], "loss_ce")
    assert leaves["student_logits"].shape[0] == len(y)


def test_dkd_warmup_table():
    """The reference factor min(epoch / warmup, 1) with 1-based epochs, constant within an epoch.

    The trainer sets ``progress = epoch_index + step / steps`` (0-based epoch index); each row of
    the table is checked at the first, a middle and the last step of its epoch.
    """
    table = GOLDEN["dkd_warmup"]
    case = next(c for c in CASES if c["method"] == "dkd")
    method = build(case)
    assert method.cfg.warmup_epochs == table["warmup_epochs"]
    for row in table["table"]:
        for frac in (0.0, 0.5, 0.999):
            method.progress = row["epoch"] - 1 + frac
            assert method.warmup_factor() == pytest.approx(row["factor"], abs=1e-12), (row, frac)
    # the factor scales both distillation terms and leaves the CE alone
    y = torch.tensor(case["inputs"]["labels"], dtype=torch.int64)
    x = torch.zeros(len(y), 3, SIZE, SIZE)
    stub_networks(method, case)
    method.progress = 1.5  # epoch 2 of 20: factor 0.1
    _, warm = method(x, x, y)
    for key in ("loss_tckd", "loss_nckd"):
        assert_close(warm[key], 0.1 * case["expected"]["terms"][key], key)
    assert_close(warm["loss_ce"], case["expected"]["terms"]["loss_ce"], "loss_ce")
