"""Hash-code distillation on Fashion-MNIST over seeds: distilled vs labels-only vs DSH students at several label
fractions, and an ablation of the distillation losses.

Protocol (DESIGN.md, issue "Students that reach their teacher"): for each fraction f of labelled training images
(a fixed, seeded, class-stratified choice, ``data.labelled_fraction``), a teacher trained on the labelled images
only (for f = 1 the converged teacher of ``benchmarks/teacher.py``), whose logits of every training view (50
shift + flip views of each of the 54k images) are computed once (the teacher cache); then per seed:

- the distilled student: every training image, augmented, the teacher's codes of exactly its view;
- the labels-only student (class codes): the labelled images only, BCE against the teacher's class codes;
- the DSH student, the DTH paper's baseline: the labelled images only, the DSH pairwise loss on the labels.

Every student trains with the same augmentation and for the same number of optimisation steps (``--epochs``; a
baseline's epoch repeats the labelled images to the length of the whole split), long enough that its validation
mAP has stopped rising (the curves are recorded), and is kept at its best validation mAP. Queries = the 10k test
images, database = the whole 60k training set, tie-aware mAP, in both search paradigms: each student's own database,
and the student's queries against the teacher-built database.
Figures: mean and sd over seeds; a gain is a difference per seed.

    python benchmarks/distill.py --out benchmarks/results/distill.json
    python benchmarks/distill.py --ablation --fractions 1.0 --out benchmarks/results/distill-losses.json

Runs already finished in ``--work`` are reused, so seeds can train in parallel processes (``--seeds 1``) and a
last call with every seed reads them all. On a small machine the table grows by parts: ``--no-prefill`` lets a
lone distilled student compute only the teacher views it draws, ``--without dsh`` leaves a baseline out of a
fraction's row, and ``--merge`` keeps the rows (and step timing) of ``--out`` that this call does not measure:

    python benchmarks/distill.py --fractions 0.1 --seeds 0,1 --without dsh --no-prefill --merge
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import machine, print_table, recipe, run_stages, share_checkpoints, write_json
from teacher import training_overrides

from hashdistill.app.pipeline import Pipeline
from hashdistill.app.report import write_report
from hashdistill.distill.losses import LossInputs, weighted_loss
from hashdistill.distill.models import load_model
from hashdistill.distill.student_stage import (
    BASELINE_STAGES,
    BASELINES,
    IndexedDataset,
    build_student,
    student_training_set,
    teacher_cache_for,
    train_student,
)
from hashdistill.distill.teacher_cache import CACHE_FILE, precompute
from hashdistill.recipe import Recipe
from hashdistill.rundir import RunDir
from hashdistill.trainer import resolve_device

DEVICE = resolve_device("auto")  # the recipes' device: a GPU where there is one
STUDENTS = {"distilled": ("student", "student"), "labels_only": ("student-labels-only", "student (labels only)"),
            "dsh": ("student-dsh", "student (DSH)")}  # key -> (checkpoint / stage name, summary name)
TEACHER_DB = " -> teacher db"
ABLATION = {  # loss weights of each ablation row (student.losses)
    "kd": {"bernoulli_kd": 1.0},
    "kd + code_relation": {"bernoulli_kd": 1.0, "code_relation": 1.0},
    "kd + code_bce": {"bernoulli_kd": 1.0, "code_bce": 1.0},
    "kd + code_bce + code_relation": {"bernoulli_kd": 1.0, "code_bce": 1.0, "code_relation": 1.0},
    "code_relation": {"code_relation": 1.0},
}


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def teacher_settings(fraction: float, args: argparse.Namespace) -> list[str]:
    """The teacher's schedule for a label fraction, which every student run of that fraction repeats (a run checks
    that the teacher it finds is its recipe's): the converged teacher's for f = 1 (``--teacher-epochs``), else
    the fraction's entry of ``--fraction-teacher-epochs``."""
    epochs = args.teacher_epochs if fraction >= 1 else fraction_epochs(args.fraction_teacher_epochs, fraction)
    return [*training_overrides(*(int(e) for e in epochs.split(","))), f"data.labelled_fraction={fraction}"]


