"""report.md for a run directory, regenerated from summary.json alone (``hashdistill report``).

Images are written next to report.md and linked relatively, so the report renders on GitHub and
in a browser from the run directory.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from hashdistill.atomic import atomic_write_text
from hashdistill.checkpoint import read_metadata
from hashdistill.codes import to_signs
from hashdistill.errors import UserError
from hashdistill.plots import plot_bits_sweep, plot_pr_curves, plot_training_curves
from hashdistill.rundir import BITS_PLOT, CURVES_PLOT, DEMO_SHOT, PR_PLOT, REPORT_FILE, TAXONOMY_PLOT, RunDir
from hashdistill.taxonomy import class_tree, format_tree, plot_dendrogram

COLUMNS = [("bits", "bits"), ("params", "params"), ("file_bytes", "file bytes"), ("latency_ms_b1", "CPU ms (b=1)"),
           ("latency_ms_b64", "CPU ms (b=64)"), ("map_tie_aware", "mAP (tie-aware)"),
           ("map_reranked", "mAP (re-ranked by float query)"), ("map", "mAP (order-dependent)"),
           ("precision_at_radius", "P@r2 (mean per query)"),
           ("mhd_accuracy", "MHD acc"), ("ed_accuracy", "ED acc"), ("accuracy", "float acc"),
           ("codes_equal_fp32_onnx", "codes = fp32 ONNX")]
TABLE_NOTE = ("mAP (tie-aware) is the expected AP over random orders within equal Hamming distances and does not "
              "depend on the database order; mAP (re-ranked by float query) ranks the database by the score "
              "z_q . b of the query's float logits against the database's binary codes (ties, e.g. equal codes, "
              "counted the same tie-aware way); mAP (order-dependent) breaks ties by database index. P@r2 (mean per "
              "query) averages each query's precision within radius 2; the precision-recall curve below pools the "
              "counts of all queries instead, so its point at radius 2 differs.")


def write_report(run: RunDir) -> Path:
    """Write report.md (+ PR curves and taxonomy PNGs) from the run's saved figures."""
    summary = run.summary()
    models: dict[str, dict[str, Any]] = summary.get("models", {})
    if not models:
        raise UserError(f"{run.path} has no evaluated models yet (summary.json is empty); nothing to report")
    lines = [f"# hashdistill run: {run.path.name}", "", "## Models", "", _table(models), "", TABLE_NOTE, ""]
    curves = {name: m["pr_curve"] for name, m in models.items() if "pr_curve" in m}
    if curves:
        plot_pr_curves(curves, run.output(PR_PLOT))
        lines += ["## Precision-recall by Hamming radius (pooled over queries)", "",
                  f"![precision-recall curves]({PR_PLOT})", ""]
    lines += _curves_section(run)
    lines += _bits_sweep_section(run, summary.get("bits_sweep"))
    lines += _ood_section(models)
    lines += _taxonomy_section(run)
    lines += _quantize_section(summary.get("quantize"))
    if "export" in summary:
        e = summary["export"]
        lines += ["## Export", "", f"identical codes ONNX vs PyTorch: {e.get('identical_code_rate')}, "
                  f"max |logit diff|: {e.get('max_abs_logit_diff')}, file bytes: {e.get('file_bytes')}", ""]
    if "declined" in summary.get("export_phone", {}):
        lines += [f"No phone model: {summary['export_phone']['declined']}", ""]
    elif "export_phone" in summary:
        int8 = summary["export_phone"].get("int8", {})
        lines += [f"Phone model ({Path(summary['export_phone'].get('onnx', '')).name}: the ternary student with int8 "
                  f"float layers, {int8.get('mode')} calibration): {_cell(int8.get('file_bytes'))} bytes against "
                  f"{_cell(int8.get('float_file_bytes'))} for the fp32 file; its codes equal the fp32 file's on "
                  f"{_cell(int8.get('identical_code_rate_vs_float_onnx'))} of the verification images.", ""]
    if (run.path / DEMO_SHOT).is_file():
        lines += ["## Demo page", "", "The phone model searching this run's index in headless Chromium "
                  "(`hashdistill demo`), onnxruntime-web:", "", f"![demo page]({DEMO_SHOT})", ""]
    lines += ["## Reproduce", "", "```", *_commands(run), "```", ""]
    return atomic_write_text(run.output(REPORT_FILE), "\n".join(lines))


def _table(models: dict[str, dict[str, Any]]) -> str:
    present = [(key, title) for key, title in COLUMNS if any(key in m for m in models.values())]
    rows = ["| model | " + " | ".join(t for _, t in present) + " |", "|---" * (len(present) + 1) + "|"]
    for name, figures in models.items():
        rows.append(f"| {name} | " + " | ".join(_cell(figures.get(key)) for key, _ in present) + " |")
    return "\n".join(rows)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.1f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


CURVE_METRIC = "val_map_tie_aware"


