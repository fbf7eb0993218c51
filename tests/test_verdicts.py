"""The verdict statistics against published values, and the honesty tests on simulated studies."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis import verdicts

# Student's sleep data (Cushny and Peebles 1905), as in R's `t.test(extra ~ group, sleep, paired = TRUE)`:
# t = -4.0621, df = 9, p-value = 0.002833, 95% CI [-2.4598858, -0.7001142], mean difference -1.58
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_difference_matches_the_published_sleep_test():
    d = verdicts.paired_difference(SLEEP_1, SLEEP_2)
    assert d.n == 10
    assert d.mean == pytest.approx(-1.58)
    assert (d.low, d.high) == pytest.approx((-2.4598858, -0.7001142), abs=1e-6)
    assert d.p == pytest.approx(0.002833, abs=5e-7)


def test_paired_difference_keeps_only_finite_pairs():
    d = verdicts.paired_difference([1.0, 2.0, math.nan, 4.0], [0.5, 1.0, 1.0, math.inf])
    assert d.n == 2 and d.mean == pytest.approx(0.75)
    one = verdicts.paired_difference([1.0], [0.0])
    assert one.n == 1 and math.isnan(one.p) and math.isnan(one.low)


@pytest.mark.parametrize("df,value", [(1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042)])
def test_t_critical_matches_the_printed_table(df, value):
    assert verdicts.t_critical(df) == pytest.approx(value, abs=5e-4)


# Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score)
@pytest.mark.parametrize("k,n,low,high", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                                          (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_newcombe(k, n, low, high):
    assert verdicts.wilson_interval(k, n) == pytest.approx((low, high), abs=5e-5)


def test_holm_and_bh_match_their_definitions():
    # Holm (1979): sorted p_(i) times (m - i + 1), made monotone; BH (1995): p_(i) m / i, made monotone
    p = [0.01, 0.04, 0.03, 0.005]
    assert verdicts.adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert verdicts.adjust(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    out = verdicts.adjust([0.01, math.nan, 0.04], "holm")  # NaN is not a member of the family
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="holm"):
        verdicts.adjust(p, "sidak?")


@pytest.mark.parametrize("method", ["holm", "bh"])
def test_the_vectorised_correction_equals_statsmodels(method):
    rows = np.random.default_rng(3).uniform(0, 0.2, size=(20, 6))
    expected = np.stack([verdicts.adjust(row, method) for row in rows])
    assert verdicts.adjust_rows(rows, method) == pytest.approx(expected)


def test_fisher_matches_the_tea_tasting_experiment():
    # Fisher (1935): 3 of 4 cups right, two-sided p = 34/70 = 0.4857
    diff, p = verdicts.failure_difference(3, 4, 1, 4)
    assert diff == pytest.approx(0.5) and p == pytest.approx(34 / 70)
    assert verdicts.failure_difference(3, 3, 0, 3)[1] == pytest.approx(0.1)  # 2 / C(6, 3)
    assert verdicts.failure_difference(0, 3, 0, 3, "barnard") == (0.0, 1.0)
    assert math.isnan(verdicts.failure_difference(0, 0, 1, 3)[1])


def test_minimal_detectable_difference_matches_cohen():
    # Cohen (1988) / R pwr.t.test(d = 0.8, power = 0.8, type = "paired"): n = 14.30278
    assert verdicts.minimal_detectable_difference(1.0, 14.30278) == pytest.approx(0.8, abs=1e-4)
    assert verdicts.minimal_detectable_difference(2.0, 14.30278) == pytest.approx(1.6, abs=2e-4)
    assert math.isnan(verdicts.minimal_detectable_difference(1.0, 1))
    assert verdicts.power_at(0.8, 1.0, 14.30278) == pytest.approx(0.8, abs=1e-4)


def test_loglog_slope_recovers_a_power_law_and_matches_ols():
    exact = verdicts.loglog_slope([6, 12, 24, 48], [3e-3 * (d / 6) ** -0.5 for d in (6, 12, 24, 48)])
    assert exact.slope == pytest.approx(-0.5) and exact.high - exact.low == pytest.approx(0, abs=1e-9)
    import statsmodels.api as sm

    rng = np.random.default_rng(1)
    x = np.array([4.0, 8, 16, 32, 64])
    y = 0.01 * x ** -1.0 * np.exp(rng.normal(0, 0.2, x.size))
    fit = verdicts.loglog_slope(x, y)
    ols = sm.OLS(np.log(y), sm.add_constant(np.log(x))).fit()
    assert (fit.low, fit.high) == pytest.approx(tuple(ols.conf_int(0.05)[1]))
    assert math.isnan(verdicts.loglog_slope([6, 24], [1e-3, 5e-4]).low)  # 2 points: no interval


def test_loss_at_budget_takes_the_last_point_within_budget():
    assert verdicts.loss_at_budget([10, 20, 30], [3.0, 2.0, 1.0], 25) == 2.0
    assert math.isnan(verdicts.loss_at_budget([10, 20], [3.0, 2.0], 5))


# ---------------------------------------------------------------------- honesty (simulated studies)

def test_aa_studies_keep_the_corrected_false_positive_rate_at_most_alpha():
    """A/A: every variant's runs come from the baseline's distribution; over many simulated studies
    shaped like a report (variants against one shared baseline, paired by seed), the rate at which
    the Holm-corrected report calls anything different is at most 5%, up to three Monte Carlo
    standard errors (with one comparison the true rate is exactly 5%, so the estimate itself lands
    on either side of it; measured 0.0487, 0.0506, 0.0446 over 100,000 studies)."""
    n = 50_000
    tolerance = 3 * math.sqrt(verdicts.ALPHA * (1 - verdicts.ALPHA) / n)
    for n_variants, seeds in ((5, 3), (1, 3), (10, 5)):
        hits, _ = verdicts.simulate_studies(n, seeds, n_variants, effect=0.0, seed=n_variants)
        assert (hits > 0).mean() <= verdicts.ALPHA + tolerance, (n_variants, seeds, (hits > 0).mean())


def test_a_planted_difference_is_found_at_the_claimed_power():
    """A difference of the minimal detectable size (its definition: power 0.8 at alpha / m) is
    found in at least 80% of the studies, less three Monte Carlo standard errors."""
    sd, seeds, n_variants, n_studies = 1.0, 5, 4, 20_000
    mdd = verdicts.minimal_detectable_difference(sd * math.sqrt(2), seeds, verdicts.ALPHA / n_variants)
    _, found = verdicts.simulate_studies(n_studies, seeds, n_variants, effect=mdd, sd=sd, seed=7)
    floor = verdicts.POWER - 3 * math.sqrt(verdicts.POWER * (1 - verdicts.POWER) / n_studies)
    assert found.mean() >= floor, found.mean()


def _runs(rows):
    return pd.DataFrame(rows, columns=["variant", "depth", "seed", "lr", "status", "outcome", "final_val_loss"])


def test_a_cell_that_fails_at_every_rate_is_reported_not_dropped():
    rows = [("pre", 6, s, 1e-3, "completed", "trained", 2.0 + 0.01 * s) for s in (1, 2, 3)]
    rows += [("post", 6, s, 1e-3, "completed", "trained", 2.5 + 0.01 * s) for s in (1, 2, 3)]
    rows += [("pre", 24, s, 1e-3, "completed", "trained", 1.9 + 0.01 * s) for s in (1, 2, 3)]
    cells = {("pre", 6): dict(lr=1e-3, failing=False), ("post", 6): dict(lr=1e-3, failing=False),
             ("pre", 24): dict(lr=1e-3, failing=False),
             ("post", 24): dict(lr=math.nan, failing=True, outcomes="3 diverged, 2 stalled")}
    table = verdicts.verdict_table(_runs(rows), cells=cells)
    failing = table[(table["depth"] == 24) & (table["variant"] == "post")]
    assert list(failing["verdict"]) == [verdicts.FAILING]
    assert "failed at every rate" in failing["sentence"].iloc[0] and "3 diverged" in failing["sentence"].iloc[0]


def test_untuned_seeds_that_all_fail_keep_their_row_and_failure_test():
    rows = [("pre", 6, s, 1e-2, "completed", "trained", 2.0 + 0.01 * s) for s in (0, 1, 2)]
    rows += [("post", 6, s, 1e-2, "diverged", "diverged", math.nan) for s in (0, 1, 2)]
    row = verdicts.verdict_table(_runs(rows)).iloc[0]
    assert row["verdict"] == "inconclusive" and row["variant_failed"] == 3 and row["baseline_failed"] == 0
    assert row["failure_p"] == pytest.approx(0.1)
    assert "rates not tuned" in row["sentence"] and "failed 3 of 3" in row["sentence"]


def test_a_clear_difference_reads_as_a_sentence_with_its_numbers():
    rng = np.random.default_rng(0)
    rows = []
    for s in range(5):
        base = 2.0 + rng.normal(0, 0.01)
        rows += [("pre", 48, s, 3e-3, "completed", "trained", base),
                 ("post", 48, s, 1e-3, "completed", "stalled", base + 0.8 + rng.normal(0, 0.01))]
    cells = {("pre", 48): dict(lr=3e-3, failing=False), ("post", 48): dict(lr=1e-3, failing=False)}
    row = verdicts.verdict_table(_runs(rows), cells=cells).iloc[0]
    assert row["verdict"] == "worse" and row["low"] > 0.75
    text = row["sentence"]
    assert text.startswith("depth 48: Post-LN is worse than Pre-LN by 0.8") or "is worse than" in text
    assert "5 paired seeds, Holm-adjusted p =" in text and "each at its tuned rate: 1e-3 and 3e-3" in text


def test_no_detectable_difference_only_inside_the_detectable_range():
    assert verdicts.classify(0.5, -0.01, 0.01, 0.05) == "no detectable difference"
    assert verdicts.classify(0.5, -0.2, 0.1, 0.05) == "inconclusive"
    assert verdicts.classify(0.16, -0.11, -0.02, 0.15) == verdicts.UNCORRECTED
    assert verdicts.classify(0.001, 0.1, 0.2, 0.05) == "worse"
    assert verdicts.classify(0.001, -0.2, -0.1, 0.05) == "better"
    assert verdicts.classify(math.nan, math.nan, math.nan, math.nan) == "inconclusive"


def test_the_study_knows_the_reports_corrections():
    from resnorm.sweep.study import CORRECTIONS

    assert set(CORRECTIONS) == set(verdicts.CORRECTIONS)


def test_a_rate_tuned_at_the_edge_of_the_grid_is_named():
    from analysis.verdict_report import edge_lines

    lrs = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    cells = {("pre", 6): dict(lr=3e-2, failing=False), ("post", 6): dict(lr=1e-3, failing=False),
             ("post", 48): dict(lr=float("nan"), failing=True), ("pre", 48): dict(lr=3e-4, failing=False)}
    (blank, line) = edge_lines(cells, lrs)
    assert blank == "" and line.startswith("Tuned at the edge of the rate grid")
    assert "Pre-LN at depth 6 (3e-2, the highest)" in line and "Pre-LN at depth 48 (3e-4, the lowest)" in line
    assert "Post-LN" not in line  # 1e-3 is inside the grid; a cell that failed everywhere has no rate
    assert edge_lines({("post", 6): dict(lr=1e-3, failing=False)}, lrs) == []
    assert edge_lines(None, lrs) == []


def test_wilson_bounds_hold_the_rate_exactly_at_zero_and_all():
    # statsmodels' Wilson bound for 0 of 3 is 5.6e-17, above the rate: an error bar below 0 in the figure
    assert verdicts.wilson_interval(0, 3)[0] == 0.0 and verdicts.wilson_interval(3, 3)[1] == 1.0
    for k, n in [(0, 3), (3, 3), (1, 3), (0, 1), (5, 5)]:
        low, high = verdicts.wilson_interval(k, n)
        assert low <= k / n <= high


def test_a_largest_stable_rate_at_the_top_of_the_grid_is_a_bound_not_a_slope():
    table = pd.DataFrame(dict(variant=["pre"] * 3 + ["post"] * 3, depth=[6, 24, 48] * 2,
                              largest_stable_lr=[3e-2, 3e-2, 3e-2, 3e-2, 1e-2, 3e-3]))
    fits = verdicts.lr_scaling(table, top=3e-2).set_index("variant")
    assert fits.loc["pre", "censored"] == [6, 24, 48]
    assert fits.loc["post", "censored"] == [6] and fits.loc["post", "slope"] < 0
    assert verdicts.lr_scaling(table).set_index("variant").loc["pre", "censored"] == []


def test_downstream_scores_are_judged_by_seed_pairs():
    """The verdict rules on fine-tuned scores (higher is better): a variant 0.1 above the baseline on
    every seed is better, a copy of the baseline is not, and each is judged against its n-gram floor."""
    from analysis.downstream import COLUMNS, downstream_verdicts

    rng = np.random.default_rng(0)
    base = 0.6 + 0.02 * rng.standard_normal(6)
    rows = []
    for variant, scores in (("pre", base), ("post", base + 0.1 + 0.005 * rng.standard_normal(6)), ("same", base)):
        for seed, score in enumerate(scores):
            rows.append(dict(run_dir=f"{variant}{seed}", variant=variant, depth=2, seed=seed, setting="", task="t",
                             task_metric="accuracy", task_score=score, task_majority_accuracy=0.4,
                             floor_majority=0.4, floor_ngram=0.6, floor_probe=0.5, recipe_lr=1e-3, status="completed"))
    rows.append({**rows[0], "seed": 9, "status": "failed"})  # not completed: left out
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    out = downstream_verdicts(table).set_index(["variant", "against"])
    assert out.loc[("post", "pre"), "verdict"] == "better" and out.loc[("post", "pre"), "n_pairs"] == 6
    assert out.loc[("post", "pre"), "difference"] == pytest.approx(float(np.mean(table[table.variant == "post"].task_score.iloc[:6].to_numpy() - base)))
    assert out.loc[("post", "floor_ngram"), "verdict"] == "better"
    assert out.loc[("same", "pre"), "verdict"] not in ("better", "worse")  # identical scores: nothing to test
    assert out.loc[("pre", "floor_ngram"), "verdict"] not in ("better", "worse")  # the floor's level, within noise
    assert ("pre", "pre") not in out.index
    assert (out["p_adjusted"].dropna() >= out["p"].dropna()).all()  # Holm never lowers a p
