"""Tests of the analysis package on fake sweeps written exactly as training writes them.

A fake job folder holds ``summary.json`` (with the nested resolved ``config``), ``metrics.parquet``
and ``layers.parquet``; the sweep mixes completed runs, a diverged run, a failed run without tables,
a corrupt summary and a hidden folder that must be ignored.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

N_STEPS = 20
EVAL_STEPS = (9, 19)


def _env():
    """Environment for subprocesses: the repository on the path, whatever the cwd."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "MPLBACKEND": "Agg"}


def config(variant, depth, seed, lr):
    return {
        "depth": depth, "seed": seed, "name": "fake",
        "model": {"norm": variant, "d_model": 16, "n_heads": 2, "betas": [0.9, 0.95]},
        "optim": {"lr": lr, "warmup_steps": 2},
        "train": {"steps": N_STEPS},
        "data": {"name": "synthetic"},
    }


def losses_for(base):
    """A smoothly decaying loss from base + 3 down towards base (no spike)."""
    return [base + 3.0 * math.exp(-t / 4) for t in range(N_STEPS)]


def write_run(root: Path, *, variant, depth, seed=0, lr=1e-3, status="completed", losses=None,
              diverged_step=None, tables=True, name=None, final_val=None, best_val=None,
              extra_overrides=(), layers=True):
    """Write one job folder per the data contract; return it."""
    overrides = [f"model.norm={variant}", f"depth={depth}", f"seed={seed}", *extra_overrides, "name=fake"]
    run_name = name or ",".join(sorted(o for o in overrides if not o.startswith("name=")))
    run_dir = root / run_name
    run_dir.mkdir(parents=True)
    losses = list(losses) if losses is not None else []
    summary = {
        "status": status, "diverged_step": diverged_step,
        "diverge_reason": "non-finite loss (inf)" if status == "diverged" else None,
        "initial_loss": losses[0] if losses else None,
        "final_train_loss": float(np.mean([v for v in losses[-5:] if np.isfinite(v)])) if losses else None,
        "final_val_loss": final_val, "best_val_loss": best_val,
        "tokens_per_s": 1000.0 if losses else None, "wall_s": 2.5, "steps_done": len(losses),
        "n_params": 1234 * depth, "torch_version": "2.13.0+cpu", "git_commit": "abc123def4567890",
        "run_name": run_name, "overrides": overrides, "config": config(variant, depth, seed, lr),
        "variant": variant, "depth": depth, "seed": seed, "error": "RuntimeError: boom" if status == "failed" else None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if tables and losses:
        steps = np.arange(len(losses))
        val = [losses[t] + 0.1 if t in EVAL_STEPS else np.nan for t in steps]
        pd.DataFrame({"step": steps, "train_loss": losses, "lr": lr * np.minimum(1, (steps + 1) / 2),
                      "grad_norm": np.full(len(steps), 0.5), "tokens_per_s": np.full(len(steps), 1000.0),
                      "val_loss": val}).to_parquet(run_dir / "metrics.parquet")
    if tables and losses and layers:
        rows = []
        steps = np.arange(len(losses))
        for step in steps[::5].tolist() + ([int(steps[-1])] if steps[-1] % 5 else []):
            for layer in range(depth):
                for sub, scale in (("attn", 3.0), ("mlp", 4.0)):
                    value = scale * (layer + 1) * (step + 1)
                    if status == "diverged" and step == steps[-1]:
                        value = math.inf
                    rows.append((step, layer, sub, "grad_norm", float(value)))
                    rows.append((step, layer, sub, "act_rms", 1.0))
        pd.DataFrame(rows, columns=["step", "layer", "sublayer", "quantity", "value"]).to_parquet(
            run_dir / "layers.parquet")
    return run_dir


def spiky_losses():
    losses = losses_for(2.0)
    losses[15] = 3 * losses[14]  # one spike, well above 1.25 x the running median
    return losses


def build_sweep(root: Path) -> Path:
    """The standard fake sweep (see the module docstring); returns its folder."""
    sweep = root / "multirun" / "fakesweep"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    write_run(sweep, variant="pre", depth=2, seed=0, losses=losses_for(2.0), final_val=2.10, best_val=2.05)
    write_run(sweep, variant="pre", depth=2, seed=1, losses=losses_for(2.2), final_val=2.30, best_val=2.25)
    write_run(sweep, variant="pre", depth=4, seed=0, losses=spiky_losses(), final_val=2.00, best_val=1.95)
    write_run(sweep, variant="post", depth=2, seed=0, losses=losses_for(2.5), final_val=2.60, best_val=2.60)
    diverging = losses_for(2.5)[:12] + [math.inf]
    write_run(sweep, variant="post", depth=4, seed=0, status="diverged", losses=diverging, diverged_step=12,
              best_val=2.9)
    write_run(sweep, variant="deepnorm", depth=4, seed=0, status="failed", tables=False)
    corrupt = sweep / "model.norm=rmsnorm,depth=2"
    corrupt.mkdir()
    (corrupt / "summary.json").write_text('{"status": "compl')
    hidden = sweep / ".trash" / "old"
    write_run(hidden.parent, variant="pre", depth=8, name="old", losses=losses_for(1.0))
    return sweep


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    return build_sweep(tmp_path_factory.mktemp("sweeps"))


@pytest.fixture(scope="module")
def sweep(sweep_dir):
    from analysis.load import load_sweep

    with pytest.warns(UserWarning, match="rmsnorm"):
        return load_sweep(sweep_dir)


@pytest.fixture(scope="module")
def report(sweep_dir, tmp_path_factory):
    from analysis.report import make_report

    out = tmp_path_factory.mktemp("report") / "fakesweep"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corrupt summary's warning is tested elsewhere
        written = make_report(sweep_dir, out)
    return out, written


# ---------------------------------------------------------------------------------------- loading


def test_runs_table_has_one_row_per_readable_job(sweep, sweep_dir):
    runs = sweep.runs
    assert len(runs) == 6  # corrupt summary and hidden folder skipped
    assert sweep.name == "fakesweep"
    assert sorted(runs["status"]) == ["completed"] * 4 + ["diverged", "failed"]
    assert not runs["run_dir"].str.contains(".trash", regex=False).any()
    for column in ("run_dir", "run_name", "status", "diverged_step", "final_val_loss", "best_val_loss",
                   "n_params", "variant", "depth", "seed", "lr", "model.norm", "model.d_model",
                   "optim.lr", "optim.warmup_steps", "train.steps", "data.name", "setting"):
        assert column in runs.columns, column
    post4 = runs[(runs["variant"] == "post") & (runs["depth"] == 4)].iloc[0]
    assert post4["status"] == "diverged" and post4["diverged_step"] == 12
    assert math.isnan(post4["final_val_loss"]) and post4["best_val_loss"] == pytest.approx(2.9)
    assert runs["lr"].tolist() == [1e-3] * 6
    assert runs["model.betas"].iloc[0] == (0.9, 0.95)
    assert set(runs["setting"]) == {""}  # only variant, depth and seed vary
    assert sweep.axes == ["model.norm", "depth", "seed"]


def test_steps_and_layers_tables(sweep):
    steps, layers = sweep.steps, sweep.layers
    assert len(steps) == 4 * N_STEPS + 13  # the failed run has no table, the diverged one stops
    for column in ("run_dir", "variant", "depth", "seed", "lr", "step", "train_loss", "step_lr",
                   "grad_norm", "tokens_per_s", "val_loss"):
        assert column in steps.columns, column
    assert steps["lr"].eq(1e-3).all()  # the run's configured rate; the schedule is step_lr
    assert steps["step_lr"].iloc[0] == pytest.approx(5e-4)
    diverged = steps[(steps["variant"] == "post") & (steps["depth"] == 4)]
    assert diverged["step"].max() == 12 and np.isinf(diverged["train_loss"].iloc[-1])
    assert steps["val_loss"].notna().sum() == 4 * len(EVAL_STEPS) + 1  # the diverged run evaluated at 9
    # layers: logged steps 0, 5, 10, 15, 19 (0, 5, 10, 12 for the diverged run) x depth blocks
    # x 2 sublayers x 2 quantities
    per_run = layers.groupby("run_dir").size()
    assert sorted(per_run.tolist()) == [5 * 2 * 2 * 2] * 3 + [4 * 4 * 2 * 2, 5 * 4 * 2 * 2]
    assert set(layers["quantity"]) == {"grad_norm", "act_rms"}


def test_missing_path_empty_folder_and_file_are_clear_errors(tmp_path):
    from analysis.load import load_sweep

    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_sweep(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_sweep(tmp_path / "empty")
    (tmp_path / "afile.txt").write_text("x")
    with pytest.raises(ValueError, match="afile"):
        load_sweep(tmp_path / "afile.txt")


def test_corrupt_summary_alone_is_warned_then_no_run(tmp_path):
    from analysis.load import load_run, load_sweep

    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "summary.json").write_text("[1, 2")
    with pytest.warns(UserWarning, match=r"job.summary\.json"):
        with pytest.raises(ValueError, match="no run"):
            load_sweep(tmp_path)
    with pytest.raises(ValueError, match="not valid JSON"):
        load_run(tmp_path / "job")


def test_run_without_config_falls_back_to_hydra_config_then_overrides(tmp_path):
    from analysis.load import load_run

    early = tmp_path / "early"
    (early / ".hydra").mkdir(parents=True)
    (early / ".hydra" / "config.yaml").write_text("depth: 8\nseed: 3\nmodel:\n  norm: dyt\noptim:\n  lr: 0.01\n")
    (early / "summary.json").write_text(json.dumps({"status": "failed", "run_name": "early", "overrides": []}))
    info = load_run(early).info
    assert (info["variant"], info["depth"], info["seed"], info["lr"]) == ("dyt", 8, 3, 0.01)
    assert info["status"] == "failed"

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "summary.json").write_text(json.dumps(
        {"status": "failed", "overrides": ["+model.norm=rezero", "depth=16", "optim.lr=3e-3"]}))
    run = load_run(bare)
    assert (run.info["variant"], run.info["depth"], run.info["lr"]) == ("rezero", 16, 3e-3)
    assert run.info["seed"] is None and run.info["run_name"] == "bare"
    assert run.steps is None and run.layers is None


