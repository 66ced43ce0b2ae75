"""The one training loop: exact resume, NaN detection, best-on-validation selection."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hashdistill.checkpoint import read_metadata
from hashdistill.data import build_dataset, random_shift_flip
from hashdistill.recipe import DataConfig, OptimConfig
from hashdistill.rundir import RunDir
from hashdistill.trainer import TrainingDiverged, TrainTask, fit

DATA = DataConfig(dataset="synthetic", image_size=16)


def _task(epochs: int, lr: float = 1e-2, validate=None, augment=None) -> TrainTask:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 4))

    def loss(m, batch):
        x, y = batch
        return F.cross_entropy(m(x), y)

    return TrainTask("toy", model, [{"params": list(model.parameters())}], OptimConfig(epochs=epochs, lr=lr),
                     build_dataset(DATA, "train"), loss, batch_size=32, validate=validate, augment=augment)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _shift_flip(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return [random_shift_flip(batch[0]), *batch[1:]]


@pytest.mark.parametrize("augment", [None, _shift_flip], ids=["plain", "batch-augmented"])
def test_resume_is_bit_identical(tmp_path, augment):
    """Also with batch augmentation on the device: the epoch's seed replays the same augmentations."""
    full = _task(4, augment=augment)
    fit(full, RunDir(tmp_path / "full"), torch.device("cpu"), seed=3)

    # an interrupted run: killed during epoch 3 (after epoch 2's checkpoint), then resumed from scratch objects
    calls = iter(range(100))

    def interrupt_in_third_epoch(model):
        if next(calls) == 2:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        fit(_task(4, validate=interrupt_in_third_epoch, augment=augment), RunDir(tmp_path / "cut"),
            torch.device("cpu"), seed=3)
    resumed = _task(4, augment=augment)
    fit(resumed, RunDir(tmp_path / "cut"), torch.device("cpu"), seed=3)

    for a, b in zip(_weights(full.model), _weights(resumed.model)):
        assert torch.equal(a, b)
    epochs = [r["epoch"] for r in RunDir(tmp_path / "cut").metrics()]
    assert epochs == [0, 1, 2, 3]
    if augment is not None:  # and the augmentation did change the training
        plain = _task(4)
        fit(plain, RunDir(tmp_path / "plain"), torch.device("cpu"), seed=3)
        assert not all(torch.equal(a, b) for a, b in zip(_weights(full.model), _weights(plain.model)))


def test_finished_stage_is_not_retrained(tmp_path):
    run = RunDir(tmp_path)
    fit(_task(1), run, torch.device("cpu"), seed=0)
    again = _task(1)
    fit(again, run, torch.device("cpu"), seed=0)
    assert len(run.metrics()) == 1


def test_nan_loss_stops_with_epoch_and_step(tmp_path):
    task = _task(2, lr=1e-2)
    run = RunDir(tmp_path)
    fit(task, run, torch.device("cpu"), seed=0)
    before = (tmp_path / "checkpoints" / "toy-last.safetensors").read_bytes()

    bad = _task(4)
    bad.batch_loss = lambda m, batch: m(batch[0]).sum() * float("nan")
    with pytest.raises(TrainingDiverged, match=r"epoch 3, step 1") as err:
        fit(bad, run, torch.device("cpu"), seed=0)
    assert "learning rate" in str(err.value)
    assert (tmp_path / "checkpoints" / "toy-last.safetensors").read_bytes() == before


def test_divergence_is_noticed_without_a_host_sync_per_step(tmp_path, monkeypatch):
    """The host looks at the flag every CHECK_FINITE_EVERY steps and at the epoch's end, not at every step; the
    first bad step is still the one reported, and nothing of the diverged epoch is saved."""
    from hashdistill import trainer

    monkeypatch.setattr(trainer, "CHECK_FINITE_EVERY", 4)
    looks = []
    real = trainer.DivergenceWatch.stop_if_diverged

    def counting(self, *args):
        looks.append(int(self.first_bad))
        return real(self, *args)

    monkeypatch.setattr(trainer.DivergenceWatch, "stop_if_diverged", counting)
    task = _task(2)
    fit(task, RunDir(tmp_path / "ok"), torch.device("cpu"), seed=0)  # 360 images / 32 = 11 steps an epoch
    assert len(looks) == 2 * (11 // 4 + 1)
    looks.clear()
    steps = iter(range(1000))
    bad = _task(2)
    normal = bad.batch_loss
    bad.batch_loss = lambda m, batch: normal(m, batch) * (float("nan") if next(steps) == 5 else 1.0)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 6"):
        fit(bad, RunDir(tmp_path / "bad"), torch.device("cpu"), seed=0)
    assert looks == [-1, 5]  # it ran on past the bad step until the next look
    assert not (tmp_path / "bad" / "checkpoints" / "toy-last.safetensors").exists()


def test_best_validation_epoch_is_kept(tmp_path):
    scores = iter([0.5, 0.9, 0.1])
    task = _task(3, validate=lambda m: {"val_score": next(scores)})
    task.select = "val_score"
    record = fit(task, RunDir(tmp_path), torch.device("cpu"), seed=0)
    assert record["best_epoch"] == 1
    assert read_metadata(tmp_path / "checkpoints" / "toy-best.safetensors")["epoch"] == 1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["val_score"] for x in lines] == [0.5, 0.9, 0.1]



def test_loss_parts_are_logged_per_epoch(tmp_path):
    """A batch loss may hand back its parts: metrics.jsonl gets each part's epoch mean beside the total."""
    task = _task(1)
    plain = task.batch_loss

    def with_parts(m, batch):
        loss = plain(m, batch)
        return {"loss": loss, "half": loss.detach() / 2}

    task.batch_loss = with_parts
    fit(task, RunDir(tmp_path), torch.device("cpu"), seed=0)
    (record,) = RunDir(tmp_path).metrics()
    assert record["train_half"] == pytest.approx(record["train_loss"] / 2, rel=1e-5)
