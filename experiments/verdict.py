"""A claim judged over seeds: its per-seed values, their mean with a 95% Student-t interval, and the verdict.

A reproduction's claim is a statistic with a threshold (``measure(df) OP threshold``). Judged on one seed
its PASS / FAIL is a coin flip wherever the effect is small against the seed-to-seed spread, so a claim is
decided here over the experiment's declared seeds (at least :data:`MIN_SEEDS`):

- the claim's measure is evaluated on each seed's rows alone (the seeds pair the variants: one seed is one
  init and one data order for every arm), giving one value per seed;
- the statistic is their mean with a two-sided 95% Student-t interval (``scipy.stats.t`` through
  :func:`analysis.verdicts.t_interval`); a claim declared
  on the ``log`` scale (a ratio, positive by construction, that spans orders of magnitude across seeds) is
  averaged and bounded on log values and reported back on its own scale (a geometric mean);
- the verdict: :data:`HOLDS` when the whole interval is on the claim's side of the threshold,
  :data:`DOES_NOT_HOLD` when the whole interval is on the other side, :data:`INCONCLUSIVE` when it
  straddles the threshold or fewer than :data:`MIN_SEEDS` seeds measured it, :data:`SKIPPED` when no seed
  could (a variant not registered, data absent).

Why t and not a bootstrap: with 3-5 seeds a bootstrap over seeds has 10-126 distinct resamples and its
percentile interval is too narrow (it never reaches beyond the observed values); the t interval is the exact
one for a normal mean and is wide at n = 3 (t = 4.30), which is the honest width for three seeds.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, SKIPPED = "holds", "does not hold", "inconclusive", "skipped"
VERDICTS = (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, SKIPPED)
MIN_SEEDS = 3
LEVEL = 0.95
SCALES = ("linear", "log")


def mean_interval(values: Sequence[float], level: float = LEVEL, scale: str = "linear") -> Tuple[float, float, float]:
    """(estimate, low, high): the mean of ``values`` with its two-sided Student-t interval at ``level``
    (:func:`analysis.verdicts.t_interval`, the one the verdict studies use).

    ``scale="log"``: the geometric mean and the interval of the mean of log values, mapped back. One value:
    (value, nan, nan). Identical values: a zero-width interval at that value."""
    from analysis.verdicts import t_interval

    if scale not in SCALES:
        raise ValueError(f"scale {scale!r} unknown; choose one of {', '.join(SCALES)}")
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to average")
    if scale == "log":
        if (x <= 0).any():
            raise ValueError(f"a log-scale claim needs positive values, got {x.tolist()}")
        x = np.log(x)
    mean, lo, hi = t_interval(x, confidence=level)
    if scale == "log":
        return math.exp(mean), math.exp(lo), math.exp(hi)
    return mean, lo, hi


def decide(low: float, high: float, op: str, threshold: float, n: int, min_seeds: int = MIN_SEEDS) -> str:
    """The verdict of a claim ``statistic OP threshold`` from the interval [low, high] over ``n`` seeds."""
    if n == 0:
        return SKIPPED
    if n < min_seeds or not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE
    if op in (">=", ">"):
        holds = low >= threshold if op == ">=" else low > threshold
        fails = high < threshold if op == ">=" else high <= threshold
    elif op in ("<=", "<"):
        holds = high <= threshold if op == "<=" else high < threshold
        fails = low > threshold if op == "<=" else low >= threshold
    else:
        raise ValueError(f"claim operator {op!r} unknown; choose one of >=, >, <=, <")
    return HOLDS if holds else DOES_NOT_HOLD if fails else INCONCLUSIVE


def judge(values: Sequence[float], op: str, threshold: float, scale: str = "linear",
          min_seeds: int = MIN_SEEDS) -> Tuple[Optional[float], float, float, str, str]:
    """(estimate, low, high, verdict, reason) of per-seed ``values`` against ``OP threshold``.

    A non-finite per-seed value (the measure of a run that produced none) makes the verdict
    inconclusive with the reason said: it is neither evidence for nor against the claim."""
    vals = [float(v) for v in values]
    if not vals:
        return None, float("nan"), float("nan"), SKIPPED, "no seed measured it"
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        return None, float("nan"), float("nan"), INCONCLUSIVE, f"{len(bad)} of {len(vals)} seeds non-finite"
    est, lo, hi = mean_interval(vals, scale=scale)
    verdict = decide(lo, hi, op, threshold, len(vals), min_seeds)
    reason = f"{len(vals)} seed{'s' * (len(vals) > 1)} < {min_seeds}" if len(vals) < min_seeds else ""
    return est, lo, hi, verdict, reason
