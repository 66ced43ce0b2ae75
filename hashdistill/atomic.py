"""Atomic file writes, with no heavy imports (the torch-free edge side writes models and indexes too).

Write a temporary file in the target folder, fsync, rename over the target: readers see the old
file or the new one, never half of one, and a crash mid-write leaves the old file intact. The file
gets the usual permissions (0666 minus the umask), not the private 0600 of a temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write_to: Callable[[str], object]) -> Path:
    """Call ``write_to(tmp_path)`` to fill a temporary file, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.close(fd)
        write_to(tmp)
        # After the write: some writers (safetensors) replace the file and with it the mode set on the fd.
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
