"""scikit-learn's bundled digits (1,797 8x8 images, no download)."""

from __future__ import annotations

import numpy as np

from hashdistill.recipe import DataConfig

from ..tensors import RawImages


def load_digits_images(cfg: DataConfig) -> RawImages:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=0.2, random_state=0, stratify=labels)
    return RawImages(tr_x, tr_y, te_x, te_y, [str(d) for d in range(10)], (0.235,) * 3, (0.364,) * 3)
