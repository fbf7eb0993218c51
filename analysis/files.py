"""Atomic file writes for everything the analysis produces.

A reader (a browser showing report.md, a notebook polling summary.csv) never sees a half-written
file: each file is written to a temporary name in the same folder and then renamed into place with
``os.replace``, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary file keeps ``path``'s suffix, so writers that infer the format from the name
    (matplotlib's ``savefig``, pandas' ``to_csv`` compression) behave as for ``path``. The folder is
    created if needed. On any error the temporary file is removed and the error re-raised; an
    existing ``path`` is then left untouched. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name that the writer creates itself, so the file gets the usual permissions (umask),
    # not mkstemp's owner-only 0600
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``; returns ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
