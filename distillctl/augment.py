"""Augmentation: timm's per-image pipeline for ImageFolder, Mixup/CutMix on the training device.

Two places, because the data lives in two places:

- ImageFolder images are decoded by DataLoader workers, so the per-image ops run there through
  timm's ``create_transform`` (random-resized crop, RandAugment / AutoAugment / AugMix or
  torchvision's TrivialAugmentWide, colour jitter, random erasing). The result stays an uint8
  image ``[3, S, S]``: loaders hand out [0, 1] batches and each model normalises with its own
  mean/std (``distillctl.models.InputView``), so timm's normalisation is left out. Random
  erasing is defined on normalised images (it fills with 0, or N(0, 1) noise, i.e. the dataset
  mean colour or noise around it), so it runs in that space and the image is mapped back to
  [0, 1] (clamped) afterwards.
- Mixup / CutMix act on whole batches, for every dataset, on the device the batch is on
  (``mix_batch``). Their random numbers come from a CPU ``torch.Generator`` (a few scalars per
  batch, so no device sync), whose state goes into the checkpoint for an exact resume.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F

from .compat import import_timm
from .errors import BadInput
from .recipe import AugmentConfig, DataConfig

TRIVIAL = "trivialaugment"
EVAL_CROP_PCT = 0.875  # resize to S / 0.875, then centre-crop S (timm's default evaluation)
EVAL_INTERPOLATION = "bilinear"
# ImageNet statistics: the fill colour of geometric ops and the space random erasing works in.
FILL_MEAN = (0.485, 0.456, 0.406)
FILL_STD = (0.229, 0.224, 0.225)
PER_IMAGE_KEYS = ("auto_augment", "color_jitter", "re_prob")
# timm skips RandAugment sections it does not understand; a typo should not pass silently
_RAND_SECTION = re.compile(r"^((mstd|mmax|inc|m|n|p)\d+(\.\d+)?|t\w+)$")


# ----------------------------------------------------------------------------- ImageFolder


def _policy_hparams(image_size: int) -> dict:
    # what create_transform passes to timm's policies: translate up to 45% of the side, mean fill
    return {"translate_const": int(image_size * 0.45), "img_mean": tuple(round(255 * m) for m in FILL_MEAN)}


def check_auto_augment(policy: str) -> None:
    """Build ``policy`` once with timm; raise ValueError naming the accepted forms when it does not parse."""
    if policy == TRIVIAL:
        return
    import_timm()
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    build = (rand_augment_transform if policy.startswith("rand") else
             augment_and_mix_transform if policy.startswith("augmix") else auto_augment_transform)
    bad = [part for part in policy.split("-")[1:] if policy.startswith("rand") and not _RAND_SECTION.match(part)]
    try:
        if bad:
            raise ValueError(f"unknown RandAugment section(s) {bad}; sections are m<int>, n<int>, p<float>, "
                             "mstd<float>, mmax<int>, inc<0|1>, t<name>")
        build(policy, _policy_hparams(224))
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as err:
        detail = f" ({err})" if str(err) else ""
        raise ValueError(f"auto_augment {policy!r} is not a timm policy{detail}; expected for example "
                         f"rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0, 3a, or {TRIVIAL}") from None


class UnitErasing:
    """timm's RandomErasing on an uint8 image ``[3, H, W]``, applied in ImageNet-normalised space.

    timm erases normalised tensors: ``const`` writes 0 (the mean colour), ``rand``/``pixel`` write
    N(0, 1) values (noise around the mean). Done on [0, 1] pixels directly, ``const`` would paint
    black boxes and the noise would leave the valid range, so the image is normalised, erased,
    mapped back and clamped to [0, 1]. Pixels outside the boxes come back unchanged.
    """

    def __init__(self, prob: float, mode: str, count: int):
        import_timm()
        from timm.data.random_erasing import RandomErasing

        self.erase = RandomErasing(prob, mode=mode, max_count=count, device="cpu")
        self.mean = torch.tensor(FILL_MEAN).view(3, 1, 1)
        self.std = torch.tensor(FILL_STD).view(3, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        z = (img.float().div(255.0) - self.mean) / self.std
        z = self.erase(z)
        return (z * self.std + self.mean).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)

    def __repr__(self) -> str:
        return f"UnitErasing({self.erase!r})"


def folder_transform(image_size: int, train: bool, cfg: AugmentConfig):
    """PIL image -> uint8 ``[3, S, S]`` for ImageFolder, built by timm's ``create_transform``.

    Train: random-resized crop (``rrc_scale``), then ``auto_augment`` or colour jitter, then
    random erasing. Horizontal flips are left to the loader (on the device, seeded and resumable).
    Eval: resize the short side to ``floor(S / 0.875)``, centre-crop S (``eval_preprocess``).
    """
    import_timm()
    from timm.data import create_transform
    from torchvision import transforms

    if not train:
        return create_transform(image_size, is_training=False, interpolation=EVAL_INTERPOLATION,
                                crop_pct=EVAL_CROP_PCT, crop_mode="center", normalize=False)
    policy = cfg.auto_augment
    if policy is not None:
        check_auto_augment(policy)
    primary, secondary, _ = create_transform(
        image_size, is_training=True, scale=tuple(cfg.rrc_scale), hflip=0.0, color_jitter=cfg.color_jitter,
        auto_augment=None if policy == TRIVIAL else policy, interpolation="bilinear",
        mean=FILL_MEAN, std=FILL_STD, re_prob=0.0, separate=True)
    ops = list(primary.transforms)
    if policy == TRIVIAL:
        fill = [round(255 * m) for m in FILL_MEAN]
        ops.append(transforms.TrivialAugmentWide(interpolation=transforms.InterpolationMode.BILINEAR, fill=fill))
    ops += list(secondary.transforms)
    ops.append(transforms.PILToTensor())  # uint8 [3, S, S]: small to ship from the workers
    if cfg.re_prob > 0:
        ops.append(UnitErasing(cfg.re_prob, cfg.re_mode, cfg.re_count))
    return transforms.Compose(ops)


def eval_preprocess(image_size: int) -> dict:
    """The evaluation preprocessing as timm ``pretrained_cfg`` keys (for the exported config.json).

    ``timm.data.resolve_data_config(pretrained_cfg=...)`` + ``create_transform`` rebuild exactly the
    validation transform from it (mean/std are the model's own and are added by the caller).
    """
    return {"input_size": [3, image_size, image_size], "interpolation": EVAL_INTERPOLATION,
            "crop_pct": EVAL_CROP_PCT, "crop_mode": "center"}


def check_dataset(cfg: DataConfig) -> None:
    """Per-image ops exist only where images are decoded one by one (ImageFolder); say so elsewhere."""
    if cfg.dataset == "imagefolder":
        return
    aug = cfg.augment
    used = [k for k in PER_IMAGE_KEYS if getattr(aug, k) not in (None, 0, 0.0)]
    if used:
        keys = ", ".join(f"data.augment.{k}" for k in used)
        raise BadInput(f"{keys} apply to ImageFolder data only (timm's per-image pipeline runs in the loader "
                       f"workers), but data.dataset is {cfg.dataset}, whose images stay on the device as one "
                       "tensor. Remove them, or use mixup_alpha / cutmix_alpha, which run on the device for "
                       "every dataset")


# ----------------------------------------------------------------------------- Mixup / CutMix


def mix_generator(seed: int, rank: int = 0) -> torch.Generator:
    """The CPU generator ``mix_batch`` draws from; checkpoint ``gen.get_state()``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 4243 + rank)


