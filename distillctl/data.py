"""Datasets and loaders.

Every loader yields ``(x, y)`` with ``x`` a float batch in [0, 1], ``[B, 3, S, S]`` at the
student's size ``S = data.image_size``, on the training device. Normalisation and the
teacher's own view (its size, its mean/std) are applied per model by
``distillctl.models.InputView``, so both networks see the same augmented crop.

Small in-memory sets (digits, CIFAR, synthetic) live as uint8 tensors on the training
device; crop / flip / resize happen there in batches (one ``grid_sample`` per batch), so
the data path never limits a GPU. ImageFolder trees go through a DataLoader with workers.
"""
from __future__ import annotations

import math
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .errors import BadInput
from .recipe import AugmentConfig, DataConfig

DIGITS_SPLIT_SEED = 0  # the held-out split is fixed, whatever the recipe's seed


@dataclass
class DataBundle:
    train: "BatchSource"
    val: "BatchSource"
    num_classes: int
    name: str
    train_size: int
    val_size: int
    class_names: Optional[list[str]] = None  # index -> name, travels with the exported student
    preprocess: Optional[dict] = None  # the evaluation preprocessing as timm pretrained_cfg keys


class BatchSource:
    """Common interface: ``set_epoch(e)``, iteration, ``len()`` in batches."""

    def set_epoch(self, epoch: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError


# ----------------------------------------------------------------------------- augmentation


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, out_size: int, gen: Optional[torch.Generator]) -> torch.Tensor:
    """Random (resized) crop + flip + resize for a float batch ``[B, 3, H, W]`` in one grid_sample.

    Each sample gets an affine map (scale, translation, horizontal sign) from output to input
    coordinates; zero padding outside the image, as torchvision's padded RandomCrop does.
    """
    b, _, h, w = x.shape
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=dev)

    sx = torch.ones(b, device=dev)
    sy = torch.ones(b, device=dev)
    tx = torch.zeros(b, device=dev)
    ty = torch.zeros(b, device=dev)
    if cfg.random_resized_crop:
        lo, hi = cfg.rrc_scale
        area = lo + (hi - lo) * rand(b)
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand(b)
        ratio = torch.exp(log_r)
        sx = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width as a fraction of the image
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (1 - sx) * (2 * rand(b) - 1)
        ty = (1 - sy) * (2 * rand(b) - 1)
    if cfg.random_crop_padding > 0:
        p = cfg.random_crop_padding
        # integer pixel shifts in [-p, p], expressed in normalised coordinates of the input
        dx = torch.randint(-p, p + 1, (b,), generator=gen, device=dev).float()
        dy = torch.randint(-p, p + 1, (b,), generator=gen, device=dev).float()
        tx = tx + 2 * dx / w
        ty = ty + 2 * dy / h
    if cfg.hflip:
        sx = torch.where(rand(b) < 0.5, -sx, sx)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, [b, 3, out_size, out_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _needs_augment(cfg: AugmentConfig) -> bool:
    return cfg.hflip or cfg.random_crop_padding > 0 or cfg.random_resized_crop


def to_size(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)


# ----------------------------------------------------------------------------- in-memory loader


class TensorBatches(BatchSource):
    """Batches from uint8 tensors held on the training device.

    The order of epoch ``e`` is a permutation seeded by ``(seed, e)`` alone, so a resumed run
    sees the same order, and each DDP rank takes its own slice of it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, image_size: int,
                 train: bool, augment: AugmentConfig, seed: int, device: torch.device,
                 rank: int = 0, world_size: int = 1):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.image_size = image_size
        self.is_train = train
        self.augment = augment
        self.seed = seed
        self.device = device
        self.rank, self.world = rank, world_size
        self.epoch = 0
        self.start_step = 0
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed + 7919 * (rank + 1))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.start_step = start_step

    def _indices(self) -> torch.Tensor:
        n = self.images.shape[0]
        if not self.is_train:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(n, generator=g)
        per_rank = n // self.world
        return perm[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __len__(self) -> int:
        n = self.images.shape[0] // self.world if self.is_train else self.images.shape[0]
        if self.is_train:
            return max(1, n // self.batch_size) if n >= self.batch_size else 1
        return math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        steps = len(self)
        for step in range(self.start_step, steps):
            sel = idx[step * self.batch_size:(step + 1) * self.batch_size].to(self.device)
            x = self.images.index_select(0, sel).float().div_(255.0)
            y = self.labels.index_select(0, sel)
            if self.is_train and _needs_augment(self.augment):
                x = augment_batch(x, self.augment, self.image_size, self.gen)
            else:
                x = to_size(x, self.image_size)
            yield x, y
        self.start_step = 0

    def state(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state(self, state: dict) -> None:
        if state and "gen" in state:
            self.gen.set_state(state["gen"].to(self.gen.get_state().device) if hasattr(state["gen"], "to") else state["gen"])


# ----------------------------------------------------------------------------- sources


def _stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_val = max(1, int(round(len(members) * val_fraction)))
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def _per_class_subset(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10007 + seed)
    keep = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        keep.append(members[:k])
    return torch.cat(keep).sort().values


def load_digits_tensors(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (1797 real 8x8 scans, 10 classes) as uint8 ``[N, 3, size, size]``."""
    images, target = digits_arrays()
    x = torch.from_numpy(images).float().div_(16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(target).long()


def digits_arrays():
    """The digits scans ``[1797, 8, 8]`` (values 0..16) and labels, read from the file scikit-learn ships.

    ``import sklearn.datasets`` costs 1.5-3 s on the project's 2-core machines (scipy and the rest of
    scikit-learn), a tenth of the quickstart; the data is one small gzipped CSV (64 pixels then the label per
    row), so it is read directly from the installed package without importing it. Where that file is not
    found (another scikit-learn layout), ``sklearn.datasets.load_digits`` is the fallback.
    """
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",")  # numpy opens .gz itself
        if table.ndim == 2 and table.shape[1] == 65:
            return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def synthetic_tensors(n: int, num_classes: int, size: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable random data: a smooth template per class plus noise (for tests)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(templates, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.arange(n) % num_classes
    x = templates[y] + 0.15 * torch.randn(n, 3, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


class _SafeUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow numpy arrays and builtins, nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _cifar_files(root: Path, which: str) -> tuple[Path, list[str], str, str]:
    if which == "cifar10":
        return root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels"
    return root / "cifar-100-python", ["train"], "test", "fine_labels"


CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


def _download_cifar(root: Path, which: str) -> None:
    import tarfile
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
    url = CIFAR_URLS[which]
    tmp = root / (Path(url).name + ".part")
    print(f"downloading {url} -> {root}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise BadInput(f"could not download {which} ({err}); the machine looks offline. "
                       f"Put the extracted python version under data.root ({root}) and set data.download: false") from None
    with tarfile.open(tmp) as tar:
        tar.extractall(root, filter="data")
    tmp.unlink()


MAX_CIFAR_FILE = 2 << 30  # a real batch file is 31 MB (CIFAR-10) or 154 MB (CIFAR-100 train)


def _user_path(text: str, what: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError as err:  # '~nobody/...'
        raise BadInput(f"{what} {text!r}: {err}") from None


def read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR python batch as uint8 ``[N, 3, 32, 32]`` images and int64 ``[N]`` labels.

    The file is a pickle, so it is read with the restricted unpickler and then checked for the
    structure CIFAR's batches have (a dict with ``data`` [N, 3072] uint8 and N labels in range);
    anything else is BadInput naming the file, never an error deep inside torch.
    """
    import numpy as np

    try:
        if not path.is_file():
            raise BadInput(f"CIFAR batch {path} is missing (or not a regular file); expected the extracted "
                           "python version of the data set under data.root")
        if path.stat().st_size > MAX_CIFAR_FILE:
            raise BadInput(f"CIFAR batch {path} is {path.stat().st_size} bytes, far larger than any CIFAR batch")
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="latin1").load()
    except BadInput:
        raise
    except pickle.UnpicklingError as err:
        raise BadInput(f"cannot read {path}: {err}") from None
    except Exception as err:  # truncated, not a pickle, numpy refusing its arguments: a malformed file
        raise BadInput(f"cannot read {path}: not a CIFAR python batch ({type(err).__name__}: {str(err)[:200]})") from None

    def bad(what: str) -> BadInput:
        return BadInput(f"{path} is not a CIFAR python batch: {what}; re-extract the data set's python version")

    if not isinstance(d, dict):
        raise bad(f"expected a dict with 'data' and '{label_key}', found a {type(d).__name__}")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    for key in ("data", label_key):
        if key not in d:
            raise bad(f"no '{key}' entry (found {sorted(map(str, d))[:8]})")
    data, labels = d["data"], d[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = (f"{data.dtype} array of shape {list(data.shape)}" if isinstance(data, np.ndarray)
                 else type(data).__name__)
        raise bad(f"'data' must be a uint8 array [N, 3072], found a {found}")
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)) or not all(type(v) is int for v in labels):
        raise bad(f"'{label_key}' must be a list of integers")
    if len(labels) != data.shape[0]:
        raise bad(f"{data.shape[0]} images but {len(labels)} labels")
    if labels and not (0 <= min(labels) and max(labels) < num_classes):
        raise bad(f"labels must lie in [0, {num_classes - 1}], found {min(labels)}..{max(labels)}")
    x = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return x, torch.tensor(labels, dtype=torch.long)


def load_cifar_tensors(root: Optional[str], which: str, download: bool):
    if root is None:
        raise BadInput(f"data.dataset: {which} needs data.root, the folder holding the extracted python version")
    root_p = _user_path(root, "data.root")
    base, train_files, test_file, key = _cifar_files(root_p, which)
    if not base.is_dir():
        if download:
            _download_cifar(root_p, which)
        else:
            raise BadInput(f"{which} not found at {base}; download it there or set data.download: true (needs network)")
    nc = 10 if which == "cifar10" else 100

    def read(names):
        parts = [read_cifar_batch(base / n, key, nc) for n in names]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    return read(train_files), read([test_file]), nc


def cifar_label_names(root: Optional[str], which: str) -> Optional[list[str]]:
    """The class names stored beside the CIFAR batches (``batches.meta`` / ``meta``); None when unreadable."""
    try:
        base = _cifar_files(_user_path(root, "data.root"), which)[0]
        meta, key = (base / "batches.meta", "label_names") if which == "cifar10" else (base / "meta", "fine_label_names")
        if not meta.is_file() or meta.stat().st_size > 1 << 20:
            return None
        with open(meta, "rb") as f:
            d = _SafeUnpickler(f, encoding="latin1").load()
        names = d.get(key) if isinstance(d, dict) else None
        names = [n.decode() if isinstance(n, bytes) else n for n in names or []]
        return names if names and all(isinstance(n, str) for n in names) else None
    except (BadInput, OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError):
        return None


# ----------------------------------------------------------------------------- ImageFolder


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _is_image_file(path: str) -> bool:
    """An image by extension that is a regular file (never a FIFO or device that would block a reader)."""
    return path.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path)


def _has_image(folder: Path) -> bool:
    for dirpath, _, files in os.walk(folder, followlinks=True):
        if any(_is_image_file(os.path.join(dirpath, f)) for f in files):
            return True
    return False


def check_image_tree(root: Path) -> list[str]:
    """Class names of an ImageFolder root (``train/`` and ``val/``, one folder per class, the same classes
    in both, every class with at least one image). Raises BadInput naming what is wrong where."""
    classes = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise BadInput(f"ImageFolder root {root} must contain '{split}/' with one folder per class")
        try:
            names = sorted(e.name for e in os.scandir(d) if e.is_dir())
        except OSError as err:
            raise BadInput(f"cannot list {d}: {err}") from None
        if not names:
            raise BadInput(f"{d} has no class folders: expected {d}/<class>/<image> (for example {d}/cat/1.jpg)")
        empty = [n for n in names if not _has_image(d / n)]
        if empty:
            shown = ", ".join(str(d / n) for n in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise BadInput(f"class folder(s) with no images ({', '.join(IMAGE_EXTENSIONS)}): {shown}; "
                           "add images or remove the folder")
        classes[split] = names
    if classes["train"] != classes["val"]:
        only_t = sorted(set(classes["train"]) - set(classes["val"]))
        only_v = sorted(set(classes["val"]) - set(classes["train"]))
        parts = ([f"only in train/: {', '.join(only_t[:5])}"] if only_t else []) + \
                ([f"only in val/: {', '.join(only_v[:5])}"] if only_v else [])
        raise BadInput(f"train/ and val/ class folders differ under {root} ({'; '.join(parts)}); "
                       "every class needs a folder with images in both")
    if len(classes["train"]) < 2:
        raise BadInput(f"{root / 'train'} has {len(classes['train'])} class folder; a classifier needs at least 2")
    return classes["train"]


class _FolderDataset(torch.utils.data.Dataset):
    """Items are ``(uint8 [3, S, S], label, error)``: a file that cannot be decoded gives a blank image
    and its error text, so the main process (not a DataLoader worker's traceback) reports it."""

    def __init__(self, root: Path, size: int, train: bool, augment: AugmentConfig):
        from .augment import folder_transform
        from .compat import ensure_torchvision

        ensure_torchvision()
        from torchvision import datasets

        try:
            self.inner = datasets.ImageFolder(str(root), is_valid_file=_is_image_file)
        except (OSError, RuntimeError) as err:  # the tree changed after check_image_tree
            raise BadInput(f"cannot read ImageFolder {root}: {err}") from None
        self.size = size
        self.tf = folder_transform(size, train, augment)  # timm's pipeline -> uint8 [3, S, S]: small to ship

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        path, y = self.inner.samples[i]
        try:
            img = self.inner.loader(path).convert("RGB")
            return self.tf(img), y, ""
        except Exception as err:  # corrupt, truncated, a decompression bomb: the data's fault, not ours
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), y, f"{path}: {type(err).__name__}: {err}"


class FolderBatches(BatchSource):
    def __init__(self, ds, *, batch_size, train, augment: AugmentConfig, image_size, seed, device, workers,
                 rank=0, world_size=1):
        self.ds, self.train, self.augment, self.image_size, self.device = ds, train, augment, image_size, device
        self.seed, self.rank, self.world, self.epoch, self.start_step = seed, rank, world_size, 0, 0
        self.batch_size, self.workers = batch_size, workers
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed + rank)

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        n = len(self.ds) // self.world if self.train else len(self.ds)
        return max(1, n // self.batch_size) if self.train else math.ceil(n / self.batch_size)

    def __iter__(self):
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            perm = torch.randperm(len(self.ds), generator=g)
            per = len(self.ds) // self.world
            idx = perm[self.rank * per:(self.rank + 1) * per][self.start_step * self.batch_size:].tolist()
        else:
            idx = list(range(len(self.ds)))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.ds, idx), batch_size=self.batch_size, shuffle=False,
            drop_last=self.train and len(idx) >= self.batch_size, num_workers=self.workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False)
        flip_only = AugmentConfig(hflip=self.augment.hflip)
        for x, y, errors in loader:
            bad = [e for e in errors if e]
            if bad:
                raise BadInput(f"cannot decode image {bad[0][:300]}; fix or remove the file"
                               + (f" ({len(bad) - 1} more in this batch)" if len(bad) > 1 else ""))
            x = x.to(self.device, non_blocking=True).float().div_(255.0)
            y = y.to(self.device, non_blocking=True)
            if self.train and flip_only.hflip:
                x = augment_batch(x, flip_only, self.image_size, self.gen)
            yield x, y
        self.start_step = 0

    def state(self):
        return {"gen": self.gen.get_state()}

    def load_state(self, state):
        if state and "gen" in state:
            self.gen.set_state(state["gen"])


# ----------------------------------------------------------------------------- entry point


# the in-memory sets are resized whole to the input size (bilinear): timm's transform with crop_pct 1.0
MEMORY_PREPROCESS = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


def _memory_split(cfg: DataConfig):
    """(train images, train labels, val images, val labels, classes, names) of an in-memory data set."""
    size = cfg.image_size
    names = None
    if cfg.dataset == "digits":
        x, y = load_digits_tensors(size)
        tr_i, va_i = _stratified_split(y, cfg.val_fraction, DIGITS_SPLIT_SEED)
        (xtr, ytr), (xva, yva), nc = (x[tr_i], y[tr_i]), (x[va_i], y[va_i]), 10
        names = [str(i) for i in range(10)]
    elif cfg.dataset == "synthetic":
        nc = cfg.num_classes or 10
        x, y = synthetic_tensors(cfg.synthetic_size, nc, size)
        tr_i, va_i = _stratified_split(y, cfg.val_fraction, DIGITS_SPLIT_SEED)
        (xtr, ytr), (xva, yva) = (x[tr_i], y[tr_i]), (x[va_i], y[va_i])
    else:
        (xtr, ytr), (xva, yva), nc = load_cifar_tensors(cfg.root, cfg.dataset, cfg.download)
        names = cifar_label_names(cfg.root, cfg.dataset)
    if cfg.num_classes is not None and cfg.dataset != "synthetic" and cfg.num_classes != nc:
        raise BadInput(f"data.num_classes is {cfg.num_classes} but {cfg.dataset} has {nc} classes")
    if cfg.train_per_class:
        keep = _per_class_subset(ytr, cfg.train_per_class, cfg.subset_seed)
        xtr, ytr = xtr[keep], ytr[keep]
    return xtr, ytr, xva, yva, nc, names


def _folder_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise BadInput("data.dataset: imagefolder needs data.root with train/ and val/ sub-folders")
    root = _user_path(cfg.root, "data.root")
    check_image_tree(root)
    return root


def build_data(cfg: DataConfig, *, seed: int, device: torch.device, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Build train/val batch sources for the recipe's dataset."""
    from .augment import check_dataset, eval_preprocess

    check_dataset(cfg)  # per-image augment keys are ImageFolder-only
    size = cfg.image_size
    if cfg.dataset == "imagefolder":
        root = _folder_root(cfg)
        tr = _FolderDataset(root / "train", size, True, cfg.augment)
        va = _FolderDataset(root / "val", size, False, cfg.augment)
        if tr.inner.classes != va.inner.classes:
            raise BadInput(f"train/ and val/ class folders differ under {root}")
        common = dict(image_size=size, seed=seed, device=device, workers=cfg.num_workers)
        pre = {k: v for k, v in eval_preprocess(size).items() if k != "input_size"}
        return DataBundle(
            FolderBatches(tr, batch_size=cfg.batch_size, train=True, augment=cfg.augment, rank=rank,
                          world_size=world_size, **common),
            FolderBatches(va, batch_size=cfg.val_batch_size, train=False, augment=cfg.augment, **common),
            len(tr.inner.classes), "imagefolder", len(tr), len(va), list(tr.inner.classes), pre)

    xtr, ytr, xva, yva, nc, names = _memory_split(cfg)
    dev = device if cfg.on_device else torch.device("cpu")
    train = TensorBatches(xtr, ytr, batch_size=cfg.batch_size, image_size=size, train=True, augment=cfg.augment,
                          seed=seed, device=dev, rank=rank, world_size=world_size)
    val = TensorBatches(xva, yva, batch_size=cfg.val_batch_size, image_size=size, train=False,
                        augment=cfg.augment, seed=seed, device=dev)
    return DataBundle(train, val, nc, cfg.dataset, len(ytr), len(yva), names, dict(MEMORY_PREPROCESS))


def calibration_source(cfg: DataConfig, *, seed: int, count: int, batch_size: int = 64) -> BatchSource:
    """``count`` training images in a fixed shuffled order, with the evaluation preprocessing (no
    augmentation): what INT8 calibration sees, as the deployed student will see its inputs."""
    g = torch.Generator().manual_seed(seed * 7 + 11)
    size = cfg.image_size
    if cfg.dataset == "imagefolder":
        ds = _FolderDataset(_folder_root(cfg) / "train", size, False, cfg.augment)  # the eval transform
        idx = torch.randperm(len(ds), generator=g)[:count].tolist()
        sub = torch.utils.data.Subset(ds, idx)
        sub.inner = ds.inner
        return FolderBatches(sub, batch_size=batch_size, train=False, augment=cfg.augment, image_size=size, seed=seed,
                             device=torch.device("cpu"), workers=cfg.num_workers)
    xtr, ytr = _memory_split(cfg)[:2]
    idx = torch.randperm(len(ytr), generator=g)[:count]
    return TensorBatches(xtr[idx], ytr[idx], batch_size=batch_size, image_size=size, train=False,
                         augment=cfg.augment, seed=seed, device=torch.device("cpu"))
