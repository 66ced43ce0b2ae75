"""Datasets: one registry, ``build_dataset(cfg, split)``.

Splits: ``train`` and ``val`` (carved from the training set with a fixed seed, so model
selection never sees the test set), ``test``, and for OOD recipes ``ood_val`` / ``ood_test``
(images of the held-out ``ood_classes`` from the training / test set). Labels are remapped to
0..L-1 over the in-distribution classes.

Small in-memory datasets (Fashion-MNIST, digits, CIFAR-10, synthetic) are resized once to
``image_size`` and kept as uint8; grayscale images are repeated to 3 channels so any timm
backbone accepts them. Every item is ``(image float32 [3, S, S] normalised, label int)``; a training
split's augmentation runs on whole batches on the training device (:func:`random_shift_flip`).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from hashdistill.errors import UserError
from hashdistill.recipe import DataConfig

SPLITS = ("train", "val", "test", "ood_val", "ood_test")
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "~/.cache/hashdistill/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_SPLIT_SEED = 1234  # the validation carve-out is fixed, independent of the recipe's seed


@dataclass
class RawImages:
    """A dataset's images before splitting: uint8 [N, C, H, W] with integer labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 [N, C, S, S], normalised when fetched.

    ``augment`` marks a training split that trains with :func:`random_shift_flip`: the trainer applies it to
    whole batches on the training device (:func:`batch_augmentation`), never per item. :meth:`get_batch`
    fetches a whole batch in one indexing operation; the trainer's loader uses it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                 mean: tuple[float, ...], std: tuple[float, ...], augment: bool = False):
        self.images, self.labels, self.class_names = images, labels, class_names
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255).expand(3, -1, -1)
        return (image - self.mean) / self.std, int(self.labels[index])

    def get_batch(self, indices: list[int]) -> list[torch.Tensor]:
        """A whole batch, already collated: normalised images [B, 3, S, S] and labels [B]."""
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index].float().div_(255).expand(-1, 3, -1, -1)
        return [(images - self.mean) / self.std, self.labels[index]]


MAX_SHIFT = 2  # pixels: random_shift_flip's translation range, padding with the border


def random_shift_flip(images: torch.Tensor, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """Per image of a batch [B, C, H, W]: a random translation by up to ``max_shift`` pixels (padding with
    the border) and a horizontal flip with probability 1/2, on the batch's device, drawn from torch's RNG for
    that device (seeded per epoch by the trainer, so a resumed run replays the same augmentations).

    On a GPU one gather does it all without a host sync; on a CPU, slicing each group of images that share a
    shift (at most (2 * max_shift + 1)^2 groups) is twice as fast. Both give the same images."""
    b = images.shape[0]
    device = images.device
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (b,), device=device)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), device=device)
    flip = torch.rand(b, device=device) < 0.5
    crop = _gathered_crops if images.is_cuda else _grouped_crops
    return crop(padded, images.shape[-2:], dy, dx, flip)


def _gathered_crops(padded: torch.Tensor, size: torch.Size, dy: torch.Tensor, dx: torch.Tensor,
                    flip: torch.Tensor) -> torch.Tensor:
    (h, w), device, b, c = size, padded.device, padded.shape[0], padded.shape[1]
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    columns = torch.arange(w, device=device)
    columns = torch.where(flip[:, None], columns.flip(0), columns) + dx[:, None]
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows, columns[:, None, None, :]]


def _grouped_crops(padded: torch.Tensor, size: torch.Size, dy: torch.Tensor, dx: torch.Tensor,
                   flip: torch.Tensor) -> torch.Tensor:
    h, w = size
    out = padded.new_empty((padded.shape[0], padded.shape[1], h, w))
    for y, x in torch.unique(torch.stack([dy, dx], dim=1), dim=0).tolist():
        chosen = ((dy == y) & (dx == x)).nonzero().squeeze(1)
        out[chosen] = padded[chosen, :, y:y + h, x:x + w]
    flipped = flip.nonzero().squeeze(1)
    out[flipped] = out[flipped].flip(-1)
    return out


def batch_augmentation(dataset: Dataset) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The augmentation the trainer applies to each training batch of ``dataset`` (None: none)."""
    return random_shift_flip if getattr(dataset, "augment", False) else None


def build_dataset(cfg: DataConfig, split: str) -> ImageTensorDataset:
    """Build one split of the configured dataset (see the module docstring for the splits)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if cfg.dataset == "imagefolder":
        from hashdistill.imagefolder import build_imagefolder_split

        return build_imagefolder_split(cfg, split)
    raw = _load_raw(cfg)
    in_classes = cfg.in_classes if cfg.in_classes is not None else [
        c for c in range(len(raw.class_names)) if c not in cfg.ood_classes]
    _check_classes(cfg, in_classes, len(raw.class_names))
    if split.startswith("ood") and not cfg.ood_classes:
        raise UserError(f"split '{split}' needs data.ood_classes in the recipe")

    source_images, source_labels = (raw.test_images, raw.test_labels) if split in ("test", "ood_test") \
        else (raw.train_images, raw.train_labels)
    wanted = cfg.ood_classes if split.startswith("ood") else in_classes
    index = np.flatnonzero(np.isin(source_labels, wanted))
    if split in ("train", "val"):
        index = _train_or_val(index, split, cfg.val_fraction)
    limit = cfg.train_limit if split in ("train", "val", "ood_val") else cfg.test_limit
    if limit is not None and len(index) > limit:
        index = np.sort(np.random.default_rng(_SPLIT_SEED).choice(index, limit, replace=False))
    if split.startswith("ood"):
        labels = np.full(len(index), -1, dtype=np.int64)
        names = [raw.class_names[c] for c in cfg.ood_classes]
    else:
        remap = {c: i for i, c in enumerate(in_classes)}
        labels = np.array([remap[int(c)] for c in source_labels[index]], dtype=np.int64)
        names = [raw.class_names[c] for c in in_classes]
    images = _resize(source_images[index], cfg.image_size)
    return ImageTensorDataset(images, torch.from_numpy(labels), names, raw.mean, raw.std,
                              augment=cfg.augment and split == "train")


