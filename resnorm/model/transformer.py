"""A Transformer language model whose residual/normalization scheme comes from a variant, and its
construction from a config (:func:`build_model`).

:class:`Transformer` adds embeddings, the optional embedding and final norms and the LM head to the
blocks of :mod:`resnorm.model.blocks`. Streams (``Variant.stream``) are named functions in the
registry :data:`STREAMS`: ``single`` calls the blocks in turn, ``b2t`` also hands each layer's input
to its MLP sublayer, ``dual`` carries ResiDual's second stream; the multi-stream and cross-layer ones
come from :mod:`resnorm.model.multistream`, :mod:`resnorm.model.attnres` and :mod:`resnorm.model.ngpt`.
They only call the sublayers (``forward`` or ``Sublayer.run``), so the sublayer equation stays in
:class:`resnorm.model.blocks.Sublayer`.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from resnorm.config.variants import Variant, get_variant
from resnorm.model.attnres import STREAMS_ATTNRES, attnres_module
from resnorm.model.blocks import Attention, Block, ModelShape, SoftcapLinear, Sublayer, SublayerParts
from resnorm.model.multistream import STREAMS_MULTI, stream_module
from resnorm.model.ngpt import ngpt_module, ngpt_stream


class Transformer(nn.Module):
    """Token + learned position embeddings, optional embedding norm, ``depth`` blocks, optional
    final norm, LM head."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.shape = shape
        self.variant: Variant = get_variant(shape.variant)
        self.tok_emb = nn.Embedding(shape.vocab_size, shape.d_model)
        self.pos_emb = nn.Embedding(shape.context, shape.d_model)
        self.embed_norm = shape.norm() if self.variant.embed_norm else None
        self.blocks = nn.ModuleList(Block(specs, shape)
                                    for specs in self.variant.layer_specs(shape.depth, shape.options))
        eps = self.variant.final_norm_eps
        self.final_norm = shape.norm(eps=eps and eps(shape.options)) if self.variant.final_norm else None
        if shape.logit_softcap is None:
            self.head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        else:
            self.head = SoftcapLinear(shape.d_model, shape.vocab_size, shape.logit_softcap)
        if shape.tie_weights:
            self.head.weight = self.tok_emb.weight
        # the learned parameters of a stream with state: hyper-connection and mHC matrices, DenseFormer
        # and value-residual weights (resnorm.model.multistream), AttnRes pseudo-queries
        # (resnorm.model.attnres), nGPT's branches, head and alphas (resnorm.model.ngpt); None for the others
        self.stream_params = stream_module(self.variant.stream, shape)
        if self.stream_params is None:
            self.stream_params = attnres_module(self.variant.stream, shape)
        if self.stream_params is None:
            self.stream_params = ngpt_module(self)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """x_0: token + position embeddings, through the embedding norm if the variant has one."""
        t = idx.shape[1]
        if t > self.shape.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context {self.shape.context}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        return x if self.embed_norm is None else self.embed_norm(x)

    def sublayers(self) -> List[Sublayer]:
        """Every residual sublayer, bottom to top (attention and MLP of each block)."""
        return [sub for block in self.blocks for sub in (block.attn, block.mlp)]

    def hidden(self, idx: torch.Tensor, parts: Optional[list] = None) -> torch.Tensor:
        """The input of the head: the embedding threaded through the layers by the variant's stream
        (:data:`STREAMS`, keyed by ``Variant.stream``), final norm included.

        ``parts``: a list to which every sublayer appends its :class:`SublayerParts` (see :meth:`trace`).
        """
        return STREAMS[self.variant.stream](self, self.embed(idx), parts)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """The output logits (soft-capped by the head when ``model.logit_softcap`` is set)."""
        return self.head(self.hidden(idx))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, z_loss: bool = True) -> torch.Tensor:
        """Mean cross-entropy over the targets that are not -100 (every next token for clm, the masked
        positions for mlm), plus the z-loss term when ``model.z_loss`` > 0 and ``z_loss`` (evaluation
        passes ``z_loss=False``: a validation loss is the cross-entropy alone)."""
        logits = self(idx).reshape(-1, self.shape.vocab_size).float()
        loss = F.cross_entropy(logits, targets.reshape(-1))
        if z_loss and self.shape.z_loss:  # Wortsman et al. 2023 / PaLM: c * mean(log Z ^ 2)
            loss = loss + self.shape.z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return loss

    def trace(self, idx: torch.Tensor, max_logits: bool = True) -> Dict[str, object]:
        """One forward pass that also returns the model's internals, without hooks.

        Returns ``hidden`` (the head's input), ``parts`` (one :class:`SublayerParts` per sublayer, in
        order: attention then MLP of every block), ``kinds`` ("attn" / "mlp" per sublayer),
        ``stream`` (the residual stream entering the first sublayer, then after every block: depth + 1
        tensors) and ``max_logit`` (a (depth,) tensor: each attention's max |q.k|/sqrt(d_head), only
        when ``max_logits``).
        """
        parts: List[SublayerParts] = []
        hidden = self.hidden(idx, parts)
        subs = [s for block in self.blocks for s in (block.attn, block.mlp)]
        kinds = ["attn" if isinstance(s.branch, Attention) else "mlp" for s in subs]
        out: Dict[str, object] = dict(hidden=hidden, parts=parts, kinds=kinds,
                                      stream=[parts[0].x] + [p.y for p in parts[1::2]])
        if max_logits:
            out["max_logit"] = torch.stack([s.branch.max_logit(p.h) for s, p in zip(subs, parts)
                                            if isinstance(s.branch, Attention)])
        return out


    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def branch_weights(self) -> List[torch.Tensor]:
        """The weights DeepNet scales by beta: value and output projections, fc1 and fc2, per block."""
        d = self.shape.d_model
        out = []
        for block in self.blocks:
            out += [block.attn.branch.qkv.weight[2 * d:], block.attn.branch.out.weight,
                    block.mlp.branch.fc1.weight, block.mlp.branch.fc2.weight]
        return out

    def qk_weights(self) -> List[torch.Tensor]:
        """Query and key projections, per block (views into the fused QKV weight)."""
        d = self.shape.d_model
        return [w for block in self.blocks for w in (block.attn.branch.qkv.weight[:d],
                                                      block.attn.branch.qkv.weight[d:2 * d])]


