"""The stability figures: failure and spike rates against depth, and over a learning-rate grid the
stability frontier, the LR x depth heatmap and the LR sensitivity against depth."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pandas as pd

from analysis import metrics, style
from analysis.canvas import (MIN_WIDTH, NONE_STABLE_Y, PANEL_H, PANEL_W, _depth_axis, _figure, _grid, _legend,
                             _lr_axis, _lr_depth_runs, _nudge, _plottable_runs, _save, _skip, _variant_handles,
                             _variant_lines, setting_order)

log = logging.getLogger("analysis.plots")  # one logger for every figure (the report collects its skips)


def _failure_table(sweep) -> Optional[Tuple[pd.DataFrame, pd.DataFrame]]:
    """``(runs, table)`` for :func:`failure_rate`: the plottable runs and their
    :func:`analysis.metrics.seed_summary` per (setting, variant, depth) with at least one finished
    run; None (logged) with fewer than two depths or no finished run."""
    runs = _plottable_runs(sweep.runs)
    if runs["depth"].nunique() < 2:
        return _skip("failure_rate", f"needs at least 2 depths, the sweep has {runs['depth'].nunique()}")
    table = metrics.seed_summary(runs, by=("setting", "variant", "depth"))
    table = table[table["finished"] > 0].copy()
    if table.empty:
        return _skip("failure_rate", "no run completed or diverged")
    return runs, table


def _failure_panel(ax, part: pd.DataFrame, depths: List[int]) -> None:
    """Stacked bars at each depth of ``part`` (one variant's seed table): the failure outcomes from
    the bottom (so the failure fraction is the top of the coloured stack), ``trained`` on top; the
    failure fraction's Wilson interval where a depth has several finished runs; ``k/n`` above."""
    x = np.arange(len(depths), dtype=float)
    bottom = np.zeros(len(depths))
    part = part.set_index(part["depth"].astype(int)).reindex(depths)
    finished = part["finished"].fillna(0).to_numpy(dtype=float)
    for outcome in (*metrics.FAILURES, "trained"):
        share = np.divide(part[outcome].fillna(0).to_numpy(dtype=float), finished, out=np.zeros(len(depths)),
                          where=finished > 0)
        ax.bar(x, share, bottom=bottom, width=0.7, color=style.OUTCOME_STYLE[outcome][1], edgecolor="white",
               lw=0.5)
        bottom += share
    rate = part["failure_rate"].to_numpy(dtype=float)
    several = finished > 1
    if several.any():
        low, high = part["failure_low"].to_numpy(dtype=float), part["failure_high"].to_numpy(dtype=float)
        ax.errorbar(x[several], rate[several], yerr=np.vstack([rate - low, high - rate])[:, several],
                    ls="none", color=style.NEUTRAL, capsize=4, lw=1.2)
    for xi, n, failed in zip(x, finished, part["finished"].fillna(0) - part["trained"].fillna(0)):
        label = f"{int(failed)}/{int(n)}" if n else "no run"
        ax.text(xi, 1.02, label, ha="center", va="bottom", fontsize=7, color="grey")
    ax.set_xticks(x, [str(d) for d in depths])
    ax.set_ylim(0.0, 1.12)
    ax.set_xlim(-0.6, len(depths) - 0.4)


def failure_rate(sweep, path) -> Optional[Path]:
    """The fraction of runs per outcome (trained / stalled / diverged / nonfinite) against depth,
    stacked, one panel per variant (columns) and setting (rows).

    Reads ``sweep.runs`` (``outcome``); counts and the failure rate (every outcome but trained) with
    its 95% Wilson interval over seeds come from :func:`analysis.metrics.seed_summary` (failed and
    running runs have no outcome and are left out). The interval is drawn where a depth has more
    than one finished run; ``k/n`` above a bar: failed of finished runs. Needs at least two depths.
    """
    from matplotlib.patches import Patch

    found = _failure_table(sweep)
    if found is None:
        return None
    runs, table = found
    settings = setting_order(runs[runs["setting"].isin(set(table["setting"]))])
    variants = style.order(table["variant"])
    depths = sorted(int(d) for d in runs["depth"].unique())
    panel_w = max(PANEL_W * 0.9, 0.55 * len(depths) + 1.0)
    fig, axes = _figure(len(settings), len(variants), max(panel_w * len(variants) + 1.0, MIN_WIDTH),
                        PANEL_H * 1.2 * len(settings) + 0.9, sharey=True)
    seeded = bool((table["finished"] > 1).any())
    for r, setting in enumerate(settings):
        for c, variant in enumerate(variants):
            ax = axes[r, c]
            _failure_panel(ax, table[(table["setting"] == setting) & (table["variant"] == variant)], depths)
            ax.set_title(style.label(variant) + (f"\n{setting}" if setting else ""), color=style.colour(variant),
                         fontweight="bold")
            ax.set_xlabel("depth (blocks)")
            ax.set_ylabel("" if c else "fraction of runs" + ("\n(failures: 95% Wilson CI)" if seeded else ""))
    handles = [Patch(facecolor=style.OUTCOME_STYLE[o][1], label=style.OUTCOME_STYLE[o][0])
               for o in ("trained", *metrics.FAILURES)]
    _legend(fig, handles)
    fig.suptitle(f"{sweep.name}: outcome of the runs vs depth (failure rate)")
    return _save(fig, path)


def spike_rate(sweep, path) -> Optional[Path]:
    """Loss spikes per 1000 steps against depth, one line per variant (mean over seeds, error bars
    of one sd where there are several), one panel per setting.

    Reads ``sweep.runs`` and ``sweep.steps``: the rate is :func:`analysis.metrics.spike_rates` (the
    training's own spike detector: ``spike_count`` over ``steps_done``, or the ``spike`` column).
    Skipped when no run recorded spike data (runs written before spike detection).
    """
    rates = metrics.spike_rates(sweep)
    if rates.empty:
        return _skip("spike_rate", "no run recorded spike data (spike_count or a spike column)")
    runs = _plottable_runs(sweep.runs).merge(rates, on="run_dir", how="inner")
    if runs.empty:
        return _skip("spike_rate", "no run with spike data has both a variant and a depth")
    grouped = runs.groupby(["setting", "variant", "depth"])["spike_rate"]
    table = grouped.agg(["mean", "std", "size"]).reset_index()
    table["depth"] = table["depth"].astype(float)
    table["low"], table["high"] = table["mean"] - table["std"], table["mean"] + table["std"]
    settings = setting_order(runs)
    variants = style.order(table["variant"])
    depths = sorted(int(d) for d in runs["depth"].unique())
    seeded = bool((table["size"] > 1).any())
    ncols = min(len(settings), 3)
    fig, axes = _grid(len(settings), ncols, PANEL_W * 1.3, PANEL_H * 1.3, sharey=True)
    for panel, (ax, setting) in enumerate(zip(axes.flat, settings)):
        _variant_lines(fig, ax, table[table["setting"] == setting], "depth", "mean", variants, "low", "high")
        _depth_axis(ax, depths)
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel("" if panel % ncols else
                      "loss spikes per 1000 steps" + ("\n(mean ± sd over seeds)" if seeded else ""))
        if setting:
            ax.set_title(setting)
    _legend(fig, _variant_handles(variants, marker="o"))
    fig.suptitle(f"{sweep.name}: loss spikes per 1000 steps vs depth")
    return _save(fig, path)


def stability_frontier(sweep, path) -> Optional[Path]:
    """The largest stable learning rate against depth, one line per variant: the stability frontier.

    Reads ``sweep.runs``; the rate is :func:`analysis.metrics.largest_stable_lr` over each (variant,
    depth)'s LR grid, all seeds together (a rate is stable only if every seed completed at least
    0.1 nat below the initial loss). A (variant, depth) with no stable rate gets a triangle at the
    bottom of the panel. Needs at least two learning rates and two depths.
    """
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    found = _lr_depth_runs(sweep, "stability_frontier")
    if found is None:
        return None
    runs, keys = found
    rows = []
    for (panel, variant, depth), group in runs.groupby(["panel", "variant", "depth"], sort=True):
        try:
            rate = metrics.largest_stable_lr(group)
        except ValueError:  # no finite initial loss: stability cannot be judged
            continue
        rows.append(dict(panel=panel, variant=variant, depth=float(depth), largest_stable_lr=rate))
    table = pd.DataFrame(rows, columns=["panel", "variant", "depth", "largest_stable_lr"])
    if table.empty:
        return _skip("stability_frontier", "no run has a finite initial loss")

    panels = sorted(table["panel"].unique())
    variants = style.order(table["variant"])
    depths = sorted(int(d) for d in runs["depth"].unique())
    rates = sorted(runs["lr"].unique())
    ncols = min(len(panels), 3)
    fig, axes = _grid(len(panels), ncols, PANEL_W * 1.3, PANEL_H * 1.3, sharey=True)
    for i, (ax, panel) in enumerate(zip(axes.flat, panels)):
        part = table[table["panel"] == panel]
        _variant_lines(fig, ax, part, "depth", "largest_stable_lr", variants)
        bottom = blended_transform_factory(ax.transData, ax.transAxes)
        for k, variant in enumerate(variants):
            none = part[(part["variant"] == variant) & part["largest_stable_lr"].isna()]
            if none.empty:
                continue
            ax.plot(none["depth"], [NONE_STABLE_Y] * len(none), ls="none", marker="v", ms=7,
                    color=style.colour(variant), transform=_nudge(fig, bottom, k, len(variants)),
                    clip_on=False, zorder=5)
        _depth_axis(ax, depths)
        _lr_axis(ax, rates)
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel("" if i % ncols else "largest stable learning rate")
        if panel:
            ax.set_title(panel)
    handles = _variant_handles(variants, marker="o")
    if table["largest_stable_lr"].isna().any():
        handles.append(Line2D([], [], ls="none", marker="v", ms=7, color=style.NEUTRAL,
                              label="no stable rate"))
    _legend(fig, handles)
    fig.suptitle(f"{sweep.name}: stability frontier (largest stable LR vs depth)")
    return _save(fig, path)


def lr_depth_heatmap(sweep, path) -> Optional[Path]:
    """Final validation loss over the learning rate x depth grid: one panel per variant (and per
    value of the other swept keys), one shared colour scale.

    Reads ``sweep.runs``. A cell is the mean over seeds of :func:`analysis.metrics.clipped_losses`
    (``min(final loss, l0)``, a diverged run counting as its initial loss ``l0``, the sweep's
    median initial loss where a run has none), the same numbers the LR sensitivity averages; a cell
    with a failed run (outcome stalled, diverged or nonfinite) says how many of its runs failed
    ("k/n fail"). Needs at least two learning rates and two depths.
    """
    import seaborn as sns
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    found = _lr_depth_runs(sweep, "lr_depth_heatmap")
    if found is None:
        return None
    runs, keys = found
    initial = runs["initial_loss"].where(np.isfinite(runs["initial_loss"]))
    if initial.isna().all():
        return _skip("lr_depth_heatmap", "no run has a finite initial loss")
    runs["loss"] = metrics.clipped_losses(runs["final_val_loss"], initial.fillna(initial.median()),
                                          runs["status"] == "diverged")
    # a cell counts its failed runs (any outcome but trained: stalled, diverged, nonfinite)
    runs["diverged"] = runs["outcome"].notna() & (runs["outcome"] != "trained") if "outcome" in runs \
        else runs["status"] == "diverged"
    cells = (runs.groupby(["panel", "variant", "lr", "depth"])
             .agg(loss=("loss", "mean"), diverged=("diverged", "sum"), runs=("loss", "size")).reset_index())

    panels = sorted(cells["panel"].unique())
    variants = style.order(cells["variant"])
    depths = sorted(int(d) for d in runs["depth"].unique())
    rates = sorted(runs["lr"].unique(), reverse=True)  # the largest rate on top
    norm = Normalize(float(cells["loss"].min()), float(cells["loss"].max()))
    cmap = "rocket_r"
    fig, axes = _figure(len(panels), len(variants), max(PANEL_W * len(variants) + 1.8, MIN_WIDTH),
                        (0.45 * len(rates) + 1.2) * len(panels) + 0.6)
    for r, panel in enumerate(panels):
        for c, variant in enumerate(variants):
            ax = axes[r, c]
            part = cells[(cells["panel"] == panel) & (cells["variant"] == variant)]
            loss = part.pivot(index="lr", columns="depth", values="loss").reindex(index=rates, columns=depths)
            div = part.pivot(index="lr", columns="depth", values="diverged").reindex(index=rates, columns=depths)
            n = part.pivot(index="lr", columns="depth", values="runs").reindex(index=rates, columns=depths)
            text = loss.map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
            text = text.where(div.fillna(0) == 0, text + "\n" + div.fillna(0).astype(int).astype(str)
                              + "/" + n.fillna(0).astype(int).astype(str) + " fail")
            sns.heatmap(loss, ax=ax, cmap=cmap, norm=norm, cbar=False, annot=text.to_numpy(), fmt="",
                        annot_kws={"fontsize": 7}, xticklabels=[str(d) for d in depths],
                        yticklabels=[f"{x:g}" for x in rates], linewidths=0.5, linecolor="white")
            ax.set_title(style.label(variant) + (f"\n{panel}" if panel else ""), color=style.colour(variant),
                         fontweight="bold")
            ax.set_xlabel("depth (blocks)")
            ax.set_ylabel("peak learning rate" if c == 0 else "")
    fig.colorbar(ScalarMappable(norm=norm, cmap=sns.color_palette(cmap, as_cmap=True)), ax=axes,
                 label="final val loss, mean over seeds\n(diverged = initial loss)", shrink=0.9)
    fig.suptitle(f"{sweep.name}: final validation loss over learning rate x depth")
    return _save(fig, path)


def lr_sensitivity_vs_depth(sweep, path) -> Optional[Path]:
    """Wortsman et al.'s LR sensitivity (left) and the best loss l* of the LR grid (right) against
    depth, one line per variant (a low sensitivity with a bad l* is not stable).

    Reads ``sweep.runs``; per seed, :func:`analysis.metrics.lr_sensitivity_table` (the numbers of
    lr_sensitivity.csv); lines are the mean over seeds with error bars of one standard deviation
    where there are several seeds (as in :func:`depth_vs_val_loss`; with two or three seeds a 95%
    interval is 9 or 2.5 standard deviations wide and would hide the lines). One row of panels per
    value of the swept keys other than the learning rate. Needs at least two learning rates and two
    depths.
    """
    found = _lr_depth_runs(sweep, "lr_sensitivity_vs_depth")
    if found is None:
        return None
    runs, keys = found
    try:
        table = metrics.lr_sensitivity_table(runs, by=["panel", "variant", "depth", "seed"])
    except ValueError as exc:
        return _skip("lr_sensitivity_vs_depth", str(exc))
    table = table[(table["n_lr"] >= 2) & np.isfinite(table["lr_sensitivity"])]
    if table.empty:
        return _skip("lr_sensitivity_vs_depth", "no LR grid of 2 or more rates with a finite initial loss")
    rows = []
    for (panel, variant, depth), group in table.groupby(["panel", "variant", "depth"], sort=True):
        row = dict(panel=panel, variant=variant, depth=float(depth), seeds=len(group))
        for column in ("lr_sensitivity", "best_loss"):
            mean, sd = group[column].mean(), group[column].std()  # sd: NaN for one seed, no bar
            row.update({column: mean, f"{column}_low": mean - sd, f"{column}_high": mean + sd})
        rows.append(row)
    means = pd.DataFrame(rows)

    panels = sorted(means["panel"].unique())
    variants = style.order(means["variant"])
    depths = sorted(int(d) for d in runs["depth"].unique())
    seeded = bool((means["seeds"] > 1).any())
    fig, axes = _figure(len(panels), 2, max(PANEL_W * 1.3 * 2 + 1.8, MIN_WIDTH), PANEL_H * 1.3 * len(panels) + 0.5)
    for r, panel in enumerate(panels):
        part = means[means["panel"] == panel]
        for c, (column, label) in enumerate((("lr_sensitivity", "LR sensitivity (lower = stabler)"),
                                             ("best_loss", "best loss l* of the LR grid"))):
            ax = axes[r, c]
            _variant_lines(fig, ax, part, "depth", column, variants, f"{column}_low", f"{column}_high")
            _depth_axis(ax, depths)
            ax.set_xlabel("depth (blocks)")
            ax.set_ylabel(label + ("\n(mean ± sd over seeds)" if seeded else ""))
            if panel:
                ax.set_title(panel)
    _legend(fig, _variant_handles(variants, marker="o"))
    fig.suptitle(f"{sweep.name}: LR sensitivity vs depth (Wortsman et al. 2023)")
    return _save(fig, path)
