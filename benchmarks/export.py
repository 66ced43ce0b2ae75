"""Export figures: ONNX file sizes, CPU latency (onnxruntime vs PyTorch eager), parity, mAP, Hamming search speed.

Two kinds of models. By default UNTRAINED ones (random init, timm pretrained=False): an LLC ResNet50 teacher and a
MobileNetV3-small student; file size and latency do not depend on the weights' values, and parity is still
measured on real images. With ``--trained-run DIR`` the trained teacher and student of that run directory (e.g. a
run of the distillation benchmark), and then also each file's tie-aware mAP on Fashion-MNIST (queries = 10k test
images, database = 60k), from the ONNX file itself.

The student is exported fp32; ternary with TTQ's default scope (every nn.Linear and the 1x1 head conv; packed at
opset 18 and as INT2 at opset 25, and with static int8 for the rest); and as the phone model: ternary over the wide
1x1 convs (``quantize.scope: pointwise``, ``quantize.min_weights``: ``--phone-min-weights``) with the remaining
float layers stored as int8 (``hashdistill export --int8``: static, calibrated on training images; also dynamic,
for its latency), as ``.onnx`` and as ORT format (``--mobile``). A trained student's ternary versions are
fine-tuned under its distillation loss (``quantize_student``, ``--quantize-epochs``). Latency is the median of
several runs in this one process, so the ratios are comparable; search compares faiss IndexBinaryFlat with the
numpy popcount baseline (hashdistill.codes) over random codes.

Deployment checks (export_checks.py): the phone model's .ort against its int8 .onnx (latency, taking turns, and
codes on test + database images), the fp32 student's image-in graph against the PyTorch model fed by timm's eval
transform (odd-size files), onnxruntime-web in headless Chromium against Python onnxruntime (image files, the
local onnxruntime-web copy: nothing is fetched), and the 224-px figures of export_224.py (the ``--recipe-224``
recipe's teacher and candidate students with random weights, 200 interleaved runs at 1 and 2 threads, the browser,
the pre-processing's share, a CLI export's peak RSS). ``--skip-224`` and the count flags make a quick smoke run;
``--only-224`` measures the 224-px figures alone and merges them into ``--out`` (the trained 32-px figures stay).

    python benchmarks/export.py --out benchmarks/results/export.json
    python benchmarks/export.py --trained-run bench_out/distill-converged/f1-s0 --out benchmarks/results/export.json
    python benchmarks/export.py --only-224 --out benchmarks/results/export.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from common import git_commit, machine, print_table, write_json
from export_224 import section_224
from export_checks import (
    ORT_WEB,
    batch_of,
    browser_code_agreement,
    browser_unavailable,
    cpu_session,
    fashion_test_pixels,
    ort_code_agreement,
    ort_vs_onnx_latency,
    save_untrained,
    timm_eval_agreement,
    write_image_files,
)

from hashdistill import codes
from hashdistill.checkpoint import read_metadata
from hashdistill.data import build_dataset, dataset_info
from hashdistill.evaluate import EvalSplits, code_metrics, encode_splits
from hashdistill.export.loading import load_any_model
from hashdistill.export.mobile import quantize_int8, to_mobile
from hashdistill.export.onnx_encoder import onnx_encoder
from hashdistill.export.onnx_export import export_onnx
from hashdistill.export.runtime import EdgeModel
from hashdistill.export.verify import (
    CALIBRATION_IMAGES,
    MOBILE_CHECK_IMAGES,
    measure_parity,
    reference_pixels,
    same_code_rate,
)
from hashdistill.quantize.stage import quantize_student
from hashdistill.quantize.ttq import TTQConfig, ternary_layers
from hashdistill.recipe import DataConfig, Recipe, load_recipe
from hashdistill.rundir import RECIPE_FILE_NAME, RunDir
from hashdistill.search.index import HashIndex

PHONE = "phone model: ternary wide 1x1 convs + int8"
# Keys of the 224-px table this benchmark wrote before the 200-run protocol (section_224 replaces them)
STALE_224_KEYS = ("models_224", "latency_runs_224", "browser_phone_ms_b1_224", "browser_runs")
PHONE_FILE = "pointwise-int8.onnx"  # benchmark_models' static int8 file of the phone model (its .ort lies beside it)
MAP_OF = ("student", "ternary student + int8", PHONE, PHONE + ", dynamic int8")  # files whose mAP is measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/export.json")
    parser.add_argument("--trained-run", help="a run directory with a trained teacher and student (checkpoints/)")
    parser.add_argument("--quantize-epochs", type=int, default=2, help="TTQ fine-tuning epochs of a trained student")
    parser.add_argument("--phone-min-weights", type=int, default=65536,
                        help="the phone model ternarizes the 1x1 convs with at least this many weights")
    parser.add_argument("--teacher", default="resnet50", help="untrained teacher's timm name")
    parser.add_argument("--student", default="mobilenetv3_small_100", help="untrained student's timm name")
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--dataset", default="fashion-mnist", help="real images for parity (digits needs no files)")
    parser.add_argument("--image-size", type=int, default=32, help="input size (the fashion-mnist recipe's)")
    parser.add_argument("--parity-images", type=int, default=512)
    parser.add_argument("--latency-runs", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--database", type=int, default=1_000_000, help="random codes in the search benchmark")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--search-bits", default="16,64")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--edge-files", type=int, default=200, help="image files in the edge agreement check")
    parser.add_argument("--mobile-check-images", type=int, default=MOBILE_CHECK_IMAGES,
                        help="test, then database images on which the phone model's .ort and .onnx codes are compared")
    parser.add_argument("--timm-files", type=int, default=200, help="odd-size files in the timm eval transform check")
    parser.add_argument("--browser-files", type=int, default=200, help="image files in the browser agreement check")
    parser.add_argument("--browser-runs", type=int, default=20, help="timed runs of the browser latency (median)")
    parser.add_argument("--ort-web", default=str(ORT_WEB), help="onnxruntime-web's dist folder (no CDN fetch)")
    parser.add_argument("--skip-224", action="store_true", help="no 224-px figures (a quick smoke run)")
    parser.add_argument("--only-224", action="store_true", help="measure the 224-px figures alone and merge them "
                        "into --out's figures (the rest of --out is kept, as it was measured)")
    parser.add_argument("--recipe-224", default="imagenet100", help="the recipe whose teacher and student the "
                        "224-px figures time (random weights)")
    parser.add_argument("--students-224", default="mobilenetv2_100,efficientnet_lite0,"
                        "tf_mobilenetv3_large_minimal_100,mobilenetv3_large_100",
                        help="candidate students timed at 224 px beside the recipe's own")
    parser.add_argument("--runs-224", type=int, default=200, help="timed runs of every 224-px latency")
    parser.add_argument("--calibration-224", type=int, default=32,
                        help="images that calibrate the 224-px phone models' static int8")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(0)
    if args.only_224:
        return merge_224(args, started)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        recipe = trained_checkpoints(args, folder) if args.trained_run else untrained_checkpoints(args, folder)
        models = benchmark_models(args, folder, recipe)
        edge_files = edge_file_agreement(folder, args.edge_files)
        checks = deployment_checks(args, folder)
    search = [benchmark_search(int(bits), args.database, args.queries, args.k, args.latency_runs)
              for bits in args.search_bits.split(",")]
    print_table(models, ["model", "opset", "onnx_bytes", "ternary_layers", "identical_code_rate",
                         "identical_code_rate_vs_float_onnx", "map_tie_aware", "ort_ms_b1", "ort_ms_b64",
                         "torch_ms_b64"])
    print()
    print_table(search, ["bits", "database", "queries", "k", "faiss_qps", "numpy_qps", "faiss_speedup"])
    by_name = {row["model"]: row for row in models}
    fp32, phone, teacher = by_name["student"], by_name[PHONE], by_name["teacher"]
    drop = 100 * (fp32["map_tie_aware"] - phone["map_tie_aware"]) if recipe else None
    write_json(args.out, {"benchmark": "export", "machine": machine(), "wall_seconds": time.time() - started,
                          "args": vars(args), "phone_model": PHONE,
                          "weights": f"trained ({args.trained_run})" if recipe else "untrained (random init)",
                          "models": models, "search": search,
                          "whole_file_ratio": fp32["onnx_bytes"] / phone["onnx_bytes"],
                          "ort_whole_file_ratio": fp32["onnx_bytes"] / by_name[f"{PHONE} (.ort)"]["onnx_bytes"],
                          "student_teacher_latency_ratio_b64": phone["ort_ms_b64"] / teacher["ort_ms_b64"],
                          "fp32_student_teacher_latency_ratio_b64": fp32["ort_ms_b64"] / teacher["ort_ms_b64"],
                          "whole_file_map_drop_points": drop,
                          "edge_files": edge_files, "edge_file_agreement": edge_files["agreement"], **checks})


def merge_224(args: argparse.Namespace, started: float) -> None:
    """``--only-224``: the 224-px figures measured now, merged into --out's earlier figures (which say when and
    how they were measured; ``section_224`` records this run's commit and wall time)."""
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {"benchmark": "export"}
    with tempfile.TemporaryDirectory() as tmp:
        figures = figures_224(args, Path(tmp))
    figures["section_224"].update({"commit": git_commit(), "machine": machine(),
                                   "wall_seconds": time.time() - started, "args": vars(args)})
    stale = {*STALE_224_KEYS, *previous.get("section_224", {}).get("keys", [])}  # what the last 224-px run wrote
    kept = {k: v for k, v in previous.items() if k not in stale}
    kept.get("skipped", {}).pop("figures_224", None)
    write_json(args.out, {**kept, **figures})


