"""One suite every search backend passes: faiss's kinds and Milvus Lite (a real engine, embedded). A backend's
answers are exact Hamming distances, tie-aware equal to exact search for the exact ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_index_kinds import BITS, clustered

from hashdistill import codes as hc
from hashdistill.app.cli import main
from hashdistill.errors import UserError
from hashdistill.search.index import HashIndex

K = 20


def _milvus_available() -> bool:
    try:
        import milvus_lite  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def database() -> tuple[HashIndex, np.ndarray]:
    codes = clustered(3000, seed=3)
    rng = np.random.default_rng(4)
    index = HashIndex(codes, BITS, ids=np.arange(7000, 10000), labels=rng.integers(0, 5, 3000),
                      paths=[f"catalogue/{i:05d}.png" for i in range(3000)], label_names=list("abcde"),
                      model={"path": "m.onnx", "hash": "h", "bits": BITS}, kind="flat")
    return index, clustered(50, seed=5)


def _open(name: str, index: HashIndex, tmp_path, request):
    if name == "milvus-lite":
        if not _milvus_available():
            pytest.skip("pymilvus / milvus-lite not installed (pip install 'hashdistill[milvus]')")
        from hashdistill.search.milvus import MilvusCollection, export_index

        export_index(index, str(tmp_path / "codes.db"), "catalogue")
        collection = MilvusCollection(str(tmp_path / "codes.db"), "catalogue")
        request.addfinalizer(collection.close)  # left open, its pings draw gRPC lines into later tests' stderr
        return collection, True
    kind = name.removeprefix("faiss-")
    return HashIndex(index.codes, BITS, index.ids, index.labels, index.paths, index.label_names, index.model,
                     kind=kind), kind == "flat"


@pytest.mark.parametrize("name", ["faiss-flat", "faiss-ivf", "faiss-hnsw", "milvus-lite"])
def test_a_backend_answers_with_exact_hamming_distances(name, database, tmp_path, request):
    index, queries = database
    backend, exact = _open(name, index, tmp_path, request)
    distances, ids, labels, paths = backend.lookup(queries, K)
    row_of = {int(i): r for r, i in enumerate(index.ids)}
    for q in range(len(queries)):
        found = [row_of[int(i)] for i in ids[q] if i >= 0]
        true = hc.hamming_distances(queries[q:q + 1], index.codes[found])[0]
        assert np.array_equal(distances[q][: len(found)], true)  # each answer's distance is its real one
        assert [index.paths[r] for r in found] == paths[q] and np.array_equal(labels[q][: len(found)],
                                                                             index.labels[found])
        assert np.all(np.diff(distances[q][: len(found)]) >= 0)
        if exact:  # tie-aware equal to exact search: the same distances, the same ids below the k-th distance
            reference_d, reference_ids = index.search(queries[q:q + 1], K)
            assert np.array_equal(distances[q], reference_d[0])
            kth = reference_d[0][-1]
            assert set(ids[q][distances[q] < kth]) == set(reference_ids[0][reference_d[0] < kth])


def test_milvus_lite_through_the_command_line(database, tmp_path, capsys, student_onnx):
    if not _milvus_available():
        pytest.skip("pymilvus / milvus-lite not installed")
    from PIL import Image

    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 255, (18, 18, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    assert main(["index", "build", str(student_onnx), str(folder), "-o", str(tmp_path / "index.npz")]) == 0
    uri = str(tmp_path / "milvus.db")
    assert main(["index", "export", str(tmp_path / "index.npz"), "--milvus", uri, "--collection", "shop"]) == 0
    assert "exported 80 codes" in capsys.readouterr().out
    assert main(["index", "export", str(tmp_path / "index.npz"), "--milvus", uri, "--collection", "shop"]) == 2
    assert "already exists" in capsys.readouterr().err
    query = str(folder / "a" / "3.png")
    assert main(["index", "search", str(tmp_path / "index.npz"), query, "-k", "5"]) == 0
    faiss_out = capsys.readouterr().out.splitlines()
    assert main(["index", "search", "--milvus", uri, "--collection", "shop", query, "-k", "5"]) == 0
    milvus_out = capsys.readouterr().out.splitlines()
    assert "milvus BIN_FLAT" in milvus_out[0]
    first = [line.split()[0] for line in faiss_out[2:]]  # distances, in order: equal (ties may order differently)
    assert first == [line.split()[0] for line in milvus_out[2:]] and "id=" in milvus_out[2]
    assert main(["index", "search", "--milvus", uri, "--collection", "nope", query]) == 2
    assert "no collection 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["has space", "a..b", "caf\u00e9", "x" * 300, "9lives", ""])
def test_a_bad_collection_name_is_refused_before_milvus_sees_it(name, tmp_path, capsys):
    """Checked before pymilvus is even imported: the same answer whether or not it is installed."""
    from hashdistill.search.milvus import check_collection_name

    with pytest.raises(UserError, match="is not a Milvus collection name"):
        check_collection_name(name)
    index = HashIndex(np.zeros((3, 8), np.uint8), BITS)
    index_path = index.save(tmp_path / "index.npz")
    for argv in (["index", "export", index_path, "--milvus", tmp_path / "m.db", "--collection", name],
                 ["index", "search", "--milvus", tmp_path / "m.db", "--collection", name, tmp_path / "q.png"]):
        assert main([str(a) for a in argv]) == 2
        assert "is not a Milvus collection name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.npz"]
    assert check_collection_name("_Shop_2024" + "x" * 245) == "_Shop_2024" + "x" * 245  # 255 characters


def test_searching_a_missing_lite_file_creates_none(tmp_path, capsys):
    missing = tmp_path / "missing.db"
    for argv in (["index", "search", "--milvus", missing, tmp_path / "q.png"], ["index", "search", missing, "q.png"]):
        assert main([str(a) for a in argv]) == 2
        assert "no Milvus Lite file at" in capsys.readouterr().err
    assert not missing.exists()


def test_foreign_collections_and_wrong_widths_are_user_errors(database, tmp_path, capsys):
    if not _milvus_available():
        pytest.skip("pymilvus / milvus-lite not installed")
    from pymilvus import DataType, MilvusClient

    from hashdistill.search.milvus import MilvusCollection, export_index

    index, queries = database
    uri = str(tmp_path / "codes.db")
    export_index(index, uri, "ours")
    client = MilvusClient(uri=uri)
    client.create_collection("quickstart", dimension=8)  # pymilvus's own quick-start collection: float vectors
    ours = json.dumps({"format": "hashdistill-milvus", "bits": BITS, "model": {}})
    for name, description, vector, dim in (("listed", "[1]", "code", 64), ("wide", ours, "code", 128),
                                           ("renamed", ours, "vec", 64)):
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=description)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field(vector, DataType.BINARY_VECTOR, dim=dim)
        schema.add_field("path", DataType.VARCHAR, max_length=100)
        schema.add_field("label", DataType.INT64)
        params = client.prepare_index_params()
        params.add_index(field_name=vector, index_type="BIN_FLAT", metric_type="HAMMING")
        client.create_collection(name, schema=schema, index_params=params)
    client.close()
    for name, expect in (("quickstart", "was not written by hashdistill"), ("listed", "was not written by hashdistill"),
                         ("wide", "holds vectors of 128 bits but records 64-bit codes"),
                         ("renamed", "its fields are")):
        with pytest.raises(UserError, match=expect):
            MilvusCollection(uri, name)
    with MilvusCollection(uri, "ours") as collection:
        distances, *_ = collection.lookup(queries[:2], 3)  # ours still answers
    assert distances.shape == (2, 3)


def test_a_closed_collection_holds_no_connection(database, tmp_path):
    """Every command closes its Milvus connection: an open idle one keeps pinging, and gRPC prints the server's
    'too_many_pings' answer into whatever runs next (a Ray test once failed on those lines)."""
    if not _milvus_available():
        pytest.skip("pymilvus / milvus-lite not installed")
    from hashdistill.search.milvus import MilvusCollection, export_index

    index, queries = database
    uri = str(tmp_path / "codes.db")
    export_index(index, uri, "ours")
    with MilvusCollection(uri, "ours") as collection:
        assert collection.lookup(queries[:1], 1)[0].shape == (1, 1)
    with pytest.raises(UserError, match="could not search"):
        collection.lookup(queries[:1], 1)
