"""What the entry point prints and returns: one-line config errors, the ``--dry-run`` flag, and a
sweep's exit code.

Importing this module registers the ``${run_id:}`` resolver (the job folder's name in a sweep,
see :mod:`resnorm.identity`): ``run.py`` imports it, and so does every process that unpickles
``run.py``'s task function (the parallel, SLURM and Ray launchers' workers).
"""

from __future__ import annotations

import contextlib
import sys
from typing import List

from .errors import ConfigError
from .identity import register_resolver

register_resolver()

DRY_RUN_FLAG = "--dry-run"


@contextlib.contextmanager
def report_config_errors():
    """Turn a ConfigError into one line on stderr and exit status 2 (SystemExit passes through Hydra)."""
    try:
        yield
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def expand_flags(argv: List[str]) -> List[str]:
    """``--dry-run`` is ``-m ... hydra.sweeper.dry_run=true``: print the job table, launch nothing."""
    if DRY_RUN_FLAG not in argv:
        return list(argv)
    out = [a for a in argv if a != DRY_RUN_FLAG]
    if not any(a in ("-m", "--multirun") for a in out[1:]):
        out.insert(1, "-m")
    return out + ["hydra.sweeper.dry_run=true"]


def exit_code() -> int:
    """0 when every job of the sweep completed or diverged (a finding, not an error); else the number failed."""
    from .sweeper import LAST_OUTCOME

    failed = LAST_OUTCOME.get("failed", 0) + LAST_OUTCOME.get("unknown", 0)
    if failed:
        print(f"{failed} of {sum(LAST_OUTCOME.values())} runs failed: see their summary.json", file=sys.stderr)
    return min(failed, 125)
