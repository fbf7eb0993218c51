"""The figures' shared canvas: sizes, the standalone Agg figure and its atomic save, the skip warning, and
the axes, legends, panels and markers every sweep figure draws with."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pandas as pd

from analysis import metrics, style
from resnorm.runs import quantities as catalogue
from resnorm.runs.folder import atomic_write

log = logging.getLogger("analysis.plots")  # one logger for every figure (the report collects its skips)


DPI = 120
PANEL_W, PANEL_H = 3.4, 2.6
MIN_WIDTH = 7.0  # inches: room for the title and the legend under a single panel
#: y position (axes fraction) of the diverged / failed markers in depth_vs_val_loss
DIVERGED_Y, FAILED_Y = 0.95, 0.87
#: y position (axes fraction) of the "no stable learning rate" markers in stability_frontier
NONE_STABLE_Y = 0.04
#: horizontal offset (points) between variants whose markers would coincide
NUDGE_PTS = 5
#: per-layer quantities of layer_profiles (the training probes), in row order; every other quantity
#: of layers.parquet is drawn by monitor_profiles. Units, labels, row order and how a block's sublayers
#: combine are declared once, in resnorm.runs.quantities.
PROFILE_QUANTITIES = catalogue.training_quantities()
#: row order of the monitor quantities monitor_profiles knows; others follow, sorted by name
MONITOR_ORDER = tuple(q for q in catalogue.QUANTITIES if q not in PROFILE_QUANTITIES)
#: layer groups of coord_check: the thirds of the stack (see depth_thirds)
LAYER_GROUPS = ("first third", "middle third", "last third")


#: above this many panels a figure gets fixed margins instead of matplotlib's constrained layout,
#: whose cost grows with every axis and tick (most of the analysis time of a 100-cell sweep)
MANY_PANELS = 40


def _figure(nrows: int, ncols: int, width: float, height: float, **subplot_kw):
    """A standalone figure on an Agg canvas with seaborn's whitegrid style, and its axes grid."""
    import seaborn as sns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    many = nrows * ncols > MANY_PANELS
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        fig = Figure(figsize=(width, height), layout=None if many else "constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    if many:  # margins in inches, gaps as a fraction of a panel (room for tick labels and titles)
        fig.subplots_adjust(left=min(0.4, 1.0 / width), right=1 - min(0.3, 0.3 / width),
                            bottom=min(0.4, 0.7 / height), top=1 - min(0.3, 0.8 / height), wspace=0.35, hspace=0.55)
    return fig, axes


def _save(fig, path: Path) -> Path:
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=DPI, bbox_inches="tight"))


def _skip(figure: str, reason: str) -> None:
    log.warning("%s: skipped, %s", figure, reason)
    return None


def setting_order(runs: pd.DataFrame) -> List[str]:
    """Distinct settings, ordered by learning rate then label (numeric order for LR sweeps)."""
    ordered = runs.sort_values(["lr", "setting"], kind="stable", na_position="last")
    return list(dict.fromkeys(ordered["setting"].fillna("")))


def _plottable_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that have both a variant and a depth (the two axes every figure needs)."""
    runs = runs[runs["variant"].notna() & runs["depth"].notna()].copy()
    runs["setting"] = runs["setting"].fillna("")
    if "unigram_loss" not in runs.columns:  # a hand-made table
        runs["unigram_loss"] = math.nan
    return runs


def _depth_axis(ax, depths: List[int]) -> None:
    """Log-2 x axis for geometric depth grids (max/min >= 4), ticks at the sweep's depths."""
    from matplotlib.ticker import FixedLocator, NullLocator

    if depths and min(depths) > 0 and max(depths) / min(depths) >= 4:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_locator(FixedLocator(depths))
    ax.set_xticklabels([str(d) for d in depths])
    if len(depths) == 1:
        ax.set_xlim(depths[0] * 0.5, depths[0] * 1.5)


def _variant_handles(variants: List[str], **line_kw) -> list:
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=style.colour(v), label=style.label(v), **line_kw) for v in variants]


def _legend(fig, handles: list) -> None:
    """One legend for the whole figure, below the panels (never on top of the title), with as many
    columns as fit the figure's width."""
    longest = max(len(h.get_label()) for h in handles)
    entry_pts = 6.0 * longest + 40.0  # a rough width of one entry: text plus the handle
    fits = int(fig.get_figwidth() * 72 // entry_pts)
    ncols = max(1, min(len(handles), fits, 6))
    if fig.get_layout_engine() is None:  # fixed margins (many panels): under the figure, kept by the tight save
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncols=ncols, frameon=False)
    else:
        fig.legend(handles=handles, loc="outside lower center", ncols=ncols, frameon=False)


def _shade(colour: str, amount: float) -> tuple:
    """``colour`` blended towards white by ``amount`` (0: unchanged, 1: white)."""
    from matplotlib.colors import to_rgb

    return tuple(c + (1.0 - c) * amount for c in to_rgb(colour))


def _grid(n_panels: int, ncols: int, panel_w: float, panel_h: float, extra_w: float = 1.8,
          extra_h: float = 0.5, **subplot_kw):
    """A figure of ``n_panels`` panels in rows of ``ncols``, the unused axes hidden."""
    nrows = math.ceil(n_panels / ncols)
    fig, axes = _figure(nrows, ncols, max(panel_w * ncols + extra_w, MIN_WIDTH), panel_h * nrows + extra_h,
                        **subplot_kw)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _nudge(fig, transform, k: int, n: int):
    """``transform`` shifted right by NUDGE_PTS points per step of ``k`` from the middle of ``n``
    variants, so markers that would coincide stay visible."""
    from matplotlib.transforms import ScaledTranslation

    return transform + ScaledTranslation((k - (n - 1) / 2) * NUDGE_PTS / 72, 0, fig.dpi_scale_trans)


