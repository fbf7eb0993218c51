"""Verdicts: paired comparisons of variants against a baseline, with intervals, tests and corrections.

Every distribution, test, interval and correction comes from scipy or statsmodels; this module
only selects the numbers and names them. Torch-free (reads tables, writes nothing). The value
functions (plain sequences in, numbers out) are the public statistics; :func:`verdict_table` turns
a runs table (:class:`analysis.load.Sweep` ``.runs``) into one row per comparison and
:func:`sentence` into the sentence a reader can quote. The rules, and why (docs/verdicts.md):

- **Loss difference** (:func:`paired_difference`): per seed, variant minus baseline (same seed:
  same initialisation stream and data order); the mean with a 95% Student-t interval over the
  pairs and the two-sided paired t-test (``scipy.stats.ttest_rel``). With 3 to 10 seeds a bootstrap
  interval has too few resamples to be trusted (at n = 3 it has 10 distinct values and
  under-covers); the t interval is exact for normal differences and the A/A test checks it.
- **Multiple comparisons** (:func:`adjust`): Holm (default) or Benjamini-Hochberg
  (``statsmodels.stats.multitest.multipletests``) over every loss comparison of the report; the
  failure-rate tests form their own family.
- **Failure rate** (:func:`failure_difference`): the difference of the two failure rates with
  Fisher's exact test (or Barnard's, ``scipy.stats``); each rate with its Wilson interval.
- **Noise floor** (:func:`noise_floor`): the baseline's seed-to-seed standard deviation.
- **Minimal detectable difference** (:func:`minimal_detectable_difference`): the difference a
  paired t-test at the study's seed count detects with probability ``power`` (0.8) at the
  Bonferroni level ``alpha / m`` (Holm rejects at least what Bonferroni does), in units of the sd
  of the paired differences (``statsmodels.stats.power.TTestPower``). "No detectable difference"
  is said only when the test is not significant and the whole interval lies inside +-MDD;
  otherwise the comparison is "inconclusive".
- **LR scaling** (:func:`loglog_slope`): least squares of log(largest stable LR) on log(depth)
  (``scipy.stats.linregress``) with the slope's t interval on n - 2 degrees of freedom.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

#: confidence level of every interval, and the family-wise error rate of the corrected tests
ALPHA = 0.05
#: the power at which the minimal detectable difference is computed
POWER = 0.8
#: correction name -> statsmodels' method name (``multipletests``)
CORRECTIONS = {"holm": "holm", "bh": "fdr_bh", "bonferroni": "bonferroni", "none": None}
#: exact test of two failure rates -> its scipy function name
FAILURE_TESTS = ("fisher", "barnard")


def _finite(values: Iterable[float]) -> np.ndarray:
    v = np.asarray(list(values), dtype=float)
    return v[np.isfinite(v)]


def t_critical(df: float, confidence: float = 1 - ALPHA) -> float:
    """Two-sided critical value of Student's t (``scipy.stats.t.ppf``): 12.706 for df 1 at 95%."""
    from scipy import stats

    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(stats.t.ppf(0.5 + confidence / 2, df))


