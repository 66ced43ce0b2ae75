"""Export a hash model to one self-describing ONNX file for edge inference.

Graph: input ``images`` uint8 [B, H, W, 3] decoded RGB pixels of any size, pre-processed in the graph
(:mod:`.preprocess_graph`, the default), or with ``input_format="float32-nchw"`` float32 [B, 3, S, S]
already pre-processed (the metadata says how); outputs ``codes`` uint8 [B, ceil(k/8)] packed in THE bit order of
:mod:`hashdistill.codes` (computed in-graph) and ``logits`` float32 [B, k]. The batch is dynamic.

Ternary layers stay 2 bits per weight in the file (see :mod:`.graph` for the two encodings). The
exporter's own optimizer is switched off and nothing like onnxsim/onnxslim is run: their constant
folding would turn the in-graph unpacking back into fp32 weights (and onnxscript 0.7 folds the uint8
shift to a mis-typed int8 tensor). onnxruntime still folds and fuses in memory when it loads the file.
After export every float tensor of the file is checked: one with the size of a ternary weight that is
not a genuine float parameter means the packing was folded away, and the export fails.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from hashdistill.atomic import atomic_write_bytes
from hashdistill.errors import UserError

from .graph import CUSTOM_TRANSLATIONS, INT2, PACKED, EdgeGraph, edge_graph
from .metadata import CODES, IMAGE_IN, INPUT, INPUT_FORMATS, LOGITS, build_props, checkpoint_transform
from .preprocess_graph import image_in_model

MIN_OPSET = 18
INT2_MIN_OPSET = 25
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def export_onnx(model: nn.Module, meta: dict[str, Any], path: str | os.PathLike, opset: int = 18, *,
                force: bool = False, ternary_encoding: str | None = None, input_format: str = IMAGE_IN) -> Path:
    """Write ``model`` as a single ONNX file (atomically) with its metadata; returns the path.

    ``input_format``: ``"uint8-nhwc"`` (image in, pre-processing in the graph) or ``"float32-nchw"``.

    ``ternary_encoding``: ``"packed"`` (uint8 + BitShift/BitwiseAnd + Gather, any opset) or ``"int2"``
    (INT2 + DequantizeLinear + Where, opset >= 25); default: int2 from opset 25, packed below.
    """
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to overwrite it")
    encoding = _pick_encoding(opset, ternary_encoding)
    if input_format not in INPUT_FORMATS:
        raise UserError(f"unknown input format '{input_format}'; choose {' or '.join(INPUT_FORMATS)}")
    bits = int(model.bits)
    if meta.get("bits") not in (None, bits):
        raise UserError(f"checkpoint metadata says {meta.get('bits')} bits but the model has {bits}")
    wrapper, ternary_sizes = edge_graph(model, bits, encoding)
    proto = _trace(wrapper, int(meta["input_size"]), opset)
    if encoding == INT2:
        _rewrite_int2(proto, [f"{name}.codes" for name in ternary_sizes])
    check_ternary_packed(proto, wrapper, ternary_sizes)
    _strip_trace_info(proto)
    props = build_props(meta, model.class_codes.detach().cpu().numpy(),
                        ternary_layers=[name.removeprefix("model.") for name in ternary_sizes],
                        ternary_encoding=encoding if ternary_sizes else "none", input_format=input_format)
    if input_format == IMAGE_IN:
        proto = image_in_model(proto, checkpoint_transform(meta))
    helper.set_model_props(proto, props)
    return atomic_write_bytes(path, proto.SerializeToString())


def _pick_encoding(opset: int, requested: str | None) -> str:
    latest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= latest:
        raise UserError(f"opset {opset} is not supported; choose {MIN_OPSET} to {latest}")
    encoding = requested or (INT2 if opset >= INT2_MIN_OPSET else PACKED)
    if encoding not in (PACKED, INT2):
        raise UserError(f"unknown ternary encoding '{encoding}'; choose {PACKED} or {INT2}")
    if encoding == INT2 and opset < INT2_MIN_OPSET:
        raise UserError(f"the int2 ternary encoding needs opset >= {INT2_MIN_OPSET} (got {opset}); use packed")
    return encoding


def _trace(wrapper: EdgeGraph, size: int, opset: int) -> onnx.ModelProto:
    """torch.export-based export with a dynamic batch; no optimizer pass (see the module docstring)."""
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, (example,), input_names=[INPUT], output_names=[CODES, LOGITS], opset_version=opset,
            dynamo=True, external_data=False, optimize=False, dynamic_shapes={"images": {0: batch}},
            custom_translation_table=CUSTOM_TRANSLATIONS, verbose=False)
    return program.model_proto


def _rewrite_int2(proto: onnx.ModelProto, names: list[str]) -> None:
    """Turn each int8 code initializer and its Cast into an INT2 initializer and a DequantizeLinear."""
    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for name in names:
        users = [node for node in graph.node if name in node.input]
        if name not in initializers or len(users) != 1 or users[0].op_type != "Cast":
            raise RuntimeError(f"INT2 rewrite: expected initializer {name} read by one Cast node")
        codes = numpy_helper.to_array(initializers[name])
        initializers[name].CopyFrom(numpy_helper.from_array(codes.astype(ml_dtypes.int2), name))
        scale, zero = f"{name}.scale", f"{name}.zero_point"
        graph.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), scale),
                                  numpy_helper.from_array(np.array(0, ml_dtypes.int2), zero)])
        cast = users[0]
        cast.CopyFrom(helper.make_node("DequantizeLinear", [name, scale, zero], list(cast.output), name=cast.name))
        for info in (*graph.input, *graph.value_info):
            if info.name == name:
                info.type.tensor_type.elem_type = onnx.TensorProto.INT2
    if names:
        proto.ir_version = max(proto.ir_version, helper.find_min_ir_version_for(proto.opset_import))


def _strip_trace_info(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and scopes: most of the file's bytes, and local paths."""
    graph = proto.graph
    for item in (*graph.node, *graph.value_info, *graph.input, *graph.output, *graph.initializer):
        del item.metadata_props[:]
        item.doc_string = ""


def check_ternary_packed(proto: onnx.ModelProto, wrapper: nn.Module, ternary_sizes: dict[str, int]) -> None:
    """Raise if a float tensor in the file has a ternary weight's size without being a float parameter."""
    sizes = set(ternary_sizes.values())
    genuine = {name for name, tensor in wrapper.state_dict().items() if tensor.is_floating_point()}
    tensors = [*proto.graph.initializer,
               *(attr.t for node in proto.graph.node if node.op_type == "Constant" for attr in node.attribute
                 if attr.type == onnx.AttributeProto.TENSOR)]
    for tensor in tensors:
        if tensor.data_type in FLOAT_TYPES and math.prod(tensor.dims) in sizes and tensor.name not in genuine:
            raise RuntimeError(f"exported graph holds a dense float tensor '{tensor.name}' {list(tensor.dims)} the "
                               "size of a ternary weight: the packed codes were folded back to fp32")
