"""LLC teacher mechanics, distillation losses against hand-computed values, and the teacher cache."""

import math

import pytest
import torch

from hashdistill.distill.losses import LOSSES, LossInputs, weighted_loss
from hashdistill.distill.models import HashStudent, LLCTeacher, load_model, sign_ste
from hashdistill.errors import UserError


def test_sign_ste_forward_and_identity_gradient():
    x = torch.tensor([-2.0, -0.0, 0.0, 0.5], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1.0, 1.0, 1.0, 1.0]  # sign(0) = +1
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_teacher_class_logits_use_binarized_codebook():
    teacher = LLCTeacher("test_resnet", bits=4, num_classes=3)
    with torch.no_grad():
        teacher.codebook.copy_(torch.tensor([[0.3, -0.2, 0.1, -0.9], [-0.1, -0.1, 0.2, 0.4], [0.0, 0.5, -0.5, 0.2]]))
    z = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    expected = z @ torch.tensor([[1.0, -1, 1, -1], [-1, -1, 1, 1], [1, 1, -1, 1]]).t()
    assert torch.allclose(teacher.class_logits(z), expected)
    assert teacher.class_codes.tolist() == [[1, -1, 1, -1], [-1, -1, 1, 1], [1, 1, -1, 1]]


def _inputs(**kw):
    base = dict(student=torch.tensor([[1.0, -2.0]]), teacher=torch.tensor([[2.0, 0.0]]), labels=torch.tensor([1]),
                class_codes=torch.tensor([[1.0, 1.0], [-1.0, 1.0]]), temperature=2.0)
    return LossInputs(**{**base, **kw})


def _sigmoid(v):
    return 1 / (1 + math.exp(-v))


def _bce(p, q):  # target q, prediction p
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


def test_bernoulli_kd_by_hand():
    t = 2.0
    bits = [_bce(_sigmoid(1.0 / t), _sigmoid(2.0 / t)), _bce(_sigmoid(-2.0 / t), _sigmoid(0.0 / t))]
    assert LOSSES["bernoulli_kd"](_inputs()).item() == pytest.approx(t * t * sum(bits) / 2, rel=1e-6)


def test_dth_mse_by_hand():
    expected = ((_sigmoid(1.0) - _sigmoid(2.0)) ** 2 + (_sigmoid(-2.0) - _sigmoid(0.0)) ** 2) / 2
    assert LOSSES["dth_mse"](_inputs()).item() == pytest.approx(expected, rel=1e-6)


def test_code_bce_by_hand():
    # label 1 -> class code (-1, +1) -> targets (0, 1)
    expected = (_bce(_sigmoid(1.0), 0.0) + _bce(_sigmoid(-2.0), 1.0)) / 2
    assert LOSSES["code_bce"](_inputs()).item() == pytest.approx(expected, rel=1e-6)


def test_dsh_by_hand():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    labels = torch.tensor([0, 0, 1])
    margin = 4.0  # 2k
    d2 = {(0, 1): 4.0, (0, 2): 8.0, (1, 2): 4.0}
    pair = [0.5 * d2[(0, 1)], 0.5 * max(margin - d2[(0, 2)], 0), 0.5 * max(margin - d2[(1, 2)], 0)]
    expected = 2 * sum(pair) / 6  # every unordered pair counted twice over 6 ordered off-diagonal pairs
    got = LOSSES["dsh"](LossInputs(z, None, labels, torch.ones(2, 2))).item()
    assert got == pytest.approx(expected, rel=1e-6)  # |z| = 1: the regulariser is zero


def test_weighted_loss_sums_and_skips_zero_weights():
    batch = _inputs()
    out = weighted_loss({"bernoulli_kd": 1.0, "code_bce": 0.5, "dth_mse": 0.0})(batch)
    kd, bce = LOSSES["bernoulli_kd"](batch).item(), LOSSES["code_bce"](batch).item()
    assert out["loss"].item() == pytest.approx(kd + 0.5 * bce)
    assert set(out) == {"loss", "bernoulli_kd", "code_bce"}  # the unweighted parts, for metrics.jsonl
    assert out["code_bce"].item() == pytest.approx(bce)


def _batch(n: int = 12, bits: int = 16, seed: int = 0) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    return LossInputs(student=torch.randn(n, bits, generator=g), teacher=torch.randn(n, bits, generator=g),
                      labels=torch.randint(0, 3, (n,), generator=g), class_codes=torch.randn(3, bits).sign())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_a_finite_scalar_with_a_gradient(name):
    batch = _batch()
    batch.student.requires_grad_(True)
    value = LOSSES[name](batch)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert batch.student.grad is not None and batch.student.grad.abs().sum() > 0


def test_every_registered_loss_can_be_named_in_a_recipe():
    from hashdistill.recipe import LOSS_NAMES

    assert set(LOSS_NAMES) == set(LOSSES)


