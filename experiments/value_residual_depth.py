"""Zhou et al. (ResFormer), value residual learning: the validation-loss gain of the value residual over
Pre-LN at equal steps, and whether it shrinks with depth.

``value_residual`` is Pre-LN whose attention in every layer n >= 2 uses V'_n = 0.5 V_1 + 0.5 V_n (the
paper's fixed mix; resnorm/model/multistream.py). Both train with the harness of ``wortsman_lr`` (AdamW
0.9/0.95, clip 1, independent WD 1e-4, z-loss 1e-4, 5% warm-up, cosine to 10%) on the same data, seeds
and steps (d = 32, 2 heads, d_ff 128, batch 16 x 64 tokens); the gain is loss(Pre-LN) - loss(value residual) of the final validation loss (a diverged run
counts as its initial loss), median over seeds, per depth and peak LR.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .common import figure, palette, save
from .core import Claim, Experiment, Reference, Skip, register
from .training import data_label, data_name, data_spec, run_grid

SHAPE = dict(d_model=32, n_heads=2, d_ff=128)
REF = Reference("Value Residual Learning", "2410.17897", "the loss-vs-depth comparison with the baseline "
                "(ResFormer vs Transformer)", "Zhou et al. 2024")


def run(grid, ctx) -> pd.DataFrame:
    specs = [dict(variant=v, depth=L, lr=lr, seed=s, steps=grid["steps"], **SHAPE, **data_spec(grid))
             for s in grid["seeds"] for v in ("pre", "value_residual") for L in grid["depths"] for lr in grid["lrs"]]
    rows = []
    for r in run_grid(specs, ctx):
        sp, loss = r["spec"], r["final_eval_loss"]
        rows.append(dict(data=data_name(sp), variant=sp["variant"], depth=sp["depth"], lr=sp["lr"], seed=sp["seed"],
                         final_eval_loss=loss, initial_loss=r["initial_loss"], diverged=r["diverged"],
                         outcome=r["outcome"], loss=r["initial_loss"] if np.isnan(loss) else loss))
    return pd.DataFrame(rows)


def gains(df) -> pd.DataFrame:
    """loss(pre) - loss(value_residual) per (depth, lr) [rows: depth, columns: lr], median over seeds of
    the per-seed gain (the two runs of one seed share data order and init seed)."""
    w = df.pivot_table(index=["depth", "lr", "seed"], columns="variant", values="loss")
    if not {"pre", "value_residual"} <= set(w.columns):
        raise Skip("needs pre and value_residual runs")
    return (w["pre"] - w["value_residual"]).groupby(["depth", "lr"]).median().unstack("lr")


def min_gain(df) -> float:
    return float(gains(df).min().min())


def depth_change(df) -> float:
    """min over LRs of gain(largest depth) - gain(smallest depth)."""
    g = gains(df)
    return float((g.loc[g.index.max()] - g.loc[g.index.min()]).min())


def plot(df, path) -> None:
    import seaborn as sns

    fig, axes = figure(2)
    d = df.copy()
    d["lr "] = d.lr.map(lambda v: f"{v:g}")
    pal = {**palette(d.variant.unique()), "value_residual": "#d62728"}  # the style's two blues look alike
    sns.lineplot(data=d, x="depth", y="loss", hue="variant", style="lr ", palette=pal,
                 marker="o", estimator="median", errorbar=("pi", 100), ax=axes[0])
    axes[0].set(xscale="log", xlabel="depth (log)", ylabel="final validation loss (median, range over seeds)",
                title="loss at equal steps")
    g = gains(df).stack().rename("gain").reset_index()
    g["lr "] = g.lr.map(lambda v: f"{v:g}")
    sns.lineplot(data=g, x="depth", y="gain", hue="lr ", marker="o", ax=axes[1])
    axes[1].axhline(0, color="0.5", lw=0.8)
    axes[1].set(xscale="log", xlabel="depth (log)", ylabel="loss(Pre-LN) - loss(value residual), median",
                title="the value residual's gain vs depth")
    for ax in axes:
        ax.set_xticks(sorted(df.depth.unique()), [str(v) for v in sorted(df.depth.unique())])
        ax.minorticks_off()
    save(fig, path, f"{REF.authors}: value residual vs Pre-LN at equal steps (d=32, {data_label(df)})")


register(Experiment(
    name="value_residual_depth",
    reference=REF,
    summary="validation-loss gain of the value residual over Pre-LN at equal steps vs depth (2 peak LRs)",
    kind="train",
    grids={"full": dict(depths=[4, 12, 24], lrs=[3e-3, 1e-2], seeds=[0], steps=150),
           "ci": dict(depths=[1, 2], lrs=[1e-2], seeds=[0], steps=20)},
    run=run,
    plot=plot,
    claims=[
        Claim("vr_gain_positive", "loss(Pre-LN) - loss(value residual), median over seeds, worst (depth, LR)",
              min_gain, ">", 0.0, needs=("pre", "value_residual")),
        Claim("vr_gain_does_not_shrink", "gain at the largest depth minus gain at the smallest, worst LR",
              depth_change, ">=", 0.0, needs=("pre", "value_residual")),
    ],
))
