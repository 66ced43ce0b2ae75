import pytest
import yaml

from hashdistill.errors import UserError
from hashdistill.recipe import Recipe, builtin_recipes, dump_recipe, load_recipe, recipe_from_dict


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipes_load(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))).digest() == recipe.digest()


def test_ood_recipe_holds_out_classes():
    recipe = load_recipe("fashion-mnist-ood")
    assert recipe.data.in_classes == list(range(8)) and recipe.data.ood_classes == [8, 9]


def test_overrides_are_typed():
    recipe = load_recipe("quickstart", ["teacher.bits=24", "student.temperature=4", "data.augment=true"])
    assert recipe.teacher.bits == 24 and recipe.student.temperature == 4.0 and recipe.data.augment is True


def test_recipe_file_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nteacher: {bits: 12}\n")
    assert load_recipe(path).teacher.bits == 12


@pytest.mark.parametrize("raw, field", [
    ({"teacher": {"bitz": 3}}, "teacher.bitz"),
    ({"teacher": {"bits": "many"}}, "teacher.bits"),
    ({"teacher": {"bits": 0}}, "teacher.bits"),
    ({"teacher": {"bits": True}}, "teacher.bits"),
    ({"data": {"dataset": "mnist"}}, "data.dataset"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction"),
    ({"teacher": {"phase1": {"optimizer": "lion"}}}, "teacher.phase1.optimizer"),
    ({"student": {"losses": {"magic": 1.0}}}, "student.losses"),
    ({"student": {"model_kwargs": {"checkpoint_path": "x.pth"}}}, "student.model_kwargs"),
    ({"student": {"model_kwargs": {"channels": {"a": 1}}}}, "student.model_kwargs.channels"),
    ({"quantize": {"threshold": 1.0}}, "quantize.threshold"),
    ({"quantize": {"min_weights": -1}}, "quantize.min_weights"),
    ({"quantize": {"min_weights": 0.5}}, "quantize.min_weights"),
    ({"data": {"in_classes": [0, 1], "ood_classes": [1]}}, "data.ood_classes"),
    ({"data": "fashion"}, "data"),
])
def test_bad_recipes_name_the_field(raw, field):
    with pytest.raises(UserError, match=f"'{field}'"):
        recipe_from_dict(raw)


def test_unknown_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="built-in recipes"):
        load_recipe("does-not-exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)


def test_recipes_cannot_execute_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\n")
    with pytest.raises(UserError):
        load_recipe(evil)
    assert not (tmp_path / "pwned").exists()


def test_defaults_are_a_valid_recipe():
    assert isinstance(recipe_from_dict({}), Recipe)
