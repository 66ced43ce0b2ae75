"""Messages to the user that are not errors: one line each on stderr, ``hashdistill: warning: ...``.

Not Python's ``warnings``: those print the source line that raised them and are filtered by Python's own rules;
a user reading a long run's output wants one line that says what happened and to which files.
"""

from __future__ import annotations

import sys

FIRST_FILES = 3  # how many of the files concerned a message names


def warn(message: str) -> None:
    """Print one warning line to stderr (a message's newlines are folded)."""
    print(f"hashdistill: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def name_some(items: list, total: int | None = None) -> str:
    """The first few of ``items`` and how many there are: 'a, b, c and 4 more'."""
    total = len(items) if total is None else total
    shown = ", ".join(str(item) for item in items[:FIRST_FILES])
    return shown if total <= FIRST_FILES else f"{shown} and {total - FIRST_FILES} more"
