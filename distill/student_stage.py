"""Distil a frozen LLC teacher into a small timm student that lives in the teacher's code space.

With no random augmentation the teacher's outputs are the same every epoch, so they are
computed once and cached: a distillation epoch then costs about a student-only epoch. With
augmentation or mixup on, the teacher runs online on exactly the batch the student sees.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from hashdistill.checkpoint import save_checkpoint
from hashdistill.data import UNLABELLED, batch_augmentation, build_dataset, labelled_only, loader_workers
from hashdistill.errors import UserError
from hashdistill.evaluate import torch_encoder, validation_accuracy
from hashdistill.recipe import Recipe, StudentConfig
from hashdistill.rundir import RunDir
from hashdistill.trainer import TrainTask, barrier, fit, is_main_process
from hashdistill.untrusted import short

from .losses import NEEDS_TEACHER, LossInputs, weighted_loss
from .models import STUDENT, TEACHER, HashStudent, load_model, model_meta, probe_forward

LABELS_ONLY = {"code_bce": 1.0}
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


def train_student(recipe: Recipe, run: RunDir, device: torch.device, teacher_path: str | Path,
                  labels_only: bool = False, name: str = "student") -> Path:
    """Distil (or, with ``labels_only``, train on the teacher's class codes only); returns the checkpoint."""
    cfg, data = recipe.student, recipe.data
    teacher, teacher_meta = load_model(str(teacher_path), expect=(TEACHER,))
    check_same_data(teacher_meta, recipe, teacher_path)
    teacher.to(device).eval().requires_grad_(False)
    train, val = build_dataset(data, "train"), build_dataset(data, "val")
    if labels_only:  # the baseline learns from what it has labels for; a distilled student sees every image
        train = labelled_only(train)
    torch.manual_seed(recipe.seed)
    student = build_student(cfg, teacher, data.image_size)
    weights = LABELS_ONLY if labels_only else cfg.losses
    batch_loss = distillation_batch_loss(student, teacher, weights, cfg, train, device, data.eval_batch_size)
    record = fit(TrainTask(name, student, [{"params": list(student.parameters())}], cfg.train, IndexedDataset(train),
                           batch_loss, data.batch_size, loader_workers(data),
                           lambda m: validation_accuracy(m, val, device, data.eval_batch_size), "val_mhd_accuracy",
                           augment=batch_augmentation(train)),
                 run, device, recipe.seed)
    path = run.checkpoint(name)
    if is_main_process():
        meta = model_meta(STUDENT, cfg.model, teacher.bits,
                          {k: teacher_meta[k] for k in PREPROCESSING_KEYS if k in teacher_meta},
                          arch_kwargs=cfg.model_kwargs, data=dataclasses.asdict(data), recipe_hash=recipe.digest(),
                          training={name: record, "losses": weights, "temperature": cfg.temperature,
                                    "teacher": str(teacher_path)})
        save_checkpoint(path, student.state_dict(), meta)
    barrier()
    return path


def mix_images(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup within a batch: each image blended with another (weight ~ Beta(alpha, alpha), one per batch, from
    torch's RNG, so a resumed epoch replays it). The mix keeps a label only where both images had the same one;
    elsewhere it is unlabelled, and only the teacher's codes of the mixed image teach it."""
    weight = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = torch.randperm(len(x), device=x.device)
    same = y == y[partner]
    return weight * x + (1 - weight) * x[partner], torch.where(same, y, torch.full_like(y, UNLABELLED))


def distillation_batch_loss(student: HashStudent, teacher: nn.Module, weights: dict[str, float], cfg: StudentConfig,
                            train: Dataset, device: torch.device, eval_batch_size: int):
    """The trainer's ``batch_loss`` for distillation: cached teacher logits unless the images change from epoch
    to epoch (augmentation, mixup); then the teacher runs online on exactly the student's view."""
    loss = weighted_loss(weights)
    needs_teacher = bool(NEEDS_TEACHER & {n for n, w in weights.items() if w > 0})
    online = getattr(train, "augment", False) or cfg.mixup > 0
    cache = None
    if needs_teacher and not online:
        cache = torch.from_numpy(torch_encoder(teacher, device, eval_batch_size)(train)).to(device)

    def batch_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y, index = batch
        if cfg.mixup > 0:
            x, y = mix_images(x, y, cfg.mixup)
        z_t = None
        if needs_teacher:
            if cache is not None:
                z_t = cache[index]
            else:
                with torch.no_grad():
                    z_t = teacher(x).float()
        return loss(LossInputs(model(x).float(), z_t, y, student.codes, cfg.temperature, cfg.dsh_margin))

    return batch_loss