def test_code_relation_is_zero_when_the_students_codes_equal_the_teachers():
    batch = _batch()
    same_signs = batch.teacher.sign() * torch.rand(batch.teacher.shape).add(0.1)  # other logits, same codes
    assert LOSSES["code_relation"](LossInputs(same_signs, batch.teacher, batch.labels, batch.class_codes)) == 0
    flipped = same_signs.clone()
    flipped[:3, :4] *= -1  # a few bits of three codes disagree
    assert LOSSES["code_relation"](LossInputs(flipped, batch.teacher, batch.labels, batch.class_codes)) > 0


def test_code_relation_gradient():
    """The relational KL is differentiated correctly (gradcheck on continuous codes, float64), and reaches the
    student's logits through sign's straight-through estimator with tanh's derivative."""
    from hashdistill.distill import losses

    teacher = _batch().teacher.double().sign()

    def relation(codes: torch.Tensor) -> torch.Tensor:
        target = losses._log_neighbours(teacher, teacher, 2.0)
        return (torch.nn.functional.kl_div(losses._log_neighbours(codes, codes, 2.0), target, log_target=True,
                                           reduction="batchmean")
                + torch.nn.functional.kl_div(losses._log_neighbours(codes, teacher, 2.0), target, log_target=True,
                                             reduction="batchmean"))

    codes = torch.randn(teacher.shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relation, (codes,))

    logits = _batch(seed=1).student.double().requires_grad_(True)
    LOSSES["code_relation"](LossInputs(logits, teacher, torch.zeros(len(teacher)), teacher[:1])).backward()
    signs = torch.where(logits >= 0, 1.0, -1.0).double().requires_grad_(True)
    relation(signs).backward()
    torch.testing.assert_close(logits.grad, signs.grad * (1 - torch.tanh(logits.detach()) ** 2))


def test_code_relation_descends_towards_the_teachers_neighbourhoods():
    batch = _batch(n=32, bits=12, seed=2)
    torch.manual_seed(0)
    logits = torch.randn(32, 12, requires_grad=True)
    optimiser = torch.optim.SGD([logits], lr=2.0)
    first = None
    for _ in range(300):
        loss = LOSSES["code_relation"](LossInputs(logits, batch.teacher, batch.labels, batch.class_codes))
        first = loss.item() if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.5 * first
    assert (logits.sign() == batch.teacher.sign()).float().mean() > 0.7  # from about half (random) to most bits


def test_trained_teacher_and_student(trained_run):
    teacher, meta = load_model(str(trained_run["teacher"]))
    student, smeta = load_model(str(trained_run["student"]))
    assert meta["kind"] == "teacher" and smeta["kind"] == "student"
    assert isinstance(student, HashStudent) and student.bits == teacher.bits
    assert torch.equal(student.class_codes, teacher.class_codes)  # the student decodes in the teacher's space
    assert smeta["training"]["student"]["val_mhd_accuracy"] > 0.5  # 4 classes: well above chance
    # model selection used the validation split; the test split is never read during training
    stages = {r["stage"] for r in trained_run["run"].metrics()}
    assert stages == {"teacher-phase1", "teacher-phase2", "student"}
    assert all("test" not in key for r in trained_run["run"].metrics() for key in r)


def test_mismatched_checkpoint_is_a_clear_error(trained_run, tmp_path):
    from hashdistill.checkpoint import load_checkpoint, save_checkpoint

    tensors, meta = load_checkpoint(trained_run["teacher"])
    save_checkpoint(tmp_path / "wrong-bits.safetensors", tensors, {**meta, "bits": 12})
    with pytest.raises(UserError, match="bit width or architecture"):
        load_model(str(tmp_path / "wrong-bits.safetensors"))
    save_checkpoint(tmp_path / "wrong-arch.safetensors", tensors, {**meta, "arch": "resnet18"})
    with pytest.raises(UserError, match="another architecture"):
        load_model(str(tmp_path / "wrong-arch.safetensors"))


def test_missing_codebook_is_never_silently_random(trained_run, tmp_path):
    from hashdistill.checkpoint import load_checkpoint, save_checkpoint

    tensors, meta = load_checkpoint(trained_run["teacher"])
    del tensors["codebook"]
    save_checkpoint(tmp_path / "no-codebook.safetensors", tensors, meta)
    with pytest.raises(UserError, match="'codebook' is missing"):
        load_model(str(tmp_path / "no-codebook.safetensors"))


