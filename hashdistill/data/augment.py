"""Training augmentation as a set of named views, applied to whole batches on the training device.

An augmented training batch carries, beside its images and labels, the *view* each image was drawn as
(``batch[2]``): for the in-memory datasets one of the :data:`NUM_VIEWS` shift + flip views of
:func:`shift_flip_views`, for image folders with a view bank one of its K fixed views
(:class:`~hashdistill.data.imagefolder.ImageFileDataset`). A view names the exact pixels the student saw,
so the teacher's codes of every view can be computed once and looked up (``hashdistill.distill``'s teacher
cache) instead of running the teacher on every student step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

MAX_SHIFT = 2  # pixels: the translation range of the in-memory views, padding with the border
SHIFTS = 2 * MAX_SHIFT + 1
NUM_VIEWS = SHIFTS * SHIFTS * 2  # every (dy, dx) shift times flipped or not: 50
VIEW_INDEX = 2  # position of the view ids in an augmented training batch: [images, labels, views, ...]
Batch = list[torch.Tensor]


def random_views(count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` view ids drawn uniformly from torch's RNG on ``device`` (seeded per epoch by the trainer, so a
    resumed run replays the same views)."""
    return torch.randint(0, NUM_VIEWS, (count,), device=device)


def shift_flip_views(images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """View ``views[i]`` of each image of a batch [B, C, H, W]: view v shifts by (dy, dx) = (v // 10 - 2,
    v // 2 % 5 - 2) pixels, padding with the border, and flips horizontally when v is odd.

    Each output pixel is read from the padded batch through one flat index per image (the window's offset plus a
    straight or mirrored row-major grid), so the shift and the flip are a single ``gather``: no host sync on a GPU,
    no per-shift loop.
    """
    b, c, h, w = images.shape
    device = images.device
    views = views.to(device)
    # Row-major strides: a one-channel batch can carry channels-last ones, where the replicate pad is 20x slower.
    images = images.contiguous().view(-1).view(b, c, h, w)
    padded = F.pad(images, (MAX_SHIFT,) * 4, mode="replicate")
    dy, dx, flip = views // (2 * SHIFTS), (views // 2) % SHIFTS, (views % 2) == 1
    padded_h, padded_w = h + 2 * MAX_SHIFT, w + 2 * MAX_SHIFT
    rows = torch.arange(h, device=device).mul_(padded_w)[:, None]
    cols = torch.arange(w, device=device)
    straight, mirrored = (rows + cols).flatten(), (rows + cols.flip(0)).flatten()
    index = torch.where(flip[:, None], mirrored, straight).add_((dy * padded_w + dx)[:, None])  # [B, H*W]
    flat = padded.reshape(b, c, padded_h * padded_w)
    return flat.gather(2, index[:, None, :].expand(b, c, h * w)).view(b, c, h, w)


def random_shift_flip(images: torch.Tensor) -> torch.Tensor:
    """A random view (shift by up to MAX_SHIFT pixels + flip with probability 1/2) of each image of a batch."""
    return shift_flip_views(images, random_views(len(images), images.device))


def batch_augmentation(dataset: Dataset) -> Callable[[Batch], Batch] | None:
    """What the trainer applies to each training batch of ``dataset`` on the device (None: nothing): the
    dataset's own ``augment_batch`` when it is an augmented training split. For the in-memory datasets that makes
    each image's view (:func:`shift_flip_views` of its uint8 pixels) and normalises it; for image folders, whose
    items timm's transforms already augmented as they were decoded, it normalises the uint8 batch. The batch
    keeps its other tensors (labels, views, ...)."""
    return dataset.augment_batch if getattr(dataset, "augment", False) else None
