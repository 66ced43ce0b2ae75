"""TTQ: the autograd Function's forward and gradients, scope rules, config, reports and ternary checkpoints."""

import copy

import pytest
import timm
import torch
from torch import nn

from hashdistill.checkpoint import load_checkpoint
from hashdistill.errors import UserError
from hashdistill.quantize.ternary_checkpoint import load_ternary_into, save_ternary
from hashdistill.quantize.ttq import (
    Ternarize,
    TTQConfig,
    apply_ternary,
    latent_parameters,
    layer_report,
    scale_parameters,
    ternarize_,
    ternary_layers,
    ternary_state,
)

# ---------------------------------------------------------------- the autograd Function


def _ternarize(w, wp, wn, delta):
    return Ternarize.apply(w, wp, wn, w.detach() > delta, w.detach() < -delta)


def _inputs(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 7, generator=gen, dtype=dtype)
    wp = torch.tensor(0.8, dtype=dtype, requires_grad=True)
    wn = torch.tensor(1.3, dtype=dtype, requires_grad=True)
    delta = 0.3 * w.abs().max()
    # keep weights away from the threshold so finite differences never cross it
    w = torch.where((w.abs() - delta).abs() < 1e-3, w * 1.1, w)
    return w, wp, wn, delta


def test_forward_values():
    w = torch.tensor([0.9, -0.8, 0.05, -0.05, 0.1, -0.1])
    out = _ternarize(w, torch.tensor(2.0), torch.tensor(3.0), torch.tensor(0.1))
    assert out.tolist() == [2.0, -3.0, 0.0, 0.0, 0.0, 0.0]  # |w| <= Delta is zero


def test_scale_gradients_match_finite_differences():
    """With the index sets fixed, w_t is linear in (Wp, Wn): gradcheck compares against finite differences."""
    w, wp, wn, delta = _inputs()
    assert torch.autograd.gradcheck(lambda p, n: _ternarize(w, p, n, delta), (wp, wn))


def test_latent_gradient_matches_reference_surrogate():
    """dL/dw must be the derivative of the surrogate Wp*w on I_p, w on I_0, Wn*w on I_n (index sets fixed)."""
    w, wp, wn, delta = _inputs()
    pos, neg = w > delta, w < -delta
    assert pos.any() and neg.any() and (~pos & ~neg).any()
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=w.dtype)
    w_leaf = w.clone().requires_grad_(True)
    _ternarize(w_leaf, wp, wn, delta).backward(g)

    def surrogate_loss(x):
        scale = torch.where(pos, wp.detach(), torch.where(neg, wn.detach(), torch.ones_like(x)))
        return (g * scale * x).sum()

    h = 1e-6
    numeric = torch.zeros_like(w)
    for i in range(w.numel()):
        e = torch.zeros(w.numel(), dtype=w.dtype)
        e[i] = h
        e = e.view_as(w)
        numeric.view(-1)[i] = (surrogate_loss(w + e) - surrogate_loss(w - e)) / (2 * h)
    torch.testing.assert_close(w_leaf.grad, numeric)
    expected = torch.where(pos, wp.detach() * g, torch.where(neg, wn.detach() * g, g))
    torch.testing.assert_close(w_leaf.grad, expected)


