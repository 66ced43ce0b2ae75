"""Phone-sized, phone-ready files from an exported model, with onnxruntime's own tools.

- ``quantize_int8``: ``onnxruntime.quantization.quantize_dynamic`` stores the float weights that feed MatMul,
  Gemm and Conv as int8, and quantizes activations at run time (dynamic: no calibration images needed).
  The ternary layers compute their weights in the graph from 2-bit packed codes, so they are no float
  initializer and stay packed; :func:`float_initializer_bytes` lets a caller check that nothing folded them
  back to fp32.
- ``to_mobile``: the ORT format (``.ort``, what onnxruntime's mobile builds load) via
  ``onnxruntime.tools.convert_onnx_models_to_ort``, the required-operators config for a reduced build, and the
  report of ``onnxruntime.tools.check_onnx_model_mobile_usability`` beside the model.

The conversion tools run as subprocesses (their command lines are their stable interface) in a private
temporary folder; the results are moved next to the model only when all of them exist.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from hashdistill.atomic import atomic_write_bytes, atomic_write_text
from hashdistill.errors import UserError

ORT_SUFFIX, OPS_SUFFIX, USABILITY_SUFFIX = ".ort", ".required_operators.config", ".mobile-usability.txt"
TOOL_TIMEOUT_S = 600
WEIGHTED = ["MatMul", "Gemm", "Conv"]  # the ops whose float weights int8 quantization stores as int8


def mobile_outputs(onnx_path: str | os.PathLike) -> list[Path]:
    """The files ``to_mobile`` writes beside ``model.onnx``: model.ort, its operator config, the usability report."""
    path = Path(onnx_path)
    stem = path.with_suffix("")
    return [path.with_suffix(ORT_SUFFIX), Path(f"{stem}{OPS_SUFFIX}"), Path(f"{stem}{USABILITY_SUFFIX}")]


def quantize_int8(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """int8 weights for the float MatMul/Gemm/Conv layers of ``source``; metadata_props carried over."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = Path(source), Path(target)
    original = onnx.load(str(source))
    with tempfile.TemporaryDirectory(prefix=".hashdistill-int8.") as tmp:
        staged, prepared = Path(tmp) / target.name, Path(tmp) / f"prepared-{target.name}"
        onnx.save(fold_weight_shapes(original), str(prepared))
        try:
            quantize_dynamic(str(prepared), str(staged), weight_type=QuantType.QInt8, op_types_to_quantize=WEIGHTED,
                             nodes_to_exclude=computed_weight_nodes(original))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises many exception types
            raise UserError(f"{source}: onnxruntime's int8 quantization failed ({exc})") from None
        proto = onnx.load(str(staged))
    onnx.helper.set_model_props(proto, {p.key: p.value for p in original.metadata_props})
    return atomic_write_bytes(target, proto.SerializeToString())


def fold_weight_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``Shape`` nodes of initializers are constants: the exporter reads some weights'
    shapes in the graph, and a float weight still read there stays in the file beside its int8 copy."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    shapes = {t.name: list(t.dims) for t in folded.graph.initializer}
    nodes = []
    for node in folded.graph.node:
        if node.op_type == "Shape" and node.input[0] in shapes:
            bounds = {a.name: a.i for a in node.attribute}  # Shape's optional start / end (opset 15+)
            dims = shapes[node.input[0]][bounds.get("start", 0): bounds.get("end", None)]
            value = numpy_helper.from_array(np.array(dims, dtype=np.int64), node.output[0])
            node = onnx.helper.make_node("Constant", [], [node.output[0]], name=node.name, value=value)
        nodes.append(node)
    del folded.graph.node[:]
    folded.graph.node.extend(nodes)
    return folded


def computed_weight_nodes(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm/Conv nodes whose weight is computed in the graph (the ternary layers): left to themselves."""
    stored = {t.name for t in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type in WEIGHTED and len(node.input) > 1 and node.input[1] not in stored]


def float_initializer_bytes(path: str | os.PathLike) -> int:
    """Bytes of the float32 initializers of an ONNX file (what int8 quantization shrinks)."""
    model = onnx.load(str(path))
    floats = (t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    return sum(numpy_helper.to_array(t).nbytes for t in floats)


def to_mobile(onnx_path: str | os.PathLike) -> dict[str, Path]:
    """Convert ``onnx_path`` to the ORT format beside it, with the operator config and the usability report."""
    path = Path(onnx_path)
    ort_path, ops_path, usability_path = mobile_outputs(path)
    with tempfile.TemporaryDirectory(prefix=".hashdistill-ort.") as tmp:
        work = Path(tmp)
        shutil.copy(path, work / path.name)
        # No graph optimization at conversion: constant folding would turn the packed ternary layers back into
        # fp32 weights in the file (the runtime still optimizes in memory when it loads the model).
        converted = _tool("convert_onnx_models_to_ort", str(work / path.name), "--output_dir", str(work / "out"),
                          "--optimization_style", "Fixed",
                          env={"ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL": "disable"})
        stem = glob.escape(path.stem)
        made_ort = sorted((work / "out").glob(f"{stem}*{ORT_SUFFIX}"))
        made_ops = sorted((work / "out").glob(f"{stem}.required_operators*.config"))
        if len(made_ort) != 1 or len(made_ops) != 1:
            raise UserError(f"{path}: onnxruntime's ORT-format conversion produced no model ({converted[-300:]})")
        made_ort, made_ops = made_ort[0], made_ops[0]
        report = _tool("check_onnx_model_mobile_usability", str(work / path.name))
        atomic_write_bytes(ort_path, made_ort.read_bytes())
        atomic_write_bytes(ops_path, made_ops.read_bytes())
        atomic_write_text(usability_path, report)
    return {"ort": ort_path, "required_operators": ops_path, "mobile_usability": usability_path}


def _tool(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run one of onnxruntime.tools' command-line tools; its combined output, or a UserError if it fails."""
    try:
        done = subprocess.run([sys.executable, "-m", f"onnxruntime.tools.{name}", *args], capture_output=True,
                              text=True, timeout=TOOL_TIMEOUT_S, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        raise UserError(f"onnxruntime.tools.{name} did not finish within {TOOL_TIMEOUT_S} s") from None
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise UserError(f"onnxruntime.tools.{name} failed (exit {done.returncode}): {' '.join(output.split())[-300:]}")
    return output
