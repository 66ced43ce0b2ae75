"""Hamming index: faiss vs the numpy reference, build / persist / reload / search, mismatches and damage."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_export_support import BITS, DATA, checkpoints

from hashdistill import codes
from hashdistill.data import build_dataset
from hashdistill.errors import UserError
from hashdistill.export.runtime import EdgeModel
from hashdistill.recipe import DataConfig
from hashdistill.search.index import HashIndex, build_index, load_index, search_images


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Synthetic test images as PNG files in class sub-folders."""
    folder = tmp_path_factory.mktemp("images")
    dataset = build_dataset(DATA, "test")
    for i in range(24):
        label = int(dataset.labels[i])
        (folder / dataset.class_names[label]).mkdir(exist_ok=True)
        Image.fromarray(dataset.images[i, 0].numpy()).save(folder / dataset.class_names[label] / f"{i:03d}.png")
    return folder


@pytest.mark.parametrize("bits", [8, 20, 64])
def test_faiss_distances_match_the_numpy_reference(bits):
    rng = np.random.default_rng(bits)
    database = codes.pack_codes(rng.standard_normal((500, bits)))
    queries = codes.pack_codes(rng.standard_normal((30, bits)))
    index = HashIndex(database, bits, ids=np.arange(1000, 1500))
    distances, ids = index.search(queries, k=500)
    reference = codes.hamming_distances(queries, database)
    np.testing.assert_array_equal(distances, np.sort(reference, axis=1))
    np.testing.assert_array_equal(np.take_along_axis(reference, ids - 1000, axis=1), distances)


def test_teacher_index_persists_and_answers_student_queries(export_root, student_onnx, tmp_path):
    ckpts = checkpoints(export_root)
    path = tmp_path / "teacher.npz"
    index = build_index(ckpts.teacher, "synthetic:database", path)
    database = build_dataset(DATA, "train"), build_dataset(DATA, "val")
    assert len(index) == sum(len(d) for d in database) and index.bits == BITS
    assert index.label_names == database[0].class_names
    assert index.model["kind"] == "teacher" and index.model["path"] == str(ckpts.teacher.resolve())

    reloaded = load_index(path)
    np.testing.assert_array_equal(reloaded.codes, index.codes)
    np.testing.assert_array_equal(reloaded.labels, index.labels)
    np.testing.assert_array_equal(reloaded.paths, index.paths)
    assert reloaded.model == index.model and reloaded.label_names == index.label_names

    # Default query model = the recorded teacher checkpoint: a database image finds itself at distance 0.
    own = search_images(path, [np.asarray(database[0].images[0, 0])], k=3)
    assert own.distances[0, 0] == 0 and own.paths[0][0] == "synthetic:database#0"

    # Asymmetric retrieval: the student's ONNX file queries the teacher's database (same bit width).
    result = search_images(reloaded, "synthetic:test", k=5, model=student_onnx)
    test_split = build_dataset(DATA, "test")
    assert result.distances.shape == result.ids.shape == result.labels.shape == (len(test_split), 5)
    queries = EdgeModel(student_onnx).encode(list(test_split.images[:, 0].numpy()))
    expected = np.sort(codes.hamming_distances(queries, reloaded.codes), axis=1)[:, :5]
    np.testing.assert_array_equal(result.distances, expected)
    np.testing.assert_array_equal(result.labels, reloaded.labels[result.ids])
    per_query = list(result)
    assert len(per_query) == len(result) == len(test_split) and result.query_paths[0] == "synthetic:test#0"
    first = per_query[0][0]
    assert first["rank"] == 1 and first["distance"] == result.distances[0, 0] and first["id"] == result.ids[0, 0]
    assert first["label_name"] == reloaded.label_names[first["label"]]


def test_folder_index_built_from_onnx(student_onnx, image_folder, tmp_path):
    index = build_index(student_onnx, image_folder, tmp_path / "folder.npz")
    classes = sorted(p.name for p in image_folder.iterdir())
    assert index.label_names == classes and len(index) == 24
    first = sorted((image_folder / classes[0]).iterdir())[0]
    assert index.paths[0] == str(first) and index.labels[0] == 0
    result = search_images(tmp_path / "folder.npz", [first], k=1)  # the recorded ONNX model encodes queries
    assert result.distances[0, 0] == 0 and result.labels[0, 0] == 0
    assert next(iter(result))[0]["label_name"] == classes[0]

    plain = tmp_path / "plain"
    plain.mkdir()
    Image.open(first).save(plain / "only.png")
    unlabeled = build_index(student_onnx, plain, tmp_path / "plain.npz")
    assert unlabeled.labels.tolist() == [-1] and unlabeled.label_names == []


def test_build_index_with_the_recipe_data_section(student_onnx, tmp_path):
    limited = DataConfig(dataset="synthetic", image_size=16, test_limit=10)
    index = build_index(student_onnx, "synthetic:test", tmp_path / "index", data=limited)
    assert len(load_index(tmp_path / "index")) == 10
    with pytest.raises(UserError, match="data section given says digits"):
        build_index(student_onnx, "synthetic:test", tmp_path / "x", data=DataConfig(dataset="digits", image_size=16))
    assert index.model["hash"] == EdgeModel(student_onnx).meta.digest


def test_a_model_of_another_bit_width_is_refused(student_onnx, tmp_path):
    other = HashIndex(codes.pack_codes(np.ones((3, 8))), 8)
    with pytest.raises(UserError, match="16-bit codes but the index holds 8-bit"):
        search_images(other, [np.zeros((16, 16), np.uint8)], model=student_onnx)
    with pytest.raises(UserError, match="packed 8-bit codes"):
        other.search(np.zeros((1, 2), np.uint8))


def test_damaged_or_foreign_index_files_are_user_errors(tmp_path):
    path = HashIndex(codes.pack_codes(np.ones((50, 16))), 16).save(tmp_path / "index.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_index(truncated)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, codes=np.zeros((2, 2), np.uint8))
    with pytest.raises(UserError, match="not a hashdistill index"):
        load_index(foreign)
    with pytest.raises(UserError, match="not found"):
        load_index(tmp_path / "missing.npz")
    with pytest.raises(UserError, match="already exists"):
        HashIndex(codes.pack_codes(np.ones((1, 16))), 16).save(path)


def test_bad_image_sources_are_user_errors(student_onnx, tmp_path):
    with pytest.raises(UserError, match="neither an image folder nor a dataset split"):
        build_index(student_onnx, "mnist:test", tmp_path / "x.npz")
    with pytest.raises(UserError, match="model not found"):
        build_index(tmp_path / "missing.onnx", "synthetic:test", tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()
