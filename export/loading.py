"""Load any exportable checkpoint (teacher, student or ternary student) as a ready-to-run model."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from hashdistill.checkpoint import load_checkpoint, read_metadata
from hashdistill.distill.models import STUDENT, TEACHER, TERNARY, build_from_meta, check_class_codebook, load_model
from hashdistill.errors import UserError
from hashdistill.quantize.ternary_checkpoint import load_ternary_into

EXPORTABLE = (TEACHER, STUDENT, TERNARY)


def load_any_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """A hash model in eval mode and its metadata; a float baseline or foreign file is a UserError."""
    kind = read_metadata(path).get("kind")
    if kind in (TEACHER, STUDENT):
        return load_model(str(path), expect=(TEACHER, STUDENT))
    if kind == TERNARY:
        tensors, meta = load_checkpoint(path)
        check_class_codebook(meta, tensors, path)  # before a model of the recorded size is built
        model = load_ternary_into(build_from_meta(meta), tensors, meta)
        return model.eval(), meta
    raise UserError(f"{path} holds a '{kind}' checkpoint; only {', '.join(EXPORTABLE)} checkpoints produce "
                    "binary codes and can be exported or indexed")
