"""Encode an image set into codes with ids and paths, as Parquet shards: in this process, or as Ray Data actors.

The unit of work is :class:`ImageEncoder`, a callable class in the form Ray Data's ``map_batches`` takes: the
model is opened once in ``__init__`` (an ONNX file in onnxruntime, torch-free; or a checkpoint), and
``__call__`` turns a batch of ``{id, path, label}`` rows into the same rows with their packed codes. The
in-process path calls it batch by batch under a progress bar; ``--ray`` hands it to ``map_batches`` as actors
on a local cluster (``ray.init()``) or a real one (``ray.init(address=...)``): the same code, so the codes are
the same bit for bit. A file that cannot be decoded is skipped and counted, never fatal.

The output folder holds ``codes-*.parquet`` (columns ``id`` int64, ``path`` string, ``label`` int64, ``code``
binary of ceil(bits/8) bytes) and ``manifest.json`` (bits, the model's record, class names, counts, the first
skipped files). It is written in a temporary folder beside the target and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hashdistill import codes as hc
from hashdistill.errors import UserError
from hashdistill.messages import name_some, warn
from hashdistill.untrusted import parse_json, short

from .bounds import check_declared, check_memory
from .image_encoder import BATCH, ImageEncoder
from .sources import collect_images, open_encoder

MANIFEST, FORMAT, FORMAT_VERSION = "manifest.json", "hashdistill-codes", 1
SHARD_ROWS = 100_000  # rows per Parquet file of the in-process path
SKIPPED_LISTED = 20  # skipped files named in the manifest
COLUMNS = ("id", "path", "label", "code")
ROW_BYTES = 8 + 8 + 4  # a row once read, beside its code: id, label and at least one 4-byte character of path
MAX_PATH_CHARS = 4096
MAX_ID = int(np.iinfo(np.int64).max)


@dataclass
class EncodeResult:
    """What an encoding run wrote: the output folder and its manifest's counts."""

    folder: Path
    manifest: dict[str, Any] = field(default_factory=dict)


def encode_images(model: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, ray: str | None = None,
                  workers: int | None = None, first_id: int = 0, force: bool = False,
                  verbose: bool = False) -> EncodeResult:
    """Encode ``images`` (an image folder, or a text file listing one path or URI per line) with ``model`` into
    Parquet shards in the folder ``out``. ``ray``: None for this process, ``"local"`` for ``RAY_ADDRESS`` or a
    local Ray cluster, or a cluster's address; ``workers``: encoder actors (default: the cluster's CPUs);
    ``verbose``: Ray's own log lines too. Files skipped (unreadable at the scan, or failing to decode) are counted
    once, in the manifest and in one warning."""
    out = Path(out)
    _check_output(out, force)
    encoder = open_encoder(model)
    image_set = collect_images(_listed(images), encoder, quiet=True)
    rows = {"id": id_range(first_id, len(image_set.paths)),
            "path": np.array(image_set.paths, dtype=object), "label": np.asarray(image_set.labels, dtype=np.int64)}
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".encoding", dir=out.parent))
    try:
        if ray is None:
            shards, skipped = _encode_here(str(model), rows, staging)
            engine = {"engine": "in-process"}
        else:
            from .ray_encode import encode_with_ray

            shards, skipped, engine = encode_with_ray(str(model), rows, staging, ray, workers, verbose)
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "bits": encoder.bits,
                    "model": {**encoder.describe(), "bits": encoder.bits}, "label_names": image_set.label_names,
                    "images": len(image_set.paths) + image_set.unreadable,
                    "encoded": len(image_set.paths) - len(skipped), "skipped": image_set.unreadable + len(skipped),
                    "unreadable_at_scan": image_set.unreadable, "skipped_paths": skipped[:SKIPPED_LISTED],
                    "shards": shards,
                    "first_id": first_id, "seconds": time.perf_counter() - started, **engine}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)  # only a folder _check_output recognised as an earlier encoding, with --force
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if manifest["skipped"]:
        named = f": {name_some(skipped)}" if skipped else ""
        warn(f"{images}: skipped {manifest['skipped']} image(s): {image_set.unreadable} unreadable at the scan, "
             f"{len(skipped)} that could not be decoded{named}")
    return EncodeResult(out, manifest)


