"""2-bit packing of ternary weights, 4 codes per byte.

A ternary checkpoint and the ONNX exporter store quantized weights in this layout, so it is the
contract between them:

- each value maps to a 2-bit code: ``-1 -> 0``, ``0 -> 1``, ``+1 -> 2`` (code 3 is invalid), so the
  lookup table ``[-Wn, 0, +Wp]`` indexed by the code gives the dequantized weight;
- the weight is FLATTENED row-major (``tensor.flatten()``, C order) and element ``i`` goes to byte
  ``i // 4``, bits ``2*(i % 4)`` and ``2*(i % 4) + 1`` (the first element in the lowest bits);
- the tail is padded with code 1 (zero) up to a multiple of 4, so ``numel`` values take
  ``ceil(numel / 4)`` bytes.

Unpacking element ``j`` of a byte is ``(byte >> (2*j)) & 3``; the functions accept numpy arrays as
well as tensors and return tensors (call ``.numpy()`` on CPU results for numpy).
"""

from __future__ import annotations

import numpy as np
import torch

ZERO_CODE = 1
CODES_PER_BYTE = 4


def packed_size(numel: int) -> int:
    """Bytes needed to pack ``numel`` ternary values."""
    return (numel + CODES_PER_BYTE - 1) // CODES_PER_BYTE


def ternary_indices(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Map ternary values {-1, 0, +1} (any dtype) to uint8 codes {0, 1, 2}; other values are an error."""
    values = torch.as_tensor(values)
    valid = (values == -1) | (values == 0) | (values == 1)
    if not bool(valid.all()):
        raise ValueError(f"ternary values must be -1, 0 or +1; got {values[~valid][:5].tolist()}")
    return (values.to(torch.int8) + 1).to(torch.uint8)


def ternary_values(codes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Inverse of :func:`ternary_indices`: codes {0, 1, 2} to int8 values {-1, 0, +1}."""
    codes = torch.as_tensor(codes)
    invalid = (codes < 0) | (codes > 2)
    if bool(invalid.any()):
        raise ValueError(f"ternary codes must be 0, 1 or 2; got {codes[invalid][:5].tolist()}")
    return codes.to(torch.int8) - 1


def pack_ternary(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Pack ternary values (any shape, flattened row-major) into a 1-D uint8 tensor of ceil(n/4) bytes."""
    codes = ternary_indices(values).flatten()
    pad = (-codes.numel()) % CODES_PER_BYTE
    codes = torch.cat([codes, codes.new_full((pad,), ZERO_CODE)]).view(-1, CODES_PER_BYTE)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor | np.ndarray, numel: int) -> torch.Tensor:
    """Unpack the first ``numel`` values packed by :func:`pack_ternary`: a flat int8 tensor in {-1, 0, 1}."""
    packed = torch.as_tensor(packed)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed ternary codes must be 1-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != packed_size(numel):
        raise ValueError(f"{numel} ternary values take {packed_size(numel)} bytes, got {packed.numel()}")
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device)
    codes = ((packed.unsqueeze(1) >> shifts) & 3).flatten()[:numel]
    return ternary_values(codes)
