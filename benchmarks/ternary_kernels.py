"""Which kernel should run a ternary 1x1 conv: onnxruntime's int8 kernels, or MatMulNBits with 2-bit weights?

A 1x1 conv over an H x W feature map is a [H*W, C_in] x [C_in, C_out] MatMul. For the pointwise shapes of
mobilenetv2_100 at 224 px (b=1), each weight a ternary matrix (half its entries zero), onnxruntime CPU runs:

- ``fp32``: MatMul on float weights;
- ``int8``: the QDQ pattern static int8 writes (uint8 activations, per-column int8 weights), which onnxruntime
  fuses into QLinearMatMul: the MatMul form of the phone model's int8 1x1 convs, which run as QLinearConv
  (export/ternary_int8.py keeps their weights at 2 bits in the .onnx, rebuilt into int8 when onnxruntime loads it);
- ``nbits2`` / ``nbits4``: com.microsoft MatMulNBits, weights at 2 (4) bits in blocks of 32 along C_in with one
  float scale a block: float activations in and out.

All files take turns run by run, 200 timed runs after 10 untimed, 1 thread; median and interquartile range.

    python benchmarks/ternary_kernels.py --out benchmarks/results/ternary_kernels.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from common import git_commit, machine, print_table, write_json
from onnx import TensorProto, helper, numpy_helper
from timing import RUNS, WARMUP, interleaved_stats, timing_session

# (H*W, C_in, C_out) of mobilenetv2_100's 1x1 convs at 224 px: expansions and projections at each resolution
SHAPES = [(12544, 32, 16), (3136, 24, 144), (3136, 144, 24), (784, 192, 32), (196, 64, 384), (196, 384, 64),
          (196, 576, 96), (49, 960, 160), (49, 320, 1280)]
BLOCK = 32  # MatMulNBits' block along C_in


def _model(nodes: list, weights: dict[str, np.ndarray], domains: tuple[str, ...] = ()) -> bytes:
    graph = helper.make_graph(nodes, "kernel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    opsets = [helper.make_opsetid("", 18), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def fp32_model(weight: np.ndarray) -> bytes:
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": weight})


def int8_model(weight: np.ndarray, x: np.ndarray) -> bytes:
    """QuantizeLinear -> DequantizeLinear on the activations and the output, per-column int8 weights: the QDQ
    pattern static int8 writes (ternary columns fit their int8 scale exactly)."""
    column = np.abs(weight).max(axis=0)
    w_scale = np.where(column > 0, column / 127, 1).astype(np.float32)
    quantized = np.clip(np.round(weight / w_scale), -127, 127).astype(np.int8)
    x_scale = np.float32(x.max() / 255)
    y_scale = np.float32(np.abs(x @ weight).max() / 127.5)
    node = helper.make_node
    nodes = [node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1), node("MatMul", ["xd", "wd"], ["m"]),
             node("QuantizeLinear", ["m", "ys", "yz"], ["yq"]), node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    return _model(nodes, {"xs": np.array(x_scale), "xz": np.array(0, np.uint8), "wq": quantized, "ws": w_scale,
                          "wz": np.zeros(weight.shape[1], np.int8), "ys": np.array(y_scale),
                          "yz": np.array(128, np.uint8)})


def nbits_model(weight: np.ndarray, bits: int) -> bytes:
    """MatMulNBits: the weight's columns in blocks of ``BLOCK`` along C_in, ``bits`` a value (zero point the
    default, 2 ** (bits - 1)), one float scale a block, packed little end first."""
    k, n = weight.shape
    blocks = -(-k // BLOCK)
    columns = np.zeros((n, blocks * BLOCK), np.float32)
    columns[:, :k] = weight.T
    by_block = columns.reshape(n, blocks, BLOCK)
    zero = 2 ** (bits - 1)
    peak = np.abs(by_block).max(axis=-1)
    scale = np.where(peak > 0, peak / (zero - 1 if bits > 2 else 1), 1).astype(np.float32)
    values = np.clip(np.round(by_block / scale[..., None]) + zero, 0, 2 ** bits - 1).astype(np.uint8)
    per_byte = 8 // bits
    values = values.reshape(n, blocks, BLOCK // per_byte, per_byte)
    packed = np.zeros(values.shape[:3], np.uint8)
    for i in range(per_byte):
        packed |= values[..., i] << (bits * i)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=BLOCK)
    return _model([node], {"b": packed, "s": scale.reshape(-1)}, ("com.microsoft",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/ternary_kernels.json")
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    args = parser.parse_args()
    started = time.time()
    rng = np.random.default_rng(0)
    rows = []
    for pixels, c_in, c_out in SHAPES:
        signs = rng.integers(-1, 2, (c_in, c_out))
        weight = np.where(signs > 0, 0.03, np.where(signs < 0, -0.05, 0)).astype(np.float32)  # {-Wn, 0, +Wp}
        x = rng.random((pixels, c_in), dtype=np.float32)
        sessions = {name: timing_session(model, threads=1) for name, model in (
            ("fp32", fp32_model(weight)), ("int8", int8_model(weight, x)), ("nbits2", nbits_model(weight, 2)),
            ("nbits4", nbits_model(weight, 4)))}
        stats = interleaved_stats(sessions, {"x": x}, args.runs, args.warmup)
        row = {"pixels": pixels, "c_in": c_in, "c_out": c_out, "stats": stats,
               **{f"{name}_ms": s["median_ms"] for name, s in stats.items()}}
        row.update({f"{name}_vs_int8": row[f"{name}_ms"] / row["int8_ms"] for name in ("fp32", "nbits2", "nbits4")})
        rows.append(row)
    print_table(rows, ["pixels", "c_in", "c_out", "fp32_ms", "int8_ms", "nbits2_ms", "nbits4_ms", "nbits2_vs_int8"])
    totals = {name: sum(r[f"{name}_ms"] for r in rows) for name in ("fp32", "int8", "nbits2", "nbits4")}
    write_json(args.out, {"benchmark": "ternary_kernels", "machine": machine(), "commit": git_commit(),
                          "onnxruntime": ort.__version__, "onnx": onnx.__version__, "threads": 1, "runs": args.runs,
                          "warmup": args.warmup, "block_size": BLOCK, "rows": rows, "total_ms": totals,
                          "nbits2_vs_int8_total": totals["nbits2"] / totals["int8"],
                          "fp32_vs_int8_total": totals["fp32"] / totals["int8"],
                          "kept": min(("int8", "nbits2"), key=totals.__getitem__),
                          "wall_seconds": time.time() - started})


if __name__ == "__main__":
    main()
