"""Run every benchmark and rewrite BENCHMARKS.md from their JSON output (no figure is typed by hand).

    python benchmarks/run_all.py                 # run all benchmarks, then write BENCHMARKS.md
    python benchmarks/run_all.py --render-only   # rewrite BENCHMARKS.md from benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from common import git_commit, machine
from timing import RUNS

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results"  # committed: BENCHMARKS.md and the README headline are rendered from it
LAST_UNCOMMITTED_FIGURES = "f93e824"  # the last BENCHMARKS.md rendered from the old, uncommitted bench_out/*.json
QUICKSTART = ["hashdistill", "run", "quickstart", "--out", "bench_out/quickstart", "--force"]
BENCHMARKS = {  # name -> command (run from the repository root), in dependency order
    "teacher": [sys.executable, "benchmarks/teacher.py", "--out", "benchmarks/results/teacher.json"],
    "distill": [sys.executable, "benchmarks/distill.py", "--out", "benchmarks/results/distill.json"],
    "quantize": [sys.executable, "benchmarks/quantize.py", "--out", "benchmarks/results/quantize.json",
                 "--epochs", "1"],
    "export": [sys.executable, "benchmarks/export.py", "--trained-run", "bench_out/distill-converged/f1-s0",
               "--quantize-epochs", "1", "--latency-runs", "200", "--database", "300000",
               "--out", "benchmarks/results/export.json"],
    "ternary_kernels": [sys.executable, "benchmarks/ternary_kernels.py", "--out",
                        "benchmarks/results/ternary_kernels.json"],
    "students": [sys.executable, "benchmarks/students.py", "--out", "benchmarks/results/students.json"],
    "encode": [sys.executable, "benchmarks/encode.py", "--out", "benchmarks/results/encode.json"],
    "search": [sys.executable, "benchmarks/search.py", "--model-run", "bench_out/search-model",
               "--out", "benchmarks/results/search.json"],
    "data": [sys.executable, "benchmarks/data.py", "--out", "benchmarks/results/data.json"],
    "robustness": [sys.executable, "benchmarks/robustness.py", "--out", "benchmarks/results/robustness.json"],
    "quickstart": QUICKSTART,
}


SEARCH_MODEL = ["hashdistill", "run", "quickstart", "--set", "teacher.bits=64", "--stages", "teacher,student",
                "--out", "bench_out/search-model", "--force"]  # the student whose codes the search benchmark uses


def run(name: str) -> None:
    started = time.time()
    if name == "search" and not (ROOT / "bench_out/search-model/checkpoints/student.safetensors").is_file():
        subprocess.run(SEARCH_MODEL, cwd=ROOT, check=True)
    subprocess.run(BENCHMARKS[name], cwd=ROOT, check=True)
    if name == "quickstart":
        summary = json.loads((ROOT / "bench_out/quickstart/summary.json").read_text())
        payload = {"benchmark": "quickstart", "machine": machine(), "wall_seconds": time.time() - started,
                   "models": {n: {k: v for k, v in m.items() if k != "pr_curve"} for n, m in summary["models"].items()}}
        (RESULTS / "quickstart.json").write_text(json.dumps(payload, indent=2))


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return "-" if value is None else str(value)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> list[str]:
    out = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return out


def command(name: str) -> str:
    return shlex.join("python" if part == sys.executable else part for part in BENCHMARKS[name])


def section_quickstart(data: dict[str, Any]) -> list[str]:
    rows = [{"model": n, **m} for n, m in data["models"].items()]
    return [f"Whole pipeline wall time: **{data['wall_seconds']:.0f} s** (target: under 300 s on a 2-core CPU).", "",
            *table(rows, [("model", "model"), ("params", "params"), ("file_bytes", "file bytes"),
                          ("latency_ms_b64", "CPU ms (b=64)"), ("map_tie_aware", "mAP (tie-aware)"),
                          ("map", "mAP (order-dependent)"), ("precision_at_radius", "P@r2 (mean per query)"),
                          ("mhd_accuracy", "MHD acc"), ("ed_accuracy", "ED acc")])]


def section_teacher(data: dict[str, Any]) -> list[str]:
    args = data["args"]
    images = f"{args['train_limit']:,} images" if args.get("train_limit") else "every training image (54k; 6k " \
        "carved for validation)"
    float_run = data["rows"][0]["float"] if data["rows"] else {}
    lines = [f"Backbone `{args['backbone']}` at {args['image_size']} px, trained from scratch on {images} with the "
             f"batch augmentation (shift by up to 2 px + flip): the float baseline for {args['float_epochs']} epochs "
             f"({float_run.get('wall_seconds', 0) / 60:.0f} min), then LLC phase 1 for {args['llc_epochs']} epochs and "
             f"phase 2 for {args.get('phase2_epochs') or args['llc_epochs']}, starting from its backbone. "
             "Queries = 10k test images, database = the whole 60k training set.", "",
             f"Float baseline test accuracy **{fmt(data.get('float_test_accuracy'))}** (target >= 0.93); at 16 bits "
             f"the LLC teacher's MHD accuracy is **{fmt(data.get('mhd_gap_points_16'), 2)} points** below it (target "
             f"<= 0.5) and exact decoding **{fmt(data.get('ed_gap_points_16'), 2)} points** (target <= 1.5).", "",
             *table([{**r, "float_s": r["float"]["wall_seconds"], "teacher_s": r["teacher"]["wall_seconds"],
                      "teacher_epochs": r["teacher"]["epochs"],
                      "gap": 100 * (r["float_acc"] - r["mhd_acc"])} for r in data["rows"]],
                    [("bits", "bits"), ("float_acc", "float acc"), ("mhd_acc", "MHD acc"), ("gap", "gap (points)"),
                     ("ed_acc", "ED acc"), ("map_tie_aware", "mAP (tie-aware)"), ("map", "mAP (order-dependent)"),
                     ("p_at_r2", "P@r2 (mean per query)"),
                     ("float_s", "float train s"), ("teacher_epochs", "LLC epochs"), ("teacher_s", "LLC train s")])]
    if data.get("ood"):
        lines += ["", "OOD (train on classes 0-7, hold out 8-9; its own float baseline and LLC schedule, epochs in the "
                  "table). Exact match uses no threshold and no OOD sample; "
                  "max softmax (MSP) takes the threshold that maximises J = TPR - FPR on held-out samples "
                  f"({data['ood'][0]['msp_baseline']['id_samples_used']:,} ID + "
                  f"{data['ood'][0]['msp_baseline']['ood_samples_used']:,} OOD). The last column is how many "
                  "held-out samples (half OOD, mean of 50 random draws) the baseline's threshold needs before "
                  "its test J reaches exact match's (never: not even with all of them).", "",
                  *table([{"bits": r["bits"], "mhd": r["mhd_acc_in_distribution"],
                           **{f"ex_{k}": v for k, v in r["exact_match"].items()},
                           **{f"msp_{k}": v for k, v in r["msp_baseline"].items()},
                           "needed": r["msp_baseline"]["samples_to_match_exact_match"] or "never",
                           "float_epochs": r["float"]["epochs"], "teacher_epochs": r["teacher"]["epochs"]}
                          for r in data["ood"]],
                         [("bits", "bits"), ("float_epochs", "float epochs"), ("teacher_epochs", "LLC epochs"),
                          ("mhd", "ID MHD acc"), ("ex_tpr", "exact TPR"), ("ex_fpr", "exact FPR"),
                          ("ex_youden_j", "exact J"), ("msp_tpr", "MSP TPR"), ("msp_fpr", "MSP FPR"),
                          ("msp_youden_j", "MSP J"), ("msp_auroc", "MSP AUROC"),
                          ("msp_tpr_at_exact_match_fpr", "MSP TPR at exact FPR"),
                          ("needed", "samples MSP needs")])]
    return lines


def section_distill(data: dict[str, Any]) -> list[str]:
    args = data["args"]
    lines = [f"Student `{args['student']}`, distilled over every training image (54k, augmented; the teacher's "
             "logits of each view computed once) from a 16-bit `resnet18` LLC teacher, kept at its best validation "
             "mAP. Two labels-only baselines train on the labelled images alone for the same steps: class codes (BCE "
             "against the teacher's class codes) and DSH (the DTH paper's pairwise loss). For 100% labels the "
             "teacher is the converged one of the teacher benchmark; for a fraction, one trained on its labelled "
             "images. Mean +/- sd over the seeds each row states; tie-aware mAP, queries = 10k test images, "
             "database = 60k; 'teacher db' = the student's queries against the teacher-built database; '-' = not "
             "trained at that fraction.", ""]
    rows = []
    students = ("distilled", "labels_only", "dsh")
    for r in data["rows"]:
        kinds = [k for k in students if r.get(f"{k}_map")]  # the students trained at this fraction
        best = {k: [s["best_epochs"][k] + 1 for s in r["seeds"]] for k in kinds}
        gain_dsh = r.get("gain_over_dsh_points")
        rows.append({"fraction": f"{r['labelled_fraction']:.0%}", "seeds": len(r["seeds"]),
                     "epochs": r.get("epochs", args["epochs"]), "teacher": r["teacher_map"],
                     **{k: f"{r[f'{k}_map']['mean']:.4f} +/- {r[f'{k}_map']['sd']:.4f}" if k in kinds else "-"
                        for k in students},
                     **{f"{k}_db": r[f"{k}_teacher_db_map"]["mean"] if k in kinds else "-" for k in students},
                     "gain": f"{r['gain_points']['mean']:+.2f} +/- {r['gain_points']['sd']:.2f}",
                     "gain_dsh": f"{gain_dsh['mean']:+.2f}" if gain_dsh else "-",
                     "ratio": r["student_teacher_ratio"]["mean"], "best": "; ".join(
                         f"{k} {', '.join(map(str, v))}" for k, v in best.items())})
    lines += table(rows, [("fraction", "labelled"), ("seeds", "seeds"), ("epochs", "epochs"),
                          ("teacher", "teacher mAP"), ("distilled", "distilled"),
                          ("labels_only", "class codes"), ("dsh", "DSH"), ("distilled_db", "distilled, teacher db"),
                          ("labels_only_db", "class codes, teacher db"), ("dsh_db", "DSH, teacher db"),
                          ("gain", "KD - class codes (points)"), ("gain_dsh", "KD - DSH (points)"),
                          ("ratio", "distilled / teacher"), ("best", "best epoch")])
    step = data.get("step_timing") or {}
    lines += ["", f"Targets (issue 26): distilled / teacher **{fmt(data.get('student_teacher_map_ratio'), 3)}** "
              f"(>= 0.97); KD - class codes at full labels **{fmt(data.get('kd_gain_points_full_labels'), 2)}** "
              f"points (>= +1); at 10% labels **{fmt(data.get('kd_gain_points_10pct_labels'), 2)}** (>= +5); KD - DSH "
              f"**{fmt(data.get('kd_gain_over_dsh_points_full_labels'), 2)}** points (>= +5); student queries "
              f"against the teacher's database / teacher **{fmt(data.get('asymmetric_teacher_ratio'), 3)}** "
              f"(>= 0.99); distillation step / labels-only step **{fmt(data.get('kd_step_vs_labels_only_step'), 3)}**"
              f" (>= 0.9; {step.get('device', '-')}, {step.get('threads', '-')} threads, batch "
              f"{step.get('batch_size', '-')}). Each run's report.md plots every student's validation mAP per "
              "epoch; the curves are in the JSON."]
    return lines + distill_losses() + distill_probes()


def distill_losses() -> list[str]:
    """The loss ablation (distill.py --ablation), where it has been run."""
    data = load("distill-losses")
    if not data:
        return []
    rows = [{"losses": r["losses"], "map": f"{r['map']['mean']:.4f} +/- {r['map']['sd']:.4f}",
             "teacher_db": r["teacher_db_map"]["mean"], "ratio": r["student_teacher_ratio"]["mean"],
             "seeds": len(r["seeds"])} for r in data["rows"]]
    return ["", "Loss ablation (same teacher, schedule and student; full labels):", "",
            *table(rows, [("losses", "losses"), ("map", "mAP"), ("teacher_db", "teacher db"),
                          ("ratio", "/ teacher"), ("seeds", "seeds")])]


def distill_probes() -> list[str]:
    """Probes of other student settings (``distill.py --set ... --out`` into results/distill-probes/): evidence
    for or against a recipe default; the seeds column says how much evidence (sd shown where there are several)."""
    rows = []
    for path in sorted((RESULTS / "distill-probes").glob("*.json")):
        data = json.loads(path.read_text())
        for row in data["rows"]:
            rows.append({"probe": path.stem, "set": "; ".join(data["args"]["set"]) or "-",
                         "fraction": f"{row['labelled_fraction']:.0%}", "seeds": data["seeds"],
                         "epochs": data["args"]["epochs"], "teacher": row["teacher_map"],
                         **mean_and_sd(row, data["seeds"])})
    if not rows:
        return []
    return ["", "Probes (same protocol, epochs and teacher as stated; the default losses are `bernoulli_kd: 1.0`, "
            "T = 4):", "",
            *table(rows, [("probe", "probe"), ("set", "--set"), ("fraction", "labelled"), ("epochs", "epochs"),
                          ("teacher", "teacher mAP"), ("seeds", "seeds"),
                          ("distilled", "distilled mAP"), ("labels_only", "labels-only mAP"),
                          ("gain", "gain (points)")])]


def mean_and_sd(row: dict[str, Any], seeds: int) -> dict[str, str]:
    """A probe row's mAPs and gain, with the sd over seeds once there is more than one seed."""
    def cell(figure: dict[str, float], digits: int, sign: str = "") -> str:
        mean = f"{figure['mean']:{sign}.{digits}f}"
        return f"{mean} +/- {figure['sd']:.{digits}f}" if seeds > 1 else mean
    return {"distilled": cell(row["distilled_map"], 4), "labels_only": cell(row["labels_only_map"], 4),
            "gain": cell(row["gain_points"], 2, "+")}


