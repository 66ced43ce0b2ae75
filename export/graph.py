"""The module that is traced into ONNX: hash model + in-graph bit packing, ternary layers kept small.

Ternary layers (those listed by ``quantize.ttq.ternary_layers``) are swapped for modules that
rebuild their weight inside the graph, so the file stores 2 bits per weight instead of 32:

- ``packed`` (any opset >= 18): the uint8 bytes of ``quantize.packing.pack_ternary`` (4 codes per
  byte, element i in bits 2*(i % 4)) -> BitShift + BitwiseAnd -> Gather from the table [-Wn, 0, +Wp].
- ``int2`` (opset >= 25): the codes as an int8 buffer, which :mod:`.onnx_export` rewrites after
  tracing into an INT2 initializer -> DequantizeLinear -> Where(+Wp / 0 / -Wn). onnxruntime 1.31 runs
  INT2 DequantizeLinear on CPU at opsets 25 and 26 (checked; it loads no model above opset 26).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from onnxscript import opset18 as op
from torch import nn

from hashdistill.quantize.packing import pack_ternary
from hashdistill.quantize.ttq import TernaryState, ternary_layers, ternary_state

PACKED, INT2 = "packed", "int2"
BYTE_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # bit j of a byte group -> position 7 - j (MSB first)


class EdgeGraph(nn.Module):
    """images -> (codes, logits): codes are ``logits >= 0`` packed MSB first, as ``hashdistill.codes``."""

    def __init__(self, model: nn.Module, bits: int):
        super().__init__()
        self.model = model
        self.pad = (-bits) % 8
        self.register_buffer("byte_weights", torch.tensor(BYTE_WEIGHTS, dtype=torch.uint8))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images).float()
        bits = F.pad((logits >= 0).to(torch.uint8), (0, self.pad)).unflatten(1, (-1, 8))
        codes = (bits * self.byte_weights).sum(dim=-1).to(torch.uint8)
        return codes, logits


class TernaryLayer(nn.Module):
    """A Linear or Conv2d whose ``weight`` property (defined by subclasses) rebuilds the ternary weight in-graph."""

    def __init__(self, layer: nn.Module, state: TernaryState):
        super().__init__()
        self.shape = tuple(state.codes.shape)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.conv = None
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros":
                raise ValueError(f"ternary Conv2d with padding_mode={layer.padding_mode!r} is not exportable")
            self.conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                         "groups": layer.groups}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(x, self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias, **self.conv)


class PackedTernary(TernaryLayer):
    """uint8 bytes of 4 codes each, unpacked by shift + mask and looked up in [-Wn, 0, +Wp]."""

    def __init__(self, layer: nn.Module, state: TernaryState):
        super().__init__(layer, state)
        self.numel = state.codes.numel()
        self.register_buffer("packed", pack_ternary(state.codes))
        self.register_buffer("shifts", torch.tensor([0, 2, 4, 6], dtype=torch.uint8))
        self.register_buffer("mask", torch.tensor(3, dtype=torch.uint8))
        self.register_buffer("table", torch.tensor([-state.wn, 0.0, state.wp], dtype=torch.float32))

    @property
    def weight(self) -> torch.Tensor:
        index = torch.bitwise_and(torch.bitwise_right_shift(self.packed.unsqueeze(1), self.shifts), self.mask)
        return self.table.index_select(0, index.flatten()[: self.numel].long()).view(self.shape)


class Int2Ternary(TernaryLayer):
    """int8 codes {-1, 0, 1} (stored as INT2 after the rewrite) mapped to +Wp / 0 / -Wn by Where."""

    def __init__(self, layer: nn.Module, state: TernaryState):
        super().__init__(layer, state)
        self.register_buffer("codes", state.codes.to(torch.int8).clone())
        self.register_buffer("wp", torch.tensor(state.wp, dtype=torch.float32))
        self.register_buffer("neg_wn", torch.tensor(-state.wn, dtype=torch.float32))

    @property
    def weight(self) -> torch.Tensor:
        values = self.codes.float()  # the Cast that the INT2 rewrite turns into DequantizeLinear
        return torch.where(values > 0, self.wp, torch.where(values < 0, self.neg_wn, 0.0))


LAYERS: dict[str, type[TernaryLayer]] = {PACKED: PackedTernary, INT2: Int2Ternary}


def edge_graph(model: nn.Module, bits: int, encoding: str) -> tuple[EdgeGraph, dict[str, int]]:
    """A copy of ``model`` wrapped for export, ternary layers swapped; also name -> weight count per layer.

    Names are those of the wrapper (``model.<layer>``), which is how the exporter names initializers.
    """
    clone = copy.deepcopy(model).cpu().eval()
    add_zero_conv_biases(clone)
    sizes = {}
    for name, layer in ternary_layers(clone).items():
        parent, _, child = name.rpartition(".")
        state = ternary_state(layer)
        setattr(clone.get_submodule(parent), child, LAYERS[encoding](layer, state))
        sizes[f"model.{name}"] = state.codes.numel()
    return EdgeGraph(clone, bits).eval(), sizes


def add_zero_conv_biases(model: nn.Module) -> None:
    """Give every bias-less Conv2d an explicit zero bias, in place (outputs unchanged).

    The exporter writes a missing conv bias as zeros shaped in the graph from the input's dtype (CastLike of the
    pixels), which onnxruntime cannot constant-fold: it then fuses no Conv + BatchNormalization and picks no
    blocked-layout kernels, and a depthwise student ran 9x slower than the same graph with stored biases.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.out_channels, dtype=module.weight.dtype))


def unsigned_right_shift(x, shift):  # noqa: ANN001, ANN201 - an onnxscript translation function
    """aten.bitwise_right_shift as a plain ONNX BitShift.

    torch's default translation emulates an arithmetic shift with signed casts and mis-types uint8
    (onnxruntime refuses the graph); every shift in an :class:`EdgeGraph` is on uint8, so BitShift is exact.
    """
    return op.BitShift(x, shift, direction="RIGHT")


CUSTOM_TRANSLATIONS = {torch.ops.aten.bitwise_right_shift.Tensor: unsigned_right_shift}
