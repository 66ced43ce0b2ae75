"""The torch-free edge runtime: pre-processing, decoding, OOD, damaged files, and no torch import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from test_export_support import DATA, checkpoints

from hashdistill import codes
from hashdistill.data import build_dataset
from hashdistill.errors import UserError
from hashdistill.export.loading import load_any_model
from hashdistill.export.runtime import EdgeModel
from hashdistill.imagefiles import read_rgb


@pytest.fixture(scope="session")
def test_split():
    return build_dataset(DATA, "test")


def _uint8_images(dataset, count):
    """The dataset's stored uint8 images as HxW arrays (synthetic data is grayscale)."""
    return list(dataset.images[:count, 0].numpy())


def test_preprocess_matches_the_training_pipeline(student_onnx, test_split):
    edge = EdgeModel(student_onnx)
    batch = edge.preprocess(_uint8_images(test_split, 10))
    expected = torch.stack([test_split[i][0] for i in range(10)]).numpy()
    assert batch.dtype == np.float32 and batch.shape == (10, 3, DATA.image_size, DATA.image_size)
    np.testing.assert_array_equal(batch, expected)


def test_preprocess_is_training_time_evaluation_on_files_of_any_shape(student_onnx, tmp_path):
    edge = EdgeModel(student_onnx)
    rng = np.random.default_rng(0)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(rgb)
    gray = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    batch = edge.preprocess([rgb, gray])
    expected = edge.meta.transform.apply(torch.from_numpy(np.asarray(read_rgb(rgb)))[None])[0].numpy()
    np.testing.assert_allclose(batch[0], expected, atol=1e-5)  # ONNX Resize vs F.interpolate: float rounding only
    assert np.allclose(batch[1][0], batch[1][1]) and np.allclose(batch[1][1], batch[1][2])  # gray -> 3 channels
    single = edge.preprocess(str(rgb))
    np.testing.assert_array_equal(single[0], batch[0])


def test_encode_classify_and_ood_agree_with_pytorch(export_root, student_onnx, test_split):
    model, _ = load_any_model(checkpoints(export_root).student)
    edge = EdgeModel(student_onnx)
    images = _uint8_images(test_split, 40)
    with torch.no_grad():
        expected = codes.pack_codes(model(torch.stack([test_split[i][0] for i in range(40)])).numpy())
    packed = edge.encode(images)
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(codes.pack_codes(edge.logits(images)), packed)
    classes = codes.pack_codes(model.class_codes.numpy())
    np.testing.assert_array_equal(edge.classify(images), codes.mhd_decode(expected, classes))
    np.testing.assert_array_equal(edge.classify(images, method="ed"), codes.ed_decode(expected, classes))
    np.testing.assert_array_equal(edge.is_ood(images), codes.ed_decode(expected, classes) == codes.UNKNOWN)
    with pytest.raises(UserError, match="unknown decoding method"):
        edge.classify(images, method="knn")


def test_batches_of_any_size(student_onnx, test_split):
    edge = EdgeModel(student_onnx, batch_size=3)
    images = _uint8_images(test_split, 7)
    np.testing.assert_array_equal(edge.encode(images), EdgeModel(student_onnx).encode(images))
    assert edge.encode(images[0]).shape == (1, 2)


def test_bad_images_are_user_errors(student_onnx, tmp_path):
    edge = EdgeModel(student_onnx)
    with pytest.raises(UserError, match="uint8"):
        edge.encode(np.zeros((16, 16), np.float32))
    with pytest.raises(UserError, match="HxW"):
        edge.encode([np.zeros((16, 16, 4), np.uint8)])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        edge.encode(tmp_path / "broken.png")
    with pytest.raises(UserError, match="no images"):
        edge.encode([])


def test_truncated_or_foreign_onnx_is_a_user_error(student_onnx, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(student_onnx.read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot load it"):
        EdgeModel(truncated)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), foreign)
    with pytest.raises(UserError, match="not a hashdistill export"):
        EdgeModel(foreign)
    with pytest.raises(UserError, match="not found"):
        EdgeModel(tmp_path / "missing.onnx")


def test_damaged_metadata_is_a_user_error(student_onnx, tmp_path):
    proto = onnx.load(student_onnx)
    for prop in proto.metadata_props:
        if prop.key == "class_codebook":
            prop.value = '["zz"]'
    damaged = tmp_path / "damaged.onnx"
    onnx.save(proto, damaged)
    with pytest.raises(UserError, match="metadata 'class_codebook' must list"):
        EdgeModel(damaged)


def test_runtime_works_without_torch(student_onnx, tmp_path):
    """Block ``import torch`` in a fresh interpreter, then load, encode, classify and search."""
    image = tmp_path / "query.png"
    Image.fromarray(np.full((16, 16), 200, np.uint8)).save(image)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        import numpy as np
        from hashdistill.export.runtime import EdgeModel
        from hashdistill.search.index import HashIndex, search_images
        model = EdgeModel({str(student_onnx)!r})
        packed = model.encode([{str(image)!r}, np.zeros((16, 16), np.uint8)])
        assert packed.shape == (2, 2), packed.shape
        model.classify({str(image)!r}, method="ed"); model.is_ood({str(image)!r})
        index = HashIndex(packed, model.bits, paths=["a", "b"], model=model.describe())
        result = search_images(index, [{str(image)!r}], k=1)
        assert result.distances[0, 0] == 0 and result.paths[0][0] == "a", result
        print("ok", sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok ['torch']"  # only the blocking entry itself
