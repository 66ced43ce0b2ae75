"""Starting weights for a timm backbone: a file on disk (``teacher.weights`` / ``student.weights``) or the hub.

A file is read with safetensors, or, for ``.pth`` / ``.pt`` / ``.bin`` files, with
``torch.load(weights_only=True)`` (tensors only: no pickled object can run). A full timm model's file
(classifier included) fits a backbone: the classifier's tensors are dropped, a ``state_dict`` / ``model``
wrapper and a DDP ``module.`` prefix are unwrapped. Anything else that does not match is one clear error.

With ``pretrained: true`` timm fetches weights from the Hugging Face hub, and offline its client retries for
about 50 s before failing; :func:`hub_reachable` checks in a few seconds first and, when the hub cannot be
reached, timm runs in offline mode: weights already in the local cache still load, anything else fails at once.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hashdistill.checkpoint import never_unpickles, pickle_kind
from hashdistill.errors import UserError

HUB_HOST, HUB_TIMEOUT_S = "huggingface.co", 3.0
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a weights file into ``backbone`` (strictly, once the classifier's tensors are dropped)."""
    backbone.load_state_dict(fitting_weights(backbone, path))


def fitting_weights(backbone: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file that ``backbone`` (a real or a meta-device model) takes, checked to fit it
    exactly once the classifier's tensors are dropped; anything else is one clear error."""
    path = Path(path)
    state = read_weights(path)
    expected = backbone.state_dict()
    classifier = _classifier_prefixes(backbone)
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(classifier)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        details = "; ".join(part for part in (
            f"missing {missing[:3]} ({len(missing)} in all)" if missing else "",
            f"unexpected {unexpected[:3]} ({len(unexpected)} in all)" if unexpected else "",
            f"'{wrong[0]}' has shape {tuple(state[wrong[0]].shape)}, the model {tuple(expected[wrong[0]].shape)}"
            if wrong else "") if part)
        raise UserError(f"{path} does not fit this backbone ({type(backbone).__name__}): {details}")
    return state


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers within a few seconds (no request is made, only a connection).

    With a proxy, a mirror (HF_ENDPOINT) or HF_HUB_OFFLINE set, the hub client knows its way better than a
    direct connection does: it is left to it."""
    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT",
                                           "HF_HUB_OFFLINE")):
        return True
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The named tensors of a weights file, checked to be one (what a run validates before its first stage)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    return _unwrap(_read(path), path)


def _read(path: Path) -> Any:
    if path.suffix.lower() in TORCH_SUFFIXES:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch.load raises UnpicklingError, RuntimeError, EOFError...
            kind = pickle_kind(path)
            if kind and "weights_only" in str(exc):  # a pickle of more than tensors: torch refused to run it
                raise UserError(f"{path} is {kind} holding more than tensors: {never_unpickles(path)}") from None
            raise UserError(f"{path}: not a tensors-only PyTorch file ({' '.join(str(exc).split())[:120]})") from None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        kind = pickle_kind(path)
        if kind:
            raise UserError(f"{path} is {kind}, not a safetensors file: {never_unpickles(path)}") from None
        raise UserError(f"{path}: not a readable safetensors file ({exc}); .pth/.pt/.bin files are read with "
                        "torch.load(weights_only=True)") from None


def _unwrap(state: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"{path} holds no state dict of named tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Names of the classifier timm removed with num_classes=0 (e.g. ``fc``, ``head.fc``, ``classifier``)."""
    name = getattr(backbone, "pretrained_cfg", {}).get("classifier") or getattr(backbone, "default_cfg", {}).get(
        "classifier")
    names = name if isinstance(name, list | tuple) else [name] if name else []
    return tuple(f"{n}." for n in names) or ("fc.", "classifier.", "head.")
