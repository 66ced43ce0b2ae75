"""hashdistill encode: an image set into Parquet shards of codes, in this process and on a real local Ray cluster
(2 CPUs): the same codes bit for bit, unique ids, no file lost, damaged files counted and skipped; index build and
index add take the shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_support import refused
from PIL import Image
from test_export_support import checkpoints, exported

from hashdistill.app.cli import main
from hashdistill.errors import UserError
from hashdistill.search.encode import MANIFEST, encode_images, read_codes
from hashdistill.search.index import load_index, search_images

IMAGES_PER_CLASS = 120


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return exported(tmp_path_factory.getbasetemp() / "export-artefacts", "student")[0]


def _damaged_past_its_header(source: Path, target: Path) -> None:
    """A PNG whose header, chunk checksums and end marker are intact (it passes the folder scan) but whose pixel
    data does not inflate."""
    import struct
    import zlib

    data = bytearray(source.read_bytes())
    at = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[at:at + 4])
    start = at + 8
    data[start:start + length] = bytes(length)  # zeros: not a zlib stream
    data[start + length:start + length + 4] = struct.pack(">I", zlib.crc32(bytes(data[at + 4:start + length])))
    target.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("catalogue")
    rng = np.random.default_rng(0)
    for cls in ("boots", "shirts"):
        (root / cls).mkdir()
        for i in range(IMAGES_PER_CLASS):
            size = (16 + i % 9, 12 + i % 13, 3)  # many sizes: the image-in model resizes in its graph
            Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / cls / f"{i:03d}.png")
    _damaged_past_its_header(root / "boots" / "000.png", root / "boots" / "zz-damaged.png")
    (root / "shirts" / "zz-header.png").write_bytes(b"not an image")  # refused by the folder scan
    readable = sorted(str(p) for p in root.rglob("*.png") if "zz-" not in p.name)
    return root, readable


def test_the_in_process_and_the_ray_paths_give_the_same_codes(model, images, tmp_path, capfd):
    root, readable = images
    here = encode_images(model, root, tmp_path / "here")
    ray = encode_images(model, root, tmp_path / "ray", ray="local", workers=2)
    assert ray.manifest["engine"] == "ray" and ray.manifest["workers"] == 2
    a, b = read_codes(tmp_path / "here"), read_codes(tmp_path / "ray")
    for encoded, result in ((a, here), (b, ray)):
        assert sorted(encoded.paths.tolist()) == readable  # no file lost, none twice
        assert len(np.unique(encoded.ids)) == len(encoded.ids)
        assert result.manifest["skipped"] == 2 and result.manifest["unreadable_at_scan"] == 1  # counted once
        assert result.manifest["skipped_paths"] == [str(Path(root).absolute() / "boots" / "zz-damaged.png")]
        assert result.manifest["images"] == len(readable) + 2 and result.manifest["encoded"] == len(readable)
    order_a, order_b = np.argsort(a.ids), np.argsort(b.ids)
    assert np.array_equal(a.ids[order_a], b.ids[order_b]) and np.array_equal(a.paths[order_a], b.paths[order_b])
    assert np.array_equal(a.codes[order_a], b.codes[order_b])  # bit for bit
    from hashdistill.export.runtime import EdgeModel

    reference = EdgeModel(model).encode(list(a.paths[order_a]))
    assert np.array_equal(reference, a.codes[order_a])
    err = capfd.readouterr().err
    assert err.count("skipped 2 image(s): 1 unreadable at the scan, 1 that could not be decoded") == 2  # one a run
    assert "unreadable image(s)" not in err  # the scan's own warning: the count is said once
    # no Ray noise; gRPC's keepalive lines come from a Milvus Lite client of an earlier test in this process
    assert not [line for line in err.splitlines()
                if "hashdistill:" not in line and "chttp2_transport" not in line and line.strip()], err


def test_a_ray_address_with_nothing_listening_is_an_error_within_seconds(model, images, tmp_path):
    import socket
    import time

    pytest.importorskip("ray")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again when the block ends: nothing listens there
    started = time.perf_counter()
    with pytest.raises(UserError, match=f"could not reach a Ray cluster at 127.0.0.1:{port}"):
        encode_images(model, images[0], tmp_path / "codes", ray=f"127.0.0.1:{port}")
    assert time.perf_counter() - started < 15 and not (tmp_path / "codes").exists()


def test_ray_alone_honours_ray_address_and_an_existing_cluster_gets_no_cpu_count(monkeypatch):
    from hashdistill.search import ray_encode

    calls = []

    class FakeRay:
        @staticmethod
        def init(**kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(ray_encode, "probe", lambda address: None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_encode.resolve_address(ray_encode.LOCAL) == "10.0.0.5:6379"
    assert ray_encode.resolve_address("auto") == "auto"
    ray_encode._connect(FakeRay, ray_encode.resolve_address(ray_encode.LOCAL), workers=2, verbose=False)
    monkeypatch.delenv("RAY_ADDRESS")
    ray_encode._connect(FakeRay, ray_encode.resolve_address(ray_encode.LOCAL), workers=2, verbose=False)
    assert calls[0]["address"] == "10.0.0.5:6379" and "num_cpus" not in calls[0]
    assert calls[1]["num_cpus"] == 2 and "address" not in calls[1] and calls[1]["log_to_driver"] is False


def test_index_build_and_add_take_the_shards(model, images, tmp_path, capsys):
    root, _ = images
    assert main(["encode", str(model), str(root), "-o", str(tmp_path / "codes")]) == 0
    assert "encoded 240 of 242 images (16 bits; 2 skipped)" in capsys.readouterr().out  # both damaged files
    assert main(["index", "build", str(tmp_path / "codes"), "-o", str(tmp_path / "index.npz")]) == 0
    built = load_index(tmp_path / "index.npz")
    encoded = read_codes(tmp_path / "codes")
    assert len(built) == len(encoded.ids) and built.label_names == ["boots", "shirts"]
    assert main(["index", "build", str(model), str(root), "-o", str(tmp_path / "direct.npz")]) == 0
    direct = load_index(tmp_path / "direct.npz")
    by_path = {p: c.tobytes() for p, c in zip(direct.paths, direct.codes)}
    assert all(by_path[p] == c.tobytes() for p, c in zip(built.paths, built.codes))  # the same codes either way
    query = [str(p) for p in sorted(root.glob("shirts/00*.png"))[:3]]
    assert np.array_equal(search_images(built, query, 5).distances, search_images(direct, query, 5).distances)
    assert main(["encode", str(model), str(root / "boots"), "-o", str(tmp_path / "more"), "--first-id", "1000"]) == 0
    assert main(["index", "add", str(tmp_path / "index.npz"), str(tmp_path / "more")]) == 2  # the boots are in
    assert "in the index already" in capsys.readouterr().err
    assert main(["index", "add", str(tmp_path / "index.npz"), str(tmp_path / "more"), "--allow-duplicates"]) == 0
    grown = load_index(tmp_path / "index.npz")
    assert len(grown) == len(built) + IMAGES_PER_CLASS and grown.ids.max() >= 1000


def test_encoding_refuses_a_folder_it_did_not_write_and_lists_of_paths_work(model, images, tmp_path, capsys):
    root, readable = images
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["encode", str(model), str(root), "-o", str(mine), "--force"]) == 2
    assert "left untouched" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep"
    listing = tmp_path / "catalogue.txt"
    listing.write_text("\n".join(readable[:10]) + "\n# a comment\n")
    result = encode_images(model, listing, tmp_path / "listed")
    assert result.manifest["encoded"] == 10 and (tmp_path / "listed" / MANIFEST).is_file()
    assert not list(tmp_path.glob(".*.encoding"))  # no staging folder left behind


def test_a_damaged_shard_or_manifest_is_refused(model, images, tmp_path, capsys):
    root, _ = images
    encode_images(model, root / "shirts", tmp_path / "codes")
    shard = next((tmp_path / "codes").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:200])
    assert main(["index", "build", str(tmp_path / "codes"), "-o", str(tmp_path / "i.npz")]) == 2
    assert "not a readable shard of codes" in capsys.readouterr().err
    (tmp_path / "codes" / MANIFEST).write_text('{"format": "hashdistill-codes", "bits": 16, "shards": ["../x"]}')
    assert main(["index", "build", str(tmp_path / "codes"), "-o", str(tmp_path / "i.npz")]) == 2
    assert "is corrupt" in capsys.readouterr().err and not (tmp_path / "i.npz").exists()


def test_the_index_commands_do_what_the_docs_say(model, images, tmp_path, capsys, monkeypatch):
    """`index build MODEL CODES` (README, docs/CLUSTER.md) works and checks the model; a missing folder is named
    missing; paths are stored absolute; `index add` refuses what the index holds unless --allow-duplicates."""
    root, _ = images
    codes = encode_images(model, root / "shirts", tmp_path / "codes", first_id=1000).folder
    assert main(["index", "build", str(model), str(codes), "-o", str(tmp_path / "from-codes.npz")]) == 0
    assert len(load_index(tmp_path / "from-codes.npz")) == IMAGES_PER_CLASS
    capsys.readouterr()
    teacher = checkpoints(tmp_path.parent / "export-artefacts").teacher
    refused(capsys, tmp_path, "index", "build", teacher, codes, "-o", tmp_path / "x.npz", expect="not of")
    refused(capsys, tmp_path, "index", "build", model, codes, "-o", tmp_path / "x.npz", "--first-id", "5",
            expect="holds codes with their ids already")
    refused(capsys, tmp_path, "index", "build", model, tmp_path / "no-such-folder", "-o", tmp_path / "x.npz",
            expect="no-such-folder is missing")
    monkeypatch.chdir(root)
    index = tmp_path / "boots.npz"
    assert main(["index", "build", str(model), "boots", "-o", str(index)]) == 0
    assert all(Path(p).is_absolute() and Path(p).parent == root / "boots" for p in load_index(index).paths)
    capsys.readouterr()
    refused(capsys, tmp_path, "index", "add", index, "boots", expect="120 of the new images are in the index already")
    assert main(["index", "add", str(index), "boots", "--allow-duplicates"]) == 0
    assert main(["index", "add", str(index), str(codes)]) == 0
    assert len(load_index(index)) == 3 * IMAGES_PER_CLASS
    capsys.readouterr()
    refused(capsys, tmp_path, "index", "add", index, codes, "--allow-duplicates",
            expect="ids are in the index already (id 1000)")


def test_a_local_cluster_that_misses_rays_start_up_wait_is_started_again(monkeypatch):
    """The suite's Ray test once failed on a loaded machine: "The current node timed out during startup"."""
    from hashdistill.search import ray_encode

    tries = []

    class SlowRay:
        @staticmethod
        def init(**kwargs):
            tries.append(kwargs)
            if len(tries) == 1:
                raise Exception("The current node timed out during startup. This could happen ...")  # noqa: TRY002

        @staticmethod
        def shutdown():
            tries.append("shutdown")

    ray_encode._connect(SlowRay, None, workers=2, verbose=False)
    assert tries[1] == "shutdown" and tries[2]["num_cpus"] == 2
