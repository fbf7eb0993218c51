"""Scheme monitors: the quantities of the multi-stream and cross-layer residuals, per
(layer, sublayer) in ``layers.parquet`` (W&B: ``<quantity>/<sublayer>/<layer>``), only for the
variants that have them, with ``train.probes`` (the default).

Mixing matrices of Hyper-Connections and mHC (``hyper``, ``hyper_dynamic``, ``mhc``), every
``train.probe_every`` steps and on the last, from one no-grad forward of the step's batch in eval
mode (:class:`SchemeForwardProbe`). Sublayer ``k`` (attention and MLP counted apart, bottom to top)
updates the streams as ``H <- R_k H + B_k f_k``, ``R_k`` the n x n residual matrix [target, source]
(HC: ``A_r^T``; mHC: ``H^res``, doubly stochastic). The gains are the mHC paper's "Amax Gain
Magnitude" (Xie et al., arXiv:2512.24880, Fig. 3): the **forward** gain of a matrix M is its largest
absolute row sum max_t sum_s |M_ts| (how much a stream can grow going up), the **backward** gain its
largest absolute column sum max_s sum_t |M_ts| (the same for a gradient going down); both are 1 for a
doubly stochastic matrix and for the identity (HC at init). The dynamic matrices (``hyper_dynamic``,
``mhc``) differ per token: the gain is computed per token and averaged over the batch's tokens (the
paper averages over the tokens of a sequence), not taken of a mean matrix.

- ``hc_row_gain``, ``hc_col_gain``: forward and backward gain of the sublayer's own ``R_k`` [1];
- ``hc_composite_row_gain``, ``hc_composite_col_gain``: the same of the composite
  ``R_{K-1} ... R_{k+1} R_k``, from the sublayer to the top (the paper's prod_{i=1}^{L-l} H^res_{L-i});
  the first sublayer (0, attn) holds the product over the whole stack [1].
- ``hc_stream_share_<s>`` (s = 0 .. n-1, the first :data:`HC_SHARE_STREAMS`): what stream s carries after sublayer k's update, RMS(H_s) /
  RMS(H) over the batch's tokens and the width (H: all n streams) [1 each when the streams are equally
  large; sqrt(n) for a stream that carries everything, 0 for a dead one];
- ``hc_stream_entropy``: the entropy -sum_s p_s ln p_s of the streams' energy fractions
  p_s = RMS(H_s)^2 / sum_t RMS(H_t)^2 = share_s^2 / n [nats; ln n when balanced, 0 when one stream carries
  everything].

Depth weights of Attention Residuals (``attnres``, ``attnres_block``), same cadence and forward: the
weights alpha_{i->l} = softmax_i(w_l^T RMSNorm(v_i)) of every source i of sublayer l's aggregate
(:func:`resnorm.model.attnres.depth_weights`), per token, averaged over the batch's tokens:

- ``attnres_w_embed``: the weight on the embedding v_0 [1, in 0..1];
- ``attnres_w_last``: the weight on the newest source (the previous sublayer's output; in Block
  AttnRes the current block's partial sum, or the last finished block) [1];
- ``attnres_entropy``: the entropy -sum_i alpha_i ln alpha_i of the weights [nats; ln(sources) when
  uniform, as at init];
- ``attnres_query_norm``: ||w_l||_2 of the sublayer's pseudo-query [1; 0 at init].

The head's own aggregate (pseudo-query w_{2L}) has no sublayer row and is not reported.

Learned stream parameters, every ``train.log_every`` steps, before the step (:class:`SchemeParamProbe`):

- DenseFormer (``denseformer``), on the MLP row of block i (the weights Y_i = sum_j alpha_ij X_j
  applied after it; NaN on the attention row): ``dwa_alpha_self`` alpha_ii (1 at init),
  ``dwa_alpha_embed`` alpha_i0 on the embedding X_0 (0 at init), ``dwa_alpha_rest`` sum_{0<j<i}
  |alpha_ij| on the earlier blocks' outputs (0 at init) [1];
- value residual (``value_residual`` with ``model.value_residual_learned=true``; the fixed mix is a
  constant and not reported), on the attention row of every layer n >= 1 (NaN on layer 0 and the
  MLPs): ``value_lambda1`` on V_1 and ``value_lambda2`` on V_n (0.5 at init) [1].

A new scheme adds its function to :data:`FORWARD` or :data:`PARAMS` (keyed by ``Variant.stream``).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from resnorm.model.blocks import eval_mode
from resnorm.monitors.probes import Probe, sublayer_modules
from resnorm.monitors.forward import _Periodic


def row_gain(m: torch.Tensor) -> torch.Tensor:
    """Forward gain of matrices (..., t, s): the largest absolute row sum max_t sum_s |m_ts|."""
    return m.abs().sum(dim=-1).amax(dim=-1)


def col_gain(m: torch.Tensor) -> torch.Tensor:
    """Backward gain of matrices (..., t, s): the largest absolute column sum max_s sum_t |m_ts|."""
    return m.abs().sum(dim=-2).amax(dim=-1)


def composites(maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """[R_{K-1} ... R_k for k = 0..K-1]: the product from each matrix to the last (batched, broadcast)."""
    out, prod = [], None
    for r in reversed(maps):
        prod = r if prod is None else prod @ r
        out.append(prod)
    return out[::-1]


def gain_stats(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """(4, K): forward and backward gain of each R_k, then of each composite, each averaged over the
    tokens (the leading dimensions; a static matrix broadcast over them counts once)."""
    comp = composites(maps)
    rows = [[f(m).float().mean() for m in ms] for ms in (maps, comp) for f in (row_gain, col_gain)]
    return torch.stack([torch.stack(r) for r in rows])


def stream_states(model, idx: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(R_k (..., n, n) [target, source], the streams H (n, ..., d) after the update) of every sublayer's
    (m)HC connection, from one forward of ``idx`` (a pre-hook reads the streams each connection gets, a
    hook the streams it returns)."""
    maps: List[torch.Tensor] = []
    outs: List[torch.Tensor] = []
    hooks = []
    for conn in model.stream_params.layers:
        hooks.append(conn.register_forward_pre_hook(lambda mod, args: maps.append(mod.residual_map(args[0]))))
        hooks.append(conn.register_forward_hook(lambda mod, args, out: outs.append(out)))
    try:
        model.hidden(idx)
    finally:
        for h in hooks:
            h.remove()
    return maps, outs


