"""Attention Residuals (Kimi Team, arXiv:2603.15031): softmax attention over depth.

A "layer" here is one sublayer (attention or MLP), as in the paper, whose output is its branch
output ``v = F(N_pre(h))`` (``SublayerSpec(pre_norm=True, residual="none")``: the sublayer adds no
skip of its own). The sources are ``v_0`` = the embedding and the outputs of the earlier sublayers;
sublayer ``l`` reads ``h_l = sum_i softmax_i(w_l^T RMSNorm(v_i)) v_i`` with one learned pseudo-query
``w_l`` (zero at init: uniform weights), and the head reads the same aggregate with its own
pseudo-query ``w_{2L}``, through the final norm. Block AttnRes: the sublayer outputs of a block of
``S`` sublayers are summed (an ordinary residual inside the block) into one source; a sublayer
attends over ``v_0``, the completed block sums and its own block's partial sum. Full AttnRes is
``S = 1``. Equations, inits and the choices made: docs/variants.md.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn


class DepthQueries(nn.Module):
    """The pseudo-queries w (2 L + 1, d): one per sublayer, the last for the head; all zero at init.
    ``per_block``: sublayers summed into one source (1: full AttnRes); ``eps``: RMSNorm's epsilon."""

    def __init__(self, depth: int, d: int, per_block: int, eps: float):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(2 * depth + 1, d))
        self.per_block = per_block
        self.eps = eps
        self.record: Optional[list] = None  # a monitor's list: the sources of every aggregate, in order


def depth_weights(w: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """alpha (n, ...) = softmax_i(w^T RMSNorm(v_i)) over the stacked sources v (n, ..., d), per token
    (RMSNorm without a gain)."""
    return (F.rms_norm(v, (v.shape[-1],), eps=eps) @ w.to(v.dtype)).softmax(dim=0)


def depth_attention(w: torch.Tensor, sources: List[torch.Tensor], eps: float) -> torch.Tensor:
    """sum_i alpha_i v_i with alpha from :func:`depth_weights`."""
    v = torch.stack(sources)  # (n, ..., d)
    return torch.einsum("n...,n...d->...d", depth_weights(w, v, eps), v)


def attnres_stream(model, x: torch.Tensor, parts: Optional[list]) -> torch.Tensor:
    """Sources [x0, block sums..., partial sum]; every sublayer reads their attention aggregate, its
    output joins the partial sum; every ``per_block`` sublayers the partial sum becomes a source."""
    q = model.stream_params
    done, partial = [x], None
    for k, sub in enumerate(model.sublayers()):
        sources = done if partial is None else done + [partial]
        if q.record is not None:  # resnorm.monitors.schemes reads the depth weights from these
            q.record.append(sources)
        h = depth_attention(q.queries[k], sources, q.eps)
        p = sub.run(h)
        if parts is not None:
            parts.append(p)
        partial = p.y if partial is None else partial + p.y
        if (k + 1) % q.per_block == 0:
            done, partial = done + [partial], None
    h = depth_attention(q.queries[-1], done if partial is None else done + [partial], q.eps)
    return h if model.final_norm is None else model.final_norm(h)


def block_sublayers(kind: str, shape) -> int:
    """Sublayers per source: 1 for ``attnres``; for ``attnres_block`` 2 x ``model.attnres_block_size``
    layers, null: ceil(depth / 8) layers (the paper's ~8 blocks)."""
    if kind == "attnres":
        return 1
    size = shape.options.attnres_block_size
    return 2 * (size if size is not None else math.ceil(shape.depth / 8))


def attnres_module(kind: str, shape) -> Optional[nn.Module]:
    """The pseudo-queries of the stream ``kind`` (None for the other streams)."""
    if kind not in STREAMS_ATTNRES:
        return None
    return DepthQueries(shape.depth, shape.d_model, block_sublayers(kind, shape), shape.norm_eps)


STREAMS_ATTNRES = {"attnres": attnres_stream, "attnres_block": attnres_stream}
