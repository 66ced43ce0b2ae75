"""Hash models: the LLC teacher, timm students, and the float baseline, all built by name.

Every hash model maps a normalised image batch to real-valued code logits ``z`` of shape
(B, k); the binary code is ``sign(z)`` with sign(0) = +1. Each carries the ±1 class codebook it
decodes with (``class_codes``), so evaluation, quantization and export need nothing else.
A model is rebuilt from its checkpoint metadata with :func:`build_checked`, which is why the
metadata records the timm name (and a student's extra timm arguments), bit width and class count.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import timm
import torch
from torch import nn

from hashdistill.checkpoint import load_checkpoint, load_state_strict
from hashdistill.errors import UserError
from hashdistill.recipe import unsafe_model_kwargs
from hashdistill.untrusted import (
    MAX_BITS,
    MAX_CLASSES,
    MAX_INPUT_SIZE,
    require_int,
    require_numbers,
    require_strings,
    short,
)

from .weights import hub_reachable, load_backbone_weights

TEACHER, STUDENT, FLOAT = "teacher", "student", "float"
TERNARY = "ternary-student"  # a student whose FC layers are ternarized (written by hashdistill.quantize)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) in the forward pass (sign(0) = +1), identity gradient in the backward pass."""
    hard = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return x + (hard - x).detach()


def create_backbone(name: str, pretrained: bool = False, model_kwargs: dict[str, Any] | None = None,
                    weights: str | None = None) -> nn.Module:
    """A timm model without classifier (``num_classes=0``); a bad name or argument is a user error.

    ``model_kwargs`` go to ``timm.create_model`` (e.g. resnet ``channels`` for a thin student); they
    may come from an untrusted checkpoint, so arguments that make timm read files are refused.
    ``weights``: a weights file on disk to start from (:mod:`.weights`); ``pretrained``: timm's hub weights,
    failing within seconds when the hub cannot be reached and the weights are not cached.
    """
    model_kwargs = model_kwargs or {}
    if not isinstance(model_kwargs, dict) or unsafe_model_kwargs(model_kwargs) or \
            not all(_is_plain_value(v) for v in model_kwargs.values()):
        raise UserError(f"timm model arguments {model_kwargs!r} are not allowed (numbers, strings, booleans or "
                        "lists of numbers only; not the ones hashdistill sets or that make timm read files)")
    if pretrained and weights:
        raise UserError(f"'{name}': give either pretrained: true (hub weights) or a weights file, not both")
    check_layer_names(model_kwargs)
    offline = pretrained and not hub_reachable()
    try:
        with _hub_offline(offline):
            backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, **model_kwargs)
    except (TypeError, ValueError, KeyError, AssertionError, AttributeError, IndexError, NotImplementedError,
            ZeroDivisionError) as exc:  # what timm's builders raise on an argument they cannot use
        raise UserError(f"timm model '{name}' does not take the arguments {short(model_kwargs)}: "
                        f"{type(exc).__name__} {short(str(exc))}") from None
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UserError(f"unknown timm model '{name}' (see timm.list_models())") from None
        if pretrained and any(word in str(exc).lower() for word in ("pretrained", "hub", "download", "http")):
            raise UserError(f"could not fetch pretrained weights for '{name}': {' '.join(str(exc).split())[:200]}. "
                            "Give a weights file instead (teacher.weights / student.weights).") from None
        raise UserError(f"timm could not build '{name}' with {short(model_kwargs)}: "
                        f"{' '.join(str(exc).split())[:200]}") from None
    except OSError as exc:  # hub unreachable (or offline without a cached copy) with pretrained=True
        hint = "the Hugging Face hub is unreachable and they are not in the local cache" if offline else str(exc)
        raise UserError(f"could not fetch pretrained weights for '{name}': {' '.join(hint.split())[:200]}. Give a "
                        "weights file instead (teacher.weights / student.weights) or set pretrained: false.") from None
    if weights:
        load_backbone_weights(backbone, weights)
    return backbone


def _layer_registries() -> dict[str, tuple[str, Any]]:
    from timm.layers import get_act_layer, get_attn, get_norm_act_layer, get_norm_layer

    return {"act_layer": ("activation", get_act_layer), "norm_layer": ("normalisation", get_norm_layer),
            "norm_act_layer": ("normalisation + activation", get_norm_act_layer),
            "attn_layer": ("attention", get_attn), "se_layer": ("attention", get_attn)}


