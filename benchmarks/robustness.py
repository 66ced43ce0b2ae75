"""Phone photos in bounded memory: peak RSS of the commands a user runs over 4000x3000 photos, and how often the
host-reduced decoding (JPEG's DCT scaling, box reduce, the graph's resize on the host) gives the codes of the
full-size, in-graph path. Builds its inputs itself.

    python benchmarks/robustness.py --out benchmarks/results/robustness.json

The photos are made from scikit-learn's two bundled photographs (china.jpg, flower.jpg): random crops, flips
and colour shifts, upscaled to 4000x3000 with sensor-like noise and saved as quality-90 JPEGs, in two classes.
Peak memory is the largest sum of PSS over the command's whole process tree (data loader workers included; a page
shared by k processes counts 1/k in each), sampled every 20 ms from /proc, beside the largest single process's RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import git_commit, machine, write_json
from PIL import Image

from hashdistill.imagefiles import DECODE_PIXELS

PHOTO = (4000, 3000)  # width, height of a 12-megapixel phone photo
CLASSES = ("china", "flower")
BIG_QUERY = 9000  # side of the one huge PNG query


def sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def make_photo(source: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random crop of ``source`` (flipped, colour-shifted) upscaled to ``size`` with noise: detail at every
    scale, as a phone's sensor gives, so the reduced decode has something to get wrong."""
    h, w = source.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = source[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.clip(crop * rng.uniform(0.8, 1.2, 3), 0, 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(crop).resize(size, Image.BICUBIC), dtype=np.float32)
    big += rng.normal(0, 6, (size[1], size[0], 1)).astype(np.float32)
    return Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))


def write_photos(root: Path, per_class: dict[str, int], size: tuple[int, int] = PHOTO, seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.jpg`` for each split and count (skipped if already written)."""
    if (root / ".complete").is_file():
        return root
    rng = np.random.default_rng(seed)
    sources = sample_photos()
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_photo(sources[label], size, rng).save(folder / f"{i:03d}.jpg", quality=90)
    (root / ".complete").touch()
    return root


def write_big_query(path: Path) -> Path:
    """A 9000x9000 PNG of a few flat shapes: tens of kilobytes on disk, 243 MB of RGB pixels."""
    if not path.is_file():
        pixels = np.full((BIG_QUERY, BIG_QUERY, 3), 200, np.uint8)
        pixels[1000:5000, 2000:7000] = (30, 90, 160)
        pixels[6000:8500, 500:4000] = (180, 40, 40)
        Image.fromarray(pixels).save(path, optimize=True)
    return path


def write_large_set(root: Path, count: int, seed: int = 1, longest: tuple[int, int] = (1200, 4000)) -> list[Path]:
    """``count`` JPEGs of random photo sizes (long side in ``longest``, either orientation) for the agreement
    check."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = sample_photos()
    paths = []
    for i in range(count):
        path = root / f"{i:04d}.jpg"
        if not path.is_file():
            long = int(rng.integers(longest[0], longest[1] + 1))
            short = int(long * rng.uniform(0.55, 0.8))
            size = (long, short) if rng.random() < 0.7 else (short, long)
            make_photo(sources[i % 2], size, rng).save(path, quality=int(rng.integers(80, 96)))
        paths.append(path)
    return paths


def tree_memory(root_pid: int) -> tuple[int, int]:
    """Bytes held by ``root_pid`` and all its descendants: the sum of their PSS (resident pages, a page shared by
    k processes counted 1/k in each: forked loader workers share the parent's pages) and the largest one RSS."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents.setdefault(int(stat[stat.rfind(")") + 2:].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    pss, largest, stack = 0, 0, [root_pid]
    while stack:
        pid = stack.pop()
        stack += parents.get(pid, [])
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        except (OSError, ValueError):
            continue
        pss += int(fields["Pss"].split()[0]) * 1024
        largest = max(largest, int(fields["Rss"].split()[0]) * 1024)
    return pss, largest


def peak_rss(command: list[str], cwd: Path) -> dict[str, Any]:
    """Run ``command``; its process tree's peak memory in GB (summed PSS; the largest process's RSS), its wall
    time and exit status."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0, 0]

    def sample() -> None:
        while process.poll() is None:
            pss, largest = tree_memory(process.pid)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], largest)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output = process.communicate()[0]
    sampler.join()
    if process.returncode != 0:
        print(output[-3000:])
    return {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command)),
            "peak_rss_gb": peak[0] / 1e9, "largest_process_rss_gb": peak[1] / 1e9,
            "seconds": time.perf_counter() - started, "exit": process.returncode}


def agreement(model: Path, paths: list[Path], max_pixels: int | None = None) -> dict[str, Any]:
    """Codes of the shipped path (``EdgeModel.encode`` of the files: reduced decode above DECODE_PIXELS, the
    graph's resize on the host) or, with ``max_pixels``, of a decode reduced to that many pixels, against the
    full-size in-graph path (each file decoded at full size, ``session.run`` on it): the fraction of images whose
    whole code is equal."""
    from hashdistill.export.runtime import EdgeModel
    from hashdistill.imagefiles import read_rgb
    from hashdistill.preprocessing import rgb_pixels

    edge = EdgeModel(model)

    def shipped(path: Path) -> np.ndarray:
        if max_pixels is None:
            return edge.encode([path])
        return edge.run_pixels(edge.meta.transform.reduce(rgb_pixels(read_rgb(path, max_pixels=max_pixels)))[None])[0]

    reduced = np.concatenate([shipped(p) for p in paths])
    full = np.concatenate([edge.run_pixels(rgb_pixels(read_rgb(p, max_pixels=None))[None])[0] for p in paths])
    same = (reduced == full).all(axis=1)
    bits = np.unpackbits(reduced ^ full, axis=1).sum(axis=1)
    return {"model": str(model), "images": len(paths), "input_size": edge.input_size, "bits": edge.bits,
            "max_pixels": max_pixels, "code_agreement": float(same.mean()),
            "mean_differing_bits": float(bits.mean()), "max_differing_bits": int(bits.max())}


