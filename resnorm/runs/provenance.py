"""Where a run came from: the git commit of the code (and whether the tree had local changes)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Optional


@functools.lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """``<sha>`` or ``<sha>+dirty`` for the checkout holding this package; None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha
