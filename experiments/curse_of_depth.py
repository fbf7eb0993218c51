"""Sun et al. 2025 (The Curse of Depth) Fig. 1/6 and Mix-LN Fig. 5: residual-stream variance and the angular
distance between layers along depth, at init."""

from __future__ import annotations

import pandas as pd
import torch

from resnorm.monitors import measure as M

from .common import figure, make_model, palette, registered, save, select
from .core import Claim, Experiment, Reference, register

REF = Reference("The Curse of Depth in Large Language Models", "2502.05795", "Fig. 1/6 (variance), angular distance",
                "Sun et al. 2025")
MIXLN = Reference("Mix-LN: Unleashing the Power of Deeper Layers by Combining Pre-LN and Post-LN", "2412.13795",
                  "Fig. 5", "Li et al. 2024")


@torch.no_grad()
def run(grid, ctx) -> pd.DataFrame:
    rows = []
    depth = grid["depth"]
    for variant in registered(grid["variants"]):
        for seed in grid["seeds"]:
            model = make_model(variant, depth, seed)
            xs = model.trace(M.random_tokens(256, grid["batch"], 64, seed=seed), max_logits=False)["stream"]
            var = torch.stack([M.variance(x) for x in xs])
            ang = torch.stack([M.angular_distance(xs[a], xs[b]) for a in range(1, depth + 1)
                               for b in range(a + 1, depth + 1)])
            var, ang = var.tolist(), ang.tolist()
            for layer in range(depth + 1):
                rows.append(dict(panel="variance", variant=variant, seed=seed, layer=layer, n=0, value=var[layer]))
            k = 0
            for a in range(1, depth + 1):
                for b in range(a + 1, depth + 1):
                    rows.append(dict(panel="angular", variant=variant, seed=seed, layer=a, n=b - a, value=ang[k]))
                    k += 1
        ctx.log(f"{variant} done")
    return pd.DataFrame(rows)


def var_ratio(df, v) -> float:
    d = select(df, panel="variance", variant=v).groupby("layer").value.mean()
    return d.iloc[-1] / d.loc[1]  # Var(x_L) / Var(x_1), x_l the stream after layer l


def ang_ratio(df, v) -> float:
    d = select(df, panel="angular", variant=v, n=1).groupby("layer").value.mean()
    return d.iloc[-1] / d.iloc[0]  # d(x_{L-1}, x_L) / d(x_1, x_2)


def claims():
    return [
        Claim("variance_pre_vs_lns", "Var(x_L)/Var(x_1): Pre-LN / LayerNorm Scaling",
              lambda df: var_ratio(df, "pre") / var_ratio(df, "lns"), ">=", 3.0, needs=("pre", "lns")),
        Claim("variance_post_flat", "|Var(x_L)/Var(x_1) - 1| for Post-LN",
              lambda df: abs(var_ratio(df, "post") - 1.0), "<=", 0.1, needs=("post",)),
        Claim("angular_pre_falls", "Pre-LN consecutive-layer angular distance, last / first",
              lambda df: ang_ratio(df, "pre"), "<=", 0.6, needs=("pre",)),
        Claim("angular_post_holds", "Post-LN consecutive-layer angular distance, last / first",
              lambda df: ang_ratio(df, "post"), ">=", 0.9, needs=("post",)),
    ]


def plot(df, path) -> None:
    import seaborn as sns

    var, ang = df[df.panel == "variance"], df[df.panel == "angular"]
    heat = [v for v in ("pre", "post") if v in set(df.variant)]
    fig, axes = figure(2 + len(heat))
    pal = palette(df.variant.unique())
    sns.lineplot(data=var[var.layer >= 1], x="layer", y="value", hue="variant", palette=pal, marker="o",
                 errorbar="sd", ax=axes[0])
    axes[0].set(yscale="log", xlabel="layer l", ylabel=r"Var($x_l$) (log)", title="residual-stream variance")
    sns.lineplot(data=ang[ang.n == 1], x="layer", y="value", hue="variant", palette=pal, marker="o", errorbar="sd",
                 ax=axes[1], legend=False)
    axes[1].set(xlabel="layer l", ylabel=r"$d(x_l, x_{l+1})$", title="consecutive-layer angular distance")
    for ax, v in zip(axes[2:], heat):
        m = ang[ang.variant == v].groupby(["n", "layer"]).value.mean().unstack()
        m = m.sub(m.min(axis=1), axis=0).div((m.max(axis=1) - m.min(axis=1)).replace(0, 1), axis=0)
        sns.heatmap(m, ax=ax, cmap="viridis", cbar_kws=dict(label="row-normalised distance"))
        ax.invert_yaxis()
        ax.set(title=f"{v}: d(x_l, x_(l+n))", xlabel="layer l", ylabel="block size n")
    save(fig, path, f"{REF.authors} / {MIXLN.authors}: variance and angular distance along depth at init, L=24")


register(Experiment(
    name="curse_of_depth",
    reference=REF,
    extra_refs=[MIXLN],
    summary="residual-stream variance and consecutive-layer angular distance along depth at init (L=24)",
    kind="init",
    grids={"full": dict(variants=["pre", "lns", "post", "peri", "mixln", "deepnorm"], depth=24, seeds=[0, 1, 2],
                        batch=4),
           "ci": dict(variants=["pre", "lns", "post", "deepnorm"], depth=24, seeds=[0], batch=2)},
    run=run,
    plot=plot,
    claims=claims(),
))
