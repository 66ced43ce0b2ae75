"""Data path: in-memory batches per item vs whole batches, image folders vs torchvision, folder vs in-memory mAP.

    python benchmarks/data.py --out benchmarks/results/data.json

1. In-memory training batches on one core. Both paths produce normalised and augmented (shift by up to 2 pixels +
   flip) batches of Fashion-MNIST at 32 px through a DataLoader with no workers: the old one normalises and
   augments each item in Python, the new one fetches the uint8 pixels of a batch in one indexing operation
   (``get_batch``) and shifts, flips and normalises the whole batch (``batch_augmentation``), as the trainer does.
2. Image-folder loading: ``ImageFileDataset`` (timm's training transform to uint8 pixels, each batch normalised
   by ``batch_augmentation`` in the timed loop) vs ``torchvision.datasets.ImageFolder`` with timm's usual
   transform of the same augmentation (ToTensor + Normalize per item), the same DataLoader settings and workers,
   over a PNG folder.
3. The trainer's divergence check: a tiny model's steps/s with a host look at the loss on every step (before) vs
   the device-side flag read every 50 steps (now). On a CPU a look costs next to nothing; on a GPU it stalls
   the queue.
4. Parity: the same Fashion-MNIST images as a PNG folder (train/ and test/) and in memory, the same teacher
   recipe (no augmentation, so both paths see the same pixels up to the in-memory resize's rounding); tie-aware
   mAP of each, queries = test, database = train + val.

Timings: interleaved rounds, medians, ratios within the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine, recipe, run_stages, write_json
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from hashdistill.data import batch_augmentation, build_dataset
from hashdistill.data.imagefolder import train_transform
from hashdistill.recipe import DataConfig
from hashdistill.trainer import DivergenceWatch


class PerItem(torch.utils.data.Dataset):
    """The loader before this change: normalisation and augmentation in Python, one item at a time."""

    def __init__(self, base):
        self.base = base
        self.mean = torch.tensor(base.transform.mean).view(3, 1, 1)
        self.std = torch.tensor(base.transform.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image = self.base.images[index].float().div_(255).expand(3, -1, -1)
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
        padded = F.pad(image.unsqueeze(0), (2,) * 4, mode="replicate").squeeze(0)
        h, w = image.shape[-2:]
        image = padded[:, 2 + dy:2 + dy + h, 2 + dx:2 + dx + w]
        return (image - self.mean) / self.std, int(self.base.labels[index])


class Batches(torch.utils.data.Dataset):
    """Whole batches as items, as the trainer's loader fetches them (``get_batch``)."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, indices):
        return self.base.get_batch(indices)


