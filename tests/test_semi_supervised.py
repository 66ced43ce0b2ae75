"""Learning from unlabelled images: ``data.labelled_fraction`` holds labels back, ``data.unlabelled_root`` adds a
folder of images without labels. No held-back label may reach a loss; the teacher and the labels-only baseline see
exactly the labelled images; a distilled student sees every image."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from conftest import TINY
from PIL import Image
from test_imagefolder_runs import _fashion_mnist, hashdistill

from hashdistill.data import UNLABELLED, build_dataset, labelled_only
from hashdistill.distill import losses, student_stage, teacher_stage
from hashdistill.errors import UserError
from hashdistill.evaluate import EvalSplits, labels_of
from hashdistill.recipe import DataConfig, recipe_from_dict
from hashdistill.rundir import RunDir

DIGITS = DataConfig(dataset="digits", image_size=16, batch_size=64)


@pytest.mark.parametrize("fraction", [0.05, 0.3])
def test_labelled_fraction_keeps_a_stratified_seeded_choice(fraction):
    cfg = dataclasses.replace(DIGITS, labelled_fraction=fraction)
    full_train, train = build_dataset(DIGITS, "train"), build_dataset(cfg, "train")
    kept = train.labels != UNLABELLED
    assert len(train) == len(full_train) and torch.equal(train.images, full_train.images)
    assert torch.equal(train.labels[kept], full_train.labels[kept])  # the kept labels are the true ones
    pool = len(full_train) + len(build_dataset(DIGITS, "val"))
    val = build_dataset(cfg, "val")
    assert int(kept.sum()) + len(val) == pytest.approx(fraction * pool, abs=10)  # 10 classes, rounded each
    assert set(train.labels[kept].tolist()) == set(range(10)) and (labels_of(val) != UNLABELLED).all()
    again = build_dataset(dataclasses.replace(cfg, batch_size=8), "train")  # another run, same choice
    assert torch.equal(again.labels, train.labels)


def test_labelled_only_and_the_database_see_what_they_should():
    cfg = dataclasses.replace(DIGITS, labelled_fraction=0.2)
    train = build_dataset(cfg, "train")
    subset = labelled_only(train)
    assert len(subset) == int((train.labels != UNLABELLED).sum()) and (subset.labels != UNLABELLED).all()
    splits = EvalSplits.build(cfg)  # evaluation always searches the whole, fully labelled training set
    assert (labels_of(splits.database) >= 0).all() and len(splits.database) == len(build_dataset(DIGITS, "train")) \
        + len(build_dataset(DIGITS, "val"))


def test_label_losses_ignore_unlabelled_rows():
    torch.manual_seed(0)
    codes = torch.sign(torch.randn(4, 8))
    student = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, UNLABELLED, 2, UNLABELLED, 3, 1])
    kept = labels != UNLABELLED
    for loss in (losses.code_bce, losses.dsh):
        full = loss(losses.LossInputs(student, None, labels, codes))
        (grad,) = torch.autograd.grad(full, student)
        if loss is losses.code_bce:
            alone = loss(losses.LossInputs(student[kept], None, labels[kept], codes))
            assert torch.allclose(full, alone)
            assert (grad[~kept] == 0).all() and (grad[kept] != 0).any()
        else:  # the pair term ignores them; only the label-free regulariser reaches their rows
            regulariser = 0.01 * (student.abs() - 1).abs().mean()
            pairs = loss(losses.LossInputs(student[kept], None, labels[kept], codes))
            alone_regulariser = 0.01 * (student[kept].abs() - 1).abs().mean()
            assert torch.allclose(full - regulariser, pairs - alone_regulariser)
    no_labels = torch.full((6,), UNLABELLED)
    assert losses.code_bce(losses.LossInputs(student, None, no_labels, codes)) == 0


def _recording_fit(monkeypatch, module, seen: list):
    """Wrap ``module.fit`` so every batch's (index or None, labels) handed to the loss is recorded."""
    original = module.fit

    def fit(task, *args, **kwargs):
        inner = task.batch_loss

        def batch_loss(model, batch):
            seen.append((task.name, batch[-1].clone() if len(batch) > 2 else None, batch[1].clone()))
            return inner(model, batch)

        return original(dataclasses.replace(task, batch_loss=batch_loss), *args, **kwargs)

    monkeypatch.setattr(module, "fit", fit)


