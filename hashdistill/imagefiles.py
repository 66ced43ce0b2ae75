"""Image files on disk, with numpy and PIL only: the training data and the torch-free edge runtime share
one rule for what counts as an image, how damaged files are skipped and how an image is read.

Rule for damaged files: scanning a folder reads only each file's header (PIL identifies the format and
size without decoding pixels, and a JPEG must end with its end-of-image marker), so an ImageNet-size
folder is listed in seconds, not decoded; files that fail are skipped and counted in one warning, and a
folder with no readable image is a :class:`UserError`. Damage past the header shows up when the image is
decoded: the datasets count it and warn (see ``hashdistill.data.imagefolder``).
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from pathlib import Path

from hashdistill.errors import UserError
from hashdistill.messages import name_some, warn
from hashdistill.untrusted import short

END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}  # end of image; the PNG one is IEND with its CRC
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


REDUCIBLE_MODES = ("L", "RGB")  # photo modes PIL's box reduce handles as it would the full decode
DECODE_PIXELS = 1 << 24  # 16.8 megapixels: larger images are decoded reduced (a 12-megapixel photo is not)


def read_rgb(path: str | os.PathLike, max_pixels: int | None = DECODE_PIXELS):
    """Decode an image file into an RGB PIL image: the one place image files are opened (training, evaluation,
    indexing, the edge runtime), so every user of an image sees the same pixels (:func:`as_rgb`).

    An image of more than ``max_pixels`` is decoded reduced by the smallest integer factor that brings it within:
    a JPEG in the DCT domain first (PIL's ``draft``, 1/2 to 1/8, so a 48-megapixel photo never exists at full
    size), then PIL's box ``reduce``. Below that the full decode is kept: reducing a 12-megapixel photo to twice
    the model's resize changed the codes of 2-60% of large JPEGs (benchmarks/robustness.py), while the host resize
    of :meth:`hashdistill.preprocessing.EvalTransform.reduce` keeps them exact.

    Only regular files are opened (a FIFO or a device would block or never end). Every way a hostile or damaged
    file fails (unidentified, truncated, a decompression bomb whose declared size exceeds PIL's
    ``MAX_IMAGE_PIXELS`` guard, ...) becomes one UserError.
    """
    from PIL import Image

    require_regular_file(path, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns up to twice the limit
            with Image.open(path) as img:
                factor = _reduction(img.size, max_pixels)
                if factor > 1 and img.format == "JPEG":
                    img.draft(img.mode, (math.ceil(img.size[0] / factor), math.ceil(img.size[1] / factor)))
                img.load()  # an animated file's first frame
                factor = _reduction(img.size, max_pixels)
                if factor > 1 and img.mode in REDUCIBLE_MODES:
                    reduced = img.reduce(factor)
                    reduced.info, reduced.format = img.info, img.format  # keep the EXIF orientation
                    return as_rgb(reduced, path)
                return as_rgb(img, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"cannot read image {path}: it declares more pixels than PIL's decompression-bomb limit "
                        f"({Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except _decode_errors() as exc:  # damage can still show up at full decode
        raise UserError(f"cannot read image {path}: {exc}") from None


def _reduction(size: tuple[int, int], max_pixels: int | None) -> int:
    """The smallest integer factor that brings an image of ``size`` within ``max_pixels`` (1: none needed)."""
    if max_pixels is None or size[0] * size[1] <= max_pixels:
        return 1
    return math.ceil(math.sqrt(size[0] * size[1] / max_pixels))


def require_regular_file(path: str | os.PathLike, what: str = "file") -> None:
    """A UserError unless ``path`` is a regular file (after links): a FIFO blocks a reader forever, a device
    file never ends, and neither is an image, a model or an index."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a device or socket"
        raise UserError(f"cannot read {what} {path}: it is {kind}, not a regular file")


EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def as_rgb(img, source: object):
    """THE decoding rule, the one a browser follows too, so that every client sees the same pixels:

    - the EXIF orientation (1-8) is applied, as ``PIL.ImageOps.exif_transpose`` and browsers do (a phone photo
      stands upright); any other orientation value makes the file unreadable, never silently ignored;
    - 16-bit pixels (PNG/TIFF modes I;16*, and I holding 0-65535) are scaled to 8 bits, v * 255 / 65535 rounded;
      32-bit float pixels (mode F) must lie in [0, 1] and are scaled by 255; other ranges are unreadable;
    - transparency (RGBA, LA, PA, a palette's transparent index) is composited over white, as a product photo
      on a transparent background is meant to look (the demo page draws onto white for the same reason);
    - palette, 1-bit, grayscale, CMYK and YCbCr images are converted to RGB by PIL.
    """
    from PIL import ImageOps

    orientation = img.getexif().get(EXIF_ORIENTATION)
    if orientation is not None and orientation not in range(1, 9):
        raise UserError(f"cannot read image {source}: its EXIF orientation {short(orientation)} is not one of 1-8")
    if orientation not in (None, 1):  # (no copy of an upright photo: a 12-megapixel one is 36 MB)
        img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "F":
        img = _to_eight_bits(img, source)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        from PIL import Image

        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_eight_bits(img, source: object):
    """A high-bit-depth grayscale image as 8-bit grayscale (see :func:`as_rgb` for the rule)."""
    import numpy as np
    from PIL import Image

    values = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > 1:
            raise UserError(f"cannot read image {source}: its float pixels are not all in [0, 1]")
        return Image.fromarray(np.rint(values * 255).astype(np.uint8), "L")
    values = values.astype(np.int64)
    if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
        raise UserError(f"cannot read image {source}: its 32-bit integer pixels are not all in 0-65535")
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")


def is_readable_image(path: Path) -> bool:
    """A header PIL can identify, a size within its decompression-bomb guard, and the end marker a truncated
    JPEG or PNG lacks (the two formats photo folders hold); no pixel is decoded."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                trailer = END_MARKERS.get(img.format)
                orientation = _header_orientation(img)
                if min(img.size) < 1 or (orientation is not None and orientation not in range(1, 9)):
                    return False
        if trailer is not None:
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - 64))
                return fh.read().rstrip(b"\x00\r\n\t ").endswith(trailer)
    except (*_decode_errors(), Image.DecompressionBombError, Image.DecompressionBombWarning):
        return False
    return True


def _header_orientation(img) -> object:
    """The EXIF orientation where reading it decodes no pixel: PIL finds a PNG's eXIf chunk only by decoding the
    image when the chunk comes after the pixel data (:func:`as_rgb` checks such a file when it is decoded)."""
    if img.format == "PNG" and "exif" not in img.info:
        return None
    return img.getexif().get(EXIF_ORIENTATION)


def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import UnidentifiedImageError

    return (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def scan_image_files(folder: str | os.PathLike, allow_unlabelled: bool = False, labels_from_folders: bool = True,
                     quiet: bool = False) -> tuple[list[Path], list[int], list[str], int]:
    """Readable image paths, labels, class names and the number skipped (warned about unless ``quiet``: a caller
    that reports its own count of skipped files says it once).

    Class sub-folders (sorted by name) give labels; a folder without sub-folders gives label -1
    when ``allow_unlabelled``, else it is an error. With ``labels_from_folders=False`` every image at any
    depth gets label -1 (a folder of unlabelled images, whatever its layout).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if labels_from_folders else []
    if not classes and labels_from_folders and not allow_unlabelled:
        raise UserError(f"{folder} has no class sub-folders (expected {folder}/<class name>/<images>)")
    groups = [(i, sorted((folder / name).rglob("*"))) for i, name in enumerate(classes)] if classes \
        else [(-1, sorted(folder.rglob("*")))]
    paths, labels, skipped = [], [], []
    for label, candidates in groups:
        for path in candidates:
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not is_readable_image(path):
                skipped.append(path)
                continue
            paths.append(path)
            labels.append(label)
    if not paths:
        raise UserError(f"{folder} holds no readable images ({len(skipped)} unreadable skipped)")
    empty = [name for label, name in enumerate(classes) if label not in set(labels)]
    if empty:
        raise UserError(f"{folder}: the class folder{'s' if len(empty) > 1 else ''} {name_some(empty)} "
                        f"{'hold' if len(empty) > 1 else 'holds'} no readable image; add images or remove "
                        f"{'them' if len(empty) > 1 else 'it'}")
    if skipped and not quiet:
        warn(f"{folder}: skipped {len(skipped)} unreadable image(s): {name_some([p.name for p in skipped])}")
    return paths, labels, classes, len(skipped)