def check_layer_names(model_kwargs: dict[str, Any]) -> None:
    """A layer named by string (``act_layer: relu`` and the like) must be one timm's registries know: timm looks it
    up in a dict and would end in a KeyError. The names come from recipes and from checkpoints' metadata."""
    registries = _layer_registries()
    for key, value in model_kwargs.items():
        if key in registries and isinstance(value, str):
            kind, resolve = registries[key]
            try:
                known = resolve(value) is not None
            except (KeyError, ValueError, AssertionError, TypeError):
                known = False
            if not known:
                raise UserError(f"timm argument {key}={short(value)} names no {kind} layer timm knows")


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for one call: the hub client then uses its cache and fails at once instead of retrying."""
    if not offline:
        yield
        return
    try:
        import huggingface_hub.constants as hub_constants

        saved, hub_constants.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE, True
    except (ImportError, AttributeError):
        hub_constants, saved = None, None
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def feature_dim(backbone: nn.Module) -> int:
    """Width of a timm backbone's pooled output: models with a conv head (mobilenetv3, lcnet) emit
    ``head_hidden_size`` features, not ``num_features``."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


class LLCTeacher(nn.Module):
    """LLC: timm backbone -> bias-free projection P to k bits, plus a latent class codebook W (L x k)."""

    def __init__(self, backbone: str, bits: int, num_classes: int, pretrained: bool = False,
                 weights: str | None = None):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained, weights=weights)
        self.hash_head = nn.Linear(feature_dim(self.backbone), bits, bias=False)
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

    def __init__(self, backbone: str, bits: int, num_classes: int, pretrained: bool = False,
                 model_kwargs: dict[str, Any] | None = None, weights: str | None = None):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained, model_kwargs, weights)
        self.hash_head = nn.Linear(feature_dim(self.backbone), bits)
        self.register_buffer("codes", torch.ones(num_classes, bits))

    @property
    def bits(self) -> int:
        return self.hash_head.out_features

    @property
    def class_codes(self) -> torch.Tensor:
        return self.codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hash_head(self.backbone(x))



