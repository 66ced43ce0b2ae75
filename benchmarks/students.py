"""Students made for int8 (issue 34, item 2): the Pareto rows of each candidate student, ``benchmarks/results/
students.json`` and its plot ``students.png``.

Each row: the candidate's fp32 and phone (ternary 1x1 convs + static int8) files at 224 px, b=1, onnxruntime CPU at
1 and 2 threads, taking turns with the imagenet100 recipe's ResNet50 teacher (random weights: latency and bytes do
not depend on their values; benchmarks/export_224.py's files and timing protocol), their bytes, and the
candidate's distilled tie-aware mAP on Fashion-MNIST at 32 px over its teacher's, read from
``benchmarks/results/distill.json`` (the converged protocol, full labels) where that benchmark distilled this
architecture. A candidate it did not distil has no mAP here: distilling one takes the converged teacher
(benchmarks/teacher.py, about 2.4 h on 2 CPU cores) and 15-25 min a student; ``python benchmarks/distill.py
--fractions 1.0 --seeds 0 --student ARCH --work bench_out/distill-ARCH --out ...`` then gives its figure.

    python benchmarks/students.py --out benchmarks/results/students.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import machine, write_json
from export_224 import SIZE, THREADS, exported, recipe_224, thread_latencies
from export_checks import fashion_test_pixels, save_untrained, square_pixels
from timing import RUNS, WARMUP

from hashdistill.errors import UserError
from hashdistill.export.mobile import quantize_int8
from hashdistill.plots import plot_pareto
from hashdistill.quantize.ttq import TTQConfig

CANDIDATES = ("mobilenetv2_100", "efficientnet_lite0", "tf_mobilenetv3_large_minimal_100", "mobilenetv3_large_100",
              "mobilenetv2_050", "tf_mobilenetv3_small_minimal_100", "lcnet_075")
TEACHER_RATIO_TARGET, MAP_RATIO_TARGET = 0.05, 0.93  # the targets for the shipped student


def export_files(folder: Path, archs: list[str], calibration: list) -> tuple[dict[str, dict[str, Any]], Path]:
    """Per candidate its fp32 image-in .onnx and, where static int8 calibrates, its phone .onnx (else the reason);
    and the teacher's .onnx."""
    recipe, info, extra = recipe_224("imagenet100")
    files: dict[str, dict[str, Any]] = {}
    teacher = None
    for arch in archs:
        arch_folder = folder / arch
        save_untrained(arch_folder, (recipe.teacher.backbone, arch), recipe.teacher.bits, info, extra,
                       {"pointwise": TTQConfig(scope="pointwise")})
        teacher = teacher or exported(arch_folder, "teacher")
        print(f"students: exporting {arch} ...", flush=True)
        files[arch] = {"fp32": exported(arch_folder, "student")}
        try:
            files[arch]["phone"] = quantize_int8(exported(arch_folder, "pointwise"), arch_folder / "phone.onnx",
                                                 calibration)
        except UserError as exc:  # random-init lcnet: activations shrink to 1e-5, too narrow to histogram
            files[arch]["phone_error"] = str(exc).split(": ", 1)[-1]
    assert teacher is not None
    return files, teacher


def distilled_ratios(distill: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """arch -> its distilled mAP figures at full labels, from distill.json (the architecture it distilled)."""
    out = {}
    for row in distill.get("rows", []):
        if row.get("labelled_fraction") == 1.0:
            out[distill["args"]["student"]] = {
                "distilled_map": row["distilled_map"]["mean"], "teacher_map": row["teacher_map"],
                "map_ratio": row["student_teacher_ratio"]["mean"], "seeds": len(row["seeds"]),
                "epochs": row["epochs"], "measured": row.get("measured"), "teacher_run": row["teacher_run"]}
    return out


def rows_of(files: dict[str, dict[str, Any]], latency: dict[str, Any], maps: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for arch, pair in files.items():
        row: dict[str, Any] = {"arch": arch, "fp32_onnx_bytes": pair["fp32"].stat().st_size,
                               "phone_onnx_bytes": pair["phone"].stat().st_size if "phone" in pair else None,
                               "phone_error": pair.get("phone_error"), **maps.get(arch, {"map_ratio": None})}
        for threads, stats in latency.items():
            teacher = stats["teacher"]["median_ms"]
            fp32 = stats[f"{arch} fp32"]["median_ms"]
            phone = stats[f"{arch} phone"]["median_ms"] if "phone" in pair else None
            row.update({f"fp32_ms_{threads}t": fp32, f"fp32_vs_teacher_{threads}t": fp32 / teacher,
                        f"phone_ms_{threads}t": phone,
                        f"phone_vs_teacher_{threads}t": None if phone is None else phone / teacher})
        # the file a phone would ship: the phone model where it exports, at its worse thread count
        kind = "phone" if "phone" in pair else "fp32"
        row["deployed"] = kind
        row["deployed_vs_teacher"] = max(row[f"{kind}_vs_teacher_{t}t"] for t in THREADS)
        rows.append(row)
    return rows


def pareto(rows: list[dict[str, Any]]) -> list[str]:
    """Candidates with an mAP that no other candidate beats on both mAP ratio and latency ratio."""
    points = {r["arch"]: (r["map_ratio"], -r["deployed_vs_teacher"]) for r in rows if r["map_ratio"] is not None}

    def dominated(p: tuple[float, float]) -> bool:  # another point at least as good on both, better on one
        return any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points.values())

    return [arch for arch, point in points.items() if not dominated(point)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/students.json")
    parser.add_argument("--work", default="bench_out/students")
    parser.add_argument("--students", default=",".join(CANDIDATES))
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--calibration", type=int, default=64, help="calibration images (latency does not "
                        "depend on how many)")
    parser.add_argument("--distill", default="benchmarks/results/distill.json")
    args = parser.parse_args()
    started = time.time()
    maps = distilled_ratios(json.loads(Path(args.distill).read_text()))  # first: a wrong path fails before the work
    folder = Path(args.work)
    archs = [a for a in args.students.split(",") if a]
    files, teacher = export_files(folder, archs, square_pixels(fashion_test_pixels(args.calibration), SIZE))
    paths = {"teacher": teacher}
    for arch, pair in files.items():
        paths.update({f"{arch} {kind}": path for kind, path in pair.items() if kind in ("fp32", "phone")})
    pixels = square_pixels(fashion_test_pixels(1), SIZE)[0][None]
    latency = thread_latencies(paths, pixels, args.runs)
    rows = rows_of(files, latency, maps)
    meeting = [r["arch"] for r in rows if r["map_ratio"] is not None and r["map_ratio"] >= MAP_RATIO_TARGET
               and r["deployed_vs_teacher"] <= TEACHER_RATIO_TARGET]
    plot = Path(args.out).with_suffix(".png")
    plot_pareto(rows, plot, TEACHER_RATIO_TARGET, MAP_RATIO_TARGET)
    write_json(args.out, {
        "benchmark": "students", "machine": machine(), "args": vars(args), "image_size": SIZE, "batch": 1,
        "threads": list(THREADS), "runs": args.runs, "warmup": WARMUP, "weights": "untrained (random init)",
        "teacher": "resnet50 (imagenet100 recipe)", "rows": rows, "latency": latency, "pareto": pareto(rows),
        "meeting_both_targets": meeting, "targets": {"deployed_vs_teacher": TEACHER_RATIO_TARGET,
                                                     "map_ratio": MAP_RATIO_TARGET},
        "plot": plot.name, "wall_seconds": time.time() - started})


if __name__ == "__main__":
    main()