def test_teacher_for_other_data_is_refused(trained_run, tiny_recipe, tmp_path):
    from hashdistill.distill.student_stage import train_student
    from hashdistill.recipe import recipe_from_dict
    from hashdistill.rundir import RunDir

    other = recipe_from_dict({**tiny_recipe.to_dict(), "data": {**tiny_recipe.to_dict()["data"], "image_size": 24}})
    with pytest.raises(UserError, match="image_size"):
        train_student(other, RunDir(tmp_path), torch.device("cpu"), trained_run["teacher"])


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv3_small_100", "lcnet_050", "test_vit", "regnetx_002"])
def test_hash_models_build_on_any_timm_backbone(backbone):
    student = HashStudent(backbone, bits=12, num_classes=3)
    teacher = LLCTeacher(backbone, bits=12, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    assert student(x).shape == (2, 12) and teacher(x).shape == (2, 12)


def test_student_takes_timm_arguments_and_rebuilds_from_its_checkpoint(tmp_path):
    from hashdistill.checkpoint import save_checkpoint
    from hashdistill.distill.models import STUDENT, load_model, model_meta

    thin = HashStudent("resnet18", bits=8, num_classes=3, model_kwargs={"channels": [8, 16, 32, 64]})
    params = sum(p.numel() for p in thin.parameters())
    assert params < sum(p.numel() for p in HashStudent("resnet18", bits=8, num_classes=3).parameters()) / 10
    info = {"class_names": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.5] * 3, "input_size": 32}
    path = tmp_path / "thin.safetensors"
    save_checkpoint(path, thin.state_dict(), model_meta(STUDENT, "resnet18", 8, info,
                                                        arch_kwargs={"channels": [8, 16, 32, 64]}))
    rebuilt, _ = load_model(str(path))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(x), thin.eval()(x))


@pytest.mark.parametrize("kwargs, message", [
    ({"checkpoint_path": "/tmp/evil.pth"}, "not allowed"),  # timm would torch.load it
    ({"pretrained_cfg_overlay": {"file": "x"}}, "not allowed"),
    ({"num_classes": 5}, "not allowed"),
    ({"device": "meta"}, "not allowed"),  # built where the checkpoint's weights would silently not load
    ({"channels": {"nested": [1]}}, "not allowed"),  # only what a recipe can hold
    ({"no_such_argument": 1}, "does not take"),
])
def test_unsafe_or_unknown_timm_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        HashStudent("resnet18", bits=8, num_classes=3, model_kwargs=kwargs)


def test_ordinary_timm_arguments_pass():
    student = HashStudent("resnet18", bits=8, num_classes=3, model_kwargs={"drop_path_rate": 0.1,
                                                                           "channels": [8, 16, 32, 64]})
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 8)


WALKED_MODELS = ("resnet18", "lcnet_050", "mobilenetv3_small_100", "test_vit", "regnetx_002")


def _constructor_keys(name: str) -> list[str]:
    import inspect

    import timm

    with torch.device("meta"):
        model = timm.create_model(name, num_classes=0)
    keys = set()
    for cls in type(model).__mro__:
        if "__init__" in vars(cls):
            keys |= {k for k, p in inspect.signature(cls.__init__).parameters.items()
                     if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    from hashdistill.recipe import unsafe_model_kwargs

    return sorted(k for k in keys if not unsafe_model_kwargs({k: 0}))


@pytest.mark.parametrize("name", WALKED_MODELS)
def test_every_key_arch_kwargs_may_hold_is_a_clear_error_or_a_model(name):
    """What a checkpoint's arch_kwargs may hold: any constructor argument of the model, with any plain value. Each
    either builds (and runs at 32 px on the meta device) or is a UserError: never a timm traceback."""
    from hashdistill.distill.models import create_backbone, probe_forward

    for key in _constructor_keys(name):
        for value in ("no_such_layer", -3, 0.5, [1.5, 2]):
            try:
                with torch.device("meta"):
                    backbone = create_backbone(name, model_kwargs={key: value})
                probe_forward(backbone, 32, f"{name} {key}={value!r}")
            except UserError:
                pass


@pytest.mark.parametrize("key, value, kind", [("act_layer", "no_such_act", "activation"),
                                              ("norm_layer", "batchnorm9", "normalisation"),
                                              ("attn_layer", "nope", "attention")])
def test_a_layer_name_timm_does_not_know_is_named_in_the_error(key, value, kind):
    from hashdistill.distill.models import create_backbone

    with pytest.raises(UserError, match=f"{key}='{value}' names no {kind} layer timm knows"):
        create_backbone("resnet18", model_kwargs={key: value})
    assert create_backbone("test_resnet", model_kwargs={"act_layer": "gelu"}) is not None  # a known name builds


def test_a_labels_only_epoch_is_as_many_steps_as_a_distilled_one():
    from conftest import TINY

    from hashdistill.data import UNLABELLED
    from hashdistill.distill.student_stage import student_training_set
    from hashdistill.recipe import recipe_from_dict

    recipe = recipe_from_dict({**TINY, "data": {**TINY["data"], "labelled_fraction": 0.25}})
    every_image, labelled = student_training_set(recipe), student_training_set(recipe, labels_only="codes")
    kept = int((torch.as_tensor(every_image.labels) != UNLABELLED).sum())
    assert 0 < kept < len(every_image) and len(labelled) == kept * round(len(every_image) / kept)
    assert abs(len(labelled) - len(every_image)) <= kept and UNLABELLED not in set(labelled.labels.tolist())
