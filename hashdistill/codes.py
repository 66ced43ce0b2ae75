"""Binary codes: sign convention, packing, Hamming distance and class decoding (numpy only).

This module is THE reference for how codes look on disk and on the wire; the ONNX exporter, the
ternary-free edge runtime and every index must match it bit for bit.

Sign convention
    A code bit is 1 (sign +1) where the real-valued logit z >= 0, so sign(0) = +1, and 0 (sign -1)
    where z < 0.

Bit order (packed layout)
    A k-bit code is stored in ``ceil(k / 8)`` bytes. Bit j goes to byte ``j // 8`` at bit position
    ``7 - (j % 8)``: most significant bit first, exactly ``np.packbits(bits, axis=-1, bitorder="big")``.
    Padding bits at the end of the last byte are zero, so XOR + popcount over whole bytes is the
    Hamming distance.

Decoding
    For a code b and class codes c_l in {-1, +1}^k the Hamming distance is d = (k - <b, c_l>) / 2, so
    minimum-Hamming-distance decoding (MHD) is argmax_l <b, c_l>. Ties go to the LOWEST class index.
    Exact decoding (ED) returns the class whose code equals b, else :data:`UNKNOWN`; an input with no
    exact match is out of distribution.

The module imports numpy only: the edge runtime runs where torch is not installed.
"""

from collections.abc import Iterator

import numpy as np

from hashdistill.errors import UserError

UNKNOWN = -1
"""Label returned by exact decoding when no class code matches."""

_CHUNK_WORDS = 1 << 23
"""Word pairs XORed per block in :func:`iter_hamming_rows` (at most 64 MB of intermediates)."""


def packed_width(bits: int) -> int:
    """Bytes per packed code of ``bits`` bits."""
    if int(bits) != bits or bits < 1:
        raise UserError(f"the number of bits must be a positive integer, got {bits!r}")
    return (int(bits) + 7) // 8


def to_bits(logits: np.ndarray) -> np.ndarray:
    """Code bits {0, 1} as uint8: 1 where logit >= 0."""
    return (np.asarray(logits) >= 0).astype(np.uint8)


def to_signs(logits: np.ndarray) -> np.ndarray:
    """Code signs {-1, +1} as int8: +1 where logit >= 0 (sign(0) = +1)."""
    return np.where(np.asarray(logits) >= 0, 1, -1).astype(np.int8)