def test_no_held_back_label_reaches_any_loss(monkeypatch, tmp_path):
    raw = {**TINY, "data": {"dataset": "digits", "image_size": 16, "batch_size": 64, "labelled_fraction": 0.25},
           "student": {**TINY["student"], "losses": {"bernoulli_kd": 1.0, "code_bce": 1.0, "dsh": 0.1}}}
    recipe = recipe_from_dict(raw)
    truth = build_dataset(dataclasses.replace(recipe.data, labelled_fraction=1.0), "train").labels
    train = build_dataset(recipe.data, "train")
    held_back = train.labels == UNLABELLED
    seen: list = []
    _recording_fit(monkeypatch, teacher_stage, seen)
    _recording_fit(monkeypatch, student_stage, seen)
    run = RunDir(tmp_path / "run")
    teacher = teacher_stage.train_teacher(recipe, run, torch.device("cpu"))
    student_stage.train_student(recipe, run, torch.device("cpu"), teacher)
    student_stage.train_student(recipe, run, torch.device("cpu"), teacher, labels_only="codes",
                                name="student-labels-only")

    def per_epoch(n: int) -> int:  # the trainer drops a last partial batch
        return n if n <= recipe.data.batch_size else n // recipe.data.batch_size * recipe.data.batch_size

    n_labelled = int((~held_back).sum())
    teacher_labels = torch.cat([labels for stage, _, labels in seen if stage.startswith("teacher")])
    assert (teacher_labels != UNLABELLED).all()  # the teacher trains on the labelled images only
    phases = recipe.teacher.phase1.epochs + recipe.teacher.phase2.epochs
    assert len(teacher_labels) == phases * per_epoch(n_labelled)
    distilled = [(index, labels) for stage, index, labels in seen if stage == "student"]
    indices = torch.cat([index for index, _ in distilled])
    labels = torch.cat([labels for _, labels in distilled])
    assert len(indices) == recipe.student.train.epochs * per_epoch(len(train))  # every image, labelled or not
    assert held_back[indices].any() and (labels[held_back[indices]] == UNLABELLED).all()
    assert torch.equal(labels[~held_back[indices]], truth[indices[~held_back[indices]]])
    baseline = torch.cat([labels for stage, _, labels in seen if stage == "student-labels-only"])
    repeated = n_labelled * round(len(train) / n_labelled)  # a baseline's epoch is as long as a distilled one's
    assert (baseline != UNLABELLED).all() and len(baseline) == recipe.student.train.epochs * per_epoch(repeated)


def test_unlabelled_root_needs_an_image_folder():
    with pytest.raises(UserError, match="unlabelled_root"):
        recipe_from_dict({"data": {"dataset": "digits", "unlabelled_root": "/tmp"}})
    with pytest.raises(UserError, match="labelled_fraction"):
        recipe_from_dict({"data": {"dataset": "digits", "labelled_fraction": 0}})


