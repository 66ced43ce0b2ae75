"""The edge runtime: an exported model, its metadata and decoding, on numpy + onnxruntime only.

Importing this module must not import torch: it is what ships to devices where torch is absent.
The default export takes decoded uint8 RGB pixels [N, H, W, 3] of any size and pre-processes them in the graph;
for a float-input export the runtime runs the same pre-processing graph (:mod:`.preprocess_graph`, rebuilt
from the metadata) in front of it, so both give the codes training-time evaluation gives on the same image.
Codes come out of the graph already packed (THE bit order of :mod:`hashdistill.codes`), and the
class codebook travels inside the file, so classification and the out-of-distribution check need
nothing but the ``.onnx`` file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from hashdistill import codes
from hashdistill.errors import UserError
from hashdistill.preprocessing_graph import preprocess_graph
from hashdistill.untrusted import short

from .images import ImageLike, as_items, decode_batches
from .metadata import CODES, IMAGE_IN, INPUT, LOGITS, EdgeMetadata, parse_props
from .preprocess_graph import check_embedded

METHODS = ("mhd", "ed")


class EdgeModel:
    """An exported hashdistill model: images in, packed binary codes (and logits) out."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                 batch_size: int = 64, threads: int | None = None):
        """``threads``: onnxruntime's intra-op threads (default: one per core; 1 where several encoders share
        the cores, as Ray's actors do)."""
        self.path = Path(path)
        self.batch_size = batch_size
        if not self.path.is_file():
            raise UserError(f"ONNX model not found: {self.path}")
        contents = self.path.read_bytes()  # read once: onnxruntime and the pre-processing check both parse it
        self.file_digest = hashlib.sha256(contents).hexdigest()
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        try:
            self.session = ort.InferenceSession(contents, options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own Exception subclasses (InvalidProtobuf, Fail, ...)
            raise UserError(f"{self.path}: onnxruntime {ort.__version__} cannot load it (truncated, corrupt or made "
                            f"for a newer runtime?): {exc}") from None
        self.meta: EdgeMetadata = parse_props(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT] or sorted(outputs) != sorted([CODES, LOGITS]):
            raise UserError(f"{self.path}: expected input '{INPUT}' and outputs '{CODES}', '{LOGITS}'; "
                            f"the graph has inputs {inputs} and outputs {outputs}")
        self._check_outputs()
        graph_input = self.session.get_inputs()[0]
        shape, size = graph_input.shape, self.meta.input_size
        if self.takes_images:
            layout, fits = "uint8 [batch, height, width, 3]", graph_input.type == "tensor(uint8)" and \
                len(shape) == 4 and shape[3] == 3
        else:
            layout, fits = f"float [batch, 3, {size}, {size}]", graph_input.type == "tensor(float)" and \
                len(shape) == 4 and list(shape[1:]) == [3, size, size]
        if not fits:
            raise UserError(f"{self.path}: the metadata says input '{INPUT}' is {layout}, but the graph's input is "
                            f"{graph_input.type} of shape {short(shape)}")
        if self.takes_images and self.path.suffix.lower() == ".onnx":  # (an .ort file was checked when converted)
            check_embedded(onnx.load_from_string(contents), self.meta.transform, str(self.path))
        self._front: ort.InferenceSession | None = None

    def _check_outputs(self) -> None:
        """The codes come out as uint8 [N, ceil(bits / 8)] and the logits as float [N, bits], as the metadata's bit
        width says, before anything is encoded: a float or float16 'codes' output would otherwise be cast to
        bytes, or fail mid-way, and a user's index would hold the wrong codes."""
        width = codes.packed_width(self.meta.bits)
        expected = {CODES: ("tensor(uint8)", width), LOGITS: ("tensor(float)", self.meta.bits)}
        for output in self.session.get_outputs():
            kind, last = expected[output.name]
            shape = output.shape
            if output.type != kind or len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != last):
                raise UserError(f"{self.path}: output '{output.name}' is {output.type} of shape {short(shape)}, but a "
                                f"{self.meta.bits}-bit model gives {kind.removeprefix('tensor(').rstrip(')')} "
                                f"[batch, {last}]; the file was not written by hashdistill's exporter, or was altered")

    @property
    def takes_images(self) -> bool:
        """True for an image-in model (uint8 pixels in, pre-processing in the graph)."""
        return self.meta.input_format == IMAGE_IN

    @property
    def bits(self) -> int:
        return self.meta.bits

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names

    @property
    def metadata(self) -> dict:
        """All metadata_props, decoded (bits, class_names, mean, std, data, kind, arch, recipe_hash, ...)."""
        return self.meta.as_dict()

    @property
    def input_size(self) -> int:
        return self.meta.input_size

    @property
    def training_data(self) -> dict:
        """The data section of the recipe the model was trained with (empty if not recorded)."""
        return self.meta.data

    def describe(self) -> dict[str, str]:
        """What identifies this model in an index: path, kind, architecture, metadata hash (the lineage) and the
        file's sha256 (this very file: a model swapped in at the same path, of the same lineage, differs there)."""
        props = self.meta.props
        return {"path": str(self.path.resolve()), "kind": props.get("kind", ""), "arch": props.get("arch", ""),
                "hash": self.meta.digest, "sha256": self.file_digest}

    @property
    def class_codes(self) -> np.ndarray:
        """The embedded class codebook, packed uint8 (L, ceil(bits/8))."""
        return self.meta.class_codes

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """float32 [N, 3, S, S]: the model's pre-processing of paths or uint8 HxW / HxWx3 arrays (any sizes)."""
        batches = decode_batches(as_items(images), self.meta.transform, self.batch_size)
        return np.concatenate([self._preprocess_pixels(pixels) for _, pixels in batches])

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Packed codes and logits for one batch in the graph's own input format: uint8 pixels [N, H, W, 3] for
        an image-in model, pre-processed float32 [N, 3, S, S] for a float-input one."""
        batch = np.asarray(batch)
        size = self.meta.input_size
        if self.takes_images:
            if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3 or 0 in batch.shape:
                raise UserError(f"model input must be uint8 [N, H, W, 3], got {batch.dtype} {list(batch.shape)}")
        else:
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
                raise UserError(f"model input must be [N, 3, {size}, {size}], got {list(batch.shape)}")
        packed, logits = self.session.run([CODES, LOGITS], {INPUT: np.ascontiguousarray(batch)})
        return packed, logits

    def run_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Packed codes and logits for uint8 RGB pixels [N, H, W, 3], whatever the model's input format."""
        return self.run(self.graph_input(pixels))

    def graph_input(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB pixels [N, H, W, 3] in the graph's own input format (pre-processed for a float-input one)."""
        return pixels if self.takes_images else self._preprocess_pixels(pixels)

    def encode(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Packed uint8 codes (N, ceil(bits/8)), bit order as in :mod:`hashdistill.codes`."""
        return self._forward(images)[0]

    def logits(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Real-valued code logits (N, bits); bit j is 1 where logit j >= 0."""
        return self._forward(images)[1]

    def classify(self, images: ImageLike | Sequence[ImageLike], method: str = "mhd") -> np.ndarray:
        """Class index per image with the embedded codebook: MHD (nearest code, ties to the lowest class) or
        ED (exact code match, else ``hashdistill.codes.UNKNOWN`` = -1)."""
        if method not in METHODS:
            raise UserError(f"unknown decoding method '{method}'; choose one of {', '.join(METHODS)}")
        decode = codes.mhd_decode if method == "mhd" else codes.ed_decode
        return decode(self.encode(images), self.class_codes)

    def is_ood(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """True where an image's code matches no class code exactly (LLC's threshold-free OOD rule)."""
        return codes.is_out_of_distribution(self.encode(images), self.class_codes)

    def _preprocess_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if self._front is None:  # the image-in graph's own front part, built from the metadata
            front = preprocess_graph(self.meta.transform)
            self._front = ort.InferenceSession(front.SerializeToString(), providers=["CPUExecutionProvider"])
        return self._front.run(None, {INPUT: pixels})[0]

    def _forward(self, images: ImageLike | Sequence[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        batches = decode_batches(as_items(images), self.meta.transform, self.batch_size)
        parts = [self.run_pixels(pixels) for _, pixels in batches]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
