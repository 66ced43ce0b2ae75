"""Deployment checks of the export benchmark (benchmarks/export.py): the phone model's ORT-format file against its
int8 .onnx, onnxruntime-web in headless Chromium against Python onnxruntime, the image-in graph against timm's eval
transform, and a 224-px latency table of the imagenet100 recipe's architectures.

Each check measures what a user of one deployment target depends on: an app that ships the .ort file, a web page
that runs the .onnx in WebAssembly, a timm user who feeds the PyTorch model through timm's own eval transform.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from timing import interleaved_stats, timing_session

from hashdistill import codes
from hashdistill.checkpoint import save_checkpoint
from hashdistill.data import build_dataset
from hashdistill.distill.models import STUDENT, TEACHER, HashStudent, LLCTeacher, model_meta
from hashdistill.export.loading import load_any_model
from hashdistill.export.mobile import mobile_outputs
from hashdistill.export.runtime import EdgeModel
from hashdistill.export.verify import database_pixels, same_code_rate
from hashdistill.imagefiles import read_rgb
from hashdistill.preprocessing import EvalTransform
from hashdistill.quantize.ternary_checkpoint import save_ternary
from hashdistill.quantize.ttq import TTQConfig, ternarize_
from hashdistill.recipe import DataConfig

ROOT = Path(__file__).resolve().parents[1]
ORT_WEB = ROOT / "node_modules" / "onnxruntime-web" / "dist"  # npm ci's copy: the page fetches nothing from a CDN
BROWSER_SHAPES = [(28, 28), (17, 13), (40, 30), (23, 57), (100, 64), (64, 64), (31, 90), (120, 97), (9, 15),
                  (224, 160)]  # (height, width): tiny to larger than the input, both aspects
TIMM_SHORT_SIDES = (5, 9, 20, 33, 47)  # tiny (upsampled a lot) to larger than a 32-px input (downsampled)
TIMM_SPARES = (0, 1, 2, 3, 4, 5, 6, 7, 10, 13, 27)  # spare pixels after the resize: every residue mod 4, odd and even
INDEX_FILES = 8  # a demo site needs an index; its size does not matter to the model's codes or latency
BATCHES = (1, 64)


def cpu_session(path: Path) -> ort.InferenceSession:
    """An onnxruntime CPU session for timing, onnxruntime's default threads (timing.timing_session)."""
    return timing_session(path)


def interleaved_ms(sessions: dict[str, ort.InferenceSession], pixels: np.ndarray, runs: int,
                   warmup: int = 2) -> dict[str, float]:
    """Median ms per run of each session on the same pixels, the sessions taking turns (timing.py's protocol)."""
    stats = interleaved_stats(sessions, {"images": pixels}, max(1, runs), warmup)
    return {name: figures["median_ms"] for name, figures in stats.items()}