def t_interval(values: Iterable[float], confidence: float = 1 - ALPHA) -> Tuple[float, float, float]:
    """``(mean, low, high)`` of the Student-t interval of the mean of the finite ``values``
    (``scipy.stats.t.interval``); ``(mean, nan, nan)`` for one value, all NaN for none."""
    from scipy import stats

    v = _finite(values)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size == 1:
        return mean, math.nan, math.nan
    sem = float(stats.sem(v))
    if sem == 0:
        return mean, mean, mean
    low, high = stats.t.interval(confidence, v.size - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def wilson_interval(k: int, n: int, confidence: float = 1 - ALPHA) -> Tuple[float, float]:
    """Wilson score interval of ``k / n`` (``statsmodels proportion_confint(method="wilson")``);
    ``(nan, nan)`` for n = 0."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    low, high = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
    rate = k / n  # statsmodels' bounds can miss the rate by a rounding error (0 of 3: low 5.6e-17)
    return min(max(0.0, float(low)), rate), max(min(1.0, float(high)), rate)


@dataclass
class Paired:
    """A paired difference ``a - b`` over ``n`` pairs: mean, interval, sd of the differences, p."""

    n: int
    mean: float
    low: float
    high: float
    sd: float
    p: float

    def as_dict(self, prefix: str = "") -> Dict[str, float]:
        return {prefix + k: v for k, v in asdict(self).items()}


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 1 - ALPHA) -> Paired:
    """``a[i] - b[i]`` over the pairs where both are finite: mean with its t interval, sd (n - 1)
    and the two-sided p of the paired t-test (``scipy.stats.ttest_rel``). NaN where n < 2 (and a
    p of NaN when every difference is the same: no variance to test against)."""
    from scipy import stats

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need the same length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    d = x - y
    mean, low, high = t_interval(d, confidence)
    if d.size < 2:
        return Paired(int(d.size), mean, math.nan, math.nan, math.nan, math.nan)
    sd = float(d.std(ddof=1))
    p = float(stats.ttest_rel(x, y).pvalue) if sd > 0 else math.nan
    return Paired(int(d.size), mean, low, high, sd, p)


def adjust(pvalues: Sequence[float], method: str = "holm", alpha: float = ALPHA) -> np.ndarray:
    """Adjusted p-values of a family (``statsmodels multipletests``); NaN entries stay NaN and are
    not counted in the family. ``method``: a key of :data:`CORRECTIONS`."""
    from statsmodels.stats.multitest import multipletests

    if method not in CORRECTIONS:
        raise ValueError(f"correction {method!r} is unknown: choose one of {', '.join(CORRECTIONS)}")
    p = np.asarray(list(pvalues), dtype=float)
    out = np.full(p.shape, math.nan)
    keep = np.isfinite(p)
    if not keep.any():
        return out
    if CORRECTIONS[method] is None:
        out[keep] = p[keep]
    else:
        out[keep] = multipletests(p[keep], alpha=alpha, method=CORRECTIONS[method])[1]
    return out


def failure_difference(k_a: int, n_a: int, k_b: int, n_b: int, test: str = "fisher") -> Tuple[float, float]:
    """``(k_a/n_a - k_b/n_b, two-sided p)`` of two failure counts by an exact test of the 2x2 table
    (``scipy.stats.fisher_exact`` or ``barnard_exact``); NaN when either arm has no run."""
    from scipy import stats

    if test not in FAILURE_TESTS:
        raise ValueError(f"failure test {test!r} is unknown: choose one of {', '.join(FAILURE_TESTS)}")
    if n_a == 0 or n_b == 0:
        return math.nan, math.nan
    table = [[k_a, n_a - k_a], [k_b, n_b - k_b]]
    if test == "fisher":
        p = stats.fisher_exact(table).pvalue
    elif (k_a + k_b) in (0, n_a + n_b):  # Barnard's statistic is undefined on a constant table
        p = 1.0
    else:
        p = stats.barnard_exact(table).pvalue
    return k_a / n_a - k_b / n_b, float(min(1.0, p))


def noise_floor(values: Iterable[float]) -> float:
    """The seed-to-seed standard deviation (n - 1) of the finite ``values``; NaN for fewer than 2."""
    v = _finite(values)
    return float(v.std(ddof=1)) if v.size >= 2 else math.nan


def minimal_detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference a two-sided paired t-test on ``n`` pairs detects with
    probability ``power`` at level ``alpha``: ``d * sd``, d solved by ``statsmodels TTestPower``
    (0.8 at n = 14.3, alpha 0.05, power 0.8; Cohen 1988). NaN for n < 2 or a non-finite sd."""
    from statsmodels.stats.power import TTestPower

    if n < 2 or not math.isfinite(sd):
        return math.nan
    d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(np.asarray(d).item()) * sd


def power_at(difference: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """The probability that a two-sided paired t-test on ``n`` pairs at level ``alpha`` detects a
    true mean difference ``difference`` when the differences have sd ``sd`` (statsmodels)."""
    from statsmodels.stats.power import TTestPower

    if n < 2 or not sd > 0:
        return math.nan
    return float(TTestPower().power(effect_size=abs(difference) / sd, nobs=n, alpha=alpha))


@dataclass
class Slope:
    """Least-squares slope of log y on log x: slope, interval, intercept, points used."""

    slope: float
    low: float
    high: float
    intercept: float
    n: int


def loglog_slope(x: Sequence[float], y: Sequence[float], confidence: float = 1 - ALPHA) -> Slope:
    """Fit ``log y = a + s log x`` over the points where both are finite and positive
    (``scipy.stats.linregress``); the slope's t interval on n - 2 degrees of freedom (NaN for fewer
    than 3 points; the slope itself needs 2 distinct x)."""
    from scipy import stats

    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys) & (xs > 0) & (ys > 0)
    lx, ly = np.log(xs[keep]), np.log(ys[keep])
    if lx.size < 2 or np.unique(lx).size < 2:
        return Slope(math.nan, math.nan, math.nan, math.nan, int(lx.size))
    fit = stats.linregress(lx, ly)
    if lx.size < 3:
        return Slope(float(fit.slope), math.nan, math.nan, float(fit.intercept), int(lx.size))
    half = t_critical(lx.size - 2, confidence) * float(fit.stderr)
    return Slope(float(fit.slope), float(fit.slope) - half, float(fit.slope) + half, float(fit.intercept),
                 int(lx.size))


def loss_at_budget(budgets: Sequence[float], losses: Sequence[float], budget: float) -> float:
    """The last finite loss logged at a cumulative cost (FLOPs) at most ``budget`` (the curve is
    ``losses[i]`` after ``budgets[i]``); NaN when none is."""
    b, v = np.asarray(budgets, dtype=float), np.asarray(losses, dtype=float)
    keep = np.isfinite(b) & np.isfinite(v) & (b <= budget * (1 + 1e-9))
    if not keep.any():
        return math.nan
    return float(v[keep][np.argmax(b[keep])])


def classify(p_adjusted: float, low: float, high: float, mdd: float, alpha: float = ALPHA) -> str:
    """The verdict of one loss comparison (variant minus baseline, lower is better): ``worse`` or
    ``better`` when the corrected test rejects, ``no detectable difference`` when it does not and
    the whole interval lies within +-``mdd``, else ``inconclusive``."""
    if math.isfinite(p_adjusted) and p_adjusted < alpha:
        return "worse" if low > 0 else "better" if high < 0 else ("worse" if low + high > 0 else "better")
    if math.isfinite(low) and math.isfinite(high) and (low > 0 or high < 0):
        return UNCORRECTED  # the interval excludes 0, the corrected test does not reject
    if all(math.isfinite(v) for v in (low, high, mdd)) and -mdd <= low and high <= mdd:
        return "no detectable difference"
    return "inconclusive"


def simulate_studies(n_studies: int, n_seeds: int, n_variants: int, effect: float = 0.0, sd: float = 1.0,
                     correction: str = "holm", alpha: float = ALPHA, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``(rejections per study, whether the first variant's comparison was rejected)`` over
    ``n_studies`` simulated studies shaped like a report: per seed, a baseline run and
    ``n_variants`` variant runs, normal with sd ``sd``; the first variant's mean is ``effect``
    above the baseline's, the others equal it (A/A). Each variant is compared with the shared
    baseline by the paired t-test and the family corrected, as in :func:`verdict_table`."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, sd, size=(n_studies, 1, n_seeds))
    arms = rng.normal(0.0, sd, size=(n_studies, n_variants, n_seeds))
    arms[:, 0] += effect
    pvalues = stats.ttest_1samp(arms - base, 0.0, axis=2).pvalue  # = ttest_rel, one study per row
    rejected = adjust_rows(pvalues, correction) < alpha
    return rejected.sum(axis=1), rejected[:, 0]


def adjust_rows(pvalues: np.ndarray, method: str = "holm") -> np.ndarray:
    """:func:`adjust` of every row of ``pvalues`` (one family per row, no NaN), vectorised for the
    simulated studies: statsmodels' ``multipletests`` runs a full garbage collection on every call
    (0.2 s each with pandas loaded), too slow for thousands of families. Benjamini-Hochberg is
    scipy's ``false_discovery_control``; Holm is its step-down maximum of ``(m - i + 1) p_(i)``
    (Holm 1979), checked equal to statsmodels' in tests/test_verdicts.py."""
    from scipy import stats

    p = np.asarray(pvalues, dtype=float)
    if method == "bh":
        return stats.false_discovery_control(p, axis=1)
    if method != "holm":
        raise ValueError(f"correction {method!r} is not vectorised: choose holm or bh")
    m = p.shape[1]
    order = np.argsort(p, axis=1)
    ranked = np.take_along_axis(p, order, axis=1) * (m - np.arange(m))
    stepped = np.minimum(1.0, np.maximum.accumulate(ranked, axis=1))
    out = np.empty_like(p)
    np.put_along_axis(out, order, stepped, axis=1)
    return out


def fmt(value: float, digits: int = 3) -> str:
    """A number for a sentence: ``digits`` significant digits, an en dash when missing."""
    if value is None or not math.isfinite(value):
        return "\u2013"
    return f"{value:.{digits}g}"


def fmt_p(p: float) -> str:
    """A p-value for a sentence: 2 significant digits, ``< 0.001`` below that."""
    if p is None or not math.isfinite(p):
        return "\u2013"
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def fmt_lr(lr: Optional[float]) -> str:
    if lr is None or not math.isfinite(lr):
        return "\u2013"
    return f"{lr:.0e}".replace("e-0", "e-") if float(f"{lr:.0e}") == lr else f"{lr:.2g}"


# ------------------------------------------------------------------------------ the verdict table

#: columns of :func:`verdict_table` (the columns of verdicts.csv), in order
VERDICT_COLUMNS = (
    "depth", "setting", "variant", "baseline", "verdict", "metric", "n_pairs", "diff", "low", "high", "sd_diff", "p",
    "p_adjusted", "correction", "mdd", "noise_floor", "variant_failed", "variant_finished", "baseline_failed",
    "baseline_finished", "failure_diff", "failure_p", "failure_p_adjusted", "variant_outcomes", "baseline_outcomes",
    "variant_lr", "baseline_lr", "tuned", "flops_ratio", "flops_n", "flops_diff", "flops_low", "flops_high",
    "sentence",
)
#: verdicts of a cell that has no evaluation runs because every rate of its grid failed
FAILING = "fails at every rate"
#: verdict of a comparison whose uncorrected interval excludes 0 while the corrected test does not reject
UNCORRECTED = "inconclusive (uncorrected only)"
#: FLOPs per token within this fraction of each other count as equal (the curves are read at evaluations)
FLOPS_TOLERANCE = 0.02
BASELINE_FAILING = "baseline fails at every rate"


def _outcome_text(counts: Dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if n) or "no finished run"


def _arm(runs, loss: str) -> Dict:
    """One arm of a comparison: loss per seed (completed runs), failures over finished runs."""
    import pandas as pd

    finished = runs[runs["outcome"].notna()]
    completed = runs[runs["status"] == "completed"]
    losses = pd.to_numeric(completed[loss], errors="coerce").astype(float)
    counts = finished["outcome"].value_counts().to_dict()
    lrs = pd.to_numeric(runs["lr"], errors="coerce").dropna().unique()
    return dict(loss=dict(zip(completed["seed"], losses)), finished=len(finished),
                failed=int((finished["outcome"] != "trained").sum()), counts={str(k): int(v) for k, v in counts.items()},
                lr=float(lrs[0]) if len(lrs) == 1 else math.nan)


def _equal_flops(var_runs, base_runs, curves, loss_curve: str = "val_loss") -> Tuple[float, Paired]:
    """(FLOPs-per-token ratio variant / baseline, the paired difference of the validation loss at
    the smaller of each pair's two training budgets) from the runs' logged curves."""
    import pandas as pd

    def cost(run) -> float:
        per_token = pd.to_numeric(pd.Series([run.get("flops_per_token")]), errors="coerce").iloc[0]
        return float(per_token) * float(run.get("train.batch_size", math.nan)) * float(run.get("train.seq_len", math.nan))

    pairs = {}
    for _, v in var_runs.iterrows():
        match = base_runs[base_runs["seed"] == v["seed"]]
        if len(match) == 1:
            pairs[v["seed"]] = (v, match.iloc[0])
    ratios, a, b = [], [], []
    for v, base in pairs.values():
        cv, cb = cost(v), cost(base)
        ratios.append(cv / cb if cb else math.nan)
        if curves is None or not (math.isfinite(cv) and math.isfinite(cb)):
            continue
        cv_curve = curves[curves["run_dir"] == v["run_dir"]].sort_values("step")
        cb_curve = curves[curves["run_dir"] == base["run_dir"]].sort_values("step")
        if cv_curve.empty or cb_curve.empty or loss_curve not in curves.columns:
            continue
        budget = min(cv * cv_curve["step"].max(), cb * cb_curve["step"].max()) * (1 + FLOPS_TOLERANCE)
        a.append(loss_at_budget(cv * cv_curve["step"], cv_curve[loss_curve], budget))
        b.append(loss_at_budget(cb * cb_curve["step"], cb_curve[loss_curve], budget))
    ratio = float(np.nanmean(ratios)) if ratios and np.isfinite(ratios).any() else math.nan
    return ratio, paired_difference(a, b)


def _compare(var_runs, base_runs, loss: str, curves) -> Dict:
    """The numbers of one comparison before correction (no verdict yet)."""
    var, base = _arm(var_runs, loss), _arm(base_runs, loss)
    seeds = sorted(set(var["loss"]) & set(base["loss"]))
    paired = paired_difference([var["loss"][s] for s in seeds], [base["loss"][s] for s in seeds])
    fdiff, fp = failure_difference(var["failed"], var["finished"], base["failed"], base["finished"])
    ratio, at_flops = _equal_flops(var_runs, base_runs, curves)
    return dict(n_pairs=paired.n, diff=paired.mean, low=paired.low, high=paired.high, sd_diff=paired.sd, p=paired.p,
                noise_floor=noise_floor(list(base["loss"].values())), variant_failed=var["failed"],
                variant_finished=var["finished"], baseline_failed=base["failed"], baseline_finished=base["finished"],
                failure_diff=fdiff, failure_p=fp, variant_outcomes=_outcome_text(var["counts"]),
                baseline_outcomes=_outcome_text(base["counts"]), variant_lr=var["lr"], baseline_lr=base["lr"],
                flops_ratio=ratio, flops_n=at_flops.n, flops_diff=at_flops.mean, flops_low=at_flops.low,
                flops_high=at_flops.high)


def _failing_row(cell: Optional[Dict], base_cell: Optional[Dict]) -> Optional[Dict]:
    """The row of a comparison whose variant or baseline failed at every rate of its grid."""
    if base_cell and base_cell.get("failing"):
        return dict(verdict=BASELINE_FAILING, baseline_outcomes=base_cell.get("outcomes", ""),
                    variant_outcomes=(cell or {}).get("outcomes", ""), variant_lr=(cell or {}).get("lr", math.nan))
    if cell and cell.get("failing"):
        return dict(verdict=FAILING, variant_outcomes=cell.get("outcomes", ""),
                    baseline_lr=(base_cell or {}).get("lr", math.nan))
    return None


def verdict_table(runs, baseline: str = "pre", loss: str = "final_val_loss", correction: str = "holm",
                  alpha: float = ALPHA, cells: Optional[Dict[Tuple[str, int], Dict]] = None, curves=None,
                  unit: str = "nats/token"):
    """One row per (depth, setting, variant other than ``baseline``) with :data:`VERDICT_COLUMNS`.

    ``runs``: a runs table (``variant``, ``depth``, ``seed``, ``lr``, ``status``, ``outcome``,
    ``loss``, optionally ``setting``, ``run_dir``, ``flops_per_token``, ``train.batch_size``,
    ``train.seq_len``); the runs of one (depth, setting) are paired by seed. ``cells``: for a study
    that tuned the rate, (variant, depth) -> ``{"lr", "failing", "outcomes"}``; a failing cell (no
    rate trained) gets a row of its own, never dropped. ``curves``: the steps table (``run_dir``,
    ``step``, ``val_loss``) for the loss at equal FLOPs. Loss p-values are corrected over every row
    (``correction``), failure-rate p-values over every row as their own family.
    """
    import pandas as pd

    runs = runs.copy()
    if "setting" not in runs.columns:
        runs["setting"] = ""
    runs["setting"] = runs["setting"].fillna("")
    runs["depth"] = pd.to_numeric(runs["depth"], errors="coerce")
    cells = cells or {}
    keys = {(int(d), s) for d, s in zip(runs["depth"], runs["setting"])}
    keys |= {(int(d), "") for (_, d) in cells}
    rows = []
    for depth, setting in sorted(keys):
        group = runs[(runs["depth"] == depth) & (runs["setting"] == setting)]
        variants = set(group["variant"]) | {v for (v, d) in cells if d == depth and setting == ""}
        for variant in sorted(variants - {baseline}):
            row = dict(depth=depth, setting=setting, variant=variant, baseline=baseline, metric=loss,
                       correction=correction, tuned=bool(cells))
            failing = _failing_row(cells.get((variant, depth)), cells.get((baseline, depth)))
            base_runs, var_runs = group[group["variant"] == baseline], group[group["variant"] == variant]
            if failing is None and base_runs.empty:
                failing = dict(verdict="no baseline runs", variant_outcomes="")
            row.update(failing if failing is not None else _compare(var_runs, base_runs, loss, curves))
            if cells and failing is None:
                row["variant_lr"] = cells.get((variant, depth), {}).get("lr", row.get("variant_lr"))
                row["baseline_lr"] = cells.get((baseline, depth), {}).get("lr", row.get("baseline_lr"))
            rows.append(row)
    table = pd.DataFrame(rows, columns=list(VERDICT_COLUMNS))
    if table.empty:
        return table
    for column in ("p", "failure_p", "diff", "low", "high", "sd_diff", "noise_floor"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    table["p_adjusted"] = adjust(table["p"], correction, alpha)
    table["failure_p_adjusted"] = adjust(table["failure_p"], correction, alpha)
    table["verdict"] = table["verdict"].astype(object)
    table["mdd"] = pd.to_numeric(table["mdd"], errors="coerce").astype(float)
    m = max(1, int(np.isfinite(table["p"]).sum()))
    for i, row in table.iterrows():
        if isinstance(row["verdict"], str):
            continue
        n = int(row["n_pairs"]) if pd.notna(row["n_pairs"]) else 0
        mdd = minimal_detectable_difference(row["sd_diff"], n, alpha / m)
        table.at[i, "mdd"] = mdd
        table.at[i, "verdict"] = classify(row["p_adjusted"], row["low"], row["high"], mdd, alpha)
    table["sentence"] = [sentence(row, unit, alpha) for _, row in table.iterrows()]
    return table


_CORRECTION_NAMES = {"holm": "Holm-adjusted", "bh": "BH-adjusted", "bonferroni": "Bonferroni-adjusted",
                     "none": "unadjusted"}


def _arms_text(row, vlabel: str, blabel: str) -> str:
    def one(label, failed, finished, outcomes):
        if not finished or not math.isfinite(float(finished)):
            return f"{label} no finished run"
        return f"{label} failed {int(failed)} of {int(finished)}" + (f" ({outcomes})" if failed else "")

    return (one(vlabel, row["variant_failed"], row["variant_finished"], row["variant_outcomes"]) + ", "
            + one(blabel, row["baseline_failed"], row["baseline_finished"], row["baseline_outcomes"]))


def _rates_text(row) -> str:
    if row["tuned"]:
        return f"each at its tuned rate: {fmt_lr(row['variant_lr'])} and {fmt_lr(row['baseline_lr'])}"
    if row["variant_lr"] == row["baseline_lr"]:
        return f"rates not tuned: both at {fmt_lr(row['variant_lr'])}"
    return f"rates not tuned: {fmt_lr(row['variant_lr'])} and {fmt_lr(row['baseline_lr'])}"


def sentence(row, unit: str = "nats/token", alpha: float = ALPHA) -> str:
    """The verdict of one row of :func:`verdict_table` as a sentence carrying its numbers."""
    from analysis.style import label

    v, b = label(row["variant"]), label(row["baseline"])
    where = f"depth {int(row['depth'])}" + (f" ({row['setting']})" if row["setting"] else "")
    verdict = row["verdict"]
    if verdict == FAILING:
        return (f"{where}: {v} failed at every rate of its grid ({row['variant_outcomes']}); "
                f"{b} trained at {fmt_lr(row['baseline_lr'])}")
    if verdict == BASELINE_FAILING:
        other = (f"{v} failed at every rate too ({row['variant_outcomes']})" if row["variant_outcomes"]
                 and math.isnan(float(row["variant_lr"])) else f"{v} trained at {fmt_lr(row['variant_lr'])}")
        return (f"{where}: {b} (the baseline) failed at every rate of its grid ({row['baseline_outcomes']}): "
                f"no comparison; {other}")
    if verdict == "no baseline runs":
        return f"{where}: no {b} runs to compare {v} with"
    padj = f"{_CORRECTION_NAMES.get(row['correction'], row['correction'])} p = {fmt_p(row['p_adjusted'])}"
    detail = f"{int(row['n_pairs'])} paired seeds, {padj}; {_arms_text(row, v, b)}; {_rates_text(row)}"
    if np.isfinite(row["flops_ratio"]) and abs(row["flops_ratio"] - 1) > FLOPS_TOLERANCE:
        detail += (f"; {v} spends {row['flops_ratio']:.2f}x the FLOPs per token, at equal FLOPs "
                   f"{fmt(row['flops_diff'], 2)} [{fmt(row['flops_low'], 2)}, {fmt(row['flops_high'], 2)}]")
    diff, low, high = row["diff"], row["low"], row["high"]
    if verdict in ("worse", "better"):
        size, lo, hi = (diff, low, high) if verdict == "worse" else (-diff, -high, -low)
        return f"{where}: {v} is {verdict} than {b} by {fmt(size, 2)} {unit} [{fmt(lo, 2)}, {fmt(hi, 2)}] ({detail})"
    if verdict == "no detectable difference":
        return (f"{where}: no detectable difference between {v} and {b}: {fmt(diff, 2)} {unit} "
                f"[{fmt(low, 2)}, {fmt(high, 2)}], inside the +-{fmt(row['mdd'], 2)} the study detects ({detail})")
    if verdict == UNCORRECTED:
        return (f"{where}: {v} vs {b}: {fmt(diff, 2)} {unit} [{fmt(low, 2)}, {fmt(high, 2)}] excludes 0 only before "
                f"the correction for {row['correction']} over the family ({detail})")
    why = ("fewer than 2 paired seeds with a finite loss" if not row["n_pairs"] or row["n_pairs"] < 2 else
           f"the interval reaches past the +-{fmt(row['mdd'], 2)} the study detects")
    return (f"{where}: {v} vs {b} is inconclusive: {fmt(diff, 2)} {unit} [{fmt(low, 2)}, {fmt(high, 2)}], "
            f"{why} ({detail})")


def lr_scaling(lr_table, top: Optional[float] = None) -> "object":
    """Per variant, the log-log slope of the largest stable learning rate against depth with its
    interval (:func:`loglog_slope`), from an LR-sensitivity table (variant, depth,
    largest_stable_lr; several rows per depth, e.g. seeds, are averaged on the log scale first).
    ``censored``: the depths whose largest stable rate is ``top``, the grid's highest rate (the
    grid does not bound it there, so the slope there is a bound, not a measurement)."""
    import pandas as pd

    rows = []
    for variant, group in lr_table.groupby("variant", sort=True):
        lsl = pd.to_numeric(group["largest_stable_lr"], errors="coerce")
        by_depth = np.exp(np.log(lsl.where(lsl > 0)).groupby(group["depth"]).mean())
        fit = loglog_slope(by_depth.index.to_numpy(dtype=float), by_depth.to_numpy(dtype=float))
        censored = [] if top is None else sorted(int(d) for d, v in lsl.groupby(group["depth"]) if (v >= top).all())
        rows.append(dict(variant=variant, depths=int(by_depth.notna().sum()), slope=fit.slope, low=fit.low,
                         high=fit.high, censored=censored))
    return pd.DataFrame(rows, columns=["variant", "depths", "slope", "low", "high", "censored"])
