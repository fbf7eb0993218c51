"""Exclusive file locks (``flock``) on lock files, the one implementation the run folders, the device
slots and the token cache use. The OS drops a lock when its process dies, even by ``kill -9``, so a
killed job never leaves a stale lock behind; a lock file itself stays (it holds nothing). Torch-free."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator, Optional


def try_lock(path: Path) -> Optional[int]:
    """Take the lock on ``path`` (created if absent) without waiting: its open descriptor (closing it
    releases the lock), or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def exclusive(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the lock on ``path`` for the ``with`` block; yields True when held. With ``wait`` it waits
    for it; without, it yields False at once when another process holds it."""
    if wait:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
    else:
        fd = try_lock(path)
        if fd is None:
            yield False
            return
    try:
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