def images_per_s(loader: DataLoader, augment, limit: int) -> float:
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        if augment is not None:
            images = augment(images)
        seen += len(images)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def in_memory_batches(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(1)
    train = build_dataset(DataConfig(dataset="fashion-mnist", image_size=32, augment=True), "train")
    per_item = DataLoader(PerItem(train), batch_size=args.batch_size, shuffle=True)
    batched = DataLoader(Batches(train), batch_size=None,
                         sampler=BatchSampler(RandomSampler(train), args.batch_size, drop_last=False))
    old, new = [], []
    for _ in range(args.rounds):
        old.append(images_per_s(per_item, None, args.images))
        new.append(images_per_s(batched, batch_augmentation(train), args.images))
    torch.set_num_threads(os.cpu_count() or 1)
    return {"per_item_images_per_s_per_core": statistics.median(old),
            "batched_aug_images_per_s_per_core": statistics.median(new),
            "batched_vs_per_item": statistics.median(n / o for n, o in zip(new, old))}


def write_png_folder(root: Path, split_images: dict[str, tuple[torch.Tensor, torch.Tensor]], names: list[str]) -> None:
    """Dataset splits as ``root/<split>/<class>/<n>.png`` (grayscale PNGs of the uint8 pixels)."""
    for split, (images, labels) in split_images.items():
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(folder / f"{i:05d}.png")


def folder_vs_torchvision(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Training batches from the same PNG folder, same timm augmentation, same loader settings: ours (uint8 items,
    each batch normalised in the consuming process, as the trainer does) vs torchvision's ImageFolder with timm's
    usual transform (ToTensor + Normalize per item)."""
    from torchvision.datasets import ImageFolder

    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=32, augment=True, crop_pct=1.0)
    ours = build_dataset(cfg, "train")
    usual = train_transform(cfg, ours.transform.mean, ours.transform.std, uint8=False)
    theirs = ImageFolder(str(root / "train"), transform=usual)
    loaders = {name: DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                persistent_workers=True) for name, ds in (("ours", ours), ("torchvision", theirs))}
    per_batch = {"ours": batch_augmentation(ours), "torchvision": None}
    torch.set_num_threads(1)  # the consuming process's share: idle intra-op threads would spin beside the workers
    rates: dict[str, list[float]] = {"ours": [], "torchvision": []}
    for name in loaders:  # warm-up: start the workers
        images_per_s(loaders[name], per_batch[name], args.batch_size)
    for i in range(args.rounds):
        for name in (("ours", "torchvision") if i % 2 == 0 else ("torchvision", "ours")):
            rates[name].append(images_per_s(loaders[name], per_batch[name], args.folder_images))
    torch.set_num_threads(os.cpu_count() or 1)
    return {"imagefolder_images_per_s": statistics.median(rates["ours"]),
            "torchvision_images_per_s": statistics.median(rates["torchvision"]),
            "imagefolder_vs_torchvision_ratio": statistics.median(
                o / t for o, t in zip(rates["ours"], rates["torchvision"])), "loader_workers": args.workers}


def divergence_check(args: argparse.Namespace, steps: int = 200) -> dict[str, float]:
    """Steps/s of a tiny model: ``bool(isfinite(loss))`` every step (before) vs :class:`DivergenceWatch` (now)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))

    def rate(per_step_sync: bool) -> float:
        watch = DivergenceWatch(torch.device("cpu"))
        started = time.perf_counter()
        for step in range(steps):
            loss = F.cross_entropy(model(x), y)
            if per_step_sync:
                assert bool(torch.isfinite(loss))
            else:
                watch.record(loss, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return steps / (time.perf_counter() - started)

    before, after = [], []
    for _ in range(args.rounds):
        before.append(rate(True))
        after.append(rate(False))
    return {"tiny_model_steps_per_s_sync_every_step": statistics.median(before),
            "tiny_model_steps_per_s_watch": statistics.median(after),
            "sync_removed_speedup": statistics.median(a / b for a, b in zip(after, before))}


def parity(root: Path, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """Tie-aware mAP of the same teacher recipe on the PNG folder and in memory (same images)."""
    common = ["teacher.backbone=resnet18", "teacher.bits=16", "data.image_size=32", "data.augment=false",
              f"data.train_limit={args.parity_train}", "teacher.float_baseline=null", "device=cpu",
              f"teacher.phase1.epochs={args.parity_epochs}", f"teacher.phase2.epochs={args.parity_epochs}"]
    in_memory = run_stages(recipe("fashion-mnist", [*common, f"data.test_limit={args.parity_test}"]),
                           work / "in-memory", ("teacher",))
    folder = run_stages(recipe("fashion-mnist", [*common, "data.dataset=imagefolder", f"data.root={root}",
                                                 "data.crop_pct=1.0", "data.num_workers=0"]),
                        work / "folder", ("teacher",))
    memory_map = in_memory["models"]["teacher"]["map_tie_aware"]
    folder_map = folder["models"]["teacher"]["map_tie_aware"]
    return {"in_memory_map_tie_aware": memory_map, "imagefolder_map_tie_aware": folder_map,
            "imagefolder_map_gap_points": 100 * abs(memory_map - folder_map)}


PARTS = ("batches", "folder", "parity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/data.json")
    parser.add_argument("--work", default="bench_out/data")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=20_000, help="in-memory images per timed pass")
    parser.add_argument("--folder-images", type=int, default=16384, help="image-folder images per timed pass")
    parser.add_argument("--workers", type=int, default=2, help="loader processes of both image-folder loaders")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parity-train", type=int, default=5000, help="training images of the parity runs")
    parser.add_argument("--parity-test", type=int, default=2000, help="test queries of the parity runs")
    parser.add_argument("--parity-epochs", type=int, default=2, help="epochs of each LLC phase in the parity runs")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="which measurements to run (batches: in-memory batches and the divergence check; folder: "
                        "image folder vs torchvision; parity); the figures of parts not run are kept from --out")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    started = time.time()
    work = Path(args.work)
    out = Path(args.out)
    figures = json.loads(out.read_text()) if out.is_file() and parts != set(PARTS) else {}  # keep the others
    if "batches" in parts:
        figures.update(in_memory_batches(args))
        figures.update(divergence_check(args))
    root = work / "png-folder"
    if parts & {"folder", "parity"} and not (root / "test").is_dir():  # the database (train + val), test queries
        cfg = DataConfig(dataset="fashion-mnist", image_size=32, test_limit=args.parity_test)
        splits = {"train": [build_dataset(cfg, "train"), build_dataset(cfg, "val")],
                  "test": [build_dataset(cfg, "test")]}
        write_png_folder(root, {name: (torch.cat([d.images for d in ds]), torch.cat([d.labels for d in ds]))
                                for name, ds in splits.items()}, splits["test"][0].class_names)
    if "folder" in parts:
        figures.update(folder_vs_torchvision(root, args))
    if "parity" in parts:
        figures.update(parity(root, work, args))
    print(figures)
    write_json(out, {**figures, "benchmark": "data", "machine": machine(), "args": vars(args),
                     "wall_seconds": time.time() - started})


if __name__ == "__main__":
    main()
