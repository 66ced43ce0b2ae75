"""Train an LLC teacher: optional float baseline, phase 1 (class codes), phase 2 (instance codes).

Model selection reads the validation split carved from train, never the test set. Under
``data.labelled_fraction`` the teacher trains on the labelled images alone. Following the
benchmark protocol, when ``teacher.float_baseline`` is set the float classifier is trained first
and the teacher starts from its backbone, so a comparison isolates the cost of binary codes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hashdistill.checkpoint import save_checkpoint
from hashdistill.data import batch_augmentation, build_dataset, dataset_info, labelled_only, loader_workers
from hashdistill.evaluate import labels_of, torch_encoder, validation_accuracy
from hashdistill.recipe import Recipe
from hashdistill.rundir import RunDir
from hashdistill.trainer import TrainTask, barrier, fit, is_main_process

from .models import FLOAT, TEACHER, FloatClassifier, LLCTeacher, model_meta

TEACHER_FILE, FLOAT_FILE = "teacher", "float-baseline"


def train_teacher(recipe: Recipe, run: RunDir, device: torch.device) -> Path:
    """Both LLC phases (after the float baseline if configured); returns the teacher checkpoint path."""
    cfg, data = recipe.teacher, recipe.data
    train, val = labelled_only(build_dataset(data, "train")), build_dataset(data, "val")
    info = dataset_info(data)
    torch.manual_seed(recipe.seed)
    teacher = LLCTeacher(cfg.backbone, cfg.bits, len(info["class_names"]), cfg.pretrained, cfg.weights)
    if cfg.float_baseline is not None and cfg.float_baseline.epochs > 0:
        baseline = train_float_baseline(recipe, run, device)
        teacher.backbone.load_state_dict(baseline.backbone.state_dict())

    def phase1_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch[:2]  # an augmented batch also carries its views
        return F.cross_entropy(teacher.class_logits(model(x)), y, label_smoothing=cfg.label_smoothing)

    def class_code_accuracy(model: nn.Module) -> dict:
        z = torch.from_numpy(torch_encoder(model, device, data.eval_batch_size)(val))
        predicted = model.class_logits(z.to(device)).argmax(1).cpu().numpy()
        return {"val_accuracy": float((predicted == labels_of(val)).mean()),
                **validation_accuracy(model, val, device, data.eval_batch_size)}

    phase1 = fit(TrainTask("teacher-phase1", teacher, [{"params": list(teacher.parameters())}], cfg.phase1, train,
                           phase1_loss, data.batch_size, loader_workers(data), class_code_accuracy, "val_accuracy",
                           augment=batch_augmentation(train), identity=recipe.stage_digest("teacher")),
                 run, device, recipe.seed)

    teacher.codebook.requires_grad_(False)
    class_targets = (teacher.class_codes.to(device) + 1) / 2

    def phase2_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch[:2]  # an augmented batch also carries its views
        return F.binary_cross_entropy_with_logits(model(x), class_targets[y])

    trainable = [p for p in teacher.parameters() if p.requires_grad]
    phase2 = fit(TrainTask("teacher-phase2", teacher, [{"params": trainable}], cfg.phase2, train, phase2_loss,
                           data.batch_size, loader_workers(data),
                           lambda m: validation_accuracy(m, val, device, data.eval_batch_size), "val_mhd_accuracy",
                           augment=batch_augmentation(train), identity=recipe.stage_digest("teacher")),
                 run, device, recipe.seed)
    path = run.checkpoint(TEACHER_FILE)
    if is_main_process():
        meta = model_meta(TEACHER, cfg.backbone, cfg.bits, info, data=dataclasses.asdict(data),
                          recipe_hash=recipe.digest(), stage_digest=recipe.stage_digest("teacher"),
                          training={"phase1": phase1, "phase2": phase2})
        save_checkpoint(path, teacher.state_dict(), meta)
    barrier()
    return path


def train_float_baseline(recipe: Recipe, run: RunDir, device: torch.device) -> FloatClassifier:
    """The same backbone with a linear classifier and plain cross-entropy (the benchmark's reference)."""
    cfg, data = recipe.teacher, recipe.data
    train, val = labelled_only(build_dataset(data, "train")), build_dataset(data, "val")
    info = dataset_info(data)
    torch.manual_seed(recipe.seed)
    model = FloatClassifier(cfg.backbone, len(info["class_names"]), cfg.pretrained, cfg.weights)

    def loss(m: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch[:2]  # an augmented batch also carries its views
        return F.cross_entropy(m(x), y)

    def accuracy(m: nn.Module) -> dict:
        logits = torch_encoder(m, device, data.eval_batch_size)(val)
        return {"val_accuracy": float((logits.argmax(1) == labels_of(val)).mean())}

    record = fit(TrainTask("float-baseline", model, [{"params": list(model.parameters())}], cfg.float_baseline,
                           train, loss, data.batch_size, loader_workers(data), accuracy, "val_accuracy",
                           augment=batch_augmentation(train), identity=recipe.stage_digest("float-baseline")),
                 run, device, recipe.seed)
    if is_main_process():
        meta = model_meta(FLOAT, cfg.backbone, None, info, data=dataclasses.asdict(data),
                          recipe_hash=recipe.digest(), stage_digest=recipe.stage_digest("float-baseline"),
                          training={"float": record})
        save_checkpoint(run.checkpoint(FLOAT_FILE), model.state_dict(), meta)
    return model
