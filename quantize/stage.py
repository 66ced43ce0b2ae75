"""The quantize stage: ternarize a student checkpoint and fine-tune it under the distillation loss.

Scales (Wp, Wn, trained as logarithms so they stay positive) and latent weights get their own learning
rates (``quantize.scale_lr`` and ``quantize.train.lr``); the rest of the student keeps training at
``quantize.train.lr``. The teacher is the one recorded in the student's checkpoint unless another is
given; without any teacher the fine-tuning falls back to the supervised code loss, and the report says so.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from hashdistill.checkpoint import read_metadata
from hashdistill.data import batch_augmentation, build_dataset, loader_workers
from hashdistill.distill.losses import NEEDS_TEACHER
from hashdistill.distill.models import STUDENT, TEACHER, TERNARY, load_model
from hashdistill.distill.student_stage import (
    IndexedDataset,
    check_same_data,
    distillation_batch_loss,
    student_training_set,
    teacher_cache_for,
)
from hashdistill.distill.teacher_cache import CACHE_FILE
from hashdistill.errors import UserError
from hashdistill.evaluate import validation_accuracy
from hashdistill.recipe import Recipe
from hashdistill.rundir import RunDir
from hashdistill.trainer import TrainTask, barrier, fit, is_main_process

from .ternary_checkpoint import save_ternary
from .ttq import TTQConfig, latent_parameters, layer_report, scale_parameters, ternarize_


def ttq_config(recipe: Recipe) -> TTQConfig:
    q = recipe.quantize
    return TTQConfig(threshold=q.threshold, target_sparsity=q.target_sparsity, scope=q.scope, include=tuple(q.include),
                     exclude=tuple(q.exclude), scale_init=q.scale_init, min_weights=q.min_weights)


def quantize_student(student_path: str | Path, out_path: str | Path, recipe: Recipe, run: RunDir,
                     device: torch.device, teacher_path: str | Path | None = None) -> dict[str, Any]:
    """Ternarize + fine-tune; writes the packed ternary checkpoint and returns the layer report."""
    student, meta = load_model(str(student_path), expect=(STUDENT,))
    check_same_data(meta, recipe, student_path)
    quantized = ternarize_(student, ttq_config(recipe))
    teacher, weights, teacher_path = _teacher_and_losses(meta, recipe, teacher_path)
    cfg, data = recipe.quantize, recipe.data
    train, val = student_training_set(recipe), build_dataset(data, "val")
    scales, latent = scale_parameters(student), latent_parameters(student)
    special = {id(p) for p in scales + latent}
    rest = [p for p in student.parameters() if id(p) not in special]
    groups = [{"params": latent}, {"params": scales, "lr": cfg.scale_lr, "weight_decay": 0.0}, {"params": rest}]
    cache = None
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
        cache = teacher_cache_for(recipe, train, teacher_path, weights, run, device)  # the student's, in a pipeline
    batch_loss = distillation_batch_loss(student, teacher, weights, recipe.student, cache)
    record = fit(TrainTask("quantize", student, groups, cfg.train, IndexedDataset(train), batch_loss,
                           data.batch_size, loader_workers(data),
                           lambda m: validation_accuracy(m, val, device, data.eval_batch_size), "val_mhd_accuracy",
                           augment=batch_augmentation(train), identity=recipe.stage_digest("quantize")),
                 run, device, recipe.seed)
    report = {"layers": layer_report(student), "quantized": quantized, "losses": weights,
              "teacher": str(teacher_path or meta.get("training", {}).get("teacher")) if teacher else None,
              "training": record, "config": dataclasses.asdict(recipe.quantize)}
    if is_main_process():
        if cache is not None:
            cache.save(run.checkpoint(CACHE_FILE))
        save_ternary(out_path, student.cpu(), {**meta, "kind": TERNARY, "quantize": report,
                                               "source_checkpoint": str(student_path),
                                               "stage_digest": recipe.stage_digest("quantize")})
    barrier()
    return report


def _teacher_and_losses(meta: dict[str, Any], recipe: Recipe, teacher_path: str | Path | None):
    """The teacher to distil from, the loss weights and the teacher's path; no teacher means the code loss alone."""
    path = teacher_path or meta.get("training", {}).get("teacher")
    weights = dict(recipe.student.losses)
    if path and Path(path).is_file():
        teacher_meta = read_metadata(path)
        if teacher_meta.get("bits") != meta.get("bits"):
            raise UserError(f"teacher {path} has {teacher_meta.get('bits')} bits, the student {meta.get('bits')}")
        teacher, _ = load_model(str(path), expect=(TEACHER,))
        return teacher, weights, path
    if teacher_path:
        raise UserError(f"teacher checkpoint not found: {teacher_path}")
    if NEEDS_TEACHER & {n for n, w in weights.items() if w > 0}:
        weights = {"code_bce": 1.0}
    return None, weights, None