def fraction_epochs(spec: str, fraction: float) -> str:
    """``--fraction-teacher-epochs``: one schedule for every fraction (``20,4``), or one per fraction
    (``0.01=200,40;0.1=20,4``): a teacher of fewer labelled images needs more epochs for as many steps."""
    if "=" not in spec:
        return spec
    schedules = {float(f): epochs for f, epochs in (entry.split("=") for entry in spec.split(";"))}
    if fraction not in schedules:
        raise SystemExit(f"--fraction-teacher-epochs has no schedule for the fraction {fraction:g}")
    return schedules[fraction]


def fraction_teacher(fraction: float, args: argparse.Namespace, base: list[str]) -> Path:
    """The teacher of one label fraction: the converged one for f = 1 (trained with the converged teacher
    benchmark's schedule where ``--teacher-run`` holds none), else one trained on the labelled images; its cache of
    every training view filled once, in its own folder (unless ``--no-prefill``: then each distilled student
    computes the views it draws, as it trains)."""
    folder = Path(args.teacher_run) if fraction >= 1 else Path(args.work) / f"teacher-f{fraction:g}"
    r = recipe("fashion-mnist", [*base, *teacher_settings(fraction, args)])
    if fraction < 1 or not RunDir(folder, writer=False).checkpoint("teacher").is_file():
        run_stages(r, folder, ("teacher",))
    if args.prefill:
        fill_cache(r, RunDir(folder))
    return folder


def fill_cache(r: Recipe, run: RunDir) -> None:
    """Every training view's teacher logits in ``run``'s cache file, computed in large batches once."""
    teacher_path = run.checkpoint("teacher")
    train = student_training_set(r)
    cache = teacher_cache_for(r, train, teacher_path, {"bernoulli_kd": 1.0}, run, DEVICE)
    if not cache.complete:
        started = time.time()
        teacher, _ = load_model(str(teacher_path))
        precompute(cache, teacher, train, DEVICE, 2000).save(run.checkpoint(CACHE_FILE))
        print(f"teacher cache {tuple(cache.logits.shape)} of {teacher_path}: {time.time() - started:.0f} s")


def train_baseline(base: list[str], seed: int, fraction: float, run: RunDir, kind: str) -> None:
    """A labels-only baseline of ``run`` (``base`` holds its fraction's teacher settings) for as many steps as the
    distilled student, evaluated like it."""
    stage, name = STUDENTS[kind]
    r = recipe("fashion-mnist", [*base, f"seed={seed}"])
    path = run.checkpoint(stage)
    if not path.is_file():
        train_student(r, run, DEVICE, run.checkpoint("teacher"), labels_only=baseline_of(kind), name=stage)
    evaluate_both_ways(Pipeline(r, run), name, path)


def baseline_of(kind: str) -> str:
    return next(b for b, stage in BASELINE_STAGES.items() if stage == STUDENTS[kind][0])


def evaluate_both_ways(pipeline: Pipeline, name: str, path: Path) -> None:
    pipeline.evaluate_checkpoint(name, path)
    pipeline.evaluate_checkpoint(name + TEACHER_DB, path, database_from="teacher")


def curve(run: RunDir, stage: str) -> list[float]:
    return [r["val_map_tie_aware"] for r in run.metrics() if r.get("stage") == stage and "val_map_tie_aware" in r]


def seed_row(run: RunDir, seed: int, kinds: tuple[str, ...]) -> dict:
    models = run.summary()["models"]
    row = {"seed": seed, "teacher": models["teacher"]["map_tie_aware"], "params": models["student"]["params"],
           "teacher_params": models["teacher"]["params"], "curves": {}, "best_epochs": {}}
    for kind in kinds:
        stage, name = STUDENTS[kind]
        row[kind] = models[name]["map_tie_aware"]
        row[f"{kind}_teacher_db"] = models[name + TEACHER_DB]["map_tie_aware"]
        row["curves"][kind] = curve(run, stage)
        row["best_epochs"][kind] = max(range(len(row["curves"][kind])), key=row["curves"][kind].__getitem__)
    return row


