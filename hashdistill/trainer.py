"""The one training loop: LLC phase 1 and 2, student distillation and TTQ fine-tuning call it.

A caller describes *what* to train in a :class:`TrainTask` (model, parameter groups, how a
batch becomes a loss, how to validate); :func:`fit` handles *how*: optimiser and schedule,
DDP under torchrun, bf16 autocast on CUDA, progress bars, metrics.jsonl, atomic checkpoints
every epoch, exact resume, NaN detection and best-on-validation model selection.

Determinism: every epoch reseeds torch and Python's ``random`` (timm's transforms draw from both) from
``(seed, epoch)``; loader workers are started afresh each epoch, so they derive their seeds from that
state too (persistent workers would carry their generators across epochs and break this). Resuming
from the checkpoint at an epoch boundary replays exactly the epochs, augmentations included, that an
uninterrupted run would have run.

Loader defaults: pinned memory and prefetching on CUDA. The model and its input batches are channels_last: the
layout cuDNN's convolutions run fastest in under bf16 autocast, and on a CPU oneDNN's depthwise-separable ones
(lcnet_075 at 32 px trains 1.9x faster on one core; a ResNet as fast either way).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from hashdistill.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from hashdistill.errors import UserError
from hashdistill.recipe import OptimConfig
from hashdistill.rundir import RunDir

PREFETCH_BATCHES = 4  # per loader worker
# A batch's loss, or the loss with its parts ({"loss": total, "part": value, ...}: metrics.jsonl logs each part's
# epoch mean as train_<part>).
BatchLoss = Callable[[nn.Module, list[torch.Tensor]], torch.Tensor | dict[str, torch.Tensor]]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class TrainTask:
    """Everything that differs between the four trainings; see :func:`fit`."""

    name: str
    model: nn.Module
    param_groups: list[dict[str, Any]]
    optim: OptimConfig
    train_data: Dataset
    batch_loss: BatchLoss
    batch_size: int = 128
    num_workers: int = 0
    validate: Callable[[nn.Module], dict[str, float]] | None = None
    select: str | None = None
    # Applied to each batch (its tensors on the device) before the loss; returns the batch with its images made
    # (hashdistill.data.batch_augmentation: an augmented split's views, normalised) and its other tensors kept.
    augment: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    # What the training depends on (Recipe.stage_digest): a saved state of another identity is refused, not resumed.
    identity: str | None = None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; under torchrun each rank takes its LOCAL_RANK GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("recipe asks for device 'cuda' but no CUDA GPU is available (use device: auto or cpu)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op outside torchrun): stage outputs are written by rank 0 only."""
    if dist.is_initialized():
        dist.barrier()


