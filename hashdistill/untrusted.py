"""Reading fields from files a user hands us: JSON that cannot exhaust the stack, values checked before use.

Checkpoint metadata, ONNX metadata_props and index records are all JSON text inside a file of unknown
origin. Every reader goes through :func:`parse_json` (a depth-exhausting document is a UserError, not a
``RecursionError``) and checks each field with the helpers below *before* the field sizes an
allocation. Messages show values through :func:`short`, so a hostile megabyte-long value never
becomes a megabyte-long error. numpy only: the torch-free edge runtime reads ONNX metadata too.
"""

from __future__ import annotations

import hashlib
import json
import math
import reprlib
from typing import Any

from hashdistill.errors import UserError

MAX_JSON_CHARS = 16 * 1024 * 1024  # a 10k-class codebook with names is well under 1 MB
# Bounds on what a file's metadata may ask for, shared by checkpoints and ONNX files (a recipe allows 1024 bits;
# the API can build wider codes).
MAX_BITS, MAX_CLASSES, MAX_INPUT_SIZE = 4096, 100_000, 1024
_repr = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 6, 4, 2


def short(value: Any) -> str:
    """A repr of ``value`` cut to about 80 characters, for error messages."""
    return _repr.repr(value)


def parse_json(text: Any, source: str) -> Any:
    """``json.loads`` for untrusted text; too long, malformed or too deeply nested text is a UserError."""
    if not isinstance(text, str | bytes):
        raise UserError(f"{source} is not JSON text (got {type(text).__name__})")
    if len(text) > MAX_JSON_CHARS:
        raise UserError(f"{source} is {len(text):,} characters of JSON; more than the {MAX_JSON_CHARS:,} allowed")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{source} is corrupt ({exc})") from None
    except RecursionError:
        raise UserError(f"{source} is corrupt (its JSON is nested too deeply)") from None


def require_int(value: Any, name: str, low: int, high: int) -> int:
    """``value`` as an int in [low, high]; a bool, float, string or out-of-range number is a UserError."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{name} must be an integer in [{low}, {high}], got {short(value)}")
    return value


def require_numbers(value: Any, name: str, length: int, positive: bool = False) -> list[float]:
    """``value`` as a list of ``length`` finite numbers (all > 0 if ``positive``)."""
    ok = isinstance(value, list | tuple) and len(value) == length and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
        for v in value)
    if not ok:
        sign = "positive " if positive else ""
        raise UserError(f"{name} must be a list of {length} finite {sign}numbers, got {short(value)}")
    return [float(v) for v in value]


def require_strings(value: Any, name: str, length: int) -> list[str]:
    """``value`` as a list of exactly ``length`` strings."""
    if not isinstance(value, list) or len(value) != length or not all(isinstance(v, str) for v in value):
        raise UserError(f"{name} must be a list of {length} strings, got {short(value)}")
    return list(value)


def file_sha256(path) -> str:  # noqa: ANN001 - a str or os.PathLike
    """The sha256 of a file, read a megabyte at a time: what identifies the very file a user handed over."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
