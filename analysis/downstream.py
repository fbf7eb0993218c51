"""Downstream score vs depth: does a variant that pre-trains stably also transfer?

Reads the fine-tuning results ``python -m resnorm.finetune`` leaves in each run folder,
``<run>/finetune/<task>/summary.json`` (the fields ``task``, ``task_metric``, ``task_score``,
``task_majority_accuracy``; docs/finetune.md), joined to the sweep's runs table. Torch-free.

:func:`downstream_table` is the tidy table (one row per run and task); :func:`downstream_vs_depth`
draws it: one panel per task (and setting), x = depth, y = the task's held-out score (accuracy or
span F1), one line per variant (mean over seeds, error bars of one sd), and the floors in grey
(:data:`FLOORS`: the majority class, dashed; the n-gram logistic regression, dotted; the linear probe
on the frozen pre-trained features, dash-dotted, per depth). :func:`score_intervals` is the
per-seed table with Student-t intervals; :func:`downstream_verdicts` the paired-seed verdicts
(:mod:`analysis.verdicts`: each variant against the baseline variant, and each variant against the
n-gram floor, seed by seed). Fine-tunes that did not complete are left out.
:func:`figures` adds it to the report (:func:`analysis.report.make_report`) when there is something to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import pandas as pd

from resnorm.runs.folder import FINETUNE as FINETUNE_DIR, read_summary

FLOORS = {"floor_majority": ("majority class", "--"), "floor_ngram": ("n-gram logistic regression", ":"),
          "floor_probe": ("linear probe, frozen features", "-.")}  # summary key -> (label, line style)
COLUMNS = ("run_dir", "variant", "depth", "seed", "setting", "task", "task_metric", "task_score",
           "task_majority_accuracy", *FLOORS, "recipe_lr", "status")


def figures(sweep) -> Dict[str, Callable]:
    """The report's extra figure: ``{"downstream": downstream_vs_depth}`` when a run of the sweep has
    a fine-tuning result (a ``finetune/<task>/summary.json``), else nothing (no "not drawn" entry
    for sweeps that were never fine-tuned)."""
    has = any(any((Path(d) / FINETUNE_DIR).glob("*/summary.json")) for d in sweep.runs["run_dir"])
    return {"downstream": downstream_vs_depth} if has else {}


def downstream_table(sweep) -> pd.DataFrame:
    """One row per (run, task) with a fine-tuning summary: :data:`COLUMNS`."""
    rows = []
    for _, run in sweep.runs.iterrows():
        folder = Path(run["run_dir"]) / FINETUNE_DIR
        if not folder.is_dir():
            continue
        for task_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            s = read_summary(task_dir)
            if s is None:
                continue
            rows.append(dict(run_dir=run["run_dir"], variant=run["variant"], depth=run["depth"], seed=run["seed"],
                             setting=run.get("setting", "") or "", task=s.get("task") or task_dir.name,
                             task_metric=s.get("task_metric"), task_score=s.get("task_score"),
                             task_majority_accuracy=s.get("task_majority_accuracy"),
                             **{k: s.get(k) for k in FLOORS}, recipe_lr=s.get("recipe_lr"), status=s.get("status")))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    for column in ("task_score", "task_majority_accuracy", *FLOORS, "recipe_lr"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    return table


def score_intervals(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per task, setting, variant and depth: the completed fine-tunes' mean score over seeds, its
    Student-t interval (scipy; none from one seed), the mean of each floor, and the seeds."""
    from scipy import stats

    done = table[table["status"] == "completed"]
    rows = []
    for key, part in done.groupby(["task", "setting", "variant", "depth"]):
        scores = part["task_score"].dropna().to_numpy()
        n = len(scores)
        mean = float(scores.mean()) if n else float("nan")
        lo = hi = float("nan")
        if n > 1:
            lo, hi = stats.t.interval(confidence, n - 1, loc=mean, scale=stats.sem(scores))
        rows.append(dict(zip(("task", "setting", "variant", "depth"), key), n_seeds=n, score_mean=mean,
                         ci_low=lo, ci_high=hi, **{k: part[k].mean() for k in FLOORS},
                         scores=";".join(f"{v:.4f}" for v in scores)))
    return pd.DataFrame(rows)


def _paired_row(key, variant: str, against: str, scores: pd.Series, reference: pd.Series) -> Dict:
    """One paired comparison (score minus reference, matched by seed) as a verdict row before correction."""
    from analysis.verdicts import minimal_detectable_difference, paired_difference

    both = pd.concat([scores.rename("a"), reference.rename("b")], axis=1).dropna()
    pair = paired_difference(both["a"], both["b"])
    return dict(zip(("task", "setting", "depth"), key), variant=variant, against=against, n_pairs=pair.n,
                difference=pair.mean, ci_low=pair.low, ci_high=pair.high, p=pair.p,
                mdd=minimal_detectable_difference(pair.sd, pair.n), seeds=";".join(map(str, both.index)))


