"""What a hostile or careless user found: each case is a crafted input written here, never a committed file.

Classes of fault: folders hashdistill must never delete, metadata that would size an allocation, inputs that
used to end in a traceback, recipes that expand, ``index build --force``, leftovers of killed writes and
misleading messages. Each refusal is exit 2 with one short line (``cli_support.refused``).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from cli_support import refused, variant
from conftest import TINY
from PIL import Image

from hashdistill.app.cli import main
from hashdistill.app.pipeline import prepare_run_dir
from hashdistill.atomic import atomic_write_text
from hashdistill.checkpoint import METADATA_KEY, load_checkpoint, save_checkpoint
from hashdistill.recipe import recipe_from_dict
from hashdistill.rundir import MARKER_FILE, RunDir, is_run_dir

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _recipe(tmp_path: Path, changes: dict | None = None) -> Path:
    raw = json.loads(json.dumps(TINY))
    for key, value in (changes or {}).items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    path = tmp_path / "input.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _missing_data_recipe(tmp_path: Path) -> Path:
    """A valid recipe whose data cannot be found: the run fails right after preparing its directory."""
    return _recipe(tmp_path, {"data.dataset": "imagefolder", "data.root": str(tmp_path / "no-such-folder")})


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- 1. never destroy a user's files


def test_force_never_deletes_a_folder_hashdistill_did_not_write(tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"my own bytes")
    (mine / "recipe.yaml").write_text("name: mine\n")  # even a recipe.yaml does not make it a run directory
    err = refused(capsys, tmp_path, "run", _recipe(tmp_path), "--out", mine, "--force", expect="has no run marker")
    assert "--force to" not in err
    assert (mine / "holiday.jpg").read_bytes() == b"my own bytes"


def test_a_folder_that_only_looks_like_a_run_is_not_deleted(tmp_path, capsys):
    """recipe.yaml + checkpoints/ with the user's fine-tuned checkpoint, ONNX file and report: no marker, not ours."""
    mine = tmp_path / "finetuned"
    (mine / "checkpoints").mkdir(parents=True)
    files = {"recipe.yaml": "name: mine\n", "checkpoints/student.safetensors": "my weights", "model.onnx": "mine",
             "report.md": "# my notes"}
    for name, text in files.items():
        (mine / name).write_text(text)
    refused(capsys, tmp_path, "run", _recipe(tmp_path), "--out", mine, "--force", expect="has no run marker")
    assert {name: (mine / name).read_text() for name in files} == files


def test_force_removes_only_what_the_marker_lists_and_names_what_it_kept(tmp_path, capsys):
    run = RunDir(tmp_path / "run")  # marked: hashdistill wrote it
    atomic_write_text(run.checkpoint("teacher"), "the run's")
    atomic_write_text(run.output("report.md"), "the run's")
    (run.path / "my_photos").mkdir()
    (run.path / "my_photos" / "a.jpg").write_text("mine")
    (run.path / "checkpoints" / "finetuned.safetensors").write_text("mine")
    (run.path / "notes.md").write_text("mine")
    hostile = {"format": "hashdistill-run", "entries": ["../outside.txt", "/etc/hostname", "report.md"]}
    (tmp_path / "outside.txt").write_text("mine")
    marker = json.loads((run.path / MARKER_FILE).read_text())
    assert {"checkpoints/teacher.safetensors", "report.md"} <= set(marker["entries"])
    assert owned_entries_of(hostile, tmp_path) is None  # a marker naming paths outside the folder is not ours
    fresh = prepare_run_dir(recipe_from_dict(TINY), str(run.path), None, force=True)
    err = capsys.readouterr().err
    assert "kept 3 that hashdistill did not write" in err and "notes.md" in err and "finetuned.safetensors" in err
    assert not (run.path / "report.md").exists() and not (run.path / "checkpoints" / "teacher.safetensors").exists()
    for mine in ("my_photos/a.jpg", "checkpoints/finetuned.safetensors", "notes.md"):
        assert (run.path / mine).read_text() == "mine"
    assert (tmp_path / "outside.txt").read_text() == "mine" and is_run_dir(fresh.path)
    assert json.loads((run.path / MARKER_FILE).read_text())["entries"] == []  # the new run owns nothing yet


def owned_entries_of(record: dict, folder) -> list | None:
    from hashdistill.rundir import owned_entries

    probe = folder / "probe"
    probe.mkdir()
    (probe / MARKER_FILE).write_text(json.dumps(record))
    return owned_entries(probe)


