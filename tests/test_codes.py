"""Bit order, packing, Hamming distance and decoding of hashdistill.codes."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hashdistill.codes import (
    UNKNOWN,
    ed_decode,
    hamming_distances,
    is_out_of_distribution,
    iter_hamming_rows,
    mhd_decode,
    pack_codes,
    packed_width,
    to_bits,
    to_signs,
    unpack_codes,
)
from hashdistill.errors import UserError


def signs_strategy(max_rows: int = 12, max_bits: int = 70):
    """(n, k) arrays of +-1 int8 signs."""
    shape = st.tuples(st.integers(1, max_rows), st.integers(1, max_bits))
    return shape.flatmap(lambda s: arrays(np.int8, s, elements=st.sampled_from([-1, 1])))


def test_sign_convention_zero_is_positive():
    z = np.array([-1.5, -0.0, 0.0, 1e-9, -1e-9])
    assert to_bits(z).tolist() == [0, 1, 1, 1, 0]
    assert to_signs(z).tolist() == [-1, 1, 1, 1, -1]
    assert to_bits(z).dtype == np.uint8 and to_signs(z).dtype == np.int8


def test_bit_order_is_msb_first_with_zero_padding():
    bits = np.zeros(10)
    bits[0] = 1  # bit 0 -> byte 0, bit position 7
    bits[9] = 1  # bit 9 -> byte 1, bit position 6
    packed = pack_codes(bits * 2 - 1)
    assert packed.tolist() == [0b1000_0000, 0b0100_0000]
    assert packed.dtype == np.uint8


def test_packed_width():
    assert [packed_width(k) for k in (1, 8, 9, 16, 64, 65)] == [1, 1, 2, 2, 8, 9]
    for bad in (0, -3, 2.5):
        with pytest.raises(UserError):
            packed_width(bad)


@given(signs_strategy())
def test_pack_unpack_round_trip(signs):
    n, k = signs.shape
    packed = pack_codes(signs)
    assert packed.shape == (n, packed_width(k))
    np.testing.assert_array_equal(unpack_codes(packed, k), signs)
    assert unpack_codes(packed, k).dtype == np.int8
    np.testing.assert_array_equal(packed, np.packbits(signs > 0, axis=-1, bitorder="big"))


@given(
    arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 40)), elements=st.floats(-3, 3, width=32))
)
def test_pack_codes_of_logits_matches_signs(logits):
    np.testing.assert_array_equal(unpack_codes(pack_codes(logits), logits.shape[1]), to_signs(logits))


def test_pack_codes_refuses_bits():
    with pytest.raises(UserError, match="packbits"):
        pack_codes(np.array([[0, 1, 1]], dtype=np.uint8))
    with pytest.raises(UserError):
        pack_codes(np.array([[True, False]]))


def test_unpack_codes_checks_width():
    with pytest.raises(UserError, match="2 bytes"):
        unpack_codes(np.zeros((3, 1), np.uint8), 16)


@settings(max_examples=60)
@given(signs_strategy(), st.data())
def test_hamming_equals_differing_signs_and_inner_product(a, data):
    k = a.shape[1]
    b = data.draw(arrays(np.int8, (data.draw(st.integers(1, 9)), k), elements=st.sampled_from([-1, 1])))
    dist = hamming_distances(pack_codes(a), pack_codes(b))
    assert dist.dtype == np.uint16 and dist.shape == (len(a), len(b))
    expected = (a[:, None, :] != b[None, :, :]).sum(axis=-1)
    np.testing.assert_array_equal(dist, expected)
    inner = a.astype(int) @ b.T.astype(int)
    np.testing.assert_array_equal(dist, (k - inner) // 2)  # d = (k - <b, c>) / 2


def test_iter_hamming_rows_chunks_cover_all_rows():
    rng = np.random.default_rng(0)
    a, b = pack_codes(rng.standard_normal((23, 37))), pack_codes(rng.standard_normal((11, 37)))
    full = hamming_distances(a, b)
    starts = []
    for start, block in iter_hamming_rows(a, b, chunk=5):
        starts.append(start)
        np.testing.assert_array_equal(block, full[start : start + 5])
    assert starts == [0, 5, 10, 15, 20]


def test_hamming_rejects_mismatched_widths_eagerly():
    a, b = np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8)
    with pytest.raises(UserError, match="different widths"):
        hamming_distances(a, b)
    with pytest.raises(UserError, match="different widths"):
        iter_hamming_rows(a, b)  # before the first block is asked for
    with pytest.raises(UserError, match="uint8"):
        hamming_distances(a.astype(np.int64), a.astype(np.int64))


@settings(max_examples=60)
@given(signs_strategy(max_rows=20, max_bits=12), st.data())
def test_mhd_is_argmax_inner_product_lowest_index(codes, data):
    k = codes.shape[1]
    n_classes = data.draw(st.integers(1, 8))
    classes = data.draw(arrays(np.int8, (n_classes, k), elements=st.sampled_from([-1, 1])))
    pred = mhd_decode(pack_codes(codes), pack_codes(classes))
    inner = codes.astype(int) @ classes.T.astype(int)
    for i in range(len(codes)):
        best = inner[i].max()
        assert pred[i] == min(j for j in range(n_classes) if inner[i, j] == best)


def test_mhd_tie_goes_to_lowest_index():
    classes = pack_codes(np.array([[1, 1, -1, -1], [-1, -1, 1, 1], [1, 1, 1, 1]]))
    code = pack_codes(np.array([[1, 1, 1, -1]]))  # distance 1 to class 0 and to class 2
    assert mhd_decode(code, classes).tolist() == [0]


@settings(max_examples=60)
@given(signs_strategy(max_rows=6, max_bits=10), st.data())
def test_ed_exact_match_or_unknown(classes, data):
    k = classes.shape[1]
    picks = data.draw(st.lists(st.integers(0, len(classes) - 1), min_size=1, max_size=6))
    noise = data.draw(arrays(np.int8, (4, k), elements=st.sampled_from([-1, 1])))
    codes = np.concatenate([classes[picks], noise])
    pred = ed_decode(pack_codes(codes), pack_codes(classes))
    for code, p in zip(codes, pred):
        matches = [j for j in range(len(classes)) if np.array_equal(classes[j], code)]
        assert p == (matches[0] if matches else UNKNOWN)
    np.testing.assert_array_equal(
        is_out_of_distribution(pack_codes(codes), pack_codes(classes)), pred == UNKNOWN
    )


def test_ed_known_example():
    classes = pack_codes(np.array([[1, -1, 1], [1, -1, 1], [-1, -1, -1]]))  # classes 0 and 1 share a code
    codes = pack_codes(np.array([[1, -1, 1], [-1, -1, -1], [1, 1, 1]]))
    assert ed_decode(codes, classes).tolist() == [0, 2, UNKNOWN]
    assert is_out_of_distribution(codes, classes).tolist() == [False, False, True]
    assert mhd_decode(codes, classes).tolist() == [0, 2, 0]


def test_decoding_needs_class_codes():
    with pytest.raises(UserError):
        mhd_decode(np.zeros((1, 1), np.uint8), np.zeros((0, 1), np.uint8))


def test_numpy_side_imports_no_torch():
    code = "import sys, hashdistill.codes, hashdistill.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
