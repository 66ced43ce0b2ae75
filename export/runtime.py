"""The edge runtime: an exported model, its metadata and decoding, on numpy + onnxruntime only.

Importing this module must not import torch: it is what ships to devices where torch is absent.
Codes come out of the graph already packed (THE bit order of :mod:`hashdistill.codes`), and the
class codebook travels inside the file, so classification and the out-of-distribution check need
nothing but the ``.onnx`` file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hashdistill import codes
from hashdistill.errors import UserError
from hashdistill.untrusted import short

from .images import ImageLike, as_items, preprocess
from .metadata import CODES, INPUT, LOGITS, EdgeMetadata, parse_props

METHODS = ("mhd", "ed")


class EdgeModel:
    """An exported hashdistill model: images in, packed binary codes (and logits) out."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                 batch_size: int = 64):
        self.path = Path(path)
        self.batch_size = batch_size
        if not self.path.is_file():
            raise UserError(f"ONNX model not found: {self.path}")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own Exception subclasses (InvalidProtobuf, Fail, ...)
            raise UserError(f"{self.path}: onnxruntime {ort.__version__} cannot load it (truncated, corrupt or made "
                            f"for a newer runtime?): {exc}") from None
        self.meta: EdgeMetadata = parse_props(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT] or sorted(outputs) != sorted([CODES, LOGITS]):
            raise UserError(f"{self.path}: expected input '{INPUT}' and outputs '{CODES}', '{LOGITS}'; "
                            f"the graph has inputs {inputs} and outputs {outputs}")
        shape = self.session.get_inputs()[0].shape
        size = self.meta.input_size
        if len(shape) != 4 or list(shape[1:]) != [3, size, size]:
            raise UserError(f"{self.path}: the metadata says {size}x{size} RGB images, but the graph's input "
                            f"'{INPUT}' has shape {short(shape)}")

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
        """What identifies this model in an index: path, kind, architecture and metadata hash."""
        props = self.meta.props
        return {"path": str(self.path.resolve()), "kind": props.get("kind", ""), "arch": props.get("arch", ""),
                "hash": self.meta.digest}

    @property
    def class_codes(self) -> np.ndarray:
        """The embedded class codebook, packed uint8 (L, ceil(bits/8))."""
        return self.meta.class_codes

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """float32 [N, 3, S, S] input from paths or uint8 HxW / HxWx3 arrays (resize, mean/std from metadata)."""
        return preprocess(as_items(images), self.meta.input_size, self.meta.mean, self.meta.std)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Packed codes and logits for an already pre-processed float32 batch [N, 3, S, S]."""
        size = self.meta.input_size
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            raise UserError(f"model input must be [N, 3, {size}, {size}], got {list(batch.shape)}")
        packed, logits = self.session.run([CODES, LOGITS], {INPUT: batch})
        return packed, logits

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

    def _forward(self, images: ImageLike | Sequence[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        items = as_items(images)
        parts = [self.run(self.preprocess(items[i:i + self.batch_size]))
                 for i in range(0, len(items), self.batch_size)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