def test_wn_gradient_sign_by_hand():
    """w_t = -Wn on I_n, so dL/dWn = -(sum of g over I_n); the printed paper has +."""
    w = torch.tensor([0.9, -0.8, 0.01, -0.7], requires_grad=True)
    wp = torch.tensor(2.0, requires_grad=True)
    wn = torch.tensor(3.0, requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = _ternarize(w, wp, wn, torch.tensor(0.1))
    assert out.tolist() == [2.0, -3.0, 0.0, -3.0]
    out.backward(g)
    assert wp.grad.item() == 1.0
    assert wn.grad.item() == -6.0  # -(2 + 4)
    assert w.grad.tolist() == [2.0 * 1, 3.0 * 2, 3.0, 3.0 * 4]


def test_gradients_through_a_ternarized_linear():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    ternarize_(layer)
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    g = torch.ones(4, 1) * x.sum(0)  # dL/dW_t for L = sum(x W^T + b)
    state = ternary_state(layer)
    pos, neg = state.codes == 1, state.codes == -1
    log_wp, log_wn = scale_parameters(layer)  # d/dlog(Wp) = Wp * dL/dWp (chain rule through exp)
    torch.testing.assert_close(log_wp.grad, state.wp * g[pos].sum())
    torch.testing.assert_close(log_wn.grad, -state.wn * g[neg].sum())
    expected = torch.where(pos, state.wp * g, torch.where(neg, state.wn * g, g))
    torch.testing.assert_close(latent_parameters(layer)[0].grad, expected)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": "0.05"}, "threshold"),
        ({"target_sparsity": 1.5}, "target_sparsity"),
        ({"target_sparsity": 0}, "target_sparsity"),
        ({"scale_init": "median"}, "scale_init"),
        ({"include": "fc"}, "include"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(UserError, match=field):
        TTQConfig(**kwargs)


def test_config_accepts_lists_from_recipes():
    assert TTQConfig(include=["a*"], exclude=["b"]).include == ("a*",)


# ---------------------------------------------------------------- scope


class Net(nn.Module):
    """First conv is a 1x1 named like a head, to prove the first-conv rule wins over names and patterns."""

    def __init__(self):
        super().__init__()
        self.stem_fc = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.body_fc = nn.Conv2d(8, 8, 3, padding=1)  # not 1x1: not eligible
        self.conv_head = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)
        self.hash_head = nn.Linear(10, 12)

    def forward(self, x):
        x = self.conv_head(self.body_fc(self.body(self.bn(self.stem_fc(x)))))
        return self.hash_head(self.fc(x.mean((2, 3))))


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ((), (), ["conv_head", "fc", "hash_head"]),
        (("*",), (), ["conv_head", "fc", "hash_head"]),
        (("*head*",), (), ["conv_head", "hash_head"]),
        (("*",), ("fc",), ["conv_head", "hash_head"]),
        (("stem_fc", "hash_head"), (), ["hash_head"]),
    ],
)
def test_scope(include, exclude, expected):
    model = Net()
    assert ternarize_(model, TTQConfig(include=include, exclude=exclude)) == expected
    assert list(ternary_layers(model)) == expected
    assert not hasattr(model.stem_fc, "parametrizations")
    assert not hasattr(model.bn, "parametrizations")
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 12)


def test_pointwise_scope_takes_every_1x1_conv_of_the_body_but_not_the_first_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1),
                          nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(2, 3, 6, 6))
    assert ternarize_(copy.deepcopy(model), TTQConfig()) == ["4"]  # fc scope: the body's 1x1 conv stays float
    names = ternarize_(model, TTQConfig(scope="pointwise"))
    assert names == ["2", "4"]  # not the first conv (1x1 too), not the depthwise 3x3
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 4)
    with pytest.raises(UserError, match="scope"):
        TTQConfig(scope="everything")


def test_min_weights_keeps_only_the_wide_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1),
                          nn.Conv2d(16, 64, 1), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(2, 3, 6, 6))  # weights: "2" 128, "3" 1024, "5" 64 * 4 * 4 * 4 = 4096
    assert ternarize_(copy.deepcopy(model), TTQConfig(scope="pointwise", min_weights=128)) == ["2", "3", "5"]
    assert ternarize_(copy.deepcopy(model), TTQConfig(scope="pointwise", min_weights=129)) == ["3", "5"]
    assert ternarize_(copy.deepcopy(model), TTQConfig(scope="pointwise", min_weights=4096)) == ["5"]
    with pytest.raises(UserError, match="min_weights leave no layer.*widest holds 4096 weights"):
        ternarize_(model, TTQConfig(scope="pointwise", min_weights=4097))
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(UserError, match="min_weights must be an integer"):
            TTQConfig(min_weights=bad)


