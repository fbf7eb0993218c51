"""Stability metrics from run folders (the run-folder contract only: summary.json, metrics.parquet,
layers.parquet). Imports neither torch nor resnorm, so it works on runs copied from any machine.

- per run (:func:`runs_table`): status, diverged step, initial / final / best validation loss, loss spikes;
- per (variant, depth) over a learning-rate grid (:func:`lr_table`): Wortsman et al. 2023's LR-sensitivity
  (arXiv 2309.14322 §2.2: mean over the grid of min(final loss, initial loss) minus the best final loss),
  the best loss l*, and the largest stable learning rate (finite, at least 0.1 nat below the
  initial loss);
- over seeds (:func:`seed_table`): mean with a 95% confidence interval, divergence rate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd


def lr_sensitivity(final_losses: Sequence[float], initial_loss: float) -> float:
    """Mean over the grid of min(final loss, initial loss) minus the best final loss (NaN/inf -> initial)."""
    f = np.array([initial_loss if (v is None or not math.isfinite(v)) else min(v, initial_loss)
                  for v in final_losses], dtype=float)
    return float(f.mean() - f.min())


def largest_stable_lr(lrs: Sequence[float], final_losses: Sequence[float], initial_loss: float,
                      margin: float = 0.1) -> Optional[float]:
    """The largest LR with a finite final loss below ``initial_loss - margin`` (None if none).

    The margin (0.1 nat by default) keeps a run that is stuck near the initial loss (e.g. at ln|V|
    after a collapse) from counting as stable.
    """
    ok = [lr for lr, v in zip(lrs, final_losses)
          if v is not None and math.isfinite(v) and v < initial_loss - margin]
    return max(ok) if ok else None


def divergence_rate(diverged) -> float:
    d = [bool(x) for x in diverged]
    return sum(d) / len(d) if d else float("nan")


def loss_spikes(losses: Sequence[float], window: int = 10, factor: float = 1.5) -> int:
    """Steps whose loss exceeds ``factor`` x the median of the previous ``window`` losses (non-finite counts once)."""
    x = np.asarray(losses, dtype=float)
    count = 0
    for i in range(window, len(x)):
        if not math.isfinite(x[i]):
            return count + 1
        if x[i] > factor * np.median(x[i - window:i]):
            count += 1
    return count


def ci95(values: Sequence[float]) -> tuple:
    """Mean and the half-width of a normal 95% confidence interval over seeds (NaN half-width for one value)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v)))


def run_metrics(run_dir) -> dict:
    """Per-run stability metrics from one run folder."""
    run_dir = Path(run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    spikes = None
    if (run_dir / "metrics.parquet").is_file():
        spikes = loss_spikes(pd.read_parquet(run_dir / "metrics.parquet").train_loss.tolist())
    return dict(status=s.get("status"), diverged_step=s.get("diverged_step"), final_val_loss=s.get("final_val_loss"),
                best_val_loss=s.get("best_val_loss"), initial_loss=s.get("initial_loss"), loss_spikes=spikes)


def run_dirs(sweep) -> list:
    return sorted(p.parent for p in Path(sweep).rglob("summary.json"))


def runs_table(sweep) -> pd.DataFrame:
    """One row per run folder under ``sweep``: variant, depth, seed, lr, warmup, qk_norm + :func:`run_metrics`."""
    rows = []
    for d in run_dirs(sweep):
        s = json.loads((d / "summary.json").read_text())
        cfg = s.get("config") or {}
        optim, model = cfg.get("optim", {}), cfg.get("model", {})
        rows.append(dict(run=str(d), variant=s.get("variant", model.get("norm")), depth=s.get("depth", cfg.get("depth")),
                         seed=s.get("seed", cfg.get("seed")), lr=optim.get("lr"), warmup_steps=optim.get("warmup_steps"),
                         qk_norm=model.get("qk_norm", False), **run_metrics(d)))
    df = pd.DataFrame(rows)
    if not df.empty:
        df["diverged"] = df.status.eq("diverged")
        # the loss a diverged run counts as in LR-sensitivity: its initial loss
        df["loss"] = np.where(df.final_val_loss.isna() | df.diverged, df.initial_loss,
                              np.minimum(df.final_val_loss.astype(float), df.initial_loss.astype(float)))
    return df


def lr_table(runs: pd.DataFrame, keys=("variant", "depth", "seed")) -> pd.DataFrame:
    """Per ``keys`` group over its learning rates: lr_sensitivity, best_loss (l*), largest_stable_lr, n_lrs."""
    out = []
    for k, g in runs.groupby(list(keys)):
        l0 = float(g.initial_loss.median())
        finals = [float("nan") if dv else v for v, dv in zip(g.final_val_loss.astype(float), g.diverged)]
        out.append(dict(zip(keys, k if isinstance(k, tuple) else (k,)), n_lrs=g.lr.nunique(),
                        lr_sensitivity=lr_sensitivity(finals, l0), best_loss=float(np.nanmin(g.loss)),
                        largest_stable_lr=largest_stable_lr(g.lr.tolist(), finals, l0)))
    return pd.DataFrame(out)


def seed_table(runs: pd.DataFrame, value: str = "final_val_loss", keys=("variant", "depth")) -> pd.DataFrame:
    """Per ``keys``: mean and 95% CI of ``value`` over seeds (completed runs), divergence rate, runs."""
    out = []
    for k, g in runs.groupby(list(keys)):
        mean, half = ci95(g.loc[~g.diverged, value].astype(float).tolist())
        out.append(dict(zip(keys, k if isinstance(k, tuple) else (k,)), mean=mean, ci95=half,
                        divergence_rate=divergence_rate(g.diverged), runs=len(g)))
    return pd.DataFrame(out)
