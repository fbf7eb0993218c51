"""Stability metrics over a learning-rate grid (pure pandas/numpy: no torch, no resnorm).

- :func:`lr_sensitivity`: Wortsman et al. 2023 (arXiv 2309.14322, §2.2):
  ``LRsens = mean_eta [min(l(eta), l0) - l*]``, ``l* = min_eta l(eta)``; a diverged (NaN) run counts
  as ``l0``, the loss at initialisation.
- :func:`largest_stable_lr`: the largest LR whose run did not diverge and ended below ``l0``.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np


def lr_sensitivity(final_losses: Sequence[float], initial_loss: float) -> float:
    """Mean over the grid of min(final loss, initial loss) minus the best final loss (NaN/inf -> initial)."""
    f = np.array([initial_loss if (v is None or not math.isfinite(v)) else min(v, initial_loss)
                  for v in final_losses], dtype=float)
    return float(f.mean() - f.min())


def largest_stable_lr(lrs: Sequence[float], final_losses: Sequence[float], initial_loss: float,
                      margin: float = 0.0) -> Optional[float]:
    """The largest LR with a finite final loss below ``initial_loss - margin`` (None if none)."""
    ok = [lr for lr, v in zip(lrs, final_losses)
          if v is not None and math.isfinite(v) and v < initial_loss - margin]
    return max(ok) if ok else None


def divergence_rate(diverged: Iterable[bool]) -> float:
    d = [bool(x) for x in diverged]
    return sum(d) / len(d) if d else float("nan")


def loss_spikes(losses: Sequence[float], window: int = 10, factor: float = 1.5) -> int:
    """Steps whose loss exceeds ``factor`` x the median of the previous ``window`` losses (non-finite counts once)."""
    x = np.asarray(losses, dtype=float)
    count = 0
    for i in range(window, len(x)):
        ref = np.median(x[i - window:i])
        if not math.isfinite(x[i]):
            return count + 1
        if x[i] > factor * ref:
            count += 1
    return count


def run_metrics(run_dir) -> dict:
    """Per-run stability metrics from a run folder's contract (summary.json + metrics.parquet), no torch.

    status, diverged step, final / best validation loss, initial loss, loss spikes.
    """
    import json
    from pathlib import Path

    import pandas as pd

    run_dir = Path(run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    spikes = None
    if (run_dir / "metrics.parquet").is_file():
        spikes = loss_spikes(pd.read_parquet(run_dir / "metrics.parquet").train_loss.tolist())
    return dict(status=s.get("status"), diverged_step=s.get("diverged_step"), final_val_loss=s.get("final_val_loss"),
                best_val_loss=s.get("best_val_loss"), initial_loss=s.get("initial_loss"), loss_spikes=spikes)


def ci95(values: Sequence[float]) -> tuple:
    """Mean and the half-width of a normal 95% confidence interval over seeds (NaN half-width for one value)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v)))
