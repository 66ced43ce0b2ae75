"""Class tree, bit splits and plots from class codes."""

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster

from hashdistill.errors import UserError
from hashdistill.plots import plot_pr_curves
from hashdistill.taxonomy import bit_splits, class_tree, format_tree, plot_dendrogram

NAMES = ["cat", "dog", "car", "truck"]
# animals share the first 6 bits, vehicles the complement; within a pair the codes differ in 1 bit
CODES = np.array(
    [
        [1, 1, 1, 1, 1, 1, 1, -1],
        [1, 1, 1, 1, 1, 1, -1, -1],
        [-1, -1, -1, -1, -1, -1, 1, 1],
        [-1, -1, -1, -1, -1, -1, 1, -1],
    ]
)


def test_class_tree_groups_close_codes_with_hamming_heights():
    tree = class_tree(CODES, NAMES)
    assert tree.shape == (3, 4)
    assert fcluster(tree, 2, criterion="maxclust").tolist() == [1, 1, 2, 2]
    heights = sorted(tree[:, 2])
    assert heights[:2] == [1.0, 1.0]  # each pair differs in exactly one bit
    # average linkage: mean Hamming distance between {cat, dog} and {car, truck} = (8 + 6 + 7 + 7) / 4
    assert heights[2] == pytest.approx(7.0)


def test_format_tree_is_nested_and_names_every_class():
    text = format_tree(class_tree(CODES, NAMES), NAMES)
    lines = text.splitlines()
    assert lines[0] == "+ 7.00 bits (4 classes)"
    assert sum(line.strip().startswith("- ") for line in lines) == 4
    for name in NAMES:
        assert f"    - {name}" in lines  # leaves sit two levels down
    cat, dog, car = (lines.index(f"    - {n}") for n in ("cat", "dog", "car"))
    assert abs(cat - dog) == 1 and abs(cat - car) > 1
    with pytest.raises(UserError):
        format_tree(class_tree(CODES, NAMES), NAMES[:3])


def test_format_tree_handles_deep_chains():
    n = 1200  # each merge adds one class to the growing group: deeper than Python's recursion limit
    chain = [[0, 1, 1.0, 2]] + [[j + 1, n + j - 1, j + 1.0, j + 2] for j in range(1, n - 1)]
    names = [f"c{i}" for i in range(n)]
    lines = format_tree(np.array(chain), names).splitlines()
    assert len(lines) == 2 * n - 1
    assert lines[-1] == "  " * (n - 1) + "- c1"


def test_bit_splits():
    splits = bit_splits(CODES, NAMES)
    assert len(splits) == 8
    assert splits[0] == {"bit": 0, "positive": ["cat", "dog"], "negative": ["car", "truck"]}
    assert splits[6] == {"bit": 6, "positive": ["cat", "car", "truck"], "negative": ["dog"]}


def test_input_validation():
    with pytest.raises(UserError, match="signs"):
        class_tree((CODES + 1) // 2, NAMES)  # {0, 1} bits instead of signs
    with pytest.raises(UserError, match="names"):
        bit_splits(CODES, NAMES[:2])
    with pytest.raises(UserError, match="at least 2"):
        class_tree(CODES[:1], NAMES[:1])


def test_plots_write_png(tmp_path):
    png = plot_dendrogram(class_tree(CODES, NAMES), NAMES, tmp_path / "sub" / "tree.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = {"radius": [0, 1, 2], "precision": [1.0, 0.8, 0.5], "recall": [0.1, 0.5, 1.0]}
    pr = plot_pr_curves({"teacher": curve, "student": curve}, tmp_path / "pr.png")
    assert pr.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError):
        plot_pr_curves({}, tmp_path / "empty.png")
