"""Hash-code distillation on Fashion-MNIST over seeds: distilled vs labels-only students at several label fractions.

Protocol (DESIGN.md, issue "Distillation that pays"): for each fraction f of labelled training images (a fixed,
seeded, class-stratified choice, ``data.labelled_fraction``), a teacher trained on the labelled images only (for
f = 1 the converged teacher of ``benchmarks/teacher.py``), then per seed:

- the distilled student: every training image, the teacher's codes on all of them, the label losses on the
  labelled ones;
- the labels-only student: the labelled images only, trained on the teacher's class codes, for the same number of
  optimisation steps (epochs scaled by 1/f: the same epochs on a tenth of the images would be a tenth of the
  training, and the comparison would measure that).

Queries = the 10k test images, database = the whole 60k training set, tie-aware mAP. Figures: mean and sd over
seeds; the gain is distilled minus labels-only per seed.

    python benchmarks/distill.py --out benchmarks/results/distill.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import machine, print_table, recipe, run_stages, share_checkpoints, write_json
from teacher import training_overrides

from hashdistill.app.pipeline import Pipeline
from hashdistill.app.report import write_report
from hashdistill.distill.student_stage import train_student
from hashdistill.rundir import RunDir

LABELS_ONLY = "student (labels only)"
MAX_LABELS_ONLY_EPOCHS = 1000


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def fraction_teacher(fraction: float, args: argparse.Namespace, base: list[str]) -> Path:
    """The teacher of one label fraction: the converged one for f = 1, else one trained on the labelled images
    with the converged teacher's schedule (``--fraction-teacher-epochs``)."""
    if fraction >= 1:
        return Path(args.teacher_run)
    folder = Path(args.work) / f"teacher-f{fraction:g}"
    float_epochs, llc_epochs = (int(e) for e in args.fraction_teacher_epochs.split(","))
    run_stages(recipe("fashion-mnist", [*base, *training_overrides(float_epochs, llc_epochs),
                                        f"data.labelled_fraction={fraction}"]), folder, ("teacher",))
    return folder


def labels_only(base: list[str], seed: int, fraction: float, run: RunDir) -> None:
    """The labels-only student of ``run``, for as many steps as the distilled one, evaluated like it."""
    path = run.checkpoint("student-labels-only")
    distilled = recipe("fashion-mnist", base).student.train.epochs
    epochs = min(MAX_LABELS_ONLY_EPOCHS, round(distilled / fraction))
    r = recipe("fashion-mnist", [*base, f"data.labelled_fraction={fraction}", f"seed={seed}",
                                 f"student.train.epochs={epochs}"])
    if not path.is_file():
        train_student(r, run, torch.device("cpu"), run.checkpoint("teacher"), labels_only=True,
                      name="student-labels-only")
    Pipeline(r, run).evaluate_checkpoint(LABELS_ONLY, path)
    write_report(run)  # with the training curves of both students


def curve(run: RunDir, stage: str) -> list[float]:
    return [r["val_map_tie_aware"] for r in run.metrics() if r.get("stage") == stage and "val_map_tie_aware" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-run", default="bench_out/teacher-converged/k16",
                        help="the full-label teacher (benchmarks/teacher.py's converged 16-bit run)")
    parser.add_argument("--out", default="benchmarks/results/distill.json")
    parser.add_argument("--work", default="bench_out/distill")
    parser.add_argument("--student", default="lcnet_075", help="timm name of the student")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.01,0.1,1.0", help="labelled fractions, comma-separated")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the distilled student")
    parser.add_argument("--teacher-overrides", default="teacher.backbone=resnet18,teacher.bits=16",
                        help="must match the teacher run's data and bits")
    parser.add_argument("--fraction-teacher-epochs", default="20,4",
                        help="float baseline and LLC phase epochs of the teachers trained on a labelled fraction")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every student run, e.g. student.temperature=4 (repeatable)")
    args = parser.parse_args()
    base = [*args.teacher_overrides.split(","), f"student.model={args.student}", f"student.train.epochs={args.epochs}",
            *args.set]
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.time()
    rows = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        teacher_run = fraction_teacher(fraction, args, base)
        per_seed = []
        for seed in seeds:
            folder = Path(args.work) / f"f{fraction:g}-s{seed}"
            share_checkpoints(teacher_run, folder, ("teacher",))
            r = recipe("fashion-mnist", [*base, f"data.labelled_fraction={fraction}", f"seed={seed}"])
            run_stages(r, folder, ("teacher", "student"))
            run = RunDir(folder)
            labels_only(base, seed, fraction, run)
            models = run.summary()["models"]
            per_seed.append({"seed": seed, "distilled": models["student"]["map_tie_aware"],
                             "labels_only": models[LABELS_ONLY]["map_tie_aware"],
                             "teacher": models["teacher"]["map_tie_aware"],
                             "asymmetric": models["student -> teacher db"]["map_tie_aware"],
                             "params": models["student"]["params"], "teacher_params": models["teacher"]["params"],
                             "curves": {"distilled": curve(run, "student"),
                                        "labels_only": curve(run, "student-labels-only")}})
        gains = [100 * (s["distilled"] - s["labels_only"]) for s in per_seed]
        rows.append({"labelled_fraction": fraction, "teacher_run": str(teacher_run),
                     "teacher_map": per_seed[0]["teacher"], "params": per_seed[0]["params"],
                     "param_ratio": per_seed[0]["teacher_params"] / per_seed[0]["params"],
                     "distilled_map": mean_sd([s["distilled"] for s in per_seed]),
                     "labels_only_map": mean_sd([s["labels_only"] for s in per_seed]),
                     "asymmetric_map": mean_sd([s["asymmetric"] for s in per_seed]),
                     "gain_points": mean_sd(gains),
                     "student_teacher_ratio": mean_sd([s["distilled"] / s["teacher"] for s in per_seed]),
                     "seeds": per_seed})
        print_table([{"fraction": r["labelled_fraction"], "teacher": r["teacher_map"],
                      "distilled": r["distilled_map"]["mean"], "labels_only": r["labels_only_map"]["mean"],
                      "gain_points": r["gain_points"]["mean"], "gain_sd": r["gain_points"]["sd"]} for r in rows],
                    ["fraction", "teacher", "distilled", "labels_only", "gain_points", "gain_sd"])
        by_fraction = {r["labelled_fraction"]: r for r in rows}
        full, tenth = by_fraction.get(1.0), by_fraction.get(0.1)
        write_json(args.out, {
            "benchmark": "distill", "machine": machine(), "args": vars(args), "seeds": len(seeds),
            "kd_gain_points_full_labels": full["gain_points"]["mean"] if full else None,
            "kd_gain_points_10pct_labels": tenth["gain_points"]["mean"] if tenth else None,
            "student_teacher_map_ratio": full["student_teacher_ratio"]["mean"] if full else None,
            "rows": rows, "wall_seconds": time.time() - started})


if __name__ == "__main__":
    main()