def soft_targets(y: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Labels ``[B]`` -> one-hot float32 ``[B, C]``, optionally label-smoothed (off = s/C, on = 1 - s + s/C)."""
    t = F.one_hot(y, num_classes).float()
    return t * (1.0 - smoothing) + smoothing / num_classes if smoothing else t


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: AugmentConfig, gen: torch.Generator,
              smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix of ``x [B, 3, H, W]`` with its reversed batch; returns ``(x_mixed, y_soft [B, C])``.

    As timm's ``Mixup``: the partner of sample i is sample B-1-i; ``lam ~ Beta(alpha, alpha)``;
    with probability ``mixup_prob`` a batch (``batch``), pair or sample (``elem``) is mixed, with
    CutMix instead of Mixup with probability ``mixup_switch_prob`` when both alphas are > 0.
    CutMix pastes the partner's box (side ``sqrt(1 - lam)``, clipped at the border) and ``lam``
    becomes the kept area fraction. Targets: ``lam * onehot(y) + (1 - lam) * onehot(y_partner)``,
    smoothed as timm does when ``smoothing`` > 0. Smoothing is affine, so
    ``F.cross_entropy(z, mix(..., smoothing=0), label_smoothing=s)`` equals timm's smoothed
    targets: pass ``smoothing=0`` where the loss already smooths. ``gen`` is a CPU generator; the
    same state gives the same result on any device.
    """
    b, _, h, w = x.shape
    if not cfg.mixing:
        return x, soft_targets(y, num_classes, smoothing)
    n = 1 if cfg.mixup_mode == "batch" else (b + 1) // 2 if cfg.mixup_mode == "pair" else b

    def rand():
        return torch.rand(n, generator=gen)

    # fixed number of draws per call, whatever is decided, so the stream does not depend on the outcome
    apply, switch, cy, cx = rand() < cfg.mixup_prob, rand(), rand(), rand()
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        cut = switch < cfg.mixup_switch_prob
    else:
        cut = torch.full((n,), cfg.cutmix_alpha > 0)
    alpha = torch.where(cut, torch.tensor(cfg.cutmix_alpha), torch.tensor(cfg.mixup_alpha)).clamp_min(1e-6)
    g1, g2 = torch._standard_gamma(alpha, generator=gen), torch._standard_gamma(alpha, generator=gen)
    lam = torch.where(apply, g1 / (g1 + g2).clamp_min(1e-12), torch.ones(n))

    # CutMix box from lam (timm's rand_bbox): centre uniform in the image, half-sides clipped at the border
    ratio = torch.sqrt(1.0 - lam)
    half_h, half_w = (h * ratio).long() // 2, (w * ratio).long() // 2
    cy, cx = (cy * h).long(), (cx * w).long()
    y0, y1 = (cy - half_h).clamp(0, h), (cy + half_h).clamp(0, h)
    x0, x1 = (cx - half_w).clamp(0, w), (cx + half_w).clamp(0, w)
    cut = cut & apply
    lam = torch.where(cut, 1.0 - ((y1 - y0) * (x1 - x0)).float() / (h * w), lam)
    if not bool((lam < 1).any()):  # nothing mixed: host-side check, no device sync
        return x, soft_targets(y, num_classes, smoothing)

    dev = x.device
    if cfg.mixup_mode == "batch":  # one ratio (and box) for the batch: cheapest ops, host-side scalars
        lam_b = lam.expand(b).to(dev)
        if bool(cut[0]):
            r0, r1, c0, c1 = int(y0[0]), int(y1[0]), int(x0[0]), int(x1[0])
            out = x.clone()
            out[:, :, r0:r1, c0:c1] = x[:, :, r0:r1, c0:c1].flip(0)
        else:
            out = x.flip(0).lerp_(x, float(lam[0]))  # lam x + (1 - lam) partner
    else:
        idx = torch.arange(b)
        src = torch.minimum(idx, b - 1 - idx) if cfg.mixup_mode == "pair" else idx
        lam_b, cut_b = lam[src].to(dev), cut[src].to(dev)
        box = torch.stack([y0, y1, x0, x1])[:, src].to(dev)  # [4, B]
        partner = x.flip(0)
        keep = torch.where(cut_b, torch.ones_like(lam_b), lam_b).to(x.dtype).view(b, 1, 1, 1)
        out = torch.lerp(partner, x, keep)  # mixup: lam x + (1 - lam) partner; exactly x where keep = 1
        if bool(cut.any()):
            rows = torch.arange(h, device=dev).view(1, h, 1)
            cols = torch.arange(w, device=dev).view(1, 1, w)
            inside = ((rows >= box[0].view(b, 1, 1)) & (rows < box[1].view(b, 1, 1))
                      & (cols >= box[2].view(b, 1, 1)) & (cols < box[3].view(b, 1, 1)) & cut_b.view(b, 1, 1))
            out = torch.where(inside.unsqueeze(1), partner, out)
    lam_t = lam_b.view(b, 1)
    targets = soft_targets(y, num_classes)
    y_soft = lam_t * targets + (1.0 - lam_t) * targets.flip(0)
    if smoothing:
        y_soft = y_soft * (1.0 - smoothing) + smoothing / num_classes
    return out, y_soft


class BatchMixer:
    """``mix_batch`` with its generator: call on each training batch, checkpoint ``state()``."""

    def __init__(self, cfg: AugmentConfig, num_classes: int, *, seed: int, rank: int = 0, smoothing: float = 0.0):
        self.cfg, self.num_classes, self.smoothing = cfg, num_classes, smoothing
        self.gen = mix_generator(seed, rank)

    @property
    def active(self) -> bool:
        return self.cfg.mixing

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mix_batch(x, y, self.num_classes, self.cfg, self.gen, self.smoothing)

    def state(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state(self, state: Optional[dict]) -> None:
        if state and "gen" in state:
            self.gen.set_state(state["gen"])


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """``[B]`` labels from hard ``[B]`` or soft ``[B, C]`` targets (for accuracy on a mixed batch)."""
    return y.argmax(-1) if y.dim() > 1 else y

