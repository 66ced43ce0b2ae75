"""The Ray Data path of :func:`~hashdistill.search.encode.encode_images`: the same :class:`ImageEncoder`, as
``map_batches`` actors on a local cluster or at an address. Imported only when ``--ray`` is asked for: Ray is an
optional dependency (``pip install hashdistill[ray]``), and nothing else in hashdistill imports it.

On a real cluster every node must reach the images and the output folder (a shared file system), and have the
model file at the same path; each actor opens its own copy of the model.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from hashdistill.errors import UserError

from .encode import BATCH, LOCAL, ImageEncoder

RAY_FILE_PATTERN = "*.parquet"
BLOCK_ROWS = 4 * BATCH  # rows per Ray block: small, so that every actor gets work from the start


def encode_with_ray(model: str, rows: dict[str, np.ndarray], staging: Path, address: str,
                    workers: int | None) -> tuple[list[str], list[str], dict[str, Any]]:
    """Encode ``rows`` with ``workers`` encoder actors of one CPU each; the shards are written by the workers into
    ``staging``. Returns the shard names, the skipped paths and a record of the engine."""
    try:
        import pyarrow as pa
        import ray
    except ImportError:
        raise UserError("--ray needs Ray Data: pip install 'hashdistill[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address == LOCAL:
                ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"could not reach a Ray cluster at {address}: {exc}") from None
    try:
        from ray.data import ActorPoolStrategy, DataContext
        from ray.data.expressions import col

        DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = workers or cpus
        table = pa.table({"id": pa.array(rows["id"], pa.int64()), "path": pa.array(rows["path"].tolist(), pa.string()),
                          "label": pa.array(rows["label"], pa.int64())})
        blocks = [table.slice(start, BLOCK_ROWS) for start in range(0, len(table), BLOCK_ROWS)] or [table]
        encoded = ray.data.from_arrow(blocks).map_batches(
            ImageEncoder, fn_constructor_args=(model, 1), batch_size=BATCH, batch_format="numpy",
            compute=ActorPoolStrategy(size=actors), num_cpus=1).materialize()
        skipped = [str(row["path"]) for row in encoded.select_columns(["path", "ok"]).filter(
            expr=col("ok") == False).take_all()]  # noqa: E712 - an expression, not a comparison
        encoded.filter(expr=col("ok") == True).drop_columns(["ok"]).write_parquet(str(staging))  # noqa: E712
    finally:
        if started_here:
            ray.shutdown()
    shards = sorted(p.name for p in staging.glob(RAY_FILE_PATTERN))
    return shards, skipped, {"engine": "ray", "address": address, "workers": actors, "cluster_cpus": cpus}
