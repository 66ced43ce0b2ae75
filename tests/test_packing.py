"""2-bit ternary packing: round trips, the documented bit layout, and rejection of bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hashdistill.quantize.packing import (
    pack_ternary,
    packed_size,
    ternary_indices,
    ternary_values,
    unpack_ternary,
)

ternary_lists = st.lists(st.sampled_from([-1, 0, 1]), max_size=300)


@given(ternary_lists)
def test_round_trip(values):
    t = torch.tensor(values, dtype=torch.int8)
    packed = pack_ternary(t)
    assert packed.dtype == torch.uint8
    assert packed.shape == (packed_size(len(values)),) == ((len(values) + 3) // 4,)
    assert torch.equal(unpack_ternary(packed, len(values)), t)


@given(st.integers(1, 7), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_round_trip_2d_is_row_major(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (rows, cols), generator=gen).float()
    out = unpack_ternary(pack_ternary(w), w.numel())
    assert torch.equal(out.view(rows, cols).float(), w)


def test_known_bytes():
    # codes [0, 1, 2, 2 | 1, pad 1, 1, 1]: 0 + 1<<2 + 2<<4 + 2<<6 = 164; 1 + 4 + 16 + 64 = 85
    packed = pack_ternary(torch.tensor([-1, 0, 1, 1, 0]))
    assert packed.tolist() == [164, 85]
    assert pack_ternary(torch.tensor([[1, 1], [1, 1]])).tolist() == [0b10101010]
    assert pack_ternary(torch.zeros(0)).numel() == 0


@given(ternary_lists, st.floats(0.01, 10), st.floats(0.01, 10))
def test_exporter_unpacking_formula(values, wp, wn):
    """The ONNX side decodes with numpy-style (byte >> 2j) & 3 and a [-Wn, 0, Wp] lookup table."""
    packed = pack_ternary(np.array(values, dtype=np.int8)).numpy()
    codes = (packed[:, None] >> np.arange(0, 8, 2, dtype=np.uint8)) & 3
    table = np.array([-wn, 0.0, wp])
    decoded = table[codes.reshape(-1)[: len(values)]]
    np.testing.assert_array_equal(decoded, table[np.array(values, dtype=np.int64) + 1])


def test_indices_mapping_and_inverse():
    assert ternary_indices(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 1, 2]
    assert ternary_values(torch.tensor([0, 1, 2], dtype=torch.uint8)).tolist() == [-1, 0, 1]


@pytest.mark.parametrize("bad", [[0, 2], [0.5], [-2], [float("nan")]])
def test_pack_rejects_non_ternary(bad):
    with pytest.raises(ValueError, match="ternary values"):
        pack_ternary(torch.tensor(bad))


def test_unpack_rejects_bad_input():
    with pytest.raises(ValueError, match="codes must be 0, 1 or 2"):
        unpack_ternary(torch.tensor([0b11], dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack_ternary(torch.tensor([0], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_ternary(torch.tensor([0], dtype=torch.int32), 1)
