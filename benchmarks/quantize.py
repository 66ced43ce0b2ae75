"""Trained ternary quantization of a distilled student on Fashion-MNIST.

For each threshold t in the sweep: ternarize the student's fully connected layers, fine-tune under
the distillation loss from the teacher, and report sparsity, bytes of the quantized layers (fp32
vs 2-bit packed + scales), mAP and MHD accuracy against the fp32 student, measured in the same run.

The student is the distillation benchmark's converged one (full labels, seed 0) and its teacher; the recipe is
that run's own (its recipe.yaml), with only the quantize settings changed.

    python benchmarks/quantize.py --student-run bench_out/distill-converged/f1-s0 --out benchmarks/results/quantize.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import machine, print_table, write_json

from hashdistill.app.pipeline import Pipeline
from hashdistill.quantize.stage import quantize_student
from hashdistill.recipe import RECIPE_FILE_NAME, load_recipe
from hashdistill.rundir import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student-run", default="bench_out/distill-converged/f1-s0",
                        help="run dir holding recipe.yaml, checkpoints/student and checkpoints/teacher")
    parser.add_argument("--out", default="benchmarks/results/quantize.json")
    parser.add_argument("--thresholds", default="0.02,0.05,0.1,0.2")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    source = RunDir(Path(args.student_run))
    started = time.time()
    fp32 = source.summary()["models"]["student"]
    rows = []
    for t in (float(v) for v in args.thresholds.split(",")):
        r = load_recipe(source.path / RECIPE_FILE_NAME, [f"quantize.threshold={t}",
                                                         f"quantize.train.epochs={args.epochs}"])
        work = RunDir(source.path / f"ttq-t{t}")
        out = work.checkpoint("ternary-student")
        if not out.is_file():
            report = quantize_student(source.checkpoint("student"), out, r, work, torch.device("cpu"),
                                      source.checkpoint("teacher"))
            work.update_summary("quantize", report)
        layers = work.summary()["quantize"]["layers"]
        Pipeline(r, work).evaluate_checkpoint("ternary student", out)
        q = work.summary()["models"]["ternary student"]
        numel = sum(layer["bytes_fp32"] / 4 for layer in layers)
        rows.append({"t": t, "layers": len(layers),
                     "sparsity": sum(la["sparsity"] * la["bytes_fp32"] / 4 for la in layers) / numel,
                     "bytes_fp32": sum(la["bytes_fp32"] for la in layers),
                     "bytes_packed": sum(la["bytes_packed"] for la in layers),
                     "map_tie_aware": q["map_tie_aware"],
                     "map_drop_points": 100 * (fp32["map_tie_aware"] - q["map_tie_aware"]),
                     "mhd_acc": q["mhd_accuracy"], "mhd_drop_points": 100 * (fp32["mhd_accuracy"] - q["mhd_accuracy"]),
                     "checkpoint_bytes": q["file_bytes"]})
        rows[-1]["compression"] = rows[-1]["bytes_fp32"] / rows[-1]["bytes_packed"]
    print(f"fp32 student: tie-aware mAP {fp32['map_tie_aware']:.4f}, MHD accuracy {fp32['mhd_accuracy']:.4f}")
    print_table(rows, ["t", "layers", "sparsity", "compression", "map_tie_aware", "map_drop_points", "mhd_acc",
                       "mhd_drop_points"])
    write_json(args.out, {"benchmark": "quantize", "machine": machine(), "args": vars(args),
                          "fp32": {"map_tie_aware": fp32["map_tie_aware"], "mhd_acc": fp32["mhd_accuracy"]},
                          "rows": rows,
                          "wall_seconds": time.time() - started})


if __name__ == "__main__":
    main()
