"""`hashdistill run` on image folders written from real data: Fashion-MNIST PNGs (with damaged files among
them) through the tiny models, and the imagenet100 recipe itself (ResNet50 teacher) on a tiny JPEG folder."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY
from PIL import Image

from hashdistill.data import FASHION_MNIST_DIRS

PER_CLASS = 40


def hashdistill(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hashdistill", *args], capture_output=True, text=True,
                          timeout=timeout)


def _fashion_mnist(count_per_class: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    found = [Path(d).expanduser() for d in FASHION_MNIST_DIRS]
    folder = next((d for d in found if (d / "t10k-images-idx3-ubyte.gz").is_file()), None)
    if folder is None:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    keep = np.concatenate([np.flatnonzero(labels == c)[:count_per_class] for c in range(classes)])
    return images[keep], labels[keep]


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory):
    """A few hundred Fashion-MNIST images as PNG files in <class>/ folders, one zero-byte file and one text
    file named .jpg among them."""
    root = tmp_path_factory.mktemp("fashion-folder")
    images, labels = _fashion_mnist(PER_CLASS, 6)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class{label}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    (root / "class0" / "empty.png").write_bytes(b"")
    (root / "class1" / "notes.jpg").write_text("this is not a JPEG")
    return root


def test_run_on_a_png_folder_skips_and_counts_damaged_files(fashion_folder, tmp_path):
    recipe = {**TINY, "data": {"dataset": "imagefolder", "root": str(fashion_folder), "image_size": 16,
                               "batch_size": 32, "augment": True, "num_workers": 0}}
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = hashdistill("run", str(path), "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "skipped 2 unreadable image(s)" in done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    total = 6 * PER_CLASS
    assert summary["index"]["size"] == total  # the index stage indexes the folder's every readable image
    assert summary["export"]["identical_code_rate"] == 1.0 and summary["export"]["input_format"] == "uint8-nhwc"
    report = (tmp_path / "run" / "report.md").read_text()
    for piece in ("| teacher |", "| student |", "| ternary student (ONNX) |", "## Reproduce"):
        assert piece in report
    models = summary["models"]
    assert models["ternary student (ONNX)"]["map_tie_aware"] == pytest.approx(
        models["ternary student"]["map_tie_aware"], abs=1e-3)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """ImageNet-layout train/ and test/ folders of 3 classes, photographs of different sizes as JPEG."""
    root = tmp_path_factory.mktemp("imagenet-tiny")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 3)):
        for c in range(3):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(60, 120, 2)
                y, x = np.mgrid[0:h, 0:w]
                pixels = 60 * c + 40 * np.sin(x[..., None] / (3 + c) + y[..., None] / 7) + rng.normal(0, 20, (h, w, 3))
                Image.fromarray(np.clip(pixels + 60, 0, 255).astype(np.uint8)).save(folder / f"{i}.JPEG", quality=85)
    return root


def test_the_imagenet100_recipe_runs_end_to_end_on_a_tiny_jpeg_folder(jpeg_folder, tmp_path):
    overrides = [f"data.root={jpeg_folder}", "data.image_size=64", "data.batch_size=8", "data.num_workers=0",
                 "data.val_fraction=0.2", "device=cpu", "teacher.pretrained=false", "student.pretrained=false",
                 "teacher.phase1.epochs=1", "teacher.phase1.warmup_epochs=0", "teacher.phase2.epochs=1",
                 "student.train.epochs=1", "quantize.train.epochs=1", "eval.top_k=10"]
    args = [arg for item in overrides for arg in ("--set", item)]
    done = hashdistill("run", "imagenet100", "--out", str(tmp_path / "run"), *args)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["models"]["teacher"]["arch"] == "resnet50" and summary["models"]["teacher"]["bits"] == 64
    assert summary["export"]["identical_code_rate"] == 1.0
    assert (tmp_path / "run" / "report.md").is_file()
