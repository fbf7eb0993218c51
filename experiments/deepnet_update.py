"""Wang et al. 2022 (DeepNet) Fig. 5: model update after one early optimizer step vs depth, 64-128-2 models."""

from __future__ import annotations

import pandas as pd

from resnorm.monitors import measure as M

from .common import figure, make_model, palette, registered, save, select
from .core import Claim, Experiment, Reference, register

REF = Reference("DeepNet: Scaling Transformers to 1,000 Layers", "2203.00555", "Fig. 5", "Wang et al. 2022")


def run(grid, ctx) -> pd.DataFrame:
    rows = []
    for variant in registered(grid["variants"]):
        for depth in grid["depths"]:
            for seed in grid["seeds"]:
                model = make_model(variant, depth, seed, d_model=64, n_heads=2, d_ff=128)
                idx = M.random_tokens(256, 16, 64, seed=10 * seed)
                tgt = M.random_tokens(256, 16, 64, seed=10 * seed + 1)
                for opt, lr in grid["optimizers"]:
                    df = M.model_update(model, idx, tgt, steps=1, optimizer=opt, lr=lr, betas=(0.9, 0.98))
                    rows.append(dict(variant=variant, depth=depth, seed=seed, optimizer=opt, lr=lr, delta_f=df))
            ctx.log(f"{variant} L={depth}")
    return pd.DataFrame(rows)


def mean_update(df, variant, depth, opt="adam"):
    return select(df, variant=variant, depth=depth, optimizer=opt).delta_f.mean()


def growth(df, variant, opt="adam"):
    depths = sorted(df.depth.unique())
    lo, hi = depths[0], [d for d in depths if d <= 4 * depths[0]][-1]  # N=6 -> N=24 in the full grid
    return mean_update(df, variant, hi, opt) / mean_update(df, variant, lo, opt)


def claims():
    return [
        Claim("post_over_deepnorm", "Adam step: Post-LN's update / DeepNorm's, worst depth",
              lambda df: min(mean_update(df, "post", L) / mean_update(df, "deepnorm", L) for L in df.depth.unique()),
              ">=", 5.0, needs=("post", "deepnorm")),
        Claim("post_grows", "Post-LN's update grows with depth: update(4 N0) / update(N0)",
              lambda df: growth(df, "post"), ">=", 3.0, needs=("post",)),
        Claim("post_grows_faster_than_deepnorm", "growth(Post-LN) - growth(DeepNorm) over the same depths",
              lambda df: growth(df, "post") - growth(df, "deepnorm"), ">", 0.0, needs=("post", "deepnorm")),
        Claim("post_grows_faster_than_pre", "growth(Post-LN) - growth(Pre-LN) over the same depths",
              lambda df: growth(df, "post") - growth(df, "pre"), ">", 0.0, needs=("post", "pre")),
        Claim("sgd_post_over_deepnorm", "SGD step: Post-LN's update / DeepNorm's, worst depth",
              lambda df: min(mean_update(df, "post", L, "sgd") / mean_update(df, "deepnorm", L, "sgd")
                             for L in df.depth.unique()), ">=", 5.0, needs=("post", "deepnorm")),
    ]


def plot(df, path) -> None:
    import seaborn as sns

    opts = list(dict.fromkeys(df.optimizer))
    fig, axes = figure(len(opts))
    pal = palette(df.variant.unique())
    for ax, opt in zip(axes, opts):
        d = df[df.optimizer == opt]
        sns.lineplot(data=d, x="depth", y="delta_f", hue="variant", palette=pal, marker="o", errorbar="sd", ax=ax)
        ax.set(xscale="log", yscale="log", xlabel="depth N (log)",
               ylabel=r"$\|f(x;\theta_1) - f(x;\theta_0)\|$ (RMS, log)",
               title=f"one {opt} step, lr {d.lr.iloc[0]:g}")
        ax.set_xticks(sorted(d.depth.unique()), [str(x) for x in sorted(d.depth.unique())])
        ax.minorticks_off()
    save(fig, path, f"{REF.authors}, {REF.figure}: model update vs depth, 64-128-2 decoder")


register(Experiment(
    name="deepnet_update",
    reference=REF,
    summary="model update ||f(x; theta_1) - f(x; theta_0)|| after one Adam (and SGD) step vs depth",
    kind="init",
    grids={"full": dict(variants=["post", "deepnorm", "pre", "admin"], depths=[6, 12, 24, 48, 96], seeds=[0, 1, 2],
                        optimizers=[("adam", 1e-4), ("sgd", 0.05)]),
           "ci": dict(variants=["post", "deepnorm", "pre"], depths=[6, 24], seeds=[0, 1, 2],
                      optimizers=[("adam", 1e-4), ("sgd", 0.05)])},
    run=run,
    plot=plot,
    claims=claims(),
))
