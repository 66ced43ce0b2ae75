"""Users' own images: ``root/<class>/<image>`` folders, loaded lazily with PIL.

Layout: ``root/train/<class>/...`` and ``root/test/<class>/...``; if ``root/test`` is absent
the test split is carved from the images with a fixed seed. Corrupt or unreadable images are
skipped when the dataset is built and counted in a warning (the documented rule); a folder with
no readable image is an error.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hashdistill.data import _SPLIT_SEED, IMAGE_SUFFIXES, _train_or_val
from hashdistill.errors import UserError
from hashdistill.recipe import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFileDataset(Dataset):
    """Image files resized to a square and normalised on the fly."""

    def __init__(self, paths: list[Path], labels: list[int], class_names: list[str], size: int):
        self.paths, self.labels, self.class_names, self.size = paths, torch.tensor(labels), class_names, size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_image(self.paths[index], self.size)
        tensor = torch.from_numpy(image).permute(2, 0, 1).float().div_(255)
        return (tensor - self.mean) / self.std, int(self.labels[index])


def load_image(path: Path, size: int) -> np.ndarray:
    """Read an image as RGB uint8 [size, size, 3] (bilinear resize), as the edge runtime does."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB").resize((size, size), Image.BILINEAR))
    except OSError as exc:  # the scan's checks are cheap, not a full decode: damage can still show up here
        raise UserError(f"cannot read image {path}: {exc}") from None


def scan_image_folder(folder: Path) -> tuple[list[Path], list[int], list[str], int]:
    """Readable image paths with class indices (sorted class folder names) and the count skipped."""
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{folder} has no class sub-folders (expected {folder}/<class name>/<images>)")
    paths, labels, skipped = [], [], 0
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not _readable(path):
                skipped += 1
                continue
            paths.append(path)
            labels.append(label)
    if not paths:
        raise UserError(f"{folder} holds no readable images ({skipped} unreadable skipped)")
    if skipped:
        warnings.warn(f"{folder}: skipped {skipped} unreadable image(s)", stacklevel=2)
    return paths, labels, classes, skipped


def _readable(path: Path) -> bool:
    """PIL's cheap integrity check, plus the end-of-image marker a truncated JPEG lacks (verify() skips JPEG)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            is_jpeg = img.format == "JPEG"
            img.verify()
        if is_jpeg:
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - 64))
                return fh.read().rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False
    return True


def build_imagefolder_split(cfg: DataConfig, split: str) -> ImageFileDataset:
    if split.startswith("ood"):
        raise UserError("OOD splits are not supported for data.dataset=imagefolder; "
                        "hold classes out in separate folders")
    if not cfg.root:
        raise UserError("data.dataset=imagefolder needs data.root (a folder with train/<class>/ images)")
    root = Path(cfg.root).expanduser()
    train_dir = root / "train" if (root / "train").is_dir() else root
    paths, labels, classes, _ = scan_image_folder(train_dir)
    index = np.arange(len(paths))
    if split == "test" and (root / "test").is_dir():
        paths, labels, test_classes, _ = scan_image_folder(root / "test")
        if test_classes != classes:
            raise UserError(f"{root}/test has classes {test_classes}, but train has {classes}")
        index = np.arange(len(paths))
    elif not (root / "test").is_dir():
        order = np.random.default_rng(_SPLIT_SEED).permutation(len(paths))
        n_test = max(1, len(paths) // 5)
        index = np.sort(order[:n_test]) if split == "test" else np.sort(order[n_test:])
    if split in ("train", "val"):
        index = _train_or_val(index, split, cfg.val_fraction)
    return ImageFileDataset([paths[i] for i in index], [labels[i] for i in index], classes, cfg.image_size)
