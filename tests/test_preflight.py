"""A run checks everything it will need before its first stage (seconds, nothing left behind), and a resumed run
checks that what it skips is what this recipe's stage would have written."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_support import refused
from conftest import TINY
from PIL import Image
from safetensors.torch import save_file

from hashdistill.app.cli import main
from hashdistill.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _folder(root: Path, classes: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _recipe(tmp_path: Path, **changes) -> Path:
    raw = {**TINY, **{k: {**TINY.get(k, {}), **v} if isinstance(v, dict) else v for k, v in changes.items()}}
    path = tmp_path / "input.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _refused_in_seconds(capsys, tmp_path, recipe: Path, expect: str, command: str = "run") -> None:
    started = time.perf_counter()
    refused(capsys, tmp_path, command, recipe, "--out", tmp_path / "run", expect=expect)
    assert time.perf_counter() - started < 30 and not (tmp_path / "run").exists()


def _weights_files(tmp_path: Path, arts) -> dict[str, Path]:
    folder = tmp_path / "weights"
    folder.mkdir()
    marker = tmp_path / "PICKLE-RAN"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "evil.pth").write_bytes(pickle.dumps({"state_dict": Evil()}))
    torch.save({"net": torch.nn.Linear(2, 2)}, folder / "module.pth")  # a whole pickled module, not tensors
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "a-folder.safetensors").mkdir()
    return {"pickle": folder / "evil.pth", "module": folder / "module.pth", "teacher": arts["teacher"],
            "empty": folder / "empty.safetensors", "folder": folder / "a-folder.safetensors", "marker": marker}


@pytest.mark.parametrize(("which", "expect"), [
    ("pickle", "never unpickles a file"),
    ("module", "never unpickles a file"),
    ("teacher", "does not fit this backbone"),  # a hashdistill checkpoint of the wrong kind
    ("empty", "not a readable safetensors file"),
    ("folder", "it is a folder"),
])
@pytest.mark.parametrize("field", ["teacher", "student"])
def test_a_bad_weights_file_is_refused_before_any_training(arts, tmp_path, capsys, which, expect, field):
    files = _weights_files(tmp_path, arts)
    recipe = _recipe(tmp_path, **{field: {"weights": str(files[which])}})
    _refused_in_seconds(capsys, tmp_path, recipe, f"recipe field '{field}.weights'")
    _refused_in_seconds(capsys, tmp_path, recipe, expect)
    assert not files["marker"].exists()


def test_the_pickle_message_says_how_to_convert_the_file(arts, tmp_path, capsys):
    files = _weights_files(tmp_path, arts)
    err = refused(capsys, tmp_path, "run", _recipe(tmp_path, student={"weights": str(files["pickle"])}),
                  "--out", tmp_path / "run", expect="safetensors.torch")
    assert "weights_only=False" in err and "save_file" in err


@pytest.mark.parametrize(("classes", "expect"), [
    ({"cat": 5, "dog": 0, "emu": 4}, "class folder dog holds no readable image"),
    ({"cat": 12}, "has one class ('cat')"),
])
def test_data_problems_are_found_before_the_teacher_trains(tmp_path, capsys, classes, expect):
    root = _folder(tmp_path / "images", classes)
    recipe = _recipe(tmp_path, data={"dataset": "imagefolder", "root": str(root), "image_size": 16})
    _refused_in_seconds(capsys, tmp_path, recipe, expect)
    _refused_in_seconds(capsys, tmp_path, recipe, expect, command="distill")


def test_a_labelled_fraction_too_small_for_the_classes_is_refused_at_once(tmp_path, capsys):
    root = _folder(tmp_path / "images", {"cat": 8, "dog": 8, "emu": 8})
    recipe = _recipe(tmp_path, data={"dataset": "imagefolder", "root": str(root), "image_size": 16,
                                     "labelled_fraction": 0.01})
    _refused_in_seconds(capsys, tmp_path, recipe, "data.labelled_fraction=0.01 leaves no labelled")


def test_a_model_a_run_cannot_build_is_refused_before_the_teacher_trains(tmp_path, capsys):
    recipe = _recipe(tmp_path, student={"model": "resnet18", "model_kwargs": {"act_layer": "no_such_act"}})
    _refused_in_seconds(capsys, tmp_path, recipe, "act_layer='no_such_act' names no activation layer")


# --- resume: a skipped stage checks what it skips ---------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run through teacher and student, with its recipe file."""
    folder = tmp_path_factory.mktemp("resumable")
    recipe = folder / "input.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    assert main(["run", str(recipe), "--out", str(folder / "run"), "--stages", "teacher,student"]) == 0
    return recipe, folder / "run"


def _copy_run(source: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(source, tmp_path / "run"))


def test_a_student_replaced_by_the_teacher_is_refused_on_resume(finished_run, tmp_path, capsys):
    recipe, source = finished_run
    run = _copy_run(source, tmp_path)
    checkpoints = run / "checkpoints"
    (checkpoints / "student.safetensors").write_bytes((checkpoints / "teacher.safetensors").read_bytes())
    refused(capsys, tmp_path, "run", recipe, "--resume", run, "--stages", "teacher,student",
            expect="student.safetensors is in the run directory, but it holds a 'teacher' checkpoint")


@pytest.mark.parametrize(("changes", "expect"), [
    ({"bits": 12}, "its codes have 12 bits, this recipe's 8"),
    ({"data": {"dataset": "digits"}}, "data.dataset='digits', this recipe has 'synthetic'"),
    ({"stage_digest": "0" * 16}, "other teacher settings than this recipe's"),
])
def test_a_teacher_from_another_recipe_is_refused_on_resume(finished_run, tmp_path, capsys, changes, expect):
    recipe, source = finished_run
    run = _copy_run(source, tmp_path)
    path = run / "checkpoints" / "teacher.safetensors"
    tensors, meta = load_checkpoint(path)
    data = {**meta["data"], **changes.pop("data", {})}
    save_checkpoint(path, tensors, {**meta, "data": data, **changes})
    refused(capsys, tmp_path, "run", recipe, "--resume", run, "--stages", "teacher,student",
            expect=expect)


def test_a_training_state_of_another_recipe_is_not_resumed(finished_run, tmp_path, capsys):
    recipe, source = finished_run
    run = _copy_run(source, tmp_path)
    (run / "checkpoints" / "student.safetensors").unlink()  # the student stage must train, from its last state
    last = run / "checkpoints" / "student-last.safetensors"
    tensors, meta = load_checkpoint(last)
    save_checkpoint(last, tensors, {**meta, "identity": "another recipe"})
    refused(capsys, tmp_path, "run", recipe, "--resume", run, "--stages", "teacher,student",
            expect="for other data or settings than this run's")


def test_an_untouched_run_resumes_as_already_done(finished_run, tmp_path, capsys):
    recipe, source = finished_run
    run = _copy_run(source, tmp_path)
    assert main(["run", str(recipe), "--resume", str(run), "--stages", "teacher,student"]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 2


def test_an_edited_ternary_layers_field_names_the_problem(arts, tmp_path, capsys):
    tensors, meta = load_checkpoint(arts["ternary"])
    layers = dict(meta["ternary_layers"])
    first = next(iter(layers))
    for name, edited, expect in (("dropped", {k: v for k, v in layers.items() if k != first}, "does not list"),
                                 ("added", {**layers, "no.such.layer": layers[first]}, "no layer with weights")):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"hashdistill": __import__("json").dumps(
            {"format_version": 1, **meta, "ternary_layers": edited})})
        refused(capsys, tmp_path, "eval", path, expect=expect)
