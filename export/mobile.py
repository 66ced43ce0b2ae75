"""Phone-sized, phone-ready files from an exported model, with onnxruntime's own tools.

- ``quantize_int8``: onnxruntime's quantizer stores float weights as int8.
  Static (the default when calibration images are given; ``quantize_static``, QDQ, weights per channel,
  activation ranges from the 99.99th percentile over the calibration images): the ternary layers are folded
  first and quantized like the others, the activations between convs too (Relu, Clip, HardSwish, HardSigmoid,
  Sigmoid: ``STATIC_OPS``), linear layers' outputs left float (``FLOAT_OUTPUT_OPS``), so onnxruntime runs
  QLinearConv chains; the ternary weights are then stored back at 2 bits
  (:mod:`.ternary_int8`). Dynamic needs no images, quantizes activations at run time and falls back to slow
  ConvInteger kernels (measured on lcnet_075, batch 64: static 20-23 ms, dynamic 175-190 ms); its ternary layers
  stay as computed in the graph. :func:`float_initializer_bytes` lets a caller check that nothing folded them
  back to fp32.
- ``to_mobile``: the ORT format (``.ort``, what onnxruntime's mobile builds load), optimized first and saved by
  onnxruntime itself (``optimized_model_filepath`` with ``session.save_model_format=ORT``), the
  required-operators config for a reduced build (``onnxruntime.tools.ort_format_model``), and the report of
  ``onnxruntime.tools.check_onnx_model_mobile_usability`` beside the model.

Why the .ort is optimized before it is saved, and what that costs: onnxruntime applies no graph optimization when
it loads an ORT-format file (only "saved runtime optimizations", the QDQ fusions), so an .ort saved unoptimized
runs the int8 model as separate float QuantizeLinear / DequantizeLinear steps (measured 16x slower than the int8
.onnx at batch 1, with codes off on 0.2% of images). Saved at the "extended" level, the .ort holds the fused int8
kernels (QLinearConv and the like) and runs as fast as the .onnx, with its codes. The "all" level would add
this CPU's NCHWc layouts, which another device cannot run, and the "Runtime" style leaves the fusions to be
replayed at load time only where a session asks for it. The one thing the .ort cannot keep is the 2-bit storage
of the ternary layers: the conversion folds their rebuild into int8 initializers, a byte a weight (an .ort that
kept the rebuild would run it at every inference: measured 14x slower at batch 1 for the fp32 rebuild). The
smallest file to download stays the .onnx.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from hashdistill.atomic import atomic_write_bytes, atomic_write_text
from hashdistill.errors import UserError
from hashdistill.untrusted import short

from .images import ImageLike, as_items, decode_batches
from .metadata import INPUT
from .runtime import EdgeModel
from .ternary_int8 import pack_int8_ternary

ORT_SUFFIX, OPS_SUFFIX, USABILITY_SUFFIX = ".ort", ".required_operators.config", ".mobile-usability.txt"
TOOL_TIMEOUT_S = 600
WEIGHTED = ["MatMul", "Gemm", "Conv"]  # the ops whose float weights int8 quantization stores as int8
# Static int8 also quantizes the activations between the convs, so that onnxruntime fuses them into its int8
# kernels instead of dequantizing around each. Chosen in an exploration at 224 px, b=1, random weights (60
# interleaved runs, before the normalisation became one BatchNormalization): with the activations, 0.60 / 0.57 /
# 0.86 / 1.07x the fp32 student at 1 thread for mobilenetv2_100 / efficientnet_lite0 /
# tf_mobilenetv3_large_minimal_100 / mobilenetv3_large_100, against 0.77 / 0.72 / 1.04 / 1.16x with the weighted
# ops alone; Add, Mul and the pools as well gained at most 0.01x and made a small test model lose 99% of its codes,
# so they stay float. The benchmark's figures of the shipped op set: export.json's section_224 (BENCHMARKS.md).
STATIC_OPS = [*WEIGHTED, "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid"]
# Linear layers keep a float output (their weights and inputs are still int8: onnxruntime runs MatMulIntegerToFloat).
# With a quantized output, an attention's scores ran DequantizeLinear -> Softmax -> QuantizeLinear, which
# onnxruntime-web 1.31 fuses into a kernel whose values differ from onnxruntime CPU's (a probe read 255 for every
# probability of 0.2), so the browser's codes differed from Python's; the hash head's output, whose signs are the
# code, is also exact in float. The small test model keeps 100% of its codes under static int8 this way, not 81.7%.
FLOAT_OUTPUT_OPS = ["MatMul", "Gemm"]
STATIC, DYNAMIC = "static", "dynamic"
INT8_MODES = (STATIC, DYNAMIC)
# One image per calibration feed: onnxruntime's histogram calibrators stack each tensor's values over the feeds,
# which fails when feeds differ in batch size (image folders hold images of many sizes).
CALIBRATION_BATCH = 1
CALIBRATION_PERCENTILE = 99.99  # activation range: one outlier pixel should not coarsen every other step
CALIBRATION_STRIDE = 8  # images whose activations the calibrator holds at once before folding them into histograms


def mobile_outputs(onnx_path: str | os.PathLike) -> list[Path]:
    """The files ``to_mobile`` writes beside ``model.onnx``: model.ort, its operator config, the usability report."""
    path = Path(onnx_path)
    stem = path.with_suffix("")
    return [path.with_suffix(ORT_SUFFIX), Path(f"{stem}{OPS_SUFFIX}"), Path(f"{stem}{USABILITY_SUFFIX}")]


def quantize_int8(source: str | os.PathLike, target: str | os.PathLike,
                  calibration: Sequence[ImageLike] | None = None) -> Path:
    """int8 weights for the float MatMul/Gemm/Conv layers of ``source`` (static: their activations and those of
    ``STATIC_OPS`` too); metadata_props carried over.

    ``calibration``: images (paths or uint8 arrays, any sizes) from the training data: static quantization with
    activation ranges measured on them, the ternary layers folded and quantized too, then stored back at 2 bits
    (:mod:`.ternary_int8`); None: dynamic, the ternary layers left to themselves.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = Path(source), Path(target)
    original = onnx.load(str(source))
    with tempfile.TemporaryDirectory(prefix=".hashdistill-int8.") as tmp:
        staged, prepared = Path(tmp) / target.name, Path(tmp) / f"prepared-{target.name}"
        try:
            if calibration is None:
                onnx.save(fold_batch_norms(fold_weight_shapes(original)), str(prepared))
                with quiet_quantizer():
                    quantize_dynamic(str(prepared), str(staged), weight_type=QuantType.QInt8,
                                     op_types_to_quantize=WEIGHTED, nodes_to_exclude=computed_weight_nodes(original))
                proto = onnx.load(str(staged))
            else:
                _fold_ternary(source, prepared)
                _quantize_static(prepared, staged, calibration)
                proto, _ = pack_int8_ternary(onnx.load(str(staged)))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises many exception types
            raise UserError(f"{source}: onnxruntime's int8 quantization failed ({exc})") from None
    onnx.helper.set_model_props(proto, {p.key: p.value for p in original.metadata_props})
    return atomic_write_bytes(target, proto.SerializeToString())


