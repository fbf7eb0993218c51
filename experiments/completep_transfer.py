"""Dey et al. 2025 (CompleteP), Fig. 1 (left): under CompleteP (alpha = 1, with its LR and epsilon rules)
the best base learning rate transfers across depth; under standard Pre-LN and depth-muP it drifts.

Here: Pre-LN, ``depth_scaled`` (the 1/sqrt(L) branch multiplier without optimizer rules) and
``completep`` (alpha = 1, L_base = 1: branches x 1/L, the blocks' LR unchanged, epsilon x 1/L), each at
a shallow and a deep depth, over a grid of peak LRs on the harness of ``experiments/training.py``
(d_model 32, 150 steps). The drift of a variant is |log2(best LR at the deep depth / best LR at the
shallow one)|, in grid steps of the LR grid (factors of ~3), from the median loss over seeds.
"""

from __future__ import annotations

import math

import pandas as pd

from .common import figure, palette, registered, save, select, two_depths
from .core import HAMLET, Claim, Experiment, Reference, Setting, Skip, register
from .training import data_label, data_spec, loss_row, run_grid

REF = Reference("Don't be lazy: CompleteP enables compute-efficient deep transformers", "2505.01618",
                "Fig. 1 (left): the optimal base LR across depth", "Dey et al. 2025")
SHAPE = dict(d_model=32, n_heads=2, d_ff=128)


def run(grid, ctx) -> pd.DataFrame:
    specs = [dict(variant=v, depth=L, lr=lr, seed=s, steps=grid["steps"], **SHAPE, **data_spec(grid))
             for s in grid["seeds"] for v in registered(grid["variants"]) for L in grid["depths"] for lr in grid["lrs"]]
    return pd.DataFrame([loss_row(r, "variant", "depth", "lr", "seed") for r in run_grid(specs, ctx)])


def best_lr(df, variant, depth) -> float:
    d = select(df, variant=variant, depth=depth).groupby("lr").loss.median()
    return float(d.idxmin())


def drift(variant):
    def measure(df) -> float:
        two_depths(df.depth)
        lo, hi = min(df.depth), max(df.depth)
        return abs(math.log2(best_lr(df, variant, hi) / best_lr(df, variant, lo)))
    return measure


def completep_drifts_least(df) -> float:
    """min over the other variants of drift(other) - drift(completep) (>= 0: CompleteP drifts least)."""
    others = [v for v in df.variant.unique() if v != "completep"]
    if not others:
        raise Skip("no Pre-LN or depth_scaled runs to compare with")
    return min(drift(v)(df) - drift("completep")(df) for v in others)


def depth_gain(variant):
    def measure(df) -> float:
        """best loss (over LRs, median over seeds) at the deep depth minus at the shallow one (< 0: depth helps)."""
        per = select(df, variant=variant).groupby(["depth", "lr"]).loss.median().groupby("depth").min()
        two_depths(per.index)
        return float(per[max(df.depth)] - per[min(df.depth)])
    return measure


def notes(df) -> list:
    """Sentences for the docs page, from the data: per variant and seed, the best loss over the LRs and the
    LR that gave it at the shallow and the deep depth."""
    out = []
    lo, hi = df.depth.min(), df.depth.max()
    for v, g in df.groupby("variant", sort=False):
        per = []
        for seed, s in g.groupby("seed"):
            best = s.loc[s.groupby("depth").loss.idxmin()].set_index("depth")
            if {lo, hi} <= set(best.index):
                per.append(f"seed {seed}: {best.loss[lo]:.4f} (lr {best.lr[lo]:g}) vs {best.loss[hi]:.4f} "
                           f"(lr {best.lr[hi]:g})")
        if per:
            out.append(f"{v}, best loss (its LR) at L={lo} vs L={hi}: " + "; ".join(per) + ".")
    return out


def plot(df, path) -> None:
    variants = list(df.variant.unique())
    fig, axes = figure(len(variants))
    for ax, v in zip(axes, variants):
        for L, g in select(df, variant=v).groupby("depth"):
            m = g.groupby("lr").loss.median()
            ax.plot(m.index, m.values, marker="o", label=f"L = {L}", color=palette([v])[v], alpha=0.4 + 0.6 * (L == df.depth.max()))
        ax.set(xscale="log", xlabel="peak LR", ylabel="final eval loss (median over seeds)", title=v)
        ax.legend()
    save(fig, path, f"{REF.authors}, {REF.figure} ({data_label(df)})")


register(Experiment(
    name="completep_transfer",
    reference=REF,
    summary="final loss vs peak LR at a shallow and a deep depth, Pre-LN vs depth_scaled vs CompleteP (d=32)",
    kind="train",
    grids={"full": dict(variants=["pre", "depth_scaled", "completep"], depths=[2, 16],
                        lrs=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1], seeds=[0, 1, 2], steps=150),
           "ci": dict(variants=["pre", "completep"], depths=[1, 2], lrs=[1e-3, 1e-2], seeds=[0], steps=10)},
    robustness=[Setting("text_hamlet", seeds=[0, 1, 2], text=HAMLET, note="the Hamlet text (bytes) instead of the synthetic stream")],
    run=run,
    notes=notes,
    plot=plot,
    claims=[
        Claim("completep_drifts_least", "min over Pre-LN and depth_scaled of |log2 best-LR drift| minus CompleteP's "
              "(from the shallow to the deep depth)", completep_drifts_least, ">=", 0.0,
              needs=("pre", "depth_scaled", "completep")),
        Claim("completep_drift_small", "CompleteP: |log2(best LR deep / best LR shallow)| at most one step of the "
              "LR grid (log2 3 to log2 3.33, <= 1.75)", drift("completep"), "<=", 1.75, needs=("completep",)),
        Claim("completep_depth_helps", "CompleteP: best loss at the deep depth minus at the shallow one (the paper's "
              "deeper-is-better, Fig. 1 middle; added after the first measurement, checked on seed 5 and a text)",
              depth_gain("completep"), "<", 0.0, needs=("completep",)),
    ],
))