def fit(task: TrainTask, run: RunDir, device: torch.device, seed: int) -> dict[str, Any]:
    """Train ``task.model`` in place; returns the final record (validation metrics, wall time)."""
    rank, world = init_distributed(device)
    model = task.model.to(device)
    optimizer = _build_optimizer(task.param_groups, task.optim)
    state = _restore(task, run, optimizer)
    if state["epoch"] >= task.optim.epochs - 1 and state["epoch"] >= 0:
        _load_best(task, run)
        return state["final"]

    wrapped = DistributedDataParallel(model) if world > 1 else model
    sampler = DistributedSampler(task.train_data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    drop_last = len(task.train_data) > task.batch_size * world
    cuda = device.type == "cuda"
    loading = {"num_workers": task.num_workers, "pin_memory": cuda,
               "prefetch_factor": PREFETCH_BATCHES if task.num_workers > 0 else None}
    if hasattr(task.train_data, "get_batch"):  # the dataset fetches and collates whole batches itself
        loader = DataLoader(_Batches(task.train_data), sampler=BatchSampler(sampler, task.batch_size, drop_last),
                            batch_size=None, **loading)
    else:
        loader = DataLoader(task.train_data, batch_size=task.batch_size, sampler=sampler, drop_last=drop_last,
                            **loading)
    model.to(memory_format=torch.channels_last)
    steps_per_epoch = max(1, len(loader))
    total_steps = steps_per_epoch * task.optim.epochs
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    quiet = not sys.stderr.isatty() or rank != 0

    for epoch in range(state["epoch"] + 1, task.optim.epochs):
        torch.manual_seed(seed * 100_003 + epoch)
        random.seed(seed * 100_003 + epoch)
        sampler.set_epoch(epoch)
        model.train()
        started, seen, loss_sum, part_sums = time.perf_counter(), 0, torch.zeros((), device=device), {}
        watch = DivergenceWatch(device)
        for step, batch in enumerate(tqdm(loader, desc=f"{task.name} {epoch + 1}/{task.optim.epochs}",
                                          disable=quiet, leave=False)):
            global_step = epoch * steps_per_epoch + step
            _set_lr(optimizer, task.optim, global_step, total_steps, steps_per_epoch)
            batch = [t.to(device, non_blocking=True) for t in batch]
            if task.augment is not None:
                batch = task.augment(batch)
            if batch[0].ndim == 4:
                batch[0] = batch[0].contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = task.batch_loss(wrapped, batch)
            if isinstance(loss, dict):
                for name, part in loss.items():
                    if name != "loss":  # summed on the device: no host sync per step
                        part_sums[name] = part_sums.get(name, 0.0) + part.detach().float() * len(batch[0])
                loss = loss["loss"]
            watch.record(loss, step)
            if (step + 1) % CHECK_FINITE_EVERY == 0:
                watch.stop_if_diverged(task, run, epoch, world)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(batch[0])
            seen += len(batch[0])
        watch.stop_if_diverged(task, run, epoch, world)  # before anything of this epoch is saved
        elapsed = time.perf_counter() - started
        record = {"stage": task.name, "epoch": epoch, "train_loss": (loss_sum / max(seen, 1)).item(),
                  **{f"train_{name}": (value / max(seen, 1)).item() for name, value in part_sums.items()},
                  "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen * world / max(elapsed, 1e-9),
                  "epoch_seconds": elapsed}
        if task.validate is not None:
            model.eval()
            record.update(task.validate(model))
        state = _advance(state, record, task)
        run.log(record)
        _save_state(task, run, optimizer, state, is_best=state["best_epoch"] == epoch)
    _load_best(task, run)
    return state["final"]


class _Batches(Dataset):
    """A dataset whose items are whole batches: ``batches[indices]`` is ``dataset.get_batch(indices)``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> list[torch.Tensor]:
        return self.dataset.get_batch(indices)


CHECK_FINITE_EVERY = 50  # steps between the host's looks at the divergence flag (each look waits for the device)


class DivergenceWatch:
    """Notices a NaN/inf loss without making the host wait for the device on every step.

    Each step folds ``isfinite(loss)`` into flags that stay on the device (the first bad step and its loss);
    the host reads them every CHECK_FINITE_EVERY steps and before an epoch's checkpoint is written. Steps run
    between a bad loss and the look are thrown away with everything else of the epoch: no checkpoint is ever
    written from them, so the last good one is what the run stops with. Under DDP every rank looks at the
    same steps and stops together.
    """

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), device=device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        fresh = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(fresh, step, self.first_bad)
        self.bad_loss = torch.where(fresh, loss.detach().float(), self.bad_loss)

    def stop_if_diverged(self, task: TrainTask, run: RunDir, epoch: int, world: int) -> None:
        bad = (self.first_bad >= 0).float()
        if world > 1:  # one rank raising alone would leave the others waiting in all-reduce
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bool(bad):
            return
        last = run.checkpoint(f"{task.name}-last")
        kept = f"The last good checkpoint is kept: {last}" if last.is_file() else \
            "No checkpoint of this stage had been written yet"
        where = f"step {int(self.first_bad) + 1}" if self.first_bad >= 0 else "a step (on another process)"
        value = self.bad_loss.item() if self.first_bad >= 0 else "not finite"
        raise TrainingDiverged(
            f"stage '{task.name}': the loss became {value} at epoch {epoch + 1}, {where}. {kept}. Try a lower "
            f"learning rate (now {task.optim.lr}), a longer warmup (warmup_epochs) or check the input data.")


def _advance(state: dict[str, Any], record: dict[str, Any], task: TrainTask) -> dict[str, Any]:
    score = record.get(task.select) if task.select else None
    improved = task.select is None or state["best_score"] is None or (score is not None and score > state["best_score"])
    return {"epoch": record["epoch"],
            "best_score": score if improved else state["best_score"],
            "best_epoch": record["epoch"] if improved else state["best_epoch"],
            "wall_seconds": state["wall_seconds"] + record["epoch_seconds"],
            "final": {**record, "best_epoch": record["epoch"] if improved else state["best_epoch"],
                      "wall_seconds": state["wall_seconds"] + record["epoch_seconds"]}}


def _build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = [{**g, "lr": g.get("lr", cfg.lr), "weight_decay": g.get("weight_decay", cfg.weight_decay)} for g in groups]
    for group in groups:
        group["base_lr"] = group["lr"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, total: int, per_epoch: int) -> None:
    warmup = int(cfg.warmup_epochs * per_epoch)
    if step < warmup:
        factor = (step + 1) / warmup
    elif cfg.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    else:
        factor = 1.0
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


# --- checkpoints of the training state ------------------------------------------------------------

def _save_state(task: TrainTask, run: RunDir, optimizer: torch.optim.Optimizer, state: dict, is_best: bool) -> None:
    if not is_main_process():
        return
    weights = {f"model.{k}": v for k, v in task.model.state_dict().items()}
    # The best model first: a kill between the two writes then replays this epoch on resume. The other order
    # would resume past an epoch whose best model was never saved and end with an older one.
    if is_best:
        save_checkpoint(run.checkpoint(f"{task.name}-best"), weights, {"kind": "train-best", "stage": task.name,
                                                                        "epoch": state["epoch"],
                                                                        "identity": task.identity})
    optim_tensors, optim_meta = _flatten_optimizer(optimizer)
    save_checkpoint(run.checkpoint(f"{task.name}-last"), {**weights, **optim_tensors},
                    {"kind": "train-state", "stage": task.name, "state": state, "optimizer": optim_meta,
                     "identity": task.identity})


def _restore(task: TrainTask, run: RunDir, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    fresh = {"epoch": -1, "best_score": None, "best_epoch": -1, "wall_seconds": 0.0, "final": {}}
    path = run.checkpoint(f"{task.name}-last")
    if not path.is_file():
        return fresh
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != "train-state" or meta.get("stage") != task.name:
        raise UserError(f"{path} is not the training state of stage '{task.name}'")
    if task.identity is not None and meta.get("identity") not in (None, task.identity):
        raise UserError(f"{path} is the training state of stage '{task.name}' for other data or settings than this "
                        "run's; it is not resumed: remove it, or start the run afresh (--force or another --out)")
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    load_state_strict(task.model, weights, path)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    run.drop_metrics_after(task.name, meta["state"]["epoch"])
    return meta["state"]


def _load_best(task: TrainTask, run: RunDir) -> None:
    barrier()
    path = run.checkpoint(f"{task.name}-best")
    if path.is_file():
        tensors, _ = load_checkpoint(path)
        load_state_strict(task.model, {k.removeprefix("model."): v for k, v in tensors.items()}, path)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, slots in sd["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