# --- streams: how the layers are threaded (keyed by Variant.stream) -----------------------------------
# Each takes the model, the embedding x_0 and the optional ``parts`` list and returns the head's
# input. A new way of threading layers (several streams, dense connections) is a new function here
# plus its name in resnorm.config.variants.STREAMS (a test checks the two agree); the sublayer equation
# stays in Sublayer.


def _final(model: "Transformer", x: torch.Tensor) -> torch.Tensor:
    return x if model.final_norm is None else model.final_norm(x)


def single_stream(model: "Transformer", x: torch.Tensor, parts: Optional[list]) -> torch.Tensor:
    """One residual stream: x_{l+1} = Block_l(x_l)."""
    for block in model.blocks:
        x = block(x, parts)
    return _final(model, x)


def b2t_stream(model: "Transformer", x: torch.Tensor, parts: Optional[list]) -> torch.Tensor:
    """Takase et al. (arXiv:2206.00330): the layer's input joins the MLP sublayer's sum before its norm."""
    for block in model.blocks:
        x = block.mlp(block.attn(x, parts=parts), bottom=x, parts=parts)
    return _final(model, x)


def dual_stream(model: "Transformer", x: torch.Tensor, parts: Optional[list]) -> torch.Tensor:
    """ResiDual (Xie et al., arXiv:2304.14802): x is the Post-LN stream; y (scaled by s) accumulates
    every branch output; the head reads x_L + N_final(y_L). As in the authors' code (microsoft/ResiDual,
    ``ResiDualDecoder``): y_0 = s x_0, y += s F, and N_final is built with eps = ``model.resi_dual_eps``
    (their 1e-7) and applied to the scaled y, so the output is theirs for every s."""
    s = model.shape.options.resi_dual_scale
    y = x * s if s != 1.0 else x
    for sub in model.sublayers():
        p = sub.run(x)
        if parts is not None:
            parts.append(p)
        x, f = p.y, p.f
        y = y + (f * s if s != 1.0 else f)
    return x + model.final_norm(y)


#: every stream, declared where it is defined: the three above, then the multi-stream and cross-layer
#: schemes of their own modules (names: resnorm.config.variants.STREAMS; tests/test_loop.py checks they agree)
STREAMS = {"single": single_stream, "b2t": b2t_stream, "dual": dual_stream, **STREAMS_MULTI, **STREAMS_ATTNRES,
           "ngpt": ngpt_stream}


def build_model(cfg, data: Optional[torch.Tensor] = None) -> Transformer:
    """Build and initialise the model a composed config describes.

    The init scheme comes from ``model.init``; the variant's own init (gains, learned scalars)
    follows. Admin with ``model.admin_mode=profile`` then runs its profiling pass
    (:func:`resnorm.model.admin.profile`) on one batch of ``data`` (a 1-D token stream); when ``data`` is
    None, the training split of the configured dataset (``cfg.data``, seeded by ``cfg.seed``) is
    loaded for it, so the pass sees the tokens the run trains on. It uses no random numbers.
    """
    from resnorm.model.initialization import initialise

    model = Transformer(ModelShape.from_config(cfg))
    initialise(model, cfg.model.init)
    if model.variant.profiled_skip and model.shape.options.admin_mode == "profile":
        from resnorm.model.admin import profile, profile_batch

        if data is None:
            from resnorm.data.corpora import load_data

            data = load_data(cfg.data, cfg.train.seq_len, cfg.seed).train
        profile(model, profile_batch(data, cfg.train.batch_size, cfg.train.seq_len))
    return model
