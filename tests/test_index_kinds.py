"""Index kinds (flat, ivf, hnsw): round trips, recall against exact search on clustered codes, add and merge with
ids kept, damaged or mismatched files, the memory check, and the command line."""

from __future__ import annotations

import numpy as np
import pytest
from cli_support import refused
from test_export_support import checkpoints

from hashdistill.app.cli import INDEX_KINDS, main
from hashdistill.errors import UserError
from hashdistill.search import bounds
from hashdistill.search.index import (
    AUTO_FLAT_BELOW,
    TARGET_RECALL,
    HashIndex,
    build_index,
    choose_kind,
    load_index,
    merge_indexes,
    search_images,
)
from hashdistill.search.index_kinds import KINDS

BITS = 64
KIND_NAMES = list(KINDS)


def clustered(n: int, seed: int, centers: int = 150, flip: float = 0.06) -> np.ndarray:
    """Codes as a trained model makes them: clustered around a few class-like codes, a few bits off each."""
    rng = np.random.default_rng(seed)
    middle = np.random.default_rng(0).integers(0, 2, (centers, BITS), dtype=np.uint8)
    bits = middle[rng.integers(0, centers, n)] ^ (rng.random((n, BITS)) < flip)
    return np.packbits(bits.astype(np.uint8), axis=1)


@pytest.fixture(scope="module")
def database() -> np.ndarray:
    return clustered(6000, seed=1)


@pytest.fixture(scope="module")
def indexes(database, tmp_path_factory) -> dict:
    """kind -> (index of the clustered database, its file)."""
    out = {}
    for kind in KIND_NAMES:
        index = HashIndex(database, BITS, ids=np.arange(5000, 11000), kind=kind)
        out[kind] = index, index.save(tmp_path_factory.mktemp(kind) / "index.npz")
    return out


@pytest.fixture(params=KIND_NAMES)
def built(request, indexes):
    return indexes[request.param]


def tie_aware_recall(index: HashIndex, queries: np.ndarray, k: int) -> float:
    """Fraction of returned entries no farther than the k-th exact neighbour (exact = brute force in numpy)."""
    exact = np.sort(np.bitwise_count(index.codes[None] ^ queries[:, None]).sum(-1), axis=1)[:, k - 1:k]
    distances, rows = index.nearest(queries, k)
    true = np.bitwise_count(index.codes[np.maximum(rows, 0)] ^ queries[:, None]).sum(-1)
    np.testing.assert_array_equal(np.where(rows >= 0, true, distances), distances)  # faiss reports true distances
    return float(np.mean(((rows >= 0) & (true <= exact)).sum(1) / k))


