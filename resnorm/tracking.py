"""Weights & Biases logging, kept behind one small class so training never depends on it.

``logger.mode=offline`` (the default) needs no account or network: runs are written under the job's
folder (``<job>/wandb/``) and can be uploaded later with ``wandb sync``. ``online`` logs live;
``disabled`` (or ``logger.wandb=false``) turns W&B off. The run store is written either way.

Hydra's launchers reuse processes, so the run is opened with ``reinit="finish_previous"``: an
unfinished run never swallows the next job. If W&B fails (not installed, unreachable, broken), the
error is reported once and training goes on with the local run store alone.

Runs of one sweep share a W&B group (the sweep's ``name``); the job type is the variant and the
tags are the variant and the depth. The W&B run id is the job's identity (``run_id``, see
:mod:`resnorm.identity`), opened with ``resume="allow"``: a resumed job continues the same W&B run
(W&B keeps each step once: the steps a resumed run logs again were logged before with the same
values). Under a W&B sweep agent (``WANDB_SWEEP_ID`` set) the agent names the run instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)


class WandbTracker:
    def __init__(self, logger_cfg, run_dir: Path, group: str, name: str, config: Dict[str, Any],
                 run_id: Optional[str] = None, tags=None, job_type: Optional[str] = None,
                 enabled: bool = True):
        self.cfg, self.run_dir, self.group, self.name = logger_cfg, Path(run_dir), group, name
        self.config, self.tags, self.job_type = config, list(tags or []), job_type
        # under a sweep agent, the agent's run id (WANDB_RUN_ID) names the run
        self.requested_id = None if os.environ.get("WANDB_SWEEP_ID") else run_id
        self.run = None
        self.run_id: Optional[str] = None  # the id of the W&B run once open
        self.error: Optional[str] = None
        self._wanted = enabled

    @property
    def enabled(self) -> bool:
        return self._wanted and bool(self.cfg.wandb) and self.cfg.mode != "disabled"

    def __enter__(self) -> "WandbTracker":
        if not self.enabled:
            return self
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=self.cfg.project, entity=self.cfg.entity, group=self.group, name=self.name,
                config=self.config, dir=str(self.run_dir), mode=self.cfg.mode, id=self.requested_id,
                resume="allow" if self.requested_id else None, tags=self.tags, job_type=self.job_type,
                reinit="finish_previous",
                settings=wandb.Settings(console="off", x_disable_stats=True, x_disable_machine_info=True),
            )
            self.run_id = self.run.id
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
