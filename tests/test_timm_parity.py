"""The in-graph pre-processing is timm's eval transform: the same resize sizes and centre-crop offsets for every
input size (odd and even spare pixels, 3 mod 4 included, landscape, portrait, tiny), pixels within the stated
float-vs-uint8 rounding of timm's, and the same codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hashdistill.preprocessing import EvalTransform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (height, width): spare pixels after the resize of 0, 1, 2 and 3 mod 4 on each side, both orientations, tiny ones
SIZES = [(32, 32), (33, 32), (34, 45), (35, 36), (37, 39), (48, 91), (91, 48), (40, 43), (5, 7), (9, 3), (50, 51),
         (64, 67), (71, 40)]


def timm_eval(size: int, crop_pct: float):
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": (3, size, size), "crop_pct": crop_pct, "interpolation": "bilinear",
                                  "mean": MEAN, "std": STD})
    return create_transform(**config, is_training=False)


@pytest.mark.parametrize("crop_pct", [1.0, 0.875, 0.9])
@pytest.mark.parametrize("shape", SIZES)
def test_sizes_and_crop_offsets_are_timms(shape, crop_pct):
    size = 24
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = EvalTransform(size, crop_pct, MEAN, STD).apply(torch.from_numpy(pixels)[None])[0]
    theirs = timm_eval(size, crop_pct)(Image.fromarray(pixels))
    assert ours.shape == theirs.shape == (3, size, size)
    levels = (ours - theirs).abs() * torch.tensor(STD).view(3, 1, 1) * 255  # in grey levels
    # one pixel of misalignment on noise costs tens of grey levels; the uint8 rounding of timm's resize, half a level
    assert levels.mean() < 0.6 and levels.max() < 2.5, (shape, float(levels.mean()), float(levels.max()))


def test_the_onnx_graph_crops_where_torch_does(tmp_path):
    import onnxruntime as ort

    from hashdistill.export.preprocess_graph import preprocess_graph

    transform = EvalTransform(24, 0.875, MEAN, STD)
    session = ort.InferenceSession(preprocess_graph(transform).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for shape in SIZES:
        pixels = np.random.default_rng(1).integers(0, 256, (1, *shape, 3), dtype=np.uint8)
        graph = session.run(None, {"images": pixels})[0]
        torch_side = transform.apply(torch.from_numpy(pixels)).numpy()
        assert np.abs(graph - torch_side).max() < 1e-4, shape
