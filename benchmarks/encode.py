"""Encoding an image set into codes: in one process, and with Ray Data on 1 and 2 workers of this machine.

    python benchmarks/encode.py --out benchmarks/results/encode.json

The images are Fashion-MNIST test images written as PNG files at --size px (decoding is part of the cost, as
with a real catalogue); the model is an image-in ONNX export of an lcnet_075 student at 32 px (random weights:
speed does not depend on training). The local Ray cluster is started once, before the timings; each encoding
then starts its actors (one CPU and one onnxruntime thread each) and writes its Parquet shards, all inside the
timed call. The codes of every path are compared: Ray against the in-process path.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine, print_table, write_json
from PIL import Image


def images(folder: Path, count: int, size: int) -> Path:
    """``count`` Fashion-MNIST test images as ``size``-px PNG files in class folders."""
    from hashdistill.data import build_dataset
    from hashdistill.recipe import DataConfig

    test = build_dataset(DataConfig(dataset="fashion-mnist", image_size=size), "test")
    for i in range(count):
        label = int(test.labels[i % len(test)])
        (folder / test.class_names[label].replace("/", "-")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.pixels(i % len(test))).save(folder / test.class_names[label].replace("/", "-") /
                                                          f"{i:05d}.png")
    return folder


def model(folder: Path) -> Path:
    import torch

    from hashdistill.checkpoint import save_checkpoint
    from hashdistill.data import dataset_info
    from hashdistill.distill.models import STUDENT, HashStudent, model_meta
    from hashdistill.export.onnx_export import export_onnx
    from hashdistill.recipe import DataConfig

    cfg = DataConfig(dataset="fashion-mnist", image_size=32)
    info = dataset_info(cfg)
    torch.manual_seed(0)
    student = HashStudent("lcnet_075", 16, len(info["class_names"])).eval()
    meta = model_meta(STUDENT, "lcnet_075", 16, info, data=dataclasses.asdict(cfg), recipe_hash="benchmark")
    save_checkpoint(folder / "student.safetensors", student.state_dict(), meta)
    return export_onnx(student, meta, folder / "student.onnx", opset=18)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/encode.json")
    parser.add_argument("--images", type=int, default=30000, help="enough that actor start-up is not the cost")
    parser.add_argument("--size", type=int, default=96, help="side of the PNG files")
    args = parser.parse_args()
    import ray

    from hashdistill.search.encode import encode_images, read_codes

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        onnx_path, root = model(folder), images(folder / "images", args.images, args.size)
        runs = {}
        timed = time.perf_counter()
        encode_images(onnx_path, root, folder / "here")
        runs["in-process"] = time.perf_counter() - timed
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for workers in (1, 2):
                timed = time.perf_counter()
                encode_images(onnx_path, root, folder / f"ray{workers}", ray="local", workers=workers)
                runs[f"ray, {workers} worker{'s' if workers > 1 else ''}"] = time.perf_counter() - timed
        finally:
            ray.shutdown()
        here, ray2 = read_codes(folder / "here"), read_codes(folder / "ray2")
        by_path = {p: c.tobytes() for p, c in zip(here.paths, here.codes)}
        agreement = float(np.mean([by_path.get(p) == c.tobytes() for p, c in zip(ray2.paths, ray2.codes)]))
        complete = sorted(here.paths.tolist()) == sorted(ray2.paths.tolist())
    rows = [{"engine": name, "seconds": s, "images_per_s": args.images / s} for name, s in runs.items()]
    print_table(rows, ["engine", "seconds", "images_per_s"])
    rate = {r["engine"]: r["images_per_s"] for r in rows}
    write_json(args.out, {
        "benchmark": "encode", "machine": machine(), "args": vars(args), "rows": rows,
        "ray_vs_inprocess_code_agreement": agreement if complete else 0.0, "same_paths": complete,
        "ray_2_workers_vs_1_speedup": rate["ray, 2 workers"] / rate["ray, 1 worker"],
        "wall_seconds": time.time() - started})


if __name__ == "__main__":
    main()
