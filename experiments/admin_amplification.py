"""Liu et al. 2020 (Admin) Fig. 4 and Fig. 7: output change under a weight perturbation vs depth, and the
dependency of each sublayer on its residual branch (beta^2) at init."""

from __future__ import annotations

import pandas as pd

from resnorm.monitors import measure as M

from .common import figure, make_model, palette, registered, save, select, spearman
from .core import Claim, Experiment, Reference, register

REF = Reference("Understanding the Difficulty of Training Transformers", "2004.08249", "Fig. 4 and Fig. 7",
                "Liu et al. 2020")


def run(grid, ctx) -> pd.DataFrame:
    rows = []
    for variant in registered(grid["variants"]):
        for depth in grid["depths"]:
            for seed in grid["seeds"]:
                model = make_model(variant, depth, seed)
                idx = M.random_tokens(256, grid["batch"], 64, seed=seed)
                change = M.perturbation_change(model, idx, eps=grid["eps"], seed=seed + 100)
                rows.append(dict(panel="change", variant=variant, depth=depth, seed=seed, delta_f=change,
                                 delta_f2=change ** 2))
            ctx.log(f"change {variant} L={depth}")
    for variant in registered(grid["dep_variants"]):
        for depth in grid["dep_depths"]:
            for seed in grid["seeds"]:
                model = make_model(variant, depth, seed)
                beta = M.dependency_matrix(model, M.random_tokens(256, grid["batch"], 64, seed=seed)).numpy()
                for i in range(beta.shape[0]):
                    for j in range(i + 2):
                        rows.append(dict(panel="dependency", variant=variant, depth=depth, seed=seed,
                                         sublayer=i + 1, component=j, beta2=float(beta[i, j])))
            ctx.log(f"dependency {variant} L={depth}")
    return pd.DataFrame(rows)


def ratio(df, variant) -> float:
    d = select(df, panel="change", variant=variant).groupby("depth").delta_f2.mean()
    return d.iloc[-1] / d.iloc[0]


def self_dependency(df, variant) -> pd.Series:
    d = select(df, panel="dependency", variant=variant)
    d = d[d.depth == d.depth.max()]
    d = d[d.component == d.sublayer]  # beta^2_{i,i}: sublayer i on its own branch
    return d.groupby("sublayer").beta2.mean()


def late_self(df, variant) -> float:
    s = self_dependency(df, variant)
    return s.iloc[len(s) // 2:].mean()  # the last L of the 2L sublayers


def claims():
    return [
        Claim("amplification_post_vs_pre", "R = dF^2(L_max)/dF^2(L_min): R(Post-LN) / R(Pre-LN)",
              lambda df: ratio(df, "post") / ratio(df, "pre"), ">=", 2.0, needs=("post", "pre")),
        Claim("admin_below_post", "R(Admin) / R(Post-LN)",
              lambda df: ratio(df, "admin") / ratio(df, "post"), "<=", 0.5, needs=("post", "admin")),
        Claim("deepnorm_below_post", "dF(DeepNorm) / dF(Post-LN), worst depth",
              lambda df: max(select(df, panel="change", variant="deepnorm", depth=L).delta_f.mean()
                             / select(df, panel="change", variant="post", depth=L).delta_f.mean()
                             for L in select(df, panel="change").depth.unique()), "<", 1.0,
              needs=("post", "deepnorm")),
        Claim("self_dependency_post_vs_pre", "mean beta^2_{i,i} over the last L sublayers: Post-LN / Pre-LN",
              lambda df: late_self(df, "post") / late_self(df, "pre"), ">=", 2.0, needs=("post", "pre")),
        Claim("pre_self_dependency_falls", "Pre-LN: Spearman(i, beta^2_{i,i})",
              lambda df: spearman(self_dependency(df, "pre").index, self_dependency(df, "pre").values), "<=", -0.7,
              needs=("pre",)),
    ]


def plot(df, path) -> None:
    import seaborn as sns

    ch, dep = df[df.panel == "change"], df[df.panel == "dependency"]
    heat_vars = [v for v in ("post", "pre") if v in set(dep.variant)]
    fig, axes = figure(2 + len(heat_vars))
    pal = palette(df.variant.unique())
    sns.lineplot(data=ch, x="depth", y="delta_f2", hue="variant", palette=pal, marker="o", errorbar="sd", ax=axes[0])
    axes[0].set(xscale="log", yscale="log", xlabel="depth L (log)", ylabel=r"$|F(x,W) - F(x,W^*)|^2$ (log)",
                title="(Fig. 4) output change, 1% weight noise")
    axes[0].set_xticks(sorted(ch.depth.unique()), [str(d) for d in sorted(ch.depth.unique())])
    axes[0].minorticks_off()
    big = dep[dep.depth == dep.depth.max()]
    selfd = big[big.component == big.sublayer]
    sns.lineplot(data=selfd, x="sublayer", y="beta2", hue="variant", palette=pal, marker="o", errorbar="sd", ax=axes[1])
    axes[1].set(xlabel="sublayer i", ylabel=r"$\beta^2_{i,i}$", title=f"self-dependency, L={big.depth.max()}")
    small = dep[dep.depth == dep.depth.min()]
    for ax, v in zip(axes[2:], heat_vars):
        m = small[small.variant == v].groupby(["sublayer", "component"]).beta2.mean().unstack()
        m.index, m.columns = m.index.astype(int), m.columns.astype(int)
        sns.heatmap(m, ax=ax, cmap="viridis", vmin=0, vmax=1, cbar_kws=dict(label=r"$\beta^2_{i,j}$"))
        ax.set(title=f"(Fig. 7) {v}, L={small.depth.min()}", xlabel="component j (0 = embedding)",
               ylabel="sublayer i")
    save(fig, path, f"{REF.authors}, {REF.figure}: amplification and residual dependency at init")


register(Experiment(
    name="admin_amplification",
    reference=REF,
    summary="output change under 1% weight noise vs depth, and the beta^2 dependency heat-map / self-dependency",
    kind="init",
    grids={"full": dict(variants=["post", "pre", "admin", "deepnorm"], depths=[3, 6, 12, 24, 48], seeds=[0, 1, 2],
                        eps=1e-2, batch=4, dep_variants=["post", "pre", "admin"], dep_depths=[6, 12]),
           "ci": dict(variants=["post", "pre", "admin", "deepnorm"], depths=[3, 12, 48], seeds=[0, 1, 2], eps=1e-2,
                      batch=2, dep_variants=["post", "pre"], dep_depths=[6, 12])},
    run=run,
    plot=plot,
    claims=claims(),
))
