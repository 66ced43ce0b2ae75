"""THE evaluation pre-processing: uint8 RGB pixels of any size -> the model's normalised input.

One definition, three users: training-time evaluation of image files (:meth:`EvalTransform.apply`, torch),
the image-in ONNX graph (:mod:`hashdistill.export.preprocess_graph` builds the same steps from the same
:class:`EvalTransform`) and the edge runtime (which runs that graph). The steps are those of timm's eval
transform, written so that each has one exact ONNX counterpart:

1. resize, bilinear with antialiasing, so the shorter side becomes ``resize_size = floor(input_size /
   crop_pct)`` (timm's rule) and the longer one ``floor(resize_size * long / short)``, on the uint8 pixels, giving
   uint8 pixels: PIL's ``Image.resize(..., BILINEAR)``, which timm's eval transform calls, rounds each resized
   pixel to uint8, and so does ONNX ``Resize`` (linear, ``antialias=1``, ``exclude_outside=1``, half-pixel) on
   uint8 NHWC pixels, onnxruntime's port of PIL's algorithm;
2. center crop ``input_size`` x ``input_size`` at torchvision's ``CenterCrop`` offset ``round((side -
   input_size) / 2)``, Python's round (halves to even: 1.5 -> 2, 2.5 -> 2), which timm's eval transform uses;
3. normalise per channel, (x / 255 - mean) / std, computed as x * scale + bias (one BatchNormalization in the
   graph: cheap in the NHWC layout onnxruntime's int8 models run; float32 rounding differs from timm's three
   steps by at most 5e-7).

What is and is not equal to timm, measured (tests/test_timm_parity.py, benchmarks/export.py): the sizes and the
crop exactly, the normalisation to float32 rounding; the resized pixels but for one grey level (rarely two) on a
small fraction of pixels, where onnxruntime's float32 coefficients land a value on the other side of a rounding
step that PIL's fixed-point ones do not (most often for mild upscales such as 224 -> 256, whose values often fall
on half a grey level). Training-time evaluation runs the graph itself, so PyTorch and the exported files see the
same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hashdistill.errors import UserError

IMAGE_IN, FLOAT_IN = "uint8-nhwc", "float32-nchw"  # a model's input: decoded pixels, or this pre-processing's output
IN_MEMORY_CROP_PCT = 1.0  # the in-memory datasets are square and already at image_size: no crop
IMAGEFOLDER_CROP_PCT = 0.875  # timm's default eval crop for photographs


@dataclass(frozen=True)
class EvalTransform:
    """Parameters of the evaluation pre-processing (see the module docstring for the steps)."""

    input_size: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if not 0.05 <= self.crop_pct <= 1.0:
            raise UserError(f"crop_pct must be in [0.05, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError(f"mean and std need 3 values each (std > 0), got {self.mean} and {self.std}")

    @property
    def resize_size(self) -> int:
        """The shorter side after resizing (timm: ``floor(input_size / crop_pct)``)."""
        return math.floor(self.input_size / self.crop_pct)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after step 1; integer arithmetic, as the ONNX graph computes it."""
        size = self.resize_size
        if height <= width:
            return size, size * width // height
        return size * height // width, size

    def shrinks(self, height: int, width: int) -> bool:
        """Whether step 1 makes an image of this size smaller (then :meth:`reduce` may run it on the host)."""
        return min(height, width) > self.resize_size

    def reduce(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB [H, W, 3] -> what step 1 makes of it where step 1 shrinks it, else the pixels unchanged.

        Run on the host, one image at a time, before images are batched: a batch of phone photos then holds
        256-pixel images, not 12-megapixel ones, and the graph's own resize of the result is the identity
        (onnxruntime's antialiased resize at scale 1), so the codes are those of the full-size input, bit for bit.
        """
        if not self.shrinks(*pixels.shape[:2]):
            return pixels
        from .preprocessing_graph import INPUT, resize_session

        return resize_session(self).run(None, {INPUT: np.ascontiguousarray(pixels)[None]})[0][0]

    def apply(self, pixels):
        """float32 [N, 3, S, S] model input from uint8 RGB pixels [N, H, W, 3] (a torch tensor), by the very graph
        the exported files hold (:mod:`hashdistill.preprocessing_graph`): the same pixels, bit for bit."""
        import torch

        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise UserError(f"pre-processing needs uint8 pixels [N, H, W, 3], got {pixels.dtype} "
                            f"{list(pixels.shape)}")
        from .preprocessing_graph import INPUT, preprocess_session

        pixels_in = pixels.detach().cpu().contiguous().numpy()
        return torch.from_numpy(preprocess_session(self).run(None, {INPUT: pixels_in})[0]).to(pixels.device)

    def normalise(self, pixels):
        """Step 3 on a batch [N, C, S, S] (C = 1 or 3, uint8 or float pixel values, any device) -> float32
        [N, 3, S, S]; the input is never modified. The in-memory datasets and the image folders' training batches
        normalise through here too, so training and evaluation inputs agree bit for bit."""
        import torch

        from .preprocessing_graph import normalisation_consts

        consts = normalisation_consts(self.mean, self.std)  # the graph's BatchNormalization, as onnxruntime runs it:
        scale = torch.from_numpy(consts["pixel_scale"]).to(pixels.device).view(1, 3, 1, 1)  # x * scale + bias
        bias = -(torch.from_numpy(consts["pixel_mean"]).to(pixels.device).view(1, 3, 1, 1) * scale)
        return pixels.to(torch.float32).mul(scale).add_(bias)  # a new tensor: grey [N, 1, S, S] pixels broadcast

    def as_metadata(self) -> dict[str, object]:
        """The fields a checkpoint or an ONNX file records to rebuild this transform."""
        return {"input_size": self.input_size, "crop_pct": self.crop_pct, "mean": list(self.mean),
                "std": list(self.std)}

    def describe(self) -> str:
        return (f"decode to RGB uint8; bilinear antialiased resize of the shorter side to {self.resize_size} "
                f"(the longer by floor(size * long / short)), rounded to uint8 as PIL does; center crop "
                f"{self.input_size}x{self.input_size} "
                f"at round((side - {self.input_size}) / 2), halves to even (torchvision's CenterCrop); /255, minus "
                "mean, over std per channel")


def crop_offset(spare: int) -> int:
    """torchvision's ``CenterCrop`` offset for ``spare`` pixels: ``int(round(spare / 2))`` with Python's round,
    i.e. ``spare // 2``, one more where ``spare % 4 == 3`` (the graph computes it this way, in integers)."""
    return spare // 2 + (spare % 4 == 3)


def rgb_pixels(image) -> np.ndarray:
    """A decoded image (PIL) or an HxW / HxWx3 uint8 array as contiguous RGB uint8 [H, W, 3]."""
    if isinstance(image, np.ndarray):
        array = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
        if image.dtype != np.uint8:
            raise UserError(f"image arrays must be uint8 (0-255), got {image.dtype}")
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
            raise UserError(f"an image array must be HxW or HxWx3 and not empty, got shape {image.shape}")
        return np.ascontiguousarray(array)
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy: torch.from_numpy warns on PIL's view
