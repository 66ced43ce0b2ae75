"""Faults injected into real runs: kills at any point, crashes mid-write, divergence, hostile files.

The kill tests start ``hashdistill run`` as a real process, kill it (SIGKILL, SIGINT, SIGTERM) once a
given training-state checkpoint appears, resume it with ``--resume`` (in this process, to save the imports)
and compare the final checkpoints tensor by tensor with an uninterrupted run: on CPU they must be
bit-identical. Every run uses one thread (OMP_NUM_THREADS=1 for the subprocesses): faster on a busy
2-core machine, and the same arithmetic for every run compared.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY
from safetensors.torch import load_file
from torch import nn

from hashdistill import checkpoint as ckpt
from hashdistill import trainer
from hashdistill.app.cli import main
from hashdistill.data import build_dataset
from hashdistill.recipe import DataConfig, OptimConfig
from hashdistill.rundir import RunDir

# conftest.TINY with two epochs in every training, so that each kill below lands inside a stage.
KILL_RECIPE = copy.deepcopy(TINY)
KILL_RECIPE["teacher"]["phase2"]["epochs"] = 2
TIMING_FIELDS = {"images_per_s", "epoch_seconds"}
POLL_S, RUN_TIMEOUT_S = 0.02, 240


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _cli(*args: str | Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "hashdistill", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    return proc.returncode, err


def _run_args(recipe: Path, stages: str) -> list[str | Path]:
    return ["run", recipe, "--stages", stages]


def _in_process(*args: str | Path) -> int:
    torch.set_num_threads(1)
    return main(list(map(str, args)))


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "kill.yaml"
    path.write_text(yaml.safe_dump(KILL_RECIPE))
    return path


@pytest.fixture(scope="module")
def reference(recipe_file, tmp_path_factory) -> Path:
    """An uninterrupted run of the teacher and student stages."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert _in_process(*_run_args(recipe_file, "teacher,student"), "--out", out) == 0
    return out


def _kill_when(proc: subprocess.Popen, path: Path, sig: signal.Signals) -> None:
    """Send ``sig`` as soon as ``path`` exists (the process must still be running then)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(POLL_S)
    proc.send_signal(sig)


def _assert_same_weights(run: Path, ref: Path, names: list[str]) -> None:
    for name in names:
        got, want = (load_file(d / "checkpoints" / f"{name}.safetensors") for d in (run, ref))
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: tensor {key} differs from the uninterrupted run"


def _training_records(run: Path, stages: tuple[str, ...]) -> list[dict[str, Any]]:
    """metrics.jsonl without timings, floats to 6 significant digits: an epoch mean of a loss part may differ in
    its last bit between a resumed and an uninterrupted run (the weights are compared exactly elsewhere)."""
    return [{k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in r.items() if k not in TIMING_FIELDS}
            for r in RunDir(run, writer=False).metrics() if r["stage"] in stages]


def _temp_files(run: Path) -> list[str]:
    return [p.name for p in run.rglob("*.tmp")]


def _saved_epochs(run: Path, stage: str) -> list[str]:
    """metrics.jsonl up to the first epoch of ``stage``, whose checkpoint the kill waited for."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if json.loads(line)["stage"] == stage)
    return lines[:first + 1]


def _assert_resumed(run: Path, saved: list[str]) -> None:
    """Epochs saved before the kill are not trained again: their lines, timings included, are kept as they were."""
    assert (run / "metrics.jsonl").read_text().splitlines()[:len(saved)] == saved


TEACHER_STAGES = ("teacher-phase1", "teacher-phase2")


def test_sigkill_mid_student_then_resume_matches_uninterrupted_run(recipe_file, reference, tmp_path):
    out = tmp_path / "run"
    proc = _cli(*_run_args(recipe_file, "teacher,student"), "--out", out)
    _kill_when(proc, out / "checkpoints" / "student-last.safetensors", signal.SIGKILL)
    code, _ = _finish(proc)
    assert code == -signal.SIGKILL
    assert not (out / "checkpoints" / "student.safetensors").exists()
    saved = _saved_epochs(out, "student")

    assert _in_process(*_run_args(recipe_file, "teacher,student"), "--resume", out) == 0
    _assert_resumed(out, saved)
    _assert_same_weights(out, reference, ["teacher", "student"])
    stages = (*TEACHER_STAGES, "student")
    assert _training_records(out, stages) == _training_records(reference, stages)
    figures = json.loads((out / "summary.json").read_text())["models"]
    expected = json.loads((reference / "summary.json").read_text())["models"]
    for name in ("teacher", "student", "student -> teacher db"):
        assert figures[name]["map"] == expected[name]["map"]
        assert figures[name]["mhd_accuracy"] == expected[name]["mhd_accuracy"]


@pytest.mark.parametrize(("sig", "code", "word", "after"), [
    (signal.SIGINT, 130, "interrupted", "teacher-phase1-last"),
    (signal.SIGTERM, 128 + signal.SIGTERM, "terminated", "teacher-phase2-last"),
])
def test_sigint_and_sigterm_exit_cleanly_and_resume(recipe_file, reference, tmp_path, sig, code, word, after):
    out = tmp_path / "run"
    proc = _cli(*_run_args(recipe_file, "teacher"), "--out", out)
    _kill_when(proc, out / "checkpoints" / f"{after}.safetensors", sig)
    got, err = _finish(proc)
    assert got == code, err
    assert f"hashdistill: {word}; resume a run with --resume" in err and "Traceback" not in err
    assert _temp_files(out) == []  # the handler unwinds through atomic_write, which removes its temp file
    assert not (out / "checkpoints" / "teacher.safetensors").exists()
    saved = _saved_epochs(out, after.removesuffix("-last"))

    assert _in_process(*_run_args(recipe_file, "teacher"), "--resume", out) == 0
    _assert_resumed(out, saved)
    _assert_same_weights(out, reference, ["teacher"])
    assert _training_records(out, TEACHER_STAGES) == _training_records(reference, TEACHER_STAGES)


