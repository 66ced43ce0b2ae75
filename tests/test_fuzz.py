"""Fuzzing the readers of untrusted input: any input either loads or raises UserError, nothing else.

Readers: the recipe loader (YAML text, parsed dicts, ``--set`` overrides), the checkpoint readers
(metadata, tensors, model rebuild), the ONNX metadata reader and the index reader. Inputs are
random bytes, damaged copies of real files, and real files with fuzzed fields. Runs are derandomized,
so a failure reproduces; the example counts keep the whole file to well under a minute on 2 cores.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_export_support import checkpoints, exported

from hashdistill.checkpoint import METADATA_KEY, load_checkpoint, read_metadata, save_checkpoint
from hashdistill.distill.models import load_model
from hashdistill.errors import UserError
from hashdistill.recipe import Recipe, apply_override, dump_recipe, load_recipe, recipe_from_dict


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One folder reused by every example (hypothesis runs many examples per test function)."""
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    return checkpoints(tmp_path_factory.getbasetemp() / "export-artefacts")


def _user_error_or_ok(read, *args: Any) -> Any:
    try:
        return read(*args)
    except UserError:
        return None


leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 40)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=16)


# --- recipes ------------------------------------------------------------------------------------------------

def _paths(node: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        out.append(prefix + key)
        if isinstance(value, dict):
            out += _paths(value, f"{prefix}{key}.")
    return out


BASE_RECIPE = Recipe().to_dict()
RECIPE_PATHS = _paths(BASE_RECIPE) + ["bogus", "teacher.bogus", "teacher.float_baseline.epochs", "student.losses.dsh"]


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    tree[last] = value


def _check_accepted(recipe: Recipe) -> None:
    """An accepted recipe must survive what a run does with it: hashed, saved to the run dir, reloaded."""
    assert isinstance(recipe, Recipe)
    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))).digest() == recipe.digest()


@fuzz(400)
@given(st.lists(st.tuples(st.sampled_from(RECIPE_PATHS), json_values), min_size=1, max_size=4))
def test_recipe_from_dict_with_fuzzed_fields(changes):
    raw = copy.deepcopy(BASE_RECIPE)
    for path, value in changes:
        _set(raw, path, value)
    recipe = _user_error_or_ok(recipe_from_dict, raw)
    if recipe is not None:
        _check_accepted(recipe)


@fuzz(150)
@given(json_values)
def test_recipe_from_dict_with_any_value(raw):
    recipe = _user_error_or_ok(recipe_from_dict, raw)
    if recipe is not None:
        _check_accepted(recipe)


yaml_fragments = st.sampled_from(["teacher:", "  bits: ", "{", "}", "[", "]", "- ", ": ", "&a ", "*a", "!!binary ",
                                  "!!python/name:os.system", "? ", "\n", "  ", "'", '"', "1e-3", ".inf", "null", "~",
                                  "%YAML 1.1\n", "---\n", "...\n", "\t", "#", "\x00", "data:\n  dataset: ",
                                  "synthetic"])


@fuzz(300)
@given(st.lists(yaml_fragments | st.text(max_size=6), max_size=30).map("".join))
def test_recipe_file_with_fuzzed_yaml(work, text):
    path = work / "recipe.yaml"
    path.write_text(text)
    recipe = _user_error_or_ok(load_recipe, path)
    if recipe is not None:
        _check_accepted(recipe)


@fuzz(200)
@given(st.text(max_size=40) | st.sampled_from(RECIPE_PATHS).flatmap(
    lambda p: (yaml_fragments | st.text(max_size=8)).map(lambda v: f"{p}={v}")))
def test_set_override_with_fuzzed_text(override):
    raw: dict[str, Any] = copy.deepcopy(BASE_RECIPE)
    try:
        apply_override(raw, override)
    except UserError:
        return
    recipe = _user_error_or_ok(recipe_from_dict, raw)
    if recipe is not None:
        _check_accepted(recipe)


# --- checkpoints --------------------------------------------------------------------------------------------

def _damaged(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data[: max(0, min(cut, len(data)))])
    for position, value in flips:
        if out:
            out[position % len(out)] = value
    return bytes(out)


