"""LLC teacher on Fashion-MNIST: k in {8, 16, 32} against a float baseline, plus the OOD table.

Protocol (DESIGN.md): the float baseline (same backbone, same epochs, plain cross-entropy) is
trained first and the LLC teacher starts from its backbone; queries = the 10k test images,
database = the whole 60k training set, mAP over the whole database. ``--train-limit`` trains on
a subset to fit a CPU budget (the database stays 60k). The OOD table trains on classes 0-7 and
holds out 8-9; the exact-match detector uses no threshold and no OOD sample.

    python benchmarks/teacher.py --out benchmarks/results/teacher.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import epochs_and_seconds, machine, print_table, recipe, run_stages, share_checkpoints, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/teacher.json")
    parser.add_argument("--work", default="bench_out/teacher")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--bits", default="8,16,32")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the float baseline and of each LLC phase")
    parser.add_argument("--train-limit", type=int, default=12000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--ood-bits", default="16,32", help="bit widths of the OOD table; '' skips it")
    args = parser.parse_args()
    work = Path(args.work)
    common = [f"teacher.backbone={args.backbone}", f"data.train_limit={args.train_limit}",
              f"data.image_size={args.image_size}", "device=auto",
              f"teacher.float_baseline={{epochs: {args.epochs}, optimizer: adamw, lr: 0.002}}",
              f"teacher.phase1.epochs={args.epochs}", f"teacher.phase2.epochs={args.epochs}"]
    rows, first = [], None
    started = time.time()
    for bits in (int(b) for b in args.bits.split(",")):
        folder = work / f"k{bits}"
        if first is not None:
            share_checkpoints(first, folder, ("float-baseline",))
        summary = run_stages(recipe("fashion-mnist", [*common, f"teacher.bits={bits}"]), folder, ("teacher",))
        first = first or folder
        teacher, float_model = summary["models"]["teacher"], summary["models"]["float baseline"]
        rows.append({"bits": bits, "float_acc": float_model["accuracy"], "mhd_acc": teacher["mhd_accuracy"],
                     "ed_acc": teacher["ed_accuracy"], "map": teacher["map"], "map_tie_aware": teacher["map_tie_aware"],
                     "p_at_r2": teacher["precision_at_radius"],
                     "float": epochs_and_seconds(first, ("float-baseline",)),
                     "teacher": epochs_and_seconds(folder, ("teacher-phase1", "teacher-phase2"))})
    print_table(rows, ["bits", "float_acc", "mhd_acc", "ed_acc", "map_tie_aware", "map", "p_at_r2"])
    ood, first = [], None
    for bits in (int(b) for b in args.ood_bits.split(",") if b):
        folder = work / f"ood-k{bits}"
        if first is not None:
            share_checkpoints(first, folder, ("float-baseline",))
        summary = run_stages(recipe("fashion-mnist-ood", [*common, f"teacher.bits={bits}"]), folder, ("teacher",))
        first = first or folder
        teacher = summary["models"]["teacher"]
        ood.append({"bits": bits, "exact_match": teacher["ood"]["exact_match"],
                    "msp_baseline": teacher["ood"]["msp_baseline"], "mhd_acc_in_distribution": teacher["mhd_accuracy"],
                    "float": epochs_and_seconds(first, ("float-baseline",)),
                    "teacher": epochs_and_seconds(folder, ("teacher-phase1", "teacher-phase2"))})
    print_table([{"bits": r["bits"], "detector": name, **r[key]} for r in ood
                 for name, key in (("exact match", "exact_match"), ("max softmax, tuned", "msp_baseline"))],
                ["bits", "detector", "tpr", "fpr", "youden_j", "auroc", "tpr_at_exact_match_fpr",
                 "samples_to_match_exact_match"])
    write_json(args.out, {"benchmark": "teacher", "machine": machine(), "args": vars(args), "rows": rows, "ood": ood,
                          "wall_seconds": time.time() - started})


if __name__ == "__main__":
    main()
