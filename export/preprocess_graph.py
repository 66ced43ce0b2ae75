"""The evaluation pre-processing graph (:mod:`hashdistill.preprocessing_graph`) inside exported models.

:func:`image_in_model` puts the graph in front of an exported float-input model; the edge runtime runs it alone
in front of a float-input model; training-time evaluation runs it too, so all three see the same pixels.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import compose, helper, numpy_helper

from hashdistill.errors import UserError
from hashdistill.preprocessing import EvalTransform
from hashdistill.preprocessing_graph import PIXELS, normalisation_of, preprocess_graph
from hashdistill.untrusted import short

from .metadata import INPUT as IMAGE_INPUT

FRONT_PREFIX = "preprocess/"  # names of the pre-processing's nodes and constants inside an image-in model


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
    names = ("crop", "resize_size", "mean", "std", "pixel_mean", "pixel_scale")
    wanted = {f"{FRONT_PREFIX}{name}": name for name in names}
    found = {wanted[t.name]: numpy_helper.to_array(t).ravel().astype(np.float64) for t in model.graph.initializer
             if t.name in wanted}
    sizes = {"crop": 1, "resize_size": 1, "mean": 3, "std": 3, "pixel_mean": 3, "pixel_scale": 3}
    if any(value.size != sizes[name] for name, value in found.items()):  # a hostile file's odd constants
        return None
    normalisation = normalisation_of(found)
    if normalisation is None or "crop" not in found or "resize_size" not in found:
        return None
    mean, std = normalisation
    return {"crop": found["crop"].tolist(), "resize_size": found["resize_size"].tolist(), "mean": mean.tolist(),
            "std": std.tolist()}


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
