"""User images -> model input, with numpy and PIL only (the edge runtime has no torch).

An image is a file path or a uint8 array, HxW (grayscale) or HxWx3 (RGB). It is decoded to RGB uint8 at its
own size; what follows (resize, crop, normalise) is the model's pre-processing, which runs in ONNX.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from hashdistill.errors import UserError
from hashdistill.imagefiles import read_rgb, scan_image_files
from hashdistill.preprocessing import rgb_pixels, same_shape_runs

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


def decode(item: ImageLike) -> np.ndarray:
    """An image (path or uint8 HxW / HxWx3 array) as RGB uint8 [H, W, 3] at its own size: resizing is part of the
    model's pre-processing (:mod:`hashdistill.preprocessing`), never done here."""
    return rgb_pixels(item if isinstance(item, np.ndarray) else read_rgb(item))


def decode_batches(items: Sequence[ImageLike], batch_size: int) -> Iterator[tuple[slice, np.ndarray]]:
    """Decoded images stacked into uint8 [N, H, W, 3] batches of equal size, in order, with their positions."""
    pixels = [decode(item) for item in items]
    for run in same_shape_runs([p.shape for p in pixels], batch_size):
        yield run, np.stack(pixels[run])


def scan_folder(folder: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image paths, labels and class names: class sub-folders give labels, a plain folder gives -1.

    Damaged files are skipped and counted (the rule of :mod:`hashdistill.imagefiles`).
    """
    paths, labels, classes, _ = scan_image_files(folder, allow_unlabelled=True)
    return paths, np.array(labels, dtype=np.int64), classes
