"""Xie et al. 2025 (mHC), the amplification figure: the composite gain of Hyper-Connections' residual
mixing matrices grows with depth and learning rate, while mHC's doubly stochastic ones keep it near 1;
and how often each fails (diverges or stalls) over an LR x depth grid.

Both variants train with the Wortsman et al. harness of ``wortsman_lr`` (AdamW 0.9/0.95, clip 1,
independent WD 1e-4, z-loss 1e-4, 5% warm-up, cosine to 10%; only a non-finite loss or gradient stops a
run) at d = 32, n = 4 streams, with the monitors on. The gains are the run's own monitors
(:mod:`resnorm.monitors.schemes`, ``layers.parquet``): ``hc_composite_row_gain`` (forward, the largest
absolute row sum) and ``hc_composite_col_gain`` (backward, column sum) of the product of every
sublayer's residual matrix from sublayer k to the top, every 25 steps and at the last; k = 0 is the
whole stack's. A run "fails" when its outcome is not ``trained`` (non-finite, or stalled within
``train.stall_margin`` of the unigram loss).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .common import figure, palette, save, spearman, two_depths
from .core import HAMLET, Claim, Experiment, Reference, Setting, Skip, register
from .training import data_label, data_name, data_spec, run_grid, run_layers

REF = Reference("mHC: Manifold-Constrained Hyper-Connections", "2512.24880",
                "the Amax Gain Magnitude figures (HC's composite mapping vs mHC's)", "Xie et al. 2025")
HC_REF = Reference("Hyper-Connections", "2409.19606", "Alg. 2 (the HC/DHC block)", "Zhu et al. 2024")
GAINS = ("hc_row_gain", "hc_col_gain", "hc_composite_row_gain", "hc_composite_col_gain")
SHAPE = dict(d_model=32, n_heads=2, d_ff=128, batch=8, seq_len=32, probes=True, probe_every=25, log_every=25)


def run(grid, ctx) -> pd.DataFrame:
    specs = [dict(variant=v, depth=L, lr=lr, seed=s, steps=grid["steps"], **SHAPE, **data_spec(grid))
             for s in grid["seeds"] for v in grid["variants"] for L in grid["depths"] for lr in grid["lrs"]]
    frames = []
    for r in run_grid(specs, ctx):
        frames.append(run_rows(r, run_layers(ctx, r, GAINS)))
    return pd.concat(frames, ignore_index=True)


def run_rows(r, layers: pd.DataFrame) -> pd.DataFrame:
    """One row per sublayer k at the run's last probed step (gains), with the run's outcome and its peaks
    over the probed steps: ``peak_gain`` (largest whole-stack composite gain, forward or backward) and
    ``peak_dev`` (largest |g - 1| of any composite gain)."""
    sp = r["spec"]
    run = dict(data=data_name(sp), variant=sp["variant"], depth=sp["depth"], lr=sp["lr"], seed=sp["seed"],
               final_eval_loss=r["final_eval_loss"], initial_loss=r["initial_loss"], diverged=r["diverged"],
               outcome=r["outcome"], trained=r["outcome"] == "trained")
    if layers.empty:
        return pd.DataFrame([dict(run, k=0, step=np.nan, peak_gain=np.nan, peak_dev=np.nan)])
    layers = layers.assign(k=2 * layers.layer + (layers.sublayer == "mlp"))
    comp = layers[layers.quantity.str.startswith("hc_composite")]
    peak_gain = float(comp[comp.k == 0].value.max())
    peak_dev = float((comp.value - 1).abs().max())
    last = layers[layers.step == layers.step.max()]
    wide = last.pivot_table(index=["k", "step"], columns="quantity", values="value").reset_index()
    return wide.assign(**run, peak_gain=peak_gain, peak_dev=peak_dev)


def whole_stack(df, variant) -> pd.DataFrame:
    """The whole-stack (k = 0) rows of ``variant``'s completed runs (not non-finite), median over seeds."""
    d = df[(df.variant == variant) & (df.k == 0) & ~df.diverged.astype(bool)]
    if d.empty:
        raise Skip(f"no completed {variant} run")
    return d.groupby(["depth", "lr"]).hc_composite_row_gain.median().unstack("lr")


def hc_depth_growth(df) -> float:
    """min over LRs where HC completed at both the smallest and the largest depth of G(L_max) / G(L_min)."""
    g = whole_stack(df, "hyper")
    two_depths(g.index)
    ratio = (g.loc[g.index.max()] / g.loc[g.index.min()]).dropna()
    if ratio.empty:
        raise Skip("no LR at which HC completed at both depths")
    return float(ratio.min())


def hc_lr_growth(df) -> float:
    """min over depths of Spearman(lr, G) over the LRs at which HC completed (at least 3)."""
    g = whole_stack(df, "hyper")
    rhos = [spearman(row.dropna().index, row.dropna().values) for _, row in g.iterrows() if row.notna().sum() >= 3]
    if not rhos:
        raise Skip("no depth with 3 completed LRs")
    return float(min(rhos))


def mhc_deviation(df) -> float:
    d = df[df.variant == "mhc"]
    if d.empty:
        raise Skip("no mhc run")
    return float(d.peak_dev.max())


