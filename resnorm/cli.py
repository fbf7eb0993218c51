"""What the entry point prints and returns: one-line config errors, and a sweep's exit code."""

from __future__ import annotations

import contextlib
import sys

from .errors import ConfigError


@contextlib.contextmanager
def report_config_errors():
    """Turn a ConfigError into one line on stderr and exit status 2 (SystemExit passes through Hydra)."""
    try:
        yield
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def exit_code() -> int:
    """0 when every job of the sweep completed or diverged (a finding, not an error); else the number failed."""
    from .sweeper import LAST_OUTCOME

    failed = LAST_OUTCOME.get("failed", 0) + LAST_OUTCOME.get("unknown", 0)
    if failed:
        print(f"{failed} of {sum(LAST_OUTCOME.values())} runs failed: see their summary.json", file=sys.stderr)
    return min(failed, 125)