def test_lr_axis_becomes_the_setting(tmp_path):
    from analysis.load import load_sweep, sweep_axes

    for lr in (1e-3, 3e-2):
        write_run(tmp_path, variant="pre", depth=2, lr=lr, losses=losses_for(2.0), final_val=2.1,
                  extra_overrides=[f"optim.lr={lr}"])
    sweep = load_sweep(tmp_path)
    assert sweep.axes == ["optim.lr"]
    assert sorted(sweep.runs["setting"]) == ["optim.lr=0.001", "optim.lr=0.03"]
    assert sweep_axes([["a=1", "b=2"], ["a=1", "b=3"], ["a=1"]]) == ["b"]


# ------------------------------------------------------------------------------------------ style


def test_palette_is_fixed_distinct_and_order_independent():
    from analysis import style

    from resnorm.config.variants import VARIANTS

    assert set(VARIANTS) <= set(style.KNOWN_VARIANTS)  # every registered variant has a fixed colour
    assert style.KNOWN_VARIANTS[:5] == ["noresidual", "post", "pre", "rmsnorm", "deepnorm"]
    everything = style.KNOWN_VARIANTS + ["zeta_norm", "alpha_norm"]
    full = style.palette(everything)
    assert len(set(full.values())) == len(everything)  # all distinct
    assert full["pre"] == "#1f77b4" and full["post"] == "#d62728"
    assert style.palette(["pre"]) == {"pre": full["pre"]}
    assert style.palette(reversed(everything)) == full  # same colours whatever the order
    assert style.palette(["zeta_norm", "post"])["zeta_norm"] == full["zeta_norm"]
    assert all(c.startswith("#") and len(c) == 7 for c in full.values())