def test_first_conv_and_batchnorm_never_quantized_even_if_named():
    with pytest.raises(UserError, match="nothing to ternarize"):
        ternarize_(Net(), TTQConfig(include=("stem_fc", "bn")))


@pytest.mark.parametrize("field", ["include", "exclude"])
def test_pattern_matching_nothing_is_an_error(field):
    with pytest.raises(UserError, match=r"'nope\*' matches no module.*hash_head"):
        ternarize_(Net(), TTQConfig(**{field: ("nope*",)}))


def test_refuses_twice():
    model = Net()
    ternarize_(model)
    with pytest.raises(UserError, match="already ternarized"):
        ternarize_(model)


# ---------------------------------------------------------------- threshold, init, report


def test_layer_uses_ternary_weight_and_mean_init():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    w = layer.weight.detach().clone()
    ternarize_(layer, TTQConfig(threshold=0.1))
    delta = 0.1 * w.abs().max()
    state = ternary_state(layer)
    assert state.threshold == pytest.approx(delta.item())
    assert state.wp == pytest.approx(w[w > delta].mean().item())
    assert state.wn == pytest.approx(w[w < -delta].abs().mean().item())
    expected = torch.where(w > delta, state.wp, torch.where(w < -delta, -state.wn, 0.0))
    torch.testing.assert_close(layer.weight, expected)
    assert torch.equal(latent_parameters(layer)[0], w)


def test_scale_init_one():
    layer = nn.Linear(8, 4)
    ternarize_(layer, TTQConfig(scale_init="one"))
    state = ternary_state(layer)
    assert (state.wp, state.wn) == (1.0, 1.0)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.9])
def test_target_sparsity(target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64))
    ternarize_(model, TTQConfig(target_sparsity=target))
    assert layer_report(model)[0]["sparsity"] == pytest.approx(target, abs=0.01)


def test_target_sparsity_with_tied_magnitudes_zeroes_exactly_as_many_as_asked():
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():  # 8 weights share |w| = 0.5: a threshold at the 4th smallest would zero all 8
        tied = [0.5, -0.5, 0.5, -0.5]
        layer.weight.copy_(torch.tensor([tied, tied, [1, -1, 2, -2], [3, -3, 4, -4.0]]))
    ternarize_(layer, TTQConfig(target_sparsity=0.25))
    codes = ternary_state(layer).codes
    assert int((codes == 0).sum()) == 4
    assert codes[2:].abs().min() == 1  # the largest weights are never the ones zeroed
    assert int((layer.weight == 0).sum()) == 4


