"""THE evaluation pre-processing as an ONNX graph, and the one session that runs it (onnx, onnxruntime, numpy).

Input ``images``: uint8 [N, H, W, 3], RGB, the layout apps and image decoders hold pixels in (Android
bitmaps, CoreGraphics, PIL and OpenCV all give height x width x channel), so a phone app hands its
decoded pixels over without a transpose or a float conversion of its own. N, H and W are dynamic;
every image of one batch has the same H and W. Output: float32 [N, 3, S, S], normalised.

Why training-time evaluation runs this graph too (:meth:`EvalTransform.apply`): the resize rounds to uint8 as
PIL does, and two implementations of that rounding (torch's, onnxruntime's) disagree on a grey level here and
there, which flips a code now and then; one graph run by both means the PyTorch model and the exported file see
the same pixels, bit for bit. The graph sits in the kernel so the kernel never imports the export stage; the
export stage puts it in front of a float-input model (:mod:`hashdistill.export.preprocess_graph`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "images"  # the graph's input: the exported models' input name too
PIXELS = "pixels"  # the graph's output: the float model input


def preprocess_graph(transform, opset: int = 18, ir_version: int | None = None) -> onnx.ModelProto:
    """A model from uint8 ``images`` [N, H, W, 3] to normalised float ``pixels`` [N, 3, S, S]."""
    size = transform.input_size
    consts = {
        **_resize_consts(transform), "crop": np.array(size, np.int64),
        "two": np.array(2, np.int64), "four": np.array(4, np.int64), "three_rest": np.array(3, np.int64),
        **normalisation_consts(transform.mean, transform.std),
        "zeros": np.zeros(3, np.float32), "ones": np.ones(3, np.float32),
    }
    node = helper.make_node
    nodes = [  # the resize and the crop on the uint8 NHWC pixels: PIL's rounding, and 3 bytes a pixel moved
        *_resize_nodes(),
        node("Sub", ["resized_hw", "crop"], ["spare"]),
        node("Div", ["spare", "two"], ["half"]),  # torchvision's round(spare / 2), halves to even: one more
        node("Mod", ["spare", "four"], ["rest"]),  # where spare = 3 mod 4 (1.5 -> 2, 3.5 -> 4; 0.5 -> 0, 2.5 -> 2)
        node("Equal", ["rest", "three_rest"], ["rounds_up"]),
        node("Cast", ["rounds_up"], ["bump"], to=TensorProto.INT64),
        node("Add", ["half", "bump"], ["starts"]),
        node("Add", ["starts", "crop"], ["ends"]),
        node("Slice", ["resized", "starts", "ends", "hw_axes"], ["cropped"]),
        node("Transpose", ["cropped"], ["nchw"], perm=[0, 3, 1, 2]),
        node("Cast", ["nchw"], ["as_float"], to=TensorProto.FLOAT),
        # (x / 255 - mean) / std as one per-channel affine: onnxruntime's int8 models run their first layers in
        # NHWC and move the Transpose above the normalisation, where broadcast Sub and Div over the last axis
        # cost 0.75 ms each at 224 px (mobilenetv2_100's phone model, 1 thread); BatchNormalization costs 0.06
        # ms in either layout. Its pixels differ from the three steps' by at most 5e-7.
        node("BatchNormalization", ["as_float", "pixel_scale", "zeros", "pixel_mean", "ones"], [PIXELS],
             epsilon=0.0),
    ]
    output = helper.make_tensor_value_info(PIXELS, TensorProto.FLOAT, ["batch", 3, size, size])
    return _model(nodes, consts, output, opset, ir_version)


def normalisation_consts(mean: Sequence[float], std: Sequence[float]) -> dict[str, np.ndarray]:
    """The normalisation's constants as the graph stores them: ``pixel_mean`` = 255 mean and ``pixel_scale`` =
    1 / (255 std), so that pixels = (x - pixel_mean) pixel_scale on the uint8 values x."""
    # float32 first: a file's metadata holds them as float32 values, and the constants must not depend on that
    mean, std = (np.asarray(v, np.float32).astype(np.float64) for v in (mean, std))
    return {"pixel_mean": (255 * mean).astype(np.float32), "pixel_scale": (1 / (255 * std)).astype(np.float32)}


def normalisation_of(consts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) from a graph's normalisation constants, this version's (:func:`normalisation_consts`) or the
    earlier Sub / Div ones (``mean``, ``std``); None if neither is there."""
    if "pixel_mean" in consts and "pixel_scale" in consts:
        return consts["pixel_mean"] / 255, 1 / (255 * consts["pixel_scale"])
    if "mean" in consts and "std" in consts:
        return consts["mean"], consts["std"]
    return None


