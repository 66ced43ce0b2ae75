"""Bad input at the command line: one clear message, exit code 2, no traceback, no partial output.

Each case runs ``hashdistill.cli.main`` in this process (a traceback would surface as an exception
here) and checks the directory it works in is left exactly as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from cli_support import refused, variant
from conftest import TINY
from onnx import TensorProto, helper
from PIL import Image
from safetensors.torch import save_file
from test_export_support import exported

from hashdistill.app.cli import main
from hashdistill.checkpoint import load_checkpoint, save_checkpoint
from hashdistill.data import build_dataset
from hashdistill.recipe import DataConfig, load_recipe, recipe_from_dict
from hashdistill.rundir import RunDir


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def student_onnx(tmp_path_factory) -> Path:
    return exported(tmp_path_factory.getbasetemp() / "export-artefacts", "student")[0]


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "input.yaml"  # not recipe.yaml: that name marks a run directory
    path.write_text(text)
    return path


# --- recipes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expect"), [
    ("name: x\ntacher: {bits: 8}\n", "unknown recipe field 'tacher'"),
    ("teacher: {bitz: 8}\n", "unknown recipe field 'teacher.bitz'; allowed fields here: backbone, bits"),
    ("teacher: {phase1: {epochs: 2, lr: 1e-3, momentun: 0.9}}\n", "unknown recipe field 'teacher.phase1.momentun'"),
    ("teacher: {bits: many}\n", "recipe field 'teacher.bits': expected an integer, got str 'many'"),
    ("teacher: {bits: 8.5}\n", "recipe field 'teacher.bits': expected an integer, got float 8.5"),
    ("data: {augment: 'yes please'}\n", "recipe field 'data.augment': expected true/false"),
    ("data: {in_classes: 3}\n", "recipe field 'data.in_classes': expected a list, got int 3"),
    ("student: {losses: {bernoulli_kd: high}}\n", "recipe field 'student.losses.bernoulli_kd': expected a number"),
    ("student: {losses: {mse: 1.0}}\n", "recipe field 'student.losses': unknown loss 'mse'"),
    ("teacher: {bits: 0}\n", "recipe field 'teacher.bits': must be in [1, 1024]"),
    ("teacher: {phase1: {lr: .nan}}\n", "recipe field 'teacher.phase1.lr': must be > 0"),
    ("device: tpu\n", "recipe field 'device': 'tpu' is not allowed; choose one of auto, cpu, cuda"),
    ("teacher: 16\n", "recipe field 'teacher': expected a mapping of fields, got int 16"),
    ("- teacher\n- student\n", "a recipe must be a mapping of fields, got list"),
    ("teacher: {bits: [8\n", "not valid YAML: "),
    ("seed: -1\n", "recipe field 'seed': must be in [0, 2**32)"),
    ("teacher: {phase1: {lr: 1" + "0" * 400 + "}}\n", "'teacher.phase1.lr': the value is too large for a number"),
    ("name: " + "[" * 3000 + "]" * 3000 + "\n", "not a recipe (its YAML is nested too deeply)"),
    ("name: !!python/object/apply:os.getcwd []\n", "could not determine a constructor for the tag"),
])
def test_bad_recipe(tmp_path, capsys, text, expect):
    refused(capsys, tmp_path, "run", _recipe(tmp_path, text), "--out", tmp_path / "run", expect=expect)


@pytest.mark.parametrize(("args", "expect"), [
    (["nosuch.yaml"], "recipe file not found: nosuch.yaml"),
    (["nosuch"], "unknown recipe 'nosuch'; built-in recipes: "),
    (["quickstart", "--set", "teacher.bits"], "--set expects field=value"),
    (["quickstart", "--set", "teacher.bits.x=3"], "--set teacher.bits.x: 'bits' is not a section"),
    (["quickstart", "--set", "teacher.bits=abc"], "recipe field 'teacher.bits': expected an integer, got str 'abc'"),
    (["quickstart", "--set", "teacher.phase1.lr=fast"], "recipe field 'teacher.phase1.lr': expected a number"),
    (["quickstart", "--stages", "teacher,distill"], "--stages: unknown stage 'distill'"),
])
def test_bad_recipe_name_override_or_stage(tmp_path, capsys, monkeypatch, args, expect):
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, "run", *args, "--out", tmp_path / "run", expect=expect)


def test_exponent_floats_are_numbers(tmp_path):
    """PyYAML reads 3e-4 (no dot) as a string; a float field takes it as the number it is."""
    path = _recipe(tmp_path, "teacher: {phase1: {lr: 3e-4}}\nquantize: {target_sparsity: 5E-1}\n")
    recipe = load_recipe(path, ["student.train.lr=1e30"])
    assert recipe.teacher.phase1.lr == 3e-4 and recipe.quantize.target_sparsity == 0.5
    assert recipe.student.train.lr == 1e30


# --- run directories and outputs -----------------------------------------------------------------------------

def test_existing_run_directory_needs_resume_or_force(tmp_path, capsys):
    recipe = _recipe(tmp_path, yaml.safe_dump(TINY))
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = refused(capsys, tmp_path, "run", recipe, "--out", out, expect="has no run marker, so hashdistill did not")
    assert "pass --force" not in err  # --force would not replace it either
    (out / "notes.txt").unlink()
    RunDir(out).save_recipe(recipe_from_dict(TINY))  # a run directory: its marker lists what it wrote
    refused(capsys, tmp_path, "run", recipe, "--out", out, expect=f"run directory {out} already exists: pass --resume")


def test_resume_needs_a_run_directory_of_the_same_recipe(tmp_path, capsys):
    recipe = _recipe(tmp_path, yaml.safe_dump(TINY))
    refused(capsys, tmp_path, "run", recipe, "--resume", tmp_path, expect="not a run directory (no recipe.yaml)")
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(TINY))
    refused(capsys, tmp_path, "run", recipe, "--resume", run, "--set", "teacher.bits=16",
           expect="the run was started with a different recipe")


@pytest.mark.parametrize("command", ["quantize", "export", "taxonomy", "eval", "index"])
def test_existing_output_is_refused_without_force(arts, tmp_path, capsys, command):
    existing = tmp_path / "existing.out"
    existing.write_text("keep me")
    args = {"quantize": ["quantize", arts["student"], "-o", existing],
            "export": ["export", arts["student"], "-o", existing],
            "taxonomy": ["taxonomy", arts["teacher"], "-o", existing],
            "eval": ["eval", arts["student"], "--json", existing],
            "index": ["index", "build", arts["student"], "synthetic:test", "-o", existing]}[command]
    refused(capsys, tmp_path, *args, expect=f"{existing} already exists; pass --force to overwrite it")


def test_taxonomy_overwrites_with_force(arts, tmp_path, capsys):
    existing = tmp_path / "tree.png"
    existing.write_text("old")
    assert main(["taxonomy", str(arts["teacher"]), "-o", str(existing), "--force"]) == 0
    assert existing.read_bytes().startswith(b"\x89PNG")
    assert "bit splits" in capsys.readouterr().out


# --- datasets -----------------------------------------------------------------------------------------------

def _imagefolder_recipe(tmp_path: Path, root: Path) -> Path:
    recipe = json.loads(json.dumps(TINY))
    recipe["data"] = {"dataset": "imagefolder", "root": str(root), "image_size": 16}
    return _recipe(tmp_path, yaml.safe_dump(recipe))


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)


def _damaged_images(folder: Path) -> int:
    """Three kinds of damage, each with an image suffix: not an image, a cut PNG, a cut JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.png").write_text("not an image")
    _png(folder / "cut.png", 1)
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:60])
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "cut.jpg")
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:-200])
    return 3


