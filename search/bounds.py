"""What a file a user hands us may cost once read, bounded before anything inflates: by the file's own size on
disk and by the memory available.

A compressed member of an ``.npz`` index, or a Parquet shard of codes, declares how large it inflates, and a few
megabytes of zeros can declare gigabytes that agree with one another (a 3.2 MB index whose members all declare
the same rows took 4.6 GB; a 587 KB shard declared 40M rows). So the declared bytes are compared, from headers and
metadata alone, with :data:`MAX_INFLATION` times the file's size plus :data:`ALLOWANCE`, and with the free memory.

Why 100x: hashdistill stores its index members uncompressed (ratio 1.0), and deflated copies of real indexes
measured 11x to 19x (6,000 to 20,000 codes, all-zero codes and no paths included: a row's distinct int64 id
deflates only about 5x); its Parquet shards decode to 3x to 5x their size. Deflate itself stops near 1032x, so a
cap of 1000x would stop no deflate bomb. :data:`ALLOWANCE` lets any small file through whatever its ratio.
"""

from __future__ import annotations

import os
from pathlib import Path

from hashdistill.errors import UserError
from hashdistill.untrusted import short

MAX_INFLATION = 100  # declared bytes per byte of the file on disk
ALLOWANCE = 64 * 2**20  # declared bytes any file may hold, whatever its size


def check_declared(path: str | os.PathLike, declared: dict[str, int], copies: int = 0) -> None:
    """Refuse ``path`` unless the bytes its parts ``declared`` (name -> bytes once read) fit the ratio cap and,
    with ``copies`` (bytes the loader duplicates), the memory available. Every part and their sum are bounded:
    the sum is checked, and the message names the largest part."""
    size = Path(path).stat().st_size
    total = sum(declared.values())
    limit = MAX_INFLATION * size + ALLOWANCE
    if total > limit:
        largest = max(declared, key=declared.get)
        raise UserError(f"{path} declares {total:,} bytes once inflated ('{short(largest)}': "
                        f"{declared[largest]:,}), more than {MAX_INFLATION} times its {size:,} bytes on disk "
                        f"(+ {ALLOWANCE // 2**20} MiB): a decompression bomb or a damaged file; it is not read")
    check_memory(path, total + copies)


def check_memory(path: str | os.PathLike, needed: int) -> None:
    """Refuse ``path`` when loading it would take ``needed`` bytes and less memory is available."""
    available = available_memory()
    if available is not None and needed > available:
        raise UserError(f"{path} needs about {needed / 2**30:.1f} GiB of memory to load, and "
                        f"{available / 2**30:.1f} GiB are available; load it on a larger machine or split it "
                        "into shards")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