def test_unknown_colour_depends_only_on_the_name_across_processes():
    from analysis import style

    code = "from analysis.style import colour; print(colour('my_new_norm'))"
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True,
                         env={**_env(), "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert out == style.colour("my_new_norm")
    assert style.colour("my_new_norm") != style.colour("my_new_norm2")


def test_order_and_labels():
    from analysis import style

    assert style.order(["zeta", "post", "alpha", "pre", "noresidual", "pre", None, float("nan")]) == [
        "noresidual", "post", "pre", "alpha", "zeta"]
    assert [style.label(v) for v in ("post", "pre", "rmsnorm", "deepnorm", "noresidual", "xyz")] == [
        "Post-LN", "Pre-LN", "Pre-RMSNorm", "DeepNorm", "No residual", "xyz"]


# ---------------------------------------------------------------------------------------- metrics


def test_spikes_by_hand():
    from analysis.metrics import count_loss_spikes, spike_steps

    losses = [4, 4, 4, 4, 4, 6, 4, 4, 5.5, 5.5, 4]
    # step 5: median of [4]*5 is 4 and 6 > 1.25*4 = 5; steps 8, 9: median 4, 5.5 > 5 (one spike)
    mask = spike_steps(losses, window=5, factor=1.25, min_history=3)
    assert np.flatnonzero(mask).tolist() == [5, 8, 9]
    assert count_loss_spikes(losses, window=5, factor=1.25, min_history=3) == 2
    # a higher factor keeps only the first (6 > 1.4*4 = 5.6, 5.5 is not)
    assert count_loss_spikes(losses, window=5, factor=1.4, min_history=3) == 1
    # non-finite values are skipped in the median and never spikes; too little history: no spike
    assert count_loss_spikes([4, np.nan, 4, 4, np.inf, 9], window=5, factor=1.25, min_history=3) == 1
    assert count_loss_spikes([4, 9, 9], window=5, factor=1.25, min_history=3) == 0
    with pytest.raises(ValueError, match="min_history"):
        spike_steps([1.0], window=3, min_history=4)


def test_lr_sensitivity_reproduces_the_paper_note():
    from analysis.metrics import best_loss, largest_stable_lr, lr_sensitivity

    lrs = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    l0 = math.log(64)
    off = pd.DataFrame({"lr": lrs, "final_val_loss": [2.82, 2.52, 2.42, 2.37, 2.37, 2.48, 4.11]})
    on = pd.DataFrame({"lr": lrs, "final_val_loss": [2.82, 2.53, 2.42, 2.38, 2.36, 2.46, 2.56]})
    # (0.45 + 0.15 + 0.05 + 0 + 0 + 0.11 + 1.74) / 7 and (0.46 + 0.17 + 0.06 + 0.02 + 0 + 0.10 + 0.20) / 7
    assert lr_sensitivity(off, initial_loss=l0) == pytest.approx(2.50 / 7)
    assert lr_sensitivity(on, initial_loss=l0) == pytest.approx(1.01 / 7)
    assert best_loss(off, initial_loss=l0) == pytest.approx((2.37, 1e-2))  # tie: smallest rate
    # 4.11 at 3e-1 is below ln 64 = 4.159 but not by the 0.1 nat a stable run needs
    assert largest_stable_lr(off, initial_loss=l0) == pytest.approx(1e-1)
    assert largest_stable_lr(off, initial_loss=l0, margin=0.0) == pytest.approx(3e-1)
    assert largest_stable_lr(on, initial_loss=l0) == pytest.approx(3e-1)


def test_lr_sensitivity_diverged_nan_failed_and_clipping():
    from analysis.metrics import largest_stable_lr, lr_sensitivity, lr_sensitivity_table

    df = pd.DataFrame({
        "lr": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
        "final_val_loss": [3.0, 2.5, 4.5, np.nan, 2.0, 2.8],
        "status": ["completed", "completed", "completed", "completed", "diverged", "failed"],
        "initial_loss": [4.0, 4.0, 4.0, 4.0, 4.0, np.nan],
    })
    # l0 = 4; clipped: 3.0, 2.5, 4.0 (4.5 clipped), 4.0 (NaN), 4.0 (diverged, its 2.0 ignored);
    # the failed run is left out; l* = 2.5 -> (0.5 + 0 + 1.5 + 1.5 + 1.5) / 5
    assert lr_sensitivity(df) == pytest.approx(5.0 / 5)
    assert lr_sensitivity(df, lr_range=(1e-3, 3e-3)) == pytest.approx(0.5 / 2)
    assert largest_stable_lr(df) == pytest.approx(3e-3)  # 1e-2 ends above l0, 3e-2 NaN, 1e-1 diverged
    assert math.isnan(lr_sensitivity(df.iloc[:0]))
    with pytest.raises(ValueError, match="more than once"):
        lr_sensitivity(pd.concat([df, df]))

    seeds = pd.concat([df.assign(seed=0, variant="pre", depth=2),
                       df.assign(seed=1, variant="pre", depth=2,
                                 final_val_loss=[3.0, 2.5, 2.2, 2.1, 2.0, 2.8], status="completed")])
    table = lr_sensitivity_table(seeds, by=["variant", "depth", "seed"])
    assert table["seed"].tolist() == [0, 1]
    assert table["lr_sensitivity"].iloc[0] == pytest.approx(1.0)
    # seed 1: all six completed; l0 = 4 (median of finite initial losses); l* = 2.0
    assert table["lr_sensitivity"].iloc[1] == pytest.approx((1.0 + 0.5 + 0.2 + 0.1 + 0 + 0.8) / 6)
    assert table["best_lr"].tolist() == pytest.approx([3e-3, 1e-1])
    assert table["largest_stable_lr"].tolist() == pytest.approx([3e-3, 3e-1])
    assert table["n_lr"].tolist() == [5, 6]
    # several seeds at one rate: the rate is stable only if every seed is (1e-1: seed 0 diverged,
    # 3e-2: NaN, 1e-2: above l0); at 3e-1 seed 0 failed (left out) and seed 1 is stable
    assert largest_stable_lr(seeds[seeds["lr"] <= 0.1]) == pytest.approx(3e-3)
    assert largest_stable_lr(seeds) == pytest.approx(3e-1)


def test_t_critical_matches_the_t_table():
    from analysis.metrics import t_critical

    # two-sided 95% (and one 90%) critical values of Student's t from the printed table
    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 30: 2.0423, 120: 1.9799}
    for df, value in table.items():
        assert t_critical(df) == pytest.approx(value, abs=5e-5), df
    assert t_critical(2, confidence=0.90) == pytest.approx(2.9200, abs=5e-5)
    assert t_critical(100000) == pytest.approx(1.95996, abs=5e-5)  # the normal limit
    for bad in (0, 1.5, -1):
        with pytest.raises(ValueError, match="degrees of freedom"):
            t_critical(bad)
    with pytest.raises(ValueError, match="confidence"):
        t_critical(3, confidence=1.0)


def test_mean_ci_by_hand():
    from analysis.metrics import mean_ci

    mean, half = mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3, t(0.975, 2) = 4.302653
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    mean, half = mean_ci([2.1, 2.3])  # sd 0.1414, n 2, t(0.975, 1) = 12.706205
    assert mean == pytest.approx(2.2) and half == pytest.approx(12.706205 * 0.1, rel=1e-6)
    assert mean_ci([1.0, 2.0, 3.0, math.nan, math.inf, -math.inf]) == mean_ci([1.0, 2.0, 3.0])  # non-finite out
    mean, half = mean_ci([5.0])
    assert mean == 5.0 and math.isnan(half)
    assert all(math.isnan(v) for v in mean_ci([]))
    assert mean_ci([4.0, 4.0, 4.0]) == (4.0, 0.0)


def test_wilson_interval_by_hand():
    from analysis.metrics import wilson_interval

    # published 95% Wilson intervals
    assert wilson_interval(0, 3) == pytest.approx((0.0, 0.5615), abs=5e-5)
    assert wilson_interval(1, 3) == pytest.approx((0.0615, 0.7923), abs=5e-5)
    assert wilson_interval(3, 3) == pytest.approx((0.4385, 1.0), abs=5e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=5e-5)
    # k = 1, n = 2 by the formula: centre 1/2, half = z / (1 + z^2/2) * sqrt(1/8 + z^2/16)
    z = 1.959964
    half = z / (1 + z * z / 2) * math.sqrt(1 / 8 + z * z / 16)
    assert wilson_interval(1, 2) == pytest.approx((0.5 - half, 0.5 + half), rel=1e-6)
    low, high = wilson_interval(0, 1)
    assert low == 0.0 and 0 < high < 1  # not the empty [0, 0] of the normal approximation
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="k <= n"):
        wilson_interval(3, 2)