def section_quantize(data: dict[str, Any]) -> list[str]:
    return [f"fp32 student: mAP (tie-aware) {fmt(data['fp32']['map_tie_aware'])}, MHD accuracy "
            f"{fmt(data['fp32']['mhd_acc'])}.", "",
            *table(data["rows"], [("t", "t"), ("layers", "layers"), ("sparsity", "sparsity"),
                                  ("compression", "fp32/packed bytes"), ("map_tie_aware", "mAP (tie-aware)"),
                                  ("map_drop_points", "mAP drop (points)"), ("mhd_acc", "MHD acc"),
                                  ("mhd_drop_points", "MHD drop (points)")])]


def section_ternary_kernels(data: dict[str, Any]) -> list[str]:
    rows = [{**r, "shape": f"{r['pixels']} x {r['c_in']} -> {r['c_out']}",
             **{k: f"{r[k]:.3f}" for k in ("fp32_ms", "int8_ms", "nbits2_ms", "nbits4_ms")},
             "ratio": f"{r['nbits2_vs_int8']:.2f}"} for r in data["rows"]]
    return [f"A ternary 1x1 conv of mobilenetv2_100 at 224 px as a MatMul ([H*W, C_in] x [C_in, C_out]), onnxruntime "
            f"{data['onnxruntime']} CPU, {data['threads']} thread, median ms of {data['runs']} runs taking turns "
            f"(after {data['warmup']}): fp32 MatMul, the phone model's int8 (QDQ, fused into QLinearMatMul), and "
            f"MatMulNBits at 2 and 4 bits (blocks of {data['block_size']}).", "",
            *table(rows, [("shape", "H*W x C_in -> C_out"), ("fp32_ms", "fp32"), ("int8_ms", "int8"),
                          ("nbits2_ms", "MatMulNBits 2-bit"), ("nbits4_ms", "MatMulNBits 4-bit"),
                          ("ratio", "2-bit / int8")]), "",
            f"Over these layers MatMulNBits 2-bit takes **{data['nbits2_vs_int8_total']:.2f}x** the int8 kernels' "
            f"time (fp32: {data['fp32_vs_int8_total']:.2f}x): the phone model keeps **{data['kept']}**, its ternary "
            "weights stored at 2 bits in the .onnx and rebuilt into int8 when onnxruntime loads it."]


