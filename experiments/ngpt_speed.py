"""Loshchilov et al. 2024 (nGPT), Fig. 1: nGPT reaches the baseline's final validation loss in fewer steps.

The paper trains 0.5B/1B models on OpenWebText and reports 4x (1k context) to 20x (8k context) fewer
steps to the same validation loss. Here: a small model (depth 4, d_model 32) on the harness of
``experiments/training.py`` (Wortsman et al.'s recipe), Pre-LN against nGPT, each trained to several
step budgets (a full schedule per budget, the way the paper compares budgets) at a few peak LRs; each
variant at each budget keeps its best LR. nGPT trains with its own optimizer preset (no warm-up, no
weight decay; :data:`resnorm.config.variants.Variant.optim_preset`), Pre-LN with the harness's (5% warm-up,
weight decay 1e-4), as in the paper. The speed-up is the largest budget divided by the smallest budget
at which nGPT's best loss is at or below Pre-LN's best loss at the largest budget (0 when it never is).
"""

from __future__ import annotations

import pandas as pd

from .common import figure, palette, registered, save, select
from .core import Claim, Experiment, Reference, Skip, register
from .training import data_label, data_spec, loss_row, run_grid

REF = Reference("nGPT: Normalized Transformer with Representation Learning on the Hypersphere", "2410.01131",
                "Fig. 1 (steps to the baseline's validation loss)", "Loshchilov et al. 2024")
SHAPE = dict(depth=4, d_model=32, n_heads=2, d_ff=128)


def run(grid, ctx) -> pd.DataFrame:
    specs = [dict(variant=v, lr=lr, seed=s, steps=b, **SHAPE, **data_spec(grid))
             for s in grid["seeds"] for v in registered(grid["variants"]) for b in grid["budgets"] for lr in grid["lrs"]]
    return pd.DataFrame([loss_row(r, "variant", "steps", "lr", "seed") for r in run_grid(specs, ctx)])


def best(df, variant) -> pd.Series:
    """Per budget: the median over seeds of the best loss over the LRs."""
    d = select(df, variant=variant).groupby(["seed", "steps"]).loss.min()
    return d.groupby("steps").median()


def speedup(df) -> float:
    pre, ngpt = best(df, "pre"), best(df, "ngpt")
    top = max(pre.index)
    target = pre[top]
    reached = [b for b in sorted(ngpt.index) if ngpt[b] <= target]
    return top / reached[0] if reached else 0.0


def gap_at_largest_budget(df) -> float:
    pre, ngpt = best(df, "pre"), best(df, "ngpt")
    top = max(pre.index)
    if top not in ngpt.index:
        raise Skip("nGPT has no run at the largest budget")
    return float(pre[top] - ngpt[top])


def plot(df, path) -> None:
    fig, axes = figure(2)
    pal = palette(df.variant.unique())
    for v in df.variant.unique():
        b = best(df, v)
        axes[0].plot(b.index, b.values, marker="o", color=pal[v], label=v)
        for lr, g in select(df, variant=v).groupby("lr"):
            m = g.groupby("steps").loss.median()
            axes[1].plot(m.index, m.values, marker=".", color=pal[v], alpha=0.3 + 0.7 * (lr == df.lr.max()),
                         label=f"{v} lr={lr:g}")
    for ax, title in zip(axes, ("best over LRs (median over seeds)", "each LR")):
        ax.set(xscale="log", xlabel="training steps (one schedule per budget)", ylabel="final eval loss", title=title)
        ax.legend(fontsize=7)
    save(fig, path, f"{REF.authors}, {REF.figure}: nGPT vs Pre-LN ({data_label(df)})")


register(Experiment(
    name="ngpt_speed",
    reference=REF,
    summary="final loss vs training steps (budgets of 50-200 steps, 5 LRs), nGPT vs Pre-LN (L=4, d=32)",
    kind="train",
    grids={"full": dict(variants=["pre", "ngpt"], budgets=[50, 100, 200], lrs=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
                        seeds=[0, 1]),
           "ci": dict(variants=["pre", "ngpt"], budgets=[10, 20], lrs=[3e-3], seeds=[0])},
    run=run,
    plot=plot,
    claims=[
        Claim("ngpt_fewer_steps", "largest budget / the smallest budget at which nGPT's best loss (over LRs, median "
              "over seeds) is <= Pre-LN's at the largest budget (0: never); the paper reports 4x-20x, the budget "
              "grid resolves factors of 2", speedup, ">=", 2.0, needs=("pre", "ngpt")),
        Claim("ngpt_lower_at_equal_steps", "Pre-LN's best loss minus nGPT's at the largest budget", gap_at_largest_budget,
              ">", 0.0, needs=("pre", "ngpt")),
    ],
))
