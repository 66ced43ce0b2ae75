"""Search past one flat index: queries/s and recall@100 of flat, IVF and HNSW binary indexes at 100k to 10M codes.

    python benchmarks/search.py --model-run bench_out/search-model --out benchmarks/results/search.json

The codes are a trained student's: the quickstart recipe's teacher and student at 64 bits
(``hashdistill run quickstart --set teacher.bits=64 --stages teacher,student --out bench_out/search-model``),
encoding scikit-learn's digits. Its codes of the database (train + val) are replicated to N items by
drawing a real code at random and flipping each bit independently with probability ``--flip`` (so items
cluster around real codes, as a catalogue of many photos of the same products would); the queries are
its codes of the test split under the same noise: fresh queries, never database rows. recall@100 counts a
returned item as right when it is no farther than the 100th exact neighbour (ties make "the" exact top 100
ambiguous), exact = IndexBinaryFlat. Every timing in one process, the same 2 threads, median of 3 passes over the
queries. Each approximate index chooses its own default setting when it is built (``HashIndex``: held-out rows
with bits flipped, a margin of two standard errors); the figures at that default are the ones a user gets.

Milvus Lite (BIN_FLAT, exact) answers the same queries over the first ``--milvus-items`` codes: its recall against
faiss's flat search, tie-aware, and its queries/s beside faiss's on the same codes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from common import machine, print_table, write_json

from hashdistill.codes import pack_codes
from hashdistill.data import build_dataset
from hashdistill.distill.models import load_model
from hashdistill.evaluate import torch_encoder
from hashdistill.recipe import load_recipe
from hashdistill.search.index import RECALL_QUERIES, HashIndex, tie_aware_recall


def student_codes(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """The trained student's packed codes of the digits database (train + val) and of the test split."""
    recipe = load_recipe(run / "recipe.yaml")
    model, _ = load_model(str(run / "checkpoints" / "student.safetensors"))
    encode = torch_encoder(model, torch.device("cpu"))
    parts = {split: pack_codes(encode(build_dataset(recipe.data, split))) for split in ("train", "val", "test")}
    return np.concatenate([parts["train"], parts["val"]]), parts["test"]


def replicate(codes: np.ndarray, n: int, flip: float, rng: np.random.Generator, chunk: int = 1_000_000) -> np.ndarray:
    """n codes: each a random row of ``codes`` with every bit flipped with probability ``flip``."""
    out = np.empty((n, codes.shape[1]), dtype=np.uint8)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        bits = np.unpackbits(codes[rng.integers(0, len(codes), size)], axis=1)
        bits ^= (rng.random(bits.shape, dtype=np.float32) < flip).astype(np.uint8)
        out[start:start + size] = np.packbits(bits, axis=1)
    return out


