"""CIFAR (python pickle batches, read with a restricted unpickler) and ImageFolder trees from local paths."""
import pickle

import numpy as np
import pytest
import torch

from distillctl.data import build_data
from distillctl.errors import BadInput
from distillctl.recipe import DataConfig


def _write_cifar10(root, n_train=50, n_test=20):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        d = {"data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n_train))}
        d["labels"] = [int(v) for v in d["labels"]]
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(d))
    t = {"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n_test)]}
    (base / "test_batch").write_bytes(pickle.dumps(t))
    return t


def test_cifar10_local_root(tmp_path):
    test = _write_cifar10(tmp_path)
    d = build_data(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=32, val_batch_size=8),
                   seed=0, device=torch.device("cpu"))
    assert d.num_classes == 10 and d.train_size == 250 and d.val_size == 20
    x, y = next(iter(d.val))
    # CHW layout preserved: pixel (c=1, h=0, w=2) of the first test image
    assert x[0, 1, 0, 2].item() == pytest.approx(test["data"][0][1024 + 2] / 255.0)
    assert y.tolist() == test["labels"][:8]


def test_cifar_missing_root_is_bad_input(tmp_path):
    with pytest.raises(BadInput) as e:
        build_data(DataConfig(dataset="cifar100", root=str(tmp_path)), seed=0, device=torch.device("cpu"))
    assert "download" in e.value.message


def test_cifar_pickle_with_code_is_refused(tmp_path):
    _write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(BadInput) as e:
        build_data(DataConfig(dataset="cifar10", root=str(tmp_path)), seed=0, device=torch.device("cpu"))
    assert "refusing" in e.value.message


def test_imagefolder_tree(tmp_path):
    from PIL import Image

    for split, n in (("train", 6), ("val", 2)):
        for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            folder = tmp_path / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 30), color).save(folder / f"{i}.png")
    d = build_data(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, batch_size=4,
                              val_batch_size=4, num_workers=0), seed=0, device=torch.device("cpu"))
    assert d.num_classes == 2 and d.train_size == 12 and d.val_size == 4
    x, y = next(iter(d.val))
    assert x.shape == (4, 3, 16, 16)
    red = x[y == 0]
    assert torch.allclose(red[:, 0], torch.ones_like(red[:, 0])) and red[:, 2].max() == 0
    d.train.set_epoch(0)
    assert len(list(d.train)) == 3


def test_imagefolder_needs_splits(tmp_path):
    with pytest.raises(BadInput):
        build_data(DataConfig(dataset="imagefolder", root=str(tmp_path)), seed=0, device=torch.device("cpu"))