def test_round_trip_gives_identical_results(built):
    index, path = built
    queries = clustered(50, seed=2)
    reloaded = load_index(path)
    assert sorted(index.ids.tolist()) == list(range(5000, 11000))  # held-out rows are added back after measuring
    assert index.recall["queries"] == (0 if index.kind == "flat" else min(1000, 6000 // 10))
    assert reloaded.kind == index.kind and reloaded.structure.params == index.structure.params
    assert reloaded.recall == index.recall
    for a, b in zip(index.search(queries, 20), reloaded.search(queries, 20)):
        np.testing.assert_array_equal(a, b)


def test_results_match_flat_within_the_stated_recall(built):
    index, _ = built
    fresh_queries = clustered(150, seed=3)  # not in the database
    recall = tie_aware_recall(index, fresh_queries, 100)
    stated = index.describe()["recall"]
    if index.kind == "flat":
        assert stated == 1.0 and recall == 1.0
    else:
        assert stated >= TARGET_RECALL and recall >= stated - 0.02, (stated, recall)
        assert [v for v, _ in index.recall["curve"]] == sorted(v for v, _ in index.recall["curve"])
        slowest = index.recall["curve"][0]
        assert slowest[1] <= stated  # the curve trades speed for recall
        assert index.describe(slowest[0])["recall"] == slowest[1]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_a_search_setting_applies_to_one_search_only(indexes, kind):
    index, _ = indexes[kind]
    default = index.describe()["speed"]
    queries = clustered(20, seed=4)
    fast = index.nearest(queries, 50, speed=1)
    assert index.describe()["speed"] == default
    assert tie_aware_recall(index, queries, 50) >= tie_aware_recall_of(index, queries, fast)


def tie_aware_recall_of(index: HashIndex, queries: np.ndarray, result: tuple[np.ndarray, np.ndarray]) -> float:
    distances, rows = result
    exact = np.sort(np.bitwise_count(index.codes[None] ^ queries[:, None]).sum(-1), axis=1)[:, distances.shape[1] - 1:]
    return float(np.mean(((rows >= 0) & (distances <= exact[:, :1])).sum(1) / distances.shape[1]))


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_adding_keeps_ids_and_needs_no_rebuild(database, tmp_path, kind):
    index = HashIndex(database[:4000], BITS, ids=np.arange(100, 4100), kind=kind)
    before = {k: v.copy() for k, v in KINDS[kind].arrays(index.structure).items() if k.startswith("ivf_centroids")}
    index.add(database[4000:], paths=[f"new-{i}" for i in range(2000)])
    assert index.ids[-1] == 4100 + 1999 and len(index) == 6000
    for key, value in before.items():  # IVF keeps its trained buckets
        np.testing.assert_array_equal(KINDS[kind].arrays(index.structure)[key], value)
    reloaded = load_index(index.save(tmp_path / "grown.npz"))
    distances, ids = reloaded.search(database[4000:4010], 1)
    assert (distances[:, 0] == 0).all()
    hit = reloaded.ids == ids[0, 0]
    assert np.bitwise_count(reloaded.codes[hit] ^ database[4000]).sum() == 0
    with pytest.raises(UserError, match="already in the index"):
        index.add(database[:2], ids=np.array([100, 99999]))


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_merging_shards_keeps_ids(database, tmp_path, kind):
    model = {"hash": "abc", "bits": BITS}
    a = HashIndex(database[:3000], BITS, ids=np.arange(3000), model=model, kind=kind).save(tmp_path / "a.npz")
    b = HashIndex(database[3000:], BITS, ids=np.arange(10_000, 13_000), model=model, kind=kind).save(tmp_path / "b.npz")
    merged = merge_indexes([a, b], tmp_path / "m.npz")
    assert merged.kind == kind and len(merged) == 6000
    assert sorted(merged.ids.tolist()) == list(range(3000)) + list(range(10_000, 13_000))
    _, ids = load_index(tmp_path / "m.npz").search(database[[10, 4000]], 1)
    assert ids[:, 0].tolist() == [10, 10_000 + 1000]
    with pytest.raises(UserError, match="appears in more than one shard"):
        merge_indexes([a, a], tmp_path / "dup.npz")
    other = HashIndex(database[:10], BITS, ids=np.arange(50_000, 50_010), model={"hash": "xyz"})
    other = other.save(tmp_path / "o.npz")
    with pytest.raises(UserError, match="only shards encoded by the same model"):
        merge_indexes([a, other], tmp_path / "mixed.npz")


def test_auto_picks_flat_for_small_and_ivf_for_large_databases(database):
    assert choose_kind("auto", AUTO_FLAT_BELOW - 1) == "flat" and choose_kind("auto", AUTO_FLAT_BELOW) == "ivf"
    assert HashIndex(database, BITS, kind="auto").kind == "flat"
    with pytest.raises(UserError, match="unknown index kind"):
        choose_kind("lsh", 10)


def test_the_cli_names_every_kind_of_the_registry():
    assert INDEX_KINDS == ("auto", *KINDS)


def _damaged(path, tmp_path, **changes):
    with np.load(path) as npz:
        fields = {key: npz[key] for key in npz.files}
    fields.update(changes)
    out = tmp_path / "damaged.npz"
    np.savez(out, **fields)
    return out


@pytest.mark.parametrize(("kind", "changes", "expect"), [
    ("ivf", {"ivf_assign": np.full(6000, 10**6, np.int32)}, "IVF assignments must name buckets"),
    ("ivf", {"ivf_centroids": np.zeros((3, 8), np.uint8)}, "IVF arrays must be uint8 centroids"),
    ("ivf", {"params": np.array('{"nlist": 10000000}')}, "nlist must be an integer in"),
    ("hnsw", {"hnsw_neighbors": np.full(10, 7, np.int32)}, "HNSW offsets do not match"),
    ("hnsw", {"hnsw_levels": 40}, "HNSW node levels are out of range"),  # 40 at every node
    ("hnsw", {"hnsw_group": 7}, "HNSW groups do not match the index's codes"),  # every row in group 7
    ("hnsw", {"params": np.array('{"M": "sixteen"}')}, "HNSW parameter M must be an integer"),
    ("flat", {"kind": np.array("lsh")}, "unknown index kind"),
    ("flat", {"recall": np.array("[" * 50_000 + "]" * 50_000)}, "nested too deeply"),
    ("flat", {"codes": np.zeros((6000, 3), np.float32)}, "codes must be uint8"),
])
def test_a_damaged_index_file_exits_2(indexes, tmp_path, capsys, kind, changes, expect):
    _, path = indexes[kind]
    with np.load(path) as npz:  # a scalar stands for "this value everywhere" in an array of the file
        changes = {key: np.full_like(npz[key], value) if np.isscalar(value) else value
                   for key, value in changes.items()}
    damaged = _damaged(path, tmp_path, **changes)
    refused(capsys, tmp_path, "index", "info", damaged, expect=expect)


def test_hnsw_keeps_each_distinct_code_once(tmp_path):
    """Duplicates in bulk (what replicated binary codes are) used to cut HNSW's recall to a fifth."""
    codes = np.repeat(clustered(300, seed=5), 40, axis=0)  # 12,000 rows, 300 distinct codes
    index = HashIndex(codes, BITS, kind="hnsw")
    assert index.structure.groups.count == 300 and index.structure.index.ntotal == 300
    assert index.describe()["recall"] >= TARGET_RECALL
    queries = clustered(50, seed=6)
    assert tie_aware_recall(index, queries, 100) >= TARGET_RECALL
    index.add(np.concatenate([codes[:5], clustered(3, seed=7)]))  # 5 known codes, 3 new ones
    assert index.structure.groups.count == 303 and index.structure.index.ntotal == 303
    reloaded = load_index(index.save(tmp_path / "dups.npz"))
    for a, b in zip(index.search(queries, 100), reloaded.search(queries, 100)):
        np.testing.assert_array_equal(a, b)


def test_hnsw_links_out_of_range(indexes, tmp_path, capsys):
    _, path = indexes["hnsw"]
    with np.load(path) as npz:
        neighbors = npz["hnsw_neighbors"].copy()
    neighbors[5] = 123_456
    refused(capsys, tmp_path, "index", "info", _damaged(path, tmp_path, hnsw_neighbors=neighbors),
            expect="HNSW links must name nodes")


def test_hnsw_links_must_respect_levels(indexes, tmp_path, capsys):
    """faiss reads a linked node's slots at the link's level unchecked: a link to a lower node reads out of bounds."""
    _, path = indexes["hnsw"]
    with np.load(path) as npz:
        levels, offsets, neighbors = npz["hnsw_levels"], npz["hnsw_offsets"], npz["hnsw_neighbors"].copy()
    high = int(np.flatnonzero(levels >= 2)[0])
    low = int(np.flatnonzero(levels == 1)[0])
    neighbors[int(offsets[high]) + 32] = low  # the first level-1 slot (M=16: 32 level-0 slots first)
    refused(capsys, tmp_path, "index", "info", _damaged(path, tmp_path, hnsw_neighbors=neighbors),
            expect="links at a level to a node that does not reach it")


@pytest.mark.parametrize(("recall", "kind"), [
    ('{"k": 100, "queries": 200, "curve": [[16, 0.9]], "default": 2147483647}', "hnsw"),
    ('{"k": 100, "curve": 5, "default": null}', "ivf"),
    ('{"k": "100", "curve": [[4, 0.99]], "default": 4}', "ivf"),
    ('{"k": 100, "curve": [[4, "high"]], "default": 4}', "ivf"),
])
def test_a_damaged_recall_record_exits_2(indexes, tmp_path, capsys, recall, kind):
    _, path = indexes[kind]
    refused(capsys, tmp_path, "index", "info", _damaged(path, tmp_path, recall=np.array(recall)),
            expect="the recall record is corrupt")


def test_build_parameters_are_never_silently_replaced(database):
    with pytest.raises(UserError, match="needs 1 <= nlist"):
        HashIndex(database, BITS, kind="ivf", params={"nlist": 0})
    with pytest.raises(UserError, match="M must be in"):
        HashIndex(database, BITS, kind="hnsw", params={"M": 0})
    with pytest.raises(UserError, match="are for an approximate index, but this one is flat"):
        HashIndex(database, BITS, kind="auto", params={"nlist": 8})


def test_an_index_larger_than_memory_is_refused_before_loading(indexes, tmp_path, monkeypatch, capsys):
    _, path = indexes["hnsw"]
    monkeypatch.setattr(bounds, "available_memory", lambda: 1000)
    refused(capsys, tmp_path, "index", "info", path, expect="GiB of memory to load, and 0.0 GiB are available")


def test_cli_builds_grows_merges_and_searches_every_kind(export_root, student_onnx, tmp_path, capsys):
    ckpts = checkpoints(export_root)
    shard_a, shard_b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main(["index", "build", str(ckpts.teacher), "synthetic:train", "-o", str(shard_a), "--kind", "hnsw",
                 "--hnsw-m", "8"]) == 0
    out = capsys.readouterr().out
    assert "index: hnsw (M=8, efConstruction=40), efSearch=" in out and "measured at build" in out
    assert main(["index", "build", str(ckpts.teacher), "synthetic:test", "-o", str(shard_b), "--kind", "hnsw",
                 "--first-id", "100000"]) == 0
    assert main(["index", "merge", str(shard_a), str(shard_b), "-o", str(tmp_path / "m.npz"), "--kind", "ivf"]) == 0
    assert "merged 2 shards" in capsys.readouterr().out
    assert main(["index", "add", str(tmp_path / "m.npz"), "synthetic:val"]) == 0
    assert "added" in capsys.readouterr().out
    merged = load_index(tmp_path / "m.npz")
    assert merged.kind == "ivf" and merged.ids.max() > 100_000
    # the teacher-built database answers the student's ONNX queries (asymmetric retrieval) with every kind
    result = search_images(merged, "synthetic:test", k=5, model=student_onnx, speed=2)
    assert result.distances.shape == (len(result), 5)
    query = tmp_path / "q.png"
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(query)
    assert main(["index", "search", str(tmp_path / "m.npz"), str(query), "--nprobe", "3", "-k", "2"]) == 0
    assert "nprobe=3" in capsys.readouterr().out
    refused(capsys, tmp_path, "index", "search", tmp_path / "m.npz", query, "--ef-search", "8",
            expect="--ef-search applies to hnsw indexes; this one is ivf")
    refused(capsys, tmp_path, "index", "build", ckpts.teacher, "synthetic:test", "-o", tmp_path / "x.npz",
            "--kind", "flat", "--nlist", "4", expect="--nlist applies to --kind ivf or auto")


def test_build_index_records_kind_and_recall(export_root, tmp_path):
    index = build_index(checkpoints(export_root).teacher, "synthetic:database", tmp_path / "i.npz", kind="ivf",
                        params={"nlist": 4})
    info = load_index(tmp_path / "i.npz").describe()
    assert info["kind"] == "ivf" and info["params"] == {"nlist": 4} and 0 <= info["recall"] <= 1
    assert info["bytes_per_item"] > index.codes.shape[1] + 16


def _inflating(path, out, rows: int, members: tuple[str, ...] = ("codes", "ids", "labels", "paths")):
    """``path``'s index with ``members`` declaring ``rows`` rows of zeros each, written in chunks (the file stays
    small: zeros deflate 1000-fold); the other members as they were."""
    import zipfile

    from numpy.lib import format as npy

    with np.load(path) as npz:
        fields = {key: npz[key] for key in npz.files}
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in fields.items():
            if key not in members:
                with archive.open(f"{key}.npy", "w") as fh:
                    npy.write_array(fh, value, allow_pickle=False)
                continue
            shape = (rows, *value.shape[1:])
            with archive.open(f"{key}.npy", "w", force_zip64=True) as fh:
                npy.write_array_header_1_0(fh, {"descr": npy.dtype_to_descr(value.dtype), "fortran_order": False,
                                                "shape": shape})
                left = int(np.prod(shape)) * value.dtype.itemsize
                chunk = bytes(1 << 22)
                while left:
                    fh.write(chunk[:min(left, len(chunk))])
                    left -= min(left, len(chunk))
    return out


def test_a_compressed_member_is_checked_before_it_is_inflated(indexes, tmp_path, capsys, monkeypatch):
    """A small file whose codes inflate to far more rows than its ids, whose members agree but declare far more
    than its size on disk allows (the ratio cap), or, within the cap, more than the memory available, is refused
    from the members' headers alone, in index info and index merge, without inflating."""
    import tracemalloc

    _, path = indexes["flat"]
    codes_only = _inflating(path, tmp_path / "codes.npz", rows=40_000_000, members=("codes",))  # 120 MB of codes
    bomb = _inflating(path, tmp_path / "rows.npz", rows=4_000_000)  # 120 MB in all, consistent rows
    within_cap = _inflating(path, tmp_path / "within.npz", rows=1_000_000)  # 30 MB: under the cap's allowance
    assert codes_only.stat().st_size < 2_000_000 and bomb.stat().st_size < 2_000_000
    assert bounds.MAX_INFLATION * bomb.stat().st_size + bounds.ALLOWANCE < 120_000_000
    tracemalloc.start()
    for crafted, expect in ((codes_only, "cannot hold"), (bomb, "times its"), (within_cap, "GiB of memory to load")):
        if crafted is within_cap:
            monkeypatch.setattr(bounds, "available_memory", lambda: 20_000_000)
        for argv in (["index", "info", crafted], ["index", "merge", crafted, path, "-o", tmp_path / "merged.npz"]):
            refused(capsys, tmp_path, *argv, expect=expect)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20_000_000  # none of the 120 MB was inflated


def test_a_real_index_deflated_stays_well_under_the_ratio_cap(indexes, tmp_path):
    """The cap is far from what real indexes reach: hashdistill stores members uncompressed, and a deflated copy
    (all-zero codes included) still loads."""
    import zipfile

    for kind, (index, path) in indexes.items():
        with np.load(path) as npz:
            fields = {key: npz[key] for key in npz.files}
        zeros = {**fields, "codes": np.zeros_like(fields["codes"])} if kind == "flat" else fields
        deflated = tmp_path / f"{kind}.npz"
        np.savez_compressed(deflated, **zeros)
        for file in (path, deflated):
            with zipfile.ZipFile(file) as archive:
                inflated = sum(info.file_size for info in archive.infolist())
            assert inflated / file.stat().st_size < bounds.MAX_INFLATION / 4
        assert len(load_index(deflated)) == len(index)


def test_a_member_declaring_more_rows_than_the_codes_is_refused_unread(indexes, tmp_path, capsys):
    import zipfile

    from numpy.lib import format as npy

    _, path = indexes["flat"]
    with np.load(path) as npz:
        fields = {key: npz[key] for key in npz.files}
    out = tmp_path / "lying.npz"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in fields.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as fh:
                if key == "labels":  # declares a billion rows, holds six thousand
                    npy.write_array_header_1_0(fh, {"descr": "<i8", "fortran_order": False, "shape": (10**9,)})
                    fh.write(value.tobytes())
                else:
                    npy.write_array(fh, value, allow_pickle=False)
    refused(capsys, tmp_path, "index", "info", out, expect="zip entry holds")


def test_index_info_shows_the_curve_and_how_it_was_measured(indexes, capsys):
    index, path = indexes["ivf"]
    assert main(["index", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"measured at build on {index.recall['queries']} queries (held-out rows with 1 to bits/16" in out
    assert "less 2 standard errors reaches 0.99" in out and out.count("<- default") == 1
    default = index.recall["default"]
    curve = dict(map(tuple, index.recall["curve"]))
    errors = dict(zip(curve, index.recall["standard_errors"]))
    assert curve[default] - 2 * errors[default] >= TARGET_RECALL  # the margin the default keeps
    cheaper = [v for v in curve if v < default]
    assert all(curve[v] - 2 * errors[v] < TARGET_RECALL for v in cheaper)  # and it is the cheapest that does