def id_range(first: int, count: int) -> np.ndarray:
    """The int64 ids ``first`` .. ``first + count - 1``: a first id that is not a non-negative integer, or a range
    past int64's largest value (where the ids would wrap to negative ones), is a UserError."""
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise UserError(f"the first id must be a non-negative integer, got {short(first)}")
    if first + max(count, 1) - 1 > MAX_ID:
        raise UserError(f"{count:,} ids from {first:,} would pass {MAX_ID:,}, the largest id (int64); start at "
                        f"{max(0, MAX_ID - count + 1):,} at most")
    return first + np.arange(count, dtype=np.int64)


def _listed(images: str | os.PathLike) -> Any:
    """A folder as it is; a text file as the list of the paths or URIs on its lines."""
    path = Path(images)
    if path.is_file() and path.suffix.lower() in (".txt", ".lst", ".list"):
        lines = [line.strip() for line in path.read_text().splitlines()]
        listed = [line for line in lines if line and not line.startswith("#")]
        if not listed:
            raise UserError(f"{path} lists no image")
        return listed
    if not path.exists():
        raise UserError(f"images not found: {path} (give an image folder or a .txt file listing paths)")
    return images


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to overwrite it")
    if out.exists() and not is_codes_folder(out):
        raise UserError(f"{out} exists and is not a folder of codes hashdistill wrote; it is left untouched (even "
                        "with --force): choose another output")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a folder to write {out.name} into")


def _encode_here(model: str, rows: dict[str, np.ndarray], staging: Path) -> tuple[list[str], list[str]]:
    """The in-process path: one encoder, batch after batch under a progress bar, a shard every SHARD_ROWS rows."""
    from tqdm import tqdm

    encoder = ImageEncoder(model)
    shards, skipped, pending = [], [], []
    count = len(rows["id"])
    with tqdm(total=count, desc="encode", unit="img", disable=not sys.stderr.isatty()) as bar:
        for start in range(0, count, BATCH):
            out = encoder({k: v[start:start + BATCH] for k, v in rows.items()})
            skipped += [str(p) for p, ok in zip(out["path"], out["ok"]) if not ok]
            pending.append(out)
            bar.update(len(out["id"]))
            if sum(len(p["id"]) for p in pending) >= SHARD_ROWS or start + BATCH >= count:
                shards.append(write_shard(staging / f"codes-{len(shards):05d}.parquet", pending))
                pending = []
    return shards, skipped


def write_shard(path: Path, batches: list[dict[str, np.ndarray]]) -> str:
    """The decoded rows of ``batches`` as one Parquet file; returns its name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keep = [b["ok"] for b in batches]
    table = pa.table({
        "id": pa.array(np.concatenate([b["id"][k] for b, k in zip(batches, keep)]), pa.int64()),
        "path": pa.array(np.concatenate([b["path"][k] for b, k in zip(batches, keep)]).tolist(), pa.string()),
        "label": pa.array(np.concatenate([b["label"][k] for b, k in zip(batches, keep)]), pa.int64()),
        "code": pa.array(np.concatenate([b["code"][k] for b, k in zip(batches, keep)]).tolist(), pa.binary())})
    pq.write_table(table, path)
    return path.name


def is_codes_folder(path: str | os.PathLike) -> bool:
    """A folder ``encode`` wrote (its manifest names the format)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return parse_json(manifest.read_text(), str(manifest)).get("format") == FORMAT
    except (UserError, AttributeError, OSError, UnicodeDecodeError):
        return False


@dataclass
class EncodedCodes:
    """What a codes folder holds, checked: packed codes with their ids, labels and paths, and the manifest."""

    codes: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    manifest: dict[str, Any]

    @property
    def bits(self) -> int:
        return int(self.manifest["bits"])


