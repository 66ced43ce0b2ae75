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
  ``efSearch`` candidates. The graph holds each *distinct* code once, with the rows that share it: binary
  codes repeat in bulk (a catalogue of photos of the same products), and a graph over duplicates loses
  its way (measured: recall@100 0.16-0.19 at 1M replicated student codes, whatever efSearch). Stored: the
  distinct codes, each row's distinct code, and the graph (levels, offsets, neighbours, entry point).

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

MAX_HNSW_LEVELS = 32
MAX_EF_CONSTRUCTION = 4096


def default_nlist(n: int) -> int:
    """About 2 * sqrt(n) buckets (a power of two), with at least 39 training codes per bucket (faiss's floor)."""
    target = 2 ** round(math.log2(max(2.0 * math.sqrt(max(n, 1)), 1.0)))
    return int(max(1, min(target, n // 39, 65536)))


@dataclass
class SearchStructure:
    """A built faiss index, its parameters, and what it needs besides: IVF's coarse quantizer (kept alive),
    HNSW's distinct codes (``groups``)."""

    kind: str
    index: Any
    params: dict[str, int]
    keep_alive: Any = None
    groups: CodeGroups | None = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances and row positions of the k nearest rows per query (-1 where fewer were found)."""
        if self.groups is None:
            return self.index.search(queries, k)
        distances, groups = self.index.search(queries, min(k, self.groups.count))
        return self.groups.expand(distances, groups, k)

    def add(self, codes: np.ndarray) -> None:
        """Index new rows, appended after the existing ones."""
        if self.groups is None:
            self.index.add(codes)
        else:
            fresh = self.groups.add(codes)
            if len(fresh):
                self.index.add(fresh)

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
            elif self.kind == "hnsw":  # exploring more candidates than there are nodes buys nothing
                value = min(value, max(self.groups.count, 1))
            setattr(self._speed_target(), spec.speed_param, value)
        return int(getattr(self._speed_target(), spec.speed_param))

    def _speed_target(self) -> Any:
        return self.index.hnsw if self.kind == "hnsw" else self.index


class CodeGroups:
    """Rows grouped by identical code: ``distinct`` codes (u, width) and each row's group, in order of rows."""

    def __init__(self, distinct: np.ndarray, group_of_row: np.ndarray):
        self.distinct = np.ascontiguousarray(distinct)
        self.group_of_row = np.ascontiguousarray(group_of_row, dtype=np.int64)
        self._lookup: dict[bytes, int] | None = None
        self._csr: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def of(cls, codes: np.ndarray) -> CodeGroups:
        keys = codes.view(np.dtype((np.void, codes.shape[1]))).ravel()
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # groups numbered by first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return cls(codes[first[order]], rank[inverse.ravel()])

    @property
    def count(self) -> int:
        return len(self.distinct)

    def add(self, codes: np.ndarray) -> np.ndarray:
        """Group new rows; returns the codes not seen before (they become new groups, in order)."""
        if self._lookup is None:
            self._lookup = {row.tobytes(): g for g, row in enumerate(self.distinct)}
        groups, fresh = np.empty(len(codes), dtype=np.int64), []
        for i, row in enumerate(codes):
            key = row.tobytes()
            if key not in self._lookup:
                self._lookup[key] = self.count + len(fresh)
                fresh.append(row)
            groups[i] = self._lookup[key]
        fresh_codes = np.array(fresh, dtype=np.uint8).reshape(-1, codes.shape[1])
        self.distinct = np.concatenate([self.distinct, fresh_codes])
        self.group_of_row = np.concatenate([self.group_of_row, groups])
        self._csr = None
        return fresh_codes

    def expand(self, distances: np.ndarray, groups: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest groups -> nearest rows: each group's rows in row order, the first k rows per query."""
        if self._csr is None:
            order = np.argsort(self.group_of_row, kind="stable")
            starts = np.searchsorted(self.group_of_row[order], np.arange(self.count + 1))
            self._csr = order, starts
        order, starts = self._csr
        found = groups >= 0
        safe = np.where(found, groups, 0)
        sizes = np.where(found, starts[safe + 1] - starts[safe], 0)
        before = np.cumsum(sizes, axis=1) - sizes
        take = np.clip(k - before, 0, sizes)
        q, per_query = np.nonzero(take)
        counts = take[q, per_query]
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        query = np.repeat(q, counts)
        slot = np.repeat(before[q, per_query], counts) + offsets
        rows_out = np.full((len(groups), k), -1, dtype=np.int64)
        dist_out = np.full((len(groups), k), np.iinfo(np.int32).max, dtype=distances.dtype)
        rows_out[query, slot] = order[np.repeat(starts[safe[q, per_query]], counts) + offsets]
        dist_out[query, slot] = np.repeat(distances[q, per_query], counts)
        return dist_out, rows_out


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

    def extra_bytes_per_item(self, built: SearchStructure) -> float:
        return built.index.code_size  # faiss's own copy of every code


class IVFKind:
    name, speed_param, speed_values = "ivf", "nprobe", (1, 2, 4, 8, 16, 32, 64, 128, 256)
    TRAIN_PER_LIST = 64  # training sample: 64 codes per bucket (faiss warns below 39)

    def build(self, codes: np.ndarray, params: dict[str, int], rng: np.random.Generator) -> SearchStructure:
        n = len(codes)
        nlist = params.get("nlist")
        nlist = default_nlist(n) if nlist is None else nlist
        if not 1 <= nlist <= n:
            raise UserError(f"an IVF index built on {n} codes (the rows less a held-out sample that measures recall) "
                            f"needs 1 <= nlist <= {n}, got {nlist}")
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

    def extra_bytes_per_item(self, built: SearchStructure) -> float:
        return built.index.code_size + 8  # each inverted list stores the code and its row id


class HNSWKind:
    name, speed_param, speed_values = "hnsw", "efSearch", (16, 32, 64, 128, 256, 512)

    def build(self, codes: np.ndarray, params: dict[str, int], rng: np.random.Generator) -> SearchStructure:
        m, construction = params.get("M", 16), params.get("efConstruction", 40)
        if not 2 <= m <= 256:
            raise UserError(f"HNSW parameter M must be in [2, 256], got {m}")
        if not 1 <= construction <= MAX_EF_CONSTRUCTION:
            raise UserError(f"HNSW parameter efConstruction must be in [1, {MAX_EF_CONSTRUCTION}], got {construction}")
        groups = CodeGroups.of(codes)
        index = faiss.IndexBinaryHNSW(codes.shape[1] * 8, m)
        index.hnsw.efConstruction = construction
        index.add(groups.distinct)
        return SearchStructure(self.name, index, {"M": int(m), "efConstruction": int(index.hnsw.efConstruction)},
                               groups=groups)

    def arrays(self, built: SearchStructure) -> dict[str, np.ndarray]:
        graph = built.index.hnsw
        return {"hnsw_distinct": built.groups.distinct, "hnsw_group": built.groups.group_of_row,
                "hnsw_levels": faiss.vector_to_array(graph.levels).astype(np.int32),
                "hnsw_offsets": faiss.vector_to_array(graph.offsets).astype(np.uint64),
                "hnsw_neighbors": faiss.vector_to_array(graph.neighbors).astype(np.int32),
                "hnsw_entry": np.array([graph.entry_point, graph.max_level], dtype=np.int64)}

    def restore(self, codes: np.ndarray, params: dict[str, int], arrays: dict[str, np.ndarray]) -> SearchStructure:
        n, width = codes.shape
        m = params.get("M")
        if not isinstance(m, int) or isinstance(m, bool) or not 2 <= m <= 256:
            raise UserError(f"HNSW parameter M must be an integer in [2, 256], got {m!r}")
        distinct, group = arrays.get("hnsw_distinct"), arrays.get("hnsw_group")
        if not (isinstance(distinct, np.ndarray) and distinct.dtype == np.uint8 and distinct.ndim == 2
                and distinct.shape[1] == width and len(distinct) <= n and _array(group, np.int64, (n,))):
            raise UserError(f"HNSW arrays must be distinct uint8 codes (u, {width}) and int64 groups ({n},)")
        u = len(distinct)
        if n and (group.min() < 0 or group.max() >= u or not np.array_equal(distinct[group], codes)):
            raise UserError("HNSW groups do not match the index's codes")
        construction = params.get("efConstruction", 40)
        if not isinstance(construction, int) or isinstance(construction, bool) or \
                not 1 <= construction <= MAX_EF_CONSTRUCTION:
            raise UserError(f"HNSW parameter efConstruction must be an integer in [1, {MAX_EF_CONSTRUCTION}], "
                            f"got {construction!r}")
        index = faiss.IndexBinaryHNSW(width * 8, m)
        graph = index.hnsw
        graph.efConstruction = construction
        levels, offsets = arrays.get("hnsw_levels"), arrays.get("hnsw_offsets")
        neighbors, entry = arrays.get("hnsw_neighbors"), arrays.get("hnsw_entry")
        if not (_array(levels, np.int32, (u,)) and _array(offsets, np.uint64, (u + 1,))
                and _array(neighbors, np.int32, None) and _array(entry, np.int64, (2,))):
            raise UserError("HNSW arrays are missing or of the wrong type or length")
        per_level = faiss.vector_to_array(graph.cum_nneighbor_per_level)
        if u and (levels.min() < 1 or levels.max() >= min(len(per_level), MAX_HNSW_LEVELS)):
            raise UserError("HNSW node levels are out of range")
        expected = np.concatenate([[0], np.cumsum(per_level[levels] if u else [], dtype=np.uint64)])
        if not np.array_equal(offsets, expected.astype(np.uint64)) or len(neighbors) != int(offsets[-1]):
            raise UserError("HNSW offsets do not match the node levels")
        if len(neighbors) and (neighbors.min() < -1 or neighbors.max() >= u):
            raise UserError(f"HNSW links must name nodes 0..{u - 1} (or -1)")
        _check_link_levels(levels, offsets, neighbors, per_level)
        entry_point, max_level = (int(v) for v in entry)
        if u and not (0 <= entry_point < u and max_level == levels[entry_point] - 1):
            raise UserError("HNSW entry point is inconsistent with the graph")
        faiss.downcast_IndexBinary(index.storage).add(np.ascontiguousarray(distinct))
        index.ntotal = u
        faiss.copy_array_to_vector(levels, graph.levels)
        faiss.copy_array_to_vector(offsets, graph.offsets)
        faiss.copy_array_to_vector(neighbors, graph.neighbors)
        graph.entry_point, graph.max_level = (entry_point, max_level) if u else (-1, -1)
        return SearchStructure(self.name, index, {"M": m, "efConstruction": int(graph.efConstruction)},
                               groups=CodeGroups(distinct, group))

    def extra_bytes_per_item(self, built: SearchStructure) -> float:
        # per row: its group (8) and its place in the group table (8); per distinct code: the code, its level (4),
        # offset (8) and links (2M at level 0, M more per upper level, which about 1/M of the nodes reach).
        m, groups = built.params["M"], built.groups
        per_node = built.index.code_size + 4 + 8 + 4 * (2 * m + m / max(m - 1, 1))
        return 16 + per_node * groups.count / max(len(groups.group_of_row), 1)


KINDS: dict[str, FlatKind | IVFKind | HNSWKind] = {kind.name: kind for kind in (FlatKind(), IVFKind(), HNSWKind())}
ARRAY_KEYS = ("ivf_centroids", "ivf_assign", "hnsw_distinct", "hnsw_group", "hnsw_levels", "hnsw_offsets",
              "hnsw_neighbors", "hnsw_entry")


def _check_link_levels(levels: np.ndarray, offsets: np.ndarray, neighbors: np.ndarray, per_level: np.ndarray,
                       slots_per_chunk: int = 1 << 22) -> None:
    """A link in a node's level-l slots must name a node that reaches level l: faiss reads that node's level-l
    slots without checking, so a crafted graph would make it read past the end of the links.

    Works through the nodes in chunks of about ``slots_per_chunk`` links (a few int64 arrays of that size)."""
    widest = int(per_level[levels.max()]) if len(levels) else 1
    chunk = max(1, slots_per_chunk // max(widest, 1))
    for start in range(0, len(levels), chunk):
        nodes = np.arange(start, min(start + chunk, len(levels)))
        sizes = (offsets[nodes + 1] - offsets[nodes]).astype(np.int64)
        node = np.repeat(nodes, sizes)
        within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        slot_level = np.searchsorted(per_level, within, side="right") - 1
        links = neighbors[int(offsets[nodes[0]]): int(offsets[nodes[-1] + 1])]
        named = links >= 0
        if (levels[links[named]] <= slot_level[named]).any():
            bad = int(node[named][np.argmax(levels[links[named]] <= slot_level[named])])
            raise UserError(f"HNSW node {bad} links at a level to a node that does not reach it")


def _array(value: Any, dtype: type, shape: tuple[int, ...] | None) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == dtype and (
        value.ndim == 1 if shape is None else value.shape == shape)
