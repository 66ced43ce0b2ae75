"""Trained ternary quantization (TTQ; Zhu, Han, Mao, Dally, ICLR 2017) as a weight parametrization.

Each quantized layer keeps its full-precision latent weight ``w`` (trained) and two trainable
scales ``Wp``, ``Wn``; the layer computes with ``w_t`` in {-Wn, 0, +Wp}. ``ternarize_(model, config)``
applies it in place, in the style of torchao's ``quantize_``, via
``torch.nn.utils.parametrize``: the latent weight lives at ``module.parametrizations.weight.original``
and ``module.weight`` is the ternary weight. Scales are initialised to the mean |w| of each side
(``scale_init="mean"``) rather than the original code's 1.0, so a freshly ternarized layer starts close
to the float layer it replaces.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from hashdistill.errors import UserError

from .packing import packed_size

SCALE_INITS = ("mean", "one")
HEAD_KEYWORDS = ("head", "classifier", "fc")
SCALE_BYTES = 8  # Wp and Wn as two fp32 values


@dataclass(frozen=True)
class TTQConfig:
    """What to ternarize and how to pick the threshold and initial scales.

    ``threshold``: Delta = threshold * max|w| (ignored when ``target_sparsity`` is set, which instead picks
    Delta so that this fraction of the weights is zero). ``include``/``exclude``: fnmatch patterns on
    module names from ``model.named_modules()``.
    """

    threshold: float = 0.05
    target_sparsity: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    scale_init: str = "mean"

    def __post_init__(self) -> None:
        _check_fraction("threshold", self.threshold)
        if self.target_sparsity is not None:
            _check_fraction("target_sparsity", self.target_sparsity)
        if self.scale_init not in SCALE_INITS:
            allowed = ", ".join(SCALE_INITS)
            raise UserError(f"TTQ config: scale_init must be one of {allowed}; got {self.scale_init!r}")
        for field in ("include", "exclude"):
            patterns = getattr(self, field)
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                raise UserError(f"TTQ config: {field} must be a list of name patterns, got {patterns!r}")
            object.__setattr__(self, field, tuple(patterns))


def _check_fraction(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise UserError(f"TTQ config: {field} must be a number strictly between 0 and 1; got {value!r}")


class Ternarize(torch.autograd.Function):
    """w_t = +Wp where w > Delta, 0 where |w| <= Delta, -Wn where w < -Delta, with TTQ's gradients.

    Backward: dL/dWp = sum of g over I_p; dL/dWn = -(sum of g over I_n) (w_t = -Wn there); dL/dw is
    Wp*g on I_p, g on I_0 and Wn*g on I_n. ``delta`` gets no gradient.
    """

    @staticmethod
    def forward(
        ctx, w: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        pos, neg = _masks(w, delta)
        ctx.save_for_backward(pos, neg, wp, wn)
        zero = w.new_zeros(())
        return torch.where(pos, wp.to(w.dtype), torch.where(neg, -wn.to(w.dtype), zero))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        pos, neg, wp, wn = ctx.saved_tensors
        zero = grad.new_zeros(())
        grad_wp = torch.where(pos, grad, zero).sum().to(wp.dtype)
        grad_wn = -torch.where(neg, grad, zero).sum().to(wn.dtype)
        grad_w = torch.where(pos, wp.to(grad.dtype) * grad, torch.where(neg, wn.to(grad.dtype) * grad, grad))
        return grad_w, grad_wp, grad_wn, None


def _masks(w: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return w > delta, w < -delta


class TernaryWeight(nn.Module):
    """Parametrization holding a layer's trainable scales ``wp``, ``wn`` and its threshold rule."""

    def __init__(self, wp: float, wn: float, threshold: float, target_sparsity: float | None = None) -> None:
        super().__init__()
        self.wp = nn.Parameter(torch.tensor(float(wp)))
        self.wn = nn.Parameter(torch.tensor(float(wn)))
        self.threshold = threshold
        self.target_sparsity = target_sparsity

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        """Delta for the current latent weight (no gradient flows through it)."""
        a = w.detach().abs().flatten()
        if self.target_sparsity is None:
            return self.threshold * a.max()
        k = max(1, round(self.target_sparsity * a.numel()))
        return a.kthvalue(k).values

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return Ternarize.apply(w, self.wp, self.wn, self.delta(w))

    def extra_repr(self) -> str:
        rule = f"threshold={self.threshold}"
        if self.target_sparsity is not None:
            rule = f"target_sparsity={self.target_sparsity}"
        return f"{rule}, wp={self.wp.item():.4g}, wn={self.wn.item():.4g}"


@dataclass
class TernaryState:
    """A ternary layer's current weight: codes in {-1, 0, 1}, scales Wp/Wn and absolute threshold Delta."""

    codes: torch.Tensor
    wp: float
    wn: float
    threshold: float