def step_ratio(r: Recipe, run: RunDir, steps: int = 20, rounds: int = 5) -> dict[str, float]:
    """Optimisation steps per second of the distilled student (teacher logits from the full cache) over those of
    the labels-only student, same student, batches and augmentation, interleaved in one process (median of
    ``rounds`` rounds of ``steps`` steps each)."""
    teacher_path = run.checkpoint("teacher")
    teacher, _ = load_model(str(teacher_path))
    train = student_training_set(r)
    indexed = IndexedDataset(train)
    cache = teacher_cache_for(r, train, teacher_path, r.student.losses, run, DEVICE)
    assert cache is not None and cache.complete, "fill the teacher cache first"
    losses = {"distilled": r.student.losses, "labels_only": BASELINES["codes"]}
    torch.manual_seed(0)
    student = build_student(r.student, teacher, r.data.image_size).to(DEVICE, memory_format=torch.channels_last)
    teacher.to(DEVICE)
    optimiser = torch.optim.AdamW(student.parameters(), lr=1e-4)
    size = r.data.batch_size
    batches = [train.augment_batch([t.to(DEVICE) for t in indexed.get_batch([(i * size + j) % len(train)
                                                                             for j in range(size)])])
               for i in range(steps)]
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def step(kind: str, batch: list[torch.Tensor]) -> None:
        x, y, views, index = batch[0].contiguous(memory_format=torch.channels_last), *batch[1:]
        z_t = cache.lookup(teacher, x, index, views) if kind == "distilled" else None
        inputs = LossInputs(student(x), z_t, y, student.codes, r.student.temperature, r.student.dsh_margin,
                            r.student.relation_temperature)
        loss = weighted_loss(losses[kind])(inputs)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    timings: dict[str, list[float]] = {kind: [] for kind in losses}
    for kind in losses:  # warm-up
        for batch in batches[:3]:
            step(kind, batch)
    for _ in range(rounds):
        for kind in losses:
            sync()
            started = time.perf_counter()
            for batch in batches:
                step(kind, batch)
            sync()
            timings[kind].append(steps / (time.perf_counter() - started))
    rates = {kind: statistics.median(v) for kind, v in timings.items()}
    return {"distilled_steps_per_s": rates["distilled"], "labels_only_steps_per_s": rates["labels_only"],
            "ratio": rates["distilled"] / rates["labels_only"], "batch_size": r.data.batch_size,
            "device": str(DEVICE), "threads": torch.get_num_threads()}


def student_table(args: argparse.Namespace, base: list[str], seeds: list[int], started: float) -> None:
    kinds = tuple(k for k in STUDENTS if k not in args.without)  # the students of the table
    kept = json.loads(Path(args.out).read_text()) if args.merge and Path(args.out).is_file() else {}
    fractions = [float(f) for f in args.fractions.split(",")]
    rows = [r for r in kept.get("rows", []) if r["labelled_fraction"] not in fractions]
    step = kept.get("step_timing")  # None unless merged: measured below
    for fraction in fractions:
        teacher_run = fraction_teacher(fraction, args, base)
        if args.prepare:
            continue
        students = [*base, *teacher_settings(fraction, args)]
        per_seed = []
        for seed in seeds:
            folder = Path(args.work) / f"f{fraction:g}-s{seed}"
            share_checkpoints(teacher_run, folder, ("teacher",))  # the teacher and its cache of views
            if "distilled" in args.students:
                run_stages(recipe("fashion-mnist", [*students, f"seed={seed}"]), folder, ("teacher", "student"))
            run = RunDir(folder)
            for kind in kinds[1:]:
                if kind in args.students:
                    train_baseline(students, seed, fraction, run, kind)
            if set(args.students) != set(kinds):
                continue  # a process training some of the students; a last call with all of them reads every run
            write_report(run)  # with the training curves of every student
            per_seed.append(seed_row(run, seed, kinds))
        if not per_seed:
            continue
        if fraction >= 1 and not args.skip_step_ratio:
            step = step_ratio(recipe("fashion-mnist", students), RunDir(teacher_run))
        rows = sorted([*rows, fraction_row(fraction, teacher_run, per_seed, kinds, args)],
                      key=lambda r: r["labelled_fraction"])
        print_table([{"fraction": r["labelled_fraction"], "seeds": len(r["seeds"]), "teacher": r["teacher_map"],
                      **{k: mean_of(r, f"{k}_map") for k in STUDENTS}, "gain": mean_of(r, "gain_points"),
                      "gain_dsh": mean_of(r, "gain_over_dsh_points")} for r in rows],
                    ["fraction", "seeds", "teacher", *STUDENTS, "gain", "gain_dsh"])
        write_json(args.out, table_figures(args, base, rows, step, started))


