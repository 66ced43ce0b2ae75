"""Code logits of an exported model over the evaluation splits: the ONNX side of the one evaluation path
(:mod:`hashdistill.evaluate` takes any encoder; this one reads decoded pixels through the file's own input)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from hashdistill.evaluate import Encoder

from .runtime import EdgeModel


def onnx_encoder(path: str, batch_size: int = 256) -> Encoder:
    """Code logits of an exported model on each split's decoded pixels, through the file's own input: the
    pre-processing in its graph (image-in) or the runtime's copy of it (float-input)."""
    edge = EdgeModel(path, batch_size=batch_size)

    def encode(dataset: Dataset) -> np.ndarray:
        chunks = [edge.logits(pixels) for pixels in _pixel_chunks(dataset, batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, edge.bits), np.float32)

    return encode


def _pixel_chunks(dataset: Dataset, size: int) -> Iterator[list[np.ndarray]]:
    """Decoded uint8 images of a dataset (or a ConcatDataset of them), ``size`` at a time."""
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    for part in parts:
        for start in range(0, len(part), size):
            yield [part.pixels(i) for i in range(start, min(start + size, len(part)))]
