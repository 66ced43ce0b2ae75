"""Datasets: one entry point, ``build_dataset(cfg, split)``; sources, splits, tensors, augmentation apart.

Splits: ``train`` and ``val`` (carved from the training set with a fixed seed, so model
selection never sees the test set), ``test``, and for OOD recipes ``ood_val`` / ``ood_test``
(images of the held-out ``ood_classes`` from the training / test set). Labels are remapped to
0..L-1 over the in-distribution classes.

Small in-memory datasets (Fashion-MNIST, digits, CIFAR-10, synthetic) are resized once to
``image_size`` and kept as uint8; grayscale images are repeated to 3 channels so any timm
backbone accepts them. Every item is ``(image float32 [3, S, S] normalised, label int)``; a training
split's augmentation runs on whole batches on the training device (:mod:`.augment`: named views).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from hashdistill.errors import UserError
from hashdistill.recipe import DataConfig

from .augment import MAX_SHIFT, NUM_VIEWS, VIEW_INDEX, batch_augmentation, random_shift_flip, shift_flip_views
from .imagefolder import ImageFileDataset
from .sources import LOADERS, load_raw
from .sources.fashion_mnist import FASHION_MNIST_DIRS
from .splits import SPLITS, UNLABELLED, carve_split, check_classes
from .tensors import ImageTensorDataset, RawImages, resize_images

__all__ = ["FASHION_MNIST_DIRS", "LOADERS", "MAX_SHIFT", "NUM_VIEWS", "SPLITS", "UNLABELLED", "VIEW_INDEX",
           "ImageFileDataset", "ImageTensorDataset", "RawImages", "batch_augmentation", "build_dataset", "check_data",
           "dataset_info", "labelled_only", "loader_workers", "random_shift_flip", "shift_flip_views"]


def build_dataset(cfg: DataConfig, split: str) -> ImageTensorDataset:
    """Build one split of the configured dataset (see the module docstring for the splits)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if cfg.dataset == "imagefolder":
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        from .imagefolder import build_imagefolder_split

        return build_imagefolder_split(cfg, split, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    raw = load_raw(cfg)
    in_classes = cfg.in_classes if cfg.in_classes is not None else [
        c for c in range(len(raw.class_names)) if c not in cfg.ood_classes]
    check_classes(cfg, in_classes, len(raw.class_names))
    if split.startswith("ood") and not cfg.ood_classes:
        raise UserError(f"split '{split}' needs data.ood_classes in the recipe")

    source_images, source_labels = (raw.test_images, raw.test_labels) if split in ("test", "ood_test") \
        else (raw.train_images, raw.train_labels)
    wanted = cfg.ood_classes if split.startswith("ood") else in_classes
    index = np.flatnonzero(np.isin(source_labels, wanted))
    index, labelled = carve_split(index, source_labels, split, cfg)
    if split.startswith("ood"):
        labels = np.full(len(index), -1, dtype=np.int64)
        names = [raw.class_names[c] for c in cfg.ood_classes]
    else:
        remap = {c: i for i, c in enumerate(in_classes)}
        labels = np.array([remap[int(c)] for c in source_labels[index]], dtype=np.int64)
        labels[~labelled] = UNLABELLED
        names = [raw.class_names[c] for c in in_classes]
    images = resize_images(source_images[index], cfg.image_size)
    return ImageTensorDataset(images, torch.from_numpy(labels), names, raw.mean, raw.std,
                              augment=cfg.augment and split == "train")


def check_data(cfg: DataConfig) -> None:
    """What training will need of the data, checked in seconds before any stage starts: the root exists and reads,
    there are at least two classes, every class keeps a labelled training image under ``labelled_fraction``,
    and model selection has labelled validation images."""
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    classes = len(train.class_names)
    if classes < 2:
        where = f" at {cfg.root}" if cfg.root else ""
        raise UserError(f"the {cfg.dataset} data{where} has one class ({train.class_names[0]!r}); class codes and "
                        "retrieval by label need at least 2 classes")
    labels = np.asarray(train.labels)
    missing = [train.class_names[c] for c in range(classes) if not (labels == c).any()]
    if missing or len(val) == 0:
        what = f"no labelled training image of class {missing[0]!r}" if missing else "no labelled validation image"
        raise UserError(f"data.labelled_fraction={cfg.labelled_fraction} leaves {what} ({int((labels >= 0).sum())} "
                        f"labelled training images for {classes} classes); raise it, or add images")


def labelled_only(dataset: Dataset) -> Dataset:
    """The images of a training split whose labels are kept (data.labelled_fraction): what the teacher and a
    labels-only student train on."""
    keep = np.flatnonzero(np.asarray(dataset.labels) != UNLABELLED)
    return dataset if len(keep) == len(dataset) else dataset.subset(keep)


MAX_DEFAULT_WORKERS = 8


def loader_workers(cfg: DataConfig) -> int:
    """Loader processes: the recipe's, else min(8, CPUs) for image folders (decoding is the cost), 0 in memory
    (their batches are one indexing operation; worker processes would only copy them)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1) if cfg.dataset == "imagefolder" else 0


def dataset_info(cfg: DataConfig) -> dict:
    """Class names and the evaluation pre-processing of the configured dataset (for checkpoint and ONNX metadata)."""
    ds = build_dataset(cfg, "val")
    return {"class_names": ds.class_names, **ds.transform.as_metadata()}