def _curves_section(run: RunDir) -> list[str]:
    """mAP on the validation split against the training images seen so far, one line per hash-code training stage
    (a distilled student beside its labels-only baseline, which may take more, shorter epochs for the same
    number of steps)."""
    curves: dict[str, list[tuple[float, float]]] = {}
    seen: dict[str, float] = {}
    for record in run.metrics():
        stage, value = str(record.get("stage")), record.get(CURVE_METRIC)
        if not isinstance(value, float):
            continue
        images = float(record.get("images_per_s", 0)) * float(record.get("epoch_seconds", 0))  # this epoch's
        seen[stage] = seen.get(stage, 0.0) + images
        curves.setdefault(stage, []).append((seen[stage], value))
    if not curves:
        return []
    plot_training_curves(curves, run.output(CURVES_PLOT), "mAP (tie-aware)")
    return ["## Training curves", "", "Tie-aware mAP of the validation images searching among themselves, after "
            "each epoch, against the training images seen.", "", f"![training curves]({CURVES_PLOT})", ""]


def _bits_sweep_section(run: RunDir, sweep: dict[str, dict[str, Any]] | None) -> list[str]:
    if not sweep or len(sweep) < 2:
        return []
    rows = sorted(sweep.values(), key=lambda r: r["bits"])
    plot_bits_sweep(rows, run.output(BITS_PLOT))
    table = [f"| {r['bits']} | {r['mhd_accuracy']:.4f} | {r['ed_accuracy']:.4f} | {r['map_tie_aware']:.4f} | "
             f"{r['map']:.4f} | {r['precision_at_radius']:.4f} |" for r in rows]
    return ["## Code length vs accuracy (teachers of the bits sweep)", "", f"![bits vs accuracy]({BITS_PLOT})", "",
            "| bits | MHD acc | ED acc | mAP (tie-aware) | mAP (order-dependent) | P@r2 (mean per query) |",
            "|---|---|---|---|---|---|", *table, ""]


def _ood_section(models: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for name, m in models.items():
        ood = m.get("ood")
        if not ood:
            continue
        ex, msp = ood["exact_match"], ood["msp_baseline"]
        if "tpr_at_exact_match_fpr" not in msp:  # evaluated by a version before the comparison existed
            msp = {**msp, "tpr_at_exact_match_fpr": float("nan"), "samples_to_match_exact_match": "not computed"}
        needed = msp["samples_to_match_exact_match"]
        rows.append(f"| {name} | {ex['tpr']:.4f} | {ex['fpr']:.4f} | {ex['tpr'] - ex['fpr']:.4f} | {ex['auroc']:.4f} "
                    f"| {msp['tpr']:.4f} | {msp['fpr']:.4f} | {msp['tpr'] - msp['fpr']:.4f} | {msp['auroc']:.4f} "
                    f"| {msp['tpr_at_exact_match_fpr']:.4f} | {'never' if needed is None else needed} |")
    if not rows:
        return []
    return ["## Out-of-distribution detection", "",
            "Exact match: an input whose code equals no class code is OOD (no threshold, no OOD samples). "
            "Baseline: max-softmax probability (MSP) with the threshold that maximises J = TPR - FPR on "
            "held-out ID and OOD samples.", "",
            "| model | exact TPR | exact FPR | exact J | exact AUROC* | MSP TPR | MSP FPR | MSP J | MSP AUROC "
            "| MSP TPR at exact FPR | held-out samples MSP needs to match exact J |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
            "*AUROC of the exact-match detector scores by the Hamming distance to the nearest class code. "
            "The last column: half ID, half OOD samples, mean over 50 random draws.", ""]


def _taxonomy_section(run: RunDir) -> list[str]:
    teacher = run.checkpoint("teacher")
    if not teacher.is_file():
        return []
    from safetensors.numpy import load_file

    meta = read_metadata(teacher)
    codebook = load_file(str(teacher))["codebook"]
    signs = to_signs(codebook)
    tree = class_tree(signs, meta["class_names"])
    plot_dendrogram(tree, meta["class_names"], run.output(TAXONOMY_PLOT))
    return ["## Taxonomy of the classes (from the teacher's class codes)", "",
            f"![class dendrogram]({TAXONOMY_PLOT})", "", "```", format_tree(tree, meta["class_names"]), "```", ""]


def _quantize_section(quantize: dict[str, Any] | None) -> list[str]:
    if not quantize:
        return []
    layers = quantize["layers"]
    before = sum(layer["bytes_fp32"] for layer in layers)
    after = sum(layer["bytes_packed"] for layer in layers)
    rows = [f"| {la['name']} | {la['shape']} | {la['sparsity']:.3f} | {la['wp']:.4g} | {la['wn']:.4g} | "
            f"{la['bytes_fp32']:,} | {la['bytes_packed']:,} |" for la in layers]
    return ["## Ternary quantization", "",
            f"{len(layers)} layers quantized: {before:,} bytes fp32 -> {after:,} bytes packed "
            f"({before / max(after, 1):.1f}x smaller). Fine-tuned with losses {quantize.get('losses')}, "
            f"teacher: {quantize.get('teacher')}.", "",
            "| layer | shape | sparsity | Wp | Wn | bytes fp32 | bytes packed |", "|---|---|---|---|---|---|---|",
            *rows, ""]


def _commands(run: RunDir) -> list[str]:
    path = shlex.quote(str(run.path))
    return [f"hashdistill run {path}/recipe.yaml --out {path}-again",
            f"hashdistill report {path}"]
