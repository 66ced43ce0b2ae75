"""THE decoding rule (hashdistill.imagefiles.as_rgb): phone photos stand upright, high-bit-depth and odd modes give
sensible RGB pixels or a counted skip, the same in training, indexing and the edge runtime."""

import numpy as np
import pytest
from PIL import Image

from hashdistill.errors import UserError
from hashdistill.imagefiles import EXIF_ORIENTATION, as_rgb, read_rgb, scan_image_files

RNG = np.random.default_rng(0)
UPRIGHT = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # landscape, and no symmetry


def _with_orientation(image: Image.Image, path, orientation: int, **save) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    image.save(path, exif=exif, **save)


# What each EXIF orientation asks a viewer to do to the stored pixels, and so how to store UPRIGHT for it.
STORED_AS = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
             5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, 1),
             7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, -1)}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_so_a_phone_photo_stands_upright(tmp_path, orientation):
    stored = np.ascontiguousarray(STORED_AS[orientation](UPRIGHT))
    path = tmp_path / f"photo{orientation}.png"
    _with_orientation(Image.fromarray(stored), path, orientation)
    assert np.array_equal(np.asarray(read_rgb(path)), UPRIGHT)


def test_a_jpeg_with_an_orientation_tag_is_turned_like_a_browser_turns_it(tmp_path):
    path = tmp_path / "phone.jpg"
    _with_orientation(Image.fromarray(np.ascontiguousarray(np.rot90(UPRIGHT, 1))), path, 6, quality=100, subsampling=0)
    pixels = np.asarray(read_rgb(path)).astype(int)
    assert pixels.shape == UPRIGHT.shape and np.abs(pixels - UPRIGHT).mean() < 12  # JPEG noise only


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_an_invalid_orientation_is_refused_and_skipped_when_listing_a_folder(tmp_path, capsys, orientation):
    (tmp_path / "a").mkdir()
    Image.fromarray(UPRIGHT).save(tmp_path / "a" / "fine.png")
    _with_orientation(Image.fromarray(UPRIGHT), tmp_path / "a" / "odd.png", orientation)
    with pytest.raises(UserError, match=f"EXIF orientation {orientation} is not one of 1-8"):
        read_rgb(tmp_path / "a" / "odd.png")
    paths, *_ = scan_image_files(tmp_path)
    assert [p.name for p in paths] == ["fine.png"] and "odd.png" in capsys.readouterr().err


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # PIL writes and reads it as mode I;16
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")
    pixels = np.asarray(read_rgb(tmp_path / "deep.png"))
    expected = np.rint(ramp / 257).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)
    assert (pixels == 255).mean() < 0.01  # convert("RGB") alone turned 99.5% of them white


def test_thirty_two_bit_and_float_images_in_range_are_scaled_and_out_of_range_refused(tmp_path):
    ints = (np.arange(100, dtype=np.int32) * 600).reshape(10, 10)
    Image.fromarray(ints, "I").save(tmp_path / "int.tif")
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "int.tif"))[..., 1], np.rint(ints / 257).astype(np.uint8))
    Image.fromarray(ints * 10, "I").save(tmp_path / "wide.tif")
    with pytest.raises(UserError, match="not all in 0-65535"):
        read_rgb(tmp_path / "wide.tif")
    floats = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    Image.fromarray(floats, "F").save(tmp_path / "float.tif")
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "float.tif"))[..., 0], np.rint(floats * 255).astype(np.uint8))
    Image.fromarray(floats * 3, "F").save(tmp_path / "bright.tif")
    with pytest.raises(UserError, match=r"not all in \[0, 1\]"):
        read_rgb(tmp_path / "bright.tif")


def _alpha_ramp(mode: str) -> Image.Image:
    colour = np.zeros((4, 4, 4), dtype=np.uint8)
    colour[..., :3] = (200, 40, 10)
    colour[..., 3] = np.array([0, 85, 170, 255])[:, None]
    return Image.fromarray(colour, "RGBA").convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparency_is_composited_over_white(tmp_path, mode):
    image = _alpha_ramp(mode)
    if mode == "PA":  # no file format stores it; decoders hand it over
        pixels = np.asarray(as_rgb(image, "cutout")).astype(int)
    else:
        image.save(tmp_path / "cutout.png")
        pixels = np.asarray(read_rgb(tmp_path / "cutout.png")).astype(int)
    opaque = np.asarray(image.convert("RGBA").convert("RGB")).astype(int)[3]
    assert (pixels[0] == 255).all()  # fully transparent: the white behind it
    assert np.abs(pixels[3] - opaque).max() <= 1  # fully opaque: the colour itself
    assert (pixels[1] > pixels[2]).all() or mode != "RGBA"  # in between: a blend, lighter where more transparent


def test_palette_transparency_animation_and_other_modes(tmp_path):
    frames = [Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).convert("P") for value in (30, 220)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert abs(int(np.asarray(read_rgb(tmp_path / "anim.gif")).mean()) - 30) <= 2  # the first frame
    webp = [Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)) for value in (60, 200)]
    webp[0].save(tmp_path / "anim.webp", save_all=True, append_images=webp[1:], duration=50, lossless=True)
    assert abs(int(np.asarray(read_rgb(tmp_path / "anim.webp")).mean()) - 60) <= 2
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "transparent.png", transparency=0)
    assert np.asarray(read_rgb(tmp_path / "transparent.png")).tolist() == [[[255] * 3, [0, 0, 255]],
                                                                          [[0, 0, 255], [255] * 3]]
    Image.fromarray(UPRIGHT).convert("1").save(tmp_path / "bits.png")
    assert set(np.unique(np.asarray(read_rgb(tmp_path / "bits.png")))) <= {0, 255}
    cmyk = Image.fromarray(UPRIGHT).convert("CMYK")
    cmyk.save(tmp_path / "print.jpg", quality=100, subsampling=0)
    assert np.abs(np.asarray(read_rgb(tmp_path / "print.jpg")).astype(int) - UPRIGHT).mean() < 20
    Image.fromarray(UPRIGHT).convert("YCbCr").save(tmp_path / "ycbcr.jpg", quality=100, subsampling=0)
    assert np.abs(np.asarray(read_rgb(tmp_path / "ycbcr.jpg")).astype(int) - UPRIGHT).mean() < 20


def test_every_user_of_an_image_sees_the_same_upright_pixels(tmp_path, student_onnx):
    """Training (image folders), the edge runtime and index building all go through the one opener."""
    from hashdistill.data import build_dataset
    from hashdistill.export.runtime import EdgeModel
    from hashdistill.recipe import DataConfig

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            upright = RNG.integers(0, 256, (40, 30, 3), dtype=np.uint8)
            _with_orientation(Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))),
                              tmp_path / cls / f"{i}.png", 6)
            Image.fromarray(upright).save(tmp_path / cls / f"{i}-upright.png")
    data = build_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.1,
                                    crop_pct=1.0), "test")
    edge = EdgeModel(student_onnx)
    for i, path in enumerate(data.paths):
        twin = path.with_name(path.stem.removesuffix("-upright") + "-upright.png")
        upright = data.transform.reduce(np.asarray(Image.open(twin).convert("RGB")))  # shrunk as the graph would
        assert np.array_equal(data.pixels(i), upright)
        assert np.array_equal(edge.encode([path]), edge.encode([twin]))
