"""In-memory datasets: uint8 images resized once, normalised when fetched, item by item or a batch at a time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from hashdistill.preprocessing import IN_MEMORY_CROP_PCT, EvalTransform

from .augment import NUM_VIEWS, VIEW_INDEX, random_views, shift_flip_views


@dataclass
class RawImages:
    """A dataset's images before splitting: uint8 [N, C, H, W] with integer labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 [N, C, S, S], normalised when fetched.

    ``augment`` marks a training split that trains on random shift + flip views: its :meth:`get_batch` then
    hands out the uint8 pixels and the view drawn for each image, and the trainer makes the views and normalises
    whole batches on the training device (:func:`~hashdistill.data.augment.batch_augmentation`): a quarter of the
    bytes to move and a third of the channels to shift for grayscale images, and no per-item Python work.
    :meth:`get_batch` fetches a whole batch in one indexing operation; the trainer's loader uses it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                 mean: tuple[float, ...], std: tuple[float, ...], augment: bool = False):
        self.images, self.labels, self.class_names = images, labels, class_names
        self.augment = augment
        self.transform = EvalTransform(int(images.shape[-1]), IN_MEMORY_CROP_PCT, tuple(mean), tuple(std))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.normalise(self.images[index][None])[0], int(self.labels[index])

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, S, S] (C = 1 or 3, on any device) -> normalised float [B, 3, S, S]."""
        return self.transform.normalise(pixels)

    def pixels(self, index: int) -> np.ndarray:
        """Item ``index`` as RGB uint8 [S, S, 3] (what an image-in model takes; its pre-processing is the identity
        resize and this dataset's normalisation)."""
        return np.ascontiguousarray(self.images[index].expand(3, -1, -1).permute(1, 2, 0).numpy())

    def subset(self, indices: np.ndarray) -> ImageTensorDataset:
        """The items at ``indices`` as a dataset of the same kind (same augmentation and normalisation)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return ImageTensorDataset(self.images[index], self.labels[index], self.class_names,
                                  self.transform.mean, self.transform.std, self.augment)

    def get_batch(self, indices: list[int]) -> list[torch.Tensor]:
        """A whole batch, already collated: normalised images [B, 3, S, S] and labels [B]; for an augmented split
        the uint8 pixels [B, C, S, S], the labels and a random view id per image (torch's RNG, which the trainer
        seeds per epoch), which :func:`~hashdistill.data.augment.batch_augmentation` turns into images."""
        index = torch.as_tensor(indices, dtype=torch.long)
        pixels = self.images[index]
        if not self.augment:
            return [self.normalise(pixels), self.labels[index]]
        return [pixels, self.labels[index], random_views(len(index))]

    @property
    def num_views(self) -> int:
        """How many distinct training views an image has (the shift + flip views; 1 without augmentation)."""
        return NUM_VIEWS if self.augment else 1

    def augment_batch(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        """On the training device: each image's view, normalised; the rest of the batch as it is."""
        return [self.training_views(batch[0], batch[VIEW_INDEX]), *batch[1:]]

    def training_views(self, pixels: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """View ``views[i]`` of each of the uint8 ``pixels`` [B, C, S, S], normalised: what training feeds a model
        (an unaugmented split has one view, the image itself)."""
        return self.normalise(shift_flip_views(pixels, views) if self.augment else pixels)


def resize_images(images: np.ndarray, size: int) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.shape[-1] == size and tensor.shape[-2] == size:
        return tensor
    out = []
    for chunk in tensor.split(4096):
        resized = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)
        out.append(resized.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else torch.empty((0, tensor.shape[1], size, size), dtype=torch.uint8)
