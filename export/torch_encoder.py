"""Encode images with a PyTorch checkpoint, through the pre-processing of :mod:`hashdistill.preprocessing`
(the one the edge runtime runs in ONNX).

Used to index a database with the model itself (for example the teacher) instead of an ONNX file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hashdistill import codes
from hashdistill.errors import UserError
from hashdistill.untrusted import file_sha256

from .images import ImageLike, decode_batches
from .loading import load_any_model
from .metadata import checkpoint_transform


class CheckpointEncoder:
    """Packed codes from a checkpoint's model (CPU, eval mode), batch by batch."""

    def __init__(self, path: str | os.PathLike, batch_size: int = 64, threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.path = Path(path)
        self.model, self.meta = load_any_model(self.path)
        self.batch_size = batch_size
        self.bits = int(self.model.bits)
        self.input_size = int(self.meta["input_size"])
        data = self.meta.get("data") or {}
        if not isinstance(data, dict):
            raise UserError(f"{path}: checkpoint metadata is corrupt (its 'data' section is not a mapping)")
        self.training_data = data
        self.transform = checkpoint_transform(self.meta)

    def describe(self) -> dict[str, str]:
        """Path, kind, architecture, a hash of the checkpoint metadata and the file's sha256."""
        digest = hashlib.sha256(json.dumps(self.meta, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {"path": str(self.path.resolve()), "kind": str(self.meta.get("kind", "")),
                "arch": str(self.meta.get("arch", "")), "hash": digest, "sha256": file_sha256(self.path)}

    @torch.no_grad()
    def encode(self, items: Sequence[ImageLike]) -> np.ndarray:
        parts = [codes.pack_codes(self.model(self.transform.apply(torch.from_numpy(pixels))).float().numpy())
                 for _, pixels in decode_batches(items, self.transform, self.batch_size)]
        return np.concatenate(parts)