def test_seed_summary_by_hand():
    from analysis.metrics import SEED_COLUMNS, seed_summary

    rows = [  # (variant, depth, setting, status, final_val_loss)
        ("pre", 2, "", "completed", 2.0), ("pre", 2, "", "completed", 2.2), ("pre", 2, "", "completed", 2.4),
        ("post", 2, "", "completed", 3.0), ("post", 2, "", "diverged", 1.0),  # a diverged loss is not averaged
        ("post", 2, "", "failed", math.nan), ("post", 2, "", "running", 2.5),  # neither is counted
        ("post", 4, "", "diverged", math.nan), ("post", 4, "", "diverged", math.nan),
        ("pre", 2, "optim.lr=0.1", "completed", 9.0),  # another setting is another group
    ]
    runs = pd.DataFrame(rows, columns=["variant", "depth", "setting", "status", "final_val_loss"])
    table = seed_summary(runs)
    assert list(table.columns) == ["variant", "depth", "setting", *SEED_COLUMNS]
    got = {(r.variant, r.depth, r.setting): r for r in table.itertuples()}
    assert len(got) == 4

    pre = got[("pre", 2, "")]
    assert (pre.runs, pre.finished, pre.diverged, pre.n) == (3, 3, 0, 3)
    assert pre.mean == pytest.approx(2.2) and pre.ci95 == pytest.approx(4.302653 * 0.2 / math.sqrt(3), rel=1e-6)
    assert pre.failure_rate == 0.0 and (pre.failure_low, pre.failure_high) == pytest.approx((0, 0.5615), abs=5e-5)
    post = got[("post", 2, "")]
    assert (post.runs, post.finished, post.diverged, post.n) == (4, 2, 1, 1)
    assert post.failure_rate == 0.5 and post.mean == 3.0 and math.isnan(post.ci95)
    assert (post.trained, post.stalled, post.nonfinite) == (1, 0, 0)  # no reason column: a loss blow-up
    assert (post.failure_low, post.failure_high) == pytest.approx((0.0945, 0.9055), abs=5e-5)
    deep = got[("post", 4, "")]
    assert (deep.diverged, deep.failure_rate, deep.n) == (2, 1.0, 0) and math.isnan(deep.mean)
    other = got[("pre", 2, "optim.lr=0.1")]
    assert (other.runs, other.mean) == (1, 9.0)

    no_finished = seed_summary(runs[runs["status"].isin(["failed", "running"])])
    assert no_finished["finished"].tolist() == [0] and math.isnan(no_finished["failure_rate"].iloc[0])


def test_seed_summary_csv_and_table_in_the_report(report):
    out, _ = report
    table = pd.read_csv(out / "seed_summary.csv", keep_default_na=False, na_values=[""])
    # variant order, then depth: post 2, post 4, pre 2 (two seeds), pre 4, deepnorm 4 (failed)
    assert list(zip(table["variant"], table["depth"])) == [("post", 2), ("post", 4), ("pre", 2), ("pre", 4),
                                                           ("deepnorm", 4)]
    pre2 = table.iloc[2]
    assert (pre2["runs"], pre2["n"], pre2["trained"], pre2["diverged"]) == (2, 2, 2, 0)
    assert pre2["mean"] == pytest.approx(2.2) and pre2["ci95"] == pytest.approx(12.706205 * 0.1, rel=1e-6)
    post4 = table.iloc[1]
    # its reason is a non-finite loss: a nonfinite outcome, not a loss blow-up
    assert (post4["nonfinite"], post4["diverged"], post4["finished"], post4["failure_rate"], post4["n"]) == (
        1, 0, 1, 1.0, 0)
    assert table.iloc[4]["finished"] == 0 and math.isnan(table.iloc[4]["failure_rate"])
    text = (out / "report.md").read_text()
    assert "| pre | 2 | 2 | 2/0/0/0 | 0.00 [0.00, 0.66] | 2.2 \u00b1 1.27 (n=2) |" in text
    assert "| post | 4 | 1 | 0/0/0/1 | 1.00 [0.21, 1.00] | \u2013 |" in text


def test_run_metrics_counts_spikes_per_run(sweep):
    from analysis.metrics import RUN_METRIC_COLUMNS, run_metrics

    table = run_metrics(sweep)
    assert list(table.columns) == list(RUN_METRIC_COLUMNS) + ["setting"]
    spikes = dict(zip(zip(table["variant"], table["depth"], table["seed"]), table["loss_spikes"]))
    assert spikes[("pre", 4, 0)] == 1
    assert spikes[("pre", 2, 0)] == 0 and spikes[("post", 4, 0)] == 0  # inf at divergence is no spike
    assert pd.isna(spikes[("deepnorm", 4, 0)])  # failed, no metrics


def test_layer_profile_combines_sublayers_and_picks_first_and_last_finite_step(sweep):
    from analysis.figures_layers import block_profile

    profile = block_profile(sweep.layers)
    pre4 = profile[profile["run_dir"].str.endswith("depth=4,model.norm=pre,seed=0")]
    assert sorted(set(pre4["step"])) == [0, 19]
    # attn 3*(l+1)*(s+1), mlp 4*(l+1)*(s+1): block norm 5*(l+1)*(s+1)
    last = pre4[pre4["step"] == 19].sort_values("layer")
    assert last["value"].tolist() == pytest.approx([5 * (l + 1) * 20 for l in range(4)])
    assert set(pre4["when"]) == {"step 0", "last logged step"}
    # the diverged run's last logged step (12) is inf: its last finite step (10) is used
    post4 = profile[profile["run_dir"].str.endswith("depth=4,model.norm=post,seed=0")]
    assert sorted(set(post4["step"])) == [0, 10]


def test_block_values_combine_sublayers_per_quantity():
    from analysis.figures_layers import block_values

    layers = pd.DataFrame({
        "run_dir": "r", "step": 0, "layer": [0, 0, 0, 0, 0, 0, 1, 1],
        "sublayer": ["attn", "mlp"] * 4, "quantity": ["grad_norm"] * 2 + ["act_rms"] * 2 + ["update_ratio"] * 2
                                                     + ["act_rms"] * 2,
        "value": [3.0, 4.0, 3.0, 4.0, 1e-3, 3e-3, 2.0, math.nan]})
    assert block_values(layers, "grad_norm")["value"].tolist() == pytest.approx([5.0])  # sqrt(9 + 16)
    act = block_values(layers, "act_rms")
    assert act["value"].iloc[0] == pytest.approx(math.sqrt(12.5))  # RMS over the two streams
    assert np.isinf(act["value"].iloc[1])  # a NaN sublayer spoils its block
    assert block_values(layers, "update_ratio")["value"].tolist() == pytest.approx([math.sqrt(5e-6)])
    assert block_values(layers, "branch_ratio").empty


def test_depth_thirds_cover_every_third_at_every_depth():
    from analysis.figures_layers import depth_thirds

    def groups(depth):
        blocks = depth_thirds(pd.DataFrame({"layer": range(depth), "depth": depth}))
        return {g: rows["layer"].tolist() for g, rows in blocks.groupby("group", sort=False)}

    assert groups(1) == {"first third": [0], "middle third": [0], "last third": [0]}
    assert groups(2) == {"first third": [0], "middle third": [0, 1], "last third": [1]}
    assert groups(4) == {"first third": [0, 1], "middle third": [1, 2], "last third": [2, 3]}
    assert groups(6) == {"first third": [0, 1], "middle third": [2, 3], "last third": [4, 5]}  # a partition


