"""The sweep figures (seaborn + matplotlib, Agg canvas, PNG).

Each function reads a :class:`analysis.load.Sweep`, writes one PNG atomically to ``path`` and
returns ``path``; when the sweep lacks the data the figure needs (fewer than two depths or learning
rates for a figure against them, no probe rows for a per-layer one) it writes nothing, logs why (a
warning) and returns None. Variants keep their colours and order from :mod:`analysis.style` in every
figure. :data:`FIGURES` lists them in report order; every number a figure shows beyond a plain
mean comes from :mod:`analysis.metrics` (the same definitions as the report's tables).

Figures are drawn on a standalone ``matplotlib.figure.Figure`` with an Agg canvas: nothing touches
pyplot's global state or the process's backend, so a notebook or a Hydra process that imports this
module keeps its own.

Runs that differ in swept keys other than variant, depth and seed (the runs table's ``setting``,
e.g. ``optim.lr=0.003``) are never averaged together: the figures against depth draw one panel per
setting, :func:`loss_curves` one shade per setting. The figures over the LR grid
(:func:`stability_frontier`, :func:`lr_depth_heatmap`, :func:`lr_sensitivity_vs_depth`) draw one
panel per value of the swept keys other than the learning rate.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from analysis import metrics, style
from resnorm.runs.folder import atomic_write

log = logging.getLogger(__name__)

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
#: of layers.parquet is drawn by monitor_profiles
PROFILE_QUANTITIES = ("grad_norm", "act_rms", "update_ratio", "branch_ratio", "max_attn_logit")
#: row order of the monitor quantities monitor_profiles knows; others follow, sorted by name
MONITOR_ORDER = ("param_norm", "update_norm", "update_grad_cos", "adam_m_norm", "adam_v_norm", "act_absmax",
                 "act_kurtosis", "stream_grad_rms", "attn_entropy_mean", "attn_entropy_min_head",
                 "attn_sink_mass", "rezero_alpha", "admin_omega_mean", "dyt_alpha")
#: how a quantity's sublayer values (attn, mlp) make one value per block (block_values): "norm"
#: sqrt(sum of squares) for norms over parameters, "rms" sqrt(mean of squares), "max"; any quantity
#: not listed: "mean" (right for signed and bounded ones: cosines, entropies, gates)
BLOCK_COMBINE = {"grad_norm": "norm", "param_norm": "norm", "update_norm": "norm", "adam_m_norm": "norm",
                 "adam_v_norm": "norm", "act_rms": "rms", "update_ratio": "rms", "branch_ratio": "rms",
                 "stream_grad_rms": "rms", "max_attn_logit": "max", "act_absmax": "max"}
_COMBINE_TEXT = {"norm": "sqrt(attn² + mlp²)", "rms": "RMS over attn, mlp", "max": "max over sublayers",
                 "mean": "mean over sublayers"}
PROFILE_LABELS = {"grad_norm": "gradient norm", "act_rms": "activation RMS",
                  "update_ratio": "update ratio ||ΔW||/||W||", "branch_ratio": "branch ratio",
                  "max_attn_logit": "max attention logit"}
#: layer groups of coord_check: the thirds of the stack (see depth_thirds)
LAYER_GROUPS = ("first third", "middle third", "last third")


def _figure(nrows: int, ncols: int, width: float, height: float, **subplot_kw):
    """A standalone figure on an Agg canvas with seaborn's whitegrid style, and its axes grid."""
    import seaborn as sns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
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
    fig.legend(handles=handles, loc="outside lower center", ncols=max(1, min(len(handles), fits, 6)),
               frameon=False)


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


def block_values(layers: pd.DataFrame, quantity: str) -> pd.DataFrame:
    """``run_dir, step, layer, value``: ``quantity`` per block, its sublayers combined.

    Reads a layers table (``run_dir``, ``step``, ``layer``, ``sublayer``, ``quantity``, ``value``).
    The combination is :data:`BLOCK_COMBINE`'s: ``"norm"``, ``sqrt(sum of squares)`` (for gradient
    norms, the norm of the whole block's gradient, ``sqrt(attn^2 + mlp^2)``); ``"rms"``,
    ``sqrt(mean of squares)`` (for activation RMS, the RMS over the block's attention and MLP output
    streams, which have the same size; for update ratios, their quadratic mean); ``"max"``; ``"mean"``
    (any quantity not listed). A sublayer that has no finite value of the quantity at any step of a
    run does not have it (``max_attn_logit`` of an MLP) and is left out; otherwise a non-finite
    sublayer value makes its block's value inf.
    """
    rows = layers[layers["quantity"] == quantity]
    if rows.empty:
        return pd.DataFrame(columns=["run_dir", "step", "layer", "value"])
    value = rows["value"].astype(float)
    present = np.isfinite(value).groupby([rows["run_dir"], rows["sublayer"]]).transform("any")
    rows, value = rows[present], value[present]
    if rows.empty:
        return pd.DataFrame(columns=["run_dir", "step", "layer", "value"])
    how = BLOCK_COMBINE.get(quantity, "mean")
    bad = ~np.isfinite(value)
    keys = ["run_dir", "step", "layer"]
    spoiled = bad.groupby([rows[k] for k in keys]).any()
    if how in ("norm", "rms"):
        grouped = (value ** 2).groupby([rows[k] for k in keys], sort=True)
        combined = (grouped.sum() if how == "norm" else grouped.mean()).pow(0.5)
    else:
        grouped = value.groupby([rows[k] for k in keys], sort=True)
        combined = grouped.max() if how == "max" else grouped.mean()
    combined[spoiled.reindex(combined.index).to_numpy()] = np.inf  # one bad sublayer spoils its block
    return combined.rename("value").reset_index()


