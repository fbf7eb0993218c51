"""Hydra plugin: the resnorm sweeper (Hydra only loads plugins from the ``hydra_plugins`` package).

Hydra's basic sweeper, with every job validated before any job runs, and the outcome counted.
A typo'd key is already caught by Hydra when it composes each job; a bad value (``depth=0``, an
unknown variant) is caught here, so a sweep never trains half its grid before failing on the rest.
"""

from __future__ import annotations

import sys
from typing import Any, List, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import open_dict

from resnorm.config import validate
from resnorm.errors import ConfigError
from resnorm.sweeper import LAST_OUTCOME


class ValidatingSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Compose every job of the batch (as Hydra does) and validate its values."""
        for overrides in batch:
            cfg = self.hydra_context.config_loader.load_sweep_config(
                master_config=self.config, sweep_overrides=list(overrides))
            with open_dict(cfg):
                del cfg["hydra"]
            try:
                validate(cfg)
            except ConfigError as err:
                # one line, before any job has run (SystemExit passes through Hydra's error report)
                print(f"config error: {err} (job: {' '.join(overrides)})", file=sys.stderr)
                raise SystemExit(2) from None

    def sweep(self, arguments: List[str]) -> Any:
        LAST_OUTCOME.clear()
        returns = super().sweep(arguments)
        for batch in returns:
            for ret in batch:
                value = ret.return_value
                LAST_OUTCOME[value.get("status", "unknown") if isinstance(value, dict) else "unknown"] += 1
        return returns
