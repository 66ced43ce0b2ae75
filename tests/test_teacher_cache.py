"""The teacher-view cache: the teacher's logits of exactly the view the student trains on, every view, also after a
resume, and no teacher forward pass in a step once the views are known."""

import numpy as np
import pytest
import torch
from conftest import needs_fashion_mnist
from PIL import Image

from hashdistill.data import build_dataset
from hashdistill.distill import teacher_cache
from hashdistill.distill.models import load_model
from hashdistill.distill.student_stage import student_training_set, train_student
from hashdistill.distill.teacher_cache import CACHE_FILE, open_cache, precompute
from hashdistill.distill.teacher_stage import train_teacher
from hashdistill.recipe import recipe_from_dict
from hashdistill.rundir import RunDir

CPU = torch.device("cpu")


def _recipe(data: dict, epochs: int = 2):
    return recipe_from_dict({
        "name": "cache", "device": "cpu", "data": {"image_size": 16, "batch_size": 32, **data},
        "teacher": {"backbone": "test_resnet", "bits": 8, "phase1": {"epochs": 1}, "phase2": {"epochs": 1}},
        "student": {"model": "test_vit", "train": {"epochs": epochs, "lr": 3e-3}, "losses": {"bernoulli_kd": 1.0},
                    "teacher_views": 3}})


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    recipe = _recipe({"dataset": "fashion-mnist", "train_limit": 160, "test_limit": 64, "augment": True})
    run = RunDir(tmp_path_factory.mktemp("teacher"))
    return recipe, train_teacher(recipe, run, CPU)


class _Spy:
    """Records every lookup: the student's input, which (image, view) it was, and the logits handed back."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = teacher_cache.TeacherViewCache.lookup

        def lookup(cache, teacher, images, index, views):
            out = real(cache, teacher, images, index, views)
            self.calls.append((images.clone(), index.clone(), views.clone(), out.clone()))
            return out

        monkeypatch.setattr(teacher_cache.TeacherViewCache, "lookup", lookup)


@needs_fashion_mnist
def test_in_memory_views_get_the_teachers_logits_of_exactly_that_view_also_after_a_resume(fashion, tmp_path,
                                                                                            monkeypatch):
    recipe, teacher_path = fashion
    teacher, _ = load_model(str(teacher_path))
    train = student_training_set(recipe)
    spy = _Spy(monkeypatch)
    train_student(recipe, RunDir(tmp_path / "whole"), CPU, teacher_path)
    whole = spy.calls[:]
    spy.calls.clear()

    from hashdistill import trainer  # killed at the end of epoch 2, before its checkpoint: resume replays it

    real_validate = trainer.TrainTask.__init__
    seen = iter(range(10))

    def interrupting(self, *args, **kwargs):
        real_validate(self, *args, **kwargs)
        validate = self.validate

        def check(model):
            if next(seen) == 1:
                raise KeyboardInterrupt
            return validate(model)

        self.validate = check

    monkeypatch.setattr(trainer.TrainTask, "__init__", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train_student(recipe, RunDir(tmp_path / "cut"), CPU, teacher_path)
    monkeypatch.undo()
    spy = _Spy(monkeypatch)
    train_student(recipe, RunDir(tmp_path / "cut"), CPU, teacher_path)
    resumed = spy.calls

    steps = len(whole) // 2
    assert len(resumed) == steps  # the resume replayed epoch 2 only
    for (x, index, views, logits), (rx, rindex, rviews, rlogits) in zip(whole[steps:], resumed):
        assert torch.equal(index, rindex) and torch.equal(views, rviews) and torch.equal(x, rx)  # the same views
        torch.testing.assert_close(rlogits, logits, rtol=0, atol=1e-5)
    for x, index, views, logits in whole + resumed:
        assert torch.equal(x, train.training_views(train.images[index], views))  # the view ids name the pixels
        with torch.no_grad():
            torch.testing.assert_close(logits, teacher(x), rtol=0, atol=1e-5)  # the teacher's logits of that view
    assert len({int(v) for *_, views, _ in whole for v in views}) > 40  # many of the 50 views came up

    saved = open_cache(teacher_path, train, recipe.data, 8, RunDir(tmp_path / "whole"), CPU)
    known = saved.known.nonzero()
    assert len(known) > 0
    index, views = known[:, 0], known[:, 1]
    with torch.no_grad():
        reference = teacher(train.training_views(train.images[index], views))
    torch.testing.assert_close(saved.logits[index, views], reference, rtol=0, atol=1e-5)


@needs_fashion_mnist
def test_once_every_view_is_known_no_step_runs_the_teacher(fashion, tmp_path, monkeypatch):
    recipe, teacher_path = fashion
    teacher, _ = load_model(str(teacher_path))
    train = student_training_set(recipe)
    run = RunDir(tmp_path)
    cache = precompute(open_cache(teacher_path, train, recipe.data, 8, run, CPU), teacher, train, CPU, 256)
    assert cache.complete and cache.logits.shape == (len(train), 50, 8)
    cache.save(run.checkpoint(CACHE_FILE))
    forwards = []
    real = type(teacher).forward

    def counting(model, x):
        forwards.append(x.device.type)  # the meta-device probe of a checkpoint's architecture is no forward pass
        return real(model, x)

    monkeypatch.setattr(type(teacher), "forward", counting)
    train_student(recipe, run, CPU, teacher_path)
    assert "cpu" not in forwards  # every step looked its teacher logits up


@needs_fashion_mnist
def test_a_cache_of_another_teacher_or_data_is_not_used(fashion, tmp_path):
    recipe, teacher_path = fashion
    teacher, _ = load_model(str(teacher_path))
    train = student_training_set(recipe)
    run = RunDir(tmp_path)
    precompute(open_cache(teacher_path, train, recipe.data, 8, run, CPU), teacher, train, CPU, 256).save(
        run.checkpoint(CACHE_FILE))
    assert open_cache(teacher_path, train, recipe.data, 8, run, CPU).complete
    other = tmp_path / "other-teacher.safetensors"
    other.write_bytes(teacher_path.read_bytes() + b" ")  # other bytes: another teacher as far as the key goes
    assert not open_cache(other, train, recipe.data, 8, run, CPU).known.any()
    shifted = _recipe({"dataset": "fashion-mnist", "train_limit": 160, "augment": True, "val_fraction": 0.2}).data
    assert not open_cache(teacher_path, train, shifted, 8, run, CPU).known.any()


def test_an_image_folder_student_trains_on_a_bank_of_views_whose_teacher_logits_are_exact(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(12):
            image = rng.integers(0, 255, (24 + i, 20, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "images" / cls / f"{i}.png")
    recipe = _recipe({"dataset": "imagefolder", "root": str(tmp_path / "images"), "augment": True,
                      "num_workers": 0}, epochs=3)
    run = RunDir(tmp_path / "run")
    teacher_path = train_teacher(recipe, run, CPU)
    teacher, _ = load_model(str(teacher_path))
    train = student_training_set(recipe)
    assert train.num_views == 3 and len(train) < len(build_dataset(recipe.data, "val")) * 10
    spy = _Spy(monkeypatch)
    train_student(recipe, run, CPU, teacher_path)
    for x, index, views, logits in spy.calls:
        reference = torch.stack([train.view(int(i), int(v)) for i, v in zip(index, views)])
        assert torch.equal(x, train.normalise(reference))  # each image's pixels are its bank view
        with torch.no_grad():
            torch.testing.assert_close(logits, teacher(x), rtol=0, atol=1e-5)
    assert {int(v) for *_, views, _ in spy.calls for v in views} == {0, 1, 2}