def section_students(data: dict[str, Any]) -> list[str]:
    """The Pareto rows of the candidate students (benchmarks/students.py) and their plot."""
    rows = [{**r, "map": "-" if r["map_ratio"] is None else f"{r['map_ratio']:.3f} ({r['seeds']} seed)",
             **{k: f"{r[k]:.2f}" for k in ("fp32_ms_1t", "fp32_ms_2t")},
             **{k: "-" if r[k] is None else f"{r[k]:.2f}" for k in ("phone_ms_1t", "phone_ms_2t")},
             "ratio": f"{r['deployed_vs_teacher']:.3f} ({r['deployed']})",
             "phone_kb": "-" if r["phone_onnx_bytes"] is None else f"{r['phone_onnx_bytes'] / 1e3:.0f}",
             "fp32_kb": f"{r['fp32_onnx_bytes'] / 1e3:.0f}"} for r in data["rows"]]
    teacher = {t: s["teacher"]["median_ms"] for t, s in data["latency"].items()}
    failed = [f"{r['arch']} ({r['phone_error']})" for r in data["rows"] if r["phone_error"]]
    targets = data["targets"]
    return [f"Each candidate's fp32 and phone files at {data['image_size']} px, b={data['batch']}, onnxruntime CPU, "
            f"median ms of {data['runs']} interleaved runs (after {data['warmup']}) at 1 and 2 threads, beside the "
            f"{data['teacher']} ({teacher['1']:.1f} / {teacher['2']:.1f} ms), {data['weights']}; the mAP ratio is the "
            "candidate's distilled tie-aware mAP over its teacher's on Fashion-MNIST at 32 px (converged protocol, "
            "full labels, benchmarks/results/distill.json); '-': not distilled on this machine.", "",
            *table(rows, [("arch", "student"), ("map", "mAP / teacher"), ("fp32_ms_1t", "fp32 1t"),
                          ("fp32_ms_2t", "fp32 2t"), ("phone_ms_1t", "phone 1t"), ("phone_ms_2t", "phone 2t"),
                          ("ratio", "shipped file / teacher (worse thread count)"), ("fp32_kb", "fp32 .onnx kB"),
                          ("phone_kb", "phone .onnx kB")]), "",
            f"![students]({Path('benchmarks/results') / data['plot']})", "",
            f"Pareto front (of the distilled candidates): {', '.join(data['pareto']) or '-'}. Meeting both targets "
            f"(file <= {targets['deployed_vs_teacher']}x the teacher, mAP >= {targets['map_ratio']}x): "
            f"{', '.join(data['meeting_both_targets']) or 'none'}."
            + (f" Phone model not built: {'; '.join(failed)}." if failed else "")]


