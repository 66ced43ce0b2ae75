"""Report plots. matplotlib is imported inside each function (Agg canvas, no pyplot state)."""

from pathlib import Path

from hashdistill.atomic import atomic_write
from hashdistill.errors import UserError


def save_png(fig, path: str | Path) -> Path:
    """Write a figure as PNG atomically: a reader never sees half a plot, a crash leaves the old one."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _axes(path: str | Path):
    """A fresh Agg figure (no pyplot state) and its axes; the caller draws, :func:`_save` writes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, ax, path: str | Path, title: str) -> Path:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)


def plot_pr_curves(curves: dict[str, dict], path: str | Path) -> Path:
    """Several models' Hamming-radius PR curves on one PNG, one line per model name.

    Each curve is the ``"pr_curve"`` dict of :func:`hashdistill.metrics.retrieval_metrics`.
    """
    if not curves:
        raise UserError("plot_pr_curves needs at least one curve")
    for name, curve in curves.items():
        if not {"precision", "recall"} <= set(curve) or len(curve["precision"]) != len(curve["recall"]):
            raise UserError(f"curve {name!r} needs 'precision' and 'recall' lists of equal length")
    fig, ax = _axes(path)
    for name, curve in curves.items():
        ax.plot(curve["recall"], curve["precision"], marker=".", label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    return _save(fig, ax, path, "Precision-recall by Hamming radius (pooled over queries)")


def plot_bits_sweep(rows: list[dict], path: str | Path) -> Path:
    """Accuracy and mAP against the code length, one point per teacher of the sweep."""
    rows = sorted(rows, key=lambda r: r["bits"])
    fig, ax = _axes(path)
    bits = [r["bits"] for r in rows]
    series = (("mhd_accuracy", "MHD accuracy"), ("ed_accuracy", "ED accuracy"), ("map_tie_aware", "mAP (tie-aware)"))
    for key, label in series:
        ax.plot(bits, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bits, [str(b) for b in bits])
    ax.set_xlabel("bits")
    ax.set_ylim(0, 1.02)
    return _save(fig, ax, path, "Teacher: code length vs accuracy")


def plot_training_curves(curves: dict[str, list[tuple[float, float]]], path: str | Path, metric: str) -> Path:
    """One line per training stage: ``metric`` after each epoch against the training images seen by then."""
    fig, ax = _axes(path)
    for name, points in curves.items():
        ax.plot([seen for seen, _ in points], [value for _, value in points], marker=".", label=name)
    ax.set_xlabel("training images seen")
    ax.set_ylabel(metric)
    return _save(fig, ax, path, f"Training: {metric} on the validation split")
