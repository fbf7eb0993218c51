"""Wortsman et al. 2023 Fig. 1 and Fig. 2: final loss vs peak LR with and without qk-layernorm, and the max
attention logit; LR-sensitivity per seed (the framework's stability metric,
:func:`analysis.metrics.lr_sensitivity_values`, with l0 = ln|V|)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.metrics import lr_sensitivity_values

from .common import figure, save
from .core import HAMLET, Claim, Experiment, Reference, Setting, register
from .training import data_label, data_name, data_spec, run_grid

REF = Reference("Small-scale proxies for large-scale Transformer training instabilities", "2309.14322",
                "Fig. 1 and Fig. 2", "Wortsman et al. 2023")
LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]


def run(grid, ctx) -> pd.DataFrame:
    specs = [dict(variant=grid["variant"], depth=grid["depth"], lr=lr, qk_norm=qk, seed=seed, steps=grid["steps"],
                  **data_spec(grid))
             for seed in grid["seeds"] for qk in (False, True) for lr in grid["lrs"]]
    recs = run_grid(specs, ctx)
    rows = []
    for r in recs:
        s = r["spec"]
        rows.append(dict(data=data_name(s), variant=s["variant"], depth=s["depth"], qk_norm=bool(s["qk_norm"]),
                         lr=s["lr"],
                         seed=s["seed"], steps=s["steps"], initial_loss=r["initial_loss"],
                         final_eval_loss=r["final_eval_loss"], diverged=r["diverged"],
                         max_attn_logit=r["max_attn_logit"], mean_log_z=r["mean_log_z"]))
    df = pd.DataFrame(rows)
    l0 = math.log(data_spec(grid)["vocab"])
    sens = []
    for (qk, seed), g in df.groupby(["qk_norm", "seed"]):
        sens.append(dict(qk_norm=qk, seed=seed,
                         lr_sensitivity=lr_sensitivity_values(g.final_eval_loss, l0, g.diverged)))
    return df.merge(pd.DataFrame(sens), on=["qk_norm", "seed"])


def sens_gap(df) -> float:
    s = df.groupby(["seed", "qk_norm"]).lr_sensitivity.first().unstack()
    return float((s[True] - s[False]).max())  # worst seed: LRsens(on) - LRsens(off)


def logit_ratio(df) -> float:
    top = df[df.lr >= 0.1]
    if top.empty:
        from .core import Skip
        raise Skip("no LR >= 0.1 in the grid")
    m = top.groupby(["lr", "qk_norm"]).max_attn_logit.mean().unstack()
    return float((m[False] / m[True]).min())


def plot(df, path) -> None:
    import seaborn as sns

    fig, axes = figure(3)
    d = df.copy()
    d["qk-layernorm"] = d.qk_norm.map({True: "on", False: "off"})
    d["loss (diverged = initial)"] = np.where(d.final_eval_loss.isna(), d.initial_loss,
                                              np.minimum(d.final_eval_loss, d.initial_loss))
    pal = {"off": "#1f77b4", "on": "#ff7f0e"}
    sns.lineplot(data=d, x="lr", y="loss (diverged = initial)", hue="qk-layernorm", palette=pal, marker="o",
                 errorbar="sd", ax=axes[0])
    axes[0].set(xscale="log", xlabel="peak learning rate (log)", ylabel="final eval loss",
                title="(Fig. 1) final loss vs LR, pre-LN")
    sns.lineplot(data=d, x="lr", y="max_attn_logit", hue="qk-layernorm", palette=pal, marker="o", errorbar="sd",
                 ax=axes[1], legend=False)
    axes[1].set(xscale="log", yscale="log", xlabel="peak learning rate (log)", ylabel="max |attention logit| (log)",
                title="(Fig. 2) attention logit growth")
    s = d.groupby(["qk-layernorm", "seed"]).lr_sensitivity.first().reset_index()
    sns.barplot(data=s, x="qk-layernorm", y="lr_sensitivity", hue="qk-layernorm", palette=pal, ax=axes[2],
                errorbar="sd", legend=False)
    axes[2].set(ylabel="LR sensitivity (lower = more stable)", title="LR sensitivity, mean over seeds")
    save(fig, path, f"{REF.authors}, {REF.figure}: qk-layernorm and LR sensitivity (d=64, L=4, {data_label(df)})")


register(Experiment(
    name="wortsman_lr",
    reference=REF,
    summary="final loss and max attention logit vs peak LR (7 LRs), qk-layernorm on/off, LR-sensitivity",
    kind="train",
    grids={"full": dict(variant="pre", depth=4, lrs=LRS, seeds=[0, 1, 2], steps=300, vocab=64),
           "seed0": dict(variant="pre", depth=4, lrs=LRS, seeds=[0], steps=300, vocab=64),  # the full grid, 1 seed
           "ci": dict(variant="pre", depth=2, lrs=[1e-3, 1e-2, 1e-1, 3e-1], seeds=[0], steps=60, vocab=64)},
    robustness=[Setting("text_hamlet", seeds=[0, 1, 2], text=HAMLET, note="the Hamlet text (bytes) instead of the synthetic stream")],
    run=run,
    plot=plot,
    claims=[
        Claim("qk_norm_lowers_sensitivity", "LRsens(qk-LN on) - LRsens(off), worst seed",
              sens_gap, "<", 0.0, needs=("pre",)),
        Claim("logit_growth", "max attention logit off / on at LR >= 0.1 (worst LR)",
              logit_ratio, ">=", 10.0, needs=("pre",), scale="log"),
    ],
    budget_s=600,
))
