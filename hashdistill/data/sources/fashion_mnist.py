"""Fashion-MNIST from its four idx files (Debian's dataset-fashion-mnist package by default)."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hashdistill.errors import UserError
from hashdistill.recipe import DataConfig

from ..tensors import RawImages

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "~/.cache/hashdistill/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def load_fashion_mnist(cfg: DataConfig) -> RawImages:
    folders = [Path(cfg.root).expanduser()] if cfg.root else [Path(p).expanduser() for p in FASHION_MNIST_DIRS]
    for folder in folders:
        if (folder / "train-images-idx3-ubyte.gz").is_file() or (folder / "train-images-idx3-ubyte").is_file():
            return RawImages(
                _read_idx(folder, "train-images-idx3-ubyte")[:, None], _read_idx(folder, "train-labels-idx1-ubyte"),
                _read_idx(folder, "t10k-images-idx3-ubyte")[:, None], _read_idx(folder, "t10k-labels-idx1-ubyte"),
                FASHION_MNIST_CLASSES, (0.286,) * 3, (0.353,) * 3)
    raise UserError(
        "Fashion-MNIST not found; looked in: " + ", ".join(map(str, folders))
        + ". Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or put the four idx files "
        "(train-images-idx3-ubyte.gz, ...) in a folder and set data.root to it.")


def _read_idx(folder: Path, stem: str) -> np.ndarray:
    path = folder / f"{stem}.gz"
    opener: Callable = gzip.open
    if not path.is_file():
        path, opener = folder / stem, open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an idx file of unsigned bytes")
        shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape).copy()
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise UserError(f"{path}: corrupt or unreadable idx file ({exc})") from None
