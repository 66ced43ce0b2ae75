"""The in-memory image sources, one file each, in one registry keyed by ``data.dataset``.

Each loader returns :class:`~hashdistill.data.tensors.RawImages` (train and test images before splitting);
results are cached per (dataset, root) for the process.
"""

from __future__ import annotations

from collections.abc import Callable

from hashdistill.recipe import DataConfig

from ..tensors import RawImages
from .cifar10 import load_cifar10
from .digits import load_digits_images
from .fashion_mnist import load_fashion_mnist
from .synthetic import load_synthetic

LOADERS: dict[str, Callable[[DataConfig], RawImages]] = {
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits_images,
    "synthetic": load_synthetic,
    "cifar10": load_cifar10,
}
_CACHE: dict[tuple, RawImages] = {}


def load_raw(cfg: DataConfig) -> RawImages:
    """The configured source's images, loaded once per process."""
    key = (cfg.dataset, cfg.root)
    if key not in _CACHE:
        _CACHE[key] = LOADERS[cfg.dataset](cfg)
    return _CACHE[key]
