import torch

from distillctl.data import augment_batch, build_data
from distillctl.recipe import AugmentConfig, DataConfig


def test_digits_embedded_split_is_fixed():
    a = build_data(DataConfig(dataset="digits", image_size=16), seed=0, device=torch.device("cpu"))
    b = build_data(DataConfig(dataset="digits", image_size=16), seed=5, device=torch.device("cpu"))
    assert a.train_size + a.val_size == 1797 and a.num_classes == 10
    assert a.val_size == 359  # 20% of each class, rounded per class
    assert torch.equal(a.val.labels, b.val.labels)  # split independent of the recipe seed
    x, y = next(iter(a.val))
    assert x.shape == (256, 3, 16, 16) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9


def test_low_data_subset_per_class():
    d = build_data(DataConfig(dataset="digits", image_size=8, train_per_class=10), seed=0, device=torch.device("cpu"))
    counts = torch.bincount(d.train.labels, minlength=10)
    assert counts.tolist() == [10] * 10


def test_epoch_order_deterministic_and_resumable():
    cfg = DataConfig(dataset="synthetic", image_size=8, synthetic_size=100, batch_size=16)
    d = build_data(cfg, seed=3, device=torch.device("cpu"))
    d.train.set_epoch(2)
    full = [y for _, y in d.train]
    d.train.set_epoch(2, start_step=3)
    tail = [y for _, y in d.train]
    assert len(full) == len(d.train) == 5
    assert all(torch.equal(u, v) for u, v in zip(full[3:], tail))
    d.train.set_epoch(1)
    assert not torch.equal(next(iter(d.train))[1], full[0])


def test_ddp_ranks_take_disjoint_shards():
    cfg = DataConfig(dataset="synthetic", image_size=8, synthetic_size=64, batch_size=8, val_fraction=0.25)
    ids = []
    for rank in range(2):
        d = build_data(cfg, seed=0, device=torch.device("cpu"), rank=rank, world_size=2)
        d.train.set_epoch(0)
        ids.append(set(d.train._indices().tolist()))
    assert ids[0].isdisjoint(ids[1]) and len(ids[0]) == len(ids[1]) == d.train_size // 2


def test_augment_pad_crop_is_an_exact_shift_and_flip_mirrors():
    x = torch.rand(64, 3, 8, 8)
    out = augment_batch(x, AugmentConfig(), 8, None)
    assert torch.allclose(out, x, atol=1e-6)  # identity when nothing is enabled
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, AugmentConfig(random_crop_padding=2), 8, g)
    for i in range(64):  # every sample is x shifted by whole pixels with zeros coming in
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.zeros_like(x[i])
                ys, xs = slice(max(0, -dy), 8 - max(0, dy)), slice(max(0, -dx), 8 - max(0, dx))
                yd, xd = slice(max(0, dy), 8 - max(0, -dy)), slice(max(0, dx), 8 - max(0, -dx))
                ref[:, ys, xs] = x[i][:, yd, xd]
                found |= torch.allclose(out[i], ref, atol=1e-5)
        assert found
    flipped = augment_batch(x, AugmentConfig(hflip=True), 8, torch.Generator().manual_seed(1))
    n_flip = sum(torch.allclose(flipped[i], x[i].flip(-1), atol=1e-5) for i in range(64))
    n_same = sum(torch.allclose(flipped[i], x[i], atol=1e-5) for i in range(64))
    assert n_flip + n_same == 64 and 16 < n_flip < 48


def test_digits_read_from_the_shipped_file_equal_sklearns_loader():
    """The digits come from scikit-learn's data file without importing scikit-learn (1.5-3 s of the
    quickstart); the arrays are exactly what ``load_digits`` returns."""
    import numpy as np
    from sklearn.datasets import load_digits

    from distillctl.data import digits_arrays

    images, target = digits_arrays()
    ref = load_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, ref.images)
    assert np.array_equal(target, ref.target) and sorted(set(target.tolist())) == list(range(10))
