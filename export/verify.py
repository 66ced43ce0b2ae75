"""Check an exported file against the PyTorch model it came from, and the one-call checkpoint export.

Parity is measured on real images: random inputs exercise a network far from where it is used,
and codes flip only for logits near zero, which real data decides. The images are decoded uint8 pixels;
PyTorch sees them through :meth:`EvalTransform.apply` (training-time evaluation), the file through its own
input (the pre-processing in its graph, or the runtime's copy of it for a float-input file).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from hashdistill import codes
from hashdistill.errors import UserError
from hashdistill.rundir import STAGING_SUFFIX  # names the folders a half-done export leaves, so only they are removed

from .images import decode_batches
from .loading import load_any_model
from .metadata import IMAGE_IN
from .onnx_export import export_onnx
from .runtime import EdgeModel

MIN_IDENTICAL_CODE_RATE = 0.999
MIN_INT8_CODE_RATE = 0.8  # int8 moves logits near 0 across the sign (a trained lcnet_075: 11% of codes differ in
# at least one of 16 bits with static int8, 9% with dynamic, mAP within noise); more than this is a broken file
CALIBRATION_IMAGES = 256
DEFAULT_VERIFY_IMAGES = 512
MOBILE_CHECK_IMAGES = 2000  # the .ort against the .onnx: test images, then database images up to this many


def verify_export(onnx_path: str | os.PathLike, model: nn.Module, images: Sequence[np.ndarray],
                  batch_size: int = 64) -> dict[str, Any]:
    """onnx.checker, then onnxruntime (CPU) vs PyTorch on ``images`` (uint8 RGB [H, W, 3] arrays).

    Returns the figures of :func:`measure_parity`; raises a UserError when fewer than 99.9% of the
    images get identical codes.
    """
    path = Path(onnx_path)
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, OSError) as exc:
        raise UserError(f"{path} fails the ONNX checker: {exc}") from None
    figures = measure_parity(path, model, images, batch_size)
    rate = figures["identical_code_rate"]
    if rate < MIN_IDENTICAL_CODE_RATE:
        raise UserError(f"{path}: onnxruntime and PyTorch codes agree on only {rate:.2%} of {len(images)} images "
                        f"(need {MIN_IDENTICAL_CODE_RATE:.1%}; max |logit diff| {figures['max_abs_logit_diff']:.3g})")
    return figures


def measure_parity(onnx_path: str | os.PathLike, model: nn.Module, images: Sequence[np.ndarray],
                   batch_size: int = 64) -> dict[str, Any]:
    """identical_code_rate and max_abs_logit_diff of onnxruntime vs PyTorch, file_bytes, the image count and
    the ternary layer count and encoding read back from the file. Never raises on a mismatch."""
    if len(images) == 0:
        raise UserError("verification needs at least one image")
    path = Path(onnx_path)
    edge = EdgeModel(path)
    model.eval()
    device = next(model.parameters()).device
    same, max_diff = 0, 0.0
    transform = edge.meta.transform
    with torch.no_grad():
        for _, pixels in decode_batches(images, transform, batch_size):
            onnx_codes, onnx_logits = edge.run_pixels(pixels)
            torch_logits = model(transform.apply(torch.from_numpy(pixels)).to(device)).float().cpu().numpy()
            same += int((onnx_codes == codes.pack_codes(torch_logits)).all(axis=1).sum())
            max_diff = max(max_diff, float(np.abs(onnx_logits - torch_logits).max()))
    metadata = edge.metadata
    return {"images": len(images), "identical_code_rate": same / len(images), "max_abs_logit_diff": max_diff,
            "file_bytes": path.stat().st_size, "ternary_layers": len(metadata["ternary_layers"]),
            "ternary_encoding": metadata["ternary_encoding"]}


def export_checkpoint(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, opset: int = 18,
                      images: Sequence[np.ndarray] | None = None, force: bool = False,
                      ternary_encoding: str | None = None, int8: str | None = None, mobile: bool = False,
                      input_format: str = IMAGE_IN, calibration_images: int = CALIBRATION_IMAGES) -> dict[str, Any]:
    """Load a checkpoint, export it and verify the files; they appear (together) only if verification passes.

    ``images``: uint8 RGB [H, W, 3] arrays; default: up to 512 images of the checkpoint's test split.
    ``input_format``: image in (uint8 pixels, pre-processing in the graph; the default) or ``float32-nchw``.
    ``int8``: ``"static"`` or ``"dynamic"``: store the float layers' weights as int8 (:func:`~.mobile.quantize_int8`;
    the ternary layers stay packed; static calibrates on images of the checkpoint's training split) and report how
    many images keep the float file's codes; ``calibration_images``: how many training images static int8 calibrates
    on (streamed: memory does not grow with it). ``mobile``: also write the ORT-format
    model, its required-operators config and the mobile usability report beside the file, and check that the
    ``.ort`` file gives the same codes. Returns the figures to print (sizes, parity, timings).
    """
    from .mobile import (
        INT8_MODES,
        ORT_SUFFIX,
        STATIC,
        float_initializer_bytes,
        mobile_outputs,
        quantize_int8,
    )

    out_path = Path(out_path)
    if out_path.suffix.lower() == ORT_SUFFIX:
        raise UserError(f"{out_path}: name the .onnx file; --mobile writes the .ort file beside it")
    if int8 not in (None, *INT8_MODES):
        raise UserError(f"int8 quantization is {' or '.join(INT8_MODES)}, not {int8!r}")
    if isinstance(calibration_images, bool) or not isinstance(calibration_images, int) or calibration_images < 1:
        raise UserError(f"--calibration-images must be a whole number >= 1, got {calibration_images!r}")
    outputs = [out_path, *(mobile_outputs(out_path) if mobile else [])]
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists; pass --force to overwrite it")
    model, meta = load_any_model(checkpoint_path)
    if images is None:
        images = reference_pixels(meta)
    calibration = reference_pixels(meta, calibration_images, split="train") if int8 == STATIC else None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_path.parent.glob(f".{glob.escape(out_path.name)}.*{STAGING_SUFFIX}"):  # a killed export's
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=STAGING_SUFFIX) as tmp:
        staged = Path(tmp) / out_path.name
        start = time.perf_counter()
        export_onnx(model, meta, staged, opset=opset, ternary_encoding=ternary_encoding, input_format=input_format)
        seconds = time.perf_counter() - start
        figures = verify_export(staged, model, images)
        if int8:
            quantized = quantize_int8(staged, Path(tmp) / f"int8-{out_path.name}", calibration)
            rate = same_code_rate(staged, quantized, images)
            if rate < MIN_INT8_CODE_RATE:
                raise UserError(f"{out_path}: with int8 weights only {rate:.1%} of {len(images)} images keep the "
                                f"float file's codes (need {MIN_INT8_CODE_RATE:.0%}); export without --int8")
            figures["int8"] = {"mode": int8, "float_file_bytes": figures["file_bytes"],
                               "file_bytes": quantized.stat().st_size,
                               "float_initializer_bytes": float_initializer_bytes(quantized),
                               "identical_code_rate_vs_float_onnx": rate}
            figures["file_bytes"] = figures["int8"]["file_bytes"]
            os.replace(quantized, staged)
        if mobile:
            checked = [*images, *database_pixels(meta, MOBILE_CHECK_IMAGES - len(images))]
            figures["mobile"], written = _mobile_files(staged, checked)
        os.replace(staged, out_path)
        if mobile:  # all files verified: they appear together
            for (key, made), final in zip(written.items(), mobile_outputs(out_path)):
                os.replace(made, final)
                figures["mobile"][key] = str(final)
    return {"checkpoint": str(checkpoint_path), "onnx": str(out_path), "kind": meta.get("kind"),
            "arch": meta.get("arch"), "bits": int(model.bits), "opset": opset, "input_format": input_format,
            "export_seconds": seconds, **figures}


def _mobile_files(staged: Path, checked: Sequence[np.ndarray]) -> tuple[dict[str, Any], dict[str, Path]]:
    """The .ort beside ``staged`` and its figures; a .ort off the .onnx file's codes is a UserError."""
    from .mobile import to_mobile

    written = to_mobile(staged)
    rate = same_code_rate(staged, written["ort"], checked)
    if rate < MIN_IDENTICAL_CODE_RATE:
        raise UserError(f"{staged.name}: the .ort file gives the .onnx file's codes on only {rate:.2%} of "
                        f"{len(checked)} images")
    return {"ort_file_bytes": written["ort"].stat().st_size, "identical_code_rate_vs_onnx": rate,
            "checked_images": len(checked)}, written


