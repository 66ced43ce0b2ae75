"""A Hamming-distance index over packed binary codes: a faiss binary index plus ids, paths and labels.

The search structure is one of :data:`~.index_kinds.KINDS` (``flat`` exact; ``ivf`` and ``hnsw``
approximate), picked by name or by the data (``auto``: flat below :data:`AUTO_FLAT_BELOW` codes, IVF from
there, where exact search stops being cheap). An approximate index measures, when it is built, its
recall@k against exact search at each speed setting (nprobe / efSearch), and searches by default at the
cheapest setting that keeps its promise on queries it has never seen:

- the queries are not database rows: a sample of rows is held out of the structure while it is measured
  (then added), and each held-out code has 1 to bits/16 of its bits flipped, as a new photo's code differs from
  its catalogue neighbours' (unperturbed held-out rows overstated the recall on new queries: 0.990 measured,
  0.961 found at 10M; flipping up to bits/8 understated it: 0.955 measured where fresh queries found 0.996);
- the default keeps a margin against the estimate's noise: the cheapest setting whose recall less two standard
  errors (over the queries) still reaches :data:`TARGET_RECALL`.

Recall counts a returned item as right when its distance is no larger than the k-th exact distance (ties make
"the" exact top k ambiguous).

Persisted as ONE ``.npz`` file, read back without trusting it (:mod:`.npz`): codes, ids, labels, display paths,
label names, a JSON record of the model that encoded the database, the kind, its parameters, the recall
record, and the kind's arrays (see :mod:`.index_kinds`). Its declared size is checked against the file's own size
and the memory available before anything is inflated (:mod:`.bounds`). Indexes can grow (:func:`add_to_index`, no
retraining) and shards built on several machines can be merged (:func:`merge_indexes`), ids kept.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from hashdistill import codes
from hashdistill.atomic import atomic_write_bytes
from hashdistill.errors import UserError
from hashdistill.export.images import ImageLike
from hashdistill.imagefiles import require_regular_file
from hashdistill.messages import name_some, warn
from hashdistill.recipe import DataConfig
from hashdistill.untrusted import MAX_BITS, MAX_CLASSES, MAX_JSON_CHARS, parse_json, short

from .bounds import check_declared
from .encode import id_range, is_codes_folder, read_codes
from .image_encoder import encode_or_skip
from .index_kinds import ARRAY_KEYS, KINDS, MAX_HNSW_LEVELS, SearchStructure
from .npz import Member, read_arrays, read_headers
from .sources import ARRAY_PATH, collect_images, open_encoder

FORMAT = "hashdistill-hash-index"
FORMAT_VERSION = 2  # version 1 (flat only, no kind / params / recall) is still read
KEYS = ("format", "version", "bits", "codes", "ids", "labels", "paths", "label_names", "model")
KIND_CHOICES = ("auto", *KINDS)
AUTO_FLAT_BELOW = 100_000  # benchmarks/search.py: under it exact search answers in ~0.1 ms a query on 2 cores
TARGET_RECALL = 0.99
RECALL_K, RECALL_QUERIES = 100, 1000
MARGIN_SE = 2.0  # the default setting's recall less this many standard errors must reach TARGET_RECALL


class HashIndex:
    """Packed codes searchable by Hamming distance, with an id, label and path per entry.

    ``kind``: a name of :data:`~.index_kinds.KINDS` or ``"auto"``; ``params``: its build parameters
    (``nlist`` for ivf, ``M`` / ``efConstruction`` for hnsw; defaults from the data). ``structure``: an already
    built search structure (when loading); otherwise one is built, and an approximate one has its recall
    measured (``recall``).
    """

    def __init__(self, packed: np.ndarray, bits: int, ids: np.ndarray | None = None,
                 labels: np.ndarray | None = None, paths: Sequence[str] | np.ndarray | None = None,
                 label_names: Sequence[str] = (), model: dict[str, Any] | None = None, kind: str = "flat",
                 params: dict[str, int] | None = None, structure: SearchStructure | None = None,
                 recall: dict[str, Any] | None = None, seed: int = 0):
        packed = np.ascontiguousarray(packed)
        width = codes.packed_width(bits)
        if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != width:
            raise UserError(f"an index of {bits}-bit codes needs uint8 codes of shape (n, {width}), "
                            f"got {packed.dtype} {packed.shape}")
        n = len(packed)
        self.bits = int(bits)
        self.codes = packed
        self.ids, self.labels, self.paths = _columns(n, np.arange(n) if ids is None else ids, labels, paths)
        self.label_names = [str(name) for name in label_names]
        self.model = dict(model or {})
        if structure is not None:
            self.structure, self.recall = structure, recall or {}
        else:
            self._build(choose_kind(kind, n), dict(params or {}), np.random.default_rng(seed))
        if self.recall.get("default") is not None:
            self.structure.set_speed(self.recall["default"])

    def _build(self, kind: str, params: dict[str, int], rng: np.random.Generator) -> None:
        """Build the search structure; an approximate one is first built without a held-out sample of rows,
        which then query it (recall against exact search over the same rows) and are added afterwards.

        The held-out rows end up last: the rows are reordered (ids, labels and paths with them)."""
        n = len(self.codes)
        if kind == "flat" and params:
            raise UserError(f"parameters {short(params)} are for an approximate index, but this one is flat "
                            f"({n} codes; auto builds ivf from {AUTO_FLAT_BELOW:,}): pass the kind explicitly")
        held = min(RECALL_QUERIES, n // 10) if KINDS[kind].speed_param is not None else 0
        if held:
            chosen = np.zeros(n, dtype=bool)
            chosen[rng.choice(n, held, replace=False)] = True
            order = np.concatenate([np.flatnonzero(~chosen), np.flatnonzero(chosen)])
            self.codes, self.ids, self.labels, self.paths = (
                np.ascontiguousarray(column[order]) for column in (self.codes, self.ids, self.labels, self.paths))
        self.structure = KINDS[kind].build(self.codes[: n - held], params, rng)
        self.recall = measure_recall(self.structure, self.codes[: n - held],
                                     perturbed(self.codes[n - held:], self.bits, rng))
        if held:
            self.structure.add(self.codes[n - held:])

    @property
    def kind(self) -> str:
        return self.structure.kind

    def __len__(self) -> int:
        return len(self.codes)

    def search(self, query_codes: np.ndarray, k: int = 10, speed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Hamming distances (int32) and ids of the k nearest entries per query, nearest first."""
        distances, rows = self.nearest(query_codes, k, speed)
        return distances, np.where(rows >= 0, self.ids[rows], -1)

    def nearest(self, query_codes: np.ndarray, k: int = 10, speed: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` but returns row positions (to look up paths and labels); -1 where an approximate
        index found fewer than k entries. ``speed``: nprobe (ivf) or efSearch (hnsw) for this search."""
        query_codes = np.ascontiguousarray(query_codes)
        if query_codes.dtype != np.uint8 or query_codes.ndim != 2 or query_codes.shape[1] != self.codes.shape[1]:
            raise UserError(f"queries must be packed {self.bits}-bit codes, uint8 (n, {self.codes.shape[1]}); "
                            f"got {query_codes.dtype} {query_codes.shape} (a model of another bit width?)")
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        if len(self) == 0:
            raise UserError("the index is empty")
        default = self.structure.set_speed(None)
        try:
            self.structure.set_speed(speed)
            return self.structure.search(query_codes, min(k, len(self)))
        finally:
            if default is not None:
                self.structure.set_speed(default)

    def lookup(self, query_codes: np.ndarray, k: int, speed: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[str]]]:
        """Distances, ids, labels and paths of the k nearest entries of each query (-1 / none where an approximate
        index found fewer): what every search backend answers (``search.milvus.MilvusCollection`` too)."""
        distances, rows = self.nearest(query_codes, k, speed)
        found = rows >= 0
        safe = np.maximum(rows, 0)
        return (distances, np.where(found, self.ids[safe], -1), np.where(found, self.labels[safe], -1),
                [[str(self.paths[r]) for r, ok in zip(row, hit) if ok] for row, hit in zip(safe, found)])

    def close(self) -> None:
        """Nothing to release (the index is in memory); every search backend closes alike, a Milvus one for real."""

    def describe(self, speed: int | None = None) -> dict[str, Any]:
        """Kind, parameters, the speed setting a search uses, the recall measured for it, and memory per item."""
        spec = KINDS[self.kind]
        used = speed if speed is not None else self.structure.set_speed(None)
        if self.kind == "ivf" and used is not None:
            used = min(used, self.structure.params["nlist"])
        curve = dict((int(v), r) for v, r in self.recall.get("curve", []))
        return {"kind": self.kind, "params": self.structure.params, "items": len(self),
                "speed_param": spec.speed_param, "speed": used,
                "recall": 1.0 if spec.speed_param is None else curve.get(used),
                "recall_k": self.recall.get("k"), "bytes_per_item": self.bytes_per_item()}

    def bytes_per_item(self) -> float:
        """Memory one entry costs once loaded: its code, id, label and path, plus the kind's own structure."""
        if not len(self):
            return 0.0
        columns = self.codes.nbytes + self.ids.nbytes + self.labels.nbytes + self.paths.nbytes
        return columns / len(self) + KINDS[self.kind].extra_bytes_per_item(self.structure)

    def add(self, packed: np.ndarray, labels: np.ndarray | None = None, paths: Sequence[str] | None = None,
            ids: np.ndarray | None = None) -> None:
        """Append entries without rebuilding (IVF keeps its centroids, HNSW links the new nodes in).

        ``ids`` default to the next free ones after the largest id present.
        """
        packed = np.ascontiguousarray(packed)
        n = len(packed)
        if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != self.codes.shape[1]:
            raise UserError(f"new entries must be packed {self.bits}-bit codes, uint8 (n, {self.codes.shape[1]}); "
                            f"got {packed.dtype} {packed.shape}")
        start = int(self.ids.max()) + 1 if len(self) else 0
        new_ids, new_labels, new_paths = _columns(n, id_range(start, n) if ids is None else ids, labels, paths)
        if np.isin(new_ids, self.ids).any():
            raise UserError("new entries' ids must be unique and not already in the index")
        self.structure.add(packed)
        self.codes = np.concatenate([self.codes, packed])
        self.ids, self.labels = np.concatenate([self.ids, new_ids]), np.concatenate([self.labels, new_labels])
        self.paths = np.concatenate([self.paths, new_paths])

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the index as one .npz file, atomically."""
        path = Path(path)
        if path.exists() and not force:
            raise UserError(f"{path} already exists; pass --force to overwrite it")
        buffer = io.BytesIO()
        np.savez(buffer, format=np.array(FORMAT), version=np.array(FORMAT_VERSION), bits=np.array(self.bits),
                 codes=self.codes, ids=self.ids, labels=self.labels, paths=self.paths,
                 label_names=np.array(self.label_names, dtype=np.str_), model=np.array(json.dumps(self.model)),
                 kind=np.array(self.kind), params=np.array(json.dumps(self.structure.params)),
                 recall=np.array(json.dumps(self.recall)), **KINDS[self.kind].arrays(self.structure))
        return atomic_write_bytes(path, buffer.getvalue())


def _columns(n: int, ids: Any, labels: Any, paths: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids (unique), labels (-1 = none) and display paths ("" = none) for n codes, checked to match them."""
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    paths = np.full(n, "", dtype="<U1") if paths is None else np.asarray(paths, dtype=np.str_)
    if not ids.shape == labels.shape == paths.shape == (n,):
        raise UserError(f"index columns differ in length: {n} codes, {ids.shape} ids, {labels.shape} labels, "
                        f"{paths.shape} paths")
    if len(np.unique(ids)) != n:
        raise UserError("index ids must be unique")
    return ids, labels, paths


def perturbed(rows: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Query codes unlike any database row: each of ``rows`` with 1 to max(1, bits // 16) of its bits flipped
    (drawn uniformly), the way a new image's code differs from its nearest catalogue codes (calibrated against
    test-image queries in benchmarks/search.py)."""
    if not len(rows):
        return rows
    unpacked = np.unpackbits(rows, axis=1)[:, :bits]
    flips = rng.integers(1, max(1, bits // 16) + 1, len(rows))
    for row, count in enumerate(flips):
        unpacked[row, rng.choice(bits, count, replace=False)] ^= 1
    return np.packbits(unpacked, axis=1)


def recall_per_query(rows: np.ndarray, indexed: np.ndarray, queries: np.ndarray, kth: np.ndarray) -> np.ndarray:
    """Per query, the fraction of the returned ``rows`` (-1 = none) no farther from it than its k-th exact
    neighbour (``kth``, shape (q, 1)): ties make "the" exact top k ambiguous, distances do not."""
    found = np.bitwise_count(indexed[np.maximum(rows, 0)] ^ queries[:, None, :]).sum(axis=2)
    good = ((rows >= 0) & (found <= kth)).sum(axis=1)
    return np.minimum(good, rows.shape[1]) / rows.shape[1]


def tie_aware_recall(rows: np.ndarray, indexed: np.ndarray, queries: np.ndarray, kth: np.ndarray) -> float:
    """The mean of :func:`recall_per_query`."""
    return float(np.mean(recall_per_query(rows, indexed, queries, kth)))


def choose_kind(kind: str, n: int) -> str:
    """The kind to build for ``n`` codes: ``auto`` is flat below AUTO_FLAT_BELOW codes and IVF from there."""
    if kind not in KIND_CHOICES:
        raise UserError(f"unknown index kind {short(kind)}; choose one of {', '.join(KIND_CHOICES)}")
    if kind == "auto":
        return "flat" if n < AUTO_FLAT_BELOW else "ivf"
    return kind


def measure_recall(structure: SearchStructure, indexed: np.ndarray, queries: np.ndarray,
                   k: int = RECALL_K) -> dict[str, Any]:
    """recall@k of ``structure`` (built over ``indexed``) against exact search, for ``queries`` not in it, at every
    speed setting, with its standard error; and the default setting: the cheapest one whose recall less
    MARGIN_SE standard errors reaches TARGET_RECALL (else the most thorough). Flat search is exact: nothing to
    measure."""
    spec = KINDS[structure.kind]
    n = len(indexed)
    if spec.speed_param is None or n == 0 or len(queries) == 0:
        return {"k": min(k, n), "queries": 0, "curve": [], "default": None}
    k = min(k, n)
    exact = faiss.IndexBinaryFlat(indexed.shape[1] * 8)
    exact.add(indexed)
    kth = exact.search(queries, k)[0][:, -1:]
    curve, errors = [], []
    values = [v for v in spec.speed_values if structure.kind != "ivf" or v <= structure.params["nlist"]]
    for value in list(dict.fromkeys(structure.set_speed(v) for v in values)):  # in force (hnsw: <= nodes)
        structure.set_speed(value)
        _, rows = structure.search(queries, k)
        per_query = recall_per_query(rows, indexed, queries, kth)
        curve.append([int(value), float(per_query.mean())])
        errors.append(float(per_query.std(ddof=1) / np.sqrt(len(per_query))) if len(per_query) > 1 else 0.0)
    default = next((v for (v, r), se in zip(curve, errors) if r - MARGIN_SE * se >= TARGET_RECALL), curve[-1][0])
    return {"k": k, "queries": len(queries), "curve": curve, "standard_errors": errors, "default": default,
            "target": TARGET_RECALL, "margin_standard_errors": MARGIN_SE,
            "queries_are": "held-out rows with 1 to bits/16 of their bits flipped"}


def load_index(path: str | os.PathLike) -> HashIndex:
    """Read an index written by :meth:`HashIndex.save`; a truncated, foreign or too large file is a UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"index not found: {path}")
    require_regular_file(path, "index")  # a FIFO would block the reader forever
    members = read_headers(path)  # declared shapes only: nothing is decompressed before they are checked
    if set(KEYS) - set(members):
        raise UserError(f"{path} is not a hashdistill index")
    wanted = {key: members[key] for key in (*KEYS, *RECORD_KEYS, *ARRAY_KEYS) if key in members}
    _check_declared_sizes(wanted, path)
    fields = read_arrays(path, wanted)
    if str(fields["format"]) != FORMAT:
        raise UserError(f"{path} is not a hashdistill index")
    try:
        version = int(fields["version"])
        if version not in (1, FORMAT_VERSION):
            raise UserError(f"{path}: index format version {version} is not supported")
        model = parse_json(str(fields["model"]), f"{path}: the model record")
        kind = str(fields.get("kind", "flat"))
        params = parse_json(str(fields.get("params", "{}")), f"{path}: the index parameters")
        recall = parse_json(str(fields.get("recall", "{}")), f"{path}: the recall record")
        if not isinstance(model, dict) or not isinstance(params, dict) or not isinstance(recall, dict):
            raise ValueError("the model, parameter and recall records must be JSON objects")
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {short(kind)}")
        _check_recall_record(recall, path)
        bits = int(fields["bits"])
        packed = np.ascontiguousarray(fields["codes"])
        if packed.dtype != np.uint8 or packed.ndim != 2 or not 1 <= bits <= 8 * packed.shape[1]:
            raise ValueError(f"codes of {packed.dtype} {packed.shape} for {bits} bits")
        structure = KINDS[kind].restore(packed, params, {key: fields[key] for key in ARRAY_KEYS if key in fields})
        return HashIndex(packed, bits, fields["ids"], fields["labels"], fields["paths"],
                         fields["label_names"].tolist(), model, structure=structure, recall=recall)
    except (ValueError, TypeError, AttributeError, IndexError, OverflowError) as exc:  # wrong type or shape
        raise UserError(f"{path}: index contents are corrupt ({short(str(exc))})") from None


def _check_recall_record(recall: dict[str, Any], path: Path) -> None:
    """The recall record sets the default search setting: a curve of [setting, recall] pairs, k, and a default
    that is one of the curve's settings (a hostile efSearch of 2**31 would allocate gigabytes per query)."""
    if not recall:
        return
    curve, k, default = recall.get("curve"), recall.get("k"), recall.get("default")
    pairs_ok = isinstance(curve, list) and len(curve) <= 64 and all(
        isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int) and not isinstance(pair[0], bool)
        and pair[0] >= 1 and isinstance(pair[1], int | float) and not isinstance(pair[1], bool)
        and 0 <= pair[1] <= 1 for pair in curve)
    k_ok = isinstance(k, int) and not isinstance(k, bool) and k >= 0
    if not pairs_ok or not k_ok or not (default is None or default in [pair[0] for pair in curve]):
        raise UserError(f"{path}: the recall record is corrupt (expected a curve of [setting, recall in 0..1] "
                        "pairs, k and a default setting from the curve)")


RECORD_KEYS = ("kind", "params", "recall")  # JSON records and the kind's name, beside KEYS
SCALARS = ("format", "version", "bits", "model", *RECORD_KEYS)
PER_ROW = ("ids", "labels", "paths", "ivf_assign", "hnsw_group")
MAX_TEXT_BYTES = 4 * 4096  # a path: 4096 characters of numpy's 4-byte unicode
MAX_NAME_BYTES = 4 * 255  # a label name: a folder's name (255 characters at most on common file systems)
MAX_LINKS_PER_NODE = 2 * 256 + 256 * (MAX_HNSW_LEVELS - 1)  # HNSW's most links for one node (M <= 256)


def _check_declared_sizes(members: dict[str, Member], path: Path) -> None:
    """Compare what every member declares (dtype, shape) with the codes' row count and width, and their bytes with
    the file's size and the memory available (:mod:`.bounds`), before any member is decompressed: a member cannot
    claim more than its index needs, nor the index more than its file can hold."""
    codes = members["codes"]
    if codes.dtype != np.uint8 or len(codes.shape) != 2 or codes.shape[1] > MAX_BITS // 8:
        raise UserError(f"{path}: codes must be uint8 (n, bytes per code), declared {codes.dtype} {codes.shape}")
    n, width = codes.shape
    for name, member in members.items():
        shape, size = member.shape, member.dtype.itemsize
        if name in SCALARS:
            ok = shape == () and size <= 4 * MAX_JSON_CHARS
        elif name in PER_ROW:
            ok = shape == (n,) and size <= MAX_TEXT_BYTES
        elif name == "label_names":
            ok = len(shape) == 1 and shape[0] <= MAX_CLASSES and size <= MAX_NAME_BYTES
        elif name == "hnsw_neighbors":
            ok = len(shape) == 1 and shape[0] <= (n + 1) * MAX_LINKS_PER_NODE and size <= 8
        elif name == "codes":
            ok = True
        else:  # the other arrays of a kind: at most a row per code (+1), a code's width when two-dimensional
            ok = 1 <= len(shape) <= 2 and shape[0] <= n + 1 and shape[1:] in ((), (width,)) and size <= 8
        if not ok:
            raise UserError(f"{path}: member '{name}' declares {member.dtype} {shape}, which an index of {n:,} "
                            f"codes of {width} bytes cannot hold (a damaged or crafted file)")
    check_declared(path, {name: member.nbytes for name, member in members.items()},
                   copies=codes.nbytes)  # faiss keeps its own copy of the codes


def build_index(source: str | os.PathLike, images: str | os.PathLike | Sequence[ImageLike],
                out_path: str | os.PathLike, force: bool = False, data: DataConfig | None = None,
                kind: str = "auto", params: dict[str, int] | None = None, first_id: int = 0) -> HashIndex:
    """Encode ``images`` (folder, ``dataset:split`` or paths/arrays) with ``source`` (ONNX file or
    checkpoint) and save the index to ``out_path`` (one .npz file, whatever its suffix).

    ``data``: the data section to build a ``dataset:split`` with (default: see :mod:`.sources`). ``first_id``:
    ids run from it, so shards built on several machines can be merged with their ids kept.
    """
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise UserError(f"{out_path} already exists; pass --force to overwrite it")
    encoder = open_encoder(source)
    image_set = collect_images(images, encoder, data)
    all_ids = id_range(first_id, len(image_set.items))
    packed, ok = _encode_readable(encoder, image_set)
    ids = all_ids[ok]
    index = HashIndex(packed[ok], encoder.bits, ids=ids, labels=np.asarray(image_set.labels)[ok],
                      paths=np.asarray(image_set.paths)[ok], label_names=image_set.label_names,
                      model={**encoder.describe(), "bits": encoder.bits}, kind=kind, params=params)
    index.save(out_path, force=force)
    return index


def build_index_from_codes(folder: str | os.PathLike, out_path: str | os.PathLike, force: bool = False,
                           kind: str = "auto", params: dict[str, int] | None = None,
                           model: str | os.PathLike | None = None) -> HashIndex:
    """An index of the codes ``hashdistill encode`` wrote into ``folder`` (ids, labels and paths kept). ``model``,
    when given (``index build MODEL CODES``), must be the model the codes record, by its hash and bit width."""
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise UserError(f"{out_path} already exists; pass --force to overwrite it")
    encoded = read_codes(folder)
    if model is not None:
        given, made_by = open_encoder(model), _model_record(encoded.manifest).get("hash")
        if given.bits != encoded.bits or given.describe().get("hash") != made_by:
            raise UserError(f"{folder} holds {encoded.bits}-bit codes of model {short(made_by)}, not of {model} "
                            f"({given.bits} bits, {short(given.describe().get('hash'))}): give the model that "
                            "encoded them, or the codes alone")
    index = HashIndex(encoded.codes, encoded.bits, ids=encoded.ids, labels=encoded.labels, paths=encoded.paths,
                      label_names=encoded.manifest.get("label_names") or [], model=_model_record(encoded.manifest),
                      kind=kind, params=params)
    index.save(out_path, force=force)
    return index


def _model_record(manifest: dict[str, Any]) -> dict[str, Any]:
    model = manifest.get("model")
    if not isinstance(model, dict) or not all(isinstance(v, str | int) for v in model.values()):
        raise UserError(f"the codes' manifest records no model (got {short(model)})")
    return model


def add_to_index(index_path: str | os.PathLike, images: str | os.PathLike | Sequence[ImageLike],
                 model: str | os.PathLike | None = None, data: DataConfig | None = None,
                 allow_duplicates: bool = False) -> tuple[HashIndex, int]:
    """Encode more images with the index's model (or ``model``, of the same bit width) and add them in place; a
    folder of codes from ``hashdistill encode`` is added as it is (made by the index's own model). Images whose
    paths the index holds already are refused (adding a folder twice), unless ``allow_duplicates``."""
    index = load_index(index_path)
    if isinstance(images, str | os.PathLike) and is_codes_folder(images):
        encoded = read_codes(images)
        made_by = _model_record(encoded.manifest).get("hash")
        if encoded.bits != index.bits or made_by != index.model.get("hash"):
            raise UserError(f"{images} holds {encoded.bits}-bit codes of model {short(made_by)}, the index "
                            f"{index.bits}-bit codes of {short(index.model.get('hash'))}: encode them with the "
                            "index's model")
        _refuse_duplicates(index, encoded.paths, allow_duplicates, encoded.ids)
        index.add(encoded.codes, encoded.labels, encoded.paths, ids=encoded.ids)
        index.save(index_path, force=True)
        return index, len(encoded.codes)
    encoder = _query_encoder(index, model)
    image_set = collect_images(images, encoder, data)
    if image_set.label_names and index.label_names and image_set.label_names != index.label_names:
        raise UserError(f"the new images' classes {short(image_set.label_names)} differ from the index's "
                        f"{short(index.label_names)}")
    _refuse_duplicates(index, image_set.paths, allow_duplicates)
    packed, ok = _encode_readable(encoder, image_set)
    packed = packed[ok]
    index.add(packed, np.asarray(image_set.labels)[ok], np.asarray(image_set.paths)[ok])
    index.label_names = index.label_names or image_set.label_names
    index.save(index_path, force=True)
    return index, len(packed)


def _refuse_duplicates(index: HashIndex, paths: Sequence[str], allow: bool, ids: np.ndarray | None = None) -> None:
    """Refuse entries the index holds already, before any is encoded: ids always (they stay unique), and paths of
    files or dataset rows (not in-memory arrays) unless ``allow``."""
    if ids is not None and np.isin(ids, index.ids).any():
        again = ids[np.isin(ids, index.ids)]
        raise UserError(f"{len(again):,} of the new entries' ids are in the index already (id {int(again[0])}): "
                        "were these codes added before? Encode new images with a distinct --first-id")
    named = np.array([str(p) for p in paths if not str(p).startswith(ARRAY_PATH)], dtype=np.str_)
    again = named[np.isin(named, index.paths)] if len(named) and not allow else named[:0]
    if len(again):
        raise UserError(f"{len(again):,} of the new images are in the index already ({name_some(list(again))}); "
                        "pass --allow-duplicates to add them again")


def _encode_readable(encoder, image_set) -> tuple[np.ndarray, np.ndarray]:
    """Codes of an image set and which images could be decoded; the others are skipped, named in one warning."""
    packed, ok = encode_or_skip(encoder, image_set.items)
    if not ok.any():
        raise UserError(f"none of the {len(ok)} images could be decoded")
    if not ok.all():
        warn(f"skipped {int((~ok).sum())} image(s) that could not be decoded: "
             f"{name_some([p for p, good in zip(image_set.paths, ok) if not good])}")
    return packed, ok


def merge_indexes(paths: Sequence[str | os.PathLike], out_path: str | os.PathLike, force: bool = False,
                  kind: str | None = None) -> HashIndex:
    """One index holding every shard's entries, ids kept: the shards must hold codes of the same model and
    bit width, and no id may appear twice. The merged index is of ``kind`` (default: the first shard's)."""
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise UserError(f"{out_path} already exists; pass --force to overwrite it")
    if len(paths) < 2:
        raise UserError("merging needs at least two indexes")
    shards = [load_index(path) for path in paths]
    first = shards[0]
    for path, shard in zip(paths[1:], shards[1:]):
        if shard.bits != first.bits or shard.model.get("hash") != first.model.get("hash"):
            raise UserError(f"{path} holds {shard.bits}-bit codes of model {short(shard.model.get('hash'))}, "
                            f"{paths[0]} {first.bits}-bit codes of {short(first.model.get('hash'))}: "
                            "only shards encoded by the same model can be merged")
        if shard.label_names != first.label_names:
            raise UserError(f"{path} names its labels differently from {paths[0]}")
    ids = np.concatenate([s.ids for s in shards])
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise UserError(f"id {int(unique[counts > 1][0])} appears in more than one shard; build shards with "
                        "distinct `--first-id` values")
    kind = kind or first.kind
    params = first.structure.params if kind == first.kind else None
    merged = HashIndex(np.concatenate([s.codes for s in shards]), first.bits, ids,
                       np.concatenate([s.labels for s in shards]), np.concatenate([s.paths for s in shards]),
                       first.label_names, first.model, kind=kind, params=params)
    merged.save(out_path, force=force)
    return merged


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


def search_images(index: Any, images: str | os.PathLike | Sequence[ImageLike], k: int = 10,
                  model: str | os.PathLike | None = None, speed: int | None = None) -> SearchResults:
    """Encode query images with ``model`` (default: the model recorded in the index) and search the index: a
    HashIndex, a Milvus collection (``search.milvus.MilvusCollection``), or a URI of either
    (:func:`open_search_backend`).

    Any model of the index's bit width may query it, e.g. a student against a teacher-built index
    (the student was trained into the teacher's code space); another bit width is a UserError.
    ``speed``: nprobe (ivf) or efSearch (hnsw) for these queries (default: the one chosen at build time).
    """
    if isinstance(index, str | os.PathLike):
        with closing(open_search_backend(index)) as backend:
            return search_images(backend, images, k, model, speed)
    encoder = _query_encoder(index, model)
    queries = collect_images(images, encoder)
    query_codes = encoder.encode(queries.items)
    if query_codes.shape[1] != index.codes.shape[1]:
        raise UserError(f"queries must be packed {index.bits}-bit codes; got {query_codes.shape[1]} bytes each")
    distances, ids, labels, paths = index.lookup(query_codes, k, speed)
    return SearchResults(queries.paths, distances, ids, labels, paths, index.label_names)


def open_search_backend(uri: str | os.PathLike, collection: str | None = None):
    """The search backend a URI names: a Milvus Lite file (``.db``) or server (``http://...``) opens the
    collection (:class:`~.milvus.MilvusCollection`), anything else is a faiss index file (:func:`load_index`)."""
    from .milvus import DEFAULT_COLLECTION, SERVER_SCHEMES

    text = str(uri)
    if text.startswith(SERVER_SCHEMES) or text.endswith(".db"):
        from .milvus import MilvusCollection

        return MilvusCollection(text, DEFAULT_COLLECTION if collection is None else collection)
    if collection is not None:
        raise UserError(f"--collection names a Milvus collection; {text} is an index file")
    return load_index(uri)


def _query_encoder(index: HashIndex, model: str | os.PathLike | None):
    """The model to encode queries or new entries with: ``model`` (given on purpose, any model of the index's bit
    width) or the one recorded in the index, which must still be the very file that coded it: a model swapped in
    at that path (its sha256 differs from the recorded one) is refused by name. An index written before the digest
    was recorded is searched with a warning that it cannot be checked."""
    given = model is not None
    if model is None:
        model = index.model.get("path")
        if not model or not isinstance(model, str):
            raise UserError("the index records no model; pass the model to encode the images with")
    encoder = open_encoder(model)
    if encoder.bits != index.bits:
        raise UserError(f"{model} produces {encoder.bits}-bit codes but the index holds {index.bits}-bit codes")
    recorded, found = index.model.get("sha256"), encoder.describe().get("sha256")
    if not given and recorded is None:
        warn(f"the index records no digest of its model (an older hashdistill wrote it): {model} is used unchecked")
    elif not given and recorded != found:
        raise UserError(f"{model} is not the model that coded the index (its sha256 is {short(found)}, the index "
                        f"records {short(recorded)}): the file was replaced; pass --model {model} to use it on "
                        "purpose, or rebuild the index")
    return encoder