def mean_of(row: dict | None, key: str) -> float | None:
    """A row's mean of ``key``; None where the row, or that student, is missing."""
    return row[key]["mean"] if row and row.get(key) else None


def table_figures(args: argparse.Namespace, base: list[str], rows: list[dict], step: dict | None,
                  started: float) -> dict:
    """The JSON of the student table: the issue's headline keys (means over each row's seeds) and the rows."""
    by_fraction = {r["labelled_fraction"]: r for r in rows}
    full, tenth = by_fraction.get(1.0), by_fraction.get(0.1)
    return {"benchmark": "distill", "machine": machine(), "args": vars(args),
            "seeds": {f"{r['labelled_fraction']:g}": len(r["seeds"]) for r in rows},
            "losses": recipe("fashion-mnist", base).student.losses,
            "student_teacher_map_ratio": mean_of(full, "student_teacher_ratio"),
            "kd_gain_points_full_labels": mean_of(full, "gain_points"),
            "kd_gain_points_10pct_labels": mean_of(tenth, "gain_points"),
            "kd_gain_over_dsh_points_full_labels": mean_of(full, "gain_over_dsh_points"),
            "asymmetric_teacher_ratio": mean_of(full, "asymmetric_teacher_ratio"),
            "kd_step_vs_labels_only_step": step["ratio"] if step else None, "step_timing": step,
            "rows": rows, "wall_seconds": time.time() - started}


def fraction_row(fraction: float, teacher_run: Path, per_seed: list[dict], kinds: tuple[str, ...],
                 args: argparse.Namespace) -> dict:
    def points(a: str, b: str) -> dict[str, float] | None:
        return mean_sd([100 * (s[a] - s[b]) for s in per_seed]) if b in kinds else None

    return {"labelled_fraction": fraction, "teacher_run": str(teacher_run), "teacher_map": per_seed[0]["teacher"],
            "epochs": args.epochs, "measured": time.strftime("%Y-%m-%d"), "machine": machine(),
            "params": per_seed[0]["params"], "param_ratio": per_seed[0]["teacher_params"] / per_seed[0]["params"],
            **{f"{k}_map": mean_sd([s[k] for s in per_seed]) for k in kinds},
            **{f"{k}_teacher_db_map": mean_sd([s[f"{k}_teacher_db"] for s in per_seed]) for k in kinds},
            "gain_points": points("distilled", "labels_only"), "gain_over_dsh_points": points("distilled", "dsh"),
            "student_teacher_ratio": mean_sd([s["distilled"] / s["teacher"] for s in per_seed]),
            "asymmetric_teacher_ratio": mean_sd([s["distilled_teacher_db"] / s["teacher"] for s in per_seed]),
            "seeds": per_seed}