def untrained_224(folder: Path, photos: Path) -> Path:
    """A random-init mobilenetv3_large_100 student at 224 px exported image-in (the imagenet100 recipe's)."""
    onnx_path = folder / "student-224.onnx"
    if onnx_path.is_file():
        return onnx_path
    from export_checks import save_untrained

    from hashdistill.data import dataset_info
    from hashdistill.export.verify import export_checkpoint
    from hashdistill.recipe import DataConfig

    cfg = DataConfig(dataset="imagefolder", root=str(photos), image_size=224)
    save_untrained(folder, ("resnet50", "mobilenetv3_large_100"), 64, dataset_info(cfg),
                   {"data": dataclasses.asdict(cfg), "recipe_hash": "untrained"}, {})
    export_checkpoint(folder / "student.safetensors", onnx_path, force=True)
    return onnx_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench_out/robustness", help="folder for the photos, run and outputs")
    parser.add_argument("--photos", type=int, default=64, help="training photos (half a class each)")
    parser.add_argument("--test-photos", type=int, default=20)
    parser.add_argument("--agreement-images", type=int, default=400, help="JPEGs of 1200-4000 px for agreement")
    parser.add_argument("--huge-images", type=int, default=40, help="JPEGs of 6000-8000 px (decoded reduced)")
    parser.add_argument("--probe-images", type=int, default=120)
    parser.add_argument("--out", default="benchmarks/results/robustness.json")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    work = (root / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    photos = write_photos(work / "photos", {"train": args.photos // 2, "test": args.test_photos // 2})
    query = write_big_query(work / "big-query.png")
    cli = [sys.executable, "-m", "hashdistill"]
    run_dir = work / "run"
    settings = ["--set", "data.dataset=imagefolder", "--set", f"data.root={photos}", "--set", "data.image_size=64",
                "--set", "data.batch_size=16", "--set", "teacher.phase1.epochs=1", "--set", "teacher.phase2.epochs=1",
                "--set", "student.train.epochs=1", "--set", "quantize.train.epochs=1"]
    figures: dict[str, Any] = {"run": peak_rss([*cli, "run", "quickstart", *settings, "--out", str(run_dir),
                                                 "--force"], root)}
    model = run_dir / "model.onnx"
    figures["index_build"] = peak_rss([*cli, "index", "build", str(model), str(photos / "train"), "-o",
                                       str(work / "index.npz"), "--force"], root)
    figures["encode"] = peak_rss([*cli, "encode", str(model), str(photos / "train"), "-o", str(work / "codes"),
                                  "--force"], root)
    figures["eval"] = peak_rss([*cli, "eval", str(model)], root)
    figures["big_query"] = peak_rss([*cli, "index", "search", str(work / "index.npz"), str(query), "-k", "3"], root)
    large = write_large_set(work / "large", args.agreement_images)
    huge = write_large_set(work / "huge", args.huge_images, seed=2, longest=(6000, 8000))  # over DECODE_PIXELS
    sys.path.insert(0, str(Path(__file__).parent))
    models = {"trained_run_student": model, "untrained_224": untrained_224(work / "untrained-224", photos)}
    checks = {name: agreement(path, large) for name, path in models.items()}
    huge_checks = {name: agreement(path, huge) for name, path in models.items()}
    # The rejected alternative: every large JPEG decoded reduced to about twice the 224-px model's resize.
    probe = {name: agreement(path, large[:args.probe_images], max_pixels=(2 * 256) ** 2 * 4 // 3)
             for name, path in models.items()}
    for name, result in figures.items():
        print(f"{name}: {result['peak_rss_gb']:.2f} GB peak RSS, {result['seconds']:.0f} s, exit {result['exit']}")
    for name, result in checks.items():
        print(f"{name}: code agreement {result['code_agreement']:.4f} over {result['images']} large JPEGs")
    write_json(root / args.out, {
        "benchmark": "robustness", "machine": machine(), "commit": git_commit(),
        "wall_seconds": time.time() - started, "photo_size": list(PHOTO), "photos": args.photos,
        "test_photos": args.test_photos, "big_query_side": BIG_QUERY,
        "photos_index_build_peak_rss_gb": figures["index_build"]["peak_rss_gb"],
        "photos_encode_peak_rss_gb": figures["encode"]["peak_rss_gb"],
        "photos_eval_peak_rss_gb": figures["eval"]["peak_rss_gb"],
        "photos_run_peak_rss_gb": figures["run"]["peak_rss_gb"],
        "big_query_peak_rss_gb": figures["big_query"]["peak_rss_gb"],
        "large_image_code_agreement": min(c["code_agreement"] for c in checks.values()),
        "huge_image_code_agreement": min(c["code_agreement"] for c in huge_checks.values()),
        "decode_pixels": DECODE_PIXELS, "commands": figures, "agreement": checks, "huge_agreement": huge_checks,
        "reduced_decode_probe": probe})


if __name__ == "__main__":
    main()