def ternarize_(model: nn.Module, config: TTQConfig | None = None) -> list[str]:
    """Ternarize the layers of ``model`` in scope of ``config``, in place; returns their names."""
    config = config or TTQConfig()
    refuse_if_ternarized(model)
    names = select_layers(model, config)
    apply_ternary(model, names, config)
    return names


def refuse_if_ternarized(model: nn.Module) -> None:
    """Raise a UserError if ``model`` already has ternary layers (ternarizing twice would stack them)."""
    done = list(ternary_layers(model))
    if done:
        example = ", ".join(done[:3])
        raise UserError(f"model is already ternarized ({len(done)} ternary layers, e.g. {example})")


def eligible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers TTQ may quantize: every nn.Linear, and 1x1 nn.Conv2d heads (name has head/classifier/fc).

    The first convolution of the network is never eligible (it sees raw pixels and is tiny), nor is any
    normalisation layer (they are neither Linear nor Conv2d).
    """
    modules = list(model.named_modules())
    first_conv = next((m for _, m in modules if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)), None)
    eligible = {}
    for name, module in modules:
        if isinstance(module, nn.Linear):
            eligible[name] = module
        elif (
            isinstance(module, nn.Conv2d)
            and module is not first_conv
            and module.kernel_size == (1, 1)
            and any(key in name.lower() for key in HEAD_KEYWORDS)
        ):
            eligible[name] = module
    return eligible


def select_layers(model: nn.Module, config: TTQConfig) -> list[str]:
    """Names of the eligible layers kept by ``config.include``/``config.exclude``; UserError if none."""
    all_names = [name for name, _ in model.named_modules()]
    eligible = list(eligible_layers(model))
    sample = ", ".join(eligible[:8]) or "none"
    for pattern in config.include + config.exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in all_names):
            raise UserError(f"TTQ pattern {pattern!r} matches no module of the model (quantizable: {sample})")
    names = [
        name
        for name in eligible
        if (not config.include or any(fnmatch.fnmatchcase(name, p) for p in config.include))
        and not any(fnmatch.fnmatchcase(name, p) for p in config.exclude)
    ]
    if not names:
        raise UserError(f"nothing to ternarize: include/exclude leave no layer (quantizable: {sample})")
    return names


def apply_ternary(model: nn.Module, names: list[str], config: TTQConfig) -> None:
    """Register the TTQ parametrization on the weight of each named module, scales initialised per config."""
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        weight = module.weight.detach()
        rule = TernaryWeight(1.0, 1.0, config.threshold, config.target_sparsity)
        rule = rule.to(weight.device, weight.dtype)
        if config.scale_init == "mean":
            pos, neg = _masks(weight, rule.delta(weight))
            with torch.no_grad():
                rule.wp.fill_(_mean_abs(weight[pos]))
                rule.wn.fill_(_mean_abs(weight[neg]))
        parametrize.register_parametrization(module, "weight", rule)


def _mean_abs(values: torch.Tensor) -> float:
    # An empty side is used by no weight yet; fall back to the original code's 1.0.
    return values.abs().mean().item() if values.numel() else 1.0


def ternary_rule(module: nn.Module) -> TernaryWeight | None:
    """The TTQ parametrization of ``module``'s weight, or None if it is not a ternary layer."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, TernaryWeight)), None)


def ternary_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every ternarized layer of ``model``."""
    return {name: m for name, m in model.named_modules() if ternary_rule(m) is not None}


@torch.no_grad()
def ternary_state(module: nn.Module) -> TernaryState:
    """The codes, scales and absolute threshold that a ternary layer currently computes with."""
    rule = ternary_rule(module)
    if rule is None:
        raise ValueError(f"{type(module).__name__} is not a ternary layer")
    latent = module.parametrizations.weight.original
    delta = rule.delta(latent)
    pos, neg = _masks(latent, delta)
    codes = pos.to(torch.int8) - neg.to(torch.int8)
    return TernaryState(codes=codes, wp=rule.wp.item(), wn=rule.wn.item(), threshold=delta.item())


def layer_report(model: nn.Module) -> list[dict]:
    """Per ternary layer: name, shape, sparsity, scales and storage in fp32 vs packed 2-bit codes."""
    report = []
    for name, module in ternary_layers(model).items():
        state = ternary_state(module)
        numel = state.codes.numel()
        report.append({
            "name": name,
            "shape": list(state.codes.shape),
            "sparsity": (state.codes == 0).sum().item() / numel,
            "wp": state.wp,
            "wn": state.wn,
            "bytes_fp32": numel * 4,
            "bytes_packed": packed_size(numel) + SCALE_BYTES,
        })
    return report


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The Wp, Wn scales of every ternary layer (TTQ trains them with their own learning rate)."""
    rules = [ternary_rule(m) for m in ternary_layers(model).values()]
    return [p for rule in rules for p in (rule.wp, rule.wn)]


def latent_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The full-precision latent weights behind every ternary layer."""
    return [m.parametrizations.weight.original for m in ternary_layers(model).values()]
