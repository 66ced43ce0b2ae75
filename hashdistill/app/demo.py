"""``hashdistill demo``: a static visual-search site that runs the phone model in the browser.

The site holds the phone model (the run's image-in ONNX file), the index's packed codes in one binary file
(``codes.bin``, N rows of ceil(bits/8) bytes), what the page needs to show a result (``index.json``: ids, labels,
class names, the class codebook), small thumbnails of the database images in sprite sheets, and one page
(``index.html`` + ``app.js``). The page decodes a dropped or picked image the way hashdistill does (EXIF
orientation applied, transparency over white: ``hashdistill.imagefiles.as_rgb``), runs the model in
onnxruntime-web (WebAssembly), and shows the code, the nearest class code (MHD, ties to the lowest class), whether
it is out of distribution (no class code matches exactly) and the top-k database thumbnails by Hamming distance,
ties by database order, with how many database images share the best distance and which of them are shown; the
model time it shows is the steady state (the median of 5 runs after a warm-up, not the first run's set-up): all
on the device. The site is world-readable (files 0644, folders 0755), so any web server can serve it.

onnxruntime-web comes from a pinned CDN URL with its integrity hash (the version is pinned in package.json too),
or with ``--ort-web DIR`` from a local copy (npm's ``node_modules/onnxruntime-web/dist``) copied into the site, for
use offline.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from base64 import b64encode
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from hashdistill.errors import UserError

ORT_WEB_VERSION = "1.31.1"  # package.json pins the same version
ORT_WEB_CDN = f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_WEB_VERSION}/dist/"
ORT_WEB_SCRIPT = "ort.wasm.min.js"
ORT_WEB_INTEGRITY = "sha384-tNxIwEqSlcdvKtUte98AsccPbDKM958LBXB/+3BLS42TTihXHKTWgdqPqXI/lot8"  # of ORT_WEB_SCRIPT
ORT_WEB_FILES = (ORT_WEB_SCRIPT, "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
THUMB_PX, PER_SHEET = 48, 256  # thumbnails of 48 px, 16 x 16 to a sprite sheet
SITE_FILES = ("index.html", "app.js", "model.onnx", "codes.bin", "index.json")
MARKER = ".hashdistill-demo"
DATASET_PATH = re.compile(r"^(?P<spec>[\w-]+:\w+)#(?P<row>\d+)$")  # how an index names a built-in dataset's image


def build_demo(model: str | Path, index_path: str | Path, out: str | Path, ort_web: str | Path | None = None,
               force: bool = False) -> dict[str, Any]:
    """Write the site for ``model`` (an image-in .onnx file) searching the index at ``index_path`` into ``out``;
    returns what it wrote. The folder is built beside ``out`` and renamed into place when complete."""
    from hashdistill.export.runtime import EdgeModel
    from hashdistill.search.index import load_index

    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not (out / MARKER).is_file():
        raise UserError(f"{out} exists and is not a demo site hashdistill wrote; it is left untouched (even with "
                        "--force): choose another -o")
    edge = EdgeModel(model)
    if not edge.takes_images:
        raise UserError(f"{model} takes pre-processed floats; the demo needs an image-in model (export without "
                        "--float-input)")
    index = load_index(index_path)
    if index.bits != edge.bits:
        raise UserError(f"{model} makes {edge.bits}-bit codes, the index holds {index.bits}-bit codes")
    script = _ort_web_source(ort_web)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".demo", dir=out.parent))
    try:
        shutil.copyfile(model, staging / "model.onnx")
        (staging / "codes.bin").write_bytes(np.ascontiguousarray(index.codes).tobytes())
        sheets = _thumbnails(index.paths, edge.meta.input_size, staging / "thumbs")
        record = {"bits": index.bits, "width": int(index.codes.shape[1]), "count": len(index),
                  "ids": index.ids.tolist(), "labels": index.labels.tolist(), "label_names": index.label_names,
                  "class_names": edge.meta.class_names, "input_size": edge.meta.input_size,
                  "class_codes": [row.tobytes().hex() for row in edge.class_codes],
                  "thumbnails": {"size": THUMB_PX, "per_row": int(math.isqrt(PER_SHEET)), "per_sheet": PER_SHEET,
                                 "sheets": sheets},
                  "model": edge.describe(), "index": str(index_path)}
        (staging / "index.json").write_text(json.dumps(record))
        page = resources.files("hashdistill.app").joinpath("demo_page")
        (staging / "app.js").write_text(page.joinpath("app.js").read_text())
        html = page.joinpath("index.html").read_text()
        (staging / "index.html").write_text(html.replace("<!--ORT-WEB-->", script["tag"]).replace(
            "__ORT_WASM_PATHS__", script["wasm_paths"]))
        if ort_web is not None:
            (staging / "ort").mkdir()
            for name in ORT_WEB_FILES:
                shutil.copyfile(Path(ort_web) / name, staging / "ort" / name)
        (staging / MARKER).touch()
        _world_readable(staging)
        if out.exists():
            shutil.rmtree(out)  # a site this command wrote (MARKER), replaced with --force
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"site": str(out), "items": len(index), "bits": index.bits, "sheets": len(sheets),
            "ort_web": "local copy" if ort_web is not None else ORT_WEB_CDN}


def _world_readable(site: Path) -> None:
    """Folders 0755, files 0644: a web server running as another user serves the site (mkdtemp makes 0700)."""
    site.chmod(0o755)
    for path in site.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _ort_web_source(ort_web: str | Path | None) -> dict[str, str]:
    """The script tag that loads onnxruntime-web and where it finds its WebAssembly: the pinned CDN URL with its
    integrity hash, or a local copy (checked to be the pinned version's script)."""
    if ort_web is None:
        return {"tag": f'<script src="{ORT_WEB_CDN}{ORT_WEB_SCRIPT}" integrity="{ORT_WEB_INTEGRITY}" '
                       'crossorigin="anonymous"></script>', "wasm_paths": ORT_WEB_CDN}
    folder = Path(ort_web)
    missing = [name for name in ORT_WEB_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"--ort-web {folder}: no {missing[0]} there (give onnxruntime-web's dist folder, e.g. "
                        "node_modules/onnxruntime-web/dist after npm ci)")
    if integrity(folder / ORT_WEB_SCRIPT) != ORT_WEB_INTEGRITY:
        raise UserError(f"--ort-web {folder}: its {ORT_WEB_SCRIPT} is not onnxruntime-web {ORT_WEB_VERSION}'s "
                        "(the version package.json pins)")
    return {"tag": f'<script src="ort/{ORT_WEB_SCRIPT}"></script>', "wasm_paths": "ort/"}


def integrity(path: Path) -> str:
    """A subresource-integrity hash (sha384) of a file."""
    return "sha384-" + b64encode(hashlib.sha384(path.read_bytes()).digest()).decode()


def _thumbnails(paths: np.ndarray, input_size: int, folder: Path) -> list[str]:
    """Square thumbnails of the database images, in the index's order, PER_SHEET to a PNG sprite sheet."""
    from PIL import Image

    folder.mkdir()
    side = int(math.isqrt(PER_SHEET))
    sheets = []
    pixels = _database_pixels([str(p) for p in paths], input_size)
    for first in range(0, len(paths), PER_SHEET):
        sheet = Image.new("RGB", (side * THUMB_PX, side * THUMB_PX), "white")
        for slot, image in enumerate(pixels(first, min(first + PER_SHEET, len(paths)))):
            thumb = Image.fromarray(image).copy()
            thumb.thumbnail((THUMB_PX, THUMB_PX))
            x, y = (slot % side) * THUMB_PX, (slot // side) * THUMB_PX
            sheet.paste(thumb, (x + (THUMB_PX - thumb.width) // 2, y + (THUMB_PX - thumb.height) // 2))
        name = f"sheet-{len(sheets):04d}.png"
        sheet.save(folder / name, optimize=True)
        sheets.append(f"thumbs/{name}")
    return sheets


def _database_pixels(paths: list[str], input_size: int):
    """A function (start, stop) -> the decoded RGB images of those rows: image files through the one opener, or a
    built-in dataset's images (at the model's input size, as the index encoded them) where the index names them
    ``dataset:split#row``."""
    from hashdistill.imagefiles import read_rgb

    specs = {m.group("spec") for m in map(DATASET_PATH.match, paths) if m}
    if not specs:
        return lambda start, stop: (np.asarray(read_rgb(p)) for p in paths[start:stop])
    if len(specs) > 1 or not all(DATASET_PATH.match(p) for p in paths):
        raise UserError("the index mixes image files and dataset images; the demo shows one or the other")
    from hashdistill.search.sources import dataset_images

    spec = specs.pop()
    images = dataset_images(spec, _SizeOnly(spec, input_size)).items
    rows = [int(DATASET_PATH.match(p).group("row")) for p in paths]
    outside = next((row for row in rows if row >= len(images)), None)
    if outside is not None:
        raise UserError(f"the index names image {outside:,} of {spec}, which holds {len(images):,}: an index of "
                        "another data section, or a damaged one")

    def decoded(start: int, stop: int):
        for row in rows[start:stop]:
            image = images[row]
            yield np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image

    return decoded


class _SizeOnly:
    """Enough of an encoder for ``dataset_images`` to build a split at the model's input size."""

    def __init__(self, spec: str, input_size: int):
        self.input_size = input_size
        self.training_data = {"dataset": spec.partition(":")[0]}


def write_page_screenshot(site: Path, query: Path, png: Path, timeout_s: float = 120.0) -> dict[str, Any]:
    """Open the site in headless Chromium (Debian's /usr/bin/chromium through playwright), search ``query`` in it and
    save a screenshot of the page; returns what the page showed. Served from 127.0.0.1 only.

    The served folder holds only two links, to the site and to the query under a fixed name: whatever the query's
    name, the page searches that file (not a same-named one beside the site), and the URL reaches the page as an
    argument, never as JavaScript source."""
    from hashdistill.imagefiles import IMAGE_SUFFIXES

    from .browser import serve_folder, with_page

    suffix = Path(query).suffix.lower()
    name = f"query{suffix if suffix in IMAGE_SUFFIXES else ''}"
    with tempfile.TemporaryDirectory(prefix="hashdistill-demo-") as served:
        (Path(served) / "site").symlink_to(Path(site).resolve(), target_is_directory=True)
        (Path(served) / name).symlink_to(Path(query).resolve())
        with serve_folder(Path(served)) as base:
            with with_page(f"{base}/site/index.html", timeout_s) as page:
                shown = page.evaluate("(url) => window.hashdistill.searchUrl(url)", f"{base}/{name}")
                page.screenshot(path=str(png), full_page=True)
    return shown