#: what the LR-grid sweep holds (analysis.plots.NEEDS): no spike data and no monitor quantity
LR_SWEEP_HAS = ("depths", "lrs", "probes")


def build_lr_sweep(root: Path) -> Path:
    """Two variants x depths 2, 4 x three learning rates x two seeds, initial loss 5.0. Pre-LN trains
    everywhere; Post-LN at depth 2 diverges at 1e-1 on seed 1 only; at depth 4 it diverges at 1e-2
    and 1e-1 and ends at 4.95 (less than 0.1 nat below the initial loss) at 1e-3."""
    sweep = root / "lrsweep"
    finals = {  # (variant, depth) -> per rate, the final loss of seeds 0 and 1 (None: diverged)
        ("pre", 2): [(2.6, 2.62), (2.4, 2.42), (2.3, 2.32)], ("pre", 4): [(2.5, 2.52), (2.3, 2.32), (2.2, 2.22)],
        ("post", 2): [(2.7, 2.72), (2.5, 2.52), (2.4, None)], ("post", 4): [(4.95, 4.97), (None, None), (None, None)]}
    for (variant, depth), grid in finals.items():
        for lr, per_seed in zip((1e-3, 1e-2, 1e-1), grid):
            for seed, final in enumerate(per_seed):
                if final is None:
                    write_run(sweep, variant=variant, depth=depth, seed=seed, lr=lr, status="diverged",
                              losses=losses_for(2.0)[:6] + [math.inf], diverged_step=6,
                              extra_overrides=[f"optim.lr={lr}"])
                else:
                    write_run(sweep, variant=variant, depth=depth, seed=seed, lr=lr, losses=losses_for(2.0),
                              final_val=final, extra_overrides=[f"optim.lr={lr}"])
    return sweep


def test_lr_grid_figures_and_tables(tmp_path):
    from analysis import metrics, plots
    from analysis.load import load_sweep
    from analysis.report import make_report

    sweep_dir = build_lr_sweep(tmp_path)
    sweep = load_sweep(sweep_dir)
    runs, keys = metrics.lr_sweep_runs(sweep)
    assert keys == []
    stable = {key: metrics.largest_stable_lr(g) for key, g in runs.groupby(["variant", "depth"])}
    assert stable[("pre", 2)] == stable[("pre", 4)] == 1e-1
    assert stable[("post", 2)] == 1e-2  # 1e-1 diverged on one of the two seeds
    assert math.isnan(stable[("post", 4)])  # 4.95 is not 0.1 nat below 5.0; the rest diverged

    written = make_report(sweep_dir, tmp_path / "out")
    names = [p.name for p in written]
    drawn = plots.drawable(LR_SWEEP_HAS)  # no spike data and no monitor quantity in these runs
    # two seeds of pre and post: paired verdicts against Pre-LN (analysis.verdict_report), rates not tuned
    assert names == ["summary.csv", *(f"{name}.png" for name in drawn), "seed_summary.csv", "lr_sensitivity.csv",
                     "verdicts.csv", "verdicts.png", "report.md"]
    for path in written:
        assert path.stat().st_size > 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "The learning rates were not tuned" in text
    not_drawn = [line for line in text.splitlines() if "Not drawn" in line]
    assert [line.split(":")[1].strip() for line in not_drawn] == [n for n in plots.FIGURES if n not in drawn]
    assert all(line.startswith("_Not drawn: ") and ": skipped, " in line for line in not_drawn), not_drawn
    seeds = pd.read_csv(tmp_path / "out" / "seed_summary.csv")
    post2 = seeds[(seeds["variant"] == "post") & (seeds["depth"] == 2) & (seeds["setting"] == "optim.lr=0.1")]
    assert post2[["runs", "nonfinite", "failure_rate", "n"]].values.tolist() == [[2, 1, 0.5, 1]]
    lrt = pd.read_csv(tmp_path / "out" / "lr_sensitivity.csv")
    post4 = lrt[(lrt["variant"] == "post") & (lrt["depth"] == 4)]
    # per seed: 4.95, 5.0 (diverged), 5.0 (diverged): l* = 4.95 (seed 0), 4.97 (seed 1)
    assert post4["lr_sensitivity"].tolist() == pytest.approx([0.05 * 2 / 3, 0.03 * 2 / 3])
    assert post4["largest_stable_lr"].isna().all()

    one_depth = load_sweep(sweep_dir)
    one_depth.runs = one_depth.runs[one_depth.runs["depth"] == 2]
    for name in [n for n, needs in plots.NEEDS.items() if "depths" in needs]:
        assert plots.FIGURES[name](one_depth, tmp_path / f"{name}.png") is None, name
        assert not (tmp_path / f"{name}.png").exists()


# ---------------------------------------------------------------------------------- figures, report


#: what the standard fake sweep holds (analysis.plots.NEEDS): one learning rate and no spike or monitor
#: data, so none of the LR-grid figures, spike_rate or monitor_profiles
FAKE_SWEEP_HAS = ("depths", "probes")


def _fake_figures():
    from analysis import plots

    return [f"{name}.png" for name in plots.drawable(FAKE_SWEEP_HAS)]


FAKE_FIGURES = _fake_figures()


def test_report_writes_every_file(report):
    out, written = report
    names = [p.name for p in written]
    assert names == ["summary.csv", *FAKE_FIGURES, "seed_summary.csv", "report.md"]
    for path in written:
        assert path.parent == out and path.stat().st_size > 0
    for name in FAKE_FIGURES:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_summary_csv_rows(report):
    out, _ = report
    table = pd.read_csv(out / "summary.csv")
    assert list(table.columns) == [
        "run_name", "variant", "depth", "seed", "lr", "status", "outcome", "diverged_step", "final_train_loss",
        "final_val_loss", "best_val_loss", "unigram_loss", "loss_spikes", "tokens_per_s", "wall_s", "n_params",
        "tokenizer", "final_val_bpb", "best_val_bpb", "run_dir"]
    assert len(table) == 6
    # sorted by variant order (post before pre before deepnorm), then depth and seed
    assert list(zip(table["variant"], table["depth"], table["seed"])) == [
        ("post", 2, 0), ("post", 4, 0), ("pre", 2, 0), ("pre", 2, 1), ("pre", 4, 0), ("deepnorm", 4, 0)]
    row = table.iloc[1]
    assert row["status"] == "diverged" and row["diverged_step"] == 12 and math.isnan(row["final_val_loss"])
    assert row["run_dir"] == "depth=4,model.norm=post,seed=0"  # relative to the sweep
    assert table.loc[4, "loss_spikes"] == 1 and table.loc[4, "final_val_loss"] == pytest.approx(2.0)
    assert table.loc[5, "status"] == "failed" and math.isnan(table.loc[5, "loss_spikes"])
    assert table.loc[2, "n_params"] == 1234 * 2


