"""Distil a frozen LLC teacher into a small timm student that lives in the teacher's code space.

Consistent teaching: the teacher codes exactly the view the student trains on. Its logits of every training
view are computed once and looked up (:mod:`.teacher_cache`), so a distillation step costs what a labels-only
step costs; only mixup, whose blends are never the same twice, and an image folder's free augmentation without
a view bank run the teacher online.

The labels-only baselines (``labels_only``) train on the labelled images alone, with no teacher at run time:
``codes`` regresses the teacher's class codes (BCE, so it still learns in the teacher's code space), ``dsh`` is
the DTH paper's baseline, the DSH pairwise loss on the labels (its codes live in a space of their own).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from hashdistill.checkpoint import read_metadata, save_checkpoint
from hashdistill.data import (
    UNLABELLED,
    VIEW_INDEX,
    ImageFileDataset,
    batch_augmentation,
    build_dataset,
    labelled_only,
    loader_workers,
)
from hashdistill.errors import UserError
from hashdistill.evaluate import validation_accuracy
from hashdistill.recipe import Recipe, StudentConfig
from hashdistill.rundir import RunDir
from hashdistill.trainer import TrainTask, barrier, fit, is_main_process
from hashdistill.untrusted import short

from .losses import NEEDS_TEACHER, LossInputs, weighted_loss
from .models import STUDENT, TEACHER, HashStudent, load_model, model_meta, probe_forward
from .teacher_cache import CACHE_FILE, TeacherViewCache, open_cache, training_views

BASELINES = {"codes": {"code_bce": 1.0}, "dsh": {"dsh": 1.0}}  # labels-only students: their losses
BASELINE_STAGES = {"codes": "student-labels-only", "dsh": "student-dsh"}  # their checkpoint names
SELECT = "val_map_tie_aware"  # students are kept at their best validation mAP
PREPROCESSING_KEYS = ("class_names", "mean", "std", "input_size", "crop_pct")  # what the student inherits


class IndexedDataset(Dataset):
    """Adds each item's index, so a batch can look up the cached teacher logits."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return (*self.base[index], index)

    def get_batch(self, indices: list[int]) -> list[torch.Tensor]:
        """A collated batch: the base's own batched fetch where it has one, then the indices."""
        fetch = getattr(self.base, "get_batch", None)
        batch = fetch(indices) if fetch else default_collate([self.base[i] for i in indices])
        return [*batch, torch.as_tensor(indices, dtype=torch.long)]


def build_student(cfg: StudentConfig, teacher: nn.Module, image_size: int) -> HashStudent:
    """A student with the teacher's bit width and a copy of its class codebook.

    Its timm arguments are tried on a meta-device copy first, so one that timm accepts but that fails at the
    first batch (e.g. ``in_chans: 5``) is a recipe error before any training starts.
    """
    classes = teacher.class_codes.shape[0]
    with torch.device("meta"):
        skeleton = HashStudent(cfg.model, teacher.bits, classes, False, cfg.model_kwargs)
    probe_forward(skeleton, image_size, f"student '{cfg.model}' with model_kwargs {short(cfg.model_kwargs)}")
    student = HashStudent(cfg.model, teacher.bits, classes, cfg.pretrained, cfg.model_kwargs, cfg.weights)
    student.codes.copy_(teacher.class_codes)
    return student


def check_same_data(meta: dict, recipe: Recipe, path: str | Path) -> None:
    """A teacher trained on other classes or another dataset cannot supervise this recipe."""
    teacher_data = meta.get("data", {})
    for key in ("dataset", "in_classes", "ood_classes", "image_size"):
        if teacher_data.get(key) != getattr(recipe.data, key):
            raise UserError(f"teacher {path} was trained with data.{key}={teacher_data.get(key)!r}, "
                            f"but this recipe has {getattr(recipe.data, key)!r}")


def student_training_set(recipe: Recipe, labels_only: str | None = None) -> Dataset:
    """The training split a student learns from: every image for a distilled student, the labelled ones for a
    baseline (repeated to the same epoch length); an augmented image folder limited to ``student.teacher_views``
    fixed views per image, so that every student, distilled or not, sees the same views and the teacher's codes of
    each are computed once."""
    train = build_dataset(recipe.data, "train")
    if isinstance(train, ImageFileDataset) and train.augment:
        train = train.with_view_bank(recipe.student.teacher_views)
    if not labels_only:
        return train
    labelled = labelled_only(train)
    # The labelled images repeated to the length of the whole split: a baseline's epoch is as many steps as the
    # distilled student's, so students of one recipe compare at equal steps, schedule and validations.
    repeats = round(len(train) / len(labelled))
    return labelled.subset(np.tile(np.arange(len(labelled)), repeats)) if repeats > 1 else labelled


