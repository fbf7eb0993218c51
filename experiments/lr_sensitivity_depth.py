"""The framework's headline stability figure: Wortsman et al.'s LR-sensitivity vs depth, per variant.

The harness of ``wortsman_lr`` (AdamW 0.9/0.95, clip 1, independent WD 1e-4, z-loss 1e-4, 5% warm-up,
cosine to 10%, synthetic stream, vocab 64, no qk-layernorm) over every registered variant of the grid
and several depths. No calibrated claim yet (docs/papers.md §13 note: only one depth was calibrated), so the
experiment reports numbers and draws the figure; LR-sensitivity is shown next to the best loss l*,
because a low LR-sensitivity with a bad l* (a model that never learns) is not "stable". The metrics are
:mod:`analysis.metrics`' (the sweep report's), with l0 = ln|V|; the largest stable LR needs a run to end
at least 0.1 nat below it (:data:`analysis.metrics.STABLE_MARGIN`).
"""

from __future__ import annotations

import math

import pandas as pd

from analysis.metrics import clipped_losses, largest_stable_lr_values, lr_sensitivity_values

from .common import figure, palette, registered, save
from .core import Experiment, Reference, register
from .training import data_label, data_name, data_spec, run_grid
from .wortsman_lr import LRS

#: the multi-stream and cross-layer residuals, in the figure with the rest
MULTI_STREAM = ["hyper", "hyper_dynamic", "mhc", "value_residual", "attnres", "attnres_block", "denseformer", "orthogonal"]
#: the norm placements and scalings used at scale (reordered to derf)
NORM_PLACEMENTS = ["reordered", "layerscale", "keel", "normformer", "hybridnorm", "ngpt", "completep", "derf"]
REF = Reference("Small-scale proxies for large-scale Transformer training instabilities", "2309.14322",
                "LR sensitivity (§2.2), across variants and depths", "Wortsman et al. 2023")


def run(grid, ctx) -> pd.DataFrame:
    variants = registered(grid["variants"])
    specs = [dict(variant=v, depth=L, lr=lr, seed=s, steps=grid["steps"], qk_norm=False, **data_spec(grid))
             for s in grid["seeds"] for v in variants for L in grid["depths"] for lr in grid["lrs"]]
    rows = []
    for r in run_grid(specs, ctx):
        sp = r["spec"]
        rows.append(dict(data=data_name(sp), variant=sp["variant"], depth=sp["depth"], lr=sp["lr"], seed=sp["seed"],
                         final_eval_loss=r["final_eval_loss"], initial_loss=r["initial_loss"], diverged=r["diverged"],
                         max_attn_logit=r["max_attn_logit"]))
    df = pd.DataFrame(rows)
    l0 = math.log(data_spec(grid)["vocab"])
    agg = [dict(variant=v, depth=L, seed=s, **lr_metrics(g, l0))
           for (v, L, s), g in df.groupby(["variant", "depth", "seed"])]
    return df.merge(pd.DataFrame(agg), on=["variant", "depth", "seed"])


def lr_metrics(g: pd.DataFrame, l0: float) -> dict:
    """LR-sensitivity, best loss l* and largest stable LR (NaN if none) of one LR grid (rows: ``lr``,
    ``final_eval_loss``, ``diverged``), a diverged run counting as ``l0``."""
    return dict(lr_sensitivity=lr_sensitivity_values(g.final_eval_loss, l0, g.diverged),
                best_loss=float(clipped_losses(g.final_eval_loss, l0, g.diverged).min()),
                largest_stable_lr=largest_stable_lr_values(g.lr, g.final_eval_loss, l0, completed=~g.diverged))


def plt_line(color):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, marker="o")


def plot(df, path) -> None:
    import seaborn as sns

    per = df.groupby(["variant", "depth", "seed"])[["lr_sensitivity", "best_loss", "largest_stable_lr"]].first()
    per = per.reset_index()
    variants = list(per.variant.unique())
    fig, axes = figure(3, height=3.4 + 0.22 * -(-len(variants) // 6))  # room for the legend below
    pal = palette(variants)
    for ax, col, label in zip(axes, ("lr_sensitivity", "best_loss", "largest_stable_lr"),
                              ("LR sensitivity (lower = stabler)", "best final loss l*", "largest stable LR")):
        sns.lineplot(data=per, x="depth", y=col, hue="variant", palette=pal, marker="o", errorbar="sd", ax=ax,
                     legend=False)
        ax.set(xscale="log", xlabel="depth (log)", ylabel=label)
        ax.set_xticks(sorted(per.depth.unique()), [str(d) for d in sorted(per.depth.unique())])
        ax.minorticks_off()
    axes[2].set_yscale("log")
    handles = [plt_line(pal[v]) for v in variants]  # one legend for the three panels, below them
    axes[1].legend(handles, variants, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=min(len(variants), 6),
                   fontsize="small", frameon=False)
    save(fig, path, f"LR sensitivity vs depth per variant (Wortsman et al. 2023 harness, {data_label(df)})")


register(Experiment(
    name="lr_sensitivity_depth",
    reference=REF,
    summary="LR-sensitivity, best loss and largest stable LR vs depth, 24 variants (7 LRs)",
    kind="train",
    grids={"full": dict(variants=["post", "pre", "rmsnorm", "deepnorm", "peri", "admin", "lns", "mixln"] + MULTI_STREAM
                        + NORM_PLACEMENTS,
                        depths=[2, 6], lrs=LRS, seeds=[0], steps=100),
           "ci": dict(variants=["post", "pre"], depths=[1, 2], lrs=[1e-3, 1e-1], seeds=[0], steps=20)},
    run=run,
    plot=plot,
    claims=[],
))