def hc_over_mhc(df) -> float:
    """HC's largest whole-stack gain over the grid (any probed step) / mHC's."""
    peak = df[df.k == 0].groupby("variant").peak_gain.max()
    if not {"hyper", "mhc"} <= set(peak.index):
        raise Skip("needs both hyper and mhc runs")
    return float(peak["hyper"] / peak["mhc"])


def failure_gap(df) -> float:
    """Share of HC's (depth, lr, seed) runs that failed minus mHC's."""
    runs = df[df.k == 0].groupby("variant").trained.mean()
    if not {"hyper", "mhc"} <= set(runs.index):
        raise Skip("needs both hyper and mhc runs")
    return float((1 - runs["hyper"]) - (1 - runs["mhc"]))


def notes(df) -> list:
    """Sentences for the docs page, from the data: each variant's failed runs, and the outcome per seed of
    every run at the largest depth and LR (the cell where HC's amplification is largest)."""
    runs = df[df.k == 0]
    out = []
    for v, g in runs.groupby("variant"):
        failed = g[~g.trained.astype(bool)]
        cells = ", ".join(f"L={r.depth} lr {r.lr:g} seed {r.seed}: {r.outcome}" for r in failed.itertuples())
        out.append(f"{v}: {len(failed)} of {len(g)} runs failed (not trained){': ' + cells if cells else ''}.")
    L, lr = runs.depth.max(), runs.lr.max()
    for v, g in runs[(runs.depth == L) & (runs.lr == lr)].groupby("variant"):
        per = ", ".join(f"seed {r.seed} {r.outcome}" for r in g.sort_values("seed").itertuples())
        out.append(f"{v} at L={L}, lr {lr:g}: {per}.")
    return out


def plot(df, path) -> None:
    import seaborn as sns

    fig, axes = figure(3)
    pal = palette(df.variant.unique())
    done = df[~df.diverged.astype(bool)].assign(
        gain=lambda d: np.maximum(d.hc_composite_row_gain, d.hc_composite_col_gain))
    sns.lineplot(data=done[done.k == 0], x="lr", y="gain", hue="variant", style="depth", palette=pal,
                 marker="o", errorbar=None, ax=axes[0])
    axes[0].set(xscale="log", yscale="log", xlabel="peak learning rate (log)",
                ylabel="whole-stack composite gain, max(row, column sum)", title="gain vs LR and depth (final step)")
    deep = done[(done.depth == done.depth.max()) & done.hc_composite_row_gain.notna()].copy()
    deep["lr "] = deep.lr.map(lambda v: f"{v:g}")
    sns.lineplot(data=deep, x="k", y="gain", hue="variant", style="lr ", palette=pal, errorbar=None, ax=axes[1])
    axes[1].set(yscale="log", xlabel="sublayer k (attention and MLP apart)",
                ylabel="composite gain from k to the top (log)", title=f"per-layer composite, L={df.depth.max()} (completed runs)")
    fail = df[df.k == 0].assign(failed=lambda d: ~d.trained.astype(bool))
    sns.barplot(data=fail, x="lr", y="failed", hue="variant", palette=pal, errorbar=None, ax=axes[2])
    axes[2].set(xlabel="peak learning rate", ylabel="share of runs failed (non-finite or stalled)",
                title="failure rate over depths and seeds", ylim=(0, 1))
    save(fig, path, f"{REF.authors}: HC's mixing amplifies, mHC's does not (d=32, n=4, {data_label(df)})")


register(Experiment(
    name="mhc_amplification",
    reference=REF,
    extra_refs=[HC_REF],
    summary="composite gain of the HC vs mHC residual mixing matrices over an LR x depth grid; failure rate",
    kind="train",
    grids={"full": dict(variants=["hyper", "mhc"], depths=[4, 12, 24], lrs=[3e-3, 1e-2, 3e-2, 1e-1], seeds=[0, 1, 2],
                        steps=100),
           "ci": dict(variants=["hyper", "mhc"], depths=[1, 2], lrs=[1e-2, 1e-1], seeds=[0], steps=20)},
    robustness=[Setting("text_hamlet", seeds=[0, 1, 2], text=HAMLET, note="the Hamlet text (bytes) instead of the synthetic stream")],
    run=run,
    notes=notes,
    plot=plot,
    claims=[
        Claim("hc_gain_grows_with_depth", "HC: whole-stack composite gain at the largest / smallest depth, worst "
              "LR (median over seeds)", hc_depth_growth, ">=", 2.0, needs=("hyper",), scale="log"),
        Claim("hc_gain_grows_with_lr", "HC: Spearman(lr, whole-stack composite gain), worst depth",
              hc_lr_growth, ">=", 0.8, needs=("hyper",)),
        Claim("mhc_gain_near_one", "mHC: largest |composite gain - 1| over runs, steps and layers (the paper's "
              "27B peak is 1.6)", mhc_deviation, "<=", 0.6, needs=("mhc",)),
        Claim("hc_over_mhc", "largest whole-stack gain over the grid: HC / mHC", hc_over_mhc, ">=", 10.0,
              needs=("hyper", "mhc"), scale="log"),
        Claim("hc_fails_more", "share of runs failed: HC minus mHC", failure_gap, ">", 0.0, needs=("hyper", "mhc")),
    ],
))
