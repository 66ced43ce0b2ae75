"""Users' own images: ``root/<class>/<image>`` folders, loaded lazily with PIL.

Layout: ``root/train/<class>/...`` and ``root/test/<class>/...``; if ``root/test`` is absent
the test split is carved from the images with a fixed seed. Corrupt or unreadable images are
skipped when the dataset is built and counted in a warning (the documented rule); a folder with
no readable image is an error.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hashdistill.errors import UserError
from hashdistill.imagefiles import load_image, scan_image_files
from hashdistill.recipe import DataConfig

from .splits import SPLIT_SEED, train_or_val

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


def train_folder(cfg: DataConfig) -> Path:
    """``root/train`` if it exists, else ``root``: the images train and val are carved from (the database)."""
    if not cfg.root:
        raise UserError("data.dataset=imagefolder needs data.root (a folder with train/<class>/ images)")
    root = Path(cfg.root).expanduser()
    return root / "train" if (root / "train").is_dir() else root


@functools.lru_cache(maxsize=8)
def _scan(folder: Path) -> tuple[list[Path], list[int], list[str], int]:
    """One verification pass per folder and process: every split of a run reads the same scan."""
    return scan_image_files(folder)


def build_imagefolder_split(cfg: DataConfig, split: str) -> ImageFileDataset:
    if split.startswith("ood"):
        raise UserError("OOD splits are not supported for data.dataset=imagefolder; "
                        "hold classes out in separate folders")
    paths, labels, classes, _ = _scan(train_folder(cfg))
    root = Path(cfg.root).expanduser()
    index = np.arange(len(paths))
    if split == "test" and (root / "test").is_dir():
        paths, labels, test_classes, _ = _scan(root / "test")
        if test_classes != classes:
            raise UserError(f"{root}/test has classes {test_classes}, but train has {classes}")
        index = np.arange(len(paths))
    elif not (root / "test").is_dir():
        order = np.random.default_rng(SPLIT_SEED).permutation(len(paths))
        n_test = max(1, len(paths) // 5)
        index = np.sort(order[:n_test]) if split == "test" else np.sort(order[n_test:])
    if split in ("train", "val"):
        index = train_or_val(index, split, cfg.val_fraction)
    return ImageFileDataset([paths[i] for i in index], [labels[i] for i in index], classes, cfg.image_size)