def test_report_markdown_embeds_figures_and_table(report):
    out, _ = report
    text = (out / "report.md").read_text()
    for name in FAKE_FIGURES:
        assert f"]({name})" in text
    for name in ("stability_frontier", "lr_depth_heatmap", "lr_sensitivity_vs_depth"):
        assert (f"_Not drawn: {name}: skipped, needs at least 2 learning rates among the finished runs, "
                "the sweep has 1._") in text
    # the run column keeps only the swept overrides (not the constant name=fake)
    assert "| model.norm=post,depth=4,seed=0 | post | 4 | 0 | 0.001 | diverged | nonfinite | 12 |" in text
    assert "6 runs (4 completed, 1 diverged, 1 failed; outcomes: 4 trained, 1 nonfinite)" in text
    # these summaries predate outcome and unigram_loss: the report says how outcomes were decided
    assert "4 completed run(s) recorded no `unigram_loss`" in text and "count as trained" in text
    assert "## LR sensitivity\n" not in text and "LR sensitivity** (Wortsman" not in text  # one LR only


def test_figures_skip_without_data_and_report_says_so(tmp_path, caplog):
    from analysis import plots
    from analysis.load import load_sweep
    from analysis.report import make_report

    sweep_dir = tmp_path / "nolayers"
    for variant in ("pre", "post"):
        write_run(sweep_dir, variant=variant, depth=2, losses=losses_for(2.0), final_val=2.1, layers=False)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "layer_profiles.png").write_bytes(b"stale")  # from an earlier report of other data
    assert plots.layer_profiles(load_sweep(sweep_dir), out / "x.png") is None
    assert "no run wrote layers.parquet" in caplog.text
    written = make_report(sweep_dir, out)
    assert [p.name for p in written] == ["summary.csv", *(f"{n}.png" for n in plots.drawable(())),
                                         "seed_summary.csv", "report.md"]
    assert not (out / "layer_profiles.png").exists() and not (out / "x.png").exists()
    text = (out / "report.md").read_text()
    assert "_Not drawn: layer_profiles: skipped, no run wrote layers.parquet._" in text
    assert "_Not drawn: coord_check: skipped, no run wrote layers.parquet._" in text
    assert "_Not drawn: failure_rate: skipped, needs at least 2 depths, the sweep has 1._" in text


def test_lr_sweep_report_has_lr_sensitivity(tmp_path):
    from analysis.report import make_report

    sweep_dir = tmp_path / "lrsweep"
    finals = {"a": {1e-3: 2.6, 1e-2: 2.2, 1e-1: None}, "b": {1e-3: 2.5, 1e-2: 2.4, 1e-1: 2.3}}
    for experiment, grid in finals.items():  # a config-group override: not a config column
        for lr, final in grid.items():
            status = "completed" if final else "diverged"
            losses = losses_for(2.0) if final else losses_for(2.0)[:6] + [math.nan]
            write_run(sweep_dir, variant="pre", depth=2, lr=lr, status=status, losses=losses,
                      final_val=final, diverged_step=None if final else 6, layers=False,
                      extra_overrides=[f"optim.lr={lr}", f"experiment={experiment}"])
    written = make_report(sweep_dir, tmp_path / "out")
    assert "lr_sensitivity.csv" in [p.name for p in written]
    table = pd.read_csv(tmp_path / "out" / "lr_sensitivity.csv")
    assert table["experiment"].tolist() == ["a", "b"]
    l0 = 2.0 + 3.0  # initial loss of losses_for(2.0)
    assert table["lr_sensitivity"].tolist() == pytest.approx([(0.4 + 0 + (l0 - 2.2)) / 3, (0.2 + 0.1) / 3])
    assert table["largest_stable_lr"].tolist() == pytest.approx([1e-2, 1e-1])
    assert "## LR sensitivity" in (tmp_path / "out" / "report.md").read_text()


# ------------------------------------------------------ outcomes, failure rate, spikes, monitor profiles

UNIGRAM = 3.3


def store_run(root: Path, name: str, *, variant="post", depth=2, seed=0, lr=1e-3, status="completed",
              final_val=2.0, steps=10, spikes=(), layers=(), **summary) -> Path:
    """A run folder written through resnorm.runs.folder.RunStore, as the training writes it: ``steps``
    step rows (``spike`` set at ``spikes``), ``layers`` as (quantity, {sublayer: value}) per block at
    steps 0 and steps - 1, and a summary with ``summary``'s extra keys (outcome, unigram_loss, ...)."""
    from resnorm.runs.folder import RunStore

    store = RunStore(root / name)
    for step in range(steps):
        store.add_step(step, 5.0 - 0.2 * step, lr, 1.0, 1000.0, val_loss=final_val if step == steps - 1 else None,
                       spike=step in spikes)
    for step in (0, steps - 1):
        for quantity, per_sub in layers:
            labels = [(layer, sub) for layer in range(depth) for sub in per_sub]
            store.add_layers(step, labels, quantity, [per_sub[sub] * (layer + 1) for layer, sub in labels])
    store.flush_tables()
    store.write_summary(dict(status=status, final_val_loss=final_val if status == "completed" else None,
                             initial_loss=5.0, steps_done=steps, run_name=name, config=config(variant, depth, seed, lr),
                             overrides=[f"model.norm={variant}", f"depth={depth}", f"seed={seed}"], **summary))
    return root / name


def test_outcome_column_given_and_derived(tmp_path):
    from analysis.load import load_sweep

    sweep_dir = tmp_path / "outcomes"
    store_run(sweep_dir, "given", outcome="stalled", unigram_loss=UNIGRAM, final_val=3.0)  # the writer's word
    store_run(sweep_dir, "derived_stalled", seed=1, unigram_loss=UNIGRAM, final_val=3.25)  # > 3.3 - 0.1
    store_run(sweep_dir, "derived_margin", seed=2, unigram_loss=UNIGRAM, stall_margin=0.5, final_val=3.0)
    store_run(sweep_dir, "derived_trained", seed=3, unigram_loss=UNIGRAM, final_val=3.1)  # 0.2 below
    store_run(sweep_dir, "no_baseline", seed=4, final_val=3.29)  # no unigram_loss: counts as trained
    store_run(sweep_dir, "blew_up", seed=5, status="diverged", diverge_reason="loss 11.2 > 2 x initial 5.0")
    store_run(sweep_dir, "nan", seed=6, status="diverged", diverge_reason="non-finite loss (nan) at blocks.1")
    store_run(sweep_dir, "grad", seed=7, status="diverged", diverge_kind="nonfinite_grad")
    store_run(sweep_dir, "crashed", seed=8, status="failed", outcome=None)
    runs = load_sweep(sweep_dir).runs.set_index("run_name")
    assert runs["outcome"].drop("crashed").to_dict() == {
        "given": "stalled", "derived_stalled": "stalled", "derived_margin": "stalled", "derived_trained": "trained",
        "no_baseline": "trained", "blew_up": "diverged", "nan": "nonfinite", "grad": "nonfinite"}
    assert pd.isna(runs.loc["crashed", "outcome"])  # a failed run has no outcome
    assert not runs.loc["given", "outcome_derived"] and not runs.loc["crashed", "outcome_derived"]
    assert runs.loc["derived_stalled", "outcome_derived"] and runs.loc["no_baseline", "outcome_derived"]
    assert runs.loc["given", "unigram_loss"] == UNIGRAM and math.isnan(runs.loc["no_baseline", "unigram_loss"])


