"""Shared fixtures: a tiny recipe on the synthetic dataset with timm's test-sized models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hashdistill.data import FASHION_MNIST_DIRS
from hashdistill.recipe import Recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
ORT_WEB = ROOT / "node_modules" / "onnxruntime-web" / "dist"


def _browser_missing() -> str | None:
    """Why the browser tests cannot run here (what the README's install does not bring), or None."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not shutil.which("chromium") and not Path("/usr/bin/chromium").is_file():
        return "Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
    if not ORT_WEB.is_dir():
        return "onnxruntime-web is not installed (npm ci in the repository root; .ci/run does)"
    return None


# What the README's install does not bring: these tests skip, naming the missing piece, where it is absent.
needs_fashion_mnist = pytest.mark.skipif(
    not any((Path(d).expanduser() / "train-images-idx3-ubyte.gz").is_file() for d in FASHION_MNIST_DIRS),
    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (.ci/run does)")
needs_browser = pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))

TINY = {
    "name": "tiny",
    "device": "cpu",
    "data": {"dataset": "synthetic", "image_size": 16, "batch_size": 32},
    "teacher": {"backbone": "test_resnet", "bits": 8, "phase1": {"epochs": 2, "lr": 3e-3},
                "phase2": {"epochs": 1, "lr": 1e-3}},
    "student": {"model": "test_vit", "train": {"epochs": 2, "lr": 3e-3}},
    "quantize": {"train": {"epochs": 1, "lr": 1e-4}},
}


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def tiny_recipe() -> Recipe:
    return recipe_from_dict(TINY)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run directory with a trained tiny teacher and student (trained once per test session)."""
    from hashdistill.distill.student_stage import train_student
    from hashdistill.distill.teacher_stage import train_teacher
    from hashdistill.rundir import RunDir

    recipe = recipe_from_dict(TINY)
    run = RunDir(tmp_path_factory.mktemp("run"))
    teacher = train_teacher(recipe, run, torch.device("cpu"))
    student = train_student(recipe, run, torch.device("cpu"), teacher)
    return {"recipe": recipe, "run": run, "teacher": teacher, "student": student}


@pytest.fixture(scope="session")
def export_root(tmp_path_factory):
    """Where the export tests keep their checkpoints and ONNX files (built once per session)."""
    return tmp_path_factory.getbasetemp() / "export-artefacts"


@pytest.fixture(scope="session")
def student_onnx(export_root):
    from test_export_support import exported

    return exported(export_root, "student")[0]


@pytest.fixture(scope="session")
def arts(tmp_path_factory):
    """Untrained 16-bit checkpoints (teacher, student, ternary, float) plus an 8-bit teacher and one of another
    dataset: what the bad-input tests damage."""
    from cli_support import build_arts

    return build_arts(tmp_path_factory)