def block_profile(layers: pd.DataFrame, quantity: str = "grad_norm") -> pd.DataFrame:
    """Per run, the per-block profile of ``quantity`` at its first and its last usable step.

    Blocks as in :func:`block_values`. The first step is the run's first logged step of the
    quantity; the last is its last logged step at which every block's value is finite (a diverged
    run's final step often holds inf/NaN). Returns ``run_dir, step, layer, value, when`` with
    ``when`` in ``"step 0"`` (or ``"first logged step"`` if that is not 0) and ``"last logged step"``.
    """
    blocks = block_values(layers, quantity)
    if blocks.empty:
        return pd.DataFrame(columns=["run_dir", "step", "layer", "value", "when"])
    parts = []
    for run_dir, run in blocks.groupby("run_dir", sort=False):
        first = int(run["step"].min())
        finite_steps = np.isfinite(run["value"].astype(float)).groupby(run["step"]).all()
        finite_steps = finite_steps[finite_steps].index
        chosen = {first: "step 0" if first == 0 else "first logged step"}
        if len(finite_steps) and int(finite_steps.max()) != first:
            chosen[int(finite_steps.max())] = "last logged step"
        part = run[run["step"].isin(list(chosen))].copy()
        part["when"] = part["step"].map(chosen)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _profile_rows(sweep, quantities: List[str]) -> pd.DataFrame:
    """:func:`block_profile` of each of ``quantities`` for the runs with a variant and a depth, their
    finite values only, with ``quantity``, ``variant``, ``depth`` and ``setting`` columns."""
    runs = _plottable_runs(sweep.runs)[["run_dir", "variant", "depth", "setting"]]
    parts = []
    for quantity in quantities:
        profile = block_profile(sweep.layers, quantity).merge(runs, on="run_dir", how="inner")
        value = profile["value"].astype(float)
        parts.append(profile[np.isfinite(value)].assign(quantity=quantity, value=value))
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _profile_label(quantity: str) -> str:
    name = PROFILE_LABELS.get(quantity, quantity.replace("_", " "))
    return f"{name}\n{_COMBINE_TEXT[BLOCK_COMBINE.get(quantity, 'mean')]}"


def _profile_panel(ax, panel: pd.DataFrame, variants: List[str], whens: List[str], log_scale: bool) -> None:
    import seaborn as sns

    if panel.empty:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    else:
        present = [v for v in variants if v in set(panel["variant"])]
        dashes = {w: ("" if w == "last logged step" else (4, 2)) for w in whens}
        sns.lineplot(data=panel.assign(layer=panel["layer"].astype(int)), x="layer", y="value",
                     hue="variant", hue_order=present, palette={v: style.colour(v) for v in present},
                     style="when", style_order=[w for w in whens if w in set(panel["when"])],
                     dashes=dashes, estimator="mean", errorbar=None, legend=False, ax=ax,
                     marker="o", ms=3, mew=0)  # markers: a depth-1 profile is a single point
    if log_scale:
        ax.set_yscale("log")


