"""Ternary layers as int8 weights kept at 2 bits in the file: the int8 kernels run them, the file stays small.

Static int8 quantizes a ternary layer's weight like any other (per output channel): each channel of a ternary
weight then holds at most three int8 values, {neg_c, 0, pos_c} (BatchNorm folded in scales a channel, and a
negative BN scale swaps its signs, so the two values differ per channel). :func:`pack_int8_ternary` stores such a
weight losslessly as its 2-bit codes (``quantize.packing``'s layout) plus a ``[C, 3]`` int8 table, and rebuilds
it in the graph: BitShift + BitwiseAnd -> GatherElements from the table -> the DequantizeLinear the quantizer
wrote. Every input of that rebuild is a constant, so onnxruntime folds it into an int8 initializer when it loads
the file (its constant folding stops at DequantizeLinear) and then fuses DequantizeLinear + Conv into QLinearConv
as for any int8 weight; the ORT-format conversion folds it the same way, so the ``.ort`` holds a byte a weight.

Measured in an exploration (mobilenetv2_100, 224 px, b=1, onnxruntime CPU, 1 thread, 60 runs): 5.75 ms
against 5.90 ms for the same model with its int8 bytes stored, and 13.1 ms when the ternary layers stayed fp32
(left out of quantization because their weights were computed in the graph); codes identical, logits identical.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hashdistill.quantize.packing import pack_ternary

MIN_PACKED_WEIGHTS = 64  # smaller weights gain nothing from 2 bits: the rebuild's nodes outweigh them


def ternary_channels(weight: np.ndarray) -> np.ndarray | None:
    """``[C, 3]`` int8 table (neg_c, 0, pos_c) if each output channel of the int8 ``weight`` holds only zero, one
    positive and one negative value; None otherwise."""
    rows = weight.reshape(weight.shape[0], -1).astype(np.int16)
    pos, neg = rows.max(axis=1, initial=0), rows.min(axis=1, initial=0)
    if not np.all((rows == 0) | (rows == pos[:, None]) | (rows == neg[:, None])):
        return None
    return np.stack([neg, np.zeros_like(neg), pos], axis=1).astype(np.int8)


def pack_int8_ternary(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of the int8 QDQ ``model`` whose ternary int8 weights (those :func:`ternary_channels` recognises along
    the channel axis of the DequantizeLinear they feed) are stored at 2 bits and rebuilt in the graph; also how
    many."""
    packed = onnx.ModelProto()
    packed.CopyFrom(model)
    graph = packed.graph
    stored = {t.name: t for t in graph.initializer}
    nodes, added, replaced = [], [], set()
    for node in graph.node:
        name = node.input[0] if node.op_type == "DequantizeLinear" else None
        tensor = stored.get(name) if name else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if tensor is not None and tensor.data_type == TensorProto.INT8 and name not in replaced:
            weight = numpy_helper.to_array(tensor)
            big = weight.ndim >= 2 and weight.size >= MIN_PACKED_WEIGHTS
            by_channel = np.moveaxis(weight, axis, 0) if big else None  # a MatMul's channels are its columns
            table = ternary_channels(by_channel) if big else None
            if table is not None:
                rebuild, consts = _rebuild(name, by_channel, table, axis % weight.ndim)
                nodes += rebuild
                added += consts
                replaced.add(name)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *added])
    return packed, len(replaced)


def _rebuild(name: str, weight: np.ndarray, table: np.ndarray, axis: int
             ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes that compute the int8 weight under its own ``name`` from 2-bit codes and the per-channel table;
    ``weight`` has its channel ``axis`` moved first, and the rebuild moves it back."""
    signs = np.sign(weight.reshape(weight.shape[0], -1)).astype(np.int8)  # -1 / 0 / +1 -> codes 0 / 1 / 2
    p = f"{name}_ternary"
    consts = {"packed": pack_ternary(signs).numpy(), "table": table, "shifts": np.array([0, 2, 4, 6], np.uint8),
              "mask": np.array(3, np.uint8), "one": np.array([1], np.int64), "flat": np.array([-1], np.int64),
              "start": np.array([0], np.int64), "end": np.array([weight.size], np.int64),
              "rows": np.array(signs.shape, np.int64), "shape": np.array(weight.shape, np.int64)}
    node = helper.make_node
    nodes = [
        node("Unsqueeze", [f"{p}_packed", f"{p}_one"], [f"{p}_bytes"]),
        node("BitShift", [f"{p}_bytes", f"{p}_shifts"], [f"{p}_shifted"], direction="RIGHT"),
        node("BitwiseAnd", [f"{p}_shifted", f"{p}_mask"], [f"{p}_codes4"]),
        node("Reshape", [f"{p}_codes4", f"{p}_flat"], [f"{p}_padded"]),
        node("Slice", [f"{p}_padded", f"{p}_start", f"{p}_end"], [f"{p}_codes"]),
        node("Cast", [f"{p}_codes"], [f"{p}_index"], to=TensorProto.INT64),
        node("Reshape", [f"{p}_index", f"{p}_rows"], [f"{p}_by_channel"]),
        node("GatherElements", [f"{p}_table", f"{p}_by_channel"], [f"{p}_values"], axis=1),
        node("Reshape", [f"{p}_values", f"{p}_shape"], [name if axis == 0 else f"{p}_channels_first"]),
    ]
    if axis:
        perm = list(range(1, weight.ndim))
        perm.insert(axis, 0)
        nodes.append(node("Transpose", [f"{p}_channels_first"], [name], perm=perm))
    return nodes, [numpy_helper.from_array(value, f"{p}_{key}") for key, value in consts.items()]
