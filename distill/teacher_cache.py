"""The teacher's code logits of every training view, each computed once: consistent teaching off the critical path.

Consistent teaching means the teacher codes exactly the view the student sees. A training view is named
(:mod:`hashdistill.data.augment`): one of the 50 shift + flip views of an in-memory image, one of the K views
of an image folder's view bank, or the image itself when the split is not augmented. The teacher's logits of a
view never change, so each is computed once: on the fly, the first time a batch holds that (image, view), from
the very tensor the student trains on, or all at once beforehand (:func:`precompute`, batched, for benchmarks
and runs that train many students of one teacher). Once every view of the batch is known, a distillation step
looks the logits up and costs what a labels-only step costs.

The logits are kept in the run directory (``checkpoints/teacher-views.safetensors``, with the mask of the views
already known) under a key made of the teacher file's hash, the data section and the view definition, so a
resumed run, and every later student of the same teacher and data, reads them back; a file with another key is
ignored and replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from hashdistill.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from hashdistill.data import ImageTensorDataset
from hashdistill.errors import UserError
from hashdistill.recipe import DataConfig
from hashdistill.rundir import RunDir

CACHE_FILE = "teacher-views"
KIND = "teacher-views"
VIEWS_VERSION = 1  # bump when the definition of a view (hashdistill.data.augment) changes
# Fields of the data section that do not change which pixels a training view holds.
_NOT_PIXELS = {"batch_size", "eval_batch_size", "num_workers", "labelled_fraction"}


class TeacherViewCache:
    """Teacher logits [N, V, k] of the N training images in V views each, and which of them are known yet."""

    def __init__(self, logits: torch.Tensor, known: torch.Tensor, key: str):
        self.logits, self.known, self.key = logits, known, key
        self.complete = bool(known.all())

    @classmethod
    def empty(cls, images: int, views: int, bits: int, key: str, device: torch.device) -> TeacherViewCache:
        return cls(torch.zeros(images, views, bits, device=device), torch.zeros(images, views, dtype=torch.bool,
                                                                               device=device), key)

    @property
    def views(self) -> int:
        return self.logits.shape[1]

    @torch.no_grad()
    def lookup(self, teacher: nn.Module, images: torch.Tensor, index: torch.Tensor, views: torch.Tensor | None
               ) -> torch.Tensor:
        """The teacher's logits of ``images`` (image ``index[i]`` in view ``views[i]``; view 0 for an unaugmented
        split), computing on the fly those not known yet. Once all are known no step looks at the mask (on a GPU
        that look waits for the device)."""
        views = torch.zeros_like(index) if views is None else views
        if not self.complete:
            missing = (~self.known[index, views]).nonzero().squeeze(1)
            if len(missing):
                rows, cols = index[missing], views[missing]
                self.logits[rows, cols] = teacher(images[missing]).float()
                self.known[rows, cols] = True
                self.complete = bool(self.known.all())
        return self.logits[index, views]

    def save(self, path: Path) -> None:
        save_checkpoint(path, {"logits": self.logits, "known": self.known},
                        {"kind": KIND, "key": self.key, "shape": list(self.logits.shape)})


def training_views(dataset: Dataset) -> int | None:
    """How many views each training image has (1 unaugmented), or None where they are unbounded (an image
    folder's free augmentation without a view bank): then the teacher has to run online."""
    return getattr(dataset, "num_views", None)


def open_cache(teacher_path: str | Path, dataset: Dataset, data: DataConfig, bits: int, run: RunDir,
               device: torch.device) -> TeacherViewCache:
    """The run's cache for this teacher, data and view definition, or an empty one."""
    views = training_views(dataset)
    if views is None:
        raise ValueError("the training views of this dataset are unbounded; give it a view bank first")
    key = cache_key(teacher_path, data, views, len(dataset))
    shape = (len(dataset), views, bits)
    stored = _read(run.checkpoint(CACHE_FILE), key, shape)
    if stored is None:
        return TeacherViewCache.empty(*shape, key, device)
    return TeacherViewCache(stored[0].to(device), stored[1].to(device), key)


def cache_key(teacher_path: str | Path, data: DataConfig, views: int, images: int) -> str:
    """What the cached logits depend on: the teacher's bytes, the pixels of every view, and their count."""
    digest = hashlib.sha256()
    with open(teacher_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    pixels = {k: v for k, v in dataclasses.asdict(data).items() if k not in _NOT_PIXELS}
    digest.update(json.dumps({"data": pixels, "views": views, "images": images, "version": VIEWS_VERSION},
                             sort_keys=True).encode())
    return digest.hexdigest()[:32]


def _read(path: Path, key: str, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(logits, known) if ``path`` holds them for ``key`` with the expected shapes, else None (start afresh)."""
    if not path.is_file():
        return None
    try:
        if read_metadata(path).get("key") != key:
            return None
        tensors, _ = load_checkpoint(path)
    except UserError:
        return None  # damaged or foreign: computed again and replaced
    logits, known = tensors.get("logits"), tensors.get("known")
    if logits is None or known is None or logits.dtype != torch.float32 or known.dtype != torch.bool or \
            tuple(logits.shape) != shape or tuple(known.shape) != shape[:2]:
        return None
    return logits, known


@torch.no_grad()
def precompute(cache: TeacherViewCache, teacher: nn.Module, dataset: Dataset, device: torch.device,
               batch_size: int, workers: int = 0) -> TeacherViewCache:
    """Fill every view the cache does not know yet, in large batches (eval mode)."""
    teacher.eval().to(device)
    todo = (~cache.known).nonzero().cpu()
    quiet = not sys.stderr.isatty()
    if isinstance(dataset, ImageTensorDataset):  # views are made on the device, a batch at a time
        for chunk in tqdm(todo.split(batch_size), desc="teacher views", disable=quiet, leave=False):
            index, views = chunk[:, 0], chunk[:, 1]
            images = dataset.training_views(dataset.images[index].to(device), views.to(device))
            cache.lookup(teacher, images, index.to(device), views.to(device))
        return cache
    loader = DataLoader(_ViewItems(dataset, todo), batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    for images, index, views in tqdm(loader, desc="teacher views", disable=quiet, leave=False):
        images = images.to(device)
        images = dataset.normalise(images) if images.dtype == torch.uint8 else images
        cache.lookup(teacher, images, index.to(device), views.to(device))
    return cache


class _ViewItems(Dataset):
    """The (image, view) pairs ``todo`` of an image folder: a bank view's uint8 pixels, or the image itself."""

    def __init__(self, dataset: Dataset, todo: torch.Tensor):
        self.dataset, self.todo = dataset, todo

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, int]:
        index, view = (int(v) for v in self.todo[item])
        pixels = self.dataset.view(index, view) if self.dataset.augment else self.dataset[index][0]
        return pixels, index, view
