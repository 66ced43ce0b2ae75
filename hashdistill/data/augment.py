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

    Every shifted window of the padded batch is a view (``unfold``); one gather picks each image's window, with no
    host sync on a GPU and no per-shift loop on a CPU (3x faster there than slicing each group of equal shifts).
    """
    b = images.shape[0]
    h, w = images.shape[-2:]
    device = images.device
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (b,), device=device)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), device=device)
    flip = torch.rand(b, device=device) < 0.5
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # [B, C, 2s+1, 2s+1, H, W], a view
    shifted = windows[torch.arange(b, device=device), :, dy, dx]
    return torch.where(flip[:, None, None, None], shifted.flip(-1), shifted)


def batch_augmentation(dataset: Dataset) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the trainer applies to each training batch of ``dataset`` on the device (None: nothing): for an
    augmented in-memory split, :func:`random_shift_flip` on its uint8 pixels, then its normalisation. Image folders
    augment each image as it is decoded (timm's transforms), so their batches get none here."""
    if isinstance(dataset, ImageTensorDataset) and dataset.augment:
        return functools.partial(_shift_flip_normalise, dataset)
    return None


def _shift_flip_normalise(dataset: ImageTensorDataset, pixels: torch.Tensor) -> torch.Tensor:
    return dataset.normalise(random_shift_flip(pixels))
