"""Stability metrics: per run (status, divergence, losses, loss spikes), per LR sweep, over seeds.

Reads the DataFrames of :class:`analysis.load.Sweep` (the ``*_values`` functions: plain sequences,
for callers without a sweep, e.g. :mod:`experiments`); writes nothing. Every formula below has one
implementation here; the DataFrame functions select and group rows, then call the value functions.

Definitions (parameters are explicit arguments with the defaults named here):

- **Loss spike** (:func:`spike_steps`, :func:`count_loss_spikes`): step ``t`` is a spike step when
  its train loss is finite and exceeds ``factor`` (1.25) times the median of the finite train losses
  of the previous ``window`` (20) steps, provided at least ``min_history`` (5) of those are finite.
  A spike is a maximal run of consecutive spike steps, so one excursion that lasts several steps
  counts once. Non-finite losses are never spikes (that is divergence, reported by the status) and
  never enter the median. Assumes positive losses (cross-entropy).
- **LR sensitivity** (:func:`lr_sensitivity_values`, :func:`lr_sensitivity`), Wortsman et al. 2023,
  *Small-scale proxies for large-scale Transformer training instabilities*, arXiv:2309.14322, §2.2::

      LRsens = mean over the LR grid of [ min(l(eta), l0) - l* ],   l* = min over the grid of min(l(eta), l0)

  ``l(eta)`` is the final loss of the run trained at peak rate ``eta``, ``l0`` the loss at
  initialisation; a diverged run or a non-finite loss counts as ``l0`` (:func:`clipped_losses`).
  Lower is more stable; report ``l*`` (:func:`best_loss`) beside it (a low LRsens with a bad ``l*``
  is not "stable").
- **Largest stable LR** (:func:`largest_stable_lr_values`, :func:`largest_stable_lr`): the largest
  rate all of whose runs are stable. A run is stable when its outcome is ``trained`` (it completed,
  not diverged, not non-finite, and not **stalled**: a run whose final loss stayed within
  ``train.stall_margin`` of the data's unigram loss learned nothing beyond byte frequencies, see
  :func:`resnorm.runs.folder.classify_outcome`) and its final loss is finite and at least ``margin``
  (:data:`STABLE_MARGIN`, 0.1 nat) below ``l0``. The margin keeps a run that is stuck near the
  initial loss (at ln|V| after a collapse, say) from counting as stable where no unigram baseline is
  known; a rate with several runs (seeds) is stable only if every one of them is. The LR
  sensitivity stays numeric: a stalled run counts with its own final loss (already near the
  unigram loss, so it is penalised without a special case).
- **Seed statistics** (:func:`seed_summary`): per (variant, depth, setting), over seeds, the mean of
  the completed runs' final loss with a 95% confidence interval from Student's t
  (:func:`mean_ci`: ``mean +- t(0.975, n-1) * sd / sqrt(n)``, sd with ``n - 1``; none for one run),
  the count of each outcome (:data:`resnorm.runs.folder.OUTCOMES`: trained, stalled, diverged,
  nonfinite) and the **failure rate**: the runs with an outcome other than ``trained`` over the runs
  with an outcome (completed or diverged), with a 95% Wilson score interval
  (:func:`wilson_interval`), which stays inside [0, 1] and is not empty at 0 of 3 or 3 of 3.

Runs with status ``failed`` (a crash) or ``running`` (unfinished) have no outcome, say nothing about
stability and are left out of the LR metrics and of the failure rate. A table without an ``outcome``
column (a hand-made one) gets it from :func:`outcomes`.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from analysis import verdicts
from analysis.load import PLOT_AXES, parse_overrides, with_bits_per_byte  # noqa: F401  (analysis.metrics.with_bits_per_byte)
from resnorm.runs.folder import DONE, OUTCOMES, STATUSES, classify_outcome, diverge_kind_of

SPIKE_WINDOW = 20
SPIKE_FACTOR = 1.25
SPIKE_MIN_HISTORY = 5
#: statuses left out of the LR-sweep metrics and of the failure rate: the runs not over (no outcome)
EXCLUDED_STATUSES = tuple(s for s in STATUSES if s not in DONE)
#: nats below the initial loss a run must end to count as stable (see :func:`largest_stable_lr_values`)
STABLE_MARGIN = 0.1
#: confidence level of the intervals of :func:`seed_summary`
CONFIDENCE = 0.95
#: columns of :func:`run_metrics`, in order (the columns of summary.csv)
RUN_METRIC_COLUMNS = (
    "run_name", "variant", "depth", "seed", "lr", "status", "outcome", "diverged_step", "final_train_loss",
    "final_val_loss", "best_val_loss", "unigram_loss", "loss_spikes", "tokens_per_s", "wall_s", "n_params",
    "tokenizer", "final_val_bpb", "best_val_bpb", "run_dir",
)
#: the outcomes that are failures (every outcome but ``trained``), in the order figures stack them
FAILURES = tuple(o for o in OUTCOMES if o != "trained")
#: columns of :func:`seed_summary` after the grouping keys (the columns of seed_summary.csv)
SEED_COLUMNS = ("runs", "finished", *OUTCOMES, "failure_rate", "failure_low", "failure_high", "n", "mean",
                "ci95")


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


def loss_column(runs: pd.DataFrame) -> str:
    """What the figures compare: ``final_val_bpb`` when the runs were trained with different
    tokenizers of text (nats per token of different tokenizers do not compare), else
    ``final_val_loss`` (synthetic symbols beside one tokenizer of text: as before tokenizers were recorded)."""
    text = runs["tokenizer"].dropna() if "tokenizer" in runs.columns else pd.Series(dtype=object)
    if text[text != "synthetic"].nunique() > 1 and "final_val_bpb" in runs.columns:
        return "final_val_bpb"
    return "final_val_loss"


def outcomes(runs: pd.DataFrame) -> pd.Series:
    """Each run's outcome: the ``outcome`` column when ``runs`` has one (the runs table always does,
    :func:`analysis.load.outcome_of`), else :func:`resnorm.runs.folder.classify_outcome` of ``status``
    and ``final_val_loss`` with no baseline (a hand-made table): a diverged run is ``nonfinite`` or
    ``diverged`` by its ``diverge_kind`` or ``diverge_reason`` column, ``diverged`` without either."""
    if "outcome" in runs.columns:
        return runs["outcome"].where(runs["outcome"].isin(OUTCOMES), None)
    values = []
    for _, row in runs.iterrows():
        kind = row.get("diverge_kind")
        if not isinstance(kind, str):
            reason = row.get("diverge_reason")
            kind = diverge_kind_of(reason) if isinstance(reason, str) else "loss_factor"
        loss = pd.to_numeric(pd.Series([row.get("final_val_loss")]), errors="coerce").iloc[0]
        values.append(classify_outcome(row.get("status"), kind, None if pd.isna(loss) else float(loss), None, 0.0))
    return pd.Series(values, index=runs.index, dtype=object)


def spike_rates(sweep) -> pd.DataFrame:
    """Per run with spike data, ``run_dir`` and ``spike_rate``: spikes per 1000 steps, from the
    summary's ``spike_count`` over ``steps_done`` (the training's own spike detector), else the
    number of rows flagged in the ``spike`` column of ``metrics.parquet`` over its rows. Runs that
    recorded neither (written before spike detection) are left out."""
    runs = sweep.runs
    steps = sweep.steps
    flagged = {}
    if len(steps) and "spike" in steps.columns:
        for run_dir, rows in steps.groupby("run_dir", sort=False):
            spike = pd.to_numeric(rows["spike"], errors="coerce")
            if spike.notna().any():
                flagged[run_dir] = (float(spike.fillna(0).astype(bool).sum()), float(len(rows)))
    rows = []
    for _, run in runs.iterrows():
        count, done = run.get("spike_count"), run.get("steps_done")
        if pd.notna(count) and pd.notna(done) and done > 0:
            rows.append((run["run_dir"], 1000.0 * float(count) / float(done)))
        elif run["run_dir"] in flagged and flagged[run["run_dir"]][1] > 0:
            count, done = flagged[run["run_dir"]]
            rows.append((run["run_dir"], 1000.0 * count / done))
    return pd.DataFrame(rows, columns=["run_dir", "spike_rate"])


# ------------------------------------------------------------------------------- LR sweeps: values


def clipped_losses(final_losses: Iterable[float], initial_loss, diverged: Optional[Iterable[bool]] = None
                   ) -> np.ndarray:
    """``min(loss, l0)`` per run; ``l0`` for a diverged run or a missing or non-finite loss.

    ``initial_loss`` (``l0``) is one number or one per run; ``diverged`` (optional) one flag per run.
    """
    values = np.asarray(list(final_losses), dtype=float)
    l0 = np.broadcast_to(np.asarray(initial_loss, dtype=float), values.shape)
    bad = ~np.isfinite(values)
    if diverged is not None:
        bad |= np.asarray(list(diverged), dtype=bool)
    return np.where(bad, l0, np.minimum(values, l0))


def lr_sensitivity_values(final_losses: Iterable[float], initial_loss: float,
                          diverged: Optional[Iterable[bool]] = None) -> float:
    """Wortsman et al.'s LR sensitivity of one LR grid, one final loss per rate (see the module
    docstring): ``mean(c) - min(c)`` with ``c`` = :func:`clipped_losses`. NaN for an empty grid."""
    clipped = clipped_losses(final_losses, initial_loss, diverged)
    if clipped.size == 0:
        return math.nan
    return float(clipped.mean() - clipped.min())


def largest_stable_lr_values(lrs: Iterable[float], final_losses: Iterable[float], initial_loss,
                             completed: Optional[Iterable[bool]] = None,
                             margin: float = STABLE_MARGIN) -> float:
    """The largest rate in ``lrs`` all of whose runs are stable, NaN if none is (module docstring).

    One entry per run (several runs may share a rate); ``completed`` (optional, one flag per run) is
    False for a run that is not stable whatever its loss (diverged, stalled, unfinished); ``initial_loss`` is one number or one per run.
    """
    rates = np.asarray(list(lrs), dtype=float)
    values = np.asarray(list(final_losses), dtype=float)
    l0 = np.broadcast_to(np.asarray(initial_loss, dtype=float), values.shape)
    stable = np.isfinite(values) & (values < l0 - margin)
    if completed is not None:
        stable &= np.asarray(list(completed), dtype=bool)
    good = [rate for rate in np.unique(rates[np.isfinite(rates)]) if stable[rates == rate].all()]
    return float(max(good)) if good else math.nan


# ---------------------------------------------------------------------------- LR sweeps: DataFrames


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


def _losses(df: pd.DataFrame, loss: str) -> np.ndarray:
    return pd.to_numeric(df[loss], errors="coerce").astype(float).to_numpy()


def _status_is(df: pd.DataFrame, status: str) -> Optional[np.ndarray]:
    """``df.status == status`` as a boolean array, None without a status column."""
    return (df["status"] == status).to_numpy() if "status" in df.columns else None


def _trained(df: pd.DataFrame) -> Optional[np.ndarray]:
    """Per run, whether its outcome is ``trained`` (:func:`outcomes`); None without an ``outcome``
    or a ``status`` column (then only the losses decide)."""
    if "outcome" not in df.columns and "status" not in df.columns:
        return None
    return (outcomes(df) == "trained").to_numpy()


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
    return lr_sensitivity_values(_losses(grid, loss), _initial_loss(grid, initial_loss),
                                 _status_is(grid, "diverged"))


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
    clipped = clipped_losses(_losses(grid, loss), l0, _status_is(grid, "diverged"))
    best = float(clipped.min())
    if best >= l0:
        return best, math.nan
    return best, float(grid[lr].iloc[int(clipped.argmin())])


def largest_stable_lr(df: pd.DataFrame, loss: str = "final_val_loss", lr: str = "lr",
                      initial_loss: Optional[float] = None, margin: float = STABLE_MARGIN) -> float:
    """The largest learning rate all of whose runs are stable (:func:`largest_stable_lr_values`),
    NaN if none is.

    A run is stable when its outcome is ``trained`` (:func:`outcomes`: completed and not stalled; if
    ``df`` has an ``outcome`` or ``status`` column) and its final ``loss`` is finite and at least
    ``margin`` below ``l0`` (``initial_loss``, or the median of the column). Several runs per rate
    (seeds) are allowed: the rate is stable only if every one of them is. Failed and running runs are
    left out.
    """
    grid = _lr_grid(df, lr, None)
    if grid.empty:
        return math.nan
    return largest_stable_lr_values(grid[lr], _losses(grid, loss), _initial_loss(grid, initial_loss),
                                    _trained(grid), margin)


def lr_sweep_runs(sweep) -> Tuple[pd.DataFrame, List[str]]:
    """``(runs, keys)``: ``sweep.runs`` with a column for every key the sweep varies besides variant,
    depth, seed and the learning rate, and those keys. A key without a config column (a config group
    such as ``experiment=a``) is taken from the run's overrides. Grouping the runs by
    ``["variant", "depth", "seed"] + keys`` gives one LR sweep per group."""
    runs = sweep.runs
    keys = [k for k in sweep.axes if k not in PLOT_AXES and k != "optim.lr"]
    missing = [k for k in keys if k not in runs.columns]
    if missing:
        runs = runs.copy()
        for key in missing:
            runs[key] = [parse_overrides(o).get(key) for o in runs["overrides"]]
    return runs, keys


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


# ----------------------------------------------------------------------------------------- seeds


def t_critical(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided critical value of Student's t with ``df`` degrees of freedom: the ``t`` with
    ``P(|T| <= t) = confidence`` (12.706 for df 1, 4.303 for df 2 at 95%), from scipy
    (:func:`analysis.verdicts.t_critical`)."""
    if int(df) != df or df < 1:
        raise ValueError(f"degrees of freedom must be a whole number >= 1, got {df!r}")
    return verdicts.t_critical(int(df), confidence)


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE) -> Tuple[float, float]:
    """``(mean, half-width)`` of the Student-t confidence interval of the mean of the finite
    ``values``: ``t_critical(n - 1) * sd / sqrt(n)`` (sd with ``n - 1``). ``(nan, nan)`` for no
    finite value, ``(value, nan)`` for one."""
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), math.nan
    return float(v.mean()), t_critical(v.size - 1, confidence) * float(v.std(ddof=1)) / math.sqrt(v.size)


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> Tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of a proportion ``k / n``; ``(nan, nan)`` for n = 0
    (statsmodels, :func:`analysis.verdicts.wilson_interval`)."""
    return verdicts.wilson_interval(k, n, confidence)


def seed_summary(runs: pd.DataFrame, value: str = "final_val_loss",
                 by: Sequence[str] = ("variant", "depth", "setting")) -> pd.DataFrame:
    """Per group of ``runs`` (the seeds of one variant, depth and setting): the by-columns, then
    :data:`SEED_COLUMNS`:

    - ``runs``: the group's runs, any status; ``finished``: how many have an outcome (completed or
      diverged); ``trained``, ``stalled``, ``diverged``, ``nonfinite``: how many have each outcome
      (:func:`outcomes`);
    - ``failure_rate``: the finished runs whose outcome is not ``trained`` over the finished runs
      (failed and running runs are left out; NaN when none finished), with its 95% Wilson interval
      ``failure_low``/``failure_high``;
    - ``n``, ``mean``, ``ci95``: the completed runs (stalled ones included) with a finite ``value``,
      their mean and the half-width of its 95% Student-t interval (:func:`mean_ci`; NaN for fewer
      than two).

    Groups come in the sort order of the by-columns.
    """
    by = list(by)
    runs = runs.assign(_outcome=outcomes(runs))
    rows = []
    for key, group in runs.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        counts = {o: int((group["_outcome"] == o).sum()) for o in OUTCOMES}
        finished = sum(counts.values())
        failed = finished - counts["trained"]
        low, high = wilson_interval(failed, finished)
        values = pd.to_numeric(group.loc[group["status"] == "completed", value], errors="coerce").astype(float)
        mean, half = mean_ci(values)
        rows.append(dict(zip(by, key), runs=len(group), finished=finished, **counts,
                         failure_rate=failed / finished if finished else math.nan,
                         failure_low=low, failure_high=high, n=int(np.isfinite(values).sum()),
                         mean=mean, ci95=half))
    return pd.DataFrame(rows, columns=by + list(SEED_COLUMNS))