@pytest.mark.slow
def test_a_folder_of_unlabelled_images_distils_end_to_end(tmp_path):
    images, labels = _fashion_mnist(60, 4)
    labelled, unlabelled = tmp_path / "labelled", tmp_path / "catalogue"
    for i, (image, label) in enumerate(zip(images, labels)):
        if i % 3 == 0:  # a third keeps its class folder; the rest is a flat folder (and one nested one)
            (labelled / f"c{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(labelled / f"c{label}" / f"{i}.png")
        else:
            folder = unlabelled / ("more" if i % 7 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    data = {"dataset": "imagefolder", "root": str(labelled), "unlabelled_root": str(unlabelled), "image_size": 16,
            "batch_size": 32, "num_workers": 0}
    recipe_path = tmp_path / "semi.yaml"
    recipe_path.write_text(yaml.safe_dump({**TINY, "data": data}))
    cfg = recipe_from_dict({"data": data}).data
    train = build_dataset(cfg, "train")
    flat = sorted(unlabelled.rglob("*.png"))
    assert len(labelled_only(train)) == len(build_dataset(dataclasses.replace(cfg, unlabelled_root=None), "train"))
    assert len(train) == len(labelled_only(train)) + len(flat) and (train.labels[-len(flat):] == UNLABELLED).all()

    out = tmp_path / "run"
    done = hashdistill("run", str(recipe_path), "--out", str(out), "--stages", "teacher,student")
    assert done.returncode == 0, done.stderr
    summary = RunDir(out, writer=False).summary()["models"]
    assert {"teacher", "student"} <= set(summary) and summary["student"]["map_tie_aware"] > 0
    seen = [r for r in RunDir(out, writer=False).metrics() if r.get("stage") == "student"]
    assert seen and "val_map_tie_aware" in seen[-1]
    assert "training_curves.png" in (out / "report.md").read_text() and (out / "training_curves.png").is_file()


def test_mixup_blends_pairs_keeps_shared_labels_and_teaches_on_the_mixed_image(trained_run):
    from hashdistill.distill.models import load_model
    from hashdistill.distill.student_stage import IndexedDataset, build_student, distillation_batch_loss, mix_images

    torch.manual_seed(0)
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 2, 2).contiguous()
    y = torch.tensor([0, 0, 1, 2, 1, 0])
    torch.manual_seed(1)
    mixed, labels = mix_images(x, y, 0.4)
    torch.manual_seed(1)
    weight = float(torch.distributions.Beta(0.4, 0.4).sample())
    partner = torch.randperm(6)
    assert torch.allclose(mixed, weight * x + (1 - weight) * x[partner])
    assert labels.tolist() == [int(a) if a == b else UNLABELLED for a, b in zip(y.tolist(), y[partner].tolist())]

    recipe = dataclasses.replace(trained_run["recipe"], student=dataclasses.replace(
        trained_run["recipe"].student, mixup=0.4, losses={"bernoulli_kd": 1.0, "code_bce": 1.0}))
    teacher, _ = load_model(str(trained_run["teacher"]))
    train = build_dataset(recipe.data, "train")
    seen = []
    teacher.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    student = build_student(recipe.student, teacher, recipe.data.image_size)
    assert student_stage.teacher_cache_for(recipe, train, trained_run["teacher"], recipe.student.losses,
                                           trained_run["run"], torch.device("cpu")) is None  # mixes are not views
    batch_loss = distillation_batch_loss(student, teacher, recipe.student.losses, recipe.student)
    batch = IndexedDataset(train).get_batch(list(range(16)))
    torch.manual_seed(2)
    loss = batch_loss(student, batch)["loss"]
    torch.manual_seed(2)
    expected, _ = mix_images(batch[0], batch[1], 0.4)
    assert torch.isfinite(loss) and len(seen) == 1 and torch.equal(seen[0], expected)


@pytest.mark.slow
def test_semi_supervised_distillation_under_torchrun(tmp_path):
    """Two gloo ranks: the teacher on the labelled images, a distilled and a labels-only student, all through the
    CLI (run, then distill --labels-only)."""
    import subprocess
    import sys

    recipe_path = tmp_path / "semi.yaml"
    recipe_path.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "labelled_fraction": 0.3}}))
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "hashdistill"]
    done = subprocess.run([*torchrun, "run", str(recipe_path), "--out", str(out), "--stages", "teacher,student"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([*torchrun, "distill", str(recipe_path), "--teacher", str(out / "checkpoints" /
                                                                                    "teacher.safetensors"),
                           "--labels-only", "--resume", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = RunDir(out, writer=False)
    assert {"teacher", "student"} <= set(run.summary()["models"])
    assert run.checkpoint("student-labels-only").is_file()
    stages = [r["stage"] for r in run.metrics()]
    assert stages.count("student") == TINY["student"]["train"]["epochs"]  # rank 0 alone writes the log