def _profiles_figure(sweep, path, figure: str, quantities: List[str], title: str) -> Optional[Path]:
    """Per-block profiles of ``quantities`` (those with a finite value) against block index: one row
    per quantity (and setting), one column per depth; hue = variant, dashed = the run's first logged
    step of the quantity, solid = its last finite one. A row is on a log scale when all its values
    are positive, else linear. Seeds are averaged."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    profile = _profile_rows(sweep, quantities)
    if profile.empty:
        return _skip(figure, f"no finite {' / '.join(quantities)} value in a run with a variant and a depth")
    quantities = [q for q in quantities if q in set(profile["quantity"])]
    variants = style.order(profile["variant"])
    depths = sorted(int(d) for d in profile["depth"].unique())
    runs = _plottable_runs(sweep.runs)
    settings = setting_order(runs[runs["run_dir"].isin(set(profile["run_dir"]))])
    whens = [w for w in ("step 0", "first logged step", "last logged step") if w in set(profile["when"])]
    positive = profile.groupby("quantity")["value"].apply(lambda v: bool((v > 0).all()))

    rows = [(quantity, setting) for quantity in quantities for setting in settings]
    fig, axes = _figure(len(rows), len(depths), max(PANEL_W * 1.2 * len(depths) + 1.0, MIN_WIDTH),
                        PANEL_H * 1.2 * len(rows) + 0.8, sharey="row")
    for r, (quantity, setting) in enumerate(rows):
        for c, depth in enumerate(depths):
            ax = axes[r, c]
            panel = profile[(profile["quantity"] == quantity) & (profile["setting"] == setting)
                            & (profile["depth"] == depth)]
            _profile_panel(ax, panel, variants, whens, bool(positive[quantity]))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"depth {depth}" + (f", {setting}" if setting else ""))
            ax.set_xlabel("layer (block index)" if r == len(rows) - 1 else "")
            ax.set_ylabel(_profile_label(quantity) if c == 0 else "")

    handles = _variant_handles(variants, lw=2)
    handles += [Line2D([], [], color="grey", lw=1.5, ls="-" if w == "last logged step" else "--", label=w)
                for w in whens]
    _legend(fig, handles)
    fig.suptitle(f"{sweep.name}: {title} (mean over seeds)")
    return _save(fig, path)


def _layer_quantities(sweep) -> Optional[List[str]]:
    layers = sweep.layers
    if layers.empty or "quantity" not in layers.columns:
        return None
    return [str(q) for q in layers["quantity"].dropna().unique()]


def layer_profiles(sweep, path) -> Optional[Path]:
    """Per-layer profiles of the training probes' quantities (:data:`PROFILE_QUANTITIES`: gradient
    norm, activation RMS, update ratio, branch ratio, max attention logit, those the sweep recorded)
    against block index, at each run's first and last probe step (:func:`_profiles_figure`).

    Reads ``sweep.layers`` (``grad_norm`` every logged step with ``train.probes``, the others every
    ``train.probe_every`` steps) and ``sweep.runs``. Sublayers are combined per block as in
    :func:`block_values`. Every other quantity is drawn by :func:`monitor_profiles`.
    """
    present = _layer_quantities(sweep)
    if present is None:
        return _skip("layer_profiles", "no run wrote layers.parquet")
    quantities = [q for q in PROFILE_QUANTITIES if q in present]
    if not quantities:
        return _skip("layer_profiles", f"layers.parquet has none of {', '.join(PROFILE_QUANTITIES)}")
    return _profiles_figure(sweep, path, "layer_profiles", quantities, "per-layer profiles")


def monitor_profiles(sweep, path) -> Optional[Path]:
    """Per-layer profiles of every quantity of ``layers.parquet`` not drawn by
    :func:`layer_profiles` (the training monitor's: parameter, Adam-moment and update norms, the
    update/gradient cosine, activation max and kurtosis, attention entropy and sink mass, residual
    stream gradient RMS, the variants' gates such as ``rezero_alpha``; the set is open, any quantity
    present is drawn), one row each (:data:`MONITOR_ORDER` first, then by name), at each run's first
    and last logged step of that quantity. Quantities with no finite value are left out; skipped
    when there is none (runs written before the monitor).
    """
    present = _layer_quantities(sweep)
    if present is None:
        return _skip("monitor_profiles", "no run wrote layers.parquet")
    others = [q for q in present if q not in PROFILE_QUANTITIES]
    quantities = [q for q in MONITOR_ORDER if q in others] + sorted(q for q in others if q not in MONITOR_ORDER)
    if not quantities:
        return _skip("monitor_profiles", "layers.parquet has no quantity beyond the probes' "
                     f"({', '.join(PROFILE_QUANTITIES)})")
    return _profiles_figure(sweep, path, "monitor_profiles", quantities, "per-layer monitor quantities")


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


def depth_thirds(blocks: pd.DataFrame) -> pd.DataFrame:
    """``blocks`` (with ``layer`` and ``depth`` columns) with a ``group`` column: a row per third of
    the stack (:data:`LAYER_GROUPS`) that its block overlaps. Block ``l`` of ``L`` spans
    ``[l / L, (l + 1) / L]`` of the stack; it is in a third when that span overlaps the open third.
    For ``L`` a multiple of 3 the thirds partition the blocks; for other depths a block on a boundary
    is in both thirds, so every third has a block at every depth (at depth 1 the one block is in all)
    and the lines of a coord check join across depths."""
    start = blocks["layer"].astype(float) / blocks["depth"].astype(float)
    end = (blocks["layer"].astype(float) + 1) / blocks["depth"].astype(float)
    parts = [blocks[(start < (i + 1) / 3) & (end > i / 3)].assign(group=group)
             for i, group in enumerate(LAYER_GROUPS)]
    return pd.concat(parts, ignore_index=True)


def coord_check(sweep, path) -> Optional[Path]:
    """A depth coord check (after mup's width coord check): activation RMS against depth per layer
    group, at initialisation (left) and after t steps (right), t the last logged probe step.

    Reads the ``act_rms`` rows of ``sweep.layers`` (per block as in :func:`block_values`) and
    ``sweep.runs``. The groups are the thirds of the stack (:func:`depth_thirds`); a point is the
    mean over the group's blocks and the seeds. Hue = variant, line style = group; one
    row per setting. A run without a finite value at step t (it diverged before) is left out of the
    right panel, which says how many were. Flat lines mean activations that keep their size as depth
    grows. Needs act_rms rows (``train.probe_every``) and at least two depths.
    """
    from matplotlib.lines import Line2D

    layers = sweep.layers
    if layers.empty or "quantity" not in layers.columns:
        return _skip("coord_check", "no run wrote layers.parquet")
    runs = _plottable_runs(sweep.runs)
    blocks = block_values(layers, "act_rms").merge(runs[["run_dir", "variant", "depth", "setting"]],
                                                   on="run_dir", how="inner")
    if blocks.empty:
        return _skip("coord_check", "layers.parquet has no 'act_rms' rows (train.probe_every=0?)")
    if blocks["depth"].nunique() < 2:
        return _skip("coord_check", f"needs act_rms at 2 or more depths, the sweep has {blocks['depth'].nunique()}")
    blocks = depth_thirds(blocks)
    first = blocks.groupby("run_dir")["step"].transform("min")
    t = int(blocks["step"].max())
    times = [(f"step {int(first.min())}" if first.nunique() == 1 else "first logged step", blocks["step"] == first),
             (f"step {t}", blocks["step"] == t)]

    settings = setting_order(runs[runs["run_dir"].isin(set(blocks["run_dir"]))])
    variants = style.order(blocks["variant"])
    groups = [g for g in LAYER_GROUPS if g in set(blocks["group"])]
    dashes = dict(zip(LAYER_GROUPS, ("-", "--", ":")))
    markers = dict(zip(LAYER_GROUPS, ("o", "s", "^")))
    depths = sorted(int(d) for d in blocks["depth"].unique())
    fig, axes = _figure(len(settings), 2, max(PANEL_W * 1.3 * 2 + 1.8, MIN_WIDTH),
                        PANEL_H * 1.3 * len(settings) + 0.6, sharey=True)
    for r, setting in enumerate(settings):
        for c, (when, at) in enumerate(times):
            ax = axes[r, c]
            chosen = blocks[at & (blocks["setting"] == setting)]
            usable = chosen.groupby("run_dir")["value"].transform(lambda v: np.isfinite(v).all() and (v > 0).all())
            left_out = chosen.loc[~usable.astype(bool), "run_dir"].nunique()
            means = (chosen[usable.astype(bool)].groupby(["variant", "group", "depth"])["value"].mean()
                     .reset_index())
            for variant in variants:
                for group in groups:
                    line = means[(means["variant"] == variant) & (means["group"] == group)].sort_values("depth")
                    ax.plot(line["depth"].astype(float), line["value"], color=style.colour(variant),
                            ls=dashes[group], marker=markers[group], ms=4, lw=1.4)
            if left_out:
                ax.text(0.02, 0.02, f"{left_out} run(s) without finite values here left out",
                        transform=ax.transAxes, fontsize=7, color="grey")
            ax.set_yscale("log")
            _depth_axis(ax, depths)
            ax.set_title(when + (f", {setting}" if setting else ""))
            ax.set_xlabel("depth (blocks)")
            ax.set_ylabel("activation RMS\n(mean over the group's blocks)" if c == 0 else "")
    handles = _variant_handles(variants, lw=2)
    handles += [Line2D([], [], color="grey", ls=dashes[g], marker=markers[g], ms=4, label=g) for g in groups]
    _legend(fig, handles)
    fig.suptitle(f"{sweep.name}: depth coord check (activation RMS per layer group vs depth)")
    return _save(fig, path)


#: figure name -> function, in report order
FIGURES: Dict[str, object] = {
    "depth_vs_val_loss": depth_vs_val_loss,
    "failure_rate": failure_rate,
    "spike_rate": spike_rate,
    "stability_frontier": stability_frontier,
    "lr_depth_heatmap": lr_depth_heatmap,
    "lr_sensitivity_vs_depth": lr_sensitivity_vs_depth,
    "loss_curves": loss_curves,
    "layer_profiles": layer_profiles,
    "monitor_profiles": monitor_profiles,
    "coord_check": coord_check,
}
