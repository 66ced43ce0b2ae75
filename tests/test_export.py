"""ONNX export: parity with PyTorch, ternary layers kept packed, metadata, atomic and refusing writes."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_export_support import BITS, DATA, checkpoints, exported

from hashdistill import codes
from hashdistill.data import build_dataset
from hashdistill.distill.models import HashStudent
from hashdistill.errors import UserError
from hashdistill.export.graph import edge_graph
from hashdistill.export.loading import load_any_model
from hashdistill.export.metadata import FLOAT_IN
from hashdistill.export.onnx_export import check_ternary_packed, export_onnx
from hashdistill.export.runtime import EdgeModel
from hashdistill.export.verify import verify_export
from hashdistill.quantize.packing import packed_size
from hashdistill.quantize.ttq import TTQConfig, ternarize_, ternary_layers


@pytest.fixture(scope="session")
def ckpts(export_root):
    return checkpoints(export_root)


@pytest.mark.parametrize(("which", "opset"), [("teacher", 18), ("student", 18), ("ternary", 18), ("ternary", 25)])
def test_export_matches_pytorch_on_real_images(export_root, which, opset):
    path, figures = exported(export_root, which, opset)
    assert path.is_file() and figures["file_bytes"] == path.stat().st_size
    assert figures["identical_code_rate"] == 1.0
    assert figures["max_abs_logit_diff"] < 1e-4
    assert figures["images"] == len(build_dataset(DATA, "test"))
    assert (figures["ternary_layers"] > 0) == (which == "ternary")


@pytest.mark.parametrize("which", ["teacher", "student", "ternary"])
def test_every_conv_bias_is_stored_so_onnxruntime_can_fuse(export_root, which):
    """A bias-less conv exported as zeros shaped from the input's dtype cannot be folded by onnxruntime: no
    Conv + BatchNormalization fusion, no fast kernels (a depthwise student ran 9x slower)."""
    path, _ = exported(export_root, which, 18)
    graph = onnx.load(str(path)).graph
    stored = {t.name for t in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs and all(len(node.input) == 3 and node.input[2] in stored for node in convs)


def test_in_graph_packing_follows_the_codes_module_on_new_batch_sizes(export_root, ckpts):
    path, _ = exported(export_root, "student")
    model, _ = load_any_model(ckpts.student)
    edge = EdgeModel(path)
    for batch in (1, 7):
        pixels = np.random.default_rng(batch).integers(0, 256, (batch, 20, 24, 3), dtype=np.uint8)
        packed, logits = edge.run(pixels)
        assert packed.dtype == np.uint8 and packed.shape == (batch, codes.packed_width(BITS))
        assert logits.dtype == np.float32 and logits.shape == (batch, BITS)
        np.testing.assert_array_equal(packed, codes.pack_codes(logits))
        with torch.no_grad():
            expected = model(edge.meta.transform.apply(torch.from_numpy(pixels))).numpy()
        np.testing.assert_array_equal(packed, codes.pack_codes(expected))


def test_odd_bit_widths_pad_the_last_byte_with_zeros(tmp_path, ckpts):
    _, meta = load_any_model(ckpts.student)
    model = HashStudent("test_vit", 11, 4).eval()
    path = export_onnx(model, {**meta, "bits": 11}, tmp_path / "odd.onnx", input_format=FLOAT_IN)
    images = torch.randn(5, 3, DATA.image_size, DATA.image_size)
    packed, _ = EdgeModel(path).run(images.numpy())
    with torch.no_grad():
        np.testing.assert_array_equal(packed, codes.pack_codes(model(images).numpy()))
    assert not (packed[:, -1] & 0b11111).any()  # 11 bits: the last 5 bits of byte 2 are padding


def _test_pixels(count: int) -> list[np.ndarray]:
    test = build_dataset(DATA, "test")
    return [test.pixels(i) for i in range(count)]


def _ternary_export(export_root, ckpts, opset: int):
    """The exported ternary student at ``opset``: path, export figures, checkpoint model and meta, ONNX graph."""
    path, figures = exported(export_root, "ternary", opset)
    model, meta = load_any_model(ckpts.ternary)
    proto = onnx.load(path)
    return path, figures, ternary_layers(model), meta, proto, {t.name: t for t in proto.graph.initializer}


def test_ternary_layers_stay_packed_at_opset_18(export_root, ckpts):
    path, _, layers, meta, proto, initializers = _ternary_export(export_root, ckpts, 18)
    for name, layer in layers.items():
        packed = initializers[f"model.{name}.packed"]
        assert packed.data_type == onnx.TensorProto.UINT8
        assert math.prod(packed.dims) == packed_size(layer.weight.numel())
        assert f"model.{name}.weight" not in initializers
    ops = {node.op_type for node in proto.graph.node}
    assert {"BitShift", "BitwiseAnd", "Gather"} <= ops
    assert json.loads(EdgeModel(path).meta.props["ternary_layers"]) == list(meta["ternary_layers"])


def test_ternary_layers_are_int2_at_opset_25(export_root, ckpts):
    _, figures, layers, _, proto, initializers = _ternary_export(export_root, ckpts, 25)
    for name, layer in layers.items():
        int2 = initializers[f"model.{name}.codes"]
        assert int2.data_type == onnx.TensorProto.INT2
        assert len(int2.raw_data) == packed_size(layer.weight.numel())
        values = numpy_helper.to_array(int2).astype(np.int8)
        assert set(np.unique(values)) <= {-1, 0, 1}
    assert {"DequantizeLinear", "Where"} <= {node.op_type for node in proto.graph.node}
    assert figures["ternary_encoding"] == "int2"


def test_ternary_export_is_much_smaller_when_linear_layers_dominate(tmp_path, ckpts):
    _, meta = load_any_model(ckpts.student)
    torch.manual_seed(1)
    model = HashStudent("test_vit", 4096, 4).eval()  # hash head 64 x 4096 plus the ViT's own Linears
    fp32 = export_onnx(model, {**meta, "bits": 4096}, tmp_path / "fp32.onnx")
    ternarize_(model, TTQConfig())
    ternary_weights = sum(m.weight.numel() for m in ternary_layers(model).values())
    ternary = export_onnx(model, {**meta, "bits": 4096}, tmp_path / "ternary.onnx")
    fp32_bytes, ternary_bytes = fp32.stat().st_size, ternary.stat().st_size
    # Each ternary weight costs 2 bits instead of 32: at least 3.5 of its 4 bytes must be gone from the file.
    assert fp32_bytes - ternary_bytes > 3.5 * ternary_weights
    assert ternary_bytes < fp32_bytes / 3
    assert verify_export(ternary, model, _test_pixels(32))["identical_code_rate"] == 1.0


@pytest.mark.parametrize("opset", [18, 25])
def test_ternary_1x1_conv_head_exports(tmp_path, ckpts, opset):
    _, meta = load_any_model(ckpts.student)
    torch.manual_seed(2)
    model = HashStudent("test_efficientnet", BITS, 4).eval()
    assert "backbone.conv_head" in ternarize_(model)
    path = export_onnx(model, {**meta, "arch": "test_efficientnet"}, tmp_path / "conv.onnx", opset=opset)
    figures = verify_export(path, model, _test_pixels(32))
    assert figures["identical_code_rate"] == 1.0 and figures["ternary_layers"] == 2


def test_pointwise_scope_shrinks_the_whole_model_and_round_trips(tmp_path, ckpts):
    """Every 1x1 conv of a depthwise-separable body ternary: the checkpoint loads back to the same model, and the
    exported file loses most of each ternary weight's 32 bits (these layers are tiny, so each layer's unpacking
    nodes, some hundreds of bytes, weigh; a layer folded back to fp32 would lose nothing)."""
    from hashdistill.checkpoint import save_checkpoint
    from hashdistill.quantize.ternary_checkpoint import save_ternary

    _, meta = load_any_model(ckpts.student)
    meta = {**meta, "arch": "test_efficientnet"}
    torch.manual_seed(3)
    model = HashStudent("test_efficientnet", BITS, 4).eval()
    save_checkpoint(tmp_path / "student.safetensors", model.state_dict(), meta)
    fp32 = export_onnx(model, meta, tmp_path / "fp32.onnx")
    head_only = ternarize_(HashStudent("test_efficientnet", BITS, 4), TTQConfig())
    names = ternarize_(model, TTQConfig(scope="pointwise"))
    assert len(names) > len(head_only) and any(".conv_pw" in n or ".conv_pwl" in n for n in names)
    save_ternary(tmp_path / "ternary.safetensors", model, {**meta, "kind": "ternary-student"})
    loaded, _ = load_any_model(str(tmp_path / "ternary.safetensors"))
    assert list(ternary_layers(loaded)) == list(ternary_layers(model))
    pixels = _test_pixels(32)
    path = export_onnx(loaded, meta, tmp_path / "pointwise.onnx")
    figures = verify_export(path, model, pixels)
    assert figures["identical_code_rate"] == 1.0 and figures["ternary_layers"] == len(names)
    ternary_weights = sum(m.weight.numel() for m in ternary_layers(model).values())
    assert fp32.stat().st_size - path.stat().st_size > 3 * ternary_weights


def test_a_folded_ternary_weight_is_detected(ckpts):
    model, _ = load_any_model(ckpts.ternary)
    wrapper, sizes = edge_graph(model, BITS, "packed")
    name, numel = next(iter(sizes.items()))
    proto = onnx.ModelProto()
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros(numel, np.float32), "folded"))
    with pytest.raises(RuntimeError, match="folded back to fp32"):
        check_ternary_packed(proto, wrapper, sizes)
    genuine = onnx.ModelProto()
    genuine.graph.initializer.append(numpy_helper.from_array(np.zeros(numel, np.float32), "model.hash_head.bias"))
    check_ternary_packed(genuine, wrapper, sizes)  # a real float parameter of that size is fine


def test_metadata_round_trip(export_root, ckpts):
    path, _ = exported(export_root, "teacher")
    model, meta = load_any_model(ckpts.teacher)
    edge = EdgeModel(path)
    assert edge.bits == BITS and edge.input_size == meta["input_size"] == DATA.image_size
    assert edge.class_names == meta["class_names"]
    np.testing.assert_allclose(edge.meta.mean, meta["mean"], rtol=1e-6)
    np.testing.assert_allclose(edge.meta.std, meta["std"], rtol=1e-6)
    np.testing.assert_array_equal(edge.class_codes, codes.pack_codes(model.class_codes.numpy()))
    props = edge.meta.props
    assert props["bit_order"] == "msb-first" and props["channels"] == "3"
    assert (props["kind"], props["arch"], props["recipe_hash"]) == ("teacher", "test_resnet", "0123456789abcdef")
    assert props["hashdistill_version"] == meta["hashdistill_version"]
    assert props["input_format"] == "uint8-nhwc" and props["preprocessing"].startswith("in the graph")
    assert json.loads(props["data"])["dataset"] == "synthetic"
    assert edge.training_data == meta["data"]
    decoded = edge.metadata
    assert decoded["data"] == meta["data"] and decoded["bits"] == BITS and decoded["class_names"] == meta["class_names"]
    assert decoded["ternary_layers"] == [] and decoded["ternary_encoding"] == "none"


def test_export_refuses_to_overwrite_without_force(tmp_path, ckpts):
    from hashdistill.export.verify import export_checkpoint

    target = tmp_path / "model.onnx"
    target.write_bytes(b"keep me")
    model, meta = load_any_model(ckpts.student)
    with pytest.raises(UserError, match="already exists"):
        export_onnx(model, meta, target)
    with pytest.raises(UserError, match="already exists"):
        export_checkpoint(ckpts.student, target)
    assert target.read_bytes() == b"keep me"


def test_bad_opset_and_encoding_are_user_errors(tmp_path, ckpts):
    model, meta = load_any_model(ckpts.student)
    with pytest.raises(UserError, match="opset 17"):
        export_onnx(model, meta, tmp_path / "a.onnx", opset=17)
    with pytest.raises(UserError, match="int2"):
        export_onnx(model, meta, tmp_path / "a.onnx", opset=18, ternary_encoding="int2")
    assert not list(tmp_path.iterdir())


def test_failed_verification_leaves_no_file(tmp_path, ckpts, monkeypatch):
    from hashdistill.export import verify

    monkeypatch.setattr(verify, "MIN_IDENTICAL_CODE_RATE", 1.01)
    with pytest.raises(UserError, match="agree on only"):
        verify.export_checkpoint(ckpts.student, tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_load_any_model_kinds(ckpts, tmp_path):
    for path, kind in ((ckpts.teacher, "teacher"), (ckpts.student, "student"), (ckpts.ternary, "ternary-student")):
        model, meta = load_any_model(path)
        assert meta["kind"] == kind and not model.training
    assert ternary_layers(load_any_model(ckpts.ternary)[0])
    with pytest.raises(UserError, match="'float' checkpoint"):
        load_any_model(ckpts.float_baseline)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        load_any_model(tmp_path / "junk.safetensors")
