"""Where a run came from: the git commit of the code (and whether the tree had local changes)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from collections import Counter
from typing import Iterable, Optional


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


def mixed_versions(commits: Iterable[Optional[str]]) -> Optional[str]:
    """``3 runs at 1a2b3c4d5e, 1 at 9f8e7d6c5b+dirty``: the code versions of a sweep's runs (their
    summaries' ``git_commit``; None: unknown) when there is more than one, else None. Runs of different
    commits, or of a tree with local changes, may not be comparable: the sweeper and the analysis say so."""
    counts = Counter(_short(c) for c in commits)
    if len(counts) < 2:
        return None
    parts = [f"{n} {'run' if n == 1 else 'runs'} at {c}" if i == 0 else f"{n} at {c}"
             for i, (c, n) in enumerate(counts.most_common())]
    return ", ".join(parts)


def _short(commit: Optional[str]) -> str:
    if not commit:
        return "an unknown version"
    sha, dirty, _ = str(commit).partition("+")
    return sha[:10] + ("+dirty" if dirty else "")
