"""Reading the arrays of an ``.npz`` file a user hands us, without trusting what it says about their sizes.

``np.load`` inflates a member whole before anyone can look at it: a 2 MB file whose member decompresses to
2 GB costs 2 GB (twice, for a copy) before a length check can refuse it. Here each member's ``.npy`` header (its
dtype and shape, a few hundred bytes at the start of the member) is read first, and nothing is decompressed
until the caller has compared the declared shapes with each other, with the file's size and with the memory
available (:mod:`.bounds`). A member must then hold exactly what its header declares (the zip entry's size says so
too), and reading it stops there: no member inflates past its declared size.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from hashdistill.errors import UserError
from hashdistill.untrusted import short

MAX_HEADER_BYTES = 10_000  # numpy's own default limit on a .npy header


@dataclass(frozen=True)
class Member:
    """What one member of the archive declares about itself."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_headers(path: str | os.PathLike) -> dict[str, Member]:
    """The declared dtype and shape of every ``<name>.npy`` member, from the headers alone."""
    members = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename.removesuffix(".npy")
                with archive.open(info) as fh:
                    version = npy.read_magic(fh)
                    shape, fortran, dtype = _header(fh, version)
                    offset = fh.tell()
                member = Member(name, tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran))
                if member.dtype.hasobject:
                    raise UserError(f"{path}: member '{short(name)}' holds Python objects; an index holds none")
                if info.file_size != offset + member.nbytes:
                    raise UserError(f"{path}: member '{short(name)}' declares {member.shape} {member.dtype} "
                                    f"({member.nbytes:,} bytes) but its zip entry holds {info.file_size:,} bytes")
                members[name] = member
    except UserError:
        raise
    except Exception as exc:  # zipfile, zlib and numpy raise a variety of errors on damaged files
        raise UserError(f"{path} is not a readable index (truncated or corrupt?): {short(str(exc))}") from None
    return members


def _header(fh, version: tuple[int, int]):
    if version == (1, 0):
        return npy.read_array_header_1_0(fh, max_header_size=MAX_HEADER_BYTES)
    if version in ((2, 0), (3, 0)):
        return npy.read_array_header_2_0(fh, max_header_size=MAX_HEADER_BYTES)
    raise ValueError(f"unknown .npy format version {version}")


def read_arrays(path: str | os.PathLike, members: dict[str, Member]) -> dict[str, np.ndarray]:
    """The arrays of ``members`` (checked by the caller), each read no further than its declared size."""
    arrays = {}
    try:
        with zipfile.ZipFile(Path(path)) as archive:
            for name, member in members.items():
                with archive.open(f"{name}.npy") as fh:
                    arrays[name] = npy.read_array(fh, allow_pickle=False, max_header_size=MAX_HEADER_BYTES)
                if arrays[name].shape != member.shape or arrays[name].dtype != member.dtype:
                    raise ValueError(f"member '{name}' changed between two reads")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path} is not a readable index (truncated or corrupt?): {short(str(exc))}") from None
    return arrays