# --- crashes while a checkpoint is being written ---------------------------------------------------------

def _half_written(tensors, filename, metadata=None) -> None:
    """Stand-in for safetensors' save_file that dies half-way through the file."""
    Path(filename).write_bytes(b"\x00" * 1000)
    raise KeyboardInterrupt


def test_interrupt_mid_write_keeps_old_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    ckpt.save_checkpoint(path, {"w": torch.arange(6.0)}, {"kind": "test"})
    before = path.read_bytes()
    monkeypatch.setattr(ckpt, "save_file", _half_written)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"w": torch.zeros(6)}, {"kind": "test"})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    tensors, meta = ckpt.load_checkpoint(path)
    assert torch.equal(tensors["w"], torch.arange(6.0)) and meta["kind"] == "test"


def test_sigkill_mid_write_keeps_old_checkpoint(tmp_path):
    """SIGKILL runs no cleanup: the temp file stays behind, but the checkpoint itself is the old one."""
    path = tmp_path / "model.safetensors"
    ckpt.save_checkpoint(path, {"w": torch.arange(6.0)}, {"kind": "test"})
    before = path.read_bytes()
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from hashdistill.atomic import atomic_write\n"
        "def die(tmp):\n"
        "    Path(tmp).write_bytes(b'partial')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(sys.argv[1], die)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == b"partial"  # proves the write really began
    assert torch.equal(ckpt.load_checkpoint(path)[0]["w"], torch.arange(6.0))


def _toy_task(epochs: int) -> trainer.TrainTask:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 4))

    def loss(m: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    return trainer.TrainTask("toy", model, [{"params": list(model.parameters())}], OptimConfig(epochs=epochs),
                             build_dataset(DataConfig(dataset="synthetic", image_size=16), "train"), loss,
                             batch_size=64)


@pytest.mark.parametrize("dies_on", ["toy-last", "toy-best"])
def test_kill_between_state_and_best_checkpoint_writes(tmp_path, monkeypatch, dies_on):
    """The last epoch saves a training state and a best model; a kill after either write must not matter."""
    full = _toy_task(3)
    trainer.fit(full, RunDir(tmp_path / "full"), torch.device("cpu"), seed=1)

    save = trainer.save_checkpoint

    def dying_save(path, tensors, meta):
        if Path(path).stem == dies_on and meta.get("state", meta).get("epoch") == 2:
            raise KeyboardInterrupt
        return save(path, tensors, meta)

    monkeypatch.setattr(trainer, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(_toy_task(3), RunDir(tmp_path / "cut"), torch.device("cpu"), seed=1)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    resumed = _toy_task(3)
    trainer.fit(resumed, RunDir(tmp_path / "cut"), torch.device("cpu"), seed=1)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


# --- divergence -------------------------------------------------------------------------------------------

def test_divergence_stops_with_epoch_step_and_advice_and_keeps_last_checkpoint(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    code = main(["run", str(recipe), "--out", str(out), "--stages", "teacher", "--set", "teacher.phase2.lr=1e30"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("hashdistill: error: stage 'teacher-phase2': the loss became") and "\n" not in err
    assert "epoch 1, step " in err and "learning rate" in err
    assert "teacher-phase1-last" not in err  # it names this stage's state, and phase 2 had not written one
    ckpt.load_checkpoint(out / "checkpoints" / "teacher-phase1-last.safetensors")  # the last good one is intact
    assert not (out / "checkpoints" / "teacher-phase2-last.safetensors").exists()
    assert not (out / "checkpoints" / "teacher.safetensors").exists()


def test_divergence_before_any_checkpoint_leaves_no_run_directory(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    code = main(["run", str(recipe), "--out", str(out), "--stages", "teacher", "--set", "teacher.phase1.lr=1e30"])
    err = capsys.readouterr().err
    assert code == 2 and "epoch 1, step " in err and "No checkpoint of this stage had been written yet" in err
    assert not out.exists()


# --- files that try to run code ---------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates the marker file: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def pickles(tmp_path) -> tuple[Path, list[Path]]:
    marker = tmp_path / "PAYLOAD-RAN"
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"weights": _Payload(marker)}))
    zipped = tmp_path / "zipped.pt"
    torch.save({"weights": _Payload(marker)}, zipped)
    copies = [tmp_path / "raw.pt", tmp_path / "zipped.safetensors"]
    copies[0].write_bytes(raw.read_bytes())
    copies[1].write_bytes(zipped.read_bytes())
    # the payload is live: unpickling one copy does create the marker
    pickle.loads(raw.read_bytes())
    assert marker.exists()
    marker.unlink()
    return marker, [raw, zipped, *copies]


@pytest.mark.parametrize("command", ["eval", "quantize", "export", "taxonomy"])
def test_pickled_checkpoints_are_refused_and_never_run(pickles, command, tmp_path, capsys):
    marker, files = pickles
    for file in files:
        args = {"eval": [], "taxonomy": ["-o", str(tmp_path / "tree.png")],
                "quantize": ["-o", str(tmp_path / "q.safetensors")], "export": ["-o", str(tmp_path / "m.onnx")]}
        code = main([command, str(file), *args[command]])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "pickle" in err and "never unpickles" in err and err.count("\n") == 1
        assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)  # no output written


def test_recipe_cannot_execute_code(tmp_path, capsys):
    marker = tmp_path / "YAML-RAN"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "python/object/apply" in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "run").exists()