def resize_graph(transform) -> onnx.ModelProto:  # noqa: ANN001 - an EvalTransform
    """Step 1 alone, uint8 ``images`` [N, H, W, 3] -> uint8 ``resized`` [N, H', W', 3]: the very nodes of
    :func:`preprocess_graph`, run on the host to shrink a photo before it is batched. The full graph resizes
    their output to itself, exactly (onnxruntime's resize at scale 1 is the identity), so codes do not change."""
    output = helper.make_tensor_value_info("resized", TensorProto.UINT8, ["batch", "height", "width", 3])
    return _model(_resize_nodes(), _resize_consts(transform), output, 18, None)


def _resize_consts(transform) -> dict[str, np.ndarray]:  # noqa: ANN001
    return {"resize_size": np.array(transform.resize_size, np.int64), "three": np.array([3], np.int64),
            "idx_n": np.array([0], np.int64), "hw_axes": np.array([1, 2], np.int64)}


def _resize_nodes() -> list[onnx.NodeProto]:
    """Shorter side to ``resize_size``, the longer by floor(size * long / short), bilinear with antialiasing."""
    node = helper.make_node
    return [
        node("Shape", [INPUT], ["shape"]),
        node("Gather", ["shape", "idx_n"], ["n"], axis=0),
        node("Gather", ["shape", "hw_axes"], ["hw"], axis=0),
        node("ReduceMin", ["hw"], ["short"], keepdims=0),
        node("Mul", ["hw", "resize_size"], ["hw_scaled"]),
        node("Div", ["hw_scaled", "short"], ["resized_hw"]),  # integer division: floor for positive sides
        node("Concat", ["n", "resized_hw", "three"], ["sizes"], axis=0),
        node("Resize", [INPUT, "", "", "sizes"], ["resized"], mode="linear", antialias=1, exclude_outside=1,
             coordinate_transformation_mode="half_pixel"),
    ]


def _model(nodes: list, consts: dict[str, np.ndarray], output, opset: int,  # noqa: ANN001
           ir_version: int | None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "hashdistill_preprocess",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", "height", "width", 3])], [output],
        initializer=[numpy_helper.from_array(value, name) for name, value in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 18))])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def preprocess_session(transform):  # noqa: ANN001, ANN201 - an EvalTransform -> its onnxruntime session
    """The onnxruntime session of ``transform``'s graph, made once per set of parameters."""
    return _session(*_key(transform), preprocess_graph)


def resize_session(transform):  # noqa: ANN001, ANN201
    """The onnxruntime session of ``transform``'s step 1 (:func:`resize_graph`), made once per set of parameters."""
    return _session(*_key(transform), resize_graph)


def _key(transform) -> tuple:  # noqa: ANN001
    """The transform's parameters as a hashable key (its mean and std may arrive as lists)."""
    return transform.input_size, transform.crop_pct, tuple(transform.mean), tuple(transform.std), type(transform)


@functools.lru_cache(maxsize=16)
def _session(input_size, crop_pct, mean, std, kind, build):  # noqa: ANN001, ANN202
    """One thread: a small, memory-bound step that evaluation's data loader workers run beside the model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    graph = build(kind(input_size, crop_pct, mean, std))
    return ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