def batch_of(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """The first ``size`` images (repeated if too few) as one uint8 [size, H, W, 3] batch."""
    return np.stack([images[i % len(images)] for i in range(size)])


def onnx_and_ort_ms(onnx_path: Path, pixels: Sequence[np.ndarray], runs: dict[int, int],
                    warmup: int = 2) -> dict[int, dict[str, float]]:
    """Median ms of a .onnx file and its .ort at each batch size of ``runs`` (batch -> timed runs), the two files
    taking turns run by run."""
    sessions = {"onnx": cpu_session(onnx_path), "ort": cpu_session(mobile_outputs(onnx_path)[0])}
    return {batch: interleaved_ms(sessions, batch_of(pixels, batch), count, warmup) for batch, count in runs.items()}


def ort_vs_onnx_latency(onnx_path: Path, images: Sequence[np.ndarray], runs: int) -> dict[str, Any]:
    """Median ms of the phone model's .ort file and its int8 .onnx at b=1 and b=64, taking turns; the ratio says
    whether an app that ships the .ort (what onnxruntime's mobile builds load) gives up speed."""
    figures: dict[str, Any] = {"runs": runs, "onnx_bytes": onnx_path.stat().st_size,
                               "ort_bytes": mobile_outputs(onnx_path)[0].stat().st_size}
    for batch, ms in onnx_and_ort_ms(onnx_path, images, dict.fromkeys(BATCHES, runs)).items():
        figures.update({f"onnx_ms_b{batch}": ms["onnx"], f"ort_ms_b{batch}": ms["ort"],
                        f"ratio_b{batch}": ms["ort"] / ms["onnx"]})
    return figures


def ort_code_agreement(onnx_path: Path, meta: dict[str, Any], test_images: Sequence[np.ndarray],
                       total: int) -> dict[str, Any]:
    """The fraction of images on which the phone model's .ort gives its int8 .onnx's packed codes: the test images,
    then images spread over the training split (the database a deployed model indexes) up to ``total``."""
    database = database_pixels(meta, total - len(test_images))
    rate = same_code_rate(onnx_path, mobile_outputs(onnx_path)[0], [*test_images, *database])
    return {"images": len(test_images) + len(database), "test_images": len(test_images),
            "database_images": len(database), "agreement": rate}


def fashion_test_pixels(count: int) -> list[np.ndarray]:
    """The first ``count`` Fashion-MNIST test images at their own 28 px: the source of every image file written."""
    raw = build_dataset(DataConfig(dataset="fashion-mnist", image_size=28), "test")
    return [raw.pixels(i) for i in range(min(count, len(raw)))]


def write_image_files(folder: Path, pixels: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]],
                      count: int) -> list[Path]:
    """``count`` image files in ``folder``: image i resized (bicubic) to shape i mod len(shapes), JPEG and PNG in
    turn, so every shape is seen in both formats when the number of shapes is odd, and decoders are exercised."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        height, width = shapes[i % len(shapes)]
        image = Image.fromarray(pixels[i % len(pixels)]).resize((width, height), Image.BICUBIC)
        path = folder / f"{i:04d}{'.png' if i % 2 else '.jpg'}"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def spare_shapes(transform: EvalTransform) -> list[tuple[int, int]]:
    """(height, width) shapes whose resized longer side exceeds the crop by each of TIMM_SPARES pixels, for each
    shorter side of TIMM_SHORT_SIDES where one exists, landscape and portrait: the crop offsets (spare // 2, one
    more at 3 mod 4) are where a re-implementation of timm's centre crop goes wrong."""
    shapes = []
    for short in TIMM_SHORT_SIDES:
        for spare in TIMM_SPARES:
            long = next((w for w in range(short, 16 * short + 64)
                         if transform.resized_shape(short, w)[1] - transform.input_size == spare), None)
            if long is not None:
                shapes += [(short, long)] if long == short else [(short, long), (long, short)]
    return list(dict.fromkeys(shapes))


def timm_eval(transform: EvalTransform):
    """timm's eval transform for the model's pre-processing parameters, built as tests/test_timm_parity.py does."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": (3, transform.input_size, transform.input_size),
                                  "crop_pct": transform.crop_pct, "interpolation": "bilinear",
                                  "mean": tuple(transform.mean), "std": tuple(transform.std)})
    return create_transform(**config, is_training=False)


def timm_eval_agreement(folder: Path, checkpoint: Path, onnx_path: Path, count: int) -> dict[str, Any]:
    """Codes of the exported image-in graph vs the same PyTorch model fed by timm's eval transform, on odd-size
    image files: a timm user's own evaluation should index what the deployed file indexes."""
    model, _ = load_any_model(checkpoint)
    edge = EdgeModel(onnx_path)
    transform = edge.meta.transform
    shapes = spare_shapes(transform)[:count]  # the shapes the files really have
    paths = write_image_files(folder / "timm-files", fashion_test_pixels(count), shapes, count)
    theirs = timm_eval(transform)
    with torch.no_grad():
        logits = model(torch.stack([theirs(read_rgb(p)) for p in paths])).float().numpy()
    same = (codes.pack_codes(logits) == edge.encode([str(p) for p in paths])).all(axis=1)
    spares = [max(transform.resized_shape(h, w)) - transform.input_size for h, w in shapes]
    return {"files": len(paths), "formats": ["png", "jpeg"], "shapes": shapes, "spare_pixels": spares,
            "spare_mod_4": sorted({s % 4 for s in spares}), "model": f"{edge.meta.props.get('arch', '')} fp32 "
            "student's image-in ONNX file (opset 18) vs the PyTorch model behind timm.data.create_transform("
            "**resolve_data_config(...), is_training=False)", "agreement": float(same.mean()),
            "disagreeing_shapes": sorted({shapes[i % len(shapes)] for i in np.flatnonzero(~same)})}