damage = st.tuples(st.integers(0, 2**31), st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=6))


odd_files = st.sampled_from([b"", b"\x80\x04K\x01.", b"PK\x03\x04", b"\x08" + b"\x00" * 7 + b"{}", b"\xff" * 8])


@fuzz(200)
@given(st.binary(max_size=400) | odd_files)
def test_checkpoint_reader_with_random_bytes(work, data):
    path = work / "random.safetensors"
    path.write_bytes(data)
    _user_error_or_ok(read_metadata, path)
    _user_error_or_ok(load_checkpoint, path)


@fuzz(150)
@given(st.sampled_from(["teacher", "student", "ternary"]), damage)
def test_checkpoint_reader_with_damaged_files(arts, work, which, cut_and_flips):
    data = getattr(arts, which).read_bytes()
    path = work / "damaged.safetensors"
    path.write_bytes(_damaged(data, *cut_and_flips))
    _user_error_or_ok(load_checkpoint, path)


@fuzz(150)
@given(st.text(max_size=60) | json_values.map(json.dumps))
def test_checkpoint_reader_with_fuzzed_metadata_text(work, text):
    path = work / "meta.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={METADATA_KEY: text})
    meta = _user_error_or_ok(read_metadata, path)
    assert meta is None or isinstance(meta, dict)


archs = st.sampled_from(["test_resnet", "test_vit", "resnet18", "hf-hub:someone/model", "local-dir:/tmp", "", "nope"])
meta_fields = {
    "kind": st.sampled_from(["teacher", "student", "ternary-student", "float", "train-state"]) | json_values,
    "arch": archs | json_values,
    "bits": st.integers(-2, 40) | st.sampled_from([2**40, 2**70]) | json_values,
    "num_classes": st.integers(-2, 8) | st.sampled_from([10**6, 2**40, 2**70]) | json_values,
    "ternary_layers": json_values,
    "class_names": json_values,
}


@st.composite
def fuzzed_checkpoints(draw, sources: tuple[str, ...]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A real checkpoint's tensors and metadata with some fields replaced and maybe one tensor changed."""
    which = draw(st.sampled_from(sources))
    changes = draw(st.dictionaries(st.sampled_from(sorted(meta_fields)), st.none(), min_size=1, max_size=3))
    meta_changes = {key: draw(meta_fields[key]) for key in changes}
    tensor_change = draw(st.sampled_from(["none", "drop", "reshape", "retype"]))
    return which, meta_changes, {"change": tensor_change, "pick": draw(st.integers(0, 10_000))}


def _write_fuzzed(arts, work: Path, which: str, meta_changes: dict, tensor_change: dict) -> Path:
    tensors, meta = load_checkpoint(getattr(arts, which))
    name = sorted(tensors)[tensor_change["pick"] % len(tensors)]
    if tensor_change["change"] == "drop":
        del tensors[name]
    elif tensor_change["change"] == "reshape":
        tensors[name] = torch.zeros(tensors[name].numel() + 1, dtype=tensors[name].dtype)
    elif tensor_change["change"] == "retype":
        tensors[name] = tensors[name].to(torch.float64 if tensors[name].is_floating_point() else torch.int64)
    path = work / f"fuzzed-{which}.safetensors"
    save_checkpoint(path, tensors, {**meta, **meta_changes})
    return path


@fuzz(120)
@given(fuzzed_checkpoints(("teacher", "student")))
def test_model_checkpoint_reader_with_fuzzed_fields(arts, work, case):
    path = _write_fuzzed(arts, work, *case)
    _user_error_or_ok(load_model, str(path))


@fuzz(120)
@given(fuzzed_checkpoints(("teacher", "student", "ternary")))
def test_exportable_checkpoint_reader_with_fuzzed_fields(arts, work, case):
    from hashdistill.export.loading import load_any_model

    path = _write_fuzzed(arts, work, *case)
    _user_error_or_ok(load_any_model, str(path))


# --- ONNX metadata ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def student_onnx(tmp_path_factory) -> Path:
    return exported(tmp_path_factory.getbasetemp() / "export-artefacts", "student")[0]


@pytest.fixture(scope="module")
def real_props(student_onnx) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(student_onnx)).metadata_props}


