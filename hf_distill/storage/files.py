"""Writing files so that a reader never sees half of one: write beside, then rename."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

#: Suffix of a file (or folder) being written; renamed to its real name once whole.
PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield ``<path>.partial`` to write to; on success it is renamed to `path` (``os.replace``, atomic on one file
    system), on error it is removed and `path` is left as it was."""
    partial = str(path) + PARTIAL_SUFFIX
    try:
        yield partial
    except BaseException:
        if os.path.isfile(partial):
            os.remove(partial)
        raise
    os.replace(partial, path)


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write `payload` to `path` atomically."""
    with atomic_path(path) as partial:
        Path(partial).write_bytes(payload)
