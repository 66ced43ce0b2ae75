"""The in-graph pre-processing is timm's eval transform: the same resize sizes and centre-crop offsets for every
input size (odd and even spare pixels, 3 mod 4 included, landscape, portrait, tiny), and timm's uint8 pixels but
for one grey level on a few pixels (fixed-point coefficients that round the other way)."""

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
    # one pixel of misalignment on noise costs tens of grey levels; float pixels (no uint8 rounding after the resize)
    # are off by a quarter of a level on average; PIL's rounding reproduced leaves one level on a few pixels
    assert levels.max() < 1.01 and levels.mean() < 0.05, (shape, float(levels.mean()), float(levels.max()))


def test_a_batch_is_pre_processed_as_its_images_one_by_one_and_a_mild_upscale_stays_near_timm():
    from hashdistill.preprocessing_graph import INPUT, preprocess_session

    transform = EvalTransform(224, 0.875, MEAN, STD)  # 224 -> 256: the upscale a phone app's 224-px input gets
    pixels = np.random.default_rng(1).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    batch = preprocess_session(transform).run(None, {INPUT: pixels})[0]
    for image, row in zip(pixels, batch):
        assert np.array_equal(preprocess_session(transform).run(None, {INPUT: image[None]})[0][0], row)
        levels = np.abs(row - timm_eval(224, 0.875)(Image.fromarray(image)).numpy()) * np.array(STD)[:, None, None]
        assert (levels * 255).max() < 2.01 and (levels * 255).mean() < 0.05