def train_student(recipe: Recipe, run: RunDir, device: torch.device, teacher_path: str | Path,
                  labels_only: str | None = None, name: str = "student") -> Path:
    """Distil, or with ``labels_only`` (a name of :data:`BASELINES`) train a labels-only baseline; returns the
    checkpoint."""
    if labels_only is not None and labels_only not in BASELINES:
        raise UserError(f"unknown labels-only baseline {short(labels_only)}; choose one of {', '.join(BASELINES)}")
    cfg, data = recipe.student, recipe.data
    teacher, teacher_meta = load_model(str(teacher_path), expect=(TEACHER,))
    check_same_data(teacher_meta, recipe, teacher_path)
    teacher.to(device).eval().requires_grad_(False)
    train, val = student_training_set(recipe, labels_only), build_dataset(data, "val")
    torch.manual_seed(recipe.seed)
    student = build_student(cfg, teacher, data.image_size)
    weights = BASELINES[labels_only] if labels_only else cfg.losses
    cache = teacher_cache_for(recipe, train, teacher_path, weights, run, device)
    batch_loss = distillation_batch_loss(student, teacher, weights, cfg, cache)
    record = fit(TrainTask(name, student, [{"params": list(student.parameters())}], cfg.train, IndexedDataset(train),
                           batch_loss, data.batch_size, loader_workers(data),
                           lambda m: validation_accuracy(m, val, device, data.eval_batch_size), SELECT,
                           augment=batch_augmentation(train), identity=recipe.stage_digest("student")),
                 run, device, recipe.seed)
    path = run.checkpoint(name)
    if is_main_process():
        if cache is not None:
            cache.save(run.checkpoint(CACHE_FILE))
        meta = model_meta(STUDENT, cfg.model, teacher.bits,
                          {k: teacher_meta[k] for k in PREPROCESSING_KEYS if k in teacher_meta},
                          arch_kwargs=cfg.model_kwargs, data=dataclasses.asdict(data), recipe_hash=recipe.digest(),
                          stage_digest=recipe.stage_digest("student"),
                          training={name: record, "losses": weights, "temperature": cfg.temperature,
                                    "teacher": str(teacher_path), "baseline": labels_only})
        save_checkpoint(path, student.state_dict(), meta)
    barrier()
    return path


def teacher_cache_for(recipe: Recipe, train: Dataset, teacher_path: str | Path, weights: dict[str, float],
                      run: RunDir, device: torch.device) -> TeacherViewCache | None:
    """The run's teacher cache for training on ``train`` with these losses, or None where the teacher is not
    needed or must run online (mixup, unbounded views)."""
    if not _teacher_needed(weights) or recipe.student.mixup > 0 or training_views(train) is None:
        return None
    bits = read_metadata(teacher_path).get("bits")
    return open_cache(teacher_path, train, recipe.data, bits, run, device)


def _teacher_needed(weights: dict[str, float]) -> bool:
    return bool(NEEDS_TEACHER & {n for n, w in weights.items() if w > 0})


def mix_images(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup within a batch: each image blended with another (weight ~ Beta(alpha, alpha), one per batch, from
    torch's RNG, so a resumed epoch replays it). The mix keeps a label only where both images had the same one;
    elsewhere it is unlabelled, and only the teacher's codes of the mixed image teach it."""
    weight = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = torch.randperm(len(x), device=x.device)
    same = y == y[partner]
    return weight * x + (1 - weight) * x[partner], torch.where(same, y, torch.full_like(y, UNLABELLED))


def distillation_batch_loss(student: HashStudent, teacher: nn.Module | None, weights: dict[str, float],
                            cfg: StudentConfig, cache: TeacherViewCache | None = None):
    """The trainer's ``batch_loss`` for distillation: the teacher's logits of each image's view from ``cache``
    (computed there the first time a view comes up), else the teacher online on exactly the student's input
    (mixup, unbounded augmentation). A batch is ``[images, labels, (views,) index]``."""
    loss = weighted_loss(weights)
    needs_teacher = _teacher_needed(weights)

    def batch_loss(model: nn.Module, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y, index = batch[0], batch[1], batch[-1]
        views = batch[VIEW_INDEX] if len(batch) > 3 else None
        if cfg.mixup > 0:
            x, y = mix_images(x, y, cfg.mixup)
        z_t = None
        if needs_teacher and cache is not None:
            z_t = cache.lookup(teacher, x, index, views)
        elif needs_teacher:
            with torch.no_grad():
                z_t = teacher(x).float()
        return loss(LossInputs(model(x).float(), z_t, y, student.codes, cfg.temperature, cfg.dsh_margin,
                               cfg.relation_temperature))

    return batch_loss
