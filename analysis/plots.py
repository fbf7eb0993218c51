"""The sweep figures (seaborn + matplotlib, Agg canvas, PNG).

Each function reads a :class:`analysis.load.Sweep`, writes one PNG atomically to ``path`` and
returns ``path``; when the sweep lacks the data the figure needs it writes nothing, logs why (a
warning) and returns None. Variants keep their colours from :mod:`analysis.style` in every figure.

Figures are drawn on a standalone ``matplotlib.figure.Figure`` with an Agg canvas: nothing touches
pyplot's global state or the process's backend, so a notebook or a Hydra process that imports this
module keeps its own.

Runs that differ in swept keys other than variant, depth and seed (the runs table's ``setting``,
e.g. ``optim.lr=0.003``) are never averaged together: :func:`depth_vs_val_loss` and
:func:`grad_norm_profile` draw one panel per setting, :func:`loss_curves` one shade per setting.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from analysis import style
from analysis.files import atomic_write

log = logging.getLogger(__name__)

DPI = 120
PANEL_W, PANEL_H = 3.4, 2.6
MIN_WIDTH = 7.0  # inches: room for the title and the legend under a single panel
#: y position (axes fraction) of the diverged / failed markers in depth_vs_val_loss
DIVERGED_Y, FAILED_Y = 0.95, 0.87


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


def _settings(runs: pd.DataFrame) -> List[str]:
    """Distinct settings, ordered by learning rate then label (numeric order for LR sweeps)."""
    ordered = runs.sort_values(["lr", "setting"], kind="stable", na_position="last")
    return list(dict.fromkeys(ordered["setting"].fillna("")))


def _plottable_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that have both a variant and a depth (the two axes every figure needs)."""
    runs = runs[runs["variant"].notna() & runs["depth"].notna()].copy()
    runs["setting"] = runs["setting"].fillna("")
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


def depth_vs_val_loss(sweep, path) -> Optional[Path]:
    """Final validation loss against depth, one line per variant, one panel per setting.

    Reads ``sweep.runs`` (status, final_val_loss, variant, depth, seed, setting). A line is the mean
    over seeds of the completed runs' final validation loss, with error bars of one standard
    deviation where a depth has several seeds. Diverged runs have no valid final loss: each
    (variant, depth) with a diverged run gets an ``x`` at the top of the panel in the variant's
    colour (with the count when more than one seed diverged); failed runs a hollow square below it.
    Runs still ``running`` have no final loss yet and are not shown.
    """
    import seaborn as sns
    from matplotlib.lines import Line2D
    from matplotlib.transforms import ScaledTranslation, blended_transform_factory

    runs = _plottable_runs(sweep.runs)
    if runs.empty:
        return _skip("depth_vs_val_loss", "no run has both a variant and a depth")
    runs["depth"] = runs["depth"].astype(float)
    ok = runs[(runs["status"] == "completed") & np.isfinite(runs["final_val_loss"])]
    marked = runs[runs["status"].isin(["diverged", "failed"])]
    if ok.empty and marked.empty:
        return _skip("depth_vs_val_loss", "no completed run with a final validation loss and no "
                     "diverged or failed run")

    settings = _settings(runs)
    variants = style.order(runs["variant"])
    colours = style.palette(variants)
    depths = sorted(int(d) for d in runs["depth"].unique())
    ncols = min(len(settings), 3)
    nrows = math.ceil(len(settings) / ncols)
    fig, axes = _figure(nrows, ncols, max(PANEL_W * 1.3 * ncols + 1.8, MIN_WIDTH),
                        PANEL_H * 1.3 * nrows + 0.5, sharey=True)
    several_seeds = bool((ok.groupby(["setting", "variant", "depth"]).size() > 1).any())

    for ax in axes.flat[len(settings):]:
        ax.set_visible(False)
    for panel, (ax, setting) in enumerate(zip(axes.flat, settings)):
        panel_ok = ok[ok["setting"] == setting]
        if not panel_ok.empty:
            present = [v for v in variants if v in set(panel_ok["variant"])]
            sns.lineplot(data=panel_ok, x="depth", y="final_val_loss", hue="variant", hue_order=present,
                         palette={v: colours[v] for v in present}, estimator="mean", errorbar="sd",
                         err_style="bars", marker="o", markersize=6, err_kws={"capsize": 3},
                         legend=False, ax=ax)
        else:
            ax.text(0.5, 0.5, "no completed run", transform=ax.transAxes, ha="center", va="center",
                    color="grey")
        top = blended_transform_factory(ax.transData, ax.transAxes)
        panel_marked = marked[marked["setting"] == setting]
        for k, variant in enumerate(variants):
            # a few points of horizontal offset per variant so coinciding markers stay visible
            shift = top + ScaledTranslation((k - (len(variants) - 1) / 2) * 5 / 72, 0,
                                            fig.dpi_scale_trans)
            for status, y, marker in (("diverged", DIVERGED_Y, "x"), ("failed", FAILED_Y, "s")):
                rows = panel_marked[(panel_marked["variant"] == variant) & (panel_marked["status"] == status)]
                for depth, count in rows.groupby("depth").size().items():
                    ax.plot([depth], [y], transform=shift, ls="none", marker=marker, ms=8, mew=2,
                            color=colours[variant], mfc="none" if marker == "s" else colours[variant],
                            clip_on=False, zorder=5)
                    if count > 1:
                        ax.annotate(f"{count}", (depth, y), xycoords=shift, xytext=(5, -3),
                                    textcoords="offset points", fontsize=7, color=colours[variant])
        _depth_axis(ax, depths)
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel("" if panel % ncols else
                      "final validation loss" + ("\n(mean ± sd over seeds)" if several_seeds else ""))
        if setting:
            ax.set_title(setting)

    finite = ok["final_val_loss"]
    if finite.empty:
        axes.flat[0].set_ylim(0.0, 1.0)
    else:
        low, high = float(finite.min()), float(finite.max())
        if several_seeds:
            sd = ok.groupby(["setting", "variant", "depth"])["final_val_loss"].std().fillna(0.0)
            high += float(sd.max())
            low -= float(sd.max())
        pad = 0.1 * (high - low) if high > low else 0.05 * abs(high) or 0.1
        axes.flat[0].set_ylim(low - pad, high + 3 * pad)  # room at the top for the markers

    handles = _variant_handles(variants, marker="o")
    if (marked["status"] == "diverged").any():
        handles.append(Line2D([], [], ls="none", marker="x", ms=8, mew=2, color=style.NEUTRAL,
                              label="diverged"))
    if (marked["status"] == "failed").any():
        handles.append(Line2D([], [], ls="none", marker="s", ms=8, mew=2, mfc="none",
                              color=style.NEUTRAL, label="failed"))
    _legend(fig, handles)
    fig.suptitle(f"{sweep.name}: final validation loss vs depth")
    return _save(fig, path)