def build_outcome_sweep(root: Path) -> Path:
    """Post-LN over seeds 0-2 at depths 2 and 4: at 2, one seed stalled and two trained; at 4, one
    stalled, one diverged, one non-finite; plus a failed run (no outcome). Pre-LN trains everywhere
    and records spikes (3 in 10 steps at depth 2, 1 at depth 4); Post-LN has a spike column only."""
    sweep = root / "outcomes"
    for depth, kinds in ((2, ("stalled", "trained", "trained")), (4, ("stalled", "diverged", "nonfinite"))):
        for seed, outcome in enumerate(kinds):
            status = "completed" if outcome in ("stalled", "trained") else "diverged"
            store_run(sweep, f"post-{depth}-{seed}", depth=depth, seed=seed, status=status, outcome=outcome,
                      unigram_loss=UNIGRAM, final_val=3.29 if outcome == "stalled" else 2.0,
                      spikes=(4,) if seed == 0 else ())
        store_run(sweep, f"pre-{depth}", variant="pre", depth=depth, outcome="trained", unigram_loss=UNIGRAM,
                  spike_count=3 if depth == 2 else 1, spike_steps=[3, 5, 7] if depth == 2 else [4])
    store_run(sweep, "post-4-crash", depth=4, seed=3, status="failed", outcome=None)
    return sweep


def test_failure_rate_per_depth_with_wilson_bounds_by_hand(tmp_path):
    from analysis import figures_stability
    from analysis.load import load_sweep
    from analysis.report import make_report

    sweep = load_sweep(build_outcome_sweep(tmp_path))
    found = figures_stability._failure_table(sweep)
    assert found is not None
    table = found[1].set_index(["variant", "depth"])
    post2, post4 = table.loc[("post", 2)], table.loc[("post", 4)]
    assert (post2["runs"], post2["finished"], post2["trained"], post2["stalled"]) == (3, 3, 2, 1)
    assert (post4["runs"], post4["finished"], post4["stalled"], post4["diverged"], post4["nonfinite"]) == (4, 3, 1, 1, 1)
    # Wilson, z = 1.959964: 1 of 3 -> (0.0615, 0.7923); 3 of 3 -> (0.4385, 1)
    z2 = 1.959964 ** 2
    centre = (1 / 3 + z2 / 6) / (1 + z2 / 3)
    half = 1.959964 / (1 + z2 / 3) * math.sqrt((1 / 3) * (2 / 3) / 3 + z2 / 36)
    assert post2["failure_rate"] == pytest.approx(1 / 3)
    assert (post2["failure_low"], post2["failure_high"]) == pytest.approx((centre - half, centre + half), abs=1e-6)
    assert (post2["failure_low"], post2["failure_high"]) == pytest.approx((0.0615, 0.7923), abs=5e-5)
    assert post4["failure_rate"] == 1.0
    assert (post4["failure_low"], post4["failure_high"]) == pytest.approx((3 / (3 + z2), 1.0), abs=1e-6)
    assert table.loc[("pre", 4), "failure_rate"] == 0.0

    out = tmp_path / "out"
    written = [p.name for p in make_report(sweep.path, out)]
    assert "failure_rate.png" in written and "divergence_rate.png" not in written
    seeds = pd.read_csv(out / "seed_summary.csv")
    assert {"trained", "stalled", "diverged", "nonfinite", "failure_rate", "failure_low", "failure_high"} <= set(
        seeds.columns)
    assert "| post | 4 | 4 | 0/1/1/1 | 1.00 [0.44, 1.00] |" in (out / "report.md").read_text()


def test_stalled_run_is_not_stable_but_lr_sensitivity_keeps_its_loss():
    from analysis.metrics import largest_stable_lr, lr_sensitivity

    grid = pd.DataFrame({"lr": [1e-3, 1e-2, 1e-1], "final_val_loss": [2.5, 2.2, 3.25], "initial_loss": 5.0,
                         "status": "completed", "outcome": ["trained", "trained", "stalled"]})
    # 3.25 is well below 5.0 - 0.1, but the run sits at the unigram loss: not stable
    assert largest_stable_lr(grid) == 1e-2
    assert largest_stable_lr(grid.drop(columns="outcome")) == 1e-1  # without outcomes only the losses decide
    assert lr_sensitivity(grid) == pytest.approx((0.3 + 0.0 + 1.05) / 3)  # the stalled run's own loss
    nonfinite = grid.assign(final_val_loss=[2.5, 2.2, 2.1], outcome=["trained", "trained", "nonfinite"])
    assert largest_stable_lr(nonfinite) == 1e-2


def test_spike_rate_figure_drawn_from_spike_data_and_skipped_without(tmp_path, caplog):
    from analysis import metrics, plots
    from analysis.load import load_sweep

    sweep = load_sweep(build_outcome_sweep(tmp_path))
    rates = metrics.spike_rates(sweep).merge(sweep.runs[["run_dir", "run_name"]], on="run_dir")
    got = dict(zip(rates["run_name"], rates["spike_rate"]))
    assert got["pre-2"] == pytest.approx(300.0) and got["pre-4"] == pytest.approx(100.0)  # spike_count / 10 steps
    assert got["post-2-0"] == pytest.approx(100.0) and got["post-2-1"] == 0.0  # from the spike column
    assert plots.spike_rate(sweep, tmp_path / "spike_rate.png") == tmp_path / "spike_rate.png"
    assert (tmp_path / "spike_rate.png").read_bytes()[:8] == PNG_MAGIC

    old = tmp_path / "old"  # written before spike detection: no spike column, no spike_count
    for depth in (2, 4):
        write_run(old, variant="pre", depth=depth, losses=losses_for(2.0), final_val=2.1)
    assert metrics.spike_rates(load_sweep(old)).empty
    assert plots.spike_rate(load_sweep(old), tmp_path / "none.png") is None
    assert "spike_rate: skipped, no run recorded spike data" in caplog.text and not (tmp_path / "none.png").exists()


def test_profiles_draw_every_recorded_quantity(tmp_path):
    from analysis import figures_layers, plots
    from analysis.load import load_sweep

    sweep_dir = tmp_path / "monitor"
    layers = [("grad_norm", {"attn": 3.0, "mlp": 4.0}), ("act_rms", {"attn": 1.0, "mlp": 1.0}),
              ("update_grad_cos", {"attn": -0.2, "mlp": -0.4}),  # signed: a linear axis, mean per block
              ("attn_entropy_mean", {"attn": 1.5, "mlp": math.nan}),  # attention only: the MLP is left out
              ("dyt_alpha", {"attn": math.nan, "mlp": math.nan})]  # NaN only: no row
    for depth in (2, 3):
        store_run(sweep_dir, f"pre-{depth}", variant="pre", depth=depth, outcome="trained", layers=layers)
    sweep = load_sweep(sweep_dir)
    monitor = ["update_grad_cos", "attn_entropy_mean", "dyt_alpha"]
    rows = figures_layers._profile_rows(sweep, monitor)
    assert sorted(set(rows["quantity"])) == ["attn_entropy_mean", "update_grad_cos"]
    cos = rows[(rows["quantity"] == "update_grad_cos") & rows["run_dir"].str.endswith("pre-2")]
    assert sorted(set(cos["step"])) == [0, 9]  # the first and the last logged step
    assert cos[cos["step"] == 9].sort_values("layer")["value"].tolist() == pytest.approx([-0.3, -0.6])
    entropy = rows[(rows["quantity"] == "attn_entropy_mean") & rows["run_dir"].str.endswith("pre-3")]
    assert entropy[entropy["step"] == 9].sort_values("layer")["value"].tolist() == pytest.approx([1.5, 3.0, 4.5])
    assert plots.layer_profiles(sweep, tmp_path / "layer_profiles.png") is not None
    assert plots.monitor_profiles(sweep, tmp_path / "monitor_profiles.png") == tmp_path / "monitor_profiles.png"
    assert "monitor_profiles" in plots.FIGURES


