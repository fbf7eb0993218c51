"""The per-layer figures, from ``layers.parquet``: a block's value of a quantity (its sublayers combined as
the quantity catalogue says), the training probes' and the monitors' profiles over depth, and the
depth coord check."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd

from analysis import style
from resnorm.runs import quantities as catalogue
from analysis.canvas import (LAYER_GROUPS, MIN_WIDTH, MONITOR_ORDER, PANEL_H, PANEL_W, PROFILE_QUANTITIES,
                             _depth_axis, _figure, _legend, _plottable_runs, _save, _skip, _variant_handles,
                             setting_order)

log = logging.getLogger("analysis.plots")  # one logger for every figure (the report collects its skips)


def block_values(layers: pd.DataFrame, quantity: str) -> pd.DataFrame:
    """``run_dir, step, layer, value``: ``quantity`` per block, its sublayers combined.

    Reads a layers table (``run_dir``, ``step``, ``layer``, ``sublayer``, ``quantity``, ``value``).
    The combination is the quantity's in :data:`resnorm.runs.quantities.QUANTITIES`: ``"norm"``,
    ``sqrt(sum of squares)`` (for gradient norms, the norm of the whole block's gradient,
    ``sqrt(attn^2 + mlp^2)``); ``"rms"``, ``sqrt(mean of squares)`` (for activation RMS, the RMS over
    the block's attention and MLP output streams, which have the same size; for update ratios, their
    quadratic mean); ``"max"``; ``"mean"`` (signed or bounded values, and any quantity not declared).
    A sublayer that has no finite value of the quantity at any step of a run does not have it
    (``max_attn_logit`` of an MLP) and is left out (the block's value is the other sublayer's);
    otherwise a non-finite sublayer value makes its block's value inf.
    """
    rows = layers[layers["quantity"] == quantity]
    if rows.empty:
        return pd.DataFrame(columns=["run_dir", "step", "layer", "value"])
    value = rows["value"].astype(float)
    present = np.isfinite(value).groupby([rows["run_dir"], rows["sublayer"]]).transform("any")
    rows, value = rows[present], value[present]
    if rows.empty:
        return pd.DataFrame(columns=["run_dir", "step", "layer", "value"])
    how = catalogue.block_combine(quantity)
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
    # vectorised over runs (a loop over runs cost ~4 ms a run and quantity: minutes at 10,000 runs)
    step = blocks["step"].astype(int)
    first = step.groupby(blocks["run_dir"], sort=False).transform("min")
    finite = pd.Series(np.isfinite(blocks["value"].astype(float)).to_numpy(), index=blocks.index)
    all_finite = finite.groupby([blocks["run_dir"], step], sort=False).transform("all")
    last = step.where(all_finite).groupby(blocks["run_dir"], sort=False).transform("max")
    is_first, is_last = step == first, (step == last) & (last != first)
    part = blocks[is_first | is_last].copy()
    part["when"] = np.where(is_last[is_first | is_last], "last logged step",
                            np.where(first[is_first | is_last] == 0, "step 0", "first logged step"))
    return part.reset_index(drop=True)


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
    return f"{catalogue.axis_label(quantity)}\n{catalogue.block_text(quantity)}"


def _profile_panel(ax, panel: pd.DataFrame, variants: List[str], whens: List[str], log_scale: bool) -> None:
    if panel.empty:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    else:
        # the mean over seeds per (variant, when, layer), one line each, drawn directly (seaborn's
        # lineplot cost 0.3 s a panel, most of a many-panel sweep's analysis)
        means = panel.assign(layer=panel["layer"].astype(int)).groupby(["variant", "when", "layer"])["value"].mean()
        drawn = set(means.index.droplevel("layer"))
        for variant in variants:
            for when in whens:
                if (variant, when) not in drawn:
                    continue
                line = means.loc[(variant, when)]
                ax.plot(line.index, line.to_numpy(), color=style.colour(variant), lw=1.5,
                        dashes=() if when == "last logged step" else (4, 2),
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
    and last logged step of that quantity. Each row's axis says how its block value is made of the
    block's sublayers (:data:`resnorm.runs.quantities.COMBINE`: e.g. the mean of attention and MLP for
    a cosine, the attention value alone for an attention-only quantity). Quantities with no finite
    value are left out; skipped when there is none (runs written before the monitor).
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
