"""Ternary checkpoints: 2-bit packed codes plus (Wp, Wn) per ternary layer, never the dense latent weight.

Layout, for a ternary layer ``<name>`` (see :mod:`hashdistill.quantize.packing` for the bit layout):
``<name>.weight_codes`` (uint8, ceil(numel/4) bytes), ``<name>.wp`` and ``<name>.wn`` (0-d tensors), and
``meta["ternary_layers"][<name>] = {"shape": [...]}``. Every other tensor of the state dict (biases,
BatchNorm, the float backbone) is stored as is under its usual key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hashdistill.checkpoint import save_checkpoint
from hashdistill.errors import UserError

from .packing import pack_ternary, unpack_ternary
from .ttq import (
    TTQConfig,
    apply_ternary,
    refuse_if_ternarized,
    ternary_layers,
    ternary_modules,
    ternary_rule,
    ternary_state,
)

PARAM_PREFIX = "parametrizations.weight."
LEAVES = ("weight_codes", "wp", "wn")
# Latent weights set to codes in {-1, 0, 1}: any threshold in (0, 1) maps them back onto themselves.
LOAD_CONFIG = TTQConfig(threshold=0.5)


def save_ternary(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Save ``model`` with its ternary layers packed; ``meta`` (with the caller's ``kind``) is extended."""
    layers = ternary_layers(model)
    if not layers:
        raise ValueError("save_ternary needs a ternarized model (call ternarize_ first)")
    tensors = {
        key: value
        for key, value in model.state_dict().items()
        if not any(key.startswith(_key(name, PARAM_PREFIX)) for name in layers)
    }
    shapes = {}
    for name, module in layers.items():
        state = ternary_state(module)
        rule = ternary_rule(module)
        codes_key, wp_key, wn_key = (_key(name, leaf) for leaf in LEAVES)
        tensors[codes_key] = pack_ternary(state.codes)
        tensors[wp_key] = rule.wp.detach()
        tensors[wn_key] = rule.wn.detach()
        shapes[name] = {"shape": list(state.codes.shape)}
    return save_checkpoint(path, tensors, {**meta, "ternary_layers": shapes})


def load_ternary_into(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> nn.Module:
    """Ternarize a freshly built float ``model`` like the saved one and load the checkpoint into it.

    The latent weight becomes the codes as floats, so the loaded model computes exactly the saved ternary
    weights; fine-tune from a float or in-training checkpoint instead, which keeps the real latent weights.
    """
    layers = meta.get("ternary_layers")
    if not isinstance(layers, dict) or not layers:
        raise UserError("checkpoint has no 'ternary_layers' metadata: it is not a ternary checkpoint")
    if not all(isinstance(info, dict) for info in layers.values()):
        raise UserError("checkpoint metadata 'ternary_layers' must map layer names to {'shape': [...]}")
    refuse_if_ternarized(model)
    try:
        eligible = ternary_modules(model, list(layers))
    except UserError as exc:
        raise UserError(f"ternary checkpoint does not fit this model: {exc}") from None
    for name, info in layers.items():
        shape = list(eligible[name].weight.shape)
        if info.get("shape") != shape:
            raise UserError(f"ternary layer '{name}': checkpoint shape {info.get('shape')}, model shape {shape}")
        missing = [_key(name, leaf) for leaf in LEAVES if _key(name, leaf) not in tensors]
        if missing:
            raise UserError(f"ternary checkpoint is missing {', '.join(missing)}")
    apply_ternary(model, list(layers), LOAD_CONFIG)
    state = dict(tensors)
    for name, info in layers.items():
        codes, wp, wn = (state.pop(_key(name, leaf)) for leaf in LEAVES)
        try:
            values = unpack_ternary(codes, eligible[name].weight.numel())
        except ValueError as exc:
            raise UserError(f"ternary layer '{name}': corrupt codes ({exc})") from None
        latent = eligible[name].parametrizations.weight.original
        state[_key(name, PARAM_PREFIX + "original")] = values.view(info["shape"]).to(latent.dtype)
        for leaf, scale in (("wp", wp), ("wn", wn)):
            if scale.numel() != 1 or not scale.is_floating_point() or not bool((scale > 0) & scale.isfinite()):
                raise UserError(f"ternary layer '{name}': scale {leaf} must be one positive finite number")
            state[_key(name, PARAM_PREFIX + f"0.log_{leaf}")] = scale.reshape(()).log()
    _check_keys(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"ternary checkpoint does not match the model: {exc}") from None
    return model


def _check_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(
            "ternary checkpoint does not match the model architecture: "
            f"missing {missing[:5]} ({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )


def _key(name: str, leaf: str) -> str:
    return f"{name}.{leaf}" if name else leaf
