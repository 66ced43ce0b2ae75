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
CHECKPOINTS_DIR, SWEEP_DIR, INDEX_FILE = "checkpoints", "bits-sweep", "index.npz"
PR_PLOT, TAXONOMY_PLOT, BITS_PLOT = "pr_curves.png", "taxonomy.png", "bits_sweep.png"
CURVES_PLOT = "training_curves.png"
DEMO_SHOT = "demo.png"  # a screenshot of the run's demo page (hashdistill demo --screenshot)
MARKER_FILE = ".hashdistill-run"  # written into every run directory: what `--force` may replace
# What a run directory written before the marker existed may hold (anything else: not ours to delete).
LEGACY_ENTRIES = {RECIPE_FILE_NAME, METRICS_FILE, SUMMARY_FILE, REPORT_FILE, CHECKPOINTS_DIR, SWEEP_DIR, INDEX_FILE,
                  PR_PLOT, TAXONOMY_PLOT, BITS_PLOT, CURVES_PLOT, DEMO_SHOT}
TEMP_SUFFIX = ".tmp"  # hashdistill.atomic's temporary files: .<name>.<random>.tmp
STAGING_SUFFIX = ".export-staging"  # the folder an export verifies its file in: .<file>.<random>.export-staging


def is_run_dir(path: str | Path) -> bool:
    """True for a folder hashdistill wrote and nothing else did: it has the marker (or, for runs older than the
    marker, a recipe.yaml and checkpoints/), and holds only what a run writes (:func:`foreign_entries`)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    names = {entry.name for entry in path.iterdir()}
    ours = MARKER_FILE in names or (RECIPE_FILE_NAME in names and (path / CHECKPOINTS_DIR).is_dir())
    return ours and not foreign_entries(path)


def foreign_entries(path: Path) -> list[str]:
    """Entries of a run directory that a run does not write: a user's files there make it theirs.

    A run writes the files named in LEGACY_ENTRIES (and its ONNX model and temporary files) at the top,
    checkpoints and temporary files in checkpoints/, and run directories of their own under bits-sweep/.
    """
    foreign = []
    for entry in path.iterdir():
        name = entry.name
        if entry.is_symlink():
            foreign.append(name)
        elif name == CHECKPOINTS_DIR and entry.is_dir():
            foreign += [f"checkpoints/{p.name}" for p in entry.iterdir()
                        if p.is_symlink() or not p.is_file() or not p.name.endswith((".safetensors", TEMP_SUFFIX))]
        elif name == SWEEP_DIR and entry.is_dir():
            foreign += [f"bits-sweep/{p.name}" for p in entry.iterdir() if not is_run_dir(p)]
        elif entry.is_dir() and name.startswith(".") and name.endswith(STAGING_SUFFIX):
            continue  # a killed export's staging folder
        elif not (name in LEGACY_ENTRIES or name == MARKER_FILE or name.endswith(".onnx")
                  or name.endswith(TEMP_SUFFIX)) or entry.is_dir() != (name in (CHECKPOINTS_DIR, SWEEP_DIR)):
            foreign.append(name)
    return foreign


class RunDir:
    """Paths and append-only logs of one run."""

    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.created = False  # set by whoever made the folder: only then may discard() remove the folder itself
        if writer:
            if self.path.exists() and not self.path.is_dir():
                raise UserError(f"{self.path} is a file; a run directory must be a folder (choose another --out)")
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            (self.path / MARKER_FILE).touch()

    def discard(self) -> None:
        """Undo a fresh run that saved nothing: remove what hashdistill wrote, and the folder if it made it."""
        import shutil

        for name in (*LEGACY_ENTRIES, MARKER_FILE):
            entry = self.path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.exists() or entry.is_symlink():
                entry.unlink(missing_ok=True)
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temporary files a killed write left (SIGKILL runs no cleanup); returns them.

        Only on resume, by the one process that owns the run: no other writer can be mid-write then.
        """
        stale = [p for folder in (self.path, self.checkpoints) if folder.is_dir()
                 for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / f"{name}.safetensors"

    def save_recipe(self, recipe: Recipe) -> None:
        if self.writer:
            atomic_write_text(self.path / RECIPE_FILE_NAME, dump_recipe(recipe))

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (after cutting a line a kill left half-written)."""
        if self.writer:
            path = self.path / METRICS_FILE
            if _ends_torn(path):
                text = path.read_text()
                atomic_write_text(path, text[: text.rfind("\n") + 1])
            with open(path, "a") as fh:
                fh.write(json.dumps(record, default=float) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        """The logged records. A torn last line (a kill mid-append) is dropped; a damaged earlier line is an error."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        text = path.read_text(errors="replace")
        lines = text.splitlines()
        if text and not text.endswith("\n"):
            lines = lines[:-1]  # the epoch it would record is replayed on resume
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                record = None
            if not isinstance(record, dict):
                raise UserError(f"{path}: line {number} is not a metrics record; the file is damaged")
            records.append(record)
        return records

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


def _ends_torn(path: Path) -> bool:
    """Whether a log file's last line lacks its newline (a kill mid-append); reads one byte."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) != b"\n"
