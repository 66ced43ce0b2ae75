"""How a dataset's images are split: the validation carve-out and test limits use one fixed seed.

The seed is independent of the recipe's, so model selection never sees the test set and every run of every
recipe carves the same validation images.
"""

from __future__ import annotations

import numpy as np

from hashdistill.errors import UserError
from hashdistill.recipe import DataConfig

SPLITS = ("train", "val", "test", "ood_val", "ood_test")
SPLIT_SEED = 1234


def train_or_val(index: np.ndarray, split: str, val_fraction: float) -> np.ndarray:
    order = np.random.default_rng(SPLIT_SEED).permutation(len(index))
    n_val = max(1, int(round(len(index) * val_fraction)))
    chosen = order[:n_val] if split == "val" else order[n_val:]
    return np.sort(index[chosen])


def check_classes(cfg: DataConfig, in_classes: list[int], num_classes: int) -> None:
    for name, classes in (("data.in_classes", in_classes), ("data.ood_classes", cfg.ood_classes)):
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise UserError(f"recipe field '{name}': class {bad[0]} does not exist; "
                            f"{cfg.dataset} has classes 0..{num_classes - 1}")
