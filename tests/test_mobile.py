"""Phone files: int8 weights for the float layers (ternary layers stay packed) and the ORT format, checked in
onnxruntime on real exports of the shared test checkpoints."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from cli_support import refused
from test_export_support import checkpoints

from hashdistill.checkpoint import read_metadata
from hashdistill.cli import main
from hashdistill.export.index import build_index, search_images
from hashdistill.export.mobile import float_initializer_bytes, mobile_outputs
from hashdistill.export.runtime import EdgeModel
from hashdistill.export.verify import export_checkpoint, reference_pixels


@pytest.fixture(scope="module")
def phone_export(export_root, tmp_path_factory):
    """The ternary student exported plain, and with --int8 --mobile."""
    ternary = checkpoints(export_root).ternary
    folder = tmp_path_factory.mktemp("phone")
    plain = export_checkpoint(ternary, folder / "plain.onnx")
    small = export_checkpoint(ternary, folder / "phone.onnx", int8=True, mobile=True)
    return {"ternary": ternary, "folder": folder, "plain": plain, "small": small}


def test_int8_file_is_checked_runs_and_keeps_the_codes(phone_export):
    small = phone_export["small"]
    path = phone_export["folder"] / "phone.onnx"
    onnx.checker.check_model(str(path))
    assert small["identical_code_rate"] == 1.0  # the float graph against PyTorch, before quantization
    assert small["int8"]["identical_code_rate_vs_float_onnx"] >= 0.95
    assert small["file_bytes"] == path.stat().st_size < phone_export["plain"]["file_bytes"]
    edge = EdgeModel(path)
    assert edge.bits == EdgeModel(phone_export["folder"] / "plain.onnx").bits
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops  # the float layers really are int8 now


def test_int8_never_folds_the_ternary_layers_back_to_fp32(phone_export):
    """A pass that constant-folded the in-graph unpacking would store every ternary weight as fp32 again."""
    meta = read_metadata(phone_export["ternary"])
    ternary_fp32 = sum(4 * int(np.prod(info["shape"])) for info in meta["ternary_layers"].values())
    path = phone_export["folder"] / "phone.onnx"
    assert float_initializer_bytes(path) < ternary_fp32 / 4
    packed = [t for t in onnx.load(str(path)).graph.initializer if t.name.endswith(".packed")]
    assert packed and all(t.data_type == onnx.TensorProto.UINT8 for t in packed)


def test_ort_file_loads_and_gives_the_same_codes(phone_export):
    folder = phone_export["folder"]
    ort_path, ops_path, usability = mobile_outputs(folder / "phone.onnx")
    assert phone_export["small"]["mobile"]["identical_code_rate_vs_onnx"] == 1.0
    assert ops_path.read_text().count("ai.onnx;") >= 3 and "partitions" in usability.read_text()
    images = np.stack(reference_pixels(read_metadata(phone_export["ternary"]), limit=32))
    from_ort, from_onnx = EdgeModel(ort_path), EdgeModel(folder / "phone.onnx")
    assert from_ort.metadata["bits"] == from_onnx.metadata["bits"]
    np.testing.assert_array_equal(from_ort.run(images)[0], from_onnx.run(images)[0])
    assert ort_path.stat().st_size < 2 * (folder / "phone.onnx").stat().st_size  # nothing folded to fp32 here either


def test_an_ort_model_builds_and_queries_an_index(phone_export, tmp_path):
    ort_path = mobile_outputs(phone_export["folder"] / "phone.onnx")[0]
    index = build_index(ort_path, "synthetic:test", tmp_path / "i.npz")
    result = search_images(index, "synthetic:test", k=1)
    assert (result.distances[:, 0] == 0).all()


def test_cli_export_for_phones(export_root, tmp_path, capsys):
    ternary = checkpoints(export_root).ternary
    out = tmp_path / "m.onnx"
    assert main(["export", str(ternary), "-o", str(out), "--int8", "--mobile"]) == 0
    printed = capsys.readouterr().out
    assert "identical_code_rate_vs_float_onnx" in printed and "ort_file_bytes" in printed
    out.unlink()  # the .ort and its config remain: refused without --force
    refused(capsys, tmp_path, "export", ternary, "-o", out, "--mobile", expect="m.ort already exists")


def test_the_output_is_the_onnx_file_and_export_file_a_plain_name(export_root, tmp_path, capsys):
    from hashdistill.errors import UserError
    from hashdistill.recipe import ExportConfig

    refused(capsys, tmp_path, "export", checkpoints(export_root).ternary, "-o", tmp_path / "m.ort", "--mobile",
            expect="name the .onnx file; --mobile writes the .ort file beside it")
    for bad in ("exports/model.onnx", "model.ONNX", ".model.onnx", "model"):
        with pytest.raises(UserError, match="export.file|plain file name"):
            ExportConfig(file=bad)
