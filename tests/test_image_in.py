"""Image-in models: one pre-processing for training-time evaluation, the exported graph and the edge runtime."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from test_export_support import checkpoints

from hashdistill import codes
from hashdistill.checkpoint import load_checkpoint, save_checkpoint
from hashdistill.data import build_dataset, dataset_info
from hashdistill.errors import UserError
from hashdistill.export.loading import load_any_model
from hashdistill.export.metadata import FLOAT_IN
from hashdistill.export.runtime import EdgeModel
from hashdistill.export.verify import export_checkpoint
from hashdistill.preprocessing import EvalTransform
from hashdistill.recipe import DataConfig

# (height, width): square, portrait, landscape, smaller than the model input, extreme aspect ratios
SHAPES = [(16, 16), (40, 30), (23, 57), (100, 64), (12, 90), (97, 13), (64, 64)]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """PNG and JPEG files of several sizes in two class folders (smooth images, as photographs are)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SHAPES * 2):
        y, x = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 255, 3) + 80 * np.sin(x[..., None] / rng.uniform(2, 9) + y[..., None] / 5)
        pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        folder = root / "train" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".png" if i < len(SHAPES) else ".jpg"
        Image.fromarray(pixels).save(folder / f"img{i}{suffix}", quality=90)
    return root


@pytest.fixture(scope="module")
def folder_model(export_root, photo_folder, tmp_path_factory):
    """The shared test student re-labelled as trained on the photo folder (crop_pct 0.875), exported image-in."""
    data = DataConfig(dataset="imagefolder", root=str(photo_folder), image_size=16, val_fraction=0.2)
    tensors, meta = load_checkpoint(checkpoints(export_root).student)
    info = dataset_info(data)
    meta = {**meta, **info, "num_classes": len(info["class_names"]), "data": dataclasses.asdict(data)}
    tensors = {**tensors, "codes": tensors["codes"][:2].clone()}
    folder = tmp_path_factory.mktemp("folder-model")
    save_checkpoint(folder / "student.safetensors", tensors, meta)
    figures = export_checkpoint(folder / "student.safetensors", folder / "student.onnx")
    return {"data": data, "checkpoint": folder / "student.safetensors", "onnx": folder / "student.onnx",
            "figures": figures, "folder": folder}


def test_training_evaluation_graph_and_edge_runtime_agree_on_every_file(folder_model):
    data = folder_model["data"]
    model, meta = load_any_model(folder_model["checkpoint"])
    assert meta["crop_pct"] == 0.875
    splits = [build_dataset(data, split) for split in ("train", "val", "test")]
    paths = [p for split in splits for p in split.paths]
    assert len(paths) == 2 * len(SHAPES) and {p.suffix for p in paths} == {".png", ".jpg"}
    with torch.no_grad():  # training-time evaluation: the eval split's items, as the evaluator reads them
        training = codes.pack_codes(model(torch.stack([split[i][0] for split in splits
                                                       for i in range(len(split))])).numpy())
    session = ort.InferenceSession(str(folder_model["onnx"]))
    graph = np.concatenate([session.run(["codes"], {"images": split.pixels(i)[None]})[0]
                            for split in splits for i in range(len(split))])
    edge = EdgeModel(folder_model["onnx"]).encode(paths)
    np.testing.assert_array_equal(graph, training)
    np.testing.assert_array_equal(edge, training)
    assert folder_model["figures"]["identical_code_rate"] == 1.0


def test_float_input_export_gives_the_same_codes_through_the_runtime(folder_model, photo_folder):
    float_path = folder_model["folder"] / "float-input.onnx"
    figures = export_checkpoint(folder_model["checkpoint"], float_path, input_format=FLOAT_IN)
    assert figures["input_format"] == FLOAT_IN and figures["identical_code_rate"] == 1.0
    image_in, float_in = EdgeModel(folder_model["onnx"]), EdgeModel(float_path)
    assert image_in.takes_images and not float_in.takes_images
    paths = sorted(photo_folder.rglob("*.*"))
    np.testing.assert_array_equal(float_in.encode(paths), image_in.encode(paths))
    with pytest.raises(UserError, match=r"uint8 \[N, H, W, 3\]"):
        image_in.run(np.zeros((1, 3, 16, 16), np.float32))


def test_the_pre_processing_keeps_the_aspect_ratio_and_crops_the_centre():
    transform = EvalTransform(16, 0.5, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert transform.resize_size == 32 and transform.resized_shape(40, 80) == (32, 64)
    assert transform.resized_shape(90, 30) == (96, 32)
    pixels = torch.zeros(1, 40, 80, 3, dtype=torch.uint8)
    pixels[:, :, 30:50] = 255  # a bright band: the centre 20 columns, exactly the crop window (16 of 64 resized)
    out = transform.apply(pixels)
    assert out.shape == (1, 3, 16, 16)
    assert out.min() > 0.9  # only the band is left (a square resize would keep the dark sides as well)


def test_an_in_memory_model_takes_its_own_dataset_images(export_root):
    """For the in-memory datasets the graph's resize is the identity on their stored images."""
    figures = export_checkpoint(checkpoints(export_root).student, export_root / "student-image-in.onnx", force=True)
    assert figures["identical_code_rate"] == 1.0 and figures["input_format"] == "uint8-nhwc"


def test_the_embedded_pre_processing_is_read_from_this_and_earlier_files_and_odd_constants_are_refused():
    """Files written before the normalisation became one BatchNormalization keep their Sub / Div constants (mean,
    std) and are still read; constants of the wrong size (a hostile file) read as no pre-processing at all."""
    from onnx import helper, numpy_helper

    from hashdistill.export.preprocess_graph import FRONT_PREFIX, embedded_transform
    from hashdistill.preprocessing import EvalTransform
    from hashdistill.preprocessing_graph import preprocess_graph

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    transform = EvalTransform(32, 0.875, mean, std)

    def with_constants(**consts: np.ndarray) -> onnx.ModelProto:
        graph = helper.make_graph([], "g", [], [], initializer=[
            numpy_helper.from_array(np.asarray(v), f"{FRONT_PREFIX}{k}") for k, v in consts.items()])
        return helper.make_model(graph)

    now = embedded_transform(compose_front(preprocess_graph(transform)))
    before = embedded_transform(with_constants(crop=np.array(32), resize_size=np.array(36),
                                               mean=np.array(mean, np.float32).reshape(1, 3, 1, 1),
                                               std=np.array(std, np.float32).reshape(1, 3, 1, 1)))
    for found in (now, before):
        assert found["crop"] == [32] and found["resize_size"] == [36]
        assert np.allclose(found["mean"], mean, rtol=1e-6) and np.allclose(found["std"], std, rtol=1e-6)
    odd = with_constants(crop=np.array(32), resize_size=np.array(36), mean=np.zeros(7, np.float32),
                         std=np.ones(3, np.float32))
    assert embedded_transform(odd) is None


def compose_front(front: onnx.ModelProto) -> onnx.ModelProto:
    """The pre-processing graph under the prefix image_in_model gives its nodes and constants."""
    from onnx import compose

    from hashdistill.export.preprocess_graph import FRONT_PREFIX

    return compose.add_prefix(front, FRONT_PREFIX)