@pytest.mark.parametrize(("layout", "expect"), [
    ("missing", "image folder not found: "),
    ("empty", "has no class sub-folders (expected "),
    ("no-images", "holds no readable images (0 unreadable skipped)"),
    ("all-damaged", "holds no readable images (3 unreadable skipped)"),
])
def test_bad_dataset_folder(tmp_path, capsys, layout, expect):
    root = tmp_path / "images"
    if layout != "missing":
        root.mkdir()
    if layout == "no-images":
        (root / "cats").mkdir()
        (root / "cats" / "readme.txt").write_text("no images here")
    if layout == "all-damaged":
        _damaged_images(root / "cats")
    refused(capsys, tmp_path, "run", _imagefolder_recipe(tmp_path, root), "--out", tmp_path / "run", expect=expect)


def test_damaged_images_are_skipped_and_counted(tmp_path, capsys):
    root = tmp_path / "images"
    for label in ("a", "b"):
        for i in range(5):
            _png(root / "train" / label / f"{i}.png", 10 * i + len(label))
    skipped = _damaged_images(root / "train" / "a")
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=16)
    splits = [build_dataset(cfg, split) for split in ("train", "val", "test")]
    (line,) = capsys.readouterr().err.splitlines()  # one line for the run's three splits, naming the files
    assert line.startswith("hashdistill: warning: ") and f"skipped {skipped} unreadable image(s): " in line
    assert "cut.png" in line and "notes.png" in line
    assert sum(len(s) for s in splits) == 10
    for dataset in splits:
        assert all("cut" not in p.name and "notes" not in p.name for p in dataset.paths)
        for i in range(len(dataset)):  # every image kept really decodes
            assert dataset[i][0].shape == (3, 16, 16)


