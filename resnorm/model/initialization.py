"""Initialisation schemes, an explicit and recorded config choice (``model.init``).

- ``xavier`` (the papers' assumption, docs/papers.md §0): Xavier-normal linear weights,
  N(0, gain^2 * 2 / (fan_in + fan_out)); the fused QKV matrix is initialised as three separate
  d x d projections; zero biases; token embeddings N(0, 1) so that ||x_0||^2 ~ d; learned position
  embeddings N(0, 0.02^2), small beside the tokens; norm gains 1, norm biases 0.
- ``gpt2``: every linear weight and embedding N(0, 0.02^2), the attention output and fc2 projections
  N(0, (0.02 / sqrt(2L))^2), zero biases.

After either scheme the variant's own initialisation follows (it is part of the variant):

- ``branch_gain(depth, options)`` multiplies the value and output projections and both MLP matrices
  (DeepNet's beta, b2t's optional L^-1/2; 1 for most variants); ``qk_gain`` the query and key
  projections (b2t's optional L^-1/2). With ``xavier`` this is exactly ``xavier_normal_(w, gain=g)``
  as in DeepNet's pseudo-code.
- every norm layer is reset to its initial values (LayerNorm/RMSNorm gains 1 and biases 0,
  ScaleNorm g = sqrt(d), DyT alpha = alpha0, gamma 1, beta 0, Derf alpha = alpha0, s = 0, gamma 1,
  beta 0);
- every sublayer's learned scalars are reset to the spec's values (ReZero alpha = 0, Admin omega =
  the closed form sqrt(i); Admin's profiling pass, when selected, runs afterwards in
  :func:`resnorm.model.transformer.build_model`);
- a stream module with an ``after_init(model)`` runs it last (nGPT: every matrix unit-norm along
  d_model, its scales reset; :mod:`resnorm.model.ngpt`).
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch import nn

from resnorm.model.blocks import Sublayer
from resnorm.model.norms import NORM_TYPES


def _xavier(model: nn.Module) -> None:
    d = model.shape.d_model
    qkv = {b.attn.branch.qkv for b in model.blocks}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            if module in qkv:
                for i in range(3):
                    nn.init.xavier_normal_(w.data[i * d:(i + 1) * d])
            else:
                nn.init.xavier_normal_(w)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(model.tok_emb.weight, std=1.0)
    nn.init.normal_(model.pos_emb.weight, std=0.02)


def _gpt2(model: nn.Module) -> None:
    proj_std = 0.02 / math.sqrt(2 * model.shape.depth)
    projections = {id(b.attn.branch.out.weight) for b in model.blocks} | {id(b.mlp.branch.fc2.weight) for b in model.blocks}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=proj_std if id(module.weight) in projections else 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(model.tok_emb.weight, std=0.02)
    nn.init.normal_(model.pos_emb.weight, std=0.02)


INIT_SCHEMES: Dict[str, Callable[[nn.Module], None]] = {"xavier": _xavier, "gpt2": _gpt2}


@torch.no_grad()
def initialise(model: nn.Module, scheme: str) -> None:
    try:
        init = INIT_SCHEMES[scheme]
    except KeyError:
        raise KeyError(f"model.init={scheme!r}: choose one of {', '.join(INIT_SCHEMES)}") from None
    init(model)
    depth, opts = model.shape.depth, model.shape.options
    for gain, weights in ((model.variant.branch_gain(depth, opts), model.branch_weights()),
                          (model.variant.qk_gain(depth, opts), model.qk_weights())):
        if gain != 1.0:
            for w in weights:
                w.mul_(gain)
    for module in model.modules():
        if isinstance(module, NORM_TYPES) or isinstance(module, Sublayer):
            module.reset_parameters()
    after_init = getattr(model.stream_params, "after_init", None)  # nGPT's unit-norm matrices
    if after_init is not None:
        after_init(model)
