"""Shared artefacts for the export, runtime and index tests: small untrained checkpoints and their exports.

Built once per test session (cached on the session's base temp folder): untrained timm ``test_resnet`` /
``test_vit`` models are enough for parity, size and round-trip tests, and keep the suite fast.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from hashdistill.checkpoint import save_checkpoint
from hashdistill.data import dataset_info
from hashdistill.distill.models import FLOAT, STUDENT, TEACHER, FloatClassifier, HashStudent, LLCTeacher, model_meta
from hashdistill.export.verify import export_checkpoint
from hashdistill.quantize.ternary_checkpoint import save_ternary
from hashdistill.quantize.ttq import ternarize_
from hashdistill.recipe import DataConfig

BITS = 16
DATA = DataConfig(dataset="synthetic", image_size=16)


@dataclass(frozen=True)
class Checkpoints:
    root: Path
    teacher: Path
    student: Path
    ternary: Path
    float_baseline: Path


@functools.cache
def checkpoints(root: Path) -> Checkpoints:
    """Teacher (test_resnet), student and ternary student (test_vit), float baseline, on synthetic data."""
    root.mkdir(parents=True, exist_ok=True)
    info = dataset_info(DATA)
    extra = {"data": dataclasses.asdict(DATA), "recipe_hash": "0123456789abcdef"}
    torch.manual_seed(0)
    teacher = LLCTeacher("test_resnet", BITS, len(info["class_names"]))
    save_checkpoint(root / "teacher.safetensors", teacher.state_dict(),
                    model_meta(TEACHER, "test_resnet", BITS, info, **extra))
    student = HashStudent("test_vit", BITS, len(info["class_names"]))
    student.codes.copy_(teacher.class_codes)
    student_meta = model_meta(STUDENT, "test_vit", BITS, info, **extra)
    save_checkpoint(root / "student.safetensors", student.state_dict(), student_meta)
    ternarize_(student)
    save_ternary(root / "ternary.safetensors", student, {**student_meta, "kind": "ternary-student"})
    baseline = FloatClassifier("test_resnet", len(info["class_names"]))
    save_checkpoint(root / "float.safetensors", baseline.state_dict(),
                    model_meta(FLOAT, "test_resnet", None, info, **extra))
    return Checkpoints(root, root / "teacher.safetensors", root / "student.safetensors", root / "ternary.safetensors",
                       root / "float.safetensors")


def exported(root: Path, which: str, opset: int = 18) -> tuple[Path, dict]:
    """Export one of the checkpoints (verified on the synthetic test split); returns the path and figures."""
    return _exported(root, which, opset)


@functools.cache
def _exported(root: Path, which: str, opset: int) -> tuple[Path, dict]:
    source = getattr(checkpoints(root), which)
    out = root / f"{which}-opset{opset}.onnx"
    return out, export_checkpoint(source, out, opset=opset)
