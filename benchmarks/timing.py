"""The latency protocol of every benchmark that times onnxruntime: sessions taking turns run by run, a warm-up,
then the median and the interquartile range of each session's timed runs.

Turns, because the machine's load drifts over minutes: each file then meets the same load, so ratios hold.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

RUNS = 200  # the protocol's least number of timed runs
WARMUP = 10


def timing_session(model: Path | bytes, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session with ``threads`` intra-op threads (0: onnxruntime's default) and no idle
    spinning: a spinning session's threads would slow the next one's runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


def interleaved_stats(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray], runs: int = RUNS,
                      warmup: int = WARMUP) -> dict[str, dict[str, float]]:
    """Median and quartiles (ms) of each session's runs on ``feed``, the sessions taking turns run by run."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for step in range(warmup + runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            if step >= warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: quartiles(values) for name, values in times.items()}


def quartiles(values: Sequence[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"median_ms": values[0], "q1_ms": values[0], "q3_ms": values[0], "runs": len(values)}
    q1, median, q3 = statistics.quantiles(values, n=4)
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "runs": len(values)}
