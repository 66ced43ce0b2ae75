"""Hash-code distillation on Fashion-MNIST: students distilled vs trained on labels only, vs the teacher.

For each student: mAP (both forms), MHD accuracy, parameters, FLOPs and CPU latency; the same
student trained on the teacher's class codes only (labels only, same epochs); student queries
against the teacher-built database (asymmetric retrieval); and distillation throughput with the
cached teacher against a student-only epoch, measured in the same run. A sweep on one student
looks for what makes distillation pay (temperature, loss mix, augmentation with the teacher online).

    python benchmarks/distill.py --teacher-run bench_out/teacher/k16 --out bench_out/distill.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import machine, print_table, recipe, run_stages, share_checkpoints, write_json
from torch.utils.flop_counter import FlopCounterMode

from hashdistill.distill.models import load_model
from hashdistill.distill.student_stage import train_student
from hashdistill.pipeline import Pipeline
from hashdistill.rundir import RunDir

SWEEP = {
    "kd T=1": ["student.temperature=1", "student.losses={bernoulli_kd: 1.0}"],
    "kd T=4": ["student.temperature=4", "student.losses={bernoulli_kd: 1.0}"],
    "kd T=2 + code_bce": ["student.temperature=2", "student.losses={bernoulli_kd: 1.0, code_bce: 0.5}"],
    "dth_mse": ["student.losses={dth_mse: 1.0}"],
    "kd T=2 + code_bce + augment (teacher online)": ["data.augment=true",
                                                    "student.losses={bernoulli_kd: 1.0, code_bce: 0.5}"],
}


def flops(model: torch.nn.Module, image_size: int) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops()


def images_per_s(run: RunDir, stage: str) -> float:
    rates = [r["images_per_s"] for r in run.metrics() if r.get("stage") == stage]
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-run", default="bench_out/teacher/k16", help="run dir with checkpoints/teacher")
    parser.add_argument("--out", default="bench_out/distill.json")
    parser.add_argument("--work", default="bench_out/distill")
    parser.add_argument("--students", default="regnetx_002,lcnet_050")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-limit", type=int, default=12000)
    parser.add_argument("--teacher-overrides", default="teacher.backbone=resnet18,teacher.bits=16",
                        help="must match the teacher run's data and bits")
    parser.add_argument("--sweep", default="kd T=1|kd T=4|kd T=2 + code_bce + augment (teacher online)",
                        help=f"'|'-separated names from: {' | '.join(SWEEP)}; or ''")
    args = parser.parse_args()
    teacher_run, work = Path(args.teacher_run), Path(args.work)
    base = [*args.teacher_overrides.split(","), f"data.train_limit={args.train_limit}",
            f"student.train.epochs={args.epochs}"]
    started = time.time()
    rows = []
    for name in args.students.split(","):
        folder = work / name
        share_checkpoints(teacher_run, folder, ("teacher",))
        r = recipe("fashion-mnist", [*base, f"student.model={name}"])
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
                     "map": models["student"]["map"], "map_tie_aware": models["student"]["map_tie_aware"],
                     "map_vs_teacher": models["student"]["map"] / teacher["map"],
                     "mhd_acc": models["student"]["mhd_accuracy"],
                     "labels_only_map": models["student (labels only)"]["map"],
                     "labels_only_mhd_acc": models["student (labels only)"]["mhd_accuracy"],
                     "asymmetric_map": models["student -> teacher db"]["map"],
                     "teacher_map": teacher["map"], "teacher_mhd_acc": teacher["mhd_accuracy"],
                     "latency_ms_b64": models["student"]["latency_ms_b64"],
                     "teacher_latency_ms_b64": teacher["latency_ms_b64"],
                     "distill_img_s": images_per_s(run, "student"),
                     "student_only_img_s": images_per_s(run, "student-labels-only")})
        rows[-1]["throughput_ratio"] = rows[-1]["distill_img_s"] / rows[-1]["student_only_img_s"]
    print_table(rows, ["student", "params", "param_ratio", "map", "map_vs_teacher", "labels_only_map", "mhd_acc",
                       "labels_only_mhd_acc", "asymmetric_map", "throughput_ratio"])
    sweep_rows = []
    sweep_student = args.students.split(",")[-1]
    for label in [s.strip() for s in args.sweep.split("|") if s.strip()]:
        folder = work / f"sweep-{sweep_student}-{label.replace(' ', '_').replace('=', '').replace(',', '')}"
        share_checkpoints(teacher_run, folder, ("teacher",))
        r = recipe("fashion-mnist", [*base, f"student.model={sweep_student}", *SWEEP[label]])
        summary = run_stages(r, folder, ("teacher", "student"))
        sweep_rows.append({"setting": label, "map": summary["models"]["student"]["map"],
                           "mhd_acc": summary["models"]["student"]["mhd_accuracy"]})
    if sweep_rows:
        print_table(sweep_rows, ["setting", "map", "mhd_acc"])
    write_json(args.out, {"benchmark": "distill", "machine": machine(), "args": vars(args), "rows": rows,
                          "sweep": sweep_rows, "sweep_student": sweep_student, "wall_seconds": time.time() - started})


if __name__ == "__main__":
    main()
