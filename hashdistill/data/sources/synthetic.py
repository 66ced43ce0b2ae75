"""Synthetic blob patterns: learnable in seconds, for tests."""

from __future__ import annotations

import numpy as np

from hashdistill.recipe import DataConfig

from ..tensors import RawImages


def load_synthetic(cfg: DataConfig) -> RawImages:
    """Four classes of noisy blob patterns on a 16x16 canvas: learnable in seconds, for tests."""
    rng = np.random.default_rng(7)
    templates = rng.random((4, 4, 4)) > 0.5
    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 4, n)
        base = np.kron(templates[labels], np.ones((4, 4))) * 200.0
        noisy = base + rng.normal(0, 40, base.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8)[:, None], labels.astype(np.int64)
    tr_x, tr_y = sample(400)
    te_x, te_y = sample(120)
    return RawImages(tr_x, tr_y, te_x, te_y, ["a", "b", "c", "d"], (0.4,) * 3, (0.4,) * 3)
