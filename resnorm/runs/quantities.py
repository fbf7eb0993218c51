"""The catalogue of per-layer quantities: every quantity a probe writes to ``layers.parquet``, declared
once (name, unit, the sublayers it exists for, how a block's sublayers combine into one value per block,
cadence, the probe that writes it, a short axis label and a one-line description).

Torch-free, so the analysis reads it (the figures' block combination, labels and row order), the loggers
name their scalars by it (:func:`scalar_name`: W&B and TensorBoard alike) and ``docs/monitors.md`` is
generated from it (:func:`monitors_markdown`; ``python -m resnorm.runs.quantities docs/monitors.md``
rewrites that table; a test checks the committed table equals the generated one). The probes themselves
(:mod:`resnorm.monitors`) keep the tuple of names that orders the rows of their output tensor; a test
checks every name a probe writes is declared here, by that probe, and every declared quantity is
written by its probe.

How a block's two sublayers (attention, MLP) make one value per block (:data:`COMBINE`):
``norm`` sqrt(attn^2 + mlp^2) (norms over parameters: the whole block's norm), ``rms``
sqrt(mean of squares) (RMS of same-sized tensors, ratios), ``max``, ``mean`` (signed or bounded
values: cosines, entropies, gates). A quantity that exists for one sublayer only (``sublayers`` of
length one; NaN on the other row) is that sublayer's value.

The order of :data:`QUANTITIES` is the order figures draw their rows in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

#: how sublayer values combine per block -> the words a figure's axis uses
COMBINE = {"norm": "sqrt(attn² + mlp²)", "rms": "RMS over attn, mlp", "max": "max over sublayers",
           "mean": "mean over sublayers"}
#: the sublayers of a block, in the order of their rows
SUBLAYERS = ("attn", "mlp")
#: cadence key -> words
CADENCES = {"log_every": "every `train.log_every` steps",
            "probe_every": "every `train.probe_every` steps and the last"}
BOTH = SUBLAYERS


@dataclass(frozen=True)
class Quantity:
    """One per-(layer, sublayer) quantity of ``layers.parquet``."""

    name: str
    unit: str
    combine: str  # a key of COMBINE
    cadence: str  # a key of CADENCES
    probe: str  # the Probe class (in resnorm.monitors) that writes it
    label: str  # short axis label
    description: str  # one line
    sublayers: Tuple[str, ...] = BOTH  # the sublayers it exists for (NaN on the others)
    where: str = "every variant"  # which runs have it

    def __post_init__(self):
        if self.combine not in COMBINE:
            raise ValueError(f"quantity {self.name}: combine={self.combine!r}: choose one of {', '.join(COMBINE)}")
        if self.cadence not in CADENCES:
            raise ValueError(f"quantity {self.name}: cadence={self.cadence!r}: choose one of {', '.join(CADENCES)}")
        if not self.sublayers or not set(self.sublayers) <= set(SUBLAYERS):
            raise ValueError(f"quantity {self.name}: sublayers={self.sublayers!r}: a non-empty subset of {SUBLAYERS}")

    def block_text(self) -> str:
        """How the figures make one value per block of it, in words."""
        if len(self.sublayers) == 1:
            return f"{self.sublayers[0]} sublayer only"
        return COMBINE[self.combine]


_HC = "hyper, hyper_dynamic, mhc"
_AR = "attnres, attnres_block"
_Q = Quantity
_LIST = [
    # the training probes (resnorm.monitors.probes): the layer_profiles figure
    _Q("grad_norm", "gradient units", "norm", "log_every", "GradNormProbe", "gradient norm",
       "||g||_F of the sublayer's parameters' raw gradient, after backward, before clipping"),
    _Q("act_rms", "stream units", "rms", "probe_every", "ActivationProbe", "activation RMS",
       "RMS of the sublayer's output stream y, from a no-grad trace of the step's batch"),
    _Q("update_ratio", "1", "rms", "probe_every", "ActivationProbe", "update ratio ||ΔW||/||W||",
       "||W_after - W_before||_F / ||W_before||_F of the sublayer's 2-D weights over the step"),
    _Q("branch_ratio", "1", "rms", "probe_every", "ActivationProbe", "branch ratio",
       "||F(x)|| / ||x||: the branch output against the stream it is added to"),
    _Q("max_attn_logit", "logit", "max", "probe_every", "ActivationProbe", "max attention logit",
       "largest attention logit q.k / sqrt(d_head) over the batch", ("attn",)),
    # the monitors (resnorm.monitors.weights, forward, schemes): the monitor_profiles figure
    _Q("param_norm", "weight units", "norm", "log_every", "ParamNormProbe", "parameter norm",
       "||W||_F of the sublayer's parameters, before the optimizer step"),
    _Q("update_norm", "weight units", "norm", "probe_every", "UpdateProbe", "update norm",
       "||W_after - W_before||_F of every sublayer parameter over the step (LR, decay, clipping included)"),
    _Q("update_grad_cos", "1, in -1..1", "mean", "probe_every", "UpdateProbe", "cos(update, gradient)",
       "cosine of the step's update with the raw (pre-clip) gradient"),
    _Q("adam_m_norm", "gradient units", "norm", "log_every", "OptimizerStateProbe", "Adam m norm",
       "||m||_F of AdamW's first moment after the step", where="`optim=adamw`"),
    _Q("adam_v_norm", "gradient units squared", "norm", "log_every", "OptimizerStateProbe", "Adam v norm",
       "||v||_F of AdamW's second moment after the step", where="`optim=adamw`"),
    _Q("act_absmax", "stream units", "max", "probe_every", "ForwardStatsProbe", "activation max |y|",
       "max |y| of the sublayer's output stream"),
    _Q("act_kurtosis", "1", "mean", "probe_every", "ForwardStatsProbe", "activation kurtosis",
       "plain kurtosis E[(y - mu)^4] / sigma^4 of the output stream over all elements (Gaussian: 3)"),
    _Q("stream_grad_rms", "loss per stream unit", "rms", "probe_every", "StreamGradProbe", "stream gradient RMS",
       "RMS of dL/dx, x the stream entering the sublayer, read from the step's own backward"),
    _Q("attn_entropy_mean", "nats", "mean", "probe_every", "ForwardStatsProbe", "attention entropy",
       "entropy of each query's attention distribution, mean over heads, batch and queries", ("attn",)),
    _Q("attn_entropy_min_head", "nats", "mean", "probe_every", "ForwardStatsProbe", "lowest head entropy",
       "lowest over heads of the head's mean attention entropy", ("attn",)),
    _Q("attn_sink_mass", "probability", "mean", "probe_every", "ForwardStatsProbe", "attention sink mass",
       "attention probability on the first token, mean over heads, batch and queries", ("attn",)),
    _Q("rezero_alpha", "1", "mean", "log_every", "LearnedScalarProbe", "ReZero gate",
       "ReZero's learned branch scalar (shared by a block's two sublayers; both show it)", where="rezero"),
    _Q("admin_omega_mean", "1", "mean", "log_every", "LearnedScalarProbe", "Admin omega (mean)",
       "mean over channels of Admin's learned skip vector omega", where="admin"),
    _Q("dyt_alpha", "1", "mean", "log_every", "LearnedScalarProbe", "DyT alpha",
       "mean learned alpha of the sublayer's DyT norms", where="DyT norms (`dyt`, `model.norm_layer=dyt`)"),
    # the rest, by name
    _Q("admin_omega_max", "1", "mean", "log_every", "LearnedScalarProbe", "Admin omega (max)",
       "max over channels of Admin's learned skip vector omega", where="admin"),
    _Q("admin_omega_min", "1", "mean", "log_every", "LearnedScalarProbe", "Admin omega (min)",
       "min over channels of Admin's learned skip vector omega", where="admin"),
    _Q("attnres_entropy", "nats", "mean", "probe_every", "SchemeForwardProbe", "AttnRes weight entropy",
       "entropy of the sublayer's depth weights over its sources (ln(sources) when uniform)", where=_AR),
    _Q("attnres_query_norm", "1", "mean", "probe_every", "SchemeForwardProbe", "AttnRes query norm",
       "||w_l||_2 of the sublayer's pseudo-query (0 at init)", where=_AR),
    _Q("attnres_w_embed", "1, in 0..1", "mean", "probe_every", "SchemeForwardProbe", "AttnRes weight on embedding",
       "depth weight on the embedding, mean over the batch's tokens", where=_AR),
    _Q("attnres_w_last", "1, in 0..1", "mean", "probe_every", "SchemeForwardProbe", "AttnRes weight on newest",
       "depth weight on the newest source, mean over the batch's tokens", where=_AR),
    _Q("dwa_alpha_embed", "1", "mean", "log_every", "SchemeParamProbe", "DWA alpha on embedding",
       "DenseFormer's weight alpha_i0 on the embedding (0 at init)", ("mlp",), "denseformer"),
    _Q("dwa_alpha_rest", "1", "mean", "log_every", "SchemeParamProbe", "DWA |alpha| on earlier blocks",
       "DenseFormer's sum of |alpha_ij| on the earlier blocks' outputs (0 at init)", ("mlp",), "denseformer"),
    _Q("dwa_alpha_self", "1", "mean", "log_every", "SchemeParamProbe", "DWA alpha on own block",
       "DenseFormer's weight alpha_ii on the block's own output (1 at init)", ("mlp",), "denseformer"),
    _Q("hc_col_gain", "1", "mean", "probe_every", "SchemeForwardProbe", "HC backward gain",
       "largest absolute column sum of the sublayer's residual mixing matrix (mHC's Amax gain)", where=_HC),
    _Q("hc_composite_col_gain", "1", "mean", "probe_every", "SchemeForwardProbe", "HC composite backward gain",
       "largest absolute column sum of the product of mixing matrices from the sublayer to the top", where=_HC),
    _Q("hc_composite_row_gain", "1", "mean", "probe_every", "SchemeForwardProbe", "HC composite forward gain",
       "largest absolute row sum of the product of mixing matrices from the sublayer to the top", where=_HC),
    _Q("hc_row_gain", "1", "mean", "probe_every", "SchemeForwardProbe", "HC forward gain",
       "largest absolute row sum of the sublayer's residual mixing matrix (mHC's Amax gain)", where=_HC),
    _Q("hc_stream_entropy", "nats", "mean", "probe_every", "SchemeForwardProbe", "HC stream entropy",
       "entropy of the streams' energy fractions after the sublayer (ln n balanced, 0 one stream)", where=_HC),
] + [
    _Q(f"hc_stream_share_{_s}", "1", "mean", "probe_every", "SchemeForwardProbe", f"HC stream {_s} share",
       f"RMS of stream {_s} over the RMS of all streams after the sublayer (1 balanced, 0 dead)", where=_HC)
    for _s in range(8)  # resnorm.monitors.schemes.HC_SHARE_STREAMS
] + [
    _Q("value_lambda1", "1", "mean", "log_every", "SchemeParamProbe", "value residual lambda1",
       "learned weight on the first layer's values V_1 (0.5 at init; layers n >= 1)", ("attn",),
       "value_residual with `model.value_residual_learned=true`"),
    _Q("value_lambda2", "1", "mean", "log_every", "SchemeParamProbe", "value residual lambda2",
       "learned weight on the layer's own values V_n (0.5 at init; layers n >= 1)", ("attn",),
       "value_residual with `model.value_residual_learned=true`"),
]

#: name -> Quantity, in figure row order
QUANTITIES: Dict[str, Quantity] = {}
for _q in _LIST:
    if _q.name in QUANTITIES:
        raise ValueError(f"quantity {_q.name!r} is declared twice")
    QUANTITIES[_q.name] = _q
del _q

#: the probes whose quantities the layer_profiles figure draws (the rest: monitor_profiles)
TRAINING_PROBES = ("GradNormProbe", "ActivationProbe")


def training_quantities() -> Tuple[str, ...]:
    """The quantities of the training probes (:data:`TRAINING_PROBES`), in figure order."""
    return tuple(q.name for q in QUANTITIES.values() if q.probe in TRAINING_PROBES)


def block_combine(name: str) -> str:
    """How ``name``'s sublayer values make one value per block (a key of :data:`COMBINE`); an
    undeclared quantity (a run from a newer probe) combines by ``mean``."""
    return QUANTITIES[name].combine if name in QUANTITIES else "mean"


def block_text(name: str) -> str:
    """The words for :func:`block_combine` of ``name`` (an undeclared quantity: ``mean``'s)."""
    return QUANTITIES[name].block_text() if name in QUANTITIES else COMBINE["mean"]


def axis_label(name: str) -> str:
    """Short label of a quantity for a figure axis (an undeclared one: its name, spaced)."""
    return QUANTITIES[name].label if name in QUANTITIES else name.replace("_", " ")


def by_probe(probe: str) -> List[str]:
    """The names of the quantities ``probe`` (a class name) writes, in catalogue order."""
    return [q.name for q in QUANTITIES.values() if q.probe == probe]


def scalar_name(quantity: str, sublayer: str, layer: int) -> str:
    """The W&B and TensorBoard scalar of one row: ``<quantity>/<sublayer>/<layer, 3 digits>``."""
    return f"{quantity}/{sublayer}/{layer:03d}"


BEGIN = "<!-- quantities table: generated by `python -m resnorm.runs.quantities docs/monitors.md` -->"
END = "<!-- end of the generated quantities table -->"


def monitors_markdown() -> str:
    """The generated part of docs/monitors.md (between :data:`BEGIN` and :data:`END`): every quantity
    of :data:`QUANTITIES`, one row each."""
    lines = [BEGIN, "",
             "Every quantity below is written per (layer, sublayer) to the run's `layers.parquet` (columns "
             "`step, layer, sublayer, quantity, value`) and logged to W&B and TensorBoard as "
             "`<quantity>/<sublayer>/<layer>` (the layer with three digits). All are on with "
             "`train.probes=true` (the default); the `train.probe_every` ones not when it is 0. A quantity "
             "that exists for one sublayer only is NaN on the other row. The per-layer figures "
             "(`layer_profiles` for the training probes, `monitor_profiles` for the rest, `coord_check`) "
             "draw one value per block, made of the block's attention and MLP values as *per block* says "
             "(and their axes say so); a non-finite value of a sublayer that has the quantity makes its "
             "block's value inf. Declared once, in `resnorm/runs/quantities.py`.", "",
             "| quantity | unit | cadence | sublayers | per block | runs | probe | what |",
             "|---|---|---|---|---|---|---|---|"]
    for q in QUANTITIES.values():
        cells = [f"`{q.name}`", q.unit, CADENCES[q.cadence], ", ".join(q.sublayers), q.block_text(), q.where,
                 f"`{q.probe}`", q.description]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines + ["", END])


def generated_part(page: str) -> str:
    """The text of ``page`` from :data:`BEGIN` to :data:`END` included ("" when it has none)."""
    if BEGIN not in page or END not in page:
        return ""
    return page[page.index(BEGIN):page.index(END) + len(END)]


def write_table(path: str) -> None:
    """Replace the generated part of the page at ``path`` with :func:`monitors_markdown`."""
    from pathlib import Path

    page = Path(path).read_text()
    old = generated_part(page)
    if not old:
        raise SystemExit(f"{path}: no generated part ({BEGIN} ... {END}) to replace")
    Path(path).write_text(page.replace(old, monitors_markdown()))


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m resnorm.runs.quantities docs/monitors.md")
    write_table(sys.argv[1])
