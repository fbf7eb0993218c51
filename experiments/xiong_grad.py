"""Xiong et al. 2020, Fig. 3: gradient norm of the FFN output weight at init, per layer and vs depth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from resnorm.monitors import measure as M

from .common import figure, loglog_slope, make_model, palette, registered, save, select, spearman
from .core import Claim, Experiment, Reference, register

REF = Reference("On Layer Normalization in the Transformer Architecture", "2002.04745", "Fig. 3",
                "Xiong et al. 2020")
BATCH, SEQ = 16, 64


def run(grid, ctx) -> pd.DataFrame:
    rows = []
    profile_variants = registered(grid["profile_variants"])
    for variant in profile_variants:
        for depth in grid["profile_depths"]:
            for seed in grid["seeds"]:
                model = make_model(variant, depth, seed)
                grads = []
                for b in range(grid["batches"]):
                    idx = M.random_tokens(256, BATCH, SEQ, seed=1000 * seed + 2 * b)
                    tgt = M.random_tokens(256, BATCH, SEQ, seed=1000 * seed + 2 * b + 1)
                    model.zero_grad(set_to_none=True)
                    model.loss(idx, tgt).backward()
                    grads.append(torch.stack([blk.mlp.branch.fc2.weight.grad.clone() for blk in model.blocks]))
                g = torch.stack(grads)  # (batches, layers, d, d_ff)
                per_batch = g.flatten(2).norm(dim=-1).mean(0)  # mean over batches of ||grad||
                expected = g.mean(0).flatten(1).norm(dim=-1)  # Xiong's ||E[grad]||
                for layer in range(depth):
                    rows.append(dict(panel="profile", variant=variant, depth=depth, seed=seed, layer=layer + 1,
                                     grad_norm=per_batch[layer].item(), expected_grad_norm=expected[layer].item()))
            ctx.log(f"profile {variant} L={depth}")
    for variant in registered(grid["scan_variants"]):
        for depth in grid["scan_depths"]:
            for seed in grid["seeds_scan"]:
                model = make_model(variant, depth, seed)
                idx = M.random_tokens(256, BATCH, SEQ, seed=1000 * seed)
                tgt = M.random_tokens(256, BATCH, SEQ, seed=1000 * seed + 1)
                g = M.grad_norms(model, idx, tgt)["fc2"]
                rows.append(dict(panel="scan", variant=variant, depth=depth, seed=seed, layer=depth,
                                 grad_norm=g[-1], expected_grad_norm=np.nan))
            ctx.log(f"scan {variant}")
    return pd.DataFrame(rows)


def top_bottom(df, variant, depth) -> float:
    d = select(df, panel="profile", variant=variant, depth=depth).groupby("layer")["grad_norm"].mean()
    return d.iloc[-1] / d.iloc[0]


def ratio_post_pre(df) -> float:
    depths = sorted(select(df, panel="profile").depth.unique())
    return min(top_bottom(df, "post", L) / top_bottom(df, "pre", L) for L in depths)


def profile_spearman(variant):
    def measure(df) -> float:
        prof = select(df, panel="profile", variant=variant)
        d = select(prof, depth=prof.depth.max()).groupby("layer")["grad_norm"].mean()
        return spearman(d.index, d.values)
    return measure


def min_top_bottom(variant):
    def measure(df) -> float:
        return min(top_bottom(df, variant, L) for L in sorted(select(df, panel="profile").depth.unique()))
    return measure


def scan_slope(variant):
    def measure(df):
        d = select(df, panel="scan", variant=variant).groupby("depth")["grad_norm"].mean()
        return loglog_slope(d.index, d.values)
    return measure


def plot(df, path) -> None:
    import seaborn as sns

    prof = df[df.panel == "profile"]
    depths = sorted(prof.depth.unique())
    fig, axes = figure(len(depths) + 1)
    pal = palette(df.variant.unique())
    for ax, L in zip(axes, depths):
        sns.lineplot(data=prof[prof.depth == L], x="layer", y="grad_norm", hue="variant", palette=pal,
                     marker="o", errorbar="sd", ax=ax)
        ax.set(title=f"(a/b) per-layer, L={L}", xlabel="layer", ylabel=r"$\|\nabla W_2^\ell\|_F$ at init")
    scan = df[df.panel == "scan"]
    sns.lineplot(data=scan, x="depth", y="grad_norm", hue="variant", palette=pal, marker="o", errorbar="sd",
                 ax=axes[-1])
    axes[-1].set(xscale="log", yscale="log", title="(c/d) last layer vs depth", xlabel="depth L (log)",
                 ylabel=r"$\|\nabla W_2^L\|_F$ (log)")
    axes[-1].set_xticks(sorted(scan.depth.unique()), [str(d) for d in sorted(scan.depth.unique())])
    axes[-1].minorticks_off()
    save(fig, path, f"{REF.authors}, {REF.figure}: FFN output-weight gradient at init (Xavier, N(0,1) emb.)")


register(Experiment(
    name="xiong_grad",
    reference=REF,
    summary="per-layer ||grad W2|| of the FFN at init (Post-LN vs Pre-LN) and the last layer's norm vs depth",
    kind="init",
    grids={
        "full": dict(profile_variants=["post", "pre", "deepnorm", "b2t", "lns"], profile_depths=[6, 12],
                     seeds=[0, 1, 2, 3, 4], batches=4, scan_variants=["post", "pre"],
                     scan_depths=[2, 4, 8, 16, 32], seeds_scan=[0, 1, 2]),
        "ci": dict(profile_variants=["post", "pre"], profile_depths=[6, 12], seeds=[0, 1, 2, 3, 4], batches=2,
                   scan_variants=["post", "pre"], scan_depths=[2, 4, 8, 16], seeds_scan=[0, 1]),
    },
    run=run,
    plot=plot,
    claims=[
        Claim("top_bottom_post_vs_pre", "Post-LN's top/bottom gradient ratio g_L/g_1 is >= 2x Pre-LN's (worst depth)",
              ratio_post_pre, ">=", 2.0, needs=("post", "pre")),
        Claim("spearman_post", "Post-LN's gradient rises toward the output at the largest depth (Spearman(l, g_l))",
              profile_spearman("post"), ">=", 0.8, needs=("post",)),
        Claim("spearman_pre", "Pre-LN's gradient falls toward the output at the largest depth (Spearman(l, g_l))",
              profile_spearman("pre"), "<=", -0.8, needs=("pre",)),
        Claim("post_not_falling", "Post-LN's top/bottom ratio g_L/g_1 stays near or above 1 (worst depth)",
              min_top_bottom("post"), ">=", 0.8, needs=("post",)),
        Claim("slope_pre", "log-log slope of Pre-LN's last-layer norm vs depth (theory -0.5)",
              scan_slope("pre"), "<=", -0.3, needs=("pre",)),
        Claim("slope_post", "log-log slope of Post-LN's last-layer norm vs depth (theory 0)",
              scan_slope("post"), ">=", -0.1, needs=("post",)),
    ],
))