def loss_curves(sweep, path) -> Optional[Path]:
    """Train loss (lines) and validation loss (dots) against step, depth rows x variant columns.

    Reads ``sweep.steps`` (step, train_loss, val_loss) and ``sweep.runs`` (status, diverged_step).
    The y axis is shared, from the lowest finite loss to 1.1x the highest initial loss (a diverging
    loss leaves the top); a dashed vertical line marks the step a run diverged at. Seeds of one cell
    are overlaid in the variant's colour; several settings are drawn in shades of it, light to dark.
    """
    from matplotlib.lines import Line2D

    steps = sweep.steps
    if steps.empty or "train_loss" not in steps.columns:
        return _skip("loss_curves", "no run wrote metrics.parquet with a train_loss column")
    runs = _plottable_runs(sweep.runs)
    runs = runs[runs["run_dir"].isin(set(steps["run_dir"])) | runs["status"].isin(["failed", "diverged"])]
    if runs.empty:
        return _skip("loss_curves", "no run with step metrics has both a variant and a depth")

    variants = style.order(runs["variant"])
    depths = sorted(int(d) for d in runs["depth"].unique())
    settings = _settings(runs)
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
    for r, depth in enumerate(depths):
        for c, variant in enumerate(variants):
            ax = axes[r, c]
            cell = runs[(runs["depth"] == depth) & (runs["variant"] == variant)]
            drawn = 0
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
                ax.set_ylabel(f"depth {depth}\nloss")
            if r == len(depths) - 1:
                ax.set_xlabel("step")
    axes[0, 0].set_ylim(low - 0.05 * (high - low), high)

    handles = [Line2D([], [], color="grey", lw=1.1, label="train loss"),
               Line2D([], [], color="grey", ls="none", marker="o", ms=3.5, label="val loss")]
    if (runs["status"] == "diverged").any():
        handles.append(Line2D([], [], color=style.NEUTRAL, ls="--", lw=1, label="diverged"))
    if len(settings) > 1:
        handles += [Line2D([], [], color=_shade("#444444", shade_of[s]), lw=2, label=s) for s in settings]
    _legend(fig, handles)
    fig.suptitle(f"{sweep.name}: loss curves (rows: depth, columns: variant)")
    return _save(fig, path)


