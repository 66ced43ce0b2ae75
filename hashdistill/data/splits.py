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
UNLABELLED = -1  # the label of a training image whose label is held back (data.labelled_fraction)


def train_or_val(index: np.ndarray, split: str, val_fraction: float) -> np.ndarray:
    order = np.random.default_rng(SPLIT_SEED).permutation(len(index))
    n_val = max(1, int(round(len(index) * val_fraction)))
    chosen = order[:n_val] if split == "val" else order[n_val:]
    return np.sort(index[chosen])


def labelled_choice(pool_labels: np.ndarray, fraction: float) -> np.ndarray:
    """Which images of the train + val pool keep their labels: ``fraction`` of each class (at least one), drawn
    with a fixed seed, so the teacher, the students and the labels-only baseline of every run see the same ones."""
    keep = np.zeros(len(pool_labels), dtype=bool)
    if fraction >= 1:
        keep[:] = True
        return keep
    rng = np.random.default_rng(SPLIT_SEED + 1)
    for label in np.unique(pool_labels):
        members = np.flatnonzero(pool_labels == label)
        count = max(1, int(round(len(members) * fraction)))
        keep[rng.choice(members, count, replace=False)] = True
    return keep


def hold_back_labels(pool: np.ndarray, pool_labels: np.ndarray, index: np.ndarray, split: str, fraction: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(index, labelled)`` of one split of the pool under ``data.labelled_fraction``: the validation split keeps
    its labelled images only (model selection sees no more labels than training); the training split keeps every
    image, ``labelled`` marking those whose label may be used."""
    labelled = np.isin(index, pool[labelled_choice(pool_labels, fraction)])
    if split == "val":
        return index[labelled], labelled[labelled]
    return index, labelled


def carve_split(index: np.ndarray, labels: np.ndarray, split: str, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(index, labelled)`` of ``split`` among the candidate images ``index`` (positions into ``labels``): the
    train/val carve-out, the held-back labels (:func:`hold_back_labels`) and the recipe's size limit, the same
    for every source (in memory or image folders)."""
    labelled = np.ones(len(index), dtype=bool)
    if split in ("train", "val"):
        pool, index = index, train_or_val(index, split, cfg.val_fraction)
        index, labelled = hold_back_labels(pool, labels[pool], index, split, cfg.labelled_fraction)
    limit = cfg.train_limit if split in ("train", "val", "ood_val") else cfg.test_limit
    if limit is not None and len(index) > limit:
        chosen = np.sort(np.random.default_rng(SPLIT_SEED).choice(len(index), limit, replace=False))
        index, labelled = index[chosen], labelled[chosen]
    return index, labelled


def check_classes(cfg: DataConfig, in_classes: list[int], num_classes: int) -> None:
    for name, classes in (("data.in_classes", in_classes), ("data.ood_classes", cfg.ood_classes)):
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise UserError(f"recipe field '{name}': class {bad[0]} does not exist; "
                            f"{cfg.dataset} has classes 0..{num_classes - 1}")