def section_export(data: dict[str, Any]) -> list[str]:
    rows = [{**r, "model": f"{r['model']} ({r.get('arch', '-')})"} for r in data["models"]]
    section = data.get("section_224") or {}
    merged = (section.get("args") or {}).get("only_224")
    lines = [f"Models: {data['weights']}."
             + (f" The figures before the 224-px part come from the last full run, of a tree older than commit "
                f"{section.get('commit')}, whose `--only-224` run merged the 224-px figures in: its phone-model "
                "rows predate that tree's int8 ternary layers." if merged else ""), "",
             *table(rows, [("model", "model"), ("opset", "opset"), ("onnx_bytes", "file bytes"),
                           ("ternary_layers", "ternary layers"), ("identical_code_rate", "codes = PyTorch"),
                           ("identical_code_rate_vs_float_onnx", "codes = float ONNX"),
                           ("map_tie_aware", "mAP (tie-aware)"), ("ort_ms_b1", "ORT ms b=1"),
                           ("ort_ms_b64", "ORT ms b=64"), ("torch_ms_b64", "torch ms b=64")])]
    if data.get("whole_file_ratio"):
        drop = data.get("whole_file_map_drop_points")
        lines += ["", f"Whole file, fp32 student / {data.get('phone_model', 'phone model')}: "
                  f"**{data['whole_file_ratio']:.2f}x** smaller (target >= 10x)"
                  + (f", its `.ort` **{data['ort_whole_file_ratio']:.2f}x** (target >= 8x)"
                     if data.get("ort_whole_file_ratio") else "") + "; mAP drop "
                  + (f"**{drop:.2f} points** (target <= 0.5)" if drop is not None else "not measured (untrained)")
                  + f". Phone model / teacher latency at b=64 in onnxruntime: "
                  f"**{data['student_teacher_latency_ratio_b64']:.3f}** (fp32 student: "
                  f"{data.get('fp32_student_teacher_latency_ratio_b64', float('nan')):.3f}; target <= 0.1), all "
                  "image-in files (uint8 pixels in, pre-processing in the graph)."]
    edge = data.get("edge_files")
    if edge:
        lines += ["", f"Edge agreement: on {edge['files']} Fashion-MNIST test images written as PNG and JPEG files of "
                  f"{len(edge['shapes'])} sizes and aspect ratios, training-time evaluation, the image-in graph and "
                  f"the edge runtime give the same codes on **{edge['agreement']:.1%}** of the files (target 100%; "
                  f"training vs graph {edge['training_vs_graph']:.1%}, graph vs runtime "
                  f"{edge['graph_vs_runtime']:.1%})."]
    lines += export_deployment(data) + export_224(data)
    lines += ["", "Search (faiss IndexBinaryFlat vs numpy popcount):", "",
              *table(data["search"], [("bits", "bits"), ("database", "database"), ("queries", "queries"), ("k", "k"),
                                      ("faiss_qps", "faiss q/s"), ("numpy_qps", "numpy q/s"),
                                      ("faiss_speedup", "speedup")])]
    return lines


FEW_RUNS = f"; fewer than the {RUNS}-run protocol: the 224-px figures below follow it"


