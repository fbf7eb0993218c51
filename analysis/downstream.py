"""Downstream score vs depth: does a variant that pre-trains stably also transfer?

Reads the fine-tuning results ``python -m resnorm.finetune`` leaves in each run folder,
``<run>/finetune/<task>/summary.json`` (the fields ``task``, ``task_metric``, ``task_score``,
``task_majority_accuracy``; docs/finetune.md), joined to the sweep's runs table. Torch-free.

:func:`downstream_table` is the tidy table (one row per run and task); :func:`downstream_vs_depth`
draws it: one panel per task (and setting), x = depth, y = the task's held-out score (accuracy or
span F1), one line per variant (mean over seeds, error bars of one sd), the majority-class accuracy
as a dashed grey line for classification tasks. Fine-tunes that did not complete are left out.
:func:`figures` adds it to the report (:func:`analysis.report.make_report`) when there is something to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import pandas as pd

from resnorm.runs.folder import FINETUNE as FINETUNE_DIR, read_summary

COLUMNS = ("run_dir", "variant", "depth", "seed", "setting", "task", "task_metric", "task_score",
           "task_majority_accuracy", "status")


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
                             task_majority_accuracy=s.get("task_majority_accuracy"), status=s.get("status")))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    for column in ("task_score", "task_majority_accuracy"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    return table


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
        majority = part["task_majority_accuracy"].dropna()
        if len(majority):
            ax.axhline(float(majority.iloc[0]), color=style.NEUTRAL, ls="--", lw=1)
        plots._depth_axis(ax, depths)
        metric = part["task_metric"].iloc[0]
        ax.set(xlabel="depth (blocks)", ylabel=f"held-out {str(metric).replace('_', ' ')}",
               title=task + (f"\n{setting}" if setting else ""))
    values = pd.concat([done["task_score"], done["task_majority_accuracy"].dropna()])
    axes.flat[0].set_ylim(max(0.0, values.min() - 0.05), min(1.0, values.max() + 0.05))
    handles = plots._variant_handles(variants, marker="o")
    if done["task_majority_accuracy"].notna().any():
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color=style.NEUTRAL, ls="--", lw=1, label="majority class"))
    plots._legend(fig, handles)
    fig.suptitle(f"{sweep.name}: downstream score after fine-tuning vs depth")
    return plots._save(fig, path)
