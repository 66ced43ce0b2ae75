"""The ONNX file's ``metadata_props``: what an edge device needs besides the graph (numpy only).

The exporter writes these keys and the runtime reads them back; keeping both sides here means a
key can never be renamed on one side only. Every value is a string (ONNX's rule); lists and the
class codebook are JSON. The codebook is stored packed, one hex string per class, in THE bit order
of :mod:`hashdistill.codes` (bit j -> byte j // 8, position 7 - j % 8, MSB first).

``input_format`` says what the ``images`` input is: ``uint8-nhwc`` (the default export: decoded RGB pixels of
any size, the pre-processing of :mod:`hashdistill.preprocessing` runs in the graph) or ``float32-nchw``
(already pre-processed). Either way ``input_size`` / ``crop_pct`` / ``mean`` / ``std`` parametrise that one
pre-processing (the edge runtime rebuilds its graph from them for a float-input model) and
``preprocessing`` spells it out for people.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from hashdistill import codes
from hashdistill.errors import UserError
from hashdistill.preprocessing import FLOAT_IN, IMAGE_IN, IN_MEMORY_CROP_PCT, EvalTransform
from hashdistill.untrusted import (
    MAX_BITS,
    MAX_CLASSES,
    MAX_INPUT_SIZE,
    parse_json,
    require_int,
    require_numbers,
    require_strings,
    short,
)

FORMAT = "hashdistill-edge-model"
FORMAT_VERSION = "1"
BIT_ORDER = "msb-first"
INPUT, CODES, LOGITS = "images", "codes", "logits"
JSON_KEYS = ("class_codebook", "class_names", "mean", "std", "data", "ternary_layers")
INT_KEYS = ("bits", "input_size", "channels")
INPUT_FORMATS = (IMAGE_IN, FLOAT_IN)
REQUIRED = ("format_version", "bits", "class_codebook", "class_names", "input_size", "mean", "std", "channels",
            "bit_order")


def preprocessing_text(transform: EvalTransform, input_format: str) -> str:
    """Human-readable pre-processing: where it runs and its steps."""
    where = ("in the graph: input 'images' is uint8 RGB [batch, height, width, 3]" if input_format == IMAGE_IN else
             f"not in the graph: input 'images' is float32 [batch, 3, {transform.input_size}, "
             f"{transform.input_size}] after these steps")
    return f"{where}; {transform.describe()}"


def checkpoint_transform(meta: dict[str, Any]) -> EvalTransform:
    """The evaluation pre-processing a checkpoint's metadata records (``crop_pct`` 1 when it predates it)."""
    return EvalTransform(int(meta["input_size"]), float(meta.get("crop_pct", IN_MEMORY_CROP_PCT)),
                         tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"]))


def build_props(meta: dict[str, Any], class_codes: np.ndarray, *, ternary_layers: list[str],
                ternary_encoding: str, input_format: str = IMAGE_IN) -> dict[str, str]:
    """metadata_props for a model with checkpoint metadata ``meta`` and ±1 class codes (L, k)."""
    class_codes = np.asarray(class_codes)
    transform = checkpoint_transform(meta)
    size = transform.input_size
    data = meta.get("data") or {}
    return {
        "hashdistill_format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bits": str(int(class_codes.shape[1])),
        "class_codebook": json.dumps([row.tobytes().hex() for row in codes.pack_codes(class_codes)]),
        "class_names": json.dumps(list(meta["class_names"])),
        "input_size": str(size),
        "input_format": input_format,
        "crop_pct": repr(transform.crop_pct),
        "mean": json.dumps([float(v) for v in meta["mean"]]),
        "std": json.dumps([float(v) for v in meta["std"]]),
        "channels": "3",
        "bit_order": BIT_ORDER,
        "kind": str(meta.get("kind", "")),
        "arch": str(meta.get("arch", "")),
        "arch_kwargs": json.dumps(meta.get("arch_kwargs") or {}, sort_keys=True),
        "dataset": str(data.get("dataset", "")),
        "data": json.dumps(data, sort_keys=True),
        "hashdistill_version": str(meta.get("hashdistill_version", "")),
        "recipe_hash": str(meta.get("recipe_hash", "")),
        "stage_digest": str(meta.get("stage_digest", "")),  # of the checkpoint it was exported from
        "preprocessing": preprocessing_text(transform, input_format),
        "ternary_layers": json.dumps(ternary_layers),
        "ternary_encoding": ternary_encoding,
    }


@dataclass(frozen=True)
class EdgeMetadata:
    """Validated metadata of an exported model."""

    bits: int
    class_codes: np.ndarray
    class_names: list[str]
    input_size: int
    mean: np.ndarray
    std: np.ndarray
    props: dict[str, str]
    input_format: str = FLOAT_IN
    crop_pct: float = IN_MEMORY_CROP_PCT

    @property
    def transform(self) -> EvalTransform:
        """The evaluation pre-processing the model was trained with (in its graph for an image-in model)."""
        return EvalTransform(self.input_size, self.crop_pct, tuple(map(float, self.mean)), tuple(map(float, self.std)))

    @property
    def digest(self) -> str:
        """Short stable hash of all metadata (identifies the exported model in an index)."""
        canonical = json.dumps(self.props, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def data(self) -> dict[str, Any]:
        """The training recipe's data section (empty if the checkpoint did not record it)."""
        return parse_json(self.props.get("data") or "null", "metadata 'data'") or {}

    def as_dict(self) -> dict[str, Any]:
        """All metadata with JSON and integer values decoded (``data`` is the recipe's data section)."""
        decoded: dict[str, Any] = dict(self.props)
        for key in JSON_KEYS:
            if key in decoded:
                decoded[key] = parse_json(decoded[key] or "null", f"metadata '{key}'")
        for key in INT_KEYS:
            decoded[key] = int(decoded[key])
        return decoded


def _as_int(text: str) -> int | str:
    """An integer prop (ONNX stores every value as text); anything else is handed on for the error message."""
    return int(text) if isinstance(text, str) and re.fullmatch(r"-?[0-9]{1,18}", text) else text


def parse_props(props: dict[str, str], source: str) -> EdgeMetadata:
    """Validate ``metadata_props`` read from ``source``; anything not ours or damaged is a UserError."""
    if props.get("hashdistill_format") != FORMAT:
        raise UserError(f"{source} is an ONNX model but not a hashdistill export (no '{FORMAT}' metadata); "
                        "export one with `hashdistill export`")
    missing = [key for key in REQUIRED if key not in props]
    if missing:
        raise UserError(f"{source}: hashdistill metadata is incomplete (missing {', '.join(missing)})")
    if props["format_version"] != FORMAT_VERSION:
        raise UserError(f"{source}: export format version {props['format_version']} is not supported "
                        f"(this hashdistill reads version {FORMAT_VERSION})")
    if props["bit_order"] != BIT_ORDER:
        raise UserError(f"{source}: unsupported bit order '{props['bit_order']}' (expected {BIT_ORDER})")
    bits = require_int(_as_int(props["bits"]), f"{source}: metadata 'bits'", 1, MAX_BITS)
    size = require_int(_as_int(props["input_size"]), f"{source}: metadata 'input_size'", 8, MAX_INPUT_SIZE)
    require_int(_as_int(props["channels"]), f"{source}: metadata 'channels'", 3, 3)
    rows = parse_json(props["class_codebook"], f"{source}: metadata 'class_codebook'")
    width = codes.packed_width(bits)
    if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_CLASSES or \
            not all(isinstance(row, str) and re.fullmatch(f"[0-9a-fA-F]{{{2 * width}}}", row) for row in rows):
        raise UserError(f"{source}: metadata 'class_codebook' must list 1 to {MAX_CLASSES:,} hex codes of "
                        f"{width} bytes each, got {short(rows)}")
    try:
        class_codes = np.array([np.frombuffer(bytes.fromhex(row), np.uint8) for row in rows], dtype=np.uint8)
    except ValueError as exc:
        raise UserError(f"{source}: metadata 'class_codebook' is corrupt ({exc})") from None
    names = require_strings(parse_json(props["class_names"], f"{source}: metadata 'class_names'"),
                            f"{source}: metadata 'class_names'", len(rows))
    mean = np.array(require_numbers(parse_json(props["mean"], f"{source}: metadata 'mean'"),
                                    f"{source}: metadata 'mean'", 3), dtype=np.float32)
    std = np.array(require_numbers(parse_json(props["std"], f"{source}: metadata 'std'"),
                                   f"{source}: metadata 'std'", 3, positive=True), dtype=np.float32)
    for key, kind in (("data", dict), ("ternary_layers", list)):
        value = parse_json(props.get(key) or "null", f"{source}: metadata '{key}'")
        if value is not None and not isinstance(value, kind):
            raise UserError(f"{source}: metadata '{key}' must be a JSON {kind.__name__}, got {short(value)}")
    input_format = props.get("input_format", FLOAT_IN)  # files from before image-in models took floats
    if input_format not in INPUT_FORMATS:
        raise UserError(f"{source}: metadata 'input_format' must be one of {', '.join(INPUT_FORMATS)}, "
                        f"got {short(input_format)}")
    crop_pct = _as_fraction(props.get("crop_pct", repr(IN_MEMORY_CROP_PCT)), f"{source}: metadata 'crop_pct'")
    return EdgeMetadata(bits, class_codes, names, size, mean, std, dict(props), input_format, crop_pct)


def _as_fraction(text: str, what: str) -> float:
    try:
        value = float(text) if isinstance(text, str) and len(text) <= 32 else None
    except ValueError:
        value = None
    if value is None or not 0.05 <= value <= 1.0:
        raise UserError(f"{what} must be a number in [0.05, 1], got {short(text)}")
    return value