def test_force_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    (run.path / "summary.json").write_text("{}")
    assert is_run_dir(run.path)
    assert main(["run", str(_missing_data_recipe(tmp_path)), "--out", str(run.path), "--force"]) == 2
    assert "image folder not found" in capsys.readouterr().err
    assert (run.path / "summary.json").read_text() == "{}"  # the checks before any stage refused: nothing replaced


def test_a_failed_run_keeps_the_users_empty_folder(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["run", str(_missing_data_recipe(tmp_path)), "--out", str(out)]) == 2
    capsys.readouterr()
    assert out.is_dir() and not any(out.iterdir())  # what hashdistill wrote is gone, the folder is not


def test_a_file_where_a_run_directory_belongs(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    refused(capsys, tmp_path, "run", _recipe(tmp_path), "--out", tmp_path / "taken", "--force",
            expect="is a file, not a run directory")


@pytest.mark.parametrize("command", ["eval", "export", "index", "taxonomy", "quantize"])
def test_a_directory_where_an_output_file_belongs(arts, tmp_path, capsys, command):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    argv = {"eval": ["eval", arts["student"], "--json", folder],
            "export": ["export", arts["student"], "-o", folder],
            "index": ["index", "build", arts["student"], "synthetic:test", "-o", folder],
            "taxonomy": ["taxonomy", arts["teacher"], "-o", folder],
            "quantize": ["quantize", arts["student"], "-o", folder]}[command]
    refused(capsys, tmp_path, *argv, "--force", expect=f"{folder} is a directory; give the path of the file")


# ---------------------------------------------------------------- 2. metadata that would size an allocation


# The child reports its own high-water mark (VmHWM): ru_maxrss would also count the memory of this pytest
# process, which execve carries over into the child's figure.
_REPORT_PEAK_AT_EXIT = """
import atexit, runpy, sys
report = sys.argv.pop(1)
def write_peak():
    with open("/proc/self/status") as status, open(report, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(write_peak)
runpy.run_module("hashdistill", run_name="__main__", alter_sys=True)
"""


def _peak_rss_mb(argv: list[str], tmp_path: Path) -> tuple[int, str, float]:
    """Run the CLI in a child process: exit code, stderr and the child's own peak resident memory."""
    report = tmp_path / "peak-kb"
    done = subprocess.run([sys.executable, "-c", _REPORT_PEAK_AT_EXIT, str(report), *argv], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return done.returncode, done.stderr.decode(), int(report.read_text()) / 1024


@pytest.mark.parametrize("kwargs", [{"in_chans": 3_000_000}, {"depth": 10_000_000}, {"embed_dim": 1_000_000}])
def test_model_arguments_asking_for_millions_of_channels_cost_nothing(arts, tmp_path, kwargs):
    path = variant(arts, tmp_path, "student", arch_kwargs=kwargs)
    start = time.perf_counter()
    code, err, peak_mb = _peak_rss_mb(["eval", str(path)], tmp_path)
    assert code == 2 and "more than the file's" in err and err.count("\n") == 1, err
    assert peak_mb < 1500, f"peak memory {peak_mb:.0f} MB"
    assert time.perf_counter() - start < 60


def test_model_arguments_within_the_files_sizes_are_still_compared(arts, tmp_path, capsys):
    path = variant(arts, tmp_path, "student", arch_kwargs={"embed_dim": 32})  # plausible, but not these tensors
    refused(capsys, tmp_path, "eval", path, expect="the model the metadata describes expects")


@pytest.mark.parametrize("command", ["export", "index"])
def test_checkpoint_input_size_is_bounded(arts, tmp_path, capsys, command):
    path = variant(arts, tmp_path, "student", input_size=100_000)
    argv = ["export", path, "-o", tmp_path / "m.onnx"] if command == "export" else \
        ["index", "build", path, "synthetic:test", "-o", tmp_path / "i.npz"]
    refused(capsys, tmp_path, *argv, expect="metadata 'input_size' must be an integer in [8, 1024], got 100000")


def _onnx_variant(source: Path, folder: Path, **props: str) -> Path:
    proto = onnx.load(source)
    for prop in proto.metadata_props:
        if prop.key in props:
            prop.value = props[prop.key]
    path = folder / "variant.onnx"
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize(("props", "expect"), [
    ({"input_size": "100000"}, "metadata 'input_size' must be an integer in [8, 1024], got 100000"),
    ({"input_size": "32"}, "the metadata says 32x32 RGB images, but the graph's input"),
    ({"input_size": "16.5"}, "metadata 'input_size' must be an integer"),
    ({"bits": "sixteen"}, "metadata 'bits' must be an integer"),
    ({"class_names": "[" * 100_000 + "]" * 100_000}, "nested too deeply"),
    ({"mean": '"0.5"'}, "metadata 'mean' must be a list of 3 finite numbers"),
    ({"std": "[1, 0, 1]"}, "metadata 'std' must be a list of 3 finite positive numbers"),
    ({"bits": "--8"}, "metadata 'bits' must be an integer"),
    ({"bits": "\u00b2"}, "metadata 'bits' must be an integer"),
    ({"class_codebook": json.dumps(["ab  "] * 4)}, "metadata 'class_codebook' must list"),
])
@pytest.mark.parametrize("command", ["eval", "index"])
def test_onnx_metadata_is_checked_before_use(student_onnx, tmp_path, capsys, props, expect, command):
    path = _onnx_variant(student_onnx, tmp_path, **props)
    argv = ["eval", path] if command == "eval" else ["index", "build", path, "synthetic:test", "-o", tmp_path / "i.npz"]
    refused(capsys, tmp_path, *argv, expect=expect)


# ---------------------------------------------------------------- 3. inputs that used to end in a traceback


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _decompression_bomb(path: Path, side: int = 40_000) -> Path:
    """A 200-byte PNG that declares side x side pixels: PIL refuses 40000^2 before decoding."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_query_is_refused(arts, tmp_path, capsys):
    assert main(["index", "build", str(arts["student"]), "synthetic:test", "-o", str(tmp_path / "i.npz")]) == 0
    capsys.readouterr()
    bomb = _decompression_bomb(tmp_path / "bomb.png")
    refused(capsys, tmp_path, "index", "search", tmp_path / "i.npz", bomb, expect="decompression-bomb limit")


def test_an_image_between_one_and_two_bomb_limits_is_refused_too(tmp_path):
    """PIL only warns for 1-2x its MAX_IMAGE_PIXELS and then decodes (10000^2 RGB: 300 MB)."""
    from hashdistill.errors import UserError
    from hashdistill.imagefiles import read_rgb

    with pytest.raises(UserError, match="decompression-bomb limit"):
        read_rgb(_decompression_bomb(tmp_path / "big.png", side=10_000))


def test_a_decompression_bomb_in_a_folder_is_skipped_and_counted(arts, tmp_path, capsys):
    folder = tmp_path / "images"
    for i in range(3):
        _png(folder / "cats" / f"{i}.png", i)
    _decompression_bomb(folder / "cats" / "bomb.png")
    assert main(["index", "build", str(arts["student"]), str(folder), "-o", str(tmp_path / "i.npz")]) == 0
    out = capsys.readouterr()
    assert "indexed 3 images" in out.out and "skipped 1 unreadable image(s): bomb.png" in out.err


def _with_raw_metadata(source: Path, folder: Path, text: str) -> Path:
    """The checkpoint's tensors under a metadata text of our choosing (not necessarily valid JSON)."""
    from safetensors.torch import save_file

    tensors, _ = load_checkpoint(source)
    path = folder / "raw-meta.safetensors"
    save_file(tensors, str(path), metadata={METADATA_KEY: text})
    return path


@pytest.mark.parametrize("command", ["eval", "taxonomy", "export"])
def test_deeply_nested_checkpoint_metadata(arts, tmp_path, capsys, command):
    path = _with_raw_metadata(arts["teacher"], tmp_path, '{"kind": ' + "[" * 100_000 + "]" * 100_000 + "}")
    argv = {"eval": ["eval", path], "taxonomy": ["taxonomy", path, "-o", tmp_path / "t.png"],
            "export": ["export", path, "-o", tmp_path / "m.onnx"]}[command]
    refused(capsys, tmp_path, *argv, expect="checkpoint metadata is corrupt (its JSON is nested too deeply)")


def test_deeply_nested_index_record(arts, tmp_path, capsys):
    assert main(["index", "build", str(arts["student"]), "synthetic:test", "-o", str(tmp_path / "i.npz")]) == 0
    capsys.readouterr()
    with np.load(tmp_path / "i.npz") as npz:
        fields = {key: npz[key] for key in npz.files}
    fields["model"] = np.array("[" * 100_000 + "]" * 100_000)
    np.savez(tmp_path / "deep.npz", **fields)
    refused(capsys, tmp_path, "index", "search", tmp_path / "deep.npz", _png(tmp_path / "q.png"),
            expect="nested too deeply")


@pytest.mark.parametrize(("changes", "expect"), [
    ({"input_size": "16"}, "metadata 'input_size' must be an integer"),
    ({"input_size": 16.5}, "metadata 'input_size' must be an integer"),
    ({"bits": "16"}, "metadata 'bits' must be an integer"),
    ({"class_names": "abcd"}, "metadata 'class_names' must be a list of 4 strings"),
    ({"mean": [0.5, "x", 0.5]}, "metadata 'mean' must be a list of 3 finite numbers"),
    ({"arch_kwargs": ["in_chans", 5]}, "metadata 'arch_kwargs' must be a JSON object"),
    ({"data": {"dataset": "synthetic", "image_size": 16.5}}, "data.image_size"),
])
@pytest.mark.parametrize("command", ["eval", "export"])
def test_metadata_of_the_wrong_type(arts, tmp_path, capsys, changes, expect, command):
    path = variant(arts, tmp_path, "student", **changes)
    argv = ["eval", path] if command == "eval" else ["export", path, "-o", tmp_path / "m.onnx"]
    refused(capsys, tmp_path, *argv, expect=expect)


def test_model_arguments_timm_rejects_only_at_forward_time(arts, tmp_path, capsys):
    """timm builds resnet with in_chans=5; the first batch of 3-channel images would fail mid-training."""
    recipe = _recipe(tmp_path, {"teacher.bits": 16, "student.model": "test_resnet",
                                "student.model_kwargs": {"in_chans": 5}})
    refused(capsys, tmp_path, "distill", recipe, "--teacher", arts["teacher"], "--out", tmp_path / "run",
            expect="does not run on 16x16 RGB images")


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    run = RunDir(tmp_path / "run")
    run.log({"stage": "teacher-phase1", "epoch": 0})
    with open(run.path / "metrics.jsonl", "a") as fh:
        fh.write('{"stage": "teacher-phase1", "ep')  # killed mid-append
    assert run.metrics() == [{"stage": "teacher-phase1", "epoch": 0}]
    run.log({"stage": "teacher-phase1", "epoch": 1})
    assert [r["epoch"] for r in run.metrics()] == [0, 1]
    (run.path / "metrics.jsonl").write_text('{"epoch": 0}\nnot json\n{"epoch": 1}\n')
    with pytest.raises(Exception, match="line 2 is not a metrics record"):
        run.metrics()


# ---------------------------------------------------------------- 4. recipes that expand


def test_a_recipe_of_nested_aliases_is_refused_at_once(tmp_path, capsys):
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\nteacher: {bits: *i}\n")
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    refused(capsys, tmp_path, "run", path, "--out", tmp_path / "run", expect="expands to more than 10,000 values")
    assert time.perf_counter() - start < 5


def test_error_messages_stay_short(tmp_path, capsys):
    path = _recipe(tmp_path, {"teacher.bits": "x" * 200_000})
    err = refused(capsys, tmp_path, "run", path, "--out", tmp_path / "run", expect="recipe field 'teacher.bits'")
    assert len(err) < 700


# ---------------------------------------------------------------- 5. index build --force


def test_index_build_force_replaces_the_index(arts, tmp_path, capsys):
    out = tmp_path / "i.npz"
    assert main(["index", "build", str(arts["student"]), "synthetic:test", "-o", str(out)]) == 0
    first = out.read_bytes()
    out.write_bytes(first[:100])  # damage it: --force must write a whole new one
    assert main(["index", "build", str(arts["student"]), "synthetic:test", "-o", str(out), "--force"]) == 0
    assert out.read_bytes() == first
    capsys.readouterr()


# ---------------------------------------------------------------- 6. leftovers


def test_resume_removes_temp_files_a_killed_write_left(tmp_path):
    recipe = recipe_from_dict(TINY)
    run = prepare_run_dir(recipe, str(tmp_path / "run"), None, False)
    run.save_recipe(recipe)
    stale = run.checkpoints / ".teacher-phase1-last.safetensors.k3j2_x.tmp"
    stale.write_bytes(b"\0" * 1000)
    kept = run.checkpoints / "notes.tmp.txt"
    kept.write_text("not ours")
    prepare_run_dir(recipe, None, str(run.path), False)
    assert not stale.exists() and kept.exists()


def test_an_interrupted_export_leaves_nothing_behind(arts, tmp_path, capsys):
    staging = tmp_path / ".m.onnx.ab12cd.export-staging"  # what a SIGKILL mid-export leaves
    staging.mkdir()
    (staging / "m.onnx").write_bytes(b"half")
    foreign = tmp_path / ".m.onnx.mine"
    foreign.mkdir()
    assert main(["export", str(arts["student"]), "-o", str(tmp_path / "m.onnx")]) == 0
    capsys.readouterr()
    assert not staging.exists() and foreign.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.onnx.mine", "m.onnx"]


def test_outputs_get_the_usual_permissions(arts, tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "c.safetensors", {"x": torch.ones(2)}, {"kind": "x"})
        assert path.stat().st_mode & 0o777 == 0o644
        run = RunDir(tmp_path / "run")
        assert (run.path / MARKER_FILE).stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_plots_are_written_atomically(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from hashdistill.plots import plot_pr_curves

    curve = {"a": {"precision": [1.0, 0.5], "recall": [0.1, 1.0]}}
    path = plot_pr_curves(curve, tmp_path / "pr.png")
    before = path.read_bytes()

    def half_then_crash(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        plot_pr_curves(curve, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["pr.png"]


# ---------------------------------------------------------------- 7. messages that name the input


def test_a_plain_zip_is_not_called_a_pickle(tmp_path, capsys):
    path = tmp_path / "weights.safetensors"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "just a zip")
    err = refused(capsys, tmp_path, "eval", path, expect="is a zip archive, not a safetensors checkpoint")
    assert "pickle" not in err


def test_a_torch_save_zip_is_named_as_one(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    refused(capsys, tmp_path, "eval", path, expect="is a torch.save file (a zip holding a pickle)")


@pytest.mark.parametrize("command", ["taxonomy", "quantize"])
def test_an_onnx_model_given_to_a_checkpoint_command(student_onnx, tmp_path, capsys, command):
    argv = [command, student_onnx, "-o", tmp_path / ("t.png" if command == "taxonomy" else "q.safetensors")]
    err = refused(capsys, tmp_path, *argv, expect="this command takes a checkpoint (.safetensors); got an ONNX model")
    assert "header too large" not in err


# ---------------------------------------------------------------- property: mutated metadata, every command

# Values a hostile file may put in any metadata field.
HOSTILE_VALUES = [None, True, -1, 0, 2**40, 2**70, 1e308, float("nan"), "x" * 10_000, "", [], {}, [1, "a"],
                  {"a": {"b": {"c": [1, 2, 3]}}}, [[[[[[[[[[1]]]]]]]]]], "16", 3.5, [16] * 5000]


def _mutations(rng: np.random.Generator, meta: dict, count: int) -> list[dict]:
    keys = sorted(meta)
    out = []
    for _ in range(count):
        mutated = json.loads(json.dumps(meta))
        for key in rng.choice(keys, size=int(rng.integers(1, 3)), replace=False):
            value = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
            if rng.random() < 0.2 and isinstance(mutated[key], dict) and mutated[key]:  # one level down
                inner = sorted(mutated[key])[int(rng.integers(len(mutated[key])))]
                mutated[key][inner] = value
            else:
                mutated[key] = value
        out.append(mutated)
    return out


def test_randomly_mutated_metadata_never_crashes_any_command(arts, student_onnx, tmp_path, capsys):
    """Every command on every mutation: exit 0 or exit 2 with one line; never a traceback; bounded memory."""
    rng = np.random.default_rng(17)
    cases: list[list[str]] = []
    for which in ("teacher", "student", "ternary"):
        tensors, meta = load_checkpoint(arts[which])
        for i, mutated in enumerate(_mutations(rng, meta, 8)):
            path = tmp_path / f"{which}-{i}.safetensors"
            save_checkpoint(path, tensors, mutated)
            cases += [["eval", str(path)], ["taxonomy", str(path), "-o", str(tmp_path / f"t-{which}{i}.png")],
                      ["export", str(path), "-o", str(tmp_path / f"m-{which}{i}.onnx")],
                      ["index", "build", str(path), "synthetic:test", "-o", str(tmp_path / f"i-{which}{i}.npz")]]
    props = {p.key: p.value for p in onnx.load(student_onnx).metadata_props}
    for i, mutated in enumerate(_mutations(rng, props, 12)):
        text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in mutated.items()}
        path = _onnx_variant(student_onnx, tmp_path, **text).rename(tmp_path / f"onnx-{i}.onnx")
        cases += [["eval", str(path)],
                  ["index", "build", str(path), "synthetic:test", "-o", str(tmp_path / f"o{i}.npz")]]
    assert main(["index", "build", str(arts["student"]), "synthetic:test", "-o", str(tmp_path / "base.npz")]) == 0
    capsys.readouterr()
    with np.load(tmp_path / "base.npz") as npz:
        fields = {key: npz[key] for key in npz.files}
    query = _png(tmp_path / "q.png")
    for i, mutated in enumerate(_mutations(rng, {"model": json.loads(str(fields["model"])),
                                                 "bits": int(fields["bits"]), "version": 1}, 10)):
        damaged = {**fields, "model": np.array(json.dumps(mutated["model"])),
                   "bits": np.array(mutated["bits"], dtype=object if not isinstance(mutated["bits"], int) else None),
                   "version": np.array(mutated["version"], dtype=None)}
        path = tmp_path / f"index-{i}.npz"
        try:
            np.savez(path, **damaged)
        except (ValueError, TypeError):
            continue
        cases.append(["index", "search", str(path), str(query), "--model", str(arts["student"])])
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    child = subprocess.Popen([sys.executable, str(HERE / "hostile_worker.py"), str(tmp_path / "cases.json")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err.decode()[-3000:]
    report = json.loads(out)
    bad = []
    for case, result in zip(cases, report["results"]):
        err = result["stderr"]
        one_line = err.startswith("hashdistill: error: ") and err.count("\n") == 1 and len(err) < 700
        if result["traceback"] is not None or result["code"] not in (0, 2) or (result["code"] == 2 and not one_line):
            bad.append((case[0], Path(case[1]).name, result["traceback"] or err))
    assert not bad, "\n\n".join(f"{c} {f}: {what[-600:]}" for c, f, what in bad)
    assert sum(r["code"] == 2 for r in report["results"]) > len(cases) // 2  # the mutations do bite
    assert report["peak_rss_mb"] < 2500, report["peak_rss_mb"]


# ---------------------------------------------------------------- 8. sizes bounded by the file's own size


def _zeros_member(archive: zipfile.ZipFile, name: str, descr: str, shape: tuple[int, ...]) -> None:
    """A deflated .npy member of zeros declaring ``shape``: written in chunks, it costs the test no memory."""
    from numpy.lib import format as npy

    with archive.open(f"{name}.npy", "w", force_zip64=True) as fh:
        npy.write_array_header_1_0(fh, {"descr": descr, "fortran_order": False, "shape": shape})
        left = int(np.prod(shape)) * np.dtype(descr).itemsize
        chunk = bytes(1 << 22)
        while left:
            fh.write(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))


def _with_label_names(index: Path, out: Path, count: int, chars: int) -> Path:
    """``index`` with ``count`` label names of ``chars`` characters each (NUL characters: they deflate 1000-fold)."""
    from numpy.lib import format as npy

    with np.load(index) as npz:
        fields = {key: npz[key] for key in npz.files if key != "label_names"}
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in fields.items():
            with archive.open(f"{key}.npy", "w") as fh:
                npy.write_array(fh, value, allow_pickle=False)
        _zeros_member(archive, "label_names", f"<U{chars}", (count,))
    return out


def test_label_names_that_inflate_past_the_files_size_are_refused_unread(arts, student_onnx, tmp_path, capsys):
    """100,000 label names of 255 characters (102 MB) in a 0.2 MB file: refused by the ratio cap before they
    inflate, and the demo writes no site; a label name longer than a folder's name is refused by its dtype."""
    import tracemalloc

    index = tmp_path / "i.npz"
    assert main(["index", "build", str(arts["student"]), "synthetic:test", "-o", str(index)]) == 0
    capsys.readouterr()
    bomb = _with_label_names(index, tmp_path / "names.npz", 100_000, 255)
    long_names = _with_label_names(index, tmp_path / "long.npz", 10, 4096)
    assert bomb.stat().st_size < 1_000_000
    tracemalloc.start()
    refused(capsys, tmp_path, "index", "info", bomb, expect="times its")
    refused(capsys, tmp_path, "demo", tmp_path, "-o", tmp_path / "site", "--model", student_onnx, "--index", bomb,
            expect="times its")
    assert tracemalloc.get_traced_memory()[1] < 30_000_000
    tracemalloc.stop()
    refused(capsys, tmp_path, "index", "info", long_names, expect="member 'label_names' declares <U4096")


def _codes_folder(folder: Path, groups: list[dict], bits: int = 16) -> Path:
    """A folder of codes as `hashdistill encode` writes it, its one shard holding one row group per entry of
    ``groups`` (pyarrow arrays by column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hashdistill.search.encode import FORMAT, MANIFEST

    folder.mkdir()
    schema = pa.schema([("id", pa.int64()), ("path", pa.string()), ("label", pa.int64()), ("code", pa.binary())])
    with pq.ParquetWriter(folder / "codes-00000.parquet", schema) as writer:
        for group in groups:
            writer.write_table(pa.table(group, schema=schema))
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": 1, "bits": bits, "shards": [
        "codes-00000.parquet"], "model": {"hash": "x", "path": "m.onnx"}, "label_names": []}))
    return folder


def test_a_shard_declaring_millions_of_rows_is_refused_before_it_is_read(tmp_path, capsys, monkeypatch):
    """10M constant rows (180 MB once read) in a small Parquet file are refused from the metadata, not read into a
    MemoryError; within the cap, a shard larger than the memory is refused too; an honest one of several row
    groups reads whole."""
    import pyarrow as pa

    from hashdistill.search import bounds
    from hashdistill.search.encode import read_codes

    rows = 1_000_000
    constant = {"id": pa.repeat(pa.scalar(0, pa.int64()), rows), "path": pa.repeat(pa.scalar("", pa.string()), rows),
                "label": pa.repeat(pa.scalar(0, pa.int64()), rows), "code": pa.repeat(pa.scalar(b"\0\0"), rows)}
    bomb = _codes_folder(tmp_path / "bomb", [constant] * 10)
    shard = bomb / "codes-00000.parquet"
    assert shard.stat().st_size * bounds.MAX_INFLATION + bounds.ALLOWANCE < 10 * rows * 18
    started = time.perf_counter()
    refused(capsys, tmp_path, "index", "build", bomb, "-o", tmp_path / "i.npz", expect="times its")
    assert time.perf_counter() - started < 5
    honest = _codes_folder(tmp_path / "honest", [
        {"id": pa.array(np.arange(start, start + 50)), "path": pa.array([f"img-{i}.png" for i in range(50)]),
         "label": pa.array(np.zeros(50, np.int64)), "code": pa.array([bytes([i, start // 50]) for i in range(50)])}
        for start in (0, 50, 100)])
    encoded = read_codes(honest)
    assert encoded.codes.shape == (150, 2) and list(encoded.ids) == list(range(150))
    assert encoded.paths[60] == "img-10.png" and encoded.codes[60].tolist() == [10, 1]
    monkeypatch.setattr(bounds, "available_memory", lambda: 1000)
    refused(capsys, tmp_path, "index", "build", honest, "-o", tmp_path / "i.npz", expect="GiB of memory to load")


# ---------------------------------------------------------------- 9. ids within int64, dataset rows within the split

MAX_ID = 2**63 - 1


def test_ids_past_int64_are_refused_not_wrapped(student_onnx, tmp_path, capsys):
    """--first-id 2**63-1 (a traceback before) and 2**63-8 (ids wrapped negative before) for 10 images: refused;
    a range ending exactly at int64's largest value is built, and adding to it is refused."""
    from hashdistill.search.index import build_index, load_index

    folder = tmp_path / "images"
    for i in range(10):
        _png(folder / f"{i}.png", seed=i)
    for first in (MAX_ID, MAX_ID - 8):
        for argv in (["encode", student_onnx, folder, "-o", tmp_path / "codes", "--first-id", first],
                     ["index", "build", student_onnx, folder, "-o", tmp_path / "i.npz", "--first-id", first]):
            refused(capsys, tmp_path, *argv, expect="the largest id (int64)")
    edge = build_index(student_onnx, folder, tmp_path / "edge.npz", first_id=MAX_ID - 9)
    assert edge.ids.min() == MAX_ID - 9 and edge.ids.max() == MAX_ID
    assert main(["encode", str(student_onnx), str(folder), "-o", str(tmp_path / "codes"), "--first-id",
                 str(MAX_ID - 9)]) == 0
    refused(capsys, tmp_path, "index", "add", tmp_path / "edge.npz", _png(tmp_path / "more" / "x.png"),
            expect="the largest id (int64)")
    assert len(load_index(tmp_path / "edge.npz")) == 10


def test_the_demo_refuses_an_index_naming_rows_past_its_dataset(student_onnx, tmp_path, capsys):
    index = tmp_path / "i.npz"
    assert main(["index", "build", str(student_onnx), "synthetic:test", "-o", str(index)]) == 0
    capsys.readouterr()
    with np.load(index) as npz:
        fields = {key: npz[key] for key in npz.files}
    paths = fields["paths"].astype("<U40")
    paths[3] = "synthetic:test#999999"
    np.savez(tmp_path / "far.npz", **{**fields, "paths": paths})
    refused(capsys, tmp_path, "demo", tmp_path, "-o", tmp_path / "site", "--model", student_onnx, "--index",
            tmp_path / "far.npz", expect="names image 999,999 of synthetic:test")


# ---------------------------------------------------------------- files are what they claim (fourth probe)


@pytest.mark.parametrize("dtype", [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16])
def test_an_onnx_model_whose_codes_are_not_bytes_is_refused_before_anything_is_written(student_onnx, tmp_path,
                                                                                        capsys, dtype):
    """Before: float codes were cast to uint8 silently (the index changed), float16 ended in a traceback."""
    model = onnx.load(str(student_onnx))
    for node in model.graph.node:
        node.output[:] = ["codes_bytes" if name == "codes" else name for name in node.output]
    model.graph.node.append(onnx.helper.make_node("Cast", ["codes_bytes"], ["codes"], to=dtype))
    output = next(o for o in model.graph.output if o.name == "codes")
    output.type.tensor_type.elem_type = dtype
    path = tmp_path / "float-codes.onnx"
    onnx.save(model, str(path))
    image = _png(tmp_path / "q.png")
    work = tmp_path / "work"
    work.mkdir()
    refused(capsys, work, "index", "build", path, tmp_path, "-o", work / "index.npz",
            expect="output 'codes' is tensor(float")
    assert not (work / "index.npz").exists() and image.is_file()


def test_a_model_swapped_in_at_the_indexs_recorded_path_is_refused_by_name(export_root, tmp_path, capsys):
    """Before: search and add used whatever model was now at the recorded path; the neighbours changed silently."""
    import shutil

    from test_export_support import exported

    model = tmp_path / "model.onnx"
    shutil.copyfile(exported(export_root, "student")[0], model)
    folder = tmp_path / "db"
    for i in range(6):
        _png(folder / ("a" if i % 2 else "b") / f"{i}.png", seed=i)
    assert main(["index", "build", str(model), str(folder), "-o", str(tmp_path / "index.npz")]) == 0
    query = _png(tmp_path / "q" / "query.png", seed=9)
    shutil.copyfile(exported(export_root, "ternary")[0], model)  # same lineage and bits, other weights
    capsys.readouterr()
    work = tmp_path / "q"
    refused(capsys, work, "index", "search", tmp_path / "index.npz", query,
            expect="is not the model that coded the index")
    before = (tmp_path / "index.npz").read_bytes()
    assert main(["index", "add", str(tmp_path / "index.npz"), str(work)]) == 2
    assert "is not the model that coded the index" in capsys.readouterr().err
    assert (tmp_path / "index.npz").read_bytes() == before  # nothing mixed into the index
    assert main(["index", "search", str(tmp_path / "index.npz"), str(query), "--model", str(model)]) == 0  # on purpose


# ---------------------------------------------------------------- preflight covers the class sets and decoding


def _folder_run(root: Path, classes: dict[str, list[str]]) -> None:
    for split, names in classes.items():
        for name in names:
            for i in range(4):
                _png(root / split / name / f"{i}.png", seed=i)


def test_train_and_test_folders_with_other_classes_fail_before_training(tmp_path, capsys):
    """Before: the teacher trained, then the run exited 2."""
    root = tmp_path / "photos"
    _folder_run(root, {"train": ["boots", "shirts"], "test": ["boots", "socks"]})
    refused(capsys, tmp_path, "run", _recipe(tmp_path, {"data.dataset": "imagefolder", "data.root": str(root)}),
            "--out", tmp_path / "run", expect="only in test socks, only in train shirts")
    assert not (tmp_path / "run").exists()


def test_a_class_whose_every_file_fails_to_decode_fails_before_training(tmp_path, capsys):
    """Before: it passed the header scan and trained with zero images and one warning."""
    root = tmp_path / "photos"
    _folder_run(root, {"train": ["boots", "shirts"]})
    for path in (root / "train" / "shirts").iterdir():
        data = bytearray(path.read_bytes())
        at = data.index(b"IDAT") + 4
        data[at:at + 8] = bytes(8)  # the pixel stream no longer inflates; header, size and end marker intact
        path.write_bytes(bytes(data))
    refused(capsys, tmp_path, "run", _recipe(tmp_path, {"data.dataset": "imagefolder", "data.root": str(root)}),
            "--out", tmp_path / "run", expect="class 'shirts': none of the 3 files sampled across its 4 decodes")
