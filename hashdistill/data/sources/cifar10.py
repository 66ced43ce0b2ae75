"""CIFAR-10 from torchvision's python batches, read with a numpy-only unpickler."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from hashdistill.errors import UserError
from hashdistill.recipe import DataConfig

from ..tensors import RawImages

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_cifar10(cfg: DataConfig) -> RawImages:
    folder = Path(cfg.root or "~/.cache/hashdistill").expanduser()
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    files = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"CIFAR-10 not found: {missing[0]} is missing. Download torchvision's "
                        "cifar-10-python.tar.gz, extract it and set data.root to the folder holding "
                        "cifar-10-batches-py.")
    batches = [_read_cifar_batch(f) for f in files]
    train_x = np.concatenate([b[0] for b in batches[:5]])
    train_y = np.concatenate([b[1] for b in batches[:5]])
    return RawImages(train_x, train_y, batches[5][0], batches[5][1], CIFAR10_CLASSES,
                     (0.491, 0.482, 0.447), (0.247, 0.243, 0.262))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles; allow only the numpy array constructors they need."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's protocol
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a plain CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return data, np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError, OSError) as exc:
        raise UserError(f"{path}: not a CIFAR-10 batch file ({exc})") from None