def _fold_ternary(source: Path, target: Path) -> None:
    """``source`` with its ternary weights (computed in the graph) folded into constants and BatchNorms into the
    convs: onnxruntime's basic level, the very fold its session makes in memory, so the quantizer sees every
    weight as stored. ConstantSharing is off: it would merge the pre-processing's constants into others', and the
    file would no longer show the pre-processing its metadata describes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["ConstantSharing"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UserError(f"{source}: onnxruntime could not fold its ternary layers ({short(str(exc))})") from None


class CalibrationFeeds:
    """onnxruntime's calibration reader over ``images``, decoding one image per feed as it is asked for.

    With ``CalibStridedMinMax`` onnxruntime's calibrator asks for ``stride`` feeds at a time (``set_range``),
    folds their activations into its per-tensor histograms and drops them before the next range: memory holds
    one stride's activations, never every image's (256 images of a 224-px mobilenetv3 took 14 GB that way).
    ``len`` is rounded up to a whole number of strides, as onnxruntime requires; the last range is short.
    """

    def __init__(self, model_path: Path, images: Sequence[ImageLike], stride: int):
        if not images:
            raise UserError("static int8 quantization needs at least one calibration image")
        self.edge, self.items, self.stride = EdgeModel(model_path), as_items(images), stride
        self.position, self.end = 0, len(self.items)

    def __len__(self) -> int:
        return -(-len(self.items) // self.stride) * self.stride

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position, self.end = start_index, min(end_index, len(self.items))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        _, pixels = next(decode_batches([self.items[self.position]], self.edge.meta.transform, CALIBRATION_BATCH))
        self.position += 1
        return {INPUT: self.edge.graph_input(pixels)}


def _quantize_static(source: Path, target: Path, calibration: Sequence[ImageLike]) -> None:
    """QDQ int8 of the ``STATIC_OPS`` with per-channel weights and percentile activation ranges over the
    ``calibration`` images, streamed ``CALIBRATION_STRIDE`` images at a time."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    feeds = CalibrationFeeds(source, calibration, CALIBRATION_STRIDE)
    with quiet_quantizer():
        quantize_static(str(source), str(target), feeds, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=STATIC_OPS,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"OpTypesToExcludeOutputQuantization": FLOAT_OUTPUT_OPS,
                                       "CalibPercentile": CALIBRATION_PERCENTILE,
                                       "CalibStridedMinMax": CALIBRATION_STRIDE})


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """Keep the calibrator's progress prints and its advice to pre-process off a command's output (its
    pre-processing would rewrite the in-graph image pre-processing the runtime checks; failures still raise)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


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


def fold_batch_norms(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with each BatchNormalization folded into the Conv it alone follows, where both hold
    stored weights: int8 then quantizes the weights the model really applies, and no fp32 BN parameters stay
    in the file (onnxruntime makes the same fusion when it loads a float file; its quantizer runs before that).
    Ternary convs (weights computed in the graph) keep their BN."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    stored = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    readers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    producers = {out: node for node in nodes for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    replaced, dropped = {}, set()
    for index, bn in enumerate(nodes):
        conv = producers.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if (conv is None or conv.op_type != "Conv" or len(bn.output) != 1 or len(conv.input) != 3
                or any(readers.get(name) != 1 for name in conv.input[1:]) or readers.get(conv.output[0]) != 1
                or conv.output[0] in graph_outputs
                or not all(name in stored for name in [*conv.input[1:], *bn.input[1:]])
                or any(a.name == "training_mode" and a.i for a in bn.attribute)):
            continue
        epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        weight, bias = (numpy_helper.to_array(stored[name]) for name in conv.input[1:])
        scale, shift, mean, var = (numpy_helper.to_array(stored[name]) for name in bn.input[1:])
        factor = scale / np.sqrt(var + epsilon)
        for name, value in ((conv.input[1], weight * factor.reshape(-1, *[1] * (weight.ndim - 1))),
                            (conv.input[2], (bias - mean) * factor + shift)):
            replaced[name] = numpy_helper.from_array(value.astype(weight.dtype), name)
        conv.output[0] = bn.output[0]
        dropped.add(index)
    nodes = [node for index, node in enumerate(nodes) if index not in dropped]
    read = {name for node in nodes for name in node.input} | graph_outputs
    initializers = [replaced.get(t.name, t) for t in graph.initializer if t.name in read]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
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
    """Convert ``onnx_path`` to the ORT format beside it, with the operator config and its usability report."""
    import onnxruntime as ort
    from onnxruntime.tools.ort_format_model.utils import create_config_from_models

    path = Path(onnx_path)
    ort_path, ops_path, usability_path = mobile_outputs(path)
    with tempfile.TemporaryDirectory(prefix=".hashdistill-ort.") as tmp:
        work = Path(tmp)
        made_ort, made_ops = work / f"{path.stem}{ORT_SUFFIX}", work / "required_operators.config"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable fusions
        options.optimized_model_filepath = str(made_ort)
        options.add_session_config_entry("session.save_model_format", "ORT")
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            create_config_from_models([made_ort], made_ops, enable_type_reduction=False)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UserError(f"{path}: onnxruntime could not save it in the ORT format ({short(str(exc))})") from None
        if not made_ort.is_file() or not made_ops.is_file():
            raise UserError(f"{path}: onnxruntime's ORT-format conversion produced no model")
        report = _tool("check_onnx_model_mobile_usability", str(path))
        atomic_write_bytes(ort_path, made_ort.read_bytes())
        atomic_write_text(ops_path, made_ops.read_text().replace(str(made_ort), ort_path.name))
        atomic_write_text(usability_path, report)
    return {"ort": ort_path, "required_operators": ops_path, "mobile_usability": usability_path}


def required_operators(config: str | os.PathLike) -> set[str]:
    """The operator names a required-operators config lists (``domain;opset;Op1,Op2`` lines)."""
    names = set()
    for line in Path(config).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            names |= set(line.split(";")[-1].split(","))
    return names


def _tool(name: str, *args: str) -> str:
    """Run one of onnxruntime.tools' command-line tools; its combined output, or a UserError if it fails."""
    try:
        done = subprocess.run([sys.executable, "-m", f"onnxruntime.tools.{name}", *args], capture_output=True,
                              text=True, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"onnxruntime.tools.{name} did not finish within {TOOL_TIMEOUT_S} s") from None
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise UserError(f"onnxruntime.tools.{name} failed (exit {done.returncode}): {' '.join(output.split())[-300:]}")
    return output
