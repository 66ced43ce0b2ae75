"""The export benchmark's 224-px figures (benchmarks/export.py): the phone model where photos need it.

For each candidate student (``--students-224``; the ``--recipe-224`` recipe's own student first: the shipped one)
the fp32 student and its phone model (ternary wide 1x1 convs + static int8, the benchmark's ``PHONE``), with the
recipe's ResNet50 teacher, random weights (latency and file bytes do not depend on the weights' values). Every
latency is onnxruntime CPU at b=1 on one 224x224 image, all files taking turns run by run (the machine's load
drifts; turns expose every file to the same load, so ratios hold), ``--runs-224`` timed runs after a warm-up,
at 1 and at 2 intra-op threads: the median and the interquartile range. The browser figure runs the shipped
student's fp32 and phone files in onnxruntime-web (wasm, 1 thread) in headless Chromium, in alternating chunks.
The peak RSS is a whole ``hashdistill export --int8 static --mobile`` of a 224-px mobilenetv3_large_100
checkpoint with the default calibration count, in its own process, on an image folder written from
Fashion-MNIST.
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from export_checks import batch_of, browser_model_ms, fashion_test_pixels, save_untrained, square_pixels
from PIL import Image
from timing import WARMUP, interleaved_stats, timing_session
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from hashdistill.data.imagefolder import eval_transform
from hashdistill.export.loading import load_any_model
from hashdistill.export.mobile import mobile_outputs, quantize_int8, to_mobile
from hashdistill.export.onnx_export import export_onnx
from hashdistill.export.verify import CALIBRATION_IMAGES
from hashdistill.quantize.ttq import TTQConfig
from hashdistill.recipe import load_recipe

SIZE = 224
THREADS = (1, 2)
CLASSES = 100  # the imagenet100 recipe's classes (an image folder: the recipe does not say how many)
BROWSER_CHUNKS = 4  # the two browser files take turns chunk by chunk (a page times one model)
RSS_ARCH = "mobilenetv3_large_100"  # the student whose CLI export was killed at 14 GB before calibration streamed


def build_models(folder: Path, recipe_name: str, students: Sequence[str], phone: TTQConfig,
                 calibration: Sequence[np.ndarray]) -> tuple[dict[str, Any], Path]:
    """Random-init checkpoints at 224 px of the recipe's teacher and each student, exported: the teacher's and
    each fp32 student's image-in .onnx, each phone model's static int8 .onnx and its .ort. Returns
    {arch: {"student": path, "phone": path}} and the teacher's path."""
    recipe, info, extra = recipe_224(recipe_name)
    files: dict[str, Any] = {}
    teacher = None
    for arch in students:
        arch_folder = folder / arch
        save_untrained(arch_folder, (recipe.teacher.backbone, arch), recipe.teacher.bits, info, extra,
                       {"pointwise": phone})
        if teacher is None:
            teacher = exported(arch_folder, "teacher")
        print(f"224 px: exporting {arch} ...", flush=True)
        student = exported(arch_folder, "student")
        phone_file = quantize_int8(exported(arch_folder, "pointwise"), arch_folder / "phone.onnx", calibration)
        to_mobile(phone_file)
        files[arch] = {"student": student, "phone": phone_file}
    assert teacher is not None
    return files, teacher


