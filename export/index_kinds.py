"""Search structures over packed codes, by name: exact ``flat``, and the approximate ``ivf`` and ``hnsw`` from faiss.

Each kind builds a faiss binary index whose stored ids are row positions (``HashIndex`` maps rows to the
user's ids), turns its trained state into plain numpy arrays for the index file, and rebuilds itself from
them. Why arrays and not faiss's own serialisation: the file comes from the user, and faiss's readers trust
the sizes they read. Arrays come through ``np.load(allow_pickle=False)`` and are checked here (dtype, shape,
range and consistency with the codes) before faiss sees them, so a file cannot ask for more than it holds.

- ``flat``: ``IndexBinaryFlat``, exact; linear in the database.
- ``ivf``: ``IndexBinaryIVF``, codes bucketed by their nearest of ``nlist`` centroids (k-means on a sample);
  a query scans the ``nprobe`` nearest buckets. Stored: centroids and each row's bucket (adding rows later
  needs no retraining).
- ``hnsw``: ``IndexBinaryHNSW``, a navigable small-world graph with ``M`` links per node; a query explores
  ``efSearch`` candidates. Stored: the graph (levels, offsets, neighbours, entry point).

Multi-index hashing (``IndexBinaryMultiHash``) is not offered: it falls apart on codes clustered around class
codes, which is exactly what these codes are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from hashdistill.errors import UserError

# One row's bytes in faiss's own structures, beyond the packed code and the HashIndex columns.
IVF_EXTRA_BYTES_PER_ITEM = 8  # the row id stored in its inverted list (the code is stored there too)
MAX_HNSW_LEVELS = 32


def default_nlist(n: int) -> int:
    """About 2 * sqrt(n) buckets (a power of two), with at least 39 training codes per bucket (faiss's floor)."""
    target = 2 ** round(math.log2(max(2.0 * math.sqrt(max(n, 1)), 1.0)))
    return int(max(1, min(target, n // 39, 65536)))


@dataclass
class SearchStructure:
    """A built faiss index plus what it needs to stay alive (IVF's coarse quantizer) and its parameters."""

    kind: str
    index: Any
    params: dict[str, int]
    keep_alive: Any = None

    def set_speed(self, value: int | None) -> int | None:
        """Set nprobe (ivf) or efSearch (hnsw); returns the value in force (None for flat)."""
        spec = KINDS[self.kind]
        if spec.speed_param is None:
            return None
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{spec.speed_param} must be a positive integer, got {value!r}")
            if self.kind == "ivf":
                value = min(value, self.params["nlist"])
            setattr(self._speed_target(), spec.speed_param, value)
        return int(getattr(self._speed_target(), spec.speed_param))

    def _speed_target(self) -> Any:
        return self.index.hnsw if self.kind == "hnsw" else self.index


class FlatKind:
    name, speed_param, speed_values = "flat", None, ()

    def build(self, codes: np.ndarray, params: dict[str, int], rng: np.random.Generator) -> SearchStructure:
        return self.restore(codes, params, {})

    def arrays(self, built: SearchStructure) -> dict[str, np.ndarray]:
        return {}

    def restore(self, codes: np.ndarray, params: dict[str, int], arrays: dict[str, np.ndarray]) -> SearchStructure:
        index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
        index.add(codes)
        return SearchStructure(self.name, index, {})

    def extra_bytes_per_item(self, params: dict[str, int]) -> float:
        return 0.0


class IVFKind:
    name, speed_param, speed_values = "ivf", "nprobe", (1, 2, 4, 8, 16, 32, 64, 128, 256)
    TRAIN_PER_LIST = 64  # training sample: 64 codes per bucket (faiss warns below 39)

    def build(self, codes: np.ndarray, params: dict[str, int], rng: np.random.Generator) -> SearchStructure:
        n = len(codes)
        nlist = params.get("nlist") or default_nlist(n)
        if not 1 <= nlist <= n:
            raise UserError(f"an IVF index of {n} codes needs 1 <= nlist <= {n}, got {nlist}")
        quantizer = faiss.IndexBinaryFlat(codes.shape[1] * 8)
        index = faiss.IndexBinaryIVF(quantizer, codes.shape[1] * 8, nlist)
        sample = min(n, self.TRAIN_PER_LIST * nlist)
        index.train(codes[np.sort(rng.choice(n, sample, replace=False))] if sample < n else codes)
        index.add(codes)
        return SearchStructure(self.name, index, {"nlist": int(nlist)}, keep_alive=quantizer)

    def arrays(self, built: SearchStructure) -> dict[str, np.ndarray]:
        index, quantizer = built.index, built.keep_alive
        width = index.code_size
        assign = np.empty(index.ntotal, dtype=np.int32)
        lists = index.invlists
        for bucket in range(index.nlist):
            size = lists.list_size(bucket)
            if size:
                assign[faiss.rev_swig_ptr(lists.get_ids(bucket), size)] = bucket
        centroids = faiss.vector_to_array(quantizer.xb).reshape(index.nlist, width)
        return {"ivf_centroids": centroids, "ivf_assign": assign}

    def restore(self, codes: np.ndarray, params: dict[str, int], arrays: dict[str, np.ndarray]) -> SearchStructure:
        n, width = codes.shape
        nlist = params.get("nlist")
        centroids, assign = arrays.get("ivf_centroids"), arrays.get("ivf_assign")
        if not isinstance(nlist, int) or isinstance(nlist, bool) or not 1 <= nlist <= max(n, 1):
            raise UserError(f"IVF parameter nlist must be an integer in [1, {max(n, 1)}], got {nlist!r}")
        if not _array(centroids, np.uint8, (nlist, width)) or not _array(assign, np.int32, (n,)):
            raise UserError(f"IVF arrays must be uint8 centroids ({nlist}, {width}) and int32 assignments ({n},)")
        if n and (assign.min() < 0 or assign.max() >= nlist):
            raise UserError(f"IVF assignments must name buckets 0..{nlist - 1}")
        quantizer = faiss.IndexBinaryFlat(width * 8)
        quantizer.add(np.ascontiguousarray(centroids))
        index = faiss.IndexBinaryIVF(quantizer, width * 8, nlist)
        index.is_trained = True
        if n:
            rows = np.arange(n, dtype=np.int64)
            buckets = np.ascontiguousarray(assign, dtype=np.int64)
            index.add_core(n, faiss.swig_ptr(codes), faiss.swig_ptr(rows), faiss.swig_ptr(buckets))
        return SearchStructure(self.name, index, {"nlist": nlist}, keep_alive=quantizer)

    def extra_bytes_per_item(self, params: dict[str, int]) -> float:
        return IVF_EXTRA_BYTES_PER_ITEM


class HNSWKind:
    name, speed_param, speed_values = "hnsw", "efSearch", (16, 32, 64, 128, 256, 512)

    def build(self, codes: np.ndarray, params: dict[str, int], rng: np.random.Generator) -> SearchStructure:
        m = params.get("M") or 16
        if not 2 <= m <= 256:
            raise UserError(f"HNSW parameter M must be in [2, 256], got {m}")
        index = faiss.IndexBinaryHNSW(codes.shape[1] * 8, m)
        index.hnsw.efConstruction = params.get("efConstruction") or 40
        index.add(codes)
        return SearchStructure(self.name, index, {"M": int(m), "efConstruction": int(index.hnsw.efConstruction)})

    def arrays(self, built: SearchStructure) -> dict[str, np.ndarray]:
        graph = built.index.hnsw
        return {"hnsw_levels": faiss.vector_to_array(graph.levels).astype(np.int32),
                "hnsw_offsets": faiss.vector_to_array(graph.offsets).astype(np.uint64),
                "hnsw_neighbors": faiss.vector_to_array(graph.neighbors).astype(np.int32),
                "hnsw_entry": np.array([graph.entry_point, graph.max_level], dtype=np.int64)}

    def restore(self, codes: np.ndarray, params: dict[str, int], arrays: dict[str, np.ndarray]) -> SearchStructure:
        n, width = codes.shape
        m = params.get("M")
        if not isinstance(m, int) or isinstance(m, bool) or not 2 <= m <= 256:
            raise UserError(f"HNSW parameter M must be an integer in [2, 256], got {m!r}")
        index = faiss.IndexBinaryHNSW(width * 8, m)
        graph = index.hnsw
        graph.efConstruction = int(params.get("efConstruction") or 40)
        levels, offsets = arrays.get("hnsw_levels"), arrays.get("hnsw_offsets")
        neighbors, entry = arrays.get("hnsw_neighbors"), arrays.get("hnsw_entry")
        if not (_array(levels, np.int32, (n,)) and _array(offsets, np.uint64, (n + 1,))
                and _array(neighbors, np.int32, None) and _array(entry, np.int64, (2,))):
            raise UserError("HNSW arrays are missing or of the wrong type or length")
        per_level = faiss.vector_to_array(graph.cum_nneighbor_per_level)
        if n and (levels.min() < 1 or levels.max() >= min(len(per_level), MAX_HNSW_LEVELS)):
            raise UserError("HNSW node levels are out of range")
        expected = np.concatenate([[0], np.cumsum(per_level[levels] if n else [], dtype=np.uint64)])
        if not np.array_equal(offsets, expected.astype(np.uint64)) or len(neighbors) != int(offsets[-1]):
            raise UserError("HNSW offsets do not match the node levels")
        if len(neighbors) and (neighbors.min() < -1 or neighbors.max() >= n):
            raise UserError(f"HNSW links must name nodes 0..{n - 1} (or -1)")
        entry_point, max_level = (int(v) for v in entry)
        if n and not (0 <= entry_point < n and max_level == levels[entry_point] - 1):
            raise UserError("HNSW entry point is inconsistent with the graph")
        faiss.downcast_IndexBinary(index.storage).add(codes)
        index.ntotal = n
        faiss.copy_array_to_vector(levels, graph.levels)
        faiss.copy_array_to_vector(offsets, graph.offsets)
        faiss.copy_array_to_vector(neighbors, graph.neighbors)
        graph.entry_point, graph.max_level = (entry_point, max_level) if n else (-1, -1)
        return SearchStructure(self.name, index, {"M": m, "efConstruction": int(graph.efConstruction)})

    def extra_bytes_per_item(self, params: dict[str, int]) -> float:
        # levels (4) + offsets (8) + links: 2M at level 0 plus M per upper level, about 1/M nodes reach level 1.
        m = params["M"]
        return 4 + 8 + 4 * (2 * m + m / max(m - 1, 1))


KINDS: dict[str, FlatKind | IVFKind | HNSWKind] = {kind.name: kind for kind in (FlatKind(), IVFKind(), HNSWKind())}
ARRAY_KEYS = ("ivf_centroids", "ivf_assign", "hnsw_levels", "hnsw_offsets", "hnsw_neighbors", "hnsw_entry")


def _array(value: Any, dtype: type, shape: tuple[int, ...] | None) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == dtype and (
        value.ndim == 1 if shape is None else value.shape == shape)
