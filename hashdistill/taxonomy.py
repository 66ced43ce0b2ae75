"""Class taxonomy read off the learnt class codes (LLC): a tree over classes, and one split per bit.

Classes whose codes are close in Hamming distance were found similar by the teacher, so average-linkage
clustering of the class codes gives a tree without any labels beyond the classes themselves; and each
bit, being +1 for some classes and -1 for the others, is a binary split of the classes.
"""

from pathlib import Path

import numpy as np
from scipy.cluster.hierarchy import dendrogram, linkage, to_tree
from scipy.spatial.distance import pdist

from hashdistill.errors import UserError


def class_tree(class_codes_signs: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Average-linkage scipy linkage matrix of the class codes; merge heights are Hamming bits."""
    signs = _check_codes(class_codes_signs, class_names)
    if len(signs) < 2:
        raise UserError(f"a class tree needs at least 2 classes, got {len(signs)}")
    return linkage(pdist(signs, metric="hamming") * signs.shape[1], method="average")


def format_tree(linkage_matrix: np.ndarray, class_names: list[str]) -> str:
    """Indented text tree: each group shows the average Hamming distance (bits) at which it merges."""
    root = to_tree(np.asarray(linkage_matrix))
    if root.get_count() != len(class_names):
        raise UserError(
            f"the tree has {root.get_count()} leaves but {len(class_names)} class names were given"
        )
    lines = []
    stack = [(root, 0)]  # iterative: a chain-shaped tree over 1000 classes would exceed the recursion limit
    while stack:
        node, depth = stack.pop()
        indent = "  " * depth
        if node.is_leaf():
            lines.append(f"{indent}- {class_names[node.id]}")
        else:
            lines.append(f"{indent}+ {node.dist:.2f} bits ({node.get_count()} classes)")
            stack.extend([(node.get_right(), depth + 1), (node.get_left(), depth + 1)])
    return "\n".join(lines)


def bit_splits(class_codes_signs: np.ndarray, class_names: list[str]) -> list[dict]:
    """For each bit j: ``{"bit": j, "positive": [classes with +1], "negative": [classes with -1]}``."""
    signs = _check_codes(class_codes_signs, class_names)
    return [
        {
            "bit": j,
            "positive": [name for name, s in zip(class_names, signs[:, j]) if s > 0],
            "negative": [name for name, s in zip(class_names, signs[:, j]) if s < 0],
        }
        for j in range(signs.shape[1])
    ]


def plot_dendrogram(linkage_matrix: np.ndarray, class_names: list[str], path: str | Path) -> Path:
    """Write the class tree as a PNG dendrogram (class names on the left, Hamming bits across)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hashdistill.plots import save_png

    fig = Figure(figsize=(8, max(3.0, 0.25 * len(class_names) + 1)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    dendrogram(np.asarray(linkage_matrix), labels=list(class_names), orientation="left", ax=ax)
    ax.set_xlabel("average Hamming distance (bits)")
    ax.set_title("Class taxonomy from class codes")
    fig.tight_layout()
    return save_png(fig, path)


def _check_codes(class_codes_signs: np.ndarray, class_names: list[str]) -> np.ndarray:
    signs = np.asarray(class_codes_signs)
    if signs.ndim != 2 or signs.shape[1] == 0:
        raise UserError(f"class codes must be a (classes, bits) array, got shape {signs.shape}")
    if not np.isin(signs, (-1, 1)).all():
        raise UserError("class codes must be signs in {-1, +1} (use hashdistill.codes.unpack_codes)")
    if len(signs) != len(class_names):
        raise UserError(f"{len(signs)} class codes but {len(class_names)} class names")
    return signs.astype(np.int8)
