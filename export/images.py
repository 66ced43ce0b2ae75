"""User images -> model input, with numpy and PIL only (the edge runtime has no torch).

An image is a file path or a uint8 array, HxW (grayscale) or HxWx3 (RGB). It is converted to RGB
and resized bilinearly with PIL exactly as ``hashdistill.imagefiles.load_image`` does in training,
then scaled to [0, 1] and normalised with the model's mean/std in float32, as the training datasets do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hashdistill.errors import UserError
from hashdistill.imagefiles import read_rgb, scan_image_files

ImageLike = str | os.PathLike | np.ndarray


def as_items(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """One image or many as a list: a path, a HxW / HxWx3 array, a NxHxWx3 batch or a sequence of these."""
    if isinstance(images, str | os.PathLike):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        return [images]
    items = list(images)
    if not items:
        raise UserError("no images given")
    return items


def load_rgb(item: ImageLike, size: int) -> np.ndarray:
    """An image as RGB uint8 [size, size, 3], resized bilinearly (PIL) when it is not that size already."""
    from PIL import Image

    if isinstance(item, np.ndarray):
        array = _check_array(item)
        if array.shape[:2] == (size, size):
            return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
        image = Image.fromarray(array)
    else:
        image = read_rgb(item)
    return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))


def preprocess(items: Sequence[ImageLike], size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """float32 [N, 3, size, size] model input: RGB / 255, minus mean, over std (per channel)."""
    batch = np.stack([load_rgb(item, size) for item in items]).astype(np.float32) / np.float32(255)
    batch = batch.transpose(0, 3, 1, 2)
    mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((batch - mean) / std)


def scan_folder(folder: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image paths, labels and class names: class sub-folders give labels, a plain folder gives -1.

    Damaged files are skipped and counted (the rule of :mod:`hashdistill.imagefiles`).
    """
    paths, labels, classes, _ = scan_image_files(folder, allow_unlabelled=True)
    return paths, np.array(labels, dtype=np.int64), classes


def _check_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise UserError(f"image arrays must be uint8 (0-255), got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise UserError(f"an image array must be HxW or HxWx3, got shape {array.shape}")
    return np.ascontiguousarray(array)
