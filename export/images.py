"""User images -> model input, with numpy and PIL only (the edge runtime has no torch).

An image is a file path or a uint8 array, HxW (grayscale) or HxWx3 (RGB). What follows the decoding (resize,
crop, normalise) is the model's pre-processing, which runs in ONNX. A photo bigger than the model needs is
made small one image at a time, before it meets a batch: decoded reduced (:func:`hashdistill.imagefiles.read_rgb`)
and shrunk by the graph's own resize step on the host (:meth:`EvalTransform.reduce`, exact); batches are then
bounded by a pixel budget as well as a count. Memory stays that of a few small images, whatever the photos.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from hashdistill.errors import UserError
from hashdistill.imagefiles import read_rgb, scan_image_files
from hashdistill.preprocessing import EvalTransform, rgb_pixels

ImageLike = str | os.PathLike | np.ndarray
BATCH_PIXELS = 1 << 24  # pixels a batch may hold (48 MB of uint8 RGB): 256 images at 256x256, one 4096x4096


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


def decode(item: ImageLike, transform: EvalTransform) -> np.ndarray:
    """An image (path or uint8 HxW / HxWx3 array) as the RGB uint8 [H, W, 3] pixels ``transform``'s graph takes
    for it: at its own size, or where the graph would shrink it, already shrunk by the graph's resize step."""
    return transform.reduce(rgb_pixels(item if isinstance(item, np.ndarray) else read_rgb(item)))


def decode_batches(items: Sequence[ImageLike], transform: EvalTransform, batch_size: int,
                   max_pixels: int = BATCH_PIXELS) -> Iterator[tuple[slice, np.ndarray]]:
    """Images decoded one by one (:func:`decode`) and stacked into uint8 [N, H, W, 3] batches of equal size, in
    order, with their positions: at most ``batch_size`` images and ``max_pixels`` pixels a batch (an image over
    the budget is a batch of its own), so no more than one batch of decoded images is ever held."""
    pending: list[np.ndarray] = []
    start = 0
    for i, item in enumerate(items):
        pixels = decode(item, transform)
        if pending and (pixels.shape != pending[0].shape or len(pending) == batch_size
                        or (len(pending) + 1) * pixels.shape[0] * pixels.shape[1] > max_pixels):
            yield slice(start, i), np.stack(pending)
            pending, start = [], i
        pending.append(pixels)
    if pending:
        yield slice(start, len(items)), np.stack(pending)


def scan_folder(folder: str | os.PathLike, quiet: bool = False) -> tuple[list[Path], np.ndarray, list[str], int]:
    """Image paths, labels, class names and how many files were unreadable: class sub-folders give labels, a plain
    folder gives -1. Damaged files are skipped and counted (the rule of :mod:`hashdistill.imagefiles`)."""
    paths, labels, classes, unreadable = scan_image_files(folder, allow_unlabelled=True, quiet=quiet)
    return paths, np.array(labels, dtype=np.int64), classes, unreadable
