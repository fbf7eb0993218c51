"""The loss figures: final validation loss against depth (``depth_vs_val_loss``) and the training and
validation curves (``loss_curves``)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from analysis import metrics, style
from analysis.canvas import (MIN_WIDTH, PANEL_H, PANEL_W, _depth_axis, _figure, _grid, _legend, _loss_limits,
                             _mark_failures, _plottable_runs, _save, _shade, _skip, _unigram_handle,
                             _unigram_lines, _variant_handles, setting_order)

log = logging.getLogger("analysis.plots")  # one logger for every figure (the report collects its skips)


def depth_vs_val_loss(sweep, path) -> Optional[Path]:
    """Final validation loss against depth, one line per variant, one panel per setting.

    Reads ``sweep.runs`` (status, final_val_loss, variant, depth, seed, setting). A line is the mean
    over seeds of the completed runs' final validation loss, with error bars of one standard
    deviation where a depth has several seeds; a dashed grey line at the runs' ``unigram_loss``
    (where known: a run at it learned only byte frequencies, a stalled run). Diverged runs have no
    valid final loss: each
    (variant, depth) with a diverged run gets an ``x`` at the top of the panel in the variant's
    colour (with the count when more than one seed diverged); failed runs a hollow square below it.
    Runs still ``running`` have no final loss yet and are not shown. When the runs were trained with
    different tokenizers the y axis is bits per byte (:func:`analysis.metrics.loss_column`), without
    the unigram line (nats per token).
    """
    import seaborn as sns
    from matplotlib.lines import Line2D

    runs = _plottable_runs(sweep.runs)
    if runs.empty:
        return _skip("depth_vs_val_loss", "no run has both a variant and a depth")
    runs["depth"] = runs["depth"].astype(float)
    y = metrics.loss_column(runs)
    unigram = runs["unigram_loss"] if y == "final_val_loss" else runs["unigram_loss"].iloc[:0]
    ok = runs[(runs["status"] == "completed") & np.isfinite(runs[y])]
    marked = runs[runs["status"].isin(["diverged", "failed"])]
    if ok.empty and marked.empty:
        return _skip("depth_vs_val_loss", "no completed run with a final validation loss and no "
                     "diverged or failed run")

    settings = setting_order(runs)
    variants = style.order(runs["variant"])
    colours = style.palette(variants)
    depths = sorted(int(d) for d in runs["depth"].unique())
    ncols = min(len(settings), 3)
    fig, axes = _grid(len(settings), ncols, PANEL_W * 1.3, PANEL_H * 1.3, sharey=True)
    several_seeds = bool((ok.groupby(["setting", "variant", "depth"]).size() > 1).any())
    reference = False
    for panel, (ax, setting) in enumerate(zip(axes.flat, settings)):
        panel_ok = ok[ok["setting"] == setting]
        if not panel_ok.empty:
            present = [v for v in variants if v in set(panel_ok["variant"])]
            sns.lineplot(data=panel_ok, x="depth", y=y, hue="variant", hue_order=present,
                         palette={v: colours[v] for v in present}, estimator="mean", errorbar="sd",
                         err_style="bars", marker="o", markersize=6, err_kws={"capsize": 3},
                         legend=False, ax=ax)
        else:
            ax.text(0.5, 0.5, "no completed run", transform=ax.transAxes, ha="center", va="center",
                    color="grey")
        _mark_failures(fig, ax, marked[marked["setting"] == setting], variants, colours)
        reference |= _unigram_lines(ax, unigram[runs["setting"] == setting])
        _depth_axis(ax, depths)
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel("" if panel % ncols else
                      ("final validation bits per byte" if y != "final_val_loss" else "final validation loss")
                      + ("\n(mean ± sd over seeds)" if several_seeds else ""))
        if setting:
            ax.set_title(setting)

    _loss_limits(axes.flat[0], ok, several_seeds, unigram, column=y)
    handles = _variant_handles(variants, marker="o") + ([_unigram_handle()] if reference else [])
    if (marked["status"] == "diverged").any():
        handles.append(Line2D([], [], ls="none", marker="x", ms=8, mew=2, color=style.NEUTRAL,
                              label="diverged"))
    if (marked["status"] == "failed").any():
        handles.append(Line2D([], [], ls="none", marker="s", ms=8, mew=2, mfc="none",
                              color=style.NEUTRAL, label="failed"))
    _legend(fig, handles)
    fig.suptitle(f"{sweep.name}: final validation {'loss' if y == 'final_val_loss' else 'bits per byte'} vs depth")
    return _save(fig, path)


def _curve_steps(sweep):
    """(steps, y label): the step losses as recorded, or, when the runs were trained with different
    tokenizers, in bits per byte (each run's losses x its validation tokens per byte / ln 2)."""
    runs, steps = sweep.runs, sweep.steps
    if metrics.loss_column(runs) == "final_val_loss" or steps.empty:
        return steps, "loss"
    factor = steps["run_dir"].map(dict(zip(runs["run_dir"], runs["val_tokens_per_byte"] / math.log(2))))
    steps = steps.copy()
    for column in ("train_loss", "val_loss"):
        if column in steps.columns:
            steps[column] = steps[column] * factor.astype(float)
    return steps, "bits per byte"


def loss_curves(sweep, path) -> Optional[Path]:
    """Train loss (lines) and validation loss (dots) against step, depth rows x variant columns.

    Reads ``sweep.steps`` (step, train_loss, val_loss) and ``sweep.runs`` (status, diverged_step).
    The y axis is shared, from the lowest finite loss to 1.1x the highest initial loss (a diverging
    loss leaves the top); a dashed vertical line marks the step a run diverged at, a dashed grey
    horizontal one the cell's ``unigram_loss`` (where the runs recorded it). Seeds of one cell
    are overlaid in the variant's colour; several settings are drawn in shades of it, light to dark.
    """
    from matplotlib.lines import Line2D

    steps, unit = _curve_steps(sweep)
    if steps.empty or "train_loss" not in steps.columns:
        return _skip("loss_curves", "no run wrote metrics.parquet with a train_loss column")
    runs = _plottable_runs(sweep.runs)
    runs = runs[runs["run_dir"].isin(set(steps["run_dir"])) | runs["status"].isin(["failed", "diverged"])]
    if runs.empty:
        return _skip("loss_curves", "no run with step metrics has both a variant and a depth")

    variants = style.order(runs["variant"])
    depths = sorted(int(d) for d in runs["depth"].unique())
    settings = setting_order(runs)
    shade_of = {s: (0.6 * (len(settings) - 1 - i) / (len(settings) - 1) if len(settings) > 1 else 0.0)
                for i, s in enumerate(settings)}
    by_run = {d: rows.sort_values("step") for d, rows in steps.groupby("run_dir", sort=False)}

    values = pd.concat([steps["train_loss"], steps.get("val_loss", pd.Series(dtype=float))])
    values = values[np.isfinite(values)]
    initial = [rows["train_loss"].iloc[0] for rows in by_run.values() if len(rows)]
    initial = [v for v in initial if np.isfinite(v)]
    if values.empty:
        return _skip("loss_curves", "no finite loss in any run")
    low = float(values.min())
    high = 1.1 * max(initial) if initial else float(values.max())
    high = max(high, low + 1e-3)

    fig, axes = _figure(len(depths), len(variants), max(PANEL_W * len(variants) + 1.8, MIN_WIDTH),
                        PANEL_H * len(depths) + 0.6, sharex=True, sharey=True)
    reference = False
    for r, depth in enumerate(depths):
        for c, variant in enumerate(variants):
            ax = axes[r, c]
            cell = runs[(runs["depth"] == depth) & (runs["variant"] == variant)]
            drawn = 0
            reference |= unit == "loss" and _unigram_lines(ax, cell["unigram_loss"])
            for _, run in cell.iterrows():
                colour = _shade(style.colour(variant), shade_of[run["setting"]])
                rows = by_run.get(run["run_dir"])
                if rows is not None and len(rows):
                    train = rows["train_loss"].where(np.isfinite(rows["train_loss"]))
                    ax.plot(rows["step"], train, color=colour, lw=1.1, alpha=0.85)
                    if "val_loss" in rows.columns:
                        val = rows[np.isfinite(rows["val_loss"])]
                        ax.plot(val["step"], val["val_loss"], ls="none", marker="o", ms=3.5,
                                color=colour, mec="white", mew=0.5)
                    drawn += 1
                if run["status"] == "diverged" and pd.notna(run["diverged_step"]):
                    ax.axvline(int(run["diverged_step"]), color=style.NEUTRAL, ls="--", lw=1)
            if drawn == 0:
                text = "failed" if (cell["status"] == "failed").any() else "no run"
                ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey")
            if r == 0:
                ax.set_title(style.label(variant), color=style.colour(variant), fontweight="bold")
            if c == 0:
                ax.set_ylabel(f"depth {depth}\n{unit}")
            if r == len(depths) - 1:
                ax.set_xlabel("step")
    axes[0, 0].set_ylim(low - 0.05 * (high - low), high)

    handles = [Line2D([], [], color="grey", lw=1.1, label="train loss"),
               Line2D([], [], color="grey", ls="none", marker="o", ms=3.5, label="val loss")]
    if (runs["status"] == "diverged").any():
        handles.append(Line2D([], [], color=style.NEUTRAL, ls="--", lw=1, label="diverged"))
    if reference:
        handles.append(_unigram_handle())
    if len(settings) > 1:
        handles += [Line2D([], [], color=_shade("#444444", shade_of[s]), lw=2, label=s) for s in settings]
    _legend(fig, handles)
    fig.suptitle(f"{sweep.name}: loss curves (rows: depth, columns: variant)")
    return _save(fig, path)