def residual_maps(model, idx: torch.Tensor) -> List[torch.Tensor]:
    """R_k (..., n, n) [target, source] of every sublayer's (m)HC connection, from one forward of ``idx``."""
    return stream_states(model, idx)[0]


def stream_shares(H: torch.Tensor) -> torch.Tensor:
    """(n,): RMS of each stream of H (n, ..., d) over all its other dimensions, over the RMS of all of H."""
    energy = H.float().pow(2).flatten(1).mean(dim=1)  # (n,) mean square of each stream
    return (energy / energy.mean()).sqrt()


def share_entropy(shares: torch.Tensor) -> torch.Tensor:
    """-sum_s p_s ln p_s of the energy fractions p_s = share_s^2 / sum_t share_t^2 (0 ln 0 = 0)."""
    p = shares.pow(2) / shares.pow(2).sum()
    return -torch.special.xlogy(p, p).sum()


def share_stats(outs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1 + min(n, HC_SHARE_STREAMS), K): the entropy of the streams' energy fractions (all n), then each
    stream's share (the first HC_SHARE_STREAMS streams), per sublayer."""
    cols = []
    for H in outs:
        shares = stream_shares(H)
        cols.append(torch.cat([share_entropy(shares)[None], shares[:HC_SHARE_STREAMS]]))
    return torch.stack(cols, dim=1)


def hyper_stats(model, idx: torch.Tensor) -> torch.Tensor:
    maps, outs = stream_states(model, idx)
    return torch.cat([gain_stats(maps), share_stats(outs).to(maps[0].device)])


def hyper_rows(model) -> int:
    """How many of :data:`HC_QUANTITIES` the model's streams fill: the gains, the entropy, one share per stream."""
    return len(HC_GAINS) + 1 + min(model.stream_params.n, HC_SHARE_STREAMS)


def attnres_stats(model, idx: torch.Tensor) -> torch.Tensor:
    """(4, 2 L): weight on the embedding, on the newest source, entropy, query norm per sublayer."""
    from resnorm.model.attnres import depth_weights

    q = model.stream_params
    q.record = []
    try:
        model.hidden(idx)
        sources = q.record
    finally:
        q.record = None
    cols = []
    for w, srcs in zip(q.queries, sources):
        a = depth_weights(w, torch.stack(srcs), q.eps).float()  # (n_sources, batch, T)
        entropy = -(a * a.clamp_min(1e-30).log()).sum(0).mean()
        cols.append(torch.stack([a[0].mean(), a[-1].mean(), entropy, w.float().norm()]))
    return torch.stack(cols, dim=1)