def recipe_224(recipe_name: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The 224-px recipe and the checkpoint metadata (``info``, ``extra``) its random-init models are saved with."""
    recipe = load_recipe(recipe_name, [])
    if recipe.data.image_size != SIZE:
        raise SystemExit(f"--recipe-224 {recipe_name}: its image_size is {recipe.data.image_size}, not {SIZE}")
    info = {"class_names": [f"class_{i:03d}" for i in range(CLASSES)],
            **eval_transform(recipe.data, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD).as_metadata()}
    return recipe, info, {"data": dataclasses.asdict(recipe.data), "recipe_hash": "benchmark"}


def thread_latencies(paths: dict[str, Path], pixels: np.ndarray, runs: int) -> dict[str, Any]:
    """Per thread count (``THREADS``), the interleaved stats of every file in ``paths`` (name -> file)."""
    out = {}
    for threads in THREADS:
        print(f"224 px: timing {len(paths)} files at {threads} thread(s), {runs} runs ...", flush=True)
        sessions = {name: timing_session(path, threads) for name, path in paths.items()}
        out[str(threads)] = interleaved_stats(sessions, {"images": pixels}, runs)
    return out


def exported(folder: Path, stem: str) -> Path:
    model, meta = load_any_model(folder / f"{stem}.safetensors")
    return export_onnx(model, meta, folder / f"{stem}.onnx", opset=18, force=True)


def cpu_latencies(files: dict[str, Any], teacher: Path, shipped: str, pixels: np.ndarray, runs: int
                  ) -> dict[str, Any]:
    """Per thread count, the stats of every file (teacher, each fp32 student and phone model, the shipped phone
    model's .ort), all taking turns."""
    paths = {"teacher": teacher, f"{shipped} phone .ort": mobile_outputs(files[shipped]["phone"])[0]}
    for arch, pair in files.items():
        paths.update({f"{arch} fp32": pair["student"], f"{arch} phone": pair["phone"]})
    return thread_latencies(paths, pixels, runs)


def student_rows(files: dict[str, Any], latency: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per student: bytes and, per thread count, phone / fp32 student and phone / teacher."""
    rows = []
    for arch, pair in files.items():
        row: dict[str, Any] = {"arch": arch, "fp32_onnx_bytes": pair["student"].stat().st_size,
                               "phone_onnx_bytes": pair["phone"].stat().st_size,
                               "phone_ort_bytes": mobile_outputs(pair["phone"])[0].stat().st_size}
        for threads, stats in latency.items():
            phone, fp32 = stats[f"{arch} phone"]["median_ms"], stats[f"{arch} fp32"]["median_ms"]
            row.update({f"fp32_ms_{threads}t": fp32, f"phone_ms_{threads}t": phone,
                        f"phone_vs_fp32_{threads}t": phone / fp32,
                        f"phone_vs_teacher_{threads}t": phone / stats["teacher"]["median_ms"]})
        rows.append(row)
    return rows


def browser_latency(pair: dict[str, Path], folder: Path, images: Sequence[np.ndarray], runs: int,
                    ort_web: Path) -> dict[str, Any]:
    """The fp32 student and its phone model in onnxruntime-web, ``BROWSER_CHUNKS`` alternating chunks of
    ``runs / BROWSER_CHUNKS`` runs each (the page reports a chunk's median); the median of the chunk medians."""
    chunks: dict[str, list[float]] = {"fp32": [], "phone": []}
    per_chunk = max(1, runs // BROWSER_CHUNKS)
    for _ in range(BROWSER_CHUNKS):
        for name, key in (("fp32", "student"), ("phone", "phone")):
            chunks[name].append(browser_model_ms(pair[key], folder / f"browser-{name}", images, per_chunk, ort_web))
    medians = {name: statistics.median(values) for name, values in chunks.items()}
    return {"runtime": "onnxruntime-web (wasm, 1 thread) in headless Chromium", "runs": per_chunk * BROWSER_CHUNKS,
            "chunk_medians_ms": chunks, "fp32_ms": medians["fp32"], "phone_ms": medians["phone"],
            "ratio": medians["phone"] / medians["fp32"]}


def ort_vs_onnx_b64(phone: Path, images: Sequence[np.ndarray], runs: int) -> dict[str, Any]:
    """The shipped phone model's .ort against its .onnx on a batch of 64 at 224 px (onnxruntime's default
    threads), taking turns."""
    print(f"224 px: .ort vs .onnx at b=64, {runs} runs ...", flush=True)
    sessions = {"onnx": timing_session(phone, 0), "ort": timing_session(mobile_outputs(phone)[0], 0)}
    stats = interleaved_stats(sessions, {"images": batch_of(images, 64)}, runs, warmup=2)
    return {"batch": 64, "threads": "onnxruntime's default (0: one a core)", **stats,
            "ratio": stats["ort"]["median_ms"] / stats["onnx"]["median_ms"]}


def preprocessing_share(pair: dict[str, Path], folder: Path, pixels: np.ndarray, runs: int) -> dict[str, Any]:
    """How much of the phone model's b=1 time (1 thread) its in-graph pre-processing takes, at a 224x224 input
    (resized to the recipe's resize size, then cropped) and at one already at the resize size (the resize is
    then the identity): the phone model taking turns with its own pre-processing graph."""
    from hashdistill.export.runtime import EdgeModel
    from hashdistill.preprocessing_graph import preprocess_graph

    transform = EdgeModel(pair["phone"]).meta.transform
    graph = folder / "preprocessing.onnx"
    graph.write_bytes(preprocess_graph(transform).SerializeToString())
    sessions = {"phone": timing_session(pair["phone"], 1), "preprocessing": timing_session(graph, 1)}
    side = transform.resize_size
    at_resize = np.asarray(Image.fromarray(pixels[0]).resize((side, side), Image.BICUBIC))[None]
    out: dict[str, Any] = {"threads": 1, "resize_size": side}
    for name, batch in (("input_224", pixels), (f"input_{side}", at_resize)):
        stats = interleaved_stats(sessions, {"images": batch}, runs)
        out[name] = {**stats, "share": stats["preprocessing"]["median_ms"] / stats["phone"]["median_ms"]}
    return out


def write_image_folder(root: Path, per_class_train: int, per_class_test: int, side: int = 320) -> Path:
    """An image folder (train/ and test/, 10 classes) of Fashion-MNIST images upscaled to ``side`` px JPEGs."""
    count = 10 * (per_class_train + per_class_test)
    pixels = fashion_test_pixels(count)
    for i, image in enumerate(pixels):
        split = "train" if i < 10 * per_class_train else "test"
        folder = root / split / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").resize((side, side), Image.BILINEAR).save(folder / f"{i:05d}.jpg")
    return root


def export_peak_rss_gb(folder: Path) -> dict[str, Any]:
    """Peak RSS of ``hashdistill export CKPT --int8 static --mobile`` on a 224-px ``RSS_ARCH`` checkpoint, with
    the default calibration count, in a child process of a process of its own."""
    recipe = load_recipe("imagenet100", [])
    data = dataclasses.replace(recipe.data, root=str(write_image_folder(folder / "images", 30, 3)))
    info = {"class_names": [f"class_{i}" for i in range(10)],
            **eval_transform(data, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD).as_metadata()}
    extra = {"data": dataclasses.asdict(data), "recipe_hash": "benchmark"}
    save_untrained(folder / "rss", ("resnet18", RSS_ARCH), recipe.teacher.bits, info, extra,
                   {"pointwise": TTQConfig(scope="pointwise")})
    command = [sys.executable, "-m", "hashdistill", "export", str(folder / "rss" / "pointwise.safetensors"),
               "-o", str(folder / "rss" / "phone.onnx"), "--int8", "static", "--mobile"]
    print("224 px: peak RSS of a CLI export ...", flush=True)
    started = time.time()
    # A parent of its own whose only child is the export: getrusage(RUSAGE_CHILDREN) there is that export's peak
    # (here it would also count this benchmark's earlier children).
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    peak_kib = int(subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True,
                                  text=True).stdout.split()[-1])
    return {"arch": RSS_ARCH, "command": "hashdistill export CKPT -o phone.onnx --int8 static --mobile",
            "calibration_images": CALIBRATION_IMAGES, "seconds": time.time() - started,
            "peak_rss_gb": peak_kib * 1024 / 1e9}


def section_224(args: Any, folder: Path, phone: TTQConfig, ort_web: Path, browser_reason: str | None
                ) -> dict[str, Any]:
    """The 224-px figures and the top-level keys they give export.json."""
    rss = export_peak_rss_gb(folder)  # first: the browser's processes are children too, and getrusage keeps the max
    recipe = load_recipe(args.recipe_224, [])
    students = list(dict.fromkeys([recipe.student.model, *filter(None, args.students_224.split(","))]))
    shipped = students[0]
    images = square_pixels(fashion_test_pixels(64), SIZE)
    calibration = square_pixels(fashion_test_pixels(args.calibration_224), SIZE)
    files, teacher = build_models(folder, args.recipe_224, students, phone, calibration)
    pixels = images[0][None]
    latency = cpu_latencies(files, teacher, shipped, pixels, args.runs_224)
    rows = student_rows(files, latency)
    mine = rows[0]
    out: dict[str, Any] = {
        "section_224": {"recipe": args.recipe_224, "teacher": recipe.teacher.backbone, "shipped_student": shipped,
                        "bits": recipe.teacher.bits, "classes": CLASSES, "image_size": SIZE,
                        "weights": "untrained (random init)", "batch": 1, "threads": list(THREADS),
                        "input": "one Fashion-MNIST test image resized to uint8 224x224x3 (bicubic)",
                        "calibration_images": len(calibration), "runs": args.runs_224, "warmup": WARMUP,
                        "students": rows, "latency": latency},
        "phone_vs_fp32_student_latency_224_b1": max(mine[f"phone_vs_fp32_{t}t"] for t in THREADS),
        "phone_vs_fp32_student_latency_224_b1_by_threads": {str(t): mine[f"phone_vs_fp32_{t}t"] for t in THREADS},
        "phone_teacher_latency_ratio_224_b1": max(mine[f"phone_vs_teacher_{t}t"] for t in THREADS),
        "phone_teacher_latency_ratio_224_b1_by_threads": {str(t): mine[f"phone_vs_teacher_{t}t"] for t in THREADS},
        "ort_vs_onnx_latency_224_b1_by_threads": {
            t: stats[f"{shipped} phone .ort"]["median_ms"] / stats[f"{shipped} phone"]["median_ms"]
            for t, stats in latency.items()},
    }
    b64 = ort_vs_onnx_b64(files[shipped]["phone"], images, args.runs_224)
    out.update({"ort_vs_onnx_224_b64": b64, "ort_vs_onnx_latency_b64": b64["ratio"],
                "ort_vs_onnx_latency_b1": max(out["ort_vs_onnx_latency_224_b1_by_threads"].values())})
    out["preprocessing_224"] = preprocessing_share(files[shipped], folder, pixels, args.runs_224)
    out["preprocessing_share_224"] = out["preprocessing_224"]["input_224"]["share"]
    if browser_reason:
        out["skipped_224"] = {"browser": browser_reason}
    else:
        print("224 px: the shipped student's fp32 and phone files in the browser ...", flush=True)
        browser = browser_latency(files[shipped], folder, images, args.runs_224, ort_web)
        out.update({"browser_224": browser, "phone_vs_fp32_student_latency_224_browser": browser["ratio"]})
    out.update({"export_224_rss": rss, "export_224_peak_rss_gb": rss["peak_rss_gb"]})
    out["section_224"]["keys"] = sorted(out)  # so that a later --only-224 merge replaces all of them
    return out
