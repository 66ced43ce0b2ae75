"""Users' own images: ``root/<class>/<image>`` folders, decoded lazily, one image per item.

Layout: ``root/train/<class>/...`` and ``root/test/<class>/...``; if ``root/test`` is absent the test split
is carved from the images with a fixed seed. Listing a folder reads only file headers
(:func:`hashdistill.imagefiles.scan_image_files`). An image whose damage shows only when it is decoded is
replaced by the next readable image of the split (so batches keep their size and the order stays
deterministic), counted, and warned about once per process.

Training items go through timm's training transform (random resized crop, flip, optional auto-augment) and
leave the loader as uint8 pixels; the trainer normalises whole batches on the training device
(:func:`hashdistill.data.batch_augmentation`), as timm's prefetcher does: no per-item float conversion or
normalisation, and a quarter of the bytes to pass between processes and to the GPU. Every other split goes
through THE evaluation pre-processing (:class:`hashdistill.preprocessing.EvalTransform`), the one the exported
model runs in its graph; evaluation splits hold a photo bigger than the model needs already shrunk by the graph's
own resize step (:meth:`ImageFileDataset.pixels`), so a folder of 12-megapixel phone photos evaluates in the memory
of small images. A training image is decoded reduced to about TRAIN_DECODE_SIDES times the input size a side
(JPEG's DCT scaling, then box reduce): augmentation has no exact pixels to keep, and the full decode of a
12-megapixel photo takes two to three times as long and 36 MB a worker.

A view bank (:meth:`ImageFileDataset.with_view_bank`) limits each training image to K fixed views: view v of an
image is timm's transform run with its random generators seeded from the image's path and v, so the same view
comes out in every epoch, process and run, and the teacher's codes of every view can be computed once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hashdistill.errors import UserError
from hashdistill.imagefiles import DECODE_PIXELS, read_rgb, scan_image_files
from hashdistill.messages import name_some, warn
from hashdistill.preprocessing import IMAGEFOLDER_CROP_PCT, EvalTransform, rgb_pixels
from hashdistill.recipe import DataConfig

from .splits import SPLIT_SEED, UNLABELLED, carve_split

TRAIN_DECODE_SIDES = 4  # a training image is decoded at about this many times the input size a side, at most


class ImageFileDataset(Dataset):
    """Image files, decoded when fetched: ``(normalised float [3, S, S], label)`` per item, or for a training
    split with ``train_transform`` its augmented ``uint8 [3, S, S]`` pixels (normalised per batch by
    :meth:`normalise`), label and view id (the view of the bank it was drawn as; -1 without a bank)."""

    def __init__(self, paths: list[Path], labels: list[int], class_names: list[str], transform: EvalTransform,
                 train_transform: Callable | None = None, view_bank: int | None = None):
        self.paths, self.labels, self.class_names = paths, torch.tensor(labels, dtype=torch.long), class_names
        self._label_of = labels  # a list: per-item lookups without a tensor index
        self.transform, self.train_transform = transform, train_transform
        self.view_bank = view_bank if train_transform is not None else None
        self.damaged: set[Path] = set()  # found in this process

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def augment(self) -> bool:
        """True for a training split with random augmentation."""
        return self.train_transform is not None

    @property
    def num_views(self) -> int | None:
        """Distinct training views per image: the bank's K, 1 without augmentation, None when unbounded."""
        return 1 if not self.augment else self.view_bank

    def with_view_bank(self, views: int) -> ImageFileDataset:
        """This training split with each image limited to ``views`` fixed views (see the module docstring)."""
        if views < 1:
            raise UserError(f"a view bank needs at least one view per image, got {views}")
        return ImageFileDataset(self.paths, self._label_of, self.class_names, self.transform, self.train_transform,
                                views)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, int]:
        if self.train_transform is None:
            index, image = self._decode(index)
            pixels = torch.from_numpy(self.transform.reduce(rgb_pixels(image)))[None]  # both give writable arrays
            return self.transform.apply(pixels)[0], self._label_of[index]
        if self.view_bank is None:
            index, image = self._decode(index, self._train_pixels)
            return self.train_transform(image), self._label_of[index], -1
        view = int(torch.randint(0, self.view_bank, ()))  # the loader's RNG, seeded per epoch by the trainer
        return self.view(index, view), self._label_of[index], view

    def view(self, index: int, view: int) -> torch.Tensor:
        """View ``view`` of item ``index`` of the bank: uint8 [3, S, S], the same pixels every time."""
        index, image = self._decode(index, self._train_pixels)
        with _seeded_generators(zlib.crc32(f"{self.paths[index]}\0{view}".encode())):
            return self.train_transform(image)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """A training batch's uint8 [B, 3, S, S] (on any device) -> normalised float [B, 3, S, S]."""
        return self.transform.normalise(pixels)

    def augment_batch(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        """On the training device: the batch's uint8 views (augmented as they were decoded), normalised."""
        return [self.normalise(batch[0]), *batch[1:]]

    def subset(self, indices: np.ndarray) -> ImageFileDataset:
        """The items at ``indices`` as a dataset of the same kind (same transforms and view bank)."""
        return ImageFileDataset([self.paths[i] for i in indices], self.labels[indices].tolist(), self.class_names,
                                self.transform, self.train_transform, self.view_bank)

    def pixels(self, index: int) -> np.ndarray:
        """The decoded RGB uint8 [H, W, 3] image behind item ``index``, as an image-in model takes it: a photo
        bigger than the model needs comes already shrunk by the graph's resize step (:meth:`EvalTransform.reduce`,
        the same codes), so a split of phone photos is held as small images."""
        return self.transform.reduce(rgb_pixels(self._decode(index)[1]))

    @property
    def _train_pixels(self) -> int:
        """How big a training image is decoded at most (:func:`read_rgb` reduces a bigger one): a view is a random
        crop resized to S, and RandomResizedCrop's smallest (8% of the area, about a quarter of each side) still
        has S pixels a side at TRAIN_DECODE_SIDES x S; decoding a phone photo at full size would only slow it."""
        side = TRAIN_DECODE_SIDES * self.transform.input_size
        return 2 * side * side  # (a 2:1 image keeps TRAIN_DECODE_SIDES x S on its shorter side)

    def _decode(self, index: int, max_pixels: int | None = DECODE_PIXELS):
        """(index, PIL image) of the first readable image from ``index`` on (wrapping around)."""
        for step in range(len(self.paths)):
            candidate = (index + step) % len(self.paths)
            path = self.paths[candidate]
            if path in self.damaged:
                continue
            try:
                return candidate, read_rgb(path, max_pixels)
            except UserError as exc:
                self.damaged.add(path)
                if len(self.damaged) == 1:
                    warn(f"{exc}; using the next readable image instead (process {os.getpid()}: damaged files are "
                         "counted, and each is skipped once found)")
        raise UserError(f"none of the {len(self.paths)} images of this split can be decoded")


@contextlib.contextmanager
def _seeded_generators(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's global generators (timm's transforms draw from all three) seeded for one
    call, and restored afterwards, so a fixed view leaves the loader's own random stream untouched."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def train_folder(cfg: DataConfig) -> Path:
    """``root/train`` if it exists, else ``root``: the images train and val are carved from (the database)."""
    if not cfg.root:
        raise UserError("data.dataset=imagefolder needs data.root (a folder with train/<class>/ images)")
    root = Path(cfg.root).expanduser()
    return root / "train" if (root / "train").is_dir() else root


def eval_transform(cfg: DataConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> EvalTransform:
    crop = cfg.crop_pct if cfg.crop_pct is not None else IMAGEFOLDER_CROP_PCT
    return EvalTransform(cfg.image_size, float(crop), tuple(mean), tuple(std))


def train_transform(cfg: DataConfig, mean: tuple[float, ...], std: tuple[float, ...], uint8: bool = True
                    ) -> Callable:
    """timm's training transform for the recipe's augmentation fields: PIL image -> uint8 [3, S, S] (timm's
    prefetcher form; the batch is normalised on the device), or with ``uint8=False`` the usual normalised float
    tensor (what a plain torchvision loader would use; the data benchmark compares against it)."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": (3, cfg.image_size, cfg.image_size), "interpolation": "bilinear",
                                  "mean": tuple(mean), "std": tuple(std)})
    try:
        return create_transform(**config, is_training=True, scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
                                auto_augment=cfg.auto_augment, use_prefetcher=uint8)
    except (ValueError, KeyError, AssertionError) as exc:  # timm's refusals of a policy string
        raise UserError(f"data.auto_augment '{cfg.auto_augment}' is not a timm auto-augment policy ({exc})") from None


@functools.lru_cache(maxsize=8)
def _scan(folder: Path, unlabelled: bool = False) -> tuple[list[Path], list[int], list[str], int]:
    """One header pass per folder and process: every split of a run reads the same scan. In an ``unlabelled``
    folder every image at any depth is unlabelled (sub-folder names are not taken for classes)."""
    return scan_image_files(folder, labels_from_folders=not unlabelled)


def build_imagefolder_split(cfg: DataConfig, split: str, mean: tuple[float, ...], std: tuple[float, ...]
                            ) -> ImageFileDataset:
    if split.startswith("ood"):
        raise UserError("OOD splits are not supported for data.dataset=imagefolder; "
                        "hold classes out in separate folders")
    paths, labels, classes, _ = _scan(train_folder(cfg))
    root = Path(cfg.root).expanduser()
    index = np.arange(len(paths))
    if split == "test" and (root / "test").is_dir():
        paths, labels, test_classes, _ = _scan(root / "test")
        if test_classes != classes:
            only_test, only_train = sorted(set(test_classes) - set(classes)), sorted(set(classes) - set(test_classes))
            raise UserError(f"{root}/test and {train_folder(cfg)} must hold the same classes: only in test "
                            f"{name_some(only_test) or 'none'}, only in train {name_some(only_train) or 'none'}")
        index = np.arange(len(paths))
    elif not (root / "test").is_dir():
        order = np.random.default_rng(SPLIT_SEED).permutation(len(paths))
        n_test = max(1, len(paths) // 5)
        index = np.sort(order[:n_test]) if split == "test" else np.sort(order[n_test:])
    index, labelled = carve_split(index, np.asarray(labels), split, cfg)
    chosen_paths = [paths[i] for i in index]
    chosen_labels = [labels[i] if keep else UNLABELLED for i, keep in zip(index, labelled)]
    if split == "train" and cfg.unlabelled_root:
        extra, _, _, _ = _scan(Path(cfg.unlabelled_root).expanduser(), unlabelled=True)
        chosen_paths += extra
        chosen_labels += [UNLABELLED] * len(extra)
    augment = train_transform(cfg, mean, std) if cfg.augment and split == "train" else None
    return ImageFileDataset(chosen_paths, chosen_labels, classes, eval_transform(cfg, mean, std), augment)


DECODE_SAMPLE = 3  # files per class decoded in full before a run starts


def check_folders(cfg: DataConfig) -> None:
    """What a run's preflight checks of an image folder, before a teacher trains on it: every split has the same
    classes, and each class has a decodable file among a few sampled across it. The scan reads headers only, so a
    class whose every file is damaged past its header would otherwise train with no image and one warning."""
    from hashdistill.data import build_dataset

    train = build_dataset(cfg, "train")
    build_dataset(cfg, "test")  # refuses class sets that differ
    by_class: dict[int, list[Path]] = {}
    for path, label in zip(*_scan(train_folder(cfg))[:2]):
        by_class.setdefault(label, []).append(path)
    for label, paths in sorted(by_class.items()):
        step = max(1, len(paths) // DECODE_SAMPLE)
        sample = paths[::step][:DECODE_SAMPLE]
        failures = []
        for path in sample:
            try:
                read_rgb(path)
                break
            except UserError as exc:
                failures.append(str(exc))
        else:
            name = train.class_names[label] if 0 <= label < len(train.class_names) else str(label)
            raise UserError(f"class '{name}': none of the {len(sample)} files sampled across its {len(paths)} decodes "
                            f"({failures[0]}); repair or remove its damaged images")
