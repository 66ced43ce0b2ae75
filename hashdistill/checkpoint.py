"""Checkpoints: one safetensors file holding the tensors, with JSON metadata in its header.

Why this format: safetensors cannot execute code when loaded (unlike pickle), and keeping the
metadata inside the same file makes a checkpoint a single atomic unit: it is written to a
temporary file in the same folder and renamed into place, so a crash mid-write never leaves a
broken checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from hashdistill.atomic import atomic_write
from hashdistill.errors import UserError
from hashdistill.untrusted import parse_json

METADATA_KEY = "hashdistill"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Save ``tensors`` and JSON-serialisable ``meta`` atomically to one ``.safetensors`` file."""
    payload = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    header = {METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, **meta})}
    return atomic_write(path, lambda tmp: save_file(payload, tmp, metadata=header))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read only the metadata of a checkpoint (cheap: the tensors are not loaded)."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(_not_safetensors(path, exc)) from None
    if METADATA_KEY not in header:
        raise UserError(f"{path} is a safetensors file but not a hashdistill checkpoint (no '{METADATA_KEY}' metadata)")
    meta = parse_json(header[METADATA_KEY], f"{path}: checkpoint metadata")
    if not isinstance(meta, dict):
        raise UserError(f"{path}: checkpoint metadata is corrupt (expected a JSON object)")
    return meta


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint's tensors (on CPU) and metadata; never unpickles anything."""
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: checkpoint tensors are unreadable ({exc})") from None
    return tensors, meta


def load_state_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Any) -> None:
    """Load weights, naming the first missing, unexpected or wrongly shaped tensor on mismatch."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in tensors:
            raise UserError(f"{source}: tensor '{name}' is missing (checkpoint of another architecture?)")
        if tensors[name].shape != tensor.shape:
            raise UserError(f"{source}: tensor '{name}' has shape {tuple(tensors[name].shape)}, the model expects "
                            f"{tuple(tensor.shape)} (another bit width or architecture?)")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UserError(f"{source}: unexpected tensor '{extra[0]}' (checkpoint of another architecture?)")
    model.load_state_dict(tensors)


def never_unpickles(path: Path) -> str:
    """Why a pickle is refused, and how its owner can convert it once, somewhere they trust it."""
    return ("hashdistill never unpickles a file it is handed, because unpickling can run arbitrary code; convert it "
            "once, where you trust it, with: python -c \"import torch, safetensors.torch as st; "
            f"st.save_file(torch.load('{path}', weights_only=False), 'model.safetensors')\" (a dict of tensors; "
            "take its 'state_dict' entry first if it has one)")


def pickle_kind(path: Path) -> str | None:
    """'a torch.save file (a zip holding a pickle)' or 'a pickle file' for such files, else None (reads 4 KB)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04") and b"data.pkl" in head:
        return "a torch.save file (a zip holding a pickle)"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle file"
    return None


def _not_safetensors(path: Path, exc: Exception) -> str:
    """Say what a file that safetensors cannot read actually is: a pickle, a zip, an ONNX model or damage."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        head = b""
    if head[8:9] != b"{":  # safetensors: an 8-byte header length, then the JSON header
        kind = pickle_kind(path)
        if kind:
            return f"{path} is {kind}, not a safetensors checkpoint: {never_unpickles(path)}"
        if head.startswith(b"PK\x03\x04"):
            return f"{path} is a zip archive, not a safetensors checkpoint"
        if path.suffix.lower() in (".onnx", ".ort") or _looks_onnx(head):
            return f"this command takes a checkpoint (.safetensors); got an ONNX model: {path}"
    return f"{path} is not a hashdistill checkpoint (not a readable safetensors file: {exc})"


def _looks_onnx(head: bytes) -> bool:
    """An ONNX ModelProto starts with field 1 (ir_version, varint) and names its producer early on."""
    return head[:1] == b"\x08" and (b"pytorch" in head or b"onnx" in head.lower() or b"producer" in head)


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return path