def export_deployment(data: dict[str, Any]) -> list[str]:
    """The deployment targets' agreement and speed figures (the .ort file, timm's eval transform, the browser), each
    shown only where the JSON has it: older export.json files predate them."""
    lines = []
    speed, check = data.get("ort_vs_onnx"), data.get("ort_code_check")
    if speed and check:
        lines += ["", f"Phone model as ORT format (`.ort`, {speed['ort_bytes']:,} bytes) vs its int8 `.onnx` "
                  f"({speed['onnx_bytes']:,} bytes), onnxruntime CPU, the two files taking turns ({speed['runs']} "
                  f"timed runs each{FEW_RUNS if speed['runs'] < RUNS else ''}): `.ort` / `.onnx` latency "
                  f"**{speed['ratio_b1']:.3f}** at b=1 "
                  f"({speed['ort_ms_b1']:.2f} vs {speed['onnx_ms_b1']:.2f} ms) and "
                  f"**{speed['ratio_b64']:.3f}** at b=64; identical packed codes on "
                  f"**{data['ort_code_agreement']:.2%}** of {check['images']:,} images ({check['test_images']:,} "
                  f"test + {check['database_images']:,} database)."]
    timm = data.get("timm_eval_files")
    if timm:
        lines += ["", f"timm's eval transform: on {timm['files']} image files (PNG and JPEG) of {len(timm['shapes'])} "
                  "odd sizes, landscape, portrait and tiny (spare pixels after the resize "
                  f"{', '.join(map(str, sorted(set(timm['spare_pixels']))))}: "
                  f"{', '.join(map(str, timm['spare_mod_4']))} mod 4), the {timm['model']}: same codes on "
                  f"**{data['timm_eval_code_agreement']:.1%}** of the files."]
    files = data.get("browser_files")
    if files:
        lines += ["", f"Browser: {files['runtime']} vs Python onnxruntime, {files['model']}, on {files['files']} "
                  f"Fashion-MNIST test images written as PNG and JPEG files of {len(files['shapes'])} sizes (each "
                  f"decoded by the browser and by hashdistill): bit-identical codes on "
                  f"**{data['browser_code_agreement']:.1%}** of the files."]
    skipped = data.get("skipped") or {}
    if skipped:
        lines += ["", "Not measured in this run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "."]
    return lines


def export_224(data: dict[str, Any]) -> list[str]:
    """The 224-px figures (benchmarks/export_224.py): every candidate student's fp32 and phone latency at 1 and 2
    threads, the browser, the .ort, the pre-processing's share and the CLI export's peak RSS."""
    section = data.get("section_224")
    if not section:
        return []
    threads = section["threads"]
    rows = [{"arch": r["arch"] + (" (shipped)" if r["arch"] == section["shipped_student"] else ""),
             "fp32": f"{r['fp32_onnx_bytes'] / 1e6:.2f}", "phone": f"{r['phone_onnx_bytes'] / 1e6:.2f}",
             "ort": f"{r['phone_ort_bytes'] / 1e6:.2f}",
             "smaller": f"{r['fp32_onnx_bytes'] / r['phone_onnx_bytes']:.2f}x / "
                        f"{r['fp32_onnx_bytes'] / r['phone_ort_bytes']:.2f}x",
             **{f"ms_{t}": f"{r[f'fp32_ms_{t}t']:.2f} / {r[f'phone_ms_{t}t']:.2f}" for t in threads},
             **{f"ratio_{t}": f"{r[f'phone_vs_fp32_{t}t']:.3f}" for t in threads},
             **{f"teacher_{t}": f"{r[f'phone_vs_teacher_{t}t']:.3f}" for t in threads}} for r in section["students"]]
    teacher = {t: section["latency"][str(t)]["teacher"] for t in threads}
    columns = [("arch", "student"), ("fp32", "fp32 .onnx MB"), ("phone", "phone .onnx MB"), ("ort", "phone .ort MB"),
               ("smaller", "fp32 / phone .onnx / .ort"),
               *[(f"ms_{t}", f"ms fp32 / phone, {t}t") for t in threads],
               *[(f"ratio_{t}", f"phone / fp32, {t}t") for t in threads],
               *[(f"teacher_{t}", f"phone / teacher, {t}t") for t in threads]]
    lines = ["", f"At {section['image_size']} px, b=1: the `{section['recipe']}` recipe's {section['teacher']} teacher "
             f"and candidate students, {section['weights']}, {section['bits']} bits, {section['classes']} classes; "
             "the phone model is the student ternarized as above with static int8 calibrated on "
             f"{section['calibration_images']} images. Input: {section['input']}. onnxruntime CPU, every file taking "
             f"turns run by run, median of {section['runs']} timed runs after {section['warmup']} untimed, at "
             f"{' and '.join(map(str, threads))} intra-op threads (teacher: "
             + ", ".join(f"{teacher[t]['median_ms']:.1f} ms at {t}t, IQR {teacher[t]['q1_ms']:.1f}-"
                         f"{teacher[t]['q3_ms']:.1f}" for t in threads) + f"); commit {section.get('commit', '-')}.",
             "", *table(rows, columns), "",
             f"Shipped student ({section['shipped_student']}): phone / fp32 student latency "
             f"**{data['phone_vs_fp32_student_latency_224_b1']:.3f}** at worst over the thread counts (target <= "
             f"0.6), phone / {section['teacher']} teacher **{data['phone_teacher_latency_ratio_224_b1']:.3f}** at "
             "worst (target <= 0.05)."]
    browser = data.get("browser_224")
    if browser:
        lines += ["", f"Browser, {browser['runtime']}, {browser['runs']} runs each in alternating chunks: fp32 "
                  f"student {browser['fp32_ms']:.1f} ms, phone model {browser['phone_ms']:.1f} ms, ratio "
                  f"**{data['phone_vs_fp32_student_latency_224_browser']:.3f}** (target <= 1)."]
    b64, by_threads = data.get("ort_vs_onnx_224_b64"), data.get("ort_vs_onnx_latency_224_b1_by_threads")
    if b64 and by_threads:
        lines += ["", "The shipped phone model's `.ort` / `.onnx` latency, taking turns: at b=1 "
                  + ", ".join(f"**{v:.3f}** at {t}t" for t, v in by_threads.items())
                  + f"; at b=64 **{b64['ratio']:.3f}** ({b64['onnx']['runs']} runs, {b64['threads']}; target <= 1.1)."]
    pre = data.get("preprocessing_224")
    if pre:
        side = pre["resize_size"]
        lines += ["", f"Pre-processing in the graph, share of the shipped phone model's time ({pre['threads']} "
                  f"thread): **{pre['input_224']['share']:.1%}** for a 224x224 input (resized to {side}, then "
                  f"cropped: onnxruntime's Resize is most of it), **{pre[f'input_{side}']['share']:.1%}** for an "
                  f"input already at {side} px (target <= 5%)."]
    rss = data.get("export_224_rss")
    if rss:
        lines += ["", f"`{rss['command']}` on a 224-px {rss['arch']} checkpoint, {rss['calibration_images']} "
                  f"calibration images (the default): peak RSS **{rss['peak_rss_gb']:.2f} GB** (target <= 3), "
                  f"{rss['seconds']:.0f} s."]
    return lines


def section_search(data: dict[str, Any]) -> list[str]:
    args = data["args"]
    rows = [{**r, "params": ", ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items()) or "-",
             "setting": r["setting"] + (" (default)" if r.get("default") else "")} for r in data["rows"]]
    lines = [f"Codes: the quickstart student at {data['bits']} bits (`{shlex.join(SEARCH_MODEL)}`), its "
             f"{data['database_codes']:,} database codes replicated to each size with every bit flipped with "
             f"probability {args['flip']}; {data['queries']} queries = the real test codes under the same noise; "
             f"k = {args['k']}. recall@100 counts a result as right when it is no farther than the 100th exact "
             "neighbour. `build recall` is what the index measured on its own codes when it was built (and "
             f"records); HNSW is built up to {args['hnsw_max']:,} items.", "",
             *table(rows, [("items", "items"), ("kind", "kind"), ("params", "parameters"), ("setting", "setting"),
                           ("queries_per_s", "queries/s"), ("speedup_vs_flat", "x flat"),
                           ("recall_at_100", "recall@100"), ("build_recall_at_100", "build recall"),
                           ("build_seconds", "build s"), ("bytes_per_item", "bytes/item")])]
    best = data.get("recommended")
    if best:
        lines += ["", f"Recommended at {best['items']:,} items: {best['kind']} ({rows_params(best)}, "
                  f"{best['setting']}): **{best['speedup_vs_flat']:.0f}x** the queries/s of flat search at "
                  f"recall@100 **{best['recall_at_100']:.4f}**."]
    if data.get("default_recall_at_100_10m_fresh") is not None:
        lines += ["", "Each approximate index chooses its default when it is built, on held-out codes with 1 to "
                  f"bits/16 bits flipped ({data['build_recall_queries']} queries, a margin of two standard "
                  "errors). At that default, on the fresh test-image queries: recall@100 "
                  f"**{fmt(data['default_recall_at_100_1m_fresh'])}** at 1M and "
                  f"**{fmt(data['default_recall_at_100_10m_fresh'])}** at 10M (IVF, what `--kind auto` builds; "
                  f"target >= 0.99), {data['default_speedup_vs_flat_10m']:.0f}x flat's queries/s at 10M."]
    milvus = data.get("milvus")
    if milvus:
        lines += ["", f"Milvus Lite ({milvus['engine']}) over the first {milvus['items']:,} codes: recall against "
                  f"faiss's flat search (tie-aware) **{fmt(milvus['recall_vs_flat'])}**; "
                  f"{milvus['milvus_queries_per_s']:.0f} queries/s vs faiss flat's "
                  f"{milvus['faiss_flat_queries_per_s']:.0f} on the same codes; insert "
                  f"{milvus['insert_seconds']:.0f} s."]
    return lines


def section_encode(data: dict[str, Any]) -> list[str]:
    rows = data["rows"]
    return [f"`hashdistill encode` over {data['args']['images']:,} Fashion-MNIST test images written as "
            f"{data['args']['size']}-px PNG files, an image-in lcnet_075 ONNX model (random weights), all in one run:",
            "", *table(rows, [("engine", "engine"), ("seconds", "seconds"), ("images_per_s", "images/s")]), "",
            f"Ray with 2 workers vs 1: **{data['ray_2_workers_vs_1_speedup']:.2f}x**; codes from Ray equal the "
            f"in-process ones on **{fmt(data['ray_vs_inprocess_code_agreement'])}** of the files (same paths: "
            f"{data['same_paths']})."]


def rows_params(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in (row.get("params") or {}).items())


def section_data(data: dict[str, Any]) -> list[str]:
    lines = [f"Fashion-MNIST at 32 px, batches of {data['args']['batch_size']}, normalised and augmented (shift by up "
             "to 2 px + flip), one thread, median of interleaved rounds:", "",
             f"- per item, in Python (the loader before): {data['per_item_images_per_s_per_core']:,.0f} images/s",
             f"- whole uint8 batches (`get_batch` + `batch_augmentation`, what the trainer does): "
             f"**{data['batched_aug_images_per_s_per_core']:,.0f} images/s** ({data['batched_vs_per_item']:.1f}x; "
             "target >= 80k)"]
    if data.get("imagefolder_vs_torchvision_ratio") is not None:
        lines += [f"- image folder (PNG, timm training transform, {data['loader_workers']} workers; uint8 items, "
                  f"each batch normalised as the trainer does): {data['imagefolder_images_per_s']:,.0f} images/s vs "
                  "torchvision's ImageFolder with timm's usual transform of the same augmentation (ToTensor + "
                  f"Normalize per item), same workers: {data['torchvision_images_per_s']:,.0f}; ratio "
                  f"**{data['imagefolder_vs_torchvision_ratio']:.2f}** (target >= 1.0)",
                  f"- divergence check, tiny model: {data['tiny_model_steps_per_s_sync_every_step']:,.0f} steps/s "
                  f"with a host look every step vs {data['tiny_model_steps_per_s_watch']:,.0f} with the device-side "
                  f"flag ({data['sync_removed_speedup']:.2f}x; a CPU has no queue to stall, a GPU does)",
                  f"- parity, same images and teacher recipe: tie-aware mAP {fmt(data['imagefolder_map_tie_aware'])} "
                  f"from the PNG folder vs {fmt(data['in_memory_map_tie_aware'])} in memory: gap "
                  f"**{data['imagefolder_map_gap_points']:.2f} points** (target <= 1)"]
    return lines


def section_robustness(data: dict[str, Any]) -> list[str]:
    width, height = data["photo_size"]
    rows = [{"stage": name, **result} for name, result in data["commands"].items()]
    checks = [{"name": name, **result} for name, result in data["agreement"].items()]
    return [f"Phone photos: {data['photos']} training and {data['test_photos']} test JPEGs of {width}x{height} "
            "(made from scikit-learn's two sample photographs: crops, flips, colour shifts, noise), and one "
            f"{data['big_query_side']}x{data['big_query_side']} PNG query. Peak memory of each command's whole process "
            "tree (loader workers included: the sum of their PSS, a shared page counted once), sampled every 20 ms "
            "(targets: <= 1.5 GB; the big query <= 1 GB), and of its largest process (RSS):", "",
            *table(rows, [("stage", "stage"), ("command", "command"), ("peak_rss_gb", "peak GB (tree PSS)"),
                          ("largest_process_rss_gb", "largest process RSS GB"),
                          ("seconds", "seconds"), ("exit", "exit")]), "",
            "Codes of the shipped decoding (each photo made small one at a time by the graph's own resize on the "
            f"host; only images over {data['decode_pixels'] / 1e6:.1f} megapixels decoded reduced, by JPEG DCT "
            "scaling or box reduce) against the full-size decode through the graph, on JPEGs of random photo sizes "
            f"(long side 1200-4000 px): agreement **{fmt(data['large_image_code_agreement'])}** at the worst model "
            f"(target >= 0.995); over {data['decode_pixels'] / 1e6:.1f} megapixels (long side 6000-8000 px, decoded "
            f"reduced): **{fmt(data['huge_image_code_agreement'])}**. Images at or below the model's size are "
            "decoded unchanged (tests/test_large_images.py). The last rows are the alternative not taken: every "
            "large JPEG decoded reduced to about twice a 224-px model's resize.", "",
            *table([*checks, *({"name": f"{n} (over the cap)", **r} for n, r in data["huge_agreement"].items()),
                    *({"name": f"{n} (reduced to 2x resize)", **r} for n, r in data["reduced_decode_probe"].items())],
                   [("name", "model"), ("input_size", "input px"), ("bits", "bits"), ("images", "images"),
                    ("code_agreement", "code agreement"), ("mean_differing_bits", "mean bits differing"),
                            ("max_differing_bits", "max bits differing")])]


SECTIONS = {"quickstart": section_quickstart, "data": section_data, "teacher": section_teacher,
            "distill": section_distill, "quantize": section_quantize, "export": section_export,
            "ternary_kernels": section_ternary_kernels, "students": section_students,
            "search": section_search, "encode": section_encode, "robustness": section_robustness}


def render() -> Path:
    lines = ["# Benchmarks", "",
             "Written by `python benchmarks/run_all.py` from the JSON each benchmark wrote "
             "(benchmarks/results/*.json, committed); "
             f"figures are never edited by hand. Generated {date.today()} at commit {git_commit()}.", ""]
    for name, render_section in SECTIONS.items():
        data = load(name)
        lines += [f"## {name}", "", f"Command: `{command(name)}`", ""]
        if data is None:
            lines += ["Not re-run since the figures moved to the committed benchmarks/results/ (the earlier ones, "
                      "from the 12k-image, 3-epoch protocol, are in BENCHMARKS.md at commit "
                      f"{LAST_UNCOMMITTED_FIGURES}).", ""]
            continue
        lines += [f"Machine: {data['machine']}. Wall time of the command: {data['wall_seconds']:.0f} s (models "
                  "already trained in its work folder are reused, not retrained; training times come from "
                  "metrics.jsonl).",
                  ""]
        lines += [*render_section(data), ""]
    path = ROOT / "BENCHMARKS.md"
    path.write_text("\n".join(lines))
    return path


HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"


def headline() -> list[str]:
    """The README's headline: each stage's key figure on Fashion-MNIST, from the benchmark JSON."""
    teacher, distill, quantize, export, quick = (load(n) for n in ("teacher", "distill", "quantize", "export",
                                                                      "quickstart"))
    rows = []
    if teacher:
        k16 = next((r for r in teacher["rows"] if r["bits"] == 16), None)
        if k16:
            rows.append(("LLC teacher, 16 bits", f"MHD accuracy {fmt(k16['mhd_acc'])} vs float "
                         f"{fmt(k16['float_acc'])}; mAP (tie-aware) {fmt(k16['map_tie_aware'])}"))
        for r in teacher.get("ood") or []:
            ex, msp = r["exact_match"], r["msp_baseline"]
            rows.append((f"OOD, no threshold, {r['bits']} bits",
                         f"exact match TPR {fmt(ex['tpr'])} / FPR {fmt(ex['fpr'])} (J {fmt(ex['youden_j'])}) with 0 "
                         f"OOD samples vs max-softmax TPR {fmt(msp['tpr'])} / FPR {fmt(msp['fpr'])} "
                         f"(J {fmt(msp['youden_j'])}) tuned on {msp['ood_samples_used']:,}"))
    for row in (distill or {}).get("rows", []):
        dsh = f", {row['dsh_map']['mean']:.4f} DSH" if row.get("dsh_map") else ""
        seeds = len(row["seeds"])
        rows.append((f"student {distill['args']['student']}, {row['labelled_fraction']:.0%} labels",
                     f"{row['param_ratio']:.1f}x fewer parameters, mAP (tie-aware) {row['distilled_map']['mean']:.4f} "
                     f"distilled vs {row['labels_only_map']['mean']:.4f} labels only{dsh} "
                     f"({row['gain_points']['mean']:+.2f} +/- {row['gain_points']['sd']:.2f} points, "
                     f"{seeds} seed{'s' if seeds > 1 else ''}, {row.get('epochs', distill['args']['epochs'])} "
                     f"epochs; {row['student_teacher_ratio']['mean']:.3f} x teacher)"))
    if quantize:
        best = min(quantize["rows"], key=lambda r: abs(r["t"] - 0.05))
        rows.append((f"ternary student (t={best['t']})", f"FC layers {best['compression']:.1f}x smaller, mAP drop "
                     f"{best['map_drop_points']:.2f} points, MHD drop {best['mhd_drop_points']:.2f} points"))
    if export and export.get("whole_file_ratio"):
        small = next(r for r in export["models"] if r["model"] == export.get("phone_model", r["model"]))
        drop = export.get("whole_file_map_drop_points")
        rows.append((export.get("phone_model", "phone model"), f"whole file {export['whole_file_ratio']:.2f}x "
                     f"smaller than fp32 ({small['onnx_bytes'] / 1e6:.2f} MB)"
                     + (f", mAP drop {drop:.2f} points" if drop is not None else "")
                     + f"; {export['weights'].split(' (')[0]} weights"))
    if export and export.get("section_224"):
        section = export["section_224"]
        rows.append((f"phone model at {section['image_size']} px ({section['shipped_student']}, "
                     f"{section['recipe']} recipe)",
                     f"{export['phone_vs_fp32_student_latency_224_b1']:.2f}x its fp32 student's b=1 latency and "
                     f"{export['phone_teacher_latency_ratio_224_b1']:.3f}x the {section['teacher']} teacher's in "
                     "onnxruntime CPU (worst of 1 and 2 threads)"
                     + (f"; {export['phone_vs_fp32_student_latency_224_browser']:.2f}x the fp32 student in the "
                        "browser" if export.get("phone_vs_fp32_student_latency_224_browser") is not None else "")))
    search = load("search")
    if search and search.get("default_speedup_vs_flat_10m") is not None:
        chosen = next(r for r in search["rows"] if r["items"] == 10_000_000 and r["kind"] == "ivf" and r["default"])
        rows.append(("search, 10,000,000 codes", f"ivf at the setting it chose itself ({chosen['setting']}): "
                     f"{search['default_speedup_vs_flat_10m']:.0f}x flat's queries/s at recall@100 "
                     f"{fmt(search['default_recall_at_100_10m_fresh'])} on fresh queries"))
    elif search and search.get("recommended"):
        best = search["recommended"]
        rows.append((f"search, {best['items']:,} codes", f"{best['kind']} {best['setting']}: "
                     f"{best['speedup_vs_flat']:.0f}x flat's queries/s at recall@100 {fmt(best['recall_at_100'])}"))
    if quick:
        machine_name = quick["machine"].split(" (")[0]
        rows.append(("quickstart, whole pipeline", f"{quick['wall_seconds']:.0f} s on {machine_name}"))
    missing = [name for name, data in (("teacher", teacher), ("distill", distill), ("quantize", quantize))
               if data is None]
    if missing:
        rows.append((", ".join(missing), "not re-run since the figures moved to benchmarks/results/ (see "
                                         f"BENCHMARKS.md at commit {LAST_UNCOMMITTED_FIGURES})"))
    if not rows:
        return ["Not measured yet: run `python benchmarks/run_all.py`."]
    return ["| stage | result |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows], "",
            "Details, commands and machine: [BENCHMARKS.md](BENCHMARKS.md)."]


def update_readme() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(HEADLINE_START) + len(HEADLINE_START), text.index(HEADLINE_END)
    readme.write_text(text[:start] + "\n" + "\n".join(headline()) + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--only", help="comma-separated benchmarks to run (default: all)")
    args = parser.parse_args()
    if not args.render_only:
        for name in (args.only.split(",") if args.only else BENCHMARKS):
            run(name)
    print(f"wrote {render()}")
    update_readme()


if __name__ == "__main__":
    main()
