"""A phone export at photo size stays within memory: static int8 calibration streams its images, so the peak does
not grow with the calibration count (before, 256 images' activations were held at once: a 224-px
mobilenetv3_large_100 export was killed at 14 GB)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import torch
from PIL import Image

from hashdistill.checkpoint import save_checkpoint
from hashdistill.distill.models import STUDENT, HashStudent, model_meta
from hashdistill.export.verify import CALIBRATION_IMAGES
from hashdistill.quantize.ternary_checkpoint import save_ternary
from hashdistill.quantize.ttq import TTQConfig, ternarize_
from hashdistill.recipe import DataConfig

ARCH = "mobilenetv2_050"  # a real mobile student, small enough for a test, at the recipes' 224 px
CAP_GB = 2.5  # measured 1.7 GB (2 cores, CPU torch); 256 images of activations held at once need several GB more
CLASSES = 3


def _photo_folder(root, per_class: int) -> None:
    """train/ and test/ folders of JPEG photos larger than the model's input (each is resized in the graph)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 2)):
        for c in range(CLASSES):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                y, x = np.mgrid[0:260, 0:300]
                wave = 60 * c + 50 * np.sin(x[..., None] / (4 + c + i % 5) + y[..., None] / 9)
                pixels = np.clip(wave + 80 + rng.normal(0, 25, (260, 300, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=85)


def test_a_224_px_phone_export_stays_under_a_memory_cap(tmp_path):
    per_class = -(-CALIBRATION_IMAGES // CLASSES)  # every default calibration image is there to be read
    _photo_folder(tmp_path / "photos", per_class)
    data = DataConfig(dataset="imagefolder", root=str(tmp_path / "photos"), image_size=224)
    info = {"class_names": [f"class_{c}" for c in range(CLASSES)], "input_size": 224, "crop_pct": 0.875,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    torch.manual_seed(0)
    student = HashStudent(ARCH, 16, CLASSES).eval()
    with torch.no_grad():  # random weights give logits near 0, which int8 flips and the export then refuses: a
        student.hash_head.weight.mul_(0.01)  # head whose biases decide the codes passes its check (this test is
        student.hash_head.bias.copy_(torch.arange(16) % 2 * 2.0 - 1)  # about memory, not codes)
    meta = model_meta(STUDENT, ARCH, 16, info, data=dataclasses.asdict(data), recipe_hash="test")
    save_checkpoint(tmp_path / "student.safetensors", student.state_dict(), meta)
    ternarize_(student, TTQConfig(scope="pointwise"))
    save_ternary(tmp_path / "ternary.safetensors", student, {**meta, "kind": "ternary-student"})
    export = [sys.executable, "-m", "hashdistill", "export", str(tmp_path / "ternary.safetensors"),
              "-o", str(tmp_path / "phone.onnx"), "--int8", "static", "--mobile"]
    # A parent of its own, whose only child is the export: getrusage(RUSAGE_CHILDREN) is then that export's peak.
    probe = textwrap.dedent(f"""
        import json, resource, subprocess, sys
        done = subprocess.run({export!r}, capture_output=True, text=True)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
        print(json.dumps({{"rc": done.returncode, "peak_gb": peak, "err": done.stderr[-2000:]}}))
    """)
    result = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                       timeout=900, check=True).stdout)
    assert result["rc"] == 0, result["err"]
    assert result["peak_gb"] < CAP_GB, result
    assert (tmp_path / "phone.onnx").is_file() and (tmp_path / "phone.ort").is_file()
