"""Training augmentation on whole batches, on the training device (never per item in Python)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .tensors import ImageTensorDataset

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
    """What the trainer applies to each training batch of ``dataset`` on the device (None: nothing): for an
    augmented in-memory split, :func:`random_shift_flip` on its uint8 pixels, then its normalisation. Image folders
    augment each image as it is decoded (timm's transforms), so their batches get none here."""
    if isinstance(dataset, ImageTensorDataset) and dataset.augment:
        return functools.partial(_shift_flip_normalise, dataset)
    return None


def _shift_flip_normalise(dataset: ImageTensorDataset, pixels: torch.Tensor) -> torch.Tensor:
    return dataset.normalise(random_shift_flip(pixels))