def test_scales_stay_positive_under_a_strong_push():
    """Free scales went below zero after 21 SGD steps at lr 0.1; TTQ defines Wp, Wn > 0."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    ternarize_(layer)
    opt = torch.optim.SGD(scale_parameters(layer), lr=0.1)
    for _ in range(50):  # push every ternary weight up: dL/dWn = |I_n| > 0, so a free Wn goes below zero
        opt.zero_grad()
        (-layer.weight.sum()).backward()
        opt.step()
    state = ternary_state(layer)
    assert state.wp > 0 and state.wn > 0
    neg = state.codes == -1
    assert neg.any() and (layer.weight[neg] < 0).all()  # "negative" weights stay negative


def test_layer_report_bytes_ratio():
    model = nn.Sequential(nn.Linear(512, 256))
    ternarize_(model)
    (row,) = layer_report(model)
    assert row["name"] == "0" and row["shape"] == [256, 512]
    assert row["bytes_fp32"] == 256 * 512 * 4
    assert row["bytes_packed"] == 256 * 512 // 4 + 8
    assert row["bytes_fp32"] / row["bytes_packed"] >= 15
    assert 0 < row["sparsity"] < 1 and row["wp"] > 0 and row["wn"] > 0


def test_parameter_groups_train_scales_and_latent():
    torch.manual_seed(0)
    model = Net()
    ternarize_(model)
    scales, latent = scale_parameters(model), latent_parameters(model)
    assert len(scales) == 6 and len(latent) == 3
    before = [p.detach().clone() for p in scales + latent]
    opt = torch.optim.SGD([{"params": scales, "lr": 0.1}, {"params": latent, "lr": 0.01}])
    model(torch.randn(2, 3, 8, 8)).pow(2).sum().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, scales + latent))


# ---------------------------------------------------------------- ternary checkpoints


class Student(nn.Module):
    def __init__(self, bits=24):
        super().__init__()
        self.backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
        self.hash_head = nn.Linear(self.backbone.num_features, bits)

    def forward(self, x):
        return self.hash_head(self.backbone(x))


def _trained_ternary_student(tmp_path):
    torch.manual_seed(0)
    model = Student()
    assert ternarize_(model) == ["hash_head"]
    with torch.no_grad():  # move away from the init so scales are not recomputable from the latent weight
        scale_parameters(model)[0].add_(0.5)  # log scales: Wp x 1.65
        scale_parameters(model)[1].sub_(0.5)
    path = save_ternary(tmp_path / "student.safetensors", model, {"kind": "ternary_student"})
    return model.eval(), path


def test_ternary_checkpoint_round_trip(tmp_path):
    model, path = _trained_ternary_student(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)

    tensors, meta = load_checkpoint(path)
    assert meta["kind"] == "ternary_student"
    assert meta["ternary_layers"] == {"hash_head": {"shape": [24, 512]}}
    assert tensors["hash_head.weight_codes"].dtype == torch.uint8
    assert tensors["hash_head.weight_codes"].numel() == 24 * 512 // 4
    assert not any("parametrizations" in key for key in tensors)
    for key, t in tensors.items():
        assert not (t.is_floating_point() and t.numel() == 24 * 512), key

    torch.manual_seed(1)
    fresh = load_ternary_into(Student(), tensors, meta).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    assert torch.equal(ternary_state(fresh.hash_head).codes, ternary_state(model.hash_head).codes)
    assert layer_report(fresh) == layer_report(model)


def test_ternary_checkpoint_mismatch(tmp_path):
    _, path = _trained_ternary_student(tmp_path)
    tensors, meta = load_checkpoint(path)
    with pytest.raises(UserError, match=r"hash_head.*shape \[24, 512\].*\[16, 512\]"):
        load_ternary_into(Student(bits=16), tensors, meta)
    with pytest.raises(UserError, match="does not fit this model: no module named 'head'"):
        load_ternary_into(Student(), tensors, {**meta, "ternary_layers": {"head": {"shape": [24, 512]}}})
    with pytest.raises(UserError, match="not a ternary checkpoint"):
        load_ternary_into(Student(), tensors, {"kind": "student"})
    del tensors["backbone.bn1.weight"]
    with pytest.raises(UserError, match=r"missing \['backbone.bn1.weight'\]"):
        load_ternary_into(Student(), tensors, meta)


def test_any_linear_or_conv_ternarized_by_apply_ternary_loads_back(tmp_path):
    """apply_ternary accepts layers outside the default scope (a 3x3 conv); their checkpoint must load."""
    torch.manual_seed(0)
    model = Net()
    apply_ternary(model, ["body", "hash_head"], TTQConfig(target_sparsity=0.4))
    path = save_ternary(tmp_path / "net.safetensors", model, {"kind": "ternary_student"})
    tensors, meta = load_checkpoint(path)
    fresh = load_ternary_into(Net(), tensors, meta)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(UserError, match="'bn' is a BatchNorm2d"):
        apply_ternary(Net(), ["bn"], TTQConfig())


def test_non_positive_scale_in_a_checkpoint_is_refused(tmp_path):
    _, path = _trained_ternary_student(tmp_path)
    tensors, meta = load_checkpoint(path)
    tensors["hash_head.wn"] = torch.tensor(-0.5)
    with pytest.raises(UserError, match="scale wn must be one positive finite number"):
        load_ternary_into(Student(), tensors, meta)


def test_non_finite_weights_are_a_user_error():
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match="non-finite weights"):
        ternarize_(layer)
