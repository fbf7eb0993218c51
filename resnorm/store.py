"""The run folder, the local source of truth for one job.

Files (all written atomically: to a temporary name in the same folder, then ``os.replace``, so a
killed job never leaves a half-written file that analysis would trust):

- ``summary.json``: status (``running | completed | diverged | failed``), diverged step and reason,
  losses, throughput, versions, git commit, the run name, its overrides and the resolved config.
- ``metrics.parquet``: one row per step: step, train_loss, lr, grad_norm, tokens_per_s, val_loss
  (NaN except on evaluation steps).
- ``layers.parquet``: the tidy per-layer table: step, layer, sublayer, quantity, value.
- ``checkpoint.pt`` (while the run is unfinished, see :mod:`resnorm.checkpoint`), holding among
  the rest this store's rows so far (:meth:`RunStore.state_dict`): a resumed run continues the
  tables from the checkpoint's step, so no step is ever stored twice.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

STATUSES = ("running", "completed", "diverged", "failed")
STEP_COLUMNS = ("step", "train_loss", "lr", "grad_norm", "tokens_per_s", "val_loss")


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; the status and diverge_reason say what happened
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def read_summary(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The ``summary.json`` of a run folder; None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


class RunStore:
    """Collects a run's rows in memory and writes the run folder's files atomically.

    ``RunStore(None)`` keeps the rows but writes nothing (the DDP processes other than rank 0).
    """

    def __init__(self, run_dir: Optional[Path]):
        self.run_dir = None if run_dir is None else Path(run_dir)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.steps: Dict[str, List[float]] = {c: [] for c in STEP_COLUMNS}
        self.layers: Dict[str, list] = {"step": [], "layer": [], "sublayer": [], "quantity": [], "value": []}

    @property
    def writes(self) -> bool:
        return self.run_dir is not None

    @property
    def summary_path(self) -> Path:
        return self.run_dir / "summary.json"

    def state_dict(self) -> Dict[str, Dict[str, list]]:
        """The rows so far (plain lists), for a checkpoint."""
        return {"steps": {k: list(v) for k, v in self.steps.items()},
                "layers": {k: list(v) for k, v in self.layers.items()}}

    def load_state_dict(self, state: Dict[str, Dict[str, list]]) -> None:
        """Continue from a checkpoint's rows (the rows stored after it are dropped on the next flush)."""
        self.steps = {k: list(state["steps"][k]) for k in STEP_COLUMNS}
        self.layers = {k: list(state["layers"][k]) for k in self.layers}

    def add_step(self, step: int, train_loss: float, lr: float, grad_norm: float, tokens_per_s: float,
                 val_loss: Optional[float] = None) -> None:
        row = dict(step=step, train_loss=train_loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                   val_loss=float("nan") if val_loss is None else val_loss)
        for k in STEP_COLUMNS:
            self.steps[k].append(row[k])

    def set_val_loss(self, step: int, val_loss: float) -> None:
        """Attach an evaluation to the row of ``step`` (the last row, as evaluation follows the step)."""
        if self.steps["step"] and self.steps["step"][-1] == step:
            self.steps["val_loss"][-1] = val_loss

    def add_layers(self, step: int, labels, quantity: str, values) -> None:
        for (layer, sub), v in zip(labels, values):
            self.layers["step"].append(step)
            self.layers["layer"].append(layer)
            self.layers["sublayer"].append(sub)
            self.layers["quantity"].append(quantity)
            self.layers["value"].append(float(v))

    def flush_tables(self) -> None:
        if not self.writes:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        def write_table(columns: Dict[str, list], name: str) -> None:
            table = pa.table(columns)
            atomic_write(self.run_dir / name, lambda tmp: pq.write_table(table, tmp))

        write_table(self.steps, "metrics.parquet")
        if self.layers["step"]:
            write_table(self.layers, "layers.parquet")

    def write_summary(self, summary: Dict[str, Any]) -> None:
        if summary.get("status") not in STATUSES:
            raise ValueError(f"summary status {summary.get('status')!r} is not one of {STATUSES}")
        if not self.writes:
            return
        text = json.dumps(_json_safe(summary), indent=2, sort_keys=True)
        atomic_write(self.summary_path, lambda tmp: tmp.write_text(text))

    def read_summary(self) -> Optional[Dict[str, Any]]:
        return read_summary(self.run_dir) if self.writes else None