HC_GAINS = ("hc_row_gain", "hc_col_gain", "hc_composite_row_gain", "hc_composite_col_gain")
#: the streams whose share is reported by name (``hc_stream_share_0`` ..): n = 4 is the paper's and the
#: default; the entropy covers every stream whatever n
HC_SHARE_STREAMS = 8
HC_QUANTITIES = HC_GAINS + ("hc_stream_entropy",) + tuple(f"hc_stream_share_{s}" for s in range(HC_SHARE_STREAMS))
#: stream kind -> (quantities, function(model, batch) -> (rows, n_sublayers) tensor); the rows are the
#: first quantities (all of them unless :data:`ROWS` says how many the model fills)
FORWARD: Dict[str, Tuple[Tuple[str, ...], Callable]] = {}
#: stream kind -> function(model) -> how many of its FORWARD quantities the model writes
ROWS: Dict[str, Callable] = {"hyper": hyper_rows, "hyper_dynamic": hyper_rows, "mhc": hyper_rows}
_HC = (HC_QUANTITIES, hyper_stats)
_ATTNRES = (("attnres_w_embed", "attnres_w_last", "attnres_entropy", "attnres_query_norm"), attnres_stats)
FORWARD.update(hyper=_HC, hyper_dynamic=_HC, mhc=_HC, attnres=_ATTNRES, attnres_block=_ATTNRES)


def dense_weights(model) -> torch.Tensor:
    """(3, 2 L): alpha_ii, alpha_i0 and sum_{0<j<i} |alpha_ij| on block i's MLP row, NaN on attention rows."""
    out = torch.full((3, 2 * len(model.blocks)), math.nan, device=model.stream_params.alphas[0].device)
    for i, alpha in enumerate(model.stream_params.alphas):  # alpha: (i + 2,), X_0 .. X_{i+1}
        a = alpha.detach().float()
        out[:, 2 * i + 1] = torch.stack([a[-1], a[0], a[1:-1].abs().sum()])
    return out


def value_lambdas(model) -> torch.Tensor:
    """(2, 2 L): lambda1, lambda2 on the attention row of every layer n >= 1, NaN elsewhere."""
    lam = model.stream_params.lambdas.detach().float()
    out = torch.full((2, 2 * lam.shape[0]), math.nan, device=lam.device)
    out[:, 2:][:, ::2] = lam[1:].T
    return out


def _learned_lambdas(model) -> bool:
    return isinstance(model.stream_params.lambdas, nn.Parameter)


#: stream kind -> (quantities, function(model) -> tensor, whether the model has them)
PARAMS: Dict[str, Tuple[Tuple[str, ...], Callable, Callable]] = {
    "dense": (("dwa_alpha_self", "dwa_alpha_embed", "dwa_alpha_rest"), dense_weights, lambda m: True),
    "value_residual": (("value_lambda1", "value_lambda2"), value_lambdas, _learned_lambdas),
}


class SchemeForwardProbe(_Periodic):
    """The :data:`FORWARD` quantities of the model's stream from a no-grad forward of the step's
    batch in eval mode, every ``every`` steps and on the last."""

    def __init__(self, model, every: int):
        super().__init__(model, every, total_steps=0)
        quantities, self.compute = FORWARD[model.variant.stream]
        rows = ROWS.get(model.variant.stream)
        self.quantities_before = tuple(quantities if rows is None else quantities[:rows(model)])

    @torch.no_grad()
    def before_update(self, x: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.model):
            return self.compute(self.model, x)


class SchemeParamProbe(Probe):
    """The :data:`PARAMS` quantities of the model's stream, read before the step, every ``every`` steps."""

    def __init__(self, model, every: int):
        self.model, self.every = model, every
        self.labels = [(layer, sub) for layer, sub, _ in sublayer_modules(model)]
        self.quantities_before, self.compute, _ = PARAMS[model.variant.stream]

    def due(self, step: int, last: bool) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def before_update(self, x=None) -> torch.Tensor:
        return self.compute(self.model)


def scheme_probes(model, train_cfg) -> List[Probe]:
    """The scheme probes that apply to the model's stream (none when ``train.probes`` is false; the
    forward ones not when ``train.probe_every`` is 0), for :func:`resnorm.train.callbacks.probe_callbacks`."""
    if not train_cfg.probes:
        return []
    stream = model.variant.stream
    probes: List[Probe] = []
    if stream in FORWARD and train_cfg.probe_every:
        probes.append(SchemeForwardProbe(model, train_cfg.probe_every))
    if stream in PARAMS and PARAMS[stream][2](model):
        probes.append(SchemeParamProbe(model, train_cfg.log_every))
    return probes