def pack_codes(logits: np.ndarray) -> np.ndarray:
    """Pack real logits (or +-1 signs) of shape (..., k) into uint8 codes of shape (..., ceil(k/8)).

    Bits are ``logits >= 0``. {0, 1} bit arrays would all pack to ones, so unsigned and bool inputs
    are refused; pack those with ``np.packbits(bits, axis=-1, bitorder="big")``.
    """
    logits = np.asarray(logits)
    if logits.dtype == np.bool_ or np.issubdtype(logits.dtype, np.unsignedinteger):
        raise UserError(
            f"pack_codes expects real logits or +-1 signs, got dtype {logits.dtype}; "
            "{0,1} bits would all pack to 1 (use np.packbits(bits, axis=-1, bitorder='big'))"
        )
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise UserError(f"pack_codes needs at least one bit on the last axis, got shape {logits.shape}")
    return np.packbits(logits >= 0, axis=-1, bitorder="big")


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unpack uint8 codes (..., ceil(bits/8)) into int8 signs {-1, +1} of shape (..., bits)."""
    packed = _as_packed(packed, "packed")
    width = packed_width(bits)
    if packed.shape[-1] != width:
        raise UserError(f"{bits}-bit codes take {width} bytes each, got {packed.shape[-1]}")
    unpacked = np.unpackbits(packed, axis=-1, count=bits, bitorder="big").astype(np.int8)
    return 2 * unpacked - 1


def iter_hamming_rows(
    a_packed: np.ndarray, b_packed: np.ndarray, chunk: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, block)`` where block[i, j] is the uint16 Hamming distance of a[start + i] and b[j].

    Rows of ``a`` are taken ``chunk`` at a time (default: about 8M words compared per block), so a
    10k x 60k comparison never holds the full matrix. Inputs are validated before the first block.
    """
    a_words, b_words = _as_words(a_packed, b_packed)
    if chunk is None:
        chunk = max(1, _CHUNK_WORDS // max(b_words.size, 1))
    if chunk < 1:
        raise UserError(f"chunk must be >= 1, got {chunk}")
    return _hamming_blocks(a_words, b_words, chunk)


def hamming_distances(a_packed: np.ndarray, b_packed: np.ndarray) -> np.ndarray:
    """Full (n, m) uint16 Hamming distance matrix; use :func:`iter_hamming_rows` when n*m is large."""
    blocks = iter_hamming_rows(a_packed, b_packed)
    out = np.empty((len(a_packed), len(b_packed)), dtype=np.uint16)
    for start, block in blocks:
        out[start : start + len(block)] = block
    return out


def mhd_decode(codes_packed: np.ndarray, class_codes_packed: np.ndarray) -> np.ndarray:
    """Minimum-Hamming-distance class per code (int64); ties go to the lowest class index."""
    _check_classes(class_codes_packed)
    labels = np.empty(len(codes_packed), dtype=np.int64)
    for start, block in iter_hamming_rows(codes_packed, class_codes_packed):
        labels[start : start + len(block)] = block.argmin(axis=1)  # argmin returns the first minimum
    return labels


def ed_decode(codes_packed: np.ndarray, class_codes_packed: np.ndarray) -> np.ndarray:
    """Class whose code equals the input exactly (lowest index if class codes repeat), else UNKNOWN."""
    _check_classes(class_codes_packed)
    labels = np.empty(len(codes_packed), dtype=np.int64)
    for start, block in iter_hamming_rows(codes_packed, class_codes_packed):
        exact = block == 0
        labels[start : start + len(block)] = np.where(exact.any(axis=1), exact.argmax(axis=1), UNKNOWN)
    return labels


def is_out_of_distribution(codes_packed: np.ndarray, class_codes_packed: np.ndarray) -> np.ndarray:
    """True where a code matches no class code exactly (LLC's threshold-free OOD rule)."""
    return ed_decode(codes_packed, class_codes_packed) == UNKNOWN


def _as_packed(codes: np.ndarray, name: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise UserError(f"{name} must be packed uint8 codes, got dtype {codes.dtype}")
    if codes.ndim == 0:
        raise UserError(f"{name} must have a byte axis, got a scalar")
    return codes


def _as_words(a_packed: np.ndarray, b_packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate two (n, w) code arrays and view them as the widest unsigned words that fit.

    Zero-padding bytes leaves Hamming distances unchanged, and popcounting one uint16/32/64 word is
    far cheaper than popcounting its bytes one by one.
    """
    a, b = _as_packed(a_packed, "a_packed"), _as_packed(b_packed, "b_packed")
    if a.ndim != 2 or b.ndim != 2:
        raise UserError(f"packed codes must be 2-D (n, bytes), got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[1]:
        raise UserError(
            f"codes of different widths cannot be compared: {a.shape[1]} vs {b.shape[1]} bytes "
            "(were they made with different numbers of bits?)"
        )
    width = a.shape[1]
    word = 1 if width == 1 else 2 if width == 2 else 4 if width <= 4 else 8
    padded = -(-width // word) * word

    def view(codes: np.ndarray) -> np.ndarray:
        if padded != width:
            codes = np.pad(codes, ((0, 0), (0, padded - width)))
        return np.ascontiguousarray(codes).view(f"u{word}")

    return view(a), view(b)


def _hamming_blocks(a_words: np.ndarray, b_words: np.ndarray, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, len(a_words), chunk):
        counts = np.bitwise_count(a_words[start : start + chunk, None, :] ^ b_words[None, :, :])
        if counts.shape[-1] == 1:
            yield start, counts[..., 0].astype(np.uint16)
        else:
            yield start, counts.sum(axis=-1, dtype=np.uint16)


def _check_classes(class_codes_packed: np.ndarray) -> None:
    if len(class_codes_packed) == 0:
        raise UserError("decoding needs at least one class code")
