"""The sweep figures (seaborn + matplotlib, Agg canvas, PNG).

Each figure function (in :mod:`analysis.figures_loss`, :mod:`analysis.figures_stability` and
:mod:`analysis.figures_layers`, drawn with :mod:`analysis.canvas`) reads a :class:`analysis.load.Sweep`, writes one PNG atomically to ``path`` and
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

from typing import Dict, List, Tuple

from analysis.figures_layers import coord_check, layer_profiles, monitor_profiles
from analysis.figures_loss import depth_vs_val_loss, loss_curves
from analysis.figures_stability import failure_rate, lr_depth_heatmap, lr_sensitivity_vs_depth, spike_rate, stability_frontier


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

#: what each figure needs beyond finished runs with losses (it is skipped, with the reason, without it):
#: "depths" 2+ depths; "lrs" 2+ learning rates; "spikes" spike data (a spike column or spike_count);
#: "probes" rows of the training probes in layers.parquet; "monitors" any other layers.parquet quantity
NEEDS: Dict[str, Tuple[str, ...]] = {
    "depth_vs_val_loss": (),
    "failure_rate": ("depths",),
    "spike_rate": ("spikes",),
    "stability_frontier": ("depths", "lrs"),
    "lr_depth_heatmap": ("depths", "lrs"),
    "lr_sensitivity_vs_depth": ("depths", "lrs"),
    "loss_curves": (),
    "layer_profiles": ("probes",),
    "monitor_profiles": ("monitors",),
    "coord_check": ("depths", "probes"),
}


def drawable(has) -> List[str]:
    """The figures of :data:`FIGURES` (in report order) a sweep with the data ``has`` (keys of
    :data:`NEEDS`' values) can draw."""
    return [name for name in FIGURES if set(NEEDS[name]) <= set(has)]
