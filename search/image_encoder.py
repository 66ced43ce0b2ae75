"""The unit of encoding work: a callable class in the form Ray Data's ``map_batches`` takes, used as it is by the
in-process path (:mod:`.encode`) and by Ray's actors (:mod:`.ray_encode`), so both give the same codes bit for bit.
"""

from __future__ import annotations

import numpy as np

from hashdistill import codes as hc
from hashdistill.errors import UserError

from .sources import open_encoder

BATCH = 64  # images per encoder call


class ImageEncoder:
    """Images -> packed codes for Ray Data's ``map_batches`` (and the in-process path): ``{id, path, label}``
    columns in, the same with ``code`` (one bytes object per row) and ``ok`` (False: the file could not be
    decoded) out. ``threads``: onnxruntime's threads per encoder (1 when several actors share the cores)."""

    def __init__(self, model: str, threads: int | None = None):
        self.encoder = open_encoder(model, threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        codes, ok = encode_or_skip(self.encoder, paths)
        return {"id": batch["id"], "path": np.array(paths, dtype=object), "label": batch["label"],
                "code": np.array([row.tobytes() for row in codes], dtype=object), "ok": ok}


def encode_or_skip(encoder, items: list) -> tuple[np.ndarray, np.ndarray]:
    """Packed codes of ``items`` and which of them could be decoded (a damaged file's row stays zero): the rule
    every encoding path follows, so one damaged file never stops an image set."""
    ok = np.ones(len(items), dtype=bool)
    codes = np.zeros((len(items), hc.packed_width(encoder.bits)), dtype=np.uint8)
    try:
        codes[:] = encoder.encode(items)
    except UserError:  # a file of the batch is damaged: find it, encode the rest one by one
        for i, item in enumerate(items):
            try:
                codes[i] = encoder.encode([item])[0]
            except UserError:
                ok[i] = False
    return codes, ok