def _variant_lines(fig, ax, table: pd.DataFrame, x: str, y: str, variants: List[str],
                   low: Optional[str] = None, high: Optional[str] = None) -> None:
    """One line per variant (its colour, circle markers) through ``table``'s ``(x, y)`` points, with
    error bars from the ``low`` to the ``high`` column where those are finite; variants nudged apart
    (the axes' limits still fit the data, which a shifted transform alone would not update)."""
    for k, variant in enumerate(variants):
        rows = table[(table["variant"] == variant) & np.isfinite(table[y])].sort_values(x)
        if rows.empty:
            continue
        xs, ys = rows[x].astype(float).to_numpy(), rows[y].astype(float).to_numpy()
        yerr = None
        if low is not None:
            yerr = np.vstack([(rows[y] - rows[low]).fillna(0.0), (rows[high] - rows[y]).fillna(0.0)])
            ax.update_datalim(np.column_stack([np.r_[xs, xs], np.r_[ys - yerr[0], ys + yerr[1]]]))
        ax.update_datalim(np.column_stack([xs, ys]))
        ax.errorbar(xs, ys, yerr=yerr, color=style.colour(variant), marker="o", ms=5, lw=1.5, capsize=3,
                    transform=_nudge(fig, ax.transData, k, len(variants)))
    ax.autoscale_view()


def _panel_labels(runs: pd.DataFrame, keys: List[str]) -> pd.Series:
    """Per run, ``"key=value, ..."`` over ``keys`` (empty without keys)."""
    if not keys:
        return pd.Series("", index=runs.index)
    return runs[keys].apply(lambda row: ", ".join(f"{k}={v}" for k, v in row.items()), axis=1)


def _lr_depth_runs(sweep, figure: str) -> Optional[Tuple[pd.DataFrame, List[str]]]:
    """``(runs, keys)`` for a figure over the LR grid and depth: the runs with a variant and a depth
    that finished (completed or diverged), with a ``panel`` label over the swept keys other than the
    learning rate (:func:`analysis.metrics.lr_sweep_runs`); None (logged) when the sweep has fewer
    than two learning rates or two depths."""
    runs, keys = metrics.lr_sweep_runs(sweep)
    runs = _plottable_runs(runs)
    runs = runs[~runs["status"].isin(metrics.EXCLUDED_STATUSES) & runs["lr"].notna()]
    for axis, what in (("lr", "learning rates"), ("depth", "depths")):
        count = runs[axis].nunique()
        if count < 2:
            return _skip(figure, f"needs at least 2 {what} among the finished runs, the sweep has {count}")
    runs["panel"] = _panel_labels(runs, keys)
    return runs, keys


def _lr_axis(ax, rates: List[float]) -> None:
    """Log y axis with ticks at the sweep's learning rates."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator(rates))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_yticklabels([f"{r:g}" for r in rates])
    ax.set_ylim(min(rates) / 2, max(rates) * 2)


def _mark_failures(fig, ax, panel_marked, variants, colours) -> None:
    """An ``x`` at the top of the panel for each (variant, depth) with a diverged run, a hollow
    square below it for a failed one, with the count when more than one seed did."""
    from matplotlib.transforms import blended_transform_factory

    top = blended_transform_factory(ax.transData, ax.transAxes)
    for k, variant in enumerate(variants):
        shift = _nudge(fig, top, k, len(variants))
        for status, y, marker in (("diverged", DIVERGED_Y, "x"), ("failed", FAILED_Y, "s")):
            rows = panel_marked[(panel_marked["variant"] == variant) & (panel_marked["status"] == status)]
            for depth, count in rows.groupby("depth").size().items():
                ax.plot([depth], [y], transform=shift, ls="none", marker=marker, ms=8, mew=2,
                        color=colours[variant], mfc="none" if marker == "s" else colours[variant],
                        clip_on=False, zorder=5)
                if count > 1:
                    ax.annotate(f"{count}", (depth, y), xycoords=shift, xytext=(5, -3),
                                textcoords="offset points", fontsize=7, color=colours[variant])


def _unigram_values(values) -> List[float]:
    """The distinct finite values of ``values`` (unigram losses), sorted (rounded to 1e-6 nat)."""
    numbers = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").astype(float)
    return sorted({round(float(v), 6) for v in numbers if np.isfinite(v)})


def _unigram_lines(ax, values) -> bool:
    """A dashed grey horizontal line at each distinct finite unigram loss in ``values`` (the runs
    of one panel); True when one was drawn."""
    levels = _unigram_values(values)
    for level in levels:
        ax.axhline(level, color=style.REFERENCE, ls="--", lw=1.1, zorder=1)
    return bool(levels)


def _unigram_handle():
    from matplotlib.lines import Line2D

    return Line2D([], [], color=style.REFERENCE, ls="--", lw=1.1, label="unigram loss")


def _loss_limits(ax, ok, several_seeds: bool, unigram=(), column: str = "final_val_loss") -> None:
    """The shared y range: the finite final losses (+- one sd with several seeds) and the unigram
    losses, room on top for the failure markers."""
    finite = ok[column]
    levels = _unigram_values(unigram)
    if finite.empty and not levels:
        ax.set_ylim(0.0, 1.0)
        return
    low, high = min([*finite.tolist(), *levels]), max([*finite.tolist(), *levels])
    if several_seeds:
        sd = ok.groupby(["setting", "variant", "depth"])[column].std().fillna(0.0)
        high += float(sd.max())
        low -= float(sd.max())
    pad = 0.1 * (high - low) if high > low else 0.05 * abs(high) or 0.1
    ax.set_ylim(low - pad, high + 3 * pad)
