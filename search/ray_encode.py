"""The Ray Data path of :func:`~hashdistill.search.encode.encode_images`: the same :class:`ImageEncoder`, as
``map_batches`` actors on a local cluster or at an address. Imported only when ``--ray`` is asked for: Ray is an
optional dependency (``pip install hashdistill[ray]``), and nothing else in hashdistill imports it.

Where it runs, as a cluster user expects: ``--ray ADDRESS`` connects to that cluster (``auto``: the one ``ray
start`` began on this machine); ``--ray`` alone connects to ``RAY_ADDRESS`` when that is set, else starts a local
cluster of this machine's CPUs. A ``host:port`` address is probed with a plain TCP connection first, so nothing
listening is an error within seconds (Ray itself retries for minutes). Ray's own log lines stay off the
terminal unless ``verbose``.

On a real cluster every node must reach the images and the output folder (a shared file system), and have the
model file at the same path; each actor opens its own copy of the model.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from hashdistill.errors import UserError

from .image_encoder import BATCH, ImageEncoder

LOCAL = "local"  # --ray without an address: RAY_ADDRESS if set, else a local cluster on this machine
PROBE_TIMEOUT_S = 5.0
LOCAL_START_ATTEMPTS = 2
RAY_FILE_PATTERN = "*.parquet"
BLOCK_ROWS = 4 * BATCH  # rows per Ray block: small, so that every actor gets work from the start


def encode_with_ray(model: str, rows: dict[str, np.ndarray], staging: Path, address: str,
                    workers: int | None, verbose: bool = False) -> tuple[list[str], list[str], dict[str, Any]]:
    """Encode ``rows`` with ``workers`` encoder actors of one CPU each; the shards are written by the workers into
    ``staging``. Returns the shard names, the skipped paths and a record of the engine."""
    try:
        import pyarrow as pa
        import ray
    except ImportError:
        raise UserError("--ray needs Ray Data: pip install 'hashdistill[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        _connect(ray, resolve_address(address), workers, verbose)
    with warnings.catch_warnings():
        if not verbose:  # Ray Data's advice on concurrency and deprecations is for its own developers
            warnings.simplefilter("ignore")
        return _encode(ray, pa, model, rows, staging, address, workers, started_here, verbose)


def _encode(ray, pa, model: str, rows: dict[str, np.ndarray], staging: Path, address: str,  # noqa: ANN001
            workers: int | None, started_here: bool, verbose: bool) -> tuple[list[str], list[str], dict[str, Any]]:
    try:
        from ray.data import ActorPoolStrategy, DataContext
        from ray.data.expressions import col

        DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
        logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = workers or cpus
        table = pa.table({"id": pa.array(rows["id"], pa.int64()), "path": pa.array(rows["path"].tolist(), pa.string()),
                          "label": pa.array(rows["label"], pa.int64())})
        blocks = [table.slice(start, BLOCK_ROWS) for start in range(0, len(table), BLOCK_ROWS)] or [table]
        encoded = ray.data.from_arrow(blocks).map_batches(
            ImageEncoder, fn_constructor_args=(model, 1), batch_size=BATCH, batch_format="numpy",
            compute=ActorPoolStrategy(size=actors), num_cpus=1,
            max_restarts=0).materialize()  # (restartable actors make Ray log an "E core_worker" line per actor)
        skipped = [str(row["path"]) for row in encoded.select_columns(["path", "ok"]).filter(
            expr=col("ok") == False).take_all()]  # noqa: E712 - an expression, not a comparison
        encoded.filter(expr=col("ok") == True).drop_columns(["ok"]).write_parquet(str(staging))  # noqa: E712
    finally:
        if started_here:
            ray.shutdown()
    shards = sorted(p.name for p in staging.glob(RAY_FILE_PATTERN))
    return shards, skipped, {"engine": "ray", "address": address, "workers": actors, "cluster_cpus": cpus}


def resolve_address(address: str) -> str | None:
    """The cluster to connect to: the address given, ``RAY_ADDRESS`` for ``--ray`` alone, or None (start one)."""
    if address != LOCAL:
        return address
    return os.environ.get("RAY_ADDRESS") or None


def probe(address: str) -> None:
    """A UserError within PROBE_TIMEOUT_S when nothing listens at a ``host:port`` (or ``ray://host:port``) address."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray resolves them itself, quickly
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(f"could not reach a Ray cluster at {address}: {exc.strerror or exc} (is it running? "
                        "start one with `ray start --head`, or use --ray alone for a local cluster)") from None


def _connect(ray, address: str | None, workers: int | None, verbose: bool) -> None:  # noqa: ANN001 - the ray module
    """ray.init for a new local cluster (this machine's CPUs) or an existing one (which sets its own CPUs)."""
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    try:
        if address is None:
            _start_local(ray, workers or os.cpu_count(), quiet)
        else:
            probe(address)
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"could not reach a Ray cluster at {address or 'a new local cluster'}: {exc}") from None


def _start_local(ray, cpus: int, quiet: dict[str, Any]) -> None:  # noqa: ANN001 - the ray module
    """A local cluster, started again once if its node misses Ray's fixed 30-s start-up wait (a loaded machine;
    Ray raises a bare Exception then)."""
    for attempt in range(LOCAL_START_ATTEMPTS):
        try:
            ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
            return
        except Exception as exc:  # noqa: BLE001 - Ray's start-up timeout is a plain Exception
            if "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            if attempt + 1 == LOCAL_START_ATTEMPTS:
                raise UserError(f"a local Ray cluster did not start in {LOCAL_START_ATTEMPTS} tries ({exc}); is the "
                                "machine overloaded?") from None
