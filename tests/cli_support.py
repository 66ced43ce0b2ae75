"""Helpers shared by the bad-input tests: the checkpoints they damage and the check every refusal must pass."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from test_export_support import DATA, checkpoints

from hashdistill.app.cli import main
from hashdistill.checkpoint import load_checkpoint, save_checkpoint
from hashdistill.data import dataset_info
from hashdistill.distill.models import TEACHER, LLCTeacher, model_meta
from hashdistill.recipe import DataConfig


def build_arts(tmp_path_factory) -> dict[str, Path]:
    """The export tests' untrained 16-bit checkpoints, plus an 8-bit teacher and one of another dataset."""
    ckpts = checkpoints(tmp_path_factory.getbasetemp() / "export-artefacts")
    folder = tmp_path_factory.mktemp("other-checkpoints")
    info = dataset_info(DATA)
    torch.manual_seed(0)
    teacher8 = folder / "teacher8.safetensors"
    save_checkpoint(teacher8, LLCTeacher("test_resnet", 8, 4).state_dict(),
                    model_meta(TEACHER, "test_resnet", 8, info, data=dataclasses.asdict(DATA)))
    digits = folder / "digits-teacher.safetensors"
    save_checkpoint(digits, LLCTeacher("test_resnet", 16, 4).state_dict(),
                    model_meta(TEACHER, "test_resnet", 16, info, data=dataclasses.asdict(DataConfig(dataset="digits"))))
    return {"teacher": ckpts.teacher, "student": ckpts.student, "ternary": ckpts.ternary,
            "float": ckpts.float_baseline, "teacher8": teacher8, "digits_teacher": digits}


def listing(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def refused(capsys, workdir: Path, *args: str | Path, expect: str) -> str:
    """Run the CLI, expect exit code 2 with one line naming ``expect``, and ``workdir`` untouched."""
    before = listing(workdir)
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    assert code == 2, out
    err = out.err
    assert err.startswith("hashdistill: error: ") and err.count("\n") == 1, err
    assert expect in err, err
    assert listing(workdir) == before, "partial output left behind"
    return err


def variant(arts, tmp_path: Path, name: str, **meta_changes) -> Path:
    tensors, meta = load_checkpoint(arts[name])
    path = tmp_path / f"{name}-variant.safetensors"
    save_checkpoint(path, tensors, {**meta, **meta_changes})
    return path


