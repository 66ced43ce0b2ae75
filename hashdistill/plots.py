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


def plot_pareto(rows: list[dict], path: str | Path, latency_target: float, map_target: float) -> Path:
    """Candidate students: distilled mAP over the teacher's against the shipped file's latency over the teacher's.

    Rows need ``arch``, ``deployed_vs_teacher`` and ``map_ratio`` (None where the candidate was not distilled:
    drawn as a dotted line at its latency, so the plot still shows every candidate's speed)."""
    if not rows:
        raise UserError("plot_pareto needs at least one row")
    fig, ax = _axes(path)
    for row in rows:
        x, label = row["deployed_vs_teacher"], f"{row['arch']} ({row.get('deployed', 'phone')})"
        if row.get("map_ratio") is None:
            ax.axvline(x, linestyle=":", alpha=0.6, color="grey")
            ax.annotate(label, (x, 0.905), rotation=90, fontsize=7, va="bottom", ha="right")
        else:
            ax.scatter([x], [row["map_ratio"]], label=f"{label}: mAP {row['map_ratio']:.3f}")
    ax.axvline(latency_target, color="red", alpha=0.5, label=f"latency target {latency_target}x")
    ax.axhline(map_target, color="green", alpha=0.5, label=f"mAP target {map_target}x")
    ax.set_xlabel("shipped file latency / ResNet50 teacher (224 px, b=1, worse thread count)")
    ax.set_ylabel("distilled mAP / teacher mAP (Fashion-MNIST, 32 px)")
    ax.set_ylim(0.9, 1.01)
    ax.set_xlim(0, max(r["deployed_vs_teacher"] for r in rows) * 1.1)
    return _save(fig, ax, path, "Students: mAP kept vs phone latency (dotted: not distilled)")
