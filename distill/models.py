"""Hash models: the LLC teacher, timm students, and the float baseline, all built by name.

Every hash model maps a normalised image batch to real-valued code logits ``z`` of shape
(B, k); the binary code is ``sign(z)`` with sign(0) = +1. Each carries the ±1 class codebook it
decodes with (``class_codes``), so evaluation, quantization and export need nothing else.
A model is rebuilt from its checkpoint metadata with :func:`build_from_meta`, which is why the
metadata records the timm name, bit width and class count.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from hashdistill.checkpoint import load_checkpoint, load_state_strict
from hashdistill.errors import UserError

TEACHER, STUDENT, FLOAT = "teacher", "student", "float"


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) in the forward pass (sign(0) = +1), identity gradient in the backward pass."""
    hard = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return x + (hard - x).detach()


def create_backbone(name: str, pretrained: bool = False) -> nn.Module:
    """A timm model without classifier (``num_classes=0``); a bad name is a user error."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UserError(f"unknown timm model '{name}' (see timm.list_models())") from None
        raise
    except OSError as exc:  # hub unreachable with pretrained=True
        raise UserError(f"could not fetch pretrained weights for '{name}': {exc}. Set pretrained: false "
                        "or make the Hugging Face hub reachable.") from None


class LLCTeacher(nn.Module):
    """LLC: timm backbone -> bias-free projection P to k bits, plus a latent class codebook W (L x k)."""

    def __init__(self, backbone: str, bits: int, num_classes: int, pretrained: bool = False):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained)
        self.hash_head = nn.Linear(self.backbone.num_features, bits, bias=False)
        self.codebook = nn.Parameter(torch.randn(num_classes, bits) * 0.1)

    @property
    def bits(self) -> int:
        return self.hash_head.out_features

    @property
    def class_codes(self) -> torch.Tensor:
        """C = sign(W), ±1 float (L, k), no gradient."""
        return torch.where(self.codebook.detach() >= 0, 1.0, -1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hash_head(self.backbone(x))

    def class_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Phase 1 logits z · sign(W)^T, with the straight-through estimator on sign."""
        return z @ sign_ste(self.codebook).t()


class HashStudent(nn.Module):
    """Any timm backbone plus a linear hash head to the teacher's k bits, decoding with its codebook."""

    def __init__(self, backbone: str, bits: int, num_classes: int, pretrained: bool = False):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained)
        self.hash_head = nn.Linear(self.backbone.num_features, bits)
        self.register_buffer("codes", torch.ones(num_classes, bits))

    @property
    def bits(self) -> int:
        return self.hash_head.out_features

    @property
    def class_codes(self) -> torch.Tensor:
        return self.codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hash_head(self.backbone(x))

    def class_logits(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.codes.t()


class FloatClassifier(nn.Module):
    """The float baseline: the same backbone with a plain linear classifier (cross-entropy)."""

    def __init__(self, backbone: str, num_classes: int, pretrained: bool = False):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained)
        self.classifier = nn.Linear(self.backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


def model_meta(kind: str, arch: str, bits: int | None, data_info: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The metadata a checkpoint needs to rebuild its model and decode its codes."""
    from hashdistill import __version__

    return {"kind": kind, "arch": arch, "bits": bits, "num_classes": len(data_info["class_names"]),
            **data_info, "hashdistill_version": __version__, **extra}


def build_from_meta(meta: dict[str, Any]) -> nn.Module:
    """An untrained model of the architecture a checkpoint's metadata describes (no hub access)."""
    kind, arch = meta.get("kind"), meta.get("arch")
    try:
        num_classes = int(meta["num_classes"])
        if kind == TEACHER:
            return LLCTeacher(arch, int(meta["bits"]), num_classes)
        if kind in (STUDENT, "ternary-student"):
            return HashStudent(arch, int(meta["bits"]), num_classes)
        if kind == FLOAT:
            return FloatClassifier(arch, num_classes)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"checkpoint metadata is incomplete or corrupt ({exc!r})") from None
    raise UserError(f"checkpoint kind '{kind}' is not a hashdistill model (expected teacher, student or float)")


def load_model(path: str, expect: tuple[str, ...] = (TEACHER, STUDENT, FLOAT)) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a float model from a checkpoint; mismatched tensors are a clear error, never ignored."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") not in expect:
        raise UserError(f"{path} holds a '{meta.get('kind')}' checkpoint; this command takes: {', '.join(expect)}")
    model = build_from_meta(meta)
    load_state_strict(model, tensors, path)
    return model.eval(), meta

