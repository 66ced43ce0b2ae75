"""Photos bigger than the model needs: decoded reduced, shrunk on the host by the graph's own resize step, batched
by a pixel budget; the codes stay those of the full-size input where the host step is exact."""

import os
import threading

import numpy as np
import pytest
from PIL import Image

from hashdistill.errors import UserError
from hashdistill.export.images import decode, decode_batches
from hashdistill.export.runtime import EdgeModel
from hashdistill.imagefiles import EXIF_ORIENTATION, read_rgb
from hashdistill.preprocessing import EvalTransform, rgb_pixels
from hashdistill.preprocessing_graph import INPUT, preprocess_session

RNG = np.random.default_rng(7)
PHOTO_TRANSFORM = EvalTransform(32, 0.875, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # resize_size 36


def _textured(height: int, width: int, period: float = 7.0) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    waves = 90 * np.sin(x[..., None] / period + y[..., None] / (1.6 * period) + np.arange(3))
    return np.clip(128 + waves + RNG.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def _full_size_codes(edge: EdgeModel, path) -> np.ndarray:
    """The in-graph path: the file decoded at full size, the whole batch of one through the graph."""
    return edge.run_pixels(rgb_pixels(read_rgb(path))[None])[0]


def test_images_the_graph_does_not_shrink_pass_unchanged(tmp_path, student_onnx):
    edge = EdgeModel(student_onnx)
    transform = edge.meta.transform
    side = transform.resize_size
    for i, (h, w) in enumerate([(side, side), (side - 3, side + 9), (5, 7), (side, 4 * side)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(_textured(h, w)).save(path)
        assert np.array_equal(decode(path, transform), np.asarray(Image.open(path).convert("RGB")))
        assert np.array_equal(edge.encode([path]), _full_size_codes(edge, path))


def test_a_photo_the_graph_shrinks_gives_the_full_size_pixels_bit_for_bit(tmp_path):
    """Between the resize size and the reduced decode's threshold only the host resize runs: exact."""
    session = preprocess_session(PHOTO_TRANSFORM)
    for i, (h, w) in enumerate([(37, 37), (50, 71), (143, 100), (90, 140)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(_textured(h, w)).save(path)
        host = decode(path, PHOTO_TRANSFORM)
        assert min(host.shape[:2]) == PHOTO_TRANSFORM.resize_size
        full = np.asarray(Image.open(path).convert("RGB"))[None]
        assert np.array_equal(session.run(None, {INPUT: host[None]})[0], session.run(None, {INPUT: full})[0])


def test_a_big_jpeg_is_decoded_reduced_upright_and_close_to_the_full_decode(tmp_path):
    upright = _textured(1600, 1200, period=40)  # portrait, stored rotated with EXIF orientation 6 as a phone does
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))
    exif = stored.getexif()
    exif[EXIF_ORIENTATION] = 6
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif.tobytes())
    reduced = np.asarray(read_rgb(tmp_path / "phone.jpg", max_pixels=150 * 200))  # an eighth of each side
    assert reduced.shape == (200, 150, 3)  # still portrait: the orientation survived the DCT-domain reduction
    final = (50, 66)  # what a resize to a 50-pixel shorter side makes of both
    full = np.asarray(read_rgb(tmp_path / "phone.jpg", max_pixels=None).resize(final, Image.BILINEAR), dtype=int)
    assert np.abs(np.asarray(Image.fromarray(reduced).resize(final, Image.BILINEAR), dtype=int) - full).mean() < 1.5


def test_other_formats_are_box_reduced_and_small_ones_untouched(tmp_path):
    Image.fromarray(_textured(600, 800)).save(tmp_path / "big.png")
    reduced = np.asarray(read_rgb(tmp_path / "big.png", max_pixels=100 * 134))
    assert reduced.shape == (100, 134, 3)  # by 6 (the smallest factor within the budget), rounded up
    Image.fromarray(_textured(150, 180)).save(tmp_path / "small.png")
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "small.png", max_pixels=150 * 180)),
                          np.asarray(read_rgb(tmp_path / "small.png", max_pixels=None)))


def test_batches_hold_at_most_the_pixel_budget_and_keep_the_order():
    images = [np.full((40, 40, 3), i, np.uint8) for i in range(7)] + [np.full((30, 50, 3), 9, np.uint8)]
    transform = EvalTransform(40, 1.0, (0.5,) * 3, (0.5,) * 3)
    batches = list(decode_batches(images, transform, batch_size=5, max_pixels=3 * 40 * 40))
    assert [(run.start, run.stop) for run, _ in batches] == [(0, 3), (3, 6), (6, 7), (7, 8)]
    assert [int(pixels[0, 0, 0, 0]) for _, pixels in batches] == [0, 3, 6, 9]
    (_, alone), = list(decode_batches([np.zeros((50, 60, 3), np.uint8)], transform, 4, max_pixels=10))
    assert alone.shape == (1, 40, 48, 3)  # over the budget on its own: a batch of one, already shrunk


def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    reader = threading.Thread(target=lambda: result.append(pytest.raises(UserError, read_rgb, fifo).value))
    reader.start()
    reader.join(timeout=5)
    if reader.is_alive():  # unblock the reader so the test process can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert "FIFO" in str(result[0])
    with pytest.raises(UserError, match="device"):
        read_rgb("/dev/zero")


def test_a_fifo_given_as_a_model_or_an_index_is_refused(tmp_path):
    from hashdistill.search.index import load_index
    from hashdistill.search.sources import open_encoder

    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    for opener in (open_encoder, load_index):
        with pytest.raises(UserError, match="it is a FIFO, not a regular file"):
            opener(fifo)
