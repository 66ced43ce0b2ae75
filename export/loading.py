"""Load any exportable checkpoint (teacher, student or ternary student) as a ready-to-run model."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from hashdistill.checkpoint import load_checkpoint, read_metadata
from hashdistill.distill.models import STUDENT, TEACHER, TERNARY, build_checked, load_model
from hashdistill.errors import UserError
from hashdistill.quantize.ternary_checkpoint import load_ternary_into
from hashdistill.untrusted import short

EXPORTABLE = (TEACHER, STUDENT, TERNARY)


def load_any_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """A hash model in eval mode and its metadata; a float baseline or foreign file is a UserError."""
    kind = read_metadata(path).get("kind")
    if kind in (TEACHER, STUDENT):
        return load_model(str(path), expect=(TEACHER, STUDENT))
    if kind == TERNARY:
        tensors, meta = load_checkpoint(path)
        model = load_ternary_into(build_checked(meta, tensors, path, ternary=True), tensors, meta)
        return model.eval(), meta
    raise UserError(f"{path} holds a {short(kind)} checkpoint; only {', '.join(EXPORTABLE)} checkpoints produce "
                    "binary codes and can be exported or indexed")
