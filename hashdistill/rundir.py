"""A run directory: the resolved recipe, metrics.jsonl, checkpoints/, summary.json and report.md.

Only rank 0 of a distributed run writes here. ``summary.json`` holds each stage's final figures
under ``summary[stage]`` (documented keys in the README); it is rewritten atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hashdistill.atomic import atomic_write_text
from hashdistill.errors import UserError
from hashdistill.recipe import RECIPE_FILE_NAME, Recipe, dump_recipe

STAGES = ("teacher", "bits-sweep", "student", "quantize", "export", "index")  # in the order a run does them
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"


class RunDir:
    """Paths and append-only logs of one run."""

    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        if writer:
            self.checkpoints.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / f"{name}.safetensors"

    def save_recipe(self, recipe: Recipe) -> None:
        if self.writer:
            atomic_write_text(self.path / RECIPE_FILE_NAME, dump_recipe(recipe))

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl."""
        if self.writer:
            with open(self.path / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(record, default=float) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def drop_metrics_after(self, stage: str, epoch: int) -> None:
        """On resume, forget epoch lines of ``stage`` that the restored checkpoint does not include."""
        if not self.writer:
            return
        kept = [r for r in self.metrics() if not (r.get("stage") == stage and r.get("epoch", -1) > epoch)]
        atomic_write_text(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))

    def summary(self) -> dict[str, Any]:
        path = self.path / SUMMARY_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is corrupt ({exc})") from None

    def update_summary(self, stage: str, figures: dict[str, Any]) -> None:
        if self.writer:
            summary = self.summary()
            summary[stage] = figures
            atomic_write_text(self.path / SUMMARY_FILE, json.dumps(summary, indent=2, default=float))