def browser_unavailable(ort_web: Path) -> str | None:
    """Why the browser checks cannot run here (as tests/test_demo.py asks), or None."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    from hashdistill.app.browser import chromium
    from hashdistill.errors import UserError

    try:
        chromium()
    except UserError as exc:
        return str(exc)
    return None if ort_web.is_dir() else f"no onnxruntime-web at {ort_web} (npm ci in the repository root)"


def demo_site(model: Path, index_files: Sequence[Path], site: Path, ort_web: Path) -> Path:
    """A demo site (hashdistill demo's own builder) for ``model``, over a small index of ``index_files``."""
    from hashdistill.app.demo import build_demo
    from hashdistill.search.index import build_index

    index = site.with_suffix(".npz")
    build_index(model, [str(p) for p in index_files], index, force=True)
    build_demo(model, index, site, ort_web=ort_web, force=True)
    return site


def browser_code_agreement(phone: Path, folder: Path, count: int, ort_web: Path) -> dict[str, Any]:
    """onnxruntime-web (WebAssembly) in headless Chromium vs Python onnxruntime: the fraction of image files whose
    codes are bit-identical, each file decoded by the browser itself (as a user's drop is) and by hashdistill."""
    from hashdistill.app.browser import serve_folder, with_page

    paths = write_image_files(folder / "browser-files", fashion_test_pixels(count), BROWSER_SHAPES, count)
    site = demo_site(phone, paths[:INDEX_FILES], folder / "site-browser", ort_web)
    expected = EdgeModel(phone).encode([str(p) for p in paths])
    with serve_folder(folder) as base, with_page(f"{base}/{site.name}/index.html") as page:
        urls = [f"{base}/{p.parent.name}/{p.name}" for p in paths]
        found = page.evaluate("async (urls) => { const out = []; for (const u of urls) "
                              "out.push(await window.hashdistill.codeOfUrl(u)); return out; }", urls)
    same = np.array([bytes.fromhex(c) == row.tobytes() for c, row in zip(found, expected)])
    return {"files": len(paths), "shapes": BROWSER_SHAPES, "formats": ["png", "jpeg"],
            "model": "the phone model's int8 .onnx", "runtime": "onnxruntime-web (wasm, 1 thread) in headless "
            "Chromium", "agreement": float(same.mean())}


def browser_model_ms(phone: Path, folder: Path, images: Sequence[np.ndarray], runs: int, ort_web: Path) -> float:
    """Median ms of one model run (batch 1, one ``images[0]``-sized image) in onnxruntime-web in headless
    Chromium, timed by the page itself (``window.hashdistill.modelMs``): what a visitor of the demo waits for."""
    from hashdistill.app.browser import serve_folder, with_page

    files = folder / "browser-224"
    files.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(INDEX_FILES, len(images))):
        Image.fromarray(images[i]).save(files / f"{i:02d}.png")
        paths.append(files / f"{i:02d}.png")
    site = demo_site(phone, paths, folder / "site-224", ort_web)
    with serve_folder(folder) as base, with_page(f"{base}/{site.name}/index.html") as page:
        return float(page.evaluate("([url, runs]) => window.hashdistill.modelMs(url, runs)",
                                   [f"{base}/{files.name}/{paths[0].name}", runs]))


def square_pixels(images: Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    """``images`` resized (bicubic) to uint8 ``size`` x ``size`` x 3: inputs of exactly the model's size, so the
    latency is the network's, with the in-graph resize a no-op."""
    return [np.asarray(Image.fromarray(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in images]


def save_untrained(folder: Path, archs: tuple[str, str], bits: int, info: dict, extra: dict,
                   configs: dict[str, TTQConfig]) -> None:
    """Random-init teacher and student (``archs``) and the student ternarized per ``configs`` (stem -> config),
    saved as checkpoints in ``folder``: file sizes and latency do not depend on the weights' values."""
    classes = len(info["class_names"])
    teacher = LLCTeacher(archs[0], bits, classes).eval()
    student = HashStudent(archs[1], bits, classes).eval()
    student.codes.copy_(teacher.class_codes)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "teacher.safetensors", teacher.state_dict(),
                    model_meta(TEACHER, archs[0], bits, info, **extra))
    student_meta = model_meta(STUDENT, archs[1], bits, info, **extra)
    save_checkpoint(folder / "student.safetensors", student.state_dict(), student_meta)
    for stem, config in configs.items():
        ternary = copy.deepcopy(student)
        ternarize_(ternary, config)
        save_ternary(folder / f"{stem}.safetensors", ternary, {**student_meta, "kind": "ternary-student"})