def read_codes(folder: str | os.PathLike) -> EncodedCodes:
    """Read a codes folder written by :func:`encode_images` (or Ray), treating every field as untrusted: the
    manifest's types, each shard's schema, widths and the declared row counts are checked before use."""
    folder = Path(folder)
    if not is_codes_folder(folder):
        raise UserError(f"{folder} is not a folder of codes written by `hashdistill encode` (no {MANIFEST})")
    manifest = parse_json((folder / MANIFEST).read_text(), f"{folder / MANIFEST}")
    bits, shards = manifest.get("bits"), manifest.get("shards")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 4096 or not isinstance(shards, list) \
            or not all(isinstance(s, str) and Path(s).name == s and s.endswith(".parquet") for s in shards):
        raise UserError(f"{folder / MANIFEST} is corrupt (bits {short(bits)}, shards {short(shards)})")
    width = hc.packed_width(bits)
    parts = [_read_shard(folder / name, width) for name in shards]
    if not parts:
        empty = np.zeros((0, width), dtype=np.uint8)
        return EncodedCodes(empty, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, str), manifest)
    codes, ids, labels, paths = (np.concatenate([p[i] for p in parts]) for i in range(4))
    if len(np.unique(ids)) != len(ids):
        raise UserError(f"{folder}: an id appears twice among its shards")
    return EncodedCodes(codes, ids, labels, paths, manifest)


def _read_shard(path: Path, width: int) -> tuple[np.ndarray, ...]:
    """One shard's codes, ids, labels and paths. The rows and column sizes its Parquet metadata declares are bounded
    by the file's size and the memory available (:mod:`.bounds`) before any row is read, and it is read one row
    group at a time: a small file declaring millions of rows is refused, not inflated."""
    import pyarrow.parquet as pq

    try:
        shard = pq.ParquetFile(path)
        groups = [shard.metadata.row_group(i) for i in range(shard.metadata.num_row_groups)]
        rows = max(shard.metadata.num_rows, sum(group.num_rows for group in groups))
        declared = {"rows": rows * (width + ROW_BYTES)}
        for group in groups:
            for column in (group.column(j) for j in range(group.num_columns)):
                if column.path_in_schema in COLUMNS:
                    declared[column.path_in_schema] = (declared.get(column.path_in_schema, 0)
                                                       + max(0, column.total_uncompressed_size))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types on damaged files
        raise UserError(f"{path} is not a readable shard of codes ({short(str(exc))})") from None
    check_declared(path, declared)
    parts = []
    for i, group in enumerate(groups):
        try:
            table = shard.read_row_group(i, columns=list(COLUMNS))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{path} is not a readable shard of codes ({short(str(exc))})") from None
        if table.num_rows != group.num_rows:
            raise UserError(f"{path}: row group {i} declares {group.num_rows:,} rows but holds {table.num_rows:,}")
        parts.append(_checked_rows(table, width, path))
    if not parts:
        return np.zeros((0, width), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.str_)
    longest = max((len(p) for part in parts for p in part[3]), default=0)
    check_memory(path, 4 * longest * rows)  # the paths become one numpy unicode array, each as long as the longest
    codes, ids, labels = (np.concatenate([part[i] for part in parts]) for i in range(3))
    return codes, ids, labels, np.array([p for part in parts for p in part[3]], dtype=np.str_)


def _checked_rows(table, width: int, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """A row group's codes, ids, labels and paths, its schema, code widths and path lengths checked."""
    import pyarrow as pa

    expected = {"id": pa.int64(), "label": pa.int64()}
    for name, kind in expected.items():
        if table.schema.field(name).type != kind:
            raise UserError(f"{path}: column '{name}' is {table.schema.field(name).type}, expected {kind}")
    if not pa.types.is_binary(table.schema.field("code").type) or not pa.types.is_string(
            table.schema.field("path").type):
        raise UserError(f"{path}: columns 'code' and 'path' must be binary and string")
    raw = table.column("code").to_pylist()
    if any(code is None or len(code) != width for code in raw):
        raise UserError(f"{path}: every code must hold {width} bytes")
    paths = table.column("path").to_pylist()
    if any(p is None or len(p) > MAX_PATH_CHARS for p in paths):
        raise UserError(f"{path}: every row needs a path of at most {MAX_PATH_CHARS:,} characters")
    codes = np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(len(raw), width)
    return codes, table.column("id").to_numpy(), table.column("label").to_numpy(), paths