class FloatClassifier(nn.Module):
    """The float baseline: the same backbone with a plain linear classifier (cross-entropy)."""

    def __init__(self, backbone: str, num_classes: int, pretrained: bool = False, weights: str | None = None):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained, weights=weights)
        self.classifier = nn.Linear(feature_dim(self.backbone), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


def model_meta(kind: str, arch: str, bits: int | None, data_info: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The metadata a checkpoint needs to rebuild its model and decode its codes."""
    from hashdistill import __version__

    return {"kind": kind, "arch": arch, "bits": bits, "num_classes": len(data_info["class_names"]),
            **data_info, "hashdistill_version": __version__, **extra}


# The tensor that holds each kind's class codebook (rows = classes, columns = bits for the hash models).
CODEBOOK_TENSORS = {TEACHER: "codebook", STUDENT: "codes", "ternary-student": "codes", FLOAT: "classifier.weight"}


def validate_meta(meta: dict[str, Any], source: Any) -> None:
    """Check every field a model is rebuilt, evaluated or exported from, before any of them sizes anything.

    The metadata comes from a file the user hands us: ``arch`` must be a registered timm name (timm would
    fetch an ``hf-hub:`` or read a ``local-dir:`` name), counts and sizes must be in range, and the
    per-class and per-channel lists must have the recorded lengths.
    """
    kind, arch = meta.get("kind"), meta.get("arch")
    if not isinstance(kind, str) or kind not in CODEBOOK_TENSORS:
        raise UserError(f"{source}: checkpoint kind {short(kind)} is not a hashdistill model "
                        "(expected teacher, student, ternary-student or float)")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise UserError(f"{source}: checkpoint metadata names the architecture {short(arch)}, which is not a timm "
                        "model name")
    num_classes = require_int(meta.get("num_classes"), f"{source}: metadata 'num_classes'", 1, MAX_CLASSES)
    if kind != FLOAT:
        require_int(meta.get("bits"), f"{source}: metadata 'bits'", 1, MAX_BITS)
    require_strings(meta.get("class_names"), f"{source}: metadata 'class_names'", num_classes)
    if "input_size" in meta:
        require_int(meta["input_size"], f"{source}: metadata 'input_size'", 8, MAX_INPUT_SIZE)
    for key in ("mean", "std"):
        if key in meta:
            require_numbers(meta[key], f"{source}: metadata '{key}'", 3, positive=key == "std")
    if "crop_pct" in meta:
        crop = meta["crop_pct"]
        if isinstance(crop, bool) or not isinstance(crop, int | float) or not 0.05 <= crop <= 1:
            raise UserError(f"{source}: metadata 'crop_pct' must be a number in [0.05, 1], got {short(crop)}")
    for key, kind_of in (("data", dict), ("arch_kwargs", dict), ("training", dict), ("ternary_layers", dict)):
        if meta.get(key) is not None and not isinstance(meta[key], kind_of):
            raise UserError(f"{source}: metadata '{key}' must be a JSON object, got {short(meta[key])}")


def build_from_meta(meta: dict[str, Any]) -> nn.Module:
    """An untrained model of the architecture a checkpoint's metadata describes (no hub access).

    Call :func:`validate_meta` first; :func:`build_checked` also bounds the cost by the file's tensors.
    """
    kind, arch, bits, num_classes = (meta.get(key) for key in ("kind", "arch", "bits", "num_classes"))
    if kind == TEACHER:
        return LLCTeacher(arch, bits, num_classes)
    if kind == FLOAT:
        return FloatClassifier(arch, num_classes)
    return HashStudent(arch, bits, num_classes, model_kwargs=meta.get("arch_kwargs"))


def build_checked(meta: dict[str, Any], tensors: dict[str, torch.Tensor], source: Any,
                  ternary: bool = False) -> nn.Module:
    """Build the model the metadata describes, paying only for what the file's tensors justify.

    Sizes in the timm arguments are first bounded by the file's tensors; then the model is built on the meta
    device (no tensor memory): its parameter shapes must match the file's tensors, and one
    forward pass at the recorded input size must run (timm accepts some arguments it only rejects then).
    Only then is the real model built. ``ternary``: the file stores packed codes for its ternary layers,
    whose shapes :func:`~hashdistill.quantize.ternary_checkpoint.load_ternary_into` checks instead.
    """
    validate_meta(meta, source)
    check_class_codebook(meta, tensors, source)
    _check_sizes_fit_the_file(meta.get("arch_kwargs") or {}, tensors, source)
    with torch.device("meta"):
        skeleton = build_from_meta(meta)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    if ternary:  # a ternary layer's weight is stored as 2-bit codes, four per byte
        listed = meta.get("ternary_layers") or {}
        stored = {name.removesuffix(".weight_codes") for name in tensors if name.endswith(".weight_codes")}
        for layer in listed:
            shape = expected.pop(f"{layer}.weight", None)
            codes = tensors.get(f"{layer}.weight_codes")
            if shape is None:
                raise UserError(f"{source}: metadata 'ternary_layers' lists {short(layer)}, which is no layer with "
                                f"weights in the {meta.get('arch')} the metadata describes (edited metadata?)")
            if codes is None:
                raise UserError(f"{source}: metadata 'ternary_layers' lists {short(layer)}, but the file stores no "
                                f"packed codes for it ('{short(layer)}.weight_codes'; edited metadata?)")
            if codes.numel() != -(-math.prod(shape) // 4):
                raise UserError(f"{source}: ternary layer '{layer}' stores {codes.numel()} bytes of codes, the "
                                f"model the metadata describes needs {-(-math.prod(shape) // 4)} for {shape}")
        unlisted = sorted(stored - set(listed))
        if unlisted:
            raise UserError(f"{source}: the file stores packed ternary codes for {short(unlisted[0])}, which "
                            "metadata 'ternary_layers' does not list (edited metadata?)")
    for name, shape in expected.items():
        if name not in tensors:
            raise UserError(f"{source}: tensor '{name}' is missing (checkpoint of another architecture?)")
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{source}: tensor '{name}' has shape {tuple(tensors[name].shape)}, the model the metadata "
                            f"describes expects {shape} (another bit width or architecture?)")
    probe_forward(skeleton, meta.get("input_size", 32), f"{source}: the model its metadata describes")
    return build_from_meta(meta)


def _check_sizes_fit_the_file(kwargs: dict[str, Any], tensors: dict[str, torch.Tensor], source: Any) -> None:
    """Bound every size in a file's timm arguments by the file itself, before even a meta-device model is built
    (which allocates no tensors but still creates every module): a count of blocks cannot exceed the number of
    tensors stored, a width cannot exceed the largest dimension of any of them."""
    # 16x slack: sizes a file's tensors do not show directly (a ViT's img_size vs its position table) stay
    # within a small factor of them; millions of channels or blocks do not.
    limit = 16 * max([len(tensors), *(max(t.shape, default=1) for t in tensors.values())])
    for name, value in kwargs.items():
        values = value if isinstance(value, list) else [value]
        sizes = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        if len(values) > len(tensors) or any(abs(v) > limit for v in sizes):
            raise UserError(f"{source}: metadata 'arch_kwargs' asks for {name}={short(value)}, more than the "
                            f"file's {len(tensors)} tensors (largest dimension {limit}) can hold")


def probe_forward(skeleton: nn.Module, size: int, what: str) -> None:
    """Run one forward pass of a meta-device model on a size x size image: free, and it catches timm arguments
    (channels, in_chans, img_size, ...) that build a model but fail at its first batch."""
    try:
        with torch.no_grad():
            skeleton.eval()(torch.empty(1, 3, size, size, device="meta"))
    except NotImplementedError:
        return  # an op without a meta kernel: the probe cannot tell, the real first batch will
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        raise UserError(f"{what} does not run on {size}x{size} RGB images ({short(str(exc))})") from None


def check_class_codebook(meta: dict[str, Any], tensors: dict[str, torch.Tensor], source: Any) -> None:
    """The class codebook tensor must have the recorded shape, checked before a model of that size is built."""
    kind = meta["kind"]  # checked by validate_meta
    name = CODEBOOK_TENSORS[kind]
    if name not in tensors:
        raise UserError(f"{source}: tensor '{name}' is missing (checkpoint of another architecture?)")
    shape = tuple(tensors[name].shape)
    columns_ok = kind == FLOAT or shape[1:] == (meta.get("bits"),)
    if len(shape) != 2 or shape[0] != meta.get("num_classes") or not columns_ok:
        raise UserError(f"{source}: tensor '{name}' has shape {shape}, but the metadata records "
                        f"{meta.get('num_classes')!r} classes and {meta.get('bits')!r} bits "
                        "(another bit width or architecture?)")


def _is_plain_value(value: Any) -> bool:
    """What a recipe's ``model_kwargs`` can hold; a checkpoint's metadata may hold anything."""
    if isinstance(value, list):
        return all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    return isinstance(value, int | float | bool | str)


def load_model(path: str, expect: tuple[str, ...] = (TEACHER, STUDENT, FLOAT)) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a float model from a checkpoint; mismatched tensors are a clear error, never ignored."""
    tensors, meta = load_checkpoint(path)
    kind = meta.get("kind")
    if not isinstance(kind, str) or kind not in expect:
        raise UserError(f"{path} holds a {short(kind)} checkpoint; this command takes: {', '.join(expect)}")
    model = build_checked(meta, tensors, path)
    load_state_strict(model, tensors, path)
    return model.eval(), meta



def check_recipe_models(backbone: str, bits: int, student: str, student_kwargs: dict[str, Any], image_size: int,
                        num_classes: int, teacher_weights: str | None = None,
                        student_weights: str | None = None) -> None:
    """The teacher and the student a recipe asks for, built on the meta device (no memory, no hub) and run once at
    the input size, and their weights files read and compared with them: every model problem of a run found in
    seconds, before its first stage trains anything."""
    from .weights import fitting_weights

    with torch.device("meta"):
        teacher = LLCTeacher(backbone, bits, num_classes)
        pupil = HashStudent(student, bits, num_classes, False, student_kwargs)
    probe_forward(teacher, image_size, f"teacher '{backbone}'")
    probe_forward(pupil, image_size, f"student '{student}' with model_kwargs {short(student_kwargs)}")
    for field, model, path in (("teacher.weights", teacher, teacher_weights), ("student.weights", pupil,
                                                                               student_weights)):
        if path:
            try:
                fitting_weights(model.backbone, path)
            except UserError as exc:
                raise UserError(f"recipe field '{field}': {exc}") from None
