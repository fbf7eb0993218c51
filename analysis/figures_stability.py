"""Stability figures of a finished sweep, from its run folders only (no torch, no resnorm).

``python -m analysis.figures_stability multirun/<sweep> [--out results/<sweep>]`` writes, where the sweep
has the axes a figure needs (each is skipped otherwise, and the report says so):

- ``stability_depth_vs_loss.png``: depth vs final validation loss (mean +- 95% CI over seeds), diverged runs
  marked with x at their initial loss;
- ``stability_divergence_rate.png``: divergence rate vs depth;
- ``stability_frontier.png``: the largest stable learning rate vs depth (needs >= 2 LRs);
- ``stability_lr_depth_heatmap.png``: final loss over LR x depth, one panel per variant (needs >= 2 LRs);
- ``stability_lr_sensitivity.png``: Wortsman et al.'s LR-sensitivity vs depth (needs >= 2 LRs);
- ``stability_layer_profiles.png``: per-layer grad norm, activation RMS, update ratio at step 0 and at the end;
- ``stability_loss_curves.png``: training-loss curves, a depth x variant grid;
- ``stability_coord_check.png``: a depth coord check (mup-style): activation RMS per layer group vs depth,
  at the first and the last probed step;
- ``stability_report.md``: every figure and the run table (``stability_runs.csv``).

Variant colours come from ``analysis.style.palette()`` when that module exists, else a fixed fallback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd

from .stability import lr_table, runs_table, seed_table

_FALLBACK = {"post": "#d62728", "pre": "#1f77b4", "rmsnorm": "#17becf", "deepnorm": "#2ca02c",
             "noresidual": "#7f7f7f", "admin": "#9467bd", "lns": "#ff7f0e", "peri": "#8c564b"}


def palette(names) -> Dict[str, str]:
    try:
        from .style import palette as style_palette  # type: ignore

        pal = style_palette()
    except Exception:
        pal = {}
    return {n: pal.get(n, _FALLBACK.get(n, "#333333")) for n in names}


def _fig(n, w=4.2, h=3.3):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, n, figsize=(w * n, h), squeeze=False)
    return fig, axes[0]


def _save(fig, path, title):
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def depth_vs_loss(runs, path):
    fig, (ax,) = _fig(1)
    pal = palette(runs.variant.unique())
    st = seed_table(runs)
    for v, g in st.groupby("variant"):
        ax.errorbar(g.depth, g["mean"], yerr=g.ci95.fillna(0), color=pal[v], marker="o", capsize=3, label=v)
    dv = runs[runs.diverged]
    for v, g in dv.groupby("variant"):
        ax.scatter(g.depth, g.initial_loss, marker="x", s=60, color=pal[v])
    ax.set(xscale="log", xlabel="depth (log)", ylabel="final validation loss (x: diverged, at initial loss)")
    ax.legend(title="variant")
    _save(fig, path, "depth vs final loss")


def divergence_rate(runs, path):
    import seaborn as sns

    fig, (ax,) = _fig(1)
    st = seed_table(runs)
    sns.lineplot(data=st, x="depth", y="divergence_rate", hue="variant", palette=palette(st.variant.unique()),
                 marker="o", ax=ax)
    ax.set(xscale="log", ylim=(-0.05, 1.05), xlabel="depth (log)", ylabel="fraction of runs diverged")
    _save(fig, path, "divergence rate vs depth")


def frontier(lrt, path):
    import seaborn as sns

    fig, (ax,) = _fig(1)
    d = lrt.dropna(subset=["largest_stable_lr"])
    sns.lineplot(data=d, x="depth", y="largest_stable_lr", hue="variant", palette=palette(lrt.variant.unique()),
                 marker="o", errorbar=None, ax=ax)
    ax.set(xscale="log", yscale="log", xlabel="depth (log)", ylabel="largest stable learning rate (log)")
    _save(fig, path, "stability frontier")


def heatmap(runs, path):
    import seaborn as sns

    variants = sorted(runs.variant.unique())
    fig, axes = _fig(len(variants), w=3.6)
    for ax, v in zip(axes, variants):
        m = runs[runs.variant == v].groupby(["lr", "depth"]).loss.median().unstack("depth").sort_index(ascending=False)
        sns.heatmap(m, ax=ax, annot=True, fmt=".2f", cmap="magma_r", cbar=False,
                    yticklabels=[f"{x:g}" for x in m.index])
        ax.set(title=v, xlabel="depth", ylabel="peak learning rate")
    _save(fig, path, "final loss (diverged = initial loss), learning rate x depth")


def lr_sensitivity(lrt, path):
    import seaborn as sns

    fig, (ax,) = _fig(1)
    sns.lineplot(data=lrt, x="depth", y="lr_sensitivity", hue="variant", palette=palette(lrt.variant.unique()),
                 marker="o", errorbar="sd", ax=ax)
    ax.set(xscale="log", xlabel="depth (log)", ylabel="LR sensitivity (Wortsman et al. 2023; lower = stabler)")
    _save(fig, path, "LR sensitivity vs depth")


def load_layers(runs) -> pd.DataFrame:
    frames = []
    for _, r in runs.iterrows():
        f = Path(r.run) / "layers.parquet"
        if f.is_file():
            d = pd.read_parquet(f)
            d["variant"], d["depth"], d["seed"], d["lr"], d["run"] = r.variant, r.depth, r.seed, r.lr, r.run
            frames.append(d)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def layer_profiles(layers, path):
    import seaborn as sns

    qs = [q for q in ("grad_norm", "act_rms", "update_ratio") if q in set(layers.quantity)]
    fig, axes = _fig(len(qs))
    pal = palette(layers.variant.unique())
    depth = layers.depth.max()
    d = layers[layers.depth == depth]
    for ax, q in zip(axes, qs):
        dq = d[d.quantity == q]
        lo = dq.groupby("run").step.transform("min")
        hi = dq.groupby("run").step.transform("max")
        sel = dq[(dq.step == lo) | (dq.step == hi)].copy()
        sel["when"] = np.where(sel.step == lo[sel.index], "step 0", "end")
        sns.lineplot(data=sel, x="layer", y="value", hue="variant", style="when", palette=pal, marker="o",
                     errorbar=None, ax=ax)
        ax.set(yscale="log", xlabel="layer", ylabel=f"{q} (log; attn and mlp pooled)", title=f"{q}, depth {depth}")
    _save(fig, path, "per-layer profiles at step 0 and at the end")


def loss_curves(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants, depths = sorted(runs.variant.unique()), sorted(runs.depth.unique())
    fig, axes = plt.subplots(len(depths), len(variants), figsize=(3.2 * len(variants), 2.4 * len(depths)),
                             squeeze=False, sharey=True)
    pal = palette(variants)
    for i, dep in enumerate(depths):
        for j, v in enumerate(variants):
            ax = axes[i][j]
            for _, r in runs[(runs.variant == v) & (runs.depth == dep)].iterrows():
                f = Path(r.run) / "metrics.parquet"
                if f.is_file():
                    m = pd.read_parquet(f)
                    ax.plot(m.step, m.train_loss, color=pal[v], alpha=0.7, lw=1)
            ax.set_title(f"{v}, depth {dep}", fontsize=8)
            ax.set_xlabel("step")
            ax.set_ylabel("train loss")
    _save(fig, path, "training loss curves")


def coord_check(layers, path):
    import seaborn as sns

    d = layers[layers.quantity == "act_rms"]
    if d.empty:
        return False
    steps = sorted(d.step.unique())
    fig, axes = _fig(2)
    d = d.copy()
    d["group"] = np.select([d.layer < d.depth / 3, d.layer < 2 * d.depth / 3], ["first third", "middle third"],
                           "last third")
    for ax, (label, step) in zip(axes, (("init", steps[0]), (f"step {steps[-1]}", steps[-1]))):
        sel = d[d.step == (d.groupby("run").step.transform("min") if label == "init"
                                else d.groupby("run").step.transform("max"))]
        sns.lineplot(data=sel, x="depth", y="value", hue="variant", style="group", palette=palette(d.variant.unique()),
                     marker="o", errorbar=None, ax=ax)
        ax.set(xscale="log", yscale="log", xlabel="depth (log)", ylabel="activation RMS (log)", title=label)
    _save(fig, path, "depth coord check: activation size per layer group vs depth")
    return True


def _markdown(df: pd.DataFrame) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    rows = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    rows += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(rows)


def make_all(sweep, out) -> List[str]:
    """Write every applicable figure and the report; return the file names written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_table(sweep)
    if runs.empty:
        raise FileNotFoundError(f"no run folders (summary.json) under {sweep}")
    written, skipped = [], []
    runs.drop(columns=["run"]).to_csv(out / "stability_runs.csv", index=False)
    many_lrs = runs.lr.nunique() >= 2
    lrt = lr_table(runs) if many_lrs else None
    layers = load_layers(runs)
    jobs = [("stability_depth_vs_loss.png", lambda p: depth_vs_loss(runs, p), True),
            ("stability_divergence_rate.png", lambda p: divergence_rate(runs, p), True),
            ("stability_frontier.png", lambda p: frontier(lrt, p), many_lrs),
            ("stability_lr_depth_heatmap.png", lambda p: heatmap(runs, p), many_lrs),
            ("stability_lr_sensitivity.png", lambda p: lr_sensitivity(lrt, p), many_lrs),
            ("stability_layer_profiles.png", lambda p: layer_profiles(layers, p), not layers.empty),
            ("stability_loss_curves.png", lambda p: loss_curves(runs, p), True),
            ("stability_coord_check.png", lambda p: coord_check(layers, p),
             not layers.empty and "act_rms" in set(layers.quantity))]
    for name, fn, ok in jobs:
        if ok:
            fn(out / name)
            written.append(name)
        else:
            skipped.append(name)
    lines = [f"# Stability report: `{sweep}`", "", f"{len(runs)} runs.", ""]
    lines += [f"## {n[10:-4].replace('_', ' ')}\n\n![{n}]({n})\n" for n in written]
    if skipped:
        lines.append("Not drawn (the sweep lacks the axis, e.g. a learning-rate grid or probes): "
                     + ", ".join(skipped) + "\n")
    if lrt is not None:
        lines += ["## LR sensitivity per (variant, depth, seed)", "", _markdown(lrt), ""]
    cols = ["variant", "depth", "seed", "lr", "status", "diverged_step", "initial_loss", "final_val_loss",
            "best_val_loss", "loss_spikes"]
    lines += ["## Runs", "", _markdown(runs[cols]), ""]
    (out / "stability_report.md").write_text("\n".join(lines))
    return written + ["stability_report.md", "stability_runs.csv"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.figures_stability", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    out = args.out or Path("results") / args.sweep.name
    for name in make_all(args.sweep, out):
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