def test_report_names_the_sweep_relative_to_the_cwd(sweep_dir, tmp_path, monkeypatch):
    from analysis.report import make_report, sweep_source

    assert sweep_source(tmp_path / "a" / "b", cwd=tmp_path) == "`a/b`"
    assert sweep_source(tmp_path, cwd=tmp_path) == "`.`"
    outside = sweep_source(tmp_path, cwd=tmp_path / "a")
    assert outside == f"`{tmp_path.resolve()}` (outside the directory the report was made in)"
    monkeypatch.chdir(sweep_dir.parent.parent)  # the folder holding multirun/
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_report(sweep_dir, tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Source: `multirun/fakesweep`: 6 runs" in text and str(sweep_dir.parent) not in text


# ------------------------------------------------------------------------------- CLI and callback


def test_cli_writes_results_under_cwd(sweep_dir, tmp_path):
    proc = subprocess.run([PYTHON, "-m", "analysis", str(sweep_dir)], cwd=tmp_path, capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "results" / "fakesweep"
    printed = [tmp_path / p for p in proc.stdout.split()]  # relative to the cwd, as the default is
    assert printed == [out / n for n in ("summary.csv", *FAKE_FIGURES, "seed_summary.csv", "report.md")]
    assert all(Path(p).stat().st_size > 0 for p in printed)


def test_cli_bad_path_is_one_line_and_nonzero(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "analysis", str(tmp_path / "missing_sweep")], cwd=tmp_path,
                          capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing_sweep" in lines[0]
    assert not (tmp_path / "results").exists()


def test_callback_on_a_real_omegaconf_config(sweep_dir, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from analysis.callback import AnalysisCallback

    monkeypatch.chdir(tmp_path)  # a relative out_root is taken from the launching directory
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AnalysisCallback(out_root="res").on_multirun_end(config=cfg)
    out = tmp_path / "res" / "fakesweep"
    assert sorted(p.name for p in out.iterdir()) == sorted(FAKE_FIGURES + ["report.md", "seed_summary.csv",
                                                                           "summary.csv"])
    assert len(pd.read_csv(out / "summary.csv")) == 6


def test_callback_never_raises_and_can_be_disabled(tmp_path, caplog):
    from omegaconf import OmegaConf

    from analysis.callback import AnalysisCallback

    missing = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "gone")}}})
    AnalysisCallback(out_root=str(tmp_path / "res")).on_multirun_end(config=missing)
    assert "analysis of the sweep failed" in caplog.text and "FileNotFoundError" in caplog.text
    AnalysisCallback(out_root=str(tmp_path / "res")).on_multirun_end(config=OmegaConf.create({}))
    assert "no hydra.sweep.dir" in caplog.text
    sweep = build_sweep(tmp_path / "s")
    on = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    AnalysisCallback(out_root=str(tmp_path / "res"), enabled=False).on_multirun_end(config=on)
    assert not (tmp_path / "res").exists()


def test_light_imports_and_no_training_code():
    code = textwrap.dedent("""
        import sys
        import analysis, analysis.callback, analysis.style
        heavy = [m for m in ("pandas", "matplotlib", "seaborn", "torch", "resnorm") if m in sys.modules]
        import analysis.report, analysis.plots, analysis.metrics, analysis.load
        # the run folder's format is shared with training through the run store (resnorm.runs) alone
        training = [m for m in sys.modules if m.split(".")[0] == "torch"
                    or (m.startswith("resnorm.") and m.split(".")[:2] != ["resnorm", "runs"])]
        print(heavy, training)
    """)
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=_env(), check=True,
                         cwd=ROOT).stdout.strip()
    assert out == "[] []"


APP = '''
import json, os
import hydra
import pandas as pd
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

ConfigStore.instance().store(name="cfg", node={
    "depth": 2, "seed": 0, "model": {"norm": "pre"}, "optim": {"lr": 1e-3},
    "hydra": {"job": {"chdir": True},
              "sweep": {"dir": "multirun/e2e-${now:%H%M%S%f}", "subdir": "${hydra.job.override_dirname}"},
              "callbacks": {"analysis": {"_target_": "analysis.callback.AnalysisCallback", "out_root": "results"}}}})


@hydra.main(version_base="1.3", config_path=None, config_name="cfg")
def main(cfg):
    hc = HydraConfig.get()
    losses = [3.0 + cfg.depth / 10 - 0.1 * t for t in range(5)]
    pd.DataFrame({"step": range(5), "train_loss": losses, "lr": [cfg.optim.lr] * 5, "grad_norm": [1.0] * 5,
                  "tokens_per_s": [10.0] * 5, "val_loss": [float("nan")] * 4 + [losses[-1]]}).to_parquet("metrics.parquet")
    json.dump({"status": "completed", "run_name": hc.job.override_dirname, "overrides": list(hc.overrides.task),
               "config": OmegaConf.to_container(cfg, resolve=True), "initial_loss": losses[0],
               "final_val_loss": losses[-1], "final_train_loss": losses[-1]}, open("summary.json", "w"))


if __name__ == "__main__":
    main()
'''


def test_hydra_multirun_calls_the_callback(tmp_path):
    """A real ``-m`` sweep (jobs chdir into their folders, sweep dir with ${now:}) ends in a report
    under ``results/`` of the directory it was launched from."""
    (tmp_path / "app.py").write_text(APP)
    launch = tmp_path / "launch"
    launch.mkdir()
    proc = subprocess.run([PYTHON, str(tmp_path / "app.py"), "-m", "depth=2,4", "model.norm=pre,post"],
                          cwd=launch, capture_output=True, text=True, env=_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr
    (sweep,) = (launch / "multirun").iterdir()
    out = launch / "results" / sweep.name
    assert (out / "report.md").is_file() and (out / "depth_vs_val_loss.png").is_file()
    table = pd.read_csv(out / "summary.csv")
    assert sorted(zip(table["variant"], table["depth"])) == [("post", 2), ("post", 4), ("pre", 2), ("pre", 4)]
    assert table["final_val_loss"].tolist() == pytest.approx([2.8, 3.0, 2.8, 3.0])
