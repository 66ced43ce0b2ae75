"""The evaluation pre-processing of :mod:`hashdistill.preprocessing` as an ONNX graph (onnx + numpy only).

Input ``images``: uint8 [N, H, W, 3], RGB, the layout apps and image decoders hold pixels in (Android
bitmaps, CoreGraphics, PIL and OpenCV all give height x width x channel), so a phone app hands its
decoded pixels over without a transpose or a float conversion of its own. N, H and W are dynamic;
every image of one batch has the same H and W. Output: float32 [N, 3, S, S], normalised.

:func:`image_in_model` puts this graph in front of an exported float-input model; the edge runtime
runs it alone in front of a float-input model. Either way the steps are the torch ones of
``EvalTransform.apply``, op for op.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from hashdistill.errors import UserError
from hashdistill.preprocessing import EvalTransform
from hashdistill.untrusted import short

from .metadata import INPUT as IMAGE_INPUT

PIXELS = "pixels"  # the graph's output: the float model input
FRONT_PREFIX = "preprocess/"  # names of the pre-processing's nodes and constants inside an image-in model


def preprocess_graph(transform: EvalTransform, opset: int = 18, ir_version: int | None = None) -> onnx.ModelProto:
    """A model from uint8 ``images`` [N, H, W, 3] to normalised float ``pixels`` [N, 3, S, S]."""
    size = transform.input_size
    consts = {
        "resize_size": np.array(transform.resize_size, np.int64), "crop": np.array(size, np.int64),
        "two": np.array(2, np.int64), "four": np.array(4, np.int64), "three_rest": np.array(3, np.int64),
        "three": np.array([3], np.int64), "idx_n": np.array([0], np.int64),
        "hw_axes": np.array([2, 3], np.int64),
        "scale255": np.array(255, np.float32),
        "mean": np.array(transform.mean, np.float32).reshape(1, 3, 1, 1),
        "std": np.array(transform.std, np.float32).reshape(1, 3, 1, 1),
    }
    node = helper.make_node
    nodes = [
        node("Cast", [IMAGE_INPUT], ["as_float"], to=TensorProto.FLOAT),
        node("Transpose", ["as_float"], ["nchw"], perm=[0, 3, 1, 2]),
        node("Shape", ["nchw"], ["shape"]),
        node("Gather", ["shape", "idx_n"], ["n"], axis=0),
        node("Gather", ["shape", "hw_axes"], ["hw"], axis=0),
        node("ReduceMin", ["hw"], ["short"], keepdims=0),
        node("Mul", ["hw", "resize_size"], ["hw_scaled"]),
        node("Div", ["hw_scaled", "short"], ["resized_hw"]),  # integer division: floor for positive sides
        node("Concat", ["n", "three", "resized_hw"], ["sizes"], axis=0),
        node("Resize", ["nchw", "", "", "sizes"], ["resized"], mode="linear", antialias=1, exclude_outside=1,
             coordinate_transformation_mode="half_pixel"),
        node("Sub", ["resized_hw", "crop"], ["spare"]),
        node("Div", ["spare", "two"], ["half"]),  # torchvision's round(spare / 2), halves to even: one more
        node("Mod", ["spare", "four"], ["rest"]),  # where spare = 3 mod 4 (1.5 -> 2, 3.5 -> 4; 0.5 -> 0, 2.5 -> 2)
        node("Equal", ["rest", "three_rest"], ["rounds_up"]),
        node("Cast", ["rounds_up"], ["bump"], to=TensorProto.INT64),
        node("Add", ["half", "bump"], ["starts"]),
        node("Add", ["starts", "crop"], ["ends"]),
        node("Slice", ["resized", "starts", "ends", "hw_axes"], ["cropped"]),
        node("Div", ["cropped", "scale255"], ["unit"]),
        node("Sub", ["unit", "mean"], ["centred"]),
        node("Div", ["centred", "std"], [PIXELS]),
    ]
    graph = helper.make_graph(
        nodes, "hashdistill_preprocess",
        [helper.make_tensor_value_info(IMAGE_INPUT, TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info(PIXELS, TensorProto.FLOAT, ["batch", 3, size, size])],
        initializer=[numpy_helper.from_array(value, name) for name, value in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 18))])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def image_in_model(float_model: onnx.ModelProto, transform: EvalTransform) -> onnx.ModelProto:
    """``float_model`` (input ``images`` float [N, 3, S, S]) with the pre-processing graph in front of it.

    The result takes uint8 ``images`` [N, H, W, 3] and has the float model's outputs and metadata_props.
    """
    opset = next(o.version for o in float_model.opset_import if o.domain in ("", "ai.onnx"))
    front = compose.add_prefix(preprocess_graph(transform, opset, float_model.ir_version), FRONT_PREFIX)
    merged = compose.merge_models(front, float_model, io_map=[(f"{FRONT_PREFIX}{PIXELS}", IMAGE_INPUT)])
    # The float model's input is gone (fed by the pre-processing now): its name is free for the uint8 input.
    _rename_input(merged.graph, f"{FRONT_PREFIX}{IMAGE_INPUT}", IMAGE_INPUT)
    versions: dict[str, int] = {}  # merge_models lists a domain once per part; tools want it once
    for entry in merged.opset_import:
        versions[entry.domain] = max(versions.get(entry.domain, 0), entry.version)
    del merged.opset_import[:]
    merged.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in versions.items())
    del merged.metadata_props[:]
    merged.metadata_props.extend(float_model.metadata_props)
    return merged


def embedded_transform(model: onnx.ModelProto) -> dict[str, list[float]] | None:
    """The constants of an image-in model's pre-processing (crop, resize_size, mean, std), or None without one:
    what a reader compares with the metadata that describes them."""
    wanted = {f"{FRONT_PREFIX}{name}": name for name in ("crop", "resize_size", "mean", "std")}
    found = {wanted[t.name]: numpy_helper.to_array(t).ravel().tolist() for t in model.graph.initializer
             if t.name in wanted}
    return found if len(found) == len(wanted) else None


def check_embedded(model: onnx.ModelProto, transform: EvalTransform, source: str) -> None:
    """Raise a UserError if the graph's pre-processing is not the one its metadata describes."""
    found = embedded_transform(model)
    if found is None:
        raise UserError(f"{source}: the metadata says the graph takes uint8 images, but it has no hashdistill "
                        "pre-processing")
    size = transform.input_size
    if found["crop"] != [size]:
        raise UserError(f"{source}: the metadata says {size}x{size} RGB images, but the graph's input is cropped to "
                        f"{short(found['crop'])} pixels")
    expected = {"resize_size": [transform.resize_size], "mean": list(transform.mean), "std": list(transform.std)}
    for key, value in expected.items():
        if not np.allclose(found[key], value, rtol=1e-6):
            raise UserError(f"{source}: the metadata's pre-processing ({key} {short(value)}) is not the graph's "
                            f"({short(found[key])})")


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
    for info in graph.input:
        if info.name == old:
            info.name = new