def same_code_rate(reference: str | os.PathLike, candidate: str | os.PathLike, images: Sequence[np.ndarray],
                   batch_size: int = 64) -> float:
    """Fraction of ``images`` (uint8 RGB arrays) whose packed codes are the same from two model files (.onnx or
    .ort, image-in or float-input)."""
    first, second = EdgeModel(reference), EdgeModel(candidate)
    same = 0
    for _, pixels in decode_batches(images, first.meta.transform, batch_size):
        same += int((first.run_pixels(pixels)[0] == second.run_pixels(pixels)[0]).all(axis=1).sum())
    return same / len(images)


def database_pixels(meta: dict[str, Any], count: int) -> list[np.ndarray]:
    """Up to ``count`` images spread over the checkpoint's training split (the database a deployed model indexes),
    none where it records no dataset."""
    if count <= 0 or not isinstance(meta.get("data"), dict):
        return []
    return reference_pixels(meta, count, split="train")


def reference_pixels(meta: dict[str, Any], limit: int = DEFAULT_VERIFY_IMAGES, split: str = "test") -> list[np.ndarray]:
    """Up to ``limit`` decoded images (uint8 RGB [H, W, 3]) of a split the checkpoint's recipe describes: the first
    ones of the test split; evenly spread over the training split (calibration should see every class)."""
    from hashdistill.data import build_dataset
    from hashdistill.recipe import data_config_from_dict

    if not isinstance(meta.get("data"), dict):
        raise UserError("the checkpoint does not record its dataset; pass verification images explicitly "
                        "(and use dynamic int8, which needs no calibration images)")
    cfg = data_config_from_dict(meta["data"])
    dataset = build_dataset(cfg, split)
    count = min(limit, len(dataset))
    step = len(dataset) // count if split == "train" and count else 1
    return [dataset.pixels(i * step) for i in range(count)]
