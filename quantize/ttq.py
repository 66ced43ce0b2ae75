"""Trained ternary quantization (TTQ; Zhu, Han, Mao, Dally, ICLR 2017) as a weight parametrization.

Each quantized layer keeps its full-precision latent weight ``w`` (trained) and two trainable
scales ``Wp``, ``Wn``; the layer computes with ``w_t`` in {-Wn, 0, +Wp}. ``ternarize_(model, config)``
applies it in place, in the style of torchao's ``quantize_``, via
``torch.nn.utils.parametrize``: the latent weight lives at ``module.parametrizations.weight.original``
and ``module.weight`` is the ternary weight. Scales are initialised to the mean |w| of each side
(``scale_init="mean"``) rather than the original code's 1.0, so a freshly ternarized layer starts close
to the float layer it replaces.

TTQ defines Wp and Wn as positive. Free scales are not kept so (a strong push drives Wn below zero, the
"negative" weights turn positive and the latent gradient on them flips), so each scale is trained as its
logarithm: Wp = exp(log_wp) > 0 whatever the optimizer does. The Function below still receives Wp and Wn
and returns TTQ's gradients with respect to them; autograd multiplies by Wp (or Wn) on the way to the
log. With Adam a step of the log is about ``lr`` whatever the gradient's size, so the scales' learning
rate is a relative step (0.01 = about 1% per step).
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
SCOPES = ("fc", "pointwise")  # what TTQ may quantize: FC layers and 1x1 heads / also every 1x1 conv in the body
HEAD_KEYWORDS = ("head", "classifier", "fc")
SCALE_BYTES = 8  # Wp and Wn as two fp32 values
TERNARY_TYPES = (nn.Linear, nn.Conv2d)  # what apply_ternary, ternary checkpoints and the exporter all handle


@dataclass(frozen=True)
class TTQConfig:
    """What to ternarize and how to pick the threshold and initial scales.

    ``threshold``: Delta = threshold * max|w| (ignored when ``target_sparsity`` is set, which instead picks
    Delta so that this fraction of the weights is zero). ``scope``: ``fc`` (default) the fully connected layers
    and 1x1-conv heads; ``pointwise`` also every 1x1 convolution of the body: in a depthwise-separable student
    (MobileNet, LCNet) they hold over 90% of the weights, so the whole model shrinks, not only its head.
    ``include``/``exclude``: fnmatch patterns on module names from ``model.named_modules()``, within the scope.
    ``min_weights``: only layers holding at least this many weights (0: all in scope). The bytes sit in a few
    wide layers, the accuracy in many narrow ones: a depthwise student's early 1x1 convs hold a few percent
    of its weights, so ternarizing only the wide layers keeps most of the saving at a fraction of the loss.
    """

    threshold: float = 0.05
    target_sparsity: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    scale_init: str = "mean"
    scope: str = "fc"
    min_weights: int = 0

    def __post_init__(self) -> None:
        _check_fraction("threshold", self.threshold)
        if isinstance(self.min_weights, bool) or not isinstance(self.min_weights, int) or self.min_weights < 0:
            raise UserError(f"TTQ config: min_weights must be an integer >= 0; got {self.min_weights!r}")
        if self.target_sparsity is not None:
            _check_fraction("target_sparsity", self.target_sparsity)
        if self.scope not in SCOPES:
            raise UserError(f"TTQ config: scope must be one of {', '.join(SCOPES)}; got {self.scope!r}")
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
    """w_t = +Wp on I_p, 0 on I_0, -Wn on I_n, with TTQ's gradients.

    ``pos`` / ``neg`` are the boolean masks of I_p / I_n (with a threshold: w > Delta, w < -Delta).
    Backward: dL/dWp = sum of g over I_p; dL/dWn = -(sum of g over I_n) (w_t = -Wn there); dL/dw is
    Wp*g on I_p, g on I_0 and Wn*g on I_n. The masks get no gradient.
    """

    @staticmethod
    def forward(
        ctx, w: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(pos, neg, wp, wn)
        zero = w.new_zeros(())
        return torch.where(pos, wp.to(w.dtype), torch.where(neg, -wn.to(w.dtype), zero))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        pos, neg, wp, wn = ctx.saved_tensors
        zero = grad.new_zeros(())
        grad_wp = torch.where(pos, grad, zero).sum().to(wp.dtype)
        grad_wn = -torch.where(neg, grad, zero).sum().to(wn.dtype)
        grad_w = torch.where(pos, wp.to(grad.dtype) * grad, torch.where(neg, wn.to(grad.dtype) * grad, grad))
        return grad_w, grad_wp, grad_wn, None, None


class TernaryWeight(nn.Module):
    """Parametrization holding a layer's positive scales Wp, Wn (trained as ``log_wp``, ``log_wn``) and its rule.

    The rule picks I_0: with ``target_sparsity`` s, exactly round(s * numel) weights of smallest magnitude
    (ties broken by position, so tied magnitudes never zero more than asked); otherwise |w| <= Delta with
    Delta = ``threshold`` * max|w|.
    """

    def __init__(self, wp: float, wn: float, threshold: float, target_sparsity: float | None = None) -> None:
        super().__init__()
        self.log_wp = nn.Parameter(torch.tensor(float(wp)).log())
        self.log_wn = nn.Parameter(torch.tensor(float(wn)).log())
        self.threshold = threshold
        self.target_sparsity = target_sparsity

    @property
    def wp(self) -> torch.Tensor:
        return self.log_wp.exp()

    @property
    def wn(self) -> torch.Tensor:
        return self.log_wn.exp()

    @torch.no_grad()
    def set_scales(self, wp: float, wn: float) -> None:
        """Set Wp and Wn (both must be positive and finite)."""
        for name, value in (("Wp", wp), ("Wn", wn)):
            if not (value > 0 and value < float("inf")):
                raise ValueError(f"TTQ scale {name} must be positive and finite, got {value}")
        self.log_wp.fill_(float(wp)).log_()
        self.log_wn.fill_(float(wn)).log_()

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        """The largest |w| that is zeroed (the absolute threshold); no gradient flows through it."""
        a = w.detach().abs().flatten()
        if self.target_sparsity is None:
            return self.threshold * a.max()
        return a.kthvalue(self._zero_count(a.numel())).values

    def masks(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks of I_p and I_n for the latent weight ``w``."""
        w = w.detach()
        if self.target_sparsity is None:
            delta = self.delta(w)
            return w > delta, w < -delta
        order = torch.sort(w.abs().flatten(), stable=True).indices
        keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        keep[order[: self._zero_count(w.numel())]] = False
        keep = keep.view_as(w)
        return keep & (w > 0), keep & (w < 0)

    def _zero_count(self, numel: int) -> int:
        return min(numel, max(1, round(self.target_sparsity * numel)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return Ternarize.apply(w, self.wp, self.wn, *self.masks(w))

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


def eligible_layers(model: nn.Module, scope: str = "fc") -> dict[str, nn.Module]:
    """Layers TTQ may quantize: every nn.Linear, and 1x1 nn.Conv2d heads (name has head/classifier/fc); with
    ``scope="pointwise"`` every 1x1 nn.Conv2d.

    The first convolution of the network is never eligible (it sees raw pixels and is tiny), nor is any
    normalisation layer (they are neither Linear nor Conv2d), nor a kxk convolution (depthwise filters have
    9 weights each: too few to share two scales).
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
            and (scope == "pointwise" or any(key in name.lower() for key in HEAD_KEYWORDS))
        ):
            eligible[name] = module
    return eligible


def select_layers(model: nn.Module, config: TTQConfig) -> list[str]:
    """Names of the eligible layers kept by ``config.include``/``config.exclude``/``config.min_weights``;
    UserError if none."""
    all_names = [name for name, _ in model.named_modules()]
    layers = eligible_layers(model, config.scope)
    eligible = list(layers)
    sample = ", ".join(eligible[:8]) or "none"
    for pattern in config.include + config.exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in all_names):
            raise UserError(f"TTQ pattern {pattern!r} matches no module of the model (quantizable: {sample})")
    names = [
        name
        for name in eligible
        if (not config.include or any(fnmatch.fnmatchcase(name, p) for p in config.include))
        and not any(fnmatch.fnmatchcase(name, p) for p in config.exclude)
        and layers[name].weight.numel() >= config.min_weights
    ]
    if not names:
        widest = max((layer.weight.numel() for layer in layers.values()), default=0)
        raise UserError(f"nothing to ternarize: include/exclude/min_weights leave no layer (quantizable: {sample}; "
                        f"the widest holds {widest} weights)")
    return names


def apply_ternary(model: nn.Module, names: list[str], config: TTQConfig) -> None:
    """Register the TTQ parametrization on the weight of each named module, scales initialised per config.

    Any nn.Linear or nn.Conv2d may be named (not only :func:`eligible_layers`): a ternary checkpoint of such
    a model loads back, since :func:`ternary_modules` accepts the same types.
    """
    modules = ternary_modules(model, names)
    for name in names:
        module = modules[name]
        weight = module.weight.detach()
        if not bool(torch.isfinite(weight).all()):
            raise UserError(f"layer '{name}' has non-finite weights (NaN or inf); ternarize a model that trained well")
        rule = TernaryWeight(1.0, 1.0, config.threshold, config.target_sparsity)
        rule = rule.to(weight.device, weight.dtype)
        if config.scale_init == "mean":
            pos, neg = rule.masks(weight)
            rule.set_scales(_mean_abs(weight[pos]), _mean_abs(weight[neg]))
        parametrize.register_parametrization(module, "weight", rule)


def ternary_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The named modules of ``model``, checked to be plain layers TTQ can ternarize; UserError otherwise."""
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if module is None:
            raise UserError(f"no module named '{name}' in the model")
        if not isinstance(module, TERNARY_TYPES):
            raise UserError(f"'{name}' is a {type(module).__name__}; TTQ ternarizes nn.Linear and nn.Conv2d layers")
        if ternary_rule(module) is not None:
            raise UserError(f"'{name}' is already a ternary layer")
    return {name: modules[name] for name in names}


def _mean_abs(values: torch.Tensor) -> float:
    # An empty (or all-zero) side is used by no weight yet; fall back to the original code's 1.0.
    mean = values.abs().mean().item() if values.numel() else 0.0
    return mean if mean > 0 else 1.0


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
    pos, neg = rule.masks(latent)
    codes = pos.to(torch.int8) - neg.to(torch.int8)
    return TernaryState(codes=codes, wp=rule.wp.item(), wn=rule.wn.item(), threshold=rule.delta(latent).item())


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
    """log Wp, log Wn of every ternary layer (TTQ trains the scales with their own learning rate)."""
    rules = [ternary_rule(m) for m in ternary_layers(model).values()]
    return [p for rule in rules for p in (rule.log_wp, rule.log_wn)]


def latent_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The full-precision latent weights behind every ternary layer."""
    return [m.parametrizations.weight.original for m in ternary_layers(model).values()]
