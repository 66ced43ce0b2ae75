"""A Hamming-distance index over packed binary codes: faiss ``IndexBinaryFlat`` plus ids, paths, labels.

faiss needs bits padded to a multiple of 8; packed codes already are (the padding bits are zero in
every code, so distances are unchanged). Persisted as ONE ``.npz`` file, read back with
``allow_pickle=False``: the codes, ids, labels, display paths, label names and a JSON record of the
model that encoded the database (path, kind, arch, metadata hash, bits). The faiss index is rebuilt
on load: for a flat index that is a copy of the codes, and it keeps the file format independent of faiss.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from hashdistill import codes
from hashdistill.atomic import atomic_write_bytes
from hashdistill.errors import UserError
from hashdistill.recipe import DataConfig
from hashdistill.untrusted import parse_json

from .images import ImageLike
from .sources import collect_images, open_encoder

FORMAT = "hashdistill-hash-index"
FORMAT_VERSION = 1
KEYS = ("format", "version", "bits", "codes", "ids", "labels", "paths", "label_names", "model")


class HashIndex:
    """Packed codes searchable by Hamming distance, with an id, label and path per entry."""

    def __init__(self, packed: np.ndarray, bits: int, ids: np.ndarray | None = None,
                 labels: np.ndarray | None = None, paths: Sequence[str] | None = None,
                 label_names: Sequence[str] = (), model: dict[str, Any] | None = None):
        packed = np.ascontiguousarray(packed)
        width = codes.packed_width(bits)
        if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != width:
            raise UserError(f"an index of {bits}-bit codes needs uint8 codes of shape (n, {width}), "
                            f"got {packed.dtype} {packed.shape}")
        n = len(packed)
        self.bits = int(bits)
        self.codes = packed
        self.ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        self.labels = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        self.paths = [""] * n if paths is None else [str(p) for p in paths]
        self.label_names = [str(name) for name in label_names]
        self.model = dict(model or {})
        if not len(self.ids) == len(self.labels) == len(self.paths) == n:
            raise UserError(f"index columns differ in length: {n} codes, {len(self.ids)} ids, "
                            f"{len(self.labels)} labels, {len(self.paths)} paths")
        self.faiss_index = faiss.IndexBinaryFlat(width * 8)
        self.faiss_index.add(packed)

    def __len__(self) -> int:
        return len(self.codes)

    def search(self, query_codes: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Hamming distances (int32) and ids of the k nearest entries per query, nearest first."""
        distances, rows = self.nearest(query_codes, k)
        return distances, self.ids[rows]

    def nearest(self, query_codes: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` but returns row positions (to look up paths and labels)."""
        query_codes = np.ascontiguousarray(query_codes)
        if query_codes.dtype != np.uint8 or query_codes.ndim != 2 or query_codes.shape[1] != self.codes.shape[1]:
            raise UserError(f"queries must be packed {self.bits}-bit codes, uint8 (n, {self.codes.shape[1]}); "
                            f"got {query_codes.dtype} {query_codes.shape} (a model of another bit width?)")
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        if len(self) == 0:
            raise UserError("the index is empty")
        return self.faiss_index.search(query_codes, min(k, len(self)))

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the index as one .npz file, atomically."""
        path = Path(path)
        if path.exists() and not force:
            raise UserError(f"{path} already exists; pass --force to overwrite it")
        buffer = io.BytesIO()
        np.savez(buffer, format=np.array(FORMAT), version=np.array(FORMAT_VERSION), bits=np.array(self.bits),
                 codes=self.codes, ids=self.ids, labels=self.labels, paths=np.array(self.paths, dtype=np.str_),
                 label_names=np.array(self.label_names, dtype=np.str_), model=np.array(json.dumps(self.model)))
        return atomic_write_bytes(path, buffer.getvalue())


def load_index(path: str | os.PathLike) -> HashIndex:
    """Read an index written by :meth:`HashIndex.save`; a truncated or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"index not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if set(KEYS) - set(npz.files) or str(npz["format"]) != FORMAT:
                raise UserError(f"{path} is not a hashdistill index")
            fields = {key: npz[key] for key in KEYS}
    except UserError:
        raise
    except Exception as exc:  # zipfile, zlib and numpy raise a variety of errors on damaged files
        raise UserError(f"{path} is not a readable hashdistill index (truncated or corrupt?): {exc}") from None
    try:
        if int(fields["version"]) != FORMAT_VERSION:
            raise UserError(f"{path}: index format version {int(fields['version'])} is not supported")
        model = parse_json(str(fields["model"]), f"{path}: the model record")
        if not isinstance(model, dict):
            raise ValueError("the model record is not a JSON object")
        return HashIndex(fields["codes"], int(fields["bits"]), fields["ids"], fields["labels"],
                         fields["paths"].tolist(), fields["label_names"].tolist(), model)
    except (ValueError, TypeError, AttributeError, IndexError) as exc:  # fields of the wrong type or shape
        raise UserError(f"{path}: index contents are corrupt ({exc})") from None


def build_index(source: str | os.PathLike, images: str | os.PathLike | Sequence[ImageLike],
                out_path: str | os.PathLike, force: bool = False, data: DataConfig | None = None) -> HashIndex:
    """Encode ``images`` (folder, ``dataset:split`` or paths/arrays) with ``source`` (ONNX file or
    checkpoint) and save the index to ``out_path`` (one .npz file, whatever its suffix).

    ``data``: the data section to build a ``dataset:split`` with (default: see :mod:`.sources`).
    """
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise UserError(f"{out_path} already exists; pass --force to overwrite it")
    encoder = open_encoder(source)
    image_set = collect_images(images, encoder, data)
    index = HashIndex(encoder.encode(image_set.items), encoder.bits, labels=image_set.labels, paths=image_set.paths,
                      label_names=image_set.label_names, model={**encoder.describe(), "bits": encoder.bits})
    index.save(out_path, force=force)
    return index


@dataclass
class SearchResults:
    """Per query (rows) the k nearest entries (columns), nearest first.

    Iterating yields, per query, a list of hits ``{rank, distance, id, path, label, label_name}``.
    """

    query_paths: list[str]
    distances: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    paths: list[list[str]]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.query_paths)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return (self.hits(q) for q in range(len(self)))

    def hits(self, query: int) -> list[dict[str, Any]]:
        """The nearest entries of one query, as plain records for printing or JSON."""
        names = self.label_names
        return [{"rank": rank + 1, "distance": int(distance), "id": int(entry), "path": path, "label": int(label),
                 "label_name": names[label] if 0 <= label < len(names) else ""}
                for rank, (distance, entry, label, path) in enumerate(
                    zip(self.distances[query], self.ids[query], self.labels[query], self.paths[query]))]


def search_images(index: HashIndex | str | os.PathLike, images: str | os.PathLike | Sequence[ImageLike],
                  k: int = 10, model: str | os.PathLike | None = None) -> SearchResults:
    """Encode query images with ``model`` (default: the model recorded in the index) and search the index.

    Any model of the index's bit width may query it, e.g. a student against a teacher-built index
    (the student was trained into the teacher's code space); another bit width is a UserError.
    """
    if not isinstance(index, HashIndex):
        index = load_index(index)
    if model is None:
        model = index.model.get("path")
        if not model:
            raise UserError("the index records no model; pass the model to encode the queries with")
    encoder = open_encoder(model)
    if encoder.bits != index.bits:
        raise UserError(f"{model} produces {encoder.bits}-bit codes but the index holds {index.bits}-bit codes")
    queries = collect_images(images, encoder)
    distances, rows = index.nearest(encoder.encode(queries.items), k)
    return SearchResults(queries.paths, distances, index.ids[rows], index.labels[rows],
                         [[index.paths[r] for r in row] for row in rows], index.label_names)