def dataset_info(cfg: DataConfig) -> dict:
    """Class names, mean and std of the configured dataset (for checkpoint and ONNX metadata)."""
    ds = build_dataset(cfg, "val")
    return {"class_names": ds.class_names, "mean": ds.mean.flatten().tolist(), "std": ds.std.flatten().tolist(),
            "input_size": cfg.image_size}


def _train_or_val(index: np.ndarray, split: str, val_fraction: float) -> np.ndarray:
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(index))
    n_val = max(1, int(round(len(index) * val_fraction)))
    chosen = order[:n_val] if split == "val" else order[n_val:]
    return np.sort(index[chosen])


def _check_classes(cfg: DataConfig, in_classes: list[int], num_classes: int) -> None:
    for name, classes in (("data.in_classes", in_classes), ("data.ood_classes", cfg.ood_classes)):
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise UserError(f"recipe field '{name}': class {bad[0]} does not exist; "
                            f"{cfg.dataset} has classes 0..{num_classes - 1}")


def _resize(images: np.ndarray, size: int) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.shape[-1] == size and tensor.shape[-2] == size:
        return tensor
    out = []
    for chunk in tensor.split(4096):
        resized = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)
        out.append(resized.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else torch.empty((0, tensor.shape[1], size, size), dtype=torch.uint8)


# --- loaders: each returns RawImages --------------------------------------------------------------

def _load_fashion_mnist(cfg: DataConfig) -> RawImages:
    folders = [Path(cfg.root).expanduser()] if cfg.root else [Path(p).expanduser() for p in FASHION_MNIST_DIRS]
    for folder in folders:
        if (folder / "train-images-idx3-ubyte.gz").is_file() or (folder / "train-images-idx3-ubyte").is_file():
            return RawImages(
                _read_idx(folder, "train-images-idx3-ubyte")[:, None], _read_idx(folder, "train-labels-idx1-ubyte"),
                _read_idx(folder, "t10k-images-idx3-ubyte")[:, None], _read_idx(folder, "t10k-labels-idx1-ubyte"),
                FASHION_MNIST_CLASSES, (0.286,) * 3, (0.353,) * 3)
    raise UserError(
        "Fashion-MNIST not found; looked in: " + ", ".join(map(str, folders))
        + ". Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or put the four idx files "
        "(train-images-idx3-ubyte.gz, ...) in a folder and set data.root to it.")


def _read_idx(folder: Path, stem: str) -> np.ndarray:
    path = folder / f"{stem}.gz"
    opener: Callable = gzip.open
    if not path.is_file():
        path, opener = folder / stem, open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an idx file of unsigned bytes")
        shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape).copy()
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise UserError(f"{path}: corrupt or unreadable idx file ({exc})") from None


def _load_digits(cfg: DataConfig) -> RawImages:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=0.2, random_state=0, stratify=labels)
    return RawImages(tr_x, tr_y, te_x, te_y, [str(d) for d in range(10)], (0.235,) * 3, (0.364,) * 3)


def _load_synthetic(cfg: DataConfig) -> RawImages:
    """Four classes of noisy blob patterns on a 16x16 canvas: learnable in seconds, for tests."""
    rng = np.random.default_rng(7)
    templates = rng.random((4, 4, 4)) > 0.5
    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 4, n)
        base = np.kron(templates[labels], np.ones((4, 4))) * 200.0
        noisy = base + rng.normal(0, 40, base.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8)[:, None], labels.astype(np.int64)
    tr_x, tr_y = sample(400)
    te_x, te_y = sample(120)
    return RawImages(tr_x, tr_y, te_x, te_y, ["a", "b", "c", "d"], (0.4,) * 3, (0.4,) * 3)


def _load_cifar10(cfg: DataConfig) -> RawImages:
    folder = Path(cfg.root or "~/.cache/hashdistill").expanduser()
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    files = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"CIFAR-10 not found: {missing[0]} is missing. Download torchvision's "
                        "cifar-10-python.tar.gz, extract it and set data.root to the folder holding "
                        "cifar-10-batches-py.")
    batches = [_read_cifar_batch(f) for f in files]
    train_x = np.concatenate([b[0] for b in batches[:5]])
    train_y = np.concatenate([b[1] for b in batches[:5]])
    return RawImages(train_x, train_y, batches[5][0], batches[5][1], CIFAR10_CLASSES,
                     (0.491, 0.482, 0.447), (0.247, 0.243, 0.262))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles; allow only the numpy array constructors they need."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's protocol
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a plain CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return data, np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError, OSError) as exc:
        raise UserError(f"{path}: not a CIFAR-10 batch file ({exc})") from None


_LOADERS: dict[str, Callable[[DataConfig], RawImages]] = {
    "fashion-mnist": _load_fashion_mnist,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "cifar10": _load_cifar10,
}
_CACHE: dict[tuple, RawImages] = {}


def _load_raw(cfg: DataConfig) -> RawImages:
    key = (cfg.dataset, cfg.root)
    if key not in _CACHE:
        _CACHE[key] = _LOADERS[cfg.dataset](cfg)
    return _CACHE[key]