def figures_224(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    return section_224(args, folder, phone_configs(args)["pointwise"], Path(args.ort_web),
                       browser_unavailable(Path(args.ort_web)))


def untrained_checkpoints(args: argparse.Namespace, folder: Path) -> None:
    """Random-init teacher and student checkpoints (and both ternary versions) in ``folder``."""
    cfg = DataConfig(dataset=args.dataset, image_size=args.image_size)
    extra = {"data": dataclasses.asdict(cfg), "recipe_hash": "benchmark"}
    save_untrained(folder, (args.teacher, args.student), args.bits, dataset_info(cfg), extra, phone_configs(args))


def phone_configs(args: argparse.Namespace) -> dict[str, TTQConfig]:
    """The two ternary students by checkpoint stem: TTQ's default scope, and the phone model's."""
    return {"ternary": TTQConfig(), "pointwise": TTQConfig(scope="pointwise", min_weights=args.phone_min_weights)}


def trained_checkpoints(args: argparse.Namespace, folder: Path) -> Recipe:
    """The run's teacher and student, and the student ternarized at both scopes and fine-tuned, in ``folder``."""
    run = RunDir(args.trained_run, writer=False)
    for name in ("teacher", "student"):
        (folder / f"{name}.safetensors").write_bytes(run.checkpoint(name).read_bytes())
    for stem, config in phone_configs(args).items():
        recipe = load_recipe(run.path / RECIPE_FILE_NAME, [f"quantize.scope={config.scope}",
                                                          f"quantize.min_weights={config.min_weights}",
                                                          f"quantize.train.epochs={args.quantize_epochs}"])
        print(f"ternarizing the trained student ({config.scope}, min_weights {config.min_weights}) ...", flush=True)
        quantize_student(folder / "student.safetensors", folder / f"{stem}.safetensors", recipe,
                         RunDir(folder / f"quantize-{stem}"), torch.device("cpu"), folder / "teacher.safetensors")
    return recipe


def benchmark_models(args: argparse.Namespace, folder: Path, recipe: Recipe | None) -> list[dict]:
    """Export teacher, fp32 student and ternary students; sizes, parity on real images, latencies, and with a
    trained run each file's mAP."""
    cfg = recipe.data if recipe else DataConfig(dataset=args.dataset, image_size=args.image_size)
    test = build_dataset(cfg, "test")
    images = [test.pixels(i) for i in range(min(args.parity_images, len(test)))]
    splits = EvalSplits.build(cfg) if recipe else None
    calibration = reference_pixels(load_any_model(folder / "student.safetensors")[1], CALIBRATION_IMAGES, "train")
    cases = [("teacher", "teacher", 18), ("student", "student", 18), ("ternary student", "ternary", 18),
             ("ternary student (INT2)", "ternary", 25), ("ternary student + int8", "ternary", 18),
             (PHONE, "pointwise", 18), (PHONE + " (.ort)", "pointwise", 18),
             (PHONE + ", dynamic int8", "pointwise", 18)]
    rows = []
    for name, stem, opset in cases:
        print(f"exporting {name} (opset {opset}) ...", flush=True)
        model, meta = load_any_model(folder / f"{stem}.safetensors")
        path = export_onnx(model, meta, folder / f"{stem}-{opset}.onnx", opset=opset, force=True)
        float_path = path
        if "int8" in name:
            dynamic = "dynamic" in name
            path = quantize_int8(path, folder / f"{stem}-int8{'-dynamic' if dynamic else ''}.onnx",
                                 None if dynamic else calibration)
        if ".ort" in name:
            path = to_mobile(path)["ort"]
        parity = measure_parity(path, model, images)
        parity["identical_code_rate_vs_float_onnx"] = same_code_rate(float_path, path, images)
        row = {"model": name, "arch": meta["arch"], "opset": opset, "int8": ("dynamic" if "dynamic" in name else
                                                                         "static") if "int8" in name else None,
               "checkpoint_bytes": (folder / f"{stem}.safetensors").stat().st_size,
               "onnx_bytes": parity["file_bytes"], "ternary_layers": len(ternary_layers(model)),
               "ternary_encoding": parity["ternary_encoding"], "parity_images": parity["images"],
               "identical_code_rate": parity["identical_code_rate"],
               "identical_code_rate_vs_float_onnx": parity["identical_code_rate_vs_float_onnx"],
               "max_abs_logit_diff": parity["max_abs_logit_diff"]}
        if splits is not None and name in MAP_OF:  # the others' codes equal one of these (identical-code rates)
            logits = encode_splits(onnx_encoder(str(path), cfg.eval_batch_size), splits)
            row["map_tie_aware"] = code_metrics(logits, splits, model.class_codes.cpu().numpy(),
                                                recipe.eval)["map_tie_aware"]
        rows.append({**row, **latencies(path, model, images, args.latency_runs)})
    return rows


def latencies(path: Path, model: torch.nn.Module, images: list[np.ndarray], runs: int) -> dict[str, float]:
    """Median ms per batch of 1 and 64 images: onnxruntime (CPU) on the image-in file (uint8 pixels in, its
    pre-processing included) and PyTorch eager on the same pixels through EvalTransform.apply."""
    session = cpu_session(path)
    transform = EdgeModel(path).meta.transform
    figures = {}
    for batch in (1, 64):
        pixels = batch_of(images, batch)
        figures[f"ort_ms_b{batch}"] = median_ms(partial(session.run, None, {"images": pixels}), runs)
        with torch.no_grad():
            tensor = torch.from_numpy(pixels)
            figures[f"torch_ms_b{batch}"] = median_ms(partial(_torch_forward, model, transform, tensor), runs)
    return figures


def _torch_forward(model: torch.nn.Module, transform, pixels: torch.Tensor) -> torch.Tensor:
    return model(transform.apply(pixels))


def deployment_checks(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The top-level figures of the deployment targets (export_checks.py): the phone model's .ort against its int8
    .onnx, the image-in graph against timm's eval transform, the 224-px table and the browser; a skipped part
    leaves its keys out (and says why under ``skipped``)."""
    phone = folder / PHONE_FILE
    meta = read_metadata(folder / "pointwise.safetensors")
    images = reference_pixels(meta, args.parity_images)
    print("phone model: .ort vs .onnx ...", flush=True)
    speed = ort_vs_onnx_latency(phone, images, args.latency_runs)
    agreement = ort_code_agreement(phone, meta, images, args.mobile_check_images)
    print("timm eval transform vs the image-in graph ...", flush=True)
    timm = timm_eval_agreement(folder, folder / "student.safetensors", folder / "student-18.onnx", args.timm_files)
    out: dict[str, Any] = {"ort_vs_onnx": speed, "ort_code_check": agreement,  # the top-level ratios are 224 px
                           "ort_code_agreement": agreement["agreement"], "timm_eval_files": timm,
                           "timm_eval_code_agreement": timm["agreement"], "skipped": {}}
    if args.skip_224:
        out["skipped"]["figures_224"] = "--skip-224"
    else:
        out.update(figures_224(args, folder / "224"))
    reason = browser_unavailable(Path(args.ort_web))
    if reason:
        print(f"browser checks skipped: {reason}", flush=True)
        out["skipped"]["browser"] = reason
    else:
        print("browser: onnxruntime-web vs onnxruntime ...", flush=True)
        files = browser_code_agreement(phone, folder, args.browser_files, Path(args.ort_web))
        out.update({"browser_files": files, "browser_code_agreement": files["agreement"]})
    return out


def edge_file_agreement(folder: Path, count: int) -> dict:
    """Codes of the ternary student on Fashion-MNIST test images written as PNG and JPEG files of several sizes and
    aspect ratios, by training-time evaluation (ImageFileDataset's eval items), the image-in ONNX graph run
    directly, and the edge runtime (EdgeModel.encode on the paths): the fraction of files where all three agree."""
    from hashdistill.data.imagefolder import ImageFileDataset

    model, _ = load_any_model(folder / "pointwise.safetensors")
    onnx_path = folder / "pointwise-18.onnx"
    edge = EdgeModel(onnx_path)
    shapes = [(28, 28), (40, 30), (23, 57), (100, 64), (64, 64), (31, 90)]
    paths = write_image_files(folder / "files", fashion_test_pixels(count), shapes, count)
    items = ImageFileDataset(paths, [0] * len(paths), ["any"], edge.meta.transform)
    with torch.no_grad():
        training = codes.pack_codes(model(torch.stack([items[i][0] for i in range(len(items))])).numpy())
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    graph = np.concatenate([session.run(["codes"], {"images": items.pixels(i)[None]})[0] for i in range(len(items))])
    runtime = edge.encode(paths)
    agree = (training == graph).all(axis=1) & (graph == runtime).all(axis=1)
    return {"files": len(paths), "shapes": shapes, "formats": ["png", "jpeg"],
            "model": "the phone model's ternary student (opset 18)",
            "agreement": float(agree.mean()), "training_vs_graph": float((training == graph).all(axis=1).mean()),
            "graph_vs_runtime": float((graph == runtime).all(axis=1).mean())}


def benchmark_search(bits: int, size: int, queries: int, k: int, runs: int) -> dict:
    """Queries/s of an exhaustive top-k Hamming search: faiss IndexBinaryFlat vs numpy XOR + popcount."""
    rng = np.random.default_rng(bits)
    width = codes.packed_width(bits)
    database = rng.integers(0, 256, (size, width), dtype=np.uint8)
    query = rng.integers(0, 256, (queries, width), dtype=np.uint8)
    if bits % 8:
        database[:, -1] &= 0xFF << (8 - bits % 8) & 0xFF  # padding bits are zero in real codes
        query[:, -1] &= 0xFF << (8 - bits % 8) & 0xFF
    index = HashIndex(database, bits)
    faiss_s = median_ms(lambda: index.search(query, k), max(1, runs // 2)) / 1000
    numpy_s = median_ms(lambda: numpy_top_k(query, database, k), 1, warmup=0) / 1000
    distances, _ = index.search(query[:5], k)
    reference = np.sort(codes.hamming_distances(query[:5], database), axis=1)[:, :k]
    assert (distances == reference).all(), "faiss and numpy disagree"
    return {"bits": bits, "database": size, "queries": queries, "k": k, "faiss_qps": queries / faiss_s,
            "numpy_qps": queries / numpy_s, "faiss_speedup": numpy_s / faiss_s}


def numpy_top_k(query: np.ndarray, database: np.ndarray, k: int) -> np.ndarray:
    """The baseline: hashdistill.codes' blockwise XOR + popcount, then a partial sort per query."""
    top = np.empty((len(query), k), dtype=np.int64)
    for start, block in codes.iter_hamming_rows(query, database):
        part = np.argpartition(block, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(block, part, axis=1), axis=1, kind="stable")
        top[start:start + len(block)] = np.take_along_axis(part, order, axis=1)
    return top


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    main()
