"""One evaluation path for every stage: a code encoder (PyTorch model or ONNX file) -> metrics.

The encoder is any function from a dataset to code logits (n, k). Queries are the test split,
the database is the whole training set (train + val), as the benchmark protocols define;
OOD recipes add the held-out classes (``ood_val`` tunes the max-softmax baseline's threshold,
``ood_test`` measures both detectors).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm import tqdm

from hashdistill import codes, metrics
from hashdistill.data import build_dataset
from hashdistill.preprocessing import FLOAT_IN, IMAGE_IN
from hashdistill.recipe import DataConfig, EvalConfig

Encoder = Callable[[Dataset], np.ndarray]


@dataclass
class EvalSplits:
    """The datasets an evaluation reads, built once and shared by every model evaluated."""

    test: Dataset
    database: Dataset
    val: Dataset
    ood_val: Dataset | None = None
    ood_test: Dataset | None = None

    @classmethod
    def build(cls, cfg: DataConfig) -> EvalSplits:
        """``data.train_limit`` shortens training only, and ``data.labelled_fraction`` holds labels back from
        training only: the database is always the whole training set with all its labels."""
        whole = dataclasses.replace(cfg, train_limit=None, augment=False, labelled_fraction=1.0, unlabelled_root=None)
        ood = bool(cfg.ood_classes)
        val = build_dataset(whole, "val")
        database = ConcatDataset([build_dataset(whole, "train"), val])
        return cls(test=build_dataset(cfg, "test"), database=database, val=val,
                   ood_val=build_dataset(cfg, "ood_val") if ood else None,
                   ood_test=build_dataset(cfg, "ood_test") if ood else None)


def labels_of(dataset: Dataset) -> np.ndarray:
    if isinstance(dataset, ConcatDataset):
        return np.concatenate([labels_of(d) for d in dataset.datasets])
    return np.asarray(dataset.labels)


def torch_encoder(model: nn.Module, device: torch.device, batch_size: int = 256) -> Encoder:
    """Code logits of a PyTorch model, batch by batch in eval mode, channels_last like training (the faster layout
    for depthwise-separable students on a CPU)."""

    @torch.no_grad()
    def encode(dataset: Dataset) -> np.ndarray:
        model.eval().to(device, memory_format=torch.channels_last)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        quiet = not sys.stderr.isatty()
        outputs = [model(x.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
                   for x, *_ in tqdm(loader, desc="encode", disable=quiet, leave=False)]
        return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), np.float32)

    return encode


def encode_splits(encode: Encoder, splits: EvalSplits, database: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Logits of every split the metrics read; pass ``database`` to reuse (or substitute) the database codes.

    ``val`` is only needed by the OOD baseline; the database ends with the val split (see
    :meth:`EvalSplits.build`), so its codes are sliced from there rather than encoded twice.
    """
    out = {"test": encode(splits.test), "database": encode(splits.database) if database is None else database}
    if splits.ood_test is not None:
        out["val"] = out["database"][-len(splits.val):] if database is None else encode(splits.val)
        out["ood_val"], out["ood_test"] = encode(splits.ood_val), encode(splits.ood_test)
    return out


def code_metrics(logits: dict[str, np.ndarray], splits: EvalSplits, class_codes: np.ndarray,
                 cfg: EvalConfig) -> dict:
    """Retrieval (both mAP forms, the mAP re-ranked by the float queries, precision@radius, PR curve), MHD/ED
    accuracy and OOD figures."""
    bits = class_codes.shape[1]
    packed = {name: codes.pack_codes(z) for name, z in logits.items()}
    packed_classes = codes.pack_codes(class_codes)
    test_labels = labels_of(splits.test)
    result = metrics.retrieval_metrics(packed["test"], test_labels, packed["database"], labels_of(splits.database),
                                       bits, top_k=cfg.top_k, radius=cfg.radius, query_logits=logits["test"])
    result["mhd_accuracy"] = metrics.classification_accuracy(codes.mhd_decode(packed["test"], packed_classes),
                                                             test_labels)
    result["ed_accuracy"] = metrics.classification_accuracy(codes.ed_decode(packed["test"], packed_classes),
                                                            test_labels)
    result["bits"] = bits
    if "ood_test" in logits:
        exact = metrics.ood_exact_match(packed["test"], packed["ood_test"], packed_classes)
        class_logits = (logits[s] @ class_codes.T for s in ("val", "ood_val", "test", "ood_test"))
        result["ood"] = {"exact_match": exact, "msp_baseline": metrics.ood_msp_baseline(*class_logits, exact)}
    return result


def validation_accuracy(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256) -> dict:
    """MHD and ED accuracy of a hash model on the validation split (the model-selection signal), and the tie-aware
    mAP of the validation images searching among themselves (each finds itself too), for training curves."""
    z = torch_encoder(model, device, batch_size)(dataset)
    packed, classes = codes.pack_codes(z), codes.pack_codes(model.class_codes.cpu().numpy())
    labels = labels_of(dataset)
    retrieval = metrics.retrieval_metrics(packed, labels, packed, labels, z.shape[1])
    return {"val_mhd_accuracy": metrics.classification_accuracy(codes.mhd_decode(packed, classes), labels),
            "val_ed_accuracy": metrics.classification_accuracy(codes.ed_decode(packed, classes), labels),
            "val_map_tie_aware": retrieval["map_tie_aware"]}


def example_input(input_format: str, image_size: int, batch: int) -> np.ndarray:
    """A random batch in a model's input format (uint8 pixels for image-in files, normalised floats otherwise)."""
    rng = np.random.default_rng(0)
    if input_format == IMAGE_IN:
        return rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    return rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32)


def cpu_latency_ms(run_batch: Callable[[np.ndarray], object], image_size: int, batch: int, repeats: int = 5,
                   input_format: str = FLOAT_IN) -> float:
    """Median wall time (ms) of one forward pass on a random batch, after one warm-up pass."""
    import time

    images = example_input(input_format, image_size, batch)
    run_batch(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_batch(images)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)
