"""Data path throughput: in-memory training batches, per item (the old loader) vs whole batches, on one core.

    python benchmarks/data.py --out benchmarks/results/data.json

Both paths produce the same thing, normalised and augmented (shift by up to 2 pixels + flip) batches of
Fashion-MNIST at 32 px through a DataLoader with no workers: the old one normalises and augments each item in
Python (what ``ImageTensorDataset.__getitem__`` did before), the new one fetches a batch in one indexing
operation (``get_batch``) and augments it with ``random_shift_flip``, as the trainer now does. One thread,
interleaved rounds, median images/s. The image-folder figures of the issue are not measured yet.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import machine, write_json
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from hashdistill.data import build_dataset, random_shift_flip
from hashdistill.recipe import DataConfig


class PerItem(torch.utils.data.Dataset):
    """The loader before this change: normalisation and augmentation in Python, one item at a time."""

    def __init__(self, base):
        self.base = base

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
        return (image - self.base.mean) / self.base.std, int(self.base.labels[index])


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/data.json")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=20_000, help="images per timed pass")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    train = build_dataset(DataConfig(dataset="fashion-mnist", image_size=32, augment=True), "train")
    per_item = DataLoader(PerItem(train), batch_size=args.batch_size, shuffle=True)
    batched = DataLoader(Batches(train), batch_size=None,
                         sampler=BatchSampler(RandomSampler(train), args.batch_size, drop_last=False))
    old, new = [], []
    for _ in range(args.rounds):
        old.append(images_per_s(per_item, None, args.images))
        new.append(images_per_s(batched, random_shift_flip, args.images))
    figures = {"per_item_images_per_s_per_core": statistics.median(old),
               "batched_aug_images_per_s_per_core": statistics.median(new)}
    figures["batched_vs_per_item"] = figures["batched_aug_images_per_s_per_core"] / figures[
        "per_item_images_per_s_per_core"]
    print(figures)
    write_json(args.out, {"benchmark": "data", "machine": machine(), "args": vars(args), **figures,
                          "imagefolder_vs_torchvision_ratio": None, "imagefolder_map_gap_points": None,
                          "wall_seconds": time.time() - started})


if __name__ == "__main__":
    main()