def downstream_verdicts(table: pd.DataFrame, baseline: str = "pre", correction: str = "holm") -> pd.DataFrame:
    """The verdict machinery on the completed fine-tunes' scores (higher is better), per task, setting and
    depth, paired by seed (:mod:`analysis.verdicts`): each variant minus the ``baseline`` variant, and each
    variant minus its own n-gram floor (same split), with the mean difference, its t interval, the
    paired t-test's p corrected over all rows (``correction``), the minimal detectable difference and the
    verdict (``better``: the score is higher). A variant needs two seeds in common with what it is
    compared with."""
    from analysis.verdicts import adjust, classify

    done = table[(table["status"] == "completed") & np.isfinite(table["task_score"])]
    rows = []
    for key, part in done.groupby(["task", "setting", "depth"]):
        by_seed = {v: g.set_index("seed") for v, g in part.groupby("variant")}
        for variant, runs in sorted(by_seed.items()):
            rows.append(_paired_row(key, variant, "floor_ngram", runs["task_score"], runs["floor_ngram"]))
            if variant != baseline and baseline in by_seed:
                rows.append(_paired_row(key, variant, baseline, runs["task_score"], by_seed[baseline]["task_score"]))
    out = pd.DataFrame(rows, columns=["task", "setting", "depth", "variant", "against", "n_pairs", "difference",
                                      "ci_low", "ci_high", "p", "mdd", "seeds"])
    if out.empty:
        return out.assign(p_adjusted=[], verdict=[])
    out["p_adjusted"] = adjust(out["p"].to_numpy(), correction)
    # classify reads a lower-is-better difference: the score's gain is handed over negated
    out["verdict"] = [classify(p, -hi, -lo, mdd) for p, lo, hi, mdd in
                      zip(out["p_adjusted"], out["ci_low"], out["ci_high"], out["mdd"])]
    return out


def downstream_vs_depth(sweep, path) -> Optional[Path]:
    """The figure (see the module docstring); None (logged) when no run has a completed fine-tune."""
    import seaborn as sns

    from analysis import canvas as plots, style

    table = downstream_table(sweep)
    done = table[(table["status"] == "completed") & np.isfinite(table["task_score"])].copy()
    if done.empty:
        return plots._skip("downstream", "no run has a completed fine-tune (python -m resnorm.finetune "
                                         "SWEEP --task NAME writes <run>/finetune/<task>/)")
    done["depth"] = done["depth"].astype(float)
    panels = sorted(done.groupby(["task", "setting"]).groups)
    variants = style.order(done["variant"])
    colours = style.palette(variants)
    depths = sorted(int(d) for d in done["depth"].unique())
    ncols = min(len(panels), 3)
    fig, axes = plots._grid(len(panels), ncols, plots.PANEL_W * 1.3, plots.PANEL_H * 1.3, sharey=True)
    for ax, (task, setting) in zip(axes.flat, panels):
        part = done[(done["task"] == task) & (done["setting"] == setting)]
        present = [v for v in variants if v in set(part["variant"])]
        sns.lineplot(data=part, x="depth", y="task_score", hue="variant", hue_order=present,
                     palette={v: colours[v] for v in present}, estimator="mean", errorbar="sd",
                     err_style="bars", marker="o", markersize=6, err_kws={"capsize": 3}, legend=False, ax=ax)
        for key, (_, ls) in FLOORS.items():
            level = part.groupby("depth")[key].mean().dropna()
            if key == "floor_probe" and len(level) > 1:  # the probe depends on the run: one level per depth
                ax.plot(level.index, level.values, color=style.NEUTRAL, ls=ls, lw=1)
            elif len(level):
                ax.axhline(float(level.mean()), color=style.NEUTRAL, ls=ls, lw=1)
        plots._depth_axis(ax, depths)
        metric = part["task_metric"].iloc[0]
        ax.set(xlabel="depth (blocks)", ylabel="held-out score",  # the panels share y: the metric in each title
               title=f"{task} ({str(metric).replace('_', ' ')})" + (f"\n{setting}" if setting else ""))
    values = pd.concat([done["task_score"], *(done[k].dropna() for k in FLOORS)])
    axes.flat[0].set_ylim(max(0.0, values.min() - 0.05), min(1.0, values.max() + 0.05))
    handles = plots._variant_handles(variants, marker="o")
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], color=style.NEUTRAL, ls=ls, lw=1, label=label)
                for key, (label, ls) in FLOORS.items() if done[key].notna().any()]
    plots._legend(fig, handles)
    fig.suptitle(f"{sweep.name}: downstream score after fine-tuning vs depth")
    return plots._save(fig, path)
