"""Shared helpers of the benchmark scripts: machine description, tables, JSON output, pipeline runs."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from hashdistill.app.pipeline import Pipeline
from hashdistill.recipe import Recipe, load_recipe
from hashdistill.rundir import RunDir


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def recipe(name: str, overrides: list[str]) -> Recipe:
    return load_recipe(name, overrides)


def run_stages(recipe: Recipe, folder: Path, stages: tuple[str, ...]) -> dict[str, Any]:
    """Run pipeline stages in ``folder`` (reusing whatever is already there) and return summary.json."""
    run = RunDir(folder)
    Pipeline(recipe, run).run_all(stages)
    return run.summary()


MODEL_NAMES = {"teacher": "teacher", "float-baseline": "float baseline"}  # checkpoint stem -> summary name


def share_checkpoints(source: Path, target: Path, stems: tuple[str, ...]) -> None:
    """Link finished stage checkpoints (``<stem>*``: a teacher's cache of views too) and, once, their figures
    into another run so it skips redoing them; a hard link where the file system allows (the files are never
    written in place: a write replaces the file), else a copy."""
    (target / "checkpoints").mkdir(parents=True, exist_ok=True)
    for stem in stems:
        for path in (source / "checkpoints").glob(f"{stem}*.safetensors"):
            copy = target / "checkpoints" / path.name
            if copy.exists() and copy.samefile(path):
                continue
            copy.unlink(missing_ok=True)
            try:
                os.link(path, copy)
            except OSError:
                shutil.copy2(path, copy)
    figures = RunDir(source, writer=False).summary().get("models", {})
    target_run = RunDir(target)
    models = target_run.summary().get("models", {})
    for stem in stems:  # only the figures of the very models copied
        name = MODEL_NAMES[stem]
        if name in figures and name not in models:
            models[name] = figures[name]
    target_run.update_summary("models", models)


def epochs_and_seconds(run_dir: Path, stages: tuple[str, ...]) -> dict[str, float]:
    records = [r for r in RunDir(run_dir, writer=False).metrics() if r.get("stage") in stages]
    return {"epochs": len(records), "wall_seconds": sum(r["epoch_seconds"] for r in records)}


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    widths = [max(len(c), *(len(cell(r.get(c, "-"))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(cell(row.get(c, "-")).ljust(w) for c, w in zip(columns, widths)))


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float))
    print(f"wrote {path}")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"
