"""Weights & Biases logging, kept behind one small class so training never depends on it.

``logger.mode=offline`` (the default) needs no account or network: runs are written under the job's
folder (``<job>/wandb/``) and can be uploaded later with ``wandb sync``. ``online`` logs live;
``disabled`` (or ``logger.wandb=false``) turns W&B off. The run store is written either way.

Hydra's launchers reuse processes, so the run is opened with ``reinit="finish_previous"``: an
unfinished run never swallows the next job. If W&B fails (not installed, unreachable, broken), the
error is reported once and training goes on with the local run store alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)


class WandbTracker:
    def __init__(self, logger_cfg, run_dir: Path, group: str, name: str, config: Dict[str, Any],
                 run_id: Optional[str] = None, tags=None):
        self.cfg, self.run_dir, self.group, self.name = logger_cfg, Path(run_dir), group, name
        self.config, self.run_id, self.tags = config, run_id, list(tags or [])
        self.run = None
        self.error: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.wandb) and self.cfg.mode != "disabled"

    def __enter__(self) -> "WandbTracker":
        if not self.enabled:
            return self
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=self.cfg.project, entity=self.cfg.entity, group=self.group, name=self.name,
                config=self.config, dir=str(self.run_dir), mode=self.cfg.mode, id=self.run_id,
                resume="allow" if self.run_id else None, tags=self.tags, reinit="finish_previous",
                settings=wandb.Settings(console="off", x_disable_stats=True, x_disable_machine_info=True),
            )
        except Exception as exc:  # W&B must never take a run down with it
            self._fail("init", exc)
        return self

    def _fail(self, where: str, exc: Exception) -> None:
        self.error = f"wandb {where} failed: {type(exc).__name__}: {exc}"
        log.warning("%s; training goes on, the run store stays complete", self.error)
        self.run = None

    def log(self, data: Dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data, step=step)
        except Exception as exc:
            self._fail("log", exc)

    def summary(self, data: Dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(data)
        except Exception as exc:
            self._fail("summary", exc)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=0 if exc_type is None else 1)
        except Exception as err:
            self._fail("finish", err)
        self.run = None
