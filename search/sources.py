"""What an index reads: a model to encode with (ONNX file or checkpoint) and a set of images.

Images come from a folder (class sub-folders give labels, a plain folder gives label -1), a
built-in dataset split written ``name:split`` (``fashion-mnist:test``, ``digits:database`` where
``database`` = train + val, the evaluation protocol's database), or explicit paths / arrays.
Torch is imported only for checkpoints and built-in datasets; ONNX + folders stay torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from hashdistill.errors import UserError
from hashdistill.export.images import ImageLike, as_items, scan_folder
from hashdistill.imagefiles import require_regular_file
from hashdistill.recipe import DATASETS, DataConfig

BUILTIN_DATASETS = tuple(name for name in DATASETS if name != "imagefolder")
DATASET_SPLITS = ("train", "val", "test", "ood_val", "ood_test", "database")
ARRAY_PATH = "<array "  # the display path of an in-memory image: "<array 3>"; it names no file


class Encoder(Protocol):
    """A model that turns images into packed codes (``EdgeModel`` or ``CheckpointEncoder``)."""

    bits: int
    input_size: int
    training_data: dict

    def describe(self) -> dict[str, str]: ...

    def encode(self, items: Sequence[ImageLike]) -> np.ndarray: ...


@dataclass
class ImageSet:
    """Images with their labels (-1 = none), display paths and label names."""

    items: list[ImageLike]
    labels: np.ndarray
    paths: list[str]
    label_names: list[str] = field(default_factory=list)
    unreadable: int = 0  # files of a folder skipped at the scan (unreadable headers)


def open_encoder(source: str | os.PathLike, threads: int | None = None) -> Encoder:
    """An ``.onnx`` or ``.ort`` file opens with the torch-free runtime; anything else is read as a checkpoint.
    ``threads``: the model's compute threads (default: the library's own choice)."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    require_regular_file(path, "model")  # a FIFO would block the reader forever
    if path.suffix.lower() in (".onnx", ".ort"):
        from hashdistill.export.runtime import EdgeModel

        return EdgeModel(path, threads=threads)
    from hashdistill.export.torch_encoder import CheckpointEncoder

    return CheckpointEncoder(path, threads=threads)


def collect_images(images: str | os.PathLike | ImageLike | Sequence[ImageLike], encoder: Encoder,
                   data: DataConfig | None = None, quiet: bool = False) -> ImageSet:
    """Resolve a folder, a ``dataset:split`` name or explicit images into an :class:`ImageSet`; ``quiet``: the
    caller reports the files a folder's scan skipped (``ImageSet.unreadable``) with its own count.

    A file's display path is the path as given, made absolute (not resolved: a link stays a link), so that an index
    names the same file wherever it is searched from; a URI stays as it is; an array is ``<array i>``."""
    if isinstance(images, str | os.PathLike):
        if Path(images).is_dir():
            paths, labels, names, unreadable = scan_folder(images, quiet=quiet)
            absolute = [Path(p).absolute() for p in paths]
            return ImageSet(list(absolute), labels, [str(p) for p in absolute], names, unreadable)
        if not Path(images).exists():
            if ":" in str(images) and "://" not in str(images):
                return dataset_images(str(images), encoder, data)
            raise UserError(f"images not found: {images} is missing (give an image folder, an image file or a "
                            "dataset split such as digits:test)")
    items = as_items(images)
    paths = [display_path(item) if isinstance(item, str | os.PathLike) else f"{ARRAY_PATH}{i}>"
             for i, item in enumerate(items)]
    return ImageSet(items, np.full(len(items), -1, dtype=np.int64), paths)


def display_path(item: str | os.PathLike) -> str:
    """A file's path as given, made absolute; a URI (``scheme://...``) as it is."""
    text = str(item)
    return text if "://" in text else str(Path(item).absolute())


def dataset_images(spec: str, encoder: Encoder, cfg: DataConfig | None = None) -> ImageSet:
    """A built-in dataset split, built with ``cfg`` or else the default data section with the model's input
    size (and the model's root and class selection when it was trained on the same dataset)."""
    from hashdistill.data import build_dataset

    name, _, split = spec.partition(":")
    if name not in BUILTIN_DATASETS or split not in DATASET_SPLITS:
        raise UserError(f"'{spec}' is neither an image folder nor a dataset split; use a folder or one of "
                        f"{', '.join(BUILTIN_DATASETS)} with :{', :'.join(DATASET_SPLITS)} (e.g. digits:test)")
    if cfg is None:
        data = encoder.training_data if encoder.training_data.get("dataset") == name else {}
        cfg = DataConfig(dataset=name, image_size=encoder.input_size, root=data.get("root"),
                         in_classes=data.get("in_classes"), ood_classes=list(data.get("ood_classes") or []))
    if (cfg.dataset, cfg.image_size) != (name, encoder.input_size):
        raise UserError(f"'{spec}' asks for {name} at the model's input size {encoder.input_size}, but the data "
                        f"section given says {cfg.dataset} at {cfg.image_size}")
    parts = [build_dataset(cfg, s) for s in (("train", "val") if split == "database" else (split,))]
    images = np.concatenate([p.images.numpy() for p in parts])
    labels = np.concatenate([p.labels.numpy() for p in parts]).astype(np.int64)
    items = list(images[:, 0]) if images.shape[1] == 1 else list(images.transpose(0, 2, 3, 1))
    return ImageSet(items, labels, [f"{spec}#{i}" for i in range(len(items))], list(parts[0].class_names))
