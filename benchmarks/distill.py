"""Hash-code distillation on Fashion-MNIST: students distilled vs trained on labels only, vs the teacher.

For each student: mAP (both forms), MHD accuracy, parameters, FLOPs and CPU latency; the same
student trained on the teacher's class codes only (labels only, same epochs); student queries
against the teacher-built database (asymmetric retrieval); and distillation throughput with the
cached teacher against a student-only epoch, measured in the same run. A sweep on one student
looks for what makes distillation pay (temperature, loss mix, augmentation with the teacher online).

    python benchmarks/distill.py --teacher-run bench_out/teacher/k16 --out benchmarks/results/distill.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import machine, print_table, recipe, run_stages, share_checkpoints, write_json
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from hashdistill.data import build_dataset
from hashdistill.distill.models import load_model
from hashdistill.distill.student_stage import (
    LABELS_ONLY,
    IndexedDataset,
    build_student,
    distillation_batch_loss,
    train_student,
)
from hashdistill.pipeline import Pipeline
from hashdistill.recipe import Recipe
from hashdistill.rundir import RunDir

STUDENTS = {  # label -> recipe overrides; any other label is a timm model name
    # resnet18 at a third of its width (and ~1/10 of its parameters): the teacher's own family
    "resnet18-thin": ["student.model=resnet18", "student.model_kwargs={channels: [20, 40, 80, 160]}"],
}

SWEEP = {  # label -> recipe overrides on top of the benchmark's own (--set)
    "kd T=1": ["student.temperature=1", "student.losses={bernoulli_kd: 1.0}"],
    "kd T=2": ["student.temperature=2", "student.losses={bernoulli_kd: 1.0}"],
    "kd T=2 + code_bce 0.5": ["student.temperature=2", "student.losses={bernoulli_kd: 1.0, code_bce: 0.5}"],
    "kd T=4 + code_bce 1.0": ["student.temperature=4", "student.losses={bernoulli_kd: 1.0, code_bce: 1.0}"],
    "dth_mse": ["student.losses={dth_mse: 1.0}"],
    "augment, teacher online": ["data.augment=true"],
}


def flops(model: torch.nn.Module, image_size: int) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops()


def images_per_s(run: RunDir, stage: str) -> float:
    rates = [r["images_per_s"] for r in run.metrics() if r.get("stage") == stage]
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def paired_throughput(r: Recipe, teacher_path: Path, rounds: int = 7, steps: int = 15) -> dict:
    """Training images/s of distillation (cached teacher) vs a student-only step, interleaved in one process.

    Two epochs run minutes apart on a shared machine measure the neighbours as much as the code, so
    the two kinds of step alternate in short blocks (order flipped every round) over the same data
    loader settings and the ratio is taken per round; its median is reported. The one-off cost of
    filling the cache (one teacher pass over the training set) is reported beside it.
    """
    device = torch.device("cpu")
    teacher, _ = load_model(str(teacher_path))
    teacher.eval().requires_grad_(False)
    train = build_dataset(r.data, "train")
    steppers = {}
    for mode, weights in (("distill", r.student.losses), ("student_only", LABELS_ONLY)):
        torch.manual_seed(r.seed)
        student = build_student(r.student, teacher, r.data.image_size)
        started = time.perf_counter()
        loss = distillation_batch_loss(student, teacher, weights, r.student, train, device, r.data.eval_batch_size)
        setup = time.perf_counter() - started
        optimizer = torch.optim.AdamW(student.parameters(), lr=r.student.train.lr)
        loader = DataLoader(IndexedDataset(train), batch_size=r.data.batch_size, shuffle=True, drop_last=True)
        steppers[mode] = (student.train(), loss, optimizer, loader, setup)

    def block(mode: str) -> float:
        student, loss, optimizer, loader, _ = steppers[mode]
        batches = iter(loader)
        started, seen = time.perf_counter(), 0
        for _ in range(steps):
            batch = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss(student, batch).backward()
            optimizer.step()
            seen += len(batch[0])
        return seen / (time.perf_counter() - started)

    block("distill"), block("student_only")  # warm-up
    rates = {"distill": [], "student_only": []}
    for i in range(rounds):
        for mode in (("distill", "student_only") if i % 2 == 0 else ("student_only", "distill")):
            rates[mode].append(block(mode))
    ratios = [d / s for d, s in zip(rates["distill"], rates["student_only"])]
    return {"distill_img_s": statistics.median(rates["distill"]),
            "student_only_img_s": statistics.median(rates["student_only"]),
            "throughput_ratio": statistics.median(ratios), "throughput_ratios": ratios,
            "cache_fill_seconds": steppers["distill"][4],
            "student_only_epoch_seconds": len(train) / statistics.median(rates["student_only"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-run", default="bench_out/teacher/k16", help="run dir with checkpoints/teacher")
    parser.add_argument("--out", default="benchmarks/results/distill.json")
    parser.add_argument("--work", default="bench_out/distill")
    parser.add_argument("--students", default="resnet18-thin,lcnet_075",
                        help=f"comma-separated timm names or presets ({', '.join(STUDENTS)})")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-limit", type=int, default=12000)
    parser.add_argument("--teacher-overrides", default="teacher.backbone=resnet18,teacher.bits=16",
                        help="must match the teacher run's data and bits")
    parser.add_argument("--sweep", default="|".join(SWEEP),
                        help=f"'|'-separated names from: {' | '.join(SWEEP)}; or ''")
    parser.add_argument("--sweep-student", default=None, help="the student of the sweep (default: the first)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every student run, e.g. student.temperature=4 (repeatable)")
    args = parser.parse_args()
    teacher_run, work = Path(args.teacher_run), Path(args.work)
    base = [*args.teacher_overrides.split(","), f"data.train_limit={args.train_limit}",
            f"student.train.epochs={args.epochs}", *args.set]
    started = time.time()
    rows = []
    for name in args.students.split(","):
        folder = work / name
        share_checkpoints(teacher_run, folder, ("teacher",))
        r = recipe("fashion-mnist", [*base, *STUDENTS.get(name, [f"student.model={name}"])])
        summary = run_stages(r, folder, ("teacher", "student"))
        run = RunDir(folder)
        labels_path = run.checkpoint("student-labels-only")
        if not labels_path.is_file():
            train_student(r, run, torch.device("cpu"), run.checkpoint("teacher"), labels_only=True,
                          name="student-labels-only")
        Pipeline(r, run).evaluate_checkpoint("student (labels only)", labels_path)
        models = run.summary()["models"]
        student, _ = load_model(str(run.checkpoint("student")))
        teacher = models["teacher"]
        rows.append({"student": name, "params": models["student"]["params"],
                     "teacher_params": teacher["params"],
                     "param_ratio": teacher["params"] / models["student"]["params"],
                     "flops": flops(student, r.data.image_size),
                     "map_tie_aware": models["student"]["map_tie_aware"], "map": models["student"]["map"],
                     "map_vs_teacher": models["student"]["map_tie_aware"] / teacher["map_tie_aware"],
                     "mhd_acc": models["student"]["mhd_accuracy"],
                     "labels_only_map_tie_aware": models["student (labels only)"]["map_tie_aware"],
                     "labels_only_mhd_acc": models["student (labels only)"]["mhd_accuracy"],
                     "asymmetric_map_tie_aware": models["student -> teacher db"]["map_tie_aware"],
                     "teacher_map_tie_aware": teacher["map_tie_aware"], "teacher_mhd_acc": teacher["mhd_accuracy"],
                     "latency_ms_b64": models["student"]["latency_ms_b64"],
                     "teacher_latency_ms_b64": teacher["latency_ms_b64"],
                     "epoch_img_s": {"distill": images_per_s(run, "student"),
                                     "student_only": images_per_s(run, "student-labels-only")},
                     **paired_throughput(r, run.checkpoint("teacher"))})
    print_table(rows, ["student", "params", "param_ratio", "map_tie_aware", "map_vs_teacher",
                       "labels_only_map_tie_aware", "mhd_acc", "labels_only_mhd_acc", "asymmetric_map_tie_aware",
                       "throughput_ratio"])
    sweep_rows = []
    sweep_student = args.sweep_student or args.students.split(",")[0]
    for label in [s.strip() for s in args.sweep.split("|") if s.strip()]:
        folder = work / f"sweep-{sweep_student}-{label.replace(' ', '_').replace('=', '').replace(',', '')}"
        share_checkpoints(teacher_run, folder, ("teacher",))
        r = recipe("fashion-mnist", [*base, *STUDENTS.get(sweep_student, [f"student.model={sweep_student}"]),
                                     *SWEEP[label]])
        summary = run_stages(r, folder, ("teacher", "student"))
        sweep_rows.append({"setting": label, "map_tie_aware": summary["models"]["student"]["map_tie_aware"],
                           "mhd_acc": summary["models"]["student"]["mhd_accuracy"]})
    if sweep_rows:
        print_table(sweep_rows, ["setting", "map_tie_aware", "mhd_acc"])
    write_json(args.out, {"benchmark": "distill", "machine": machine(), "args": vars(args), "rows": rows,
                          "sweep": sweep_rows, "sweep_student": sweep_student, "wall_seconds": time.time() - started})


if __name__ == "__main__":
    main()
