"""Image files on disk, with numpy and PIL only: the training data and the torch-free edge runtime share
one rule for what counts as an image, how damaged files are skipped and how an image is read.

Rule for damaged files: scanning a folder reads only each file's header (PIL identifies the format and
size without decoding pixels, and a JPEG must end with its end-of-image marker), so an ImageNet-size
folder is listed in seconds, not decoded; files that fail are skipped and counted in one warning, and a
folder with no readable image is a :class:`UserError`. Damage past the header shows up when the image is
decoded: the datasets count it and warn (see ``hashdistill.data.imagefolder``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from hashdistill.errors import UserError

END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}  # end of image; the PNG one is IEND with its CRC
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_rgb(path: str | os.PathLike):
    """Decode an image file into an RGB PIL image: the one place image files are opened.

    Every way a hostile or damaged file fails (unidentified, truncated, a decompression bomb whose
    declared size exceeds PIL's ``MAX_IMAGE_PIXELS`` guard, ...) becomes one UserError.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns up to twice the limit
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"cannot read image {path}: it declares more pixels than PIL's decompression-bomb limit "
                        f"({Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except _decode_errors() as exc:  # damage can still show up at full decode
        raise UserError(f"cannot read image {path}: {exc}") from None


def is_readable_image(path: Path) -> bool:
    """A header PIL can identify, a size within its decompression-bomb guard, and the end marker a truncated
    JPEG or PNG lacks (the two formats photo folders hold); no pixel is decoded."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                trailer = END_MARKERS.get(img.format)
                if min(img.size) < 1:
                    return False
        if trailer is not None:
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - 64))
                return fh.read().rstrip(b"\x00\r\n\t ").endswith(trailer)
    except (*_decode_errors(), Image.DecompressionBombError, Image.DecompressionBombWarning):
        return False
    return True


def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import UnidentifiedImageError

    return (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def scan_image_files(folder: str | os.PathLike, allow_unlabelled: bool = False, labels_from_folders: bool = True
                     ) -> tuple[list[Path], list[int], list[str], int]:
    """Readable image paths, labels, class names and the number skipped.

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
    paths, labels, skipped = [], [], 0
    for label, candidates in groups:
        for path in candidates:
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not is_readable_image(path):
                skipped += 1
                continue
            paths.append(path)
            labels.append(label)
    if not paths:
        raise UserError(f"{folder} holds no readable images ({skipped} unreadable skipped)")
    if skipped:
        warnings.warn(f"{folder}: skipped {skipped} unreadable image(s)", stacklevel=2)
    return paths, labels, classes, skipped
