"""Fixed colours and display labels for variants, shared by every figure.

A variant keeps its colour in every figure of every sweep: the colours below are fixed hex codes
(matplotlib's ``tab10`` followed by the light half of ``tab20``), not drawn from a palette at plot
time, so adding or removing a variant from a sweep never recolours the others.

Variants the table does not know get a colour that depends only on their name: a hue from a stable
hash (CRC-32) of the name, at fixed lightness and saturation. Such colours are deterministic across
calls, processes and machines, but two unknown names can get similar hues; add a variant that
matters to :data:`KNOWN_VARIANTS` to pin its colour.

No third-party import here: the module is pure data plus ``colorsys``.
"""

from __future__ import annotations

import colorsys
import math
import zlib
from typing import Dict, Iterable, List

#: variant name -> (display label, colour), in the order figures list variants.
_TABLE = (
    ("noresidual", "No residual", "#7f7f7f"),
    ("post", "Post-LN", "#d62728"),
    ("pre", "Pre-LN", "#1f77b4"),
    ("rmsnorm", "Pre-RMSNorm", "#2ca02c"),
    ("deepnorm", "DeepNorm", "#ff7f0e"),
    ("sandwich", "Sandwich-LN", "#9467bd"),
    ("peri", "Peri-LN", "#8c564b"),
    ("rezero", "ReZero", "#e377c2"),
    ("admin", "Admin", "#bcbd22"),
    ("dyt", "DyT", "#17becf"),
    ("scalenorm", "Pre-ScaleNorm", "#aec7e8"),
    ("lns", "LayerNorm Scaling", "#98df8a"),
    ("mixln", "Mix-LN", "#ffbb78"),
    ("b2t", "B2T", "#ff9896"),
    ("resi_dual", "ResiDual", "#c5b0d5"),
    ("depth_scaled", "Depth-scaled (1/\u221aL)", "#c49c94"),
    # the norm placements used at scale and the multi-stream schemes: matplotlib's tab20b and tab20c, darkest first
    ("reordered", "Reordered norm (OLMo 2)", "#393b79"),
    ("layerscale", "LayerScale", "#637939"),
    ("keel", "Keel", "#8c6d31"),
    ("normformer", "NormFormer", "#843c39"),
    ("hybridnorm", "HybridNorm", "#7b4173"),
    ("value_residual", "Value residual", "#3182bd"),
    ("orthogonal", "Orthogonal update", "#e6550d"),
    ("denseformer", "DenseFormer", "#31a354"),
    ("hyper", "Hyper-Connections", "#756bb1"),
    ("hyper_dynamic", "Dynamic HC", "#9e9ac8"),
    ("mhc", "mHC", "#636363"),
    ("attnres", "Attention Residuals", "#6b6ecf"),
    ("attnres_block", "Block AttnRes", "#b5cf6b"),
    # nGPT, CompleteP, Derf: tab20b/tab20c shades not taken above
    ("ngpt", "nGPT", "#e7ba52"),
    ("completep", "CompleteP", "#d6616b"),
    ("derf", "Pre-Derf", "#a55194"),
    ("subln", "Sub-LN (Magneto)", "#bd9e39"),
)

#: the known variants, in display order
KNOWN_VARIANTS: List[str] = [name for name, _, _ in _TABLE]
_LABELS: Dict[str, str] = {name: label for name, label, _ in _TABLE}
_COLOURS: Dict[str, str] = {name: colour for name, _, colour in _TABLE}

#: colour of markers that are not a variant (diverged, failed, divergence lines)
NEUTRAL = "#222222"
#: colour of the unigram-loss reference lines of the loss figures
REFERENCE = "#888888"
#: outcome (resnorm.runs.folder.OUTCOMES) -> (display label, colour) in the failure-rate figure
OUTCOME_STYLE = {
    "trained": ("trained", "#c7e3c0"),
    "stalled": ("stalled (at the unigram loss)", "#f4a340"),
    "diverged": ("diverged (loss blew up)", "#d6604d"),
    "nonfinite": ("non-finite (NaN/inf)", "#67001f"),
}


def _is_name(value) -> bool:
    """True for a usable variant name (skips None, NaN and pandas' missing values)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    try:
        return bool(str(value)) and str(value) not in ("nan", "<NA>", "None")
    except Exception:
        return False


def colour(variant: str) -> str:
    """The colour (``#rrggbb``) of one variant: fixed for known ones, name-hashed for others."""
    variant = str(variant)
    if variant in _COLOURS:
        return _COLOURS[variant]
    hue = (zlib.crc32(variant.encode("utf-8")) % 360) / 360.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.42, 0.62)
    return "#{:02x}{:02x}{:02x}".format(round(r * 255), round(g * 255), round(b * 255))


def label(variant: str) -> str:
    """Readable name of a variant for legends and titles (``post`` -> ``Post-LN``); unknown: itself."""
    return _LABELS.get(str(variant), str(variant))


def order(variants: Iterable) -> List[str]:
    """The distinct variant names in ``variants``, known ones in table order, then unknown ones sorted.

    Missing values (None, NaN) are dropped; names are compared as strings.
    """
    names = {str(v) for v in variants if _is_name(v)}
    known = [v for v in KNOWN_VARIANTS if v in names]
    return known + sorted(names - set(known))


def palette(variants: Iterable) -> Dict[str, str]:
    """``{variant: colour}`` for the distinct variants in ``variants``, in :func:`order`.

    Usable directly as seaborn's ``palette=`` with ``hue="variant"``.
    """
    return {v: colour(v) for v in order(variants)}
