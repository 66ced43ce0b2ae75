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
MARKER_FILE = ".hashdistill-run"  # written into every run directory: the entries the run wrote, all `--force` removes
MARKER_FORMAT = "hashdistill-run"
TEMP_SUFFIX = ".tmp"  # hashdistill.atomic's temporary files: .<name>.<random>.tmp
STAGING_SUFFIX = ".export-staging"  # the folder an export verifies its file in: .<file>.<random>.export-staging


def owned_entries(path: str | Path) -> list[str] | None:
    """The entries (paths relative to the run directory) its marker lists as written by hashdistill; None where
    there is no marker hashdistill wrote (an empty marker is a run of an older hashdistill, which listed nothing)."""
    from hashdistill.untrusted import parse_json

    marker = Path(path) / MARKER_FILE
    try:
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 4 * 1024 * 1024:
            return None
        record = parse_json(marker.read_text(), str(marker))
    except (UserError, OSError, UnicodeDecodeError):
        return None
    entries = record.get("entries") if isinstance(record, dict) and record.get("format") == MARKER_FORMAT else None
    if not isinstance(entries, list) or not all(isinstance(e, str) and _inside(e) for e in entries):
        return None
    return entries


def _inside(entry: str) -> bool:
    """A relative path that stays inside the run directory (a hostile marker cannot name ../ or /etc)."""
    parts = Path(entry).parts
    return bool(parts) and not Path(entry).is_absolute() and ".." not in parts and MARKER_FILE not in parts


def is_run_dir(path: str | Path) -> bool:
    """True for a folder whose marker says hashdistill wrote it (a recipe.yaml and checkpoints/ alone do not)."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and owned_entries(path) is not None


def clear_run_dir(path: Path) -> list[str]:
    """Remove what the run directory's marker lists (sub-runs of bits-sweep/ by their own markers), the temporary
    files and staging folders of killed writes, and the marker; returns the entries kept: everything else, which
    hashdistill did not write. Its checkpoints/ and bits-sweep/ go too when left empty (the folder itself stays:
    the caller knows whether hashdistill made it)."""
    import shutil

    for entry in owned_entries(path) or []:
        target = path / entry
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif is_run_dir(target):
            clear_run_dir(target)
    for stale in stale_temp_files(path):
        stale.unlink(missing_ok=True)
    for staging in path.glob(f".*{STAGING_SUFFIX}"):
        if staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)
    (path / MARKER_FILE).unlink(missing_ok=True)
    for folder in (path / SWEEP_DIR, path / CHECKPOINTS_DIR):
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def stale_temp_files(path: Path) -> list[Path]:
    """The temporary files killed writes left in a run directory and its checkpoints/ (SIGKILL runs no cleanup)."""
    return [p for folder in (path, path / CHECKPOINTS_DIR) if folder.is_dir() and not folder.is_symlink()
            for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file() and not p.is_symlink()]


class RunDir:
    """Paths and append-only logs of one run."""

    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.created = False  # set by whoever made the folder: only then may discard() remove the folder itself
        self._owned: list[str] = []
        if writer:
            if self.path.exists() and not self.path.is_dir():
                raise UserError(f"{self.path} is a file; a run directory must be a folder (choose another --out)")
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            self._owned = owned_entries(self.path) or []
            self._write_marker()

    def claim(self, *entries: str) -> None:
        """Record entries (paths relative to this run directory) as written by hashdistill, before they are
        written: the marker lists them, and they are all that ``--force`` removes."""
        new = [e for e in dict.fromkeys(entries) if e not in self._owned]
        if self.writer and new:
            self._owned += new
            self._write_marker()

    def output(self, name: str) -> Path:
        """The path of a file the run writes at its top (a report, a plot, a model, an index), claimed."""
        self.claim(name)
        return self.path / name

    def _write_marker(self) -> None:
        atomic_write_text(self.path / MARKER_FILE, json.dumps({"format": MARKER_FORMAT, "entries": self._owned}))

    def discard(self) -> None:
        """Undo a fresh run that saved nothing: remove what hashdistill wrote, and the folder if it made it."""
        clear_run_dir(self.path)
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temporary files a killed write left (SIGKILL runs no cleanup); returns them.

        Only on resume, by the one process that owns the run: no other writer can be mid-write then.
        """
        stale = stale_temp_files(self.path)
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint(self, name: str) -> Path:
        """The path of checkpoint ``name``, claimed (a stage asks for it before it writes or reads it)."""
        self.claim(f"{CHECKPOINTS_DIR}/{name}.safetensors")
        return self.checkpoints / f"{name}.safetensors"

    def save_recipe(self, recipe: Recipe) -> None:
        if self.writer:
            atomic_write_text(self.output(RECIPE_FILE_NAME), dump_recipe(recipe))

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (after cutting a line a kill left half-written)."""
        if self.writer:
            path = self.output(METRICS_FILE)
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
            atomic_write_text(self.output(SUMMARY_FILE), json.dumps(summary, indent=2, default=float))


def _ends_torn(path: Path) -> bool:
    """Whether a log file's last line lacks its newline (a kill mid-append); reads one byte."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) != b"\n"
