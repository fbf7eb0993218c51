"""Hydra callback: make the sweep's report when a multirun ends.

Registered by the training side in the Hydra config::

    hydra:
      callbacks:
        analysis:
          _target_: analysis.callback.AnalysisCallback
          out_root: results

At the end of a multirun it reads the sweep folder (``hydra.sweep.dir``) and writes the report into
``<out_root>/<basename of the sweep folder>`` (see :func:`analysis.report.make_report`). Relative
paths are resolved against the directory the sweep was launched from (``hydra.runtime.cwd`` when
the config has it, else the launching process's working directory, which Hydra restores after
each job). The callback never raises: a failed analysis is logged with its traceback and the sweep's
exit is unaffected.

This module imports only Hydra and the standard library at import time (it is imported at the start
of every sweep); pandas and matplotlib are imported when the report is made.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, List, Optional

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)


def _select(config: Any, key: str) -> Optional[str]:
    """``config``'s dotted ``key`` as a string, None if absent or unresolvable."""
    try:
        from omegaconf import OmegaConf

        value = OmegaConf.select(config, key, throw_on_missing=False)
    except Exception:  # noqa: BLE001  # an interpolation that cannot resolve: treat as absent
        return None
    return None if value is None else str(value)


class AnalysisCallback(Callback):
    """Writes ``make_report(sweep_dir, out_root / basename(sweep_dir))`` in ``on_multirun_end``."""

    def __init__(self, out_root: str = "results", enabled: bool = True) -> None:
        self.out_root = str(out_root)
        self.enabled = bool(enabled)

    def paths(self, config: Any) -> tuple:
        """``(sweep_dir, out_dir)`` for this multirun's config, both absolute."""
        base = Path(_select(config, "hydra.runtime.cwd") or os.getcwd())
        sweep = _select(config, "hydra.sweep.dir")
        if not sweep:
            raise ValueError("the config has no hydra.sweep.dir")
        sweep_dir = base / sweep  # an absolute sweep dir replaces base
        return sweep_dir, base / self.out_root / sweep_dir.name

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if not self.enabled:
            log.info("analysis callback disabled: no report")
            return
        from resnorm.runs.progress import LAST_OUTCOME

        if LAST_OUTCOME.get("running"):  # the same sweep started twice: the process training them reports
            log.warning("analysis skipped: %d runs are being trained by another process, which makes the "
                        "report when it ends", LAST_OUTCOME["running"])
            return
        try:
            sweep_dir, out_dir = self.paths(config)
            from analysis.report import make_report

            written: List[Path] = make_report(sweep_dir, out_dir)
            log.info("analysis of %s: wrote %s", sweep_dir, ", ".join(str(p) for p in written))
        except Exception:  # noqa: BLE001  # analysis must never fail the sweep
            log.exception("analysis of the sweep failed; the runs are intact, retry with "
                          "`python -m analysis <sweep dir>`")