def _fuzzed_props(real_props: dict[str, str], data: st.DataObject) -> dict[str, str]:
    props = dict(real_props)
    for key in data.draw(st.lists(st.sampled_from(sorted(props)), max_size=3)):
        props[key] = data.draw(st.text(max_size=20) | json_values.map(json.dumps)
                               | st.sampled_from(["0", "-1", "1e3", "[]", "{}", '["zz"]', "null", '[""]', "{"]))
    for key in data.draw(st.lists(st.sampled_from(sorted(props)), max_size=2)):
        props.pop(key, None)
    return props


@fuzz(400)
@given(st.data())
def test_onnx_metadata_reader_with_fuzzed_props(real_props, data):
    from hashdistill.export.metadata import EdgeMetadata, parse_props

    meta = _user_error_or_ok(parse_props, _fuzzed_props(real_props, data), "fuzzed.onnx")
    assert meta is None or isinstance(meta, EdgeMetadata)


def _check_metadata(meta: Any) -> None:
    """What the CLI and the index read from parsed metadata must not fail later."""
    _user_error_or_ok(meta.as_dict)
    data = _user_error_or_ok(lambda: meta.data)
    assert data is None or isinstance(data, dict)


@fuzz(400)
@given(st.data())
def test_parsed_onnx_metadata_decodes(real_props, data):
    from hashdistill.export.metadata import parse_props

    props = {**_fuzzed_props(real_props, data), "data": data.draw(json_values.map(json.dumps))}
    meta = _user_error_or_ok(parse_props, props, "fuzzed.onnx")
    if meta is not None:
        _check_metadata(meta)


@fuzz(30)
@given(damage)
def test_onnx_reader_with_damaged_files(student_onnx, work, cut_and_flips):
    from hashdistill.export.runtime import EdgeModel

    path = work / "damaged.onnx"
    path.write_bytes(_damaged(student_onnx.read_bytes(), *cut_and_flips))
    edge = _user_error_or_ok(EdgeModel, path)
    if edge is not None:
        _check_metadata(edge.meta)


# --- indexes ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_index(arts, tmp_path_factory) -> Path:
    from hashdistill.search.index import build_index

    path = tmp_path_factory.mktemp("fuzz-index") / "index.npz"
    build_index(arts.student, "synthetic:test", path)
    return path


@fuzz(100)
@given(st.binary(max_size=300) | damage.map(lambda d: ("damage", d)))
def test_index_reader_with_random_or_damaged_bytes(real_index, work, data):
    from hashdistill.search.index import load_index

    if isinstance(data, tuple):
        data = _damaged(real_index.read_bytes(), *data[1])
    path = work / "damaged.npz"
    path.write_bytes(data)
    _user_error_or_ok(load_index, path)


arrays = st.one_of(
    json_values.map(lambda v: np.array(json.dumps(v))),
    st.sampled_from([-1, 0, 1, 8, 16, 2**40]).map(np.array),
    st.lists(st.integers(0, 255), max_size=12).map(lambda v: np.array(v, dtype=np.uint8).reshape(-1, 2)
                                                   if len(v) % 2 == 0 else np.array(v, dtype=np.uint8)),
    st.lists(st.integers(-5, 5), max_size=8).map(np.array),
    st.lists(st.text(max_size=4), max_size=4).map(lambda v: np.array(v, dtype=np.str_)),
    st.just(np.zeros((0, 2), dtype=np.uint8)),
    st.just(np.array(1.5)),
)


@fuzz(200)
@given(st.data())
def test_index_reader_with_fuzzed_fields(real_index, work, data):
    from hashdistill.search.index import load_index

    with np.load(real_index, allow_pickle=False) as npz:
        fields = {key: npz[key] for key in npz.files}
    for key in data.draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3)):
        fields[key] = data.draw(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **fields)
    path = work / "fuzzed.npz"
    path.write_bytes(buffer.getvalue())
    index = _user_error_or_ok(load_index, path)
    if index is not None and len(index):
        _user_error_or_ok(index.search, index.codes[:1], 3)