def queries_per_s(index, queries: np.ndarray, k: int) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        index.search(queries, k)
        times.append(time.perf_counter() - start)
    return len(queries) / float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-run", default="bench_out/search-model")
    parser.add_argument("--out", default="benchmarks/results/search.json")
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--hnsw-max", type=int, default=10_000_000, help="largest size HNSW is built at (build time)")
    parser.add_argument("--flip", type=float, default=0.03)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--milvus-items", type=int, default=1_000_000,
                        help="codes the Milvus Lite comparison holds (0 skips it)")
    args = parser.parse_args()
    started = time.time()
    faiss.omp_set_num_threads(2)
    database_codes, test_codes = student_codes(Path(args.model_run))
    bits = database_codes.shape[1] * 8
    rng = np.random.default_rng(0)
    queries = replicate(test_codes, len(test_codes), args.flip, rng)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        database = replicate(database_codes, n, args.flip, rng)
        start = time.perf_counter()
        flat = HashIndex(database, bits, kind="flat")
        flat_build = time.perf_counter() - start
        flat_qps = queries_per_s(flat.structure, queries, args.k)
        kth = flat.structure.search(queries, args.k)[0][:, -1:]
        rows.append({"items": n, "kind": "flat", "setting": "exact", "build_seconds": flat_build,
                     "queries_per_s": flat_qps, "speedup_vs_flat": 1.0, "recall_at_100": 1.0,
                     "bytes_per_item": flat.bytes_per_item()})
        del flat
        for kind in ("ivf", "hnsw"):
            if kind == "hnsw" and n > args.hnsw_max:
                continue
            start = time.perf_counter()
            index = HashIndex(database, bits, kind=kind)  # measures its own recall curve on database samples
            build = time.perf_counter() - start
            build_recall = dict(map(tuple, index.recall["curve"]))
            for value, _ in index.recall["curve"]:
                index.structure.set_speed(value)
                qps = queries_per_s(index.structure, queries, args.k)
                rows_found = index.structure.search(queries, args.k)[1]  # rows of index.codes (held-out rows last)
                recall = tie_aware_recall(rows_found, index.codes, queries, kth)
                rows.append({"items": n, "kind": kind, "setting": f"{index.describe()['speed_param']}={value}",
                             "params": index.structure.params, "build_seconds": build, "queries_per_s": qps,
                             "speedup_vs_flat": qps / flat_qps, "recall_at_100": recall,
                             "build_recall_at_100": build_recall[value], "default": value == index.recall["default"],
                             "bytes_per_item": index.bytes_per_item()})
            del index
        print_table([r for r in rows if r["items"] == n], ["items", "kind", "setting", "queries_per_s",
                                                            "speedup_vs_flat", "recall_at_100", "build_seconds"])
    largest = max(r["items"] for r in rows)
    good = [r for r in rows if r["items"] == largest and r["kind"] != "flat" and r["recall_at_100"] >= 0.99]
    recommended = max(good, key=lambda r: r["speedup_vs_flat"]) if good else None
    defaults = {(r["items"], r["kind"]): r for r in rows if r.get("default")}  # the setting each index chose itself
    auto = {n: defaults.get((n, "ivf")) for n in (1_000_000, 10_000_000)}  # what kind=auto builds at these sizes
    milvus = milvus_vs_flat(database, queries, bits, args.k, args.milvus_items) if args.milvus_items else None
    write_json(args.out, {
        "benchmark": "search", "machine": machine(), "args": vars(args), "bits": bits,
        "database_codes": len(database_codes), "queries": len(queries), "rows": rows,
        "recommended": recommended, "largest_items": largest,
        "speedup_vs_flat_10m": recommended["speedup_vs_flat"] if recommended and largest == 10_000_000 else None,
        "recall_at_100_10m": recommended["recall_at_100"] if recommended and largest == 10_000_000 else None,
        "default_recall_at_100_1m_fresh": auto[1_000_000]["recall_at_100"] if auto[1_000_000] else None,
        "default_recall_at_100_10m_fresh": auto[10_000_000]["recall_at_100"] if auto[10_000_000] else None,
        "default_speedup_vs_flat_10m": auto[10_000_000]["speedup_vs_flat"] if auto[10_000_000] else None,
        "milvus": milvus, "milvus_lite_recall_vs_flat": milvus["recall_vs_flat"] if milvus else None,
        "build_recall_queries": RECALL_QUERIES, "wall_seconds": time.time() - started})


def milvus_vs_flat(database: np.ndarray, queries: np.ndarray, bits: int, k: int, items: int) -> dict:
    """Milvus Lite's answers over the first ``items`` codes against faiss's exact search: tie-aware recall, and
    queries/s of both on the same codes."""
    import tempfile

    from hashdistill.search.milvus import MilvusCollection, export_index

    codes = database[:items]
    flat = HashIndex(codes, bits, kind="flat")
    kth = flat.structure.search(queries, k)[0][:, -1:]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        export_index(flat, f"{tmp}/codes.db", "bench")
        insert_s = time.perf_counter() - started
        with MilvusCollection(f"{tmp}/codes.db", "bench") as collection:
            _, ids, _, _ = collection.lookup(queries, k)
            rows = np.where(ids >= 0, ids, -1)  # ids are the rows here (0..items-1)
            recall = tie_aware_recall(rows, codes, queries, kth)
            milvus_qps = len(queries) / float(np.median([_timed(lambda: collection.lookup(queries, k))
                                                         for _ in range(3)]))
    return {"items": items, "recall_vs_flat": recall, "insert_seconds": insert_s, "milvus_queries_per_s": milvus_qps,
            "faiss_flat_queries_per_s": queries_per_s(flat.structure, queries, k), "engine": "milvus-lite BIN_FLAT"}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