def test_index_build_skips_damaged_images(arts, tmp_path, capsys):
    folder = tmp_path / "images"
    for i in range(4):
        _png(folder / "a" / f"{i}.png", i)
    skipped = _damaged_images(folder / "a")
    code = main(["index", "build", str(arts["student"]), str(folder), "-o", str(tmp_path / "index.npz")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "indexed 4 images" in out.out
    assert f"hashdistill: warning: {folder}: skipped {skipped} unreadable image(s)" in out.err


# --- checkpoints --------------------------------------------------------------------------------------------

def test_checkpoint_of_another_architecture(arts, tmp_path, capsys):
    path = variant(arts, tmp_path, "student", arch="test_resnet")
    refused(capsys, tmp_path, "eval", path, expect="(checkpoint of another architecture?)")


def test_checkpoint_of_another_bit_width(arts, tmp_path, capsys):
    path = variant(arts, tmp_path, "student", bits=8)
    refused(capsys, tmp_path, "eval", path, expect="(another bit width or architecture?)")
    refused(capsys, tmp_path, "quantize", arts["student"], "-o", tmp_path / "q.safetensors", "--teacher",
           arts["teacher8"], expect="has 8 bits, the student 16")


@pytest.mark.parametrize("which", [
    "teacher", "student",
    "ternary",
])
@pytest.mark.parametrize(("num_classes", "expect"), [
    (50, "metadata 'class_names' must be a list of 50 strings"),  # in range, but not the recorded classes
    (10**6, "metadata 'num_classes' must be an integer in [1, 100000]"),
    (2**40, "metadata 'num_classes' must be an integer in [1, 100000]"),
    (2**70, "metadata 'num_classes' must be an integer in [1, 100000]"),
])
def test_metadata_cannot_size_the_model(arts, tmp_path, capsys, which, num_classes, expect):
    """A class count in the metadata is range-checked, then checked against the codebook, before a model is built."""
    path = variant(arts, tmp_path, which, num_classes=num_classes)
    refused(capsys, tmp_path, "eval", path, expect=expect)


def test_checkpoint_cannot_make_us_fetch_a_model(arts, tmp_path, capsys):
    """timm would download an ``hf-hub:`` architecture's config: a checkpoint may only name registered models."""
    path = variant(arts, tmp_path, "student", arch="hf-hub:someone/model")
    refused(capsys, tmp_path, "eval", path, expect="'hf-hub:someone/model', which is not a timm model name")


@pytest.mark.parametrize(("data", "expect"), [({"dataset": "synthetic", "image_size": 2}, "image_size': must be in"),
                                              (["synthetic"], "data")])
@pytest.mark.parametrize("command", ["eval", "quantize", "export"])
def test_checkpoint_with_a_damaged_data_section(arts, tmp_path, capsys, data, expect, command):
    path = variant(arts, tmp_path, "student", data=data)
    argv = {"eval": ["eval", path], "quantize": ["quantize", path, "-o", tmp_path / "q.safetensors"],
            "export": ["export", path, "-o", tmp_path / "m.onnx"]}[command]
    refused(capsys, tmp_path, *argv, expect=expect)


def test_index_build_with_a_checkpoint_whose_data_section_is_not_a_mapping(arts, tmp_path, capsys):
    path = variant(arts, tmp_path, "student", data=["synthetic"])
    refused(capsys, tmp_path, "index", "build", path, "synthetic:test", "-o", tmp_path / "i.npz", expect="data")


def test_ternary_checkpoint_of_another_shape(arts, tmp_path, capsys):
    _, meta = load_checkpoint(arts["ternary"])
    layers = {name: {"shape": [2 * d for d in info["shape"]]} for name, info in meta["ternary_layers"].items()}
    path = variant(arts, tmp_path, "ternary", ternary_layers=layers)
    refused(capsys, tmp_path, "eval", path, expect="checkpoint shape")


def test_teacher_of_another_dataset(arts, tmp_path, capsys):
    recipe = _recipe(tmp_path, yaml.safe_dump(TINY))
    refused(capsys, tmp_path, "distill", recipe, "--teacher", arts["digits_teacher"], "--out", tmp_path / "run",
           expect="was trained with data.dataset='digits', but this recipe has 'synthetic'")


@pytest.mark.parametrize(("kind", "expect"), [
    ("truncated", "not a hashdistill checkpoint (not a readable safetensors file"),
    ("truncated-data", "not a hashdistill checkpoint (not a readable safetensors file"),
    ("empty", "not a hashdistill checkpoint (not a readable safetensors file"),
    ("foreign", "a safetensors file but not a hashdistill checkpoint"),
    ("float", "holds a 'float' checkpoint"),
    ("train-state", "holds a 'train-state' checkpoint"),
])
@pytest.mark.parametrize("command", ["eval", "quantize", "export", "taxonomy", "index"])
def test_unusable_checkpoint(arts, tmp_path, capsys, kind, expect, command):
    path = tmp_path / "model.safetensors"
    if kind == "truncated":
        path.write_bytes(arts["student"].read_bytes()[:3000])
    elif kind == "truncated-data":
        path.write_bytes(arts["student"].read_bytes()[:-100])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        save_file({"weight": torch.zeros(3)}, str(path))
    elif kind == "float":
        shutil.copy(arts["float"], path)
    else:
        save_checkpoint(path, {"model.w": torch.zeros(2)}, {"kind": "train-state", "stage": "student"})
    if command == "taxonomy" and kind in ("float", "train-state"):
        expect = "has no class codebook"
    if command == "quantize" and kind == "float":
        expect = "this command takes: student"
    if command == "quantize" and kind == "train-state":
        expect = "records no dataset; pass --recipe"
    args = {"eval": [], "quantize": ["-o", tmp_path / "q.safetensors"], "export": ["-o", tmp_path / "m.onnx"],
            "taxonomy": ["-o", tmp_path / "tree.png"]}
    argv = ["index", "build", path, "synthetic:test", "-o", tmp_path / "i.npz"] if command == "index" \
        else [command, path, *args[command]]
    refused(capsys, tmp_path, *argv, expect=expect)


# --- ONNX files and indexes ---------------------------------------------------------------------------------

def _foreign_onnx(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    return path


@pytest.mark.parametrize("kind", ["truncated", "foreign", "garbage"])
@pytest.mark.parametrize("command", ["eval", "index-build", "index-search"])
def test_unusable_onnx_file(student_onnx, index16, tmp_path, capsys, kind, command):
    path = tmp_path / "model.onnx"
    if kind == "truncated":
        path.write_bytes(student_onnx.read_bytes()[:4000])
    elif kind == "foreign":
        _foreign_onnx(path)
    else:
        path.write_bytes(b"\x00not onnx at all" * 10)
    expect = "not a hashdistill export" if kind == "foreign" else str(path)
    if command == "eval":
        argv = ["eval", path]
    elif command == "index-build":
        argv = ["index", "build", path, "synthetic:test", "-o", tmp_path / "i.npz"]
    else:
        image = tmp_path / "q.png"
        _png(image, 0)
        argv = ["index", "search", index16, image, "--model", path]
    refused(capsys, tmp_path, *argv, expect=expect)


@pytest.fixture(scope="module")
def index16(arts, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("index") / "student.npz"
    assert main(["index", "build", str(arts["student"]), "synthetic:test", "-o", str(path)]) == 0
    return path


@pytest.mark.parametrize("kind", ["truncated", "foreign-npz", "not-a-zip", "missing"])
def test_unusable_index(index16, tmp_path, capsys, kind):
    path = tmp_path / "index.npz"
    if kind == "truncated":
        path.write_bytes(index16.read_bytes()[: index16.stat().st_size // 2])
    elif kind == "foreign-npz":
        np.savez(path, codes=np.zeros((3, 2), np.uint8))
    elif kind == "not-a-zip":
        path.write_bytes(b"hello")
    image = tmp_path / "q.png"
    _png(image, 0)
    expect = {"missing": "index not found", "foreign-npz": "is not a hashdistill index"}.get(kind, "is not a readable")
    refused(capsys, tmp_path, "index", "search", path, image, expect=expect)


def test_query_model_of_another_bit_width(arts, index16, tmp_path, capsys):
    image = tmp_path / "q.png"
    _png(image, 0)
    refused(capsys, tmp_path, "index", "search", index16, image, "--model", arts["teacher8"],
           expect="produces 8-bit codes but the index holds 16-bit codes")


def test_onnx_and_checkpoint_evaluate_alike(student_onnx, arts, tmp_path, capsys):
    """``eval model.onnx`` decodes with the file's packed codebook: same figures as the checkpoint."""
    figures = []
    for i, model in enumerate((arts["student"], student_onnx)):
        assert main(["eval", str(model), "--json", str(tmp_path / f"{i}.json")]) == 0
        figures.append(json.loads((tmp_path / f"{i}.json").read_text()))
    capsys.readouterr()
    for key in ("map", "mhd_accuracy", "ed_accuracy", "bits"):
        assert figures[1][key] == pytest.approx(figures[0][key], abs=0.02), key