def layer_profile(layers: pd.DataFrame, quantity: str = "grad_norm") -> pd.DataFrame:
    """Per run, the per-block profile of ``quantity`` at its first and its last usable step.

    Reads a layers table (``run_dir``, ``step``, ``layer``, ``sublayer``, ``quantity``, ``value``).
    Sublayers are combined per block as ``sqrt(sum of squares)`` (for gradient norms, the norm of the
    whole block's gradient: ``sqrt(attn^2 + mlp^2)``). The first step is the run's first logged step;
    the last is its last logged step at which every block's value is finite (a diverged run's final
    step often holds inf/NaN). Returns ``run_dir, step, layer, value, when`` with ``when`` in
    ``"step 0"`` (or ``"first logged step"`` if that is not 0) and ``"last logged step"``.
    """
    rows = layers[layers["quantity"] == quantity]
    if rows.empty:
        return pd.DataFrame(columns=["run_dir", "step", "layer", "value", "when"])
    value = rows["value"].astype(float)
    squared = value.where(np.isfinite(value), np.inf) ** 2  # one bad sublayer spoils its block
    blocks = (rows.assign(squared=squared).groupby(["run_dir", "step", "layer"], sort=True)["squared"]
              .sum().pow(0.5).rename("value").reset_index())
    parts = []
    for run_dir, run in blocks.groupby("run_dir", sort=False):
        first = int(run["step"].min())
        finite_steps = np.isfinite(run["value"]).groupby(run["step"]).all()
        finite_steps = finite_steps[finite_steps].index
        chosen = {first: "step 0" if first == 0 else "first logged step"}
        if len(finite_steps) and int(finite_steps.max()) != first:
            chosen[int(finite_steps.max())] = "last logged step"
        part = run[run["step"].isin(list(chosen))].copy()
        part["when"] = part["step"].map(chosen)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def grad_norm_profile(sweep, path, quantity: str = "grad_norm") -> Optional[Path]:
    """Per-layer gradient norm (log y) against block index: one panel per depth (columns) and
    setting (rows), hue = variant, dashed = the run's first logged step (step 0), solid = its last.

    Reads ``sweep.layers`` and ``sweep.runs``. Attention and MLP sublayers are combined per block as
    ``sqrt(attn^2 + mlp^2)`` (see :func:`layer_profile`); seeds are averaged. Non-positive or
    non-finite values cannot be drawn on the log scale and are left out.
    """
    import seaborn as sns
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    layers = sweep.layers
    if layers.empty or "quantity" not in layers.columns:
        return _skip("grad_norm_profile", "no run wrote layers.parquet")
    profile = layer_profile(layers, quantity)
    if profile.empty:
        return _skip("grad_norm_profile", f"layers.parquet has no {quantity!r} rows")
    runs = _plottable_runs(sweep.runs)
    profile = profile.merge(runs[["run_dir", "variant", "depth", "setting"]], on="run_dir", how="inner")
    profile = profile[np.isfinite(profile["value"]) & (profile["value"] > 0)]
    if profile.empty:
        return _skip("grad_norm_profile", f"no positive finite {quantity!r} value in a run with a "
                     "variant and a depth")

    variants = style.order(profile["variant"])
    colours = style.palette(variants)
    depths = sorted(int(d) for d in profile["depth"].unique())
    settings = _settings(runs[runs["run_dir"].isin(set(profile["run_dir"]))])
    whens = [w for w in ("step 0", "first logged step", "last logged step") if w in set(profile["when"])]
    dashes = {w: ("" if w == "last logged step" else (4, 2)) for w in whens}

    # one panel per (setting, depth): depths across, settings down; a single depth wraps the settings
    panels = [(setting, depth) for setting in settings for depth in depths]
    ncols = len(depths) if len(depths) > 1 else min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(nrows, ncols, max(PANEL_W * 1.2 * ncols + 1.0, MIN_WIDTH),
                        PANEL_H * 1.2 * nrows + 0.8, sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for i, (ax, (setting, depth)) in enumerate(zip(axes.flat, panels)):
        panel = profile[(profile["setting"] == setting) & (profile["depth"] == depth)]
        if panel.empty:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        else:
            present = [v for v in variants if v in set(panel["variant"])]
            sns.lineplot(data=panel.assign(layer=panel["layer"].astype(int)), x="layer", y="value",
                         hue="variant", hue_order=present, palette={v: colours[v] for v in present},
                         style="when", style_order=[w for w in whens if w in set(panel["when"])],
                         dashes=dashes, estimator="mean", errorbar=None, legend=False, ax=ax)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"depth {depth}" + (f", {setting}" if setting else ""))
        ax.set_xlabel("layer (block index)")
        ax.set_ylabel(f"{quantity} per block\nsqrt(attn² + mlp²)" if i % ncols == 0 else "")

    handles = _variant_handles(variants, lw=2)
    handles += [Line2D([], [], color="grey", lw=1.5, ls="-" if w == "last logged step" else "--", label=w)
                for w in whens]
    _legend(fig, handles)
    fig.suptitle(f"{sweep.name}: per-layer {quantity} (mean over seeds)")
    return _save(fig, path)


#: figure name -> function, in report order
FIGURES: Dict[str, object] = {
    "depth_vs_val_loss": depth_vs_val_loss,
    "loss_curves": loss_curves,
    "grad_norm_profile": grad_norm_profile,
}