def loss_ablation(args: argparse.Namespace, base: list[str], seeds: list[int], started: float) -> None:
    """The distilled student under each loss combination of ABLATION, full labels, same schedule and teacher."""
    teacher_run = fraction_teacher(1.0, args, base)
    default = recipe("fashion-mnist", base).student.losses
    rows = []
    for name, weights in ABLATION.items():
        if args.only and name not in args.only:
            continue
        per_seed = []
        for seed in seeds:  # the default losses' row is the student table's distilled student at full labels
            folder = Path(args.work) / (f"f1-s{seed}" if weights == default else
                                        f"ablation/{name.replace(' + ', '+')}-s{seed}")
            share_checkpoints(teacher_run, folder, ("teacher",))
            losses = "{" + ", ".join(f"{k}: {v}" for k, v in weights.items()) + "}"
            r = recipe("fashion-mnist", [*base, *teacher_settings(1.0, args), f"seed={seed}",
                                         f"student.losses={losses}"])
            run_stages(r, folder, ("teacher", "student"))
            per_seed.append(seed_row(RunDir(folder), seed, ("distilled",)))
        rows.append({"losses": name, "weights": weights,
                     "map": mean_sd([s["distilled"] for s in per_seed]),
                     "teacher_db_map": mean_sd([s["distilled_teacher_db"] for s in per_seed]),
                     "student_teacher_ratio": mean_sd([s["distilled"] / s["teacher"] for s in per_seed]),
                     "teacher_map": per_seed[0]["teacher"], "seeds": per_seed})
        print_table([{"losses": r["losses"], "map": r["map"]["mean"], "sd": r["map"]["sd"],
                      "teacher_db": r["teacher_db_map"]["mean"]} for r in rows], ["losses", "map", "sd", "teacher_db"])
        best = max(rows, key=lambda r: r["map"]["mean"])
        write_json(args.out, {"benchmark": "distill-losses", "machine": machine(), "args": vars(args),
                              "seeds": len(seeds), "best": best["losses"], "rows": rows,
                              "wall_seconds": time.time() - started})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-run", default="bench_out/teacher-converged/k16",
                        help="the full-label teacher (benchmarks/teacher.py's converged 16-bit run)")
    parser.add_argument("--out", default="benchmarks/results/distill.json")
    parser.add_argument("--work", default="bench_out/distill-converged")
    parser.add_argument("--student", default="lcnet_075", help="timm name of the student")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.01,0.1,1.0", help="labelled fractions, comma-separated")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the distilled student")
    parser.add_argument("--teacher-overrides", default="teacher.backbone=resnet18,teacher.bits=16",
                        help="must match the teacher run's data and bits")
    parser.add_argument("--teacher-epochs", default="30,4,8",
                        help="float baseline, LLC phase 1 and phase 2 epochs of the --teacher-run (teacher.py's)")
    parser.add_argument("--fraction-teacher-epochs", default="0.01=200,40;0.1=20,4",
                        help="float baseline and LLC phase epochs of the teachers trained on a labelled fraction, "
                             "per fraction (F=E,E;...) or one schedule for all (E,E); 20,4 over 1%% of the images "
                             "left the teacher below its labels-only student")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every student run, e.g. student.temperature=4 (repeatable)")
    parser.add_argument("--ablation", action="store_true", help="the loss ablation (ABLATION) instead of the table")
    parser.add_argument("--skip-step-ratio", action="store_true", help="no step timing (a run beside other work)")
    parser.add_argument("--prepare", action="store_true", help="only train the fraction teachers and fill the caches")
    parser.add_argument("--no-prefill", dest="prefill", action="store_false",
                        help="no teacher cache filled beforehand: the distilled student computes each view it draws "
                             "(about half of them in 30 epochs), the cheaper way for a single student per teacher")
    parser.add_argument("--students", default=",".join(STUDENTS),
                        help="which students this process trains (a last call with all of them writes the JSON)")
    parser.add_argument("--without", default="",
                        help="students the table leaves out at these fractions (not trained), e.g. dsh")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows (each says its seeds, epochs and date) and the step timing of --out for "
                             "what this call does not measure, so a table can grow over several sessions")
    parser.add_argument("--only", default="", help="ablation rows to run, separated by ';' (default: all)")
    args = parser.parse_args()
    base = [*args.teacher_overrides.split(","), "data.augment=true", f"student.model={args.student}",
            f"student.train.epochs={args.epochs}", "student.train.warmup_epochs=1", *args.set]
    seeds = [int(s) for s in args.seeds.split(",")]
    args.students = [s for s in args.students.split(",") if s]
    args.only = [s for s in args.only.split(";") if s]
    args.without = [s for s in args.without.split(",") if s]
    args.students = [s for s in args.students if s not in args.without]
    if set(args.students) - set(STUDENTS) or set(args.without) - {"labels_only", "dsh"}:
        parser.error(f"--students: choose from {', '.join(STUDENTS)}; --without: from labels_only, dsh")
    (loss_ablation if args.ablation else student_table)(args, base, seeds, time.time())


if __name__ == "__main__":
    main()
