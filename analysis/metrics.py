"""Stability metrics: per-run (status, divergence, losses, loss spikes) and per LR sweep.

Reads the DataFrames of :class:`analysis.load.Sweep`; writes nothing.

Definitions (parameters are explicit arguments with the defaults named here):

- **Loss spike** (:func:`spike_steps`, :func:`count_loss_spikes`): step ``t`` is a spike step when
  its train loss is finite and exceeds ``factor`` (1.25) times the median of the finite train losses
  of the previous ``window`` (20) steps, provided at least ``min_history`` (5) of those are finite.
  A spike is a maximal run of consecutive spike steps, so one excursion that lasts several steps
  counts once. Non-finite losses are never spikes (that is divergence, reported by the status) and
  never enter the median. Assumes positive losses (cross-entropy).
- **LR sensitivity** (:func:`lr_sensitivity`), Wortsman et al. 2023, *Small-scale proxies for
  large-scale Transformer training instabilities*, arXiv:2309.14322, §2.2::

      LRsens = mean over the LR grid of [ min(l(eta), l0) - l* ],   l* = min over the grid of min(l(eta), l0)

  ``l(eta)`` is the final loss of the run trained at peak rate ``eta``, ``l0`` the loss at
  initialisation; a diverged run or a non-finite loss counts as ``l0``. Lower is more stable;
  report ``l*`` beside it (a low LRsens with a bad ``l*`` is not "stable").
- **Largest stable LR** (:func:`largest_stable_lr`): the largest rate whose runs all completed with a
  finite final loss below ``l0`` (diverging, or ending no better than at initialisation, is unstable).

Runs with status ``failed`` (a crash) or ``running`` (unfinished) say nothing about stability and are
left out of the LR metrics.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

SPIKE_WINDOW = 20
SPIKE_FACTOR = 1.25
SPIKE_MIN_HISTORY = 5
#: statuses left out of the LR-sweep metrics
EXCLUDED_STATUSES = ("failed", "running")
#: columns of :func:`run_metrics`, in order (the columns of summary.csv)
RUN_METRIC_COLUMNS = (
    "run_name", "variant", "depth", "seed", "lr", "status", "diverged_step", "final_train_loss",
    "final_val_loss", "best_val_loss", "loss_spikes", "tokens_per_s", "wall_s", "n_params", "run_dir",
)


def spike_steps(losses: Iterable[float], window: int = SPIKE_WINDOW, factor: float = SPIKE_FACTOR,
                min_history: int = SPIKE_MIN_HISTORY) -> np.ndarray:
    """Boolean mask over ``losses`` (in step order): True where the step is a spike step.

    See the module docstring for the definition.
    """
    if window < 1 or not 1 <= min_history <= window:
        raise ValueError(f"need window >= 1 and 1 <= min_history <= window, got window={window}, "
                         f"min_history={min_history}")
    if not factor > 0:
        raise ValueError(f"spike factor must be > 0, got {factor}")
    values = pd.Series(np.asarray(list(losses), dtype=float))
    finite = values.where(np.isfinite(values))
    previous_median = finite.rolling(window, min_periods=min_history).median().shift(1)
    return (finite > factor * previous_median).to_numpy()


def count_loss_spikes(losses: Iterable[float], window: int = SPIKE_WINDOW, factor: float = SPIKE_FACTOR,
                      min_history: int = SPIKE_MIN_HISTORY) -> int:
    """Number of loss spikes (maximal runs of consecutive spike steps) in ``losses`` (step order)."""
    mask = spike_steps(losses, window, factor, min_history)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    return int(starts.sum())


def run_metrics(sweep, spike_window: int = SPIKE_WINDOW, spike_factor: float = SPIKE_FACTOR,
                spike_min_history: int = SPIKE_MIN_HISTORY) -> pd.DataFrame:
    """One row per run of ``sweep`` with :data:`RUN_METRIC_COLUMNS` and ``setting``.

    Status, diverged step, losses, throughput and size come from the run's summary;
    ``loss_spikes`` is counted on its ``metrics.parquet`` train loss (<NA> for a run without one).
    """
    runs = sweep.runs
    spikes = {}
    if len(sweep.steps) and "train_loss" in sweep.steps.columns:
        for run_dir, rows in sweep.steps.groupby("run_dir", sort=False):
            losses = rows.sort_values("step")["train_loss"]
            spikes[run_dir] = count_loss_spikes(losses, spike_window, spike_factor, spike_min_history)
    table = runs.copy()
    table["loss_spikes"] = pd.array([spikes.get(d) for d in runs["run_dir"]], dtype="Int64")
    return table[list(RUN_METRIC_COLUMNS) + ["setting"]].reset_index(drop=True)


def _initial_loss(df: pd.DataFrame, initial_loss: Optional[float]) -> float:
    if initial_loss is not None:
        return float(initial_loss)
    values = pd.to_numeric(df.get("initial_loss", pd.Series(dtype=float)), errors="coerce")
    values = values[np.isfinite(values)]
    if values.empty:
        raise ValueError("no finite initial loss: pass initial_loss= or give the runs an initial_loss column")
    return float(values.median())


def _lr_grid(df: pd.DataFrame, lr: str, lr_range: Optional[Tuple[float, float]]) -> pd.DataFrame:
    if lr not in df.columns:
        raise ValueError(f"no {lr!r} column; columns are {list(df.columns)}")
    if "status" in df.columns:
        df = df[~df["status"].isin(EXCLUDED_STATUSES)]
    if lr_range is not None:
        low, high = lr_range
        df = df[(df[lr] >= low * (1 - 1e-9)) & (df[lr] <= high * (1 + 1e-9))]
    return df


def _clipped_losses(df: pd.DataFrame, loss: str, l0: float) -> pd.Series:
    """min(loss, l0) per row; l0 for a diverged run or a non-finite loss."""
    values = pd.to_numeric(df[loss], errors="coerce").astype(float)
    bad = ~np.isfinite(values)
    if "status" in df.columns:
        bad |= (df["status"] == "diverged").to_numpy()
    return values.where(~bad, l0).clip(upper=l0)


def lr_sensitivity(df: pd.DataFrame, loss: str = "final_val_loss", lr: str = "lr",
                   initial_loss: Optional[float] = None,
                   lr_range: Optional[Tuple[float, float]] = None) -> float:
    """Wortsman et al. 2023 LR sensitivity of one LR sweep (see the module docstring).

    ``df`` has one row per learning rate (group by variant, depth, seed, ... first) with columns
    ``lr``, ``loss`` and optionally ``status`` and ``initial_loss``. ``l0`` is ``initial_loss`` if
    given, else the median of the finite ``initial_loss`` values (all runs of one sweep start from the
    same loss up to the seed). ``lr_range=(a, b)`` keeps only rates in [a, b] (the paper uses
    [3e-4, 3e-1]). Returns NaN if no run is left; raises ValueError on a repeated learning rate.
    """
    grid = _lr_grid(df, lr, lr_range)
    if grid.empty:
        return math.nan
    if grid[lr].duplicated().any():
        repeated = sorted(grid.loc[grid[lr].duplicated(), lr].unique())
        raise ValueError(f"learning rates {repeated} appear more than once: give one run per rate "
                         f"(group by seed and the other swept keys first)")
    clipped = _clipped_losses(grid, loss, _initial_loss(grid, initial_loss))
    return float((clipped - clipped.min()).mean())


def best_loss(df: pd.DataFrame, loss: str = "final_val_loss", lr: str = "lr",
              initial_loss: Optional[float] = None,
              lr_range: Optional[Tuple[float, float]] = None) -> Tuple[float, float]:
    """``(l*, the learning rate that reached it)`` of one LR sweep; l* as in :func:`lr_sensitivity`.

    On a tie the smallest rate is returned. Returns ``(nan, nan)`` if no run is left, ``(l0, nan)``
    if none did better than ``l0``.
    """
    grid = _lr_grid(df, lr, lr_range).sort_values(lr, kind="stable")
    if grid.empty:
        return math.nan, math.nan
    l0 = _initial_loss(grid, initial_loss)
    clipped = _clipped_losses(grid, loss, l0)
    best = float(clipped.min())
    if best >= l0:
        return best, math.nan
    return best, float(grid.loc[clipped.idxmin(), lr])


def largest_stable_lr(df: pd.DataFrame, loss: str = "final_val_loss", lr: str = "lr",
                      initial_loss: Optional[float] = None) -> float:
    """The largest learning rate all of whose runs are stable, NaN if none is.

    A run is stable when its status is ``completed`` (if ``df`` has a ``status`` column) and its
    final ``loss`` is finite and below ``l0`` (``initial_loss``, or the median of the column).
    Several runs per rate (seeds) are allowed: the rate is stable only if every one of them is.
    """
    grid = _lr_grid(df, lr, None)
    if grid.empty:
        return math.nan
    l0 = _initial_loss(grid, initial_loss)
    values = pd.to_numeric(grid[loss], errors="coerce").astype(float)
    stable = np.isfinite(values) & (values < l0)
    if "status" in grid.columns:
        stable &= (grid["status"] == "completed").to_numpy()
    per_rate = stable.groupby(grid[lr]).all()
    rates = per_rate[per_rate].index
    return float(rates.max()) if len(rates) else math.nan


def lr_sensitivity_table(runs: pd.DataFrame, by: Sequence[str] = ("variant", "depth", "seed"),
                         loss: str = "final_val_loss",
                         lr_range: Optional[Tuple[float, float]] = None) -> pd.DataFrame:
    """Per group of ``runs`` (one LR sweep each): ``n_lr``, ``lr_sensitivity``, ``best_loss`` (l*),
    ``best_lr`` and ``largest_stable_lr``. ``l0`` is each group's median initial loss.

    Groups whose runs have no finite initial loss get NaN metrics rather than an error.
    """
    by = list(by)
    rows = []
    for key, group in runs.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        grid = _lr_grid(group, "lr", lr_range)
        row = dict(zip(by, key), n_lr=int(grid["lr"].nunique()), lr_sensitivity=math.nan,
                   best_loss=math.nan, best_lr=math.nan, largest_stable_lr=math.nan)
        initial = pd.to_numeric(grid.get("initial_loss", pd.Series(dtype=float)), errors="coerce")
        if np.isfinite(initial).any():
            row["lr_sensitivity"] = lr_sensitivity(grid, loss)
            row["best_loss"], row["best_lr"] = best_loss(grid, loss)
            row["largest_stable_lr"] = largest_stable_lr(grid, loss)
        rows.append(row)
    columns = by + ["n_lr", "lr_sensitivity", "best_loss", "best_lr", "largest_stable_lr"]
    return pd.DataFrame(rows, columns=columns)
