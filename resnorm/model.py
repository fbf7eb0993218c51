"""A decoder-only causal language model whose residual/normalization scheme comes from a variant.

Read top to bottom: :class:`Attention` and :class:`MLP` are the branches ``F``; :class:`Sublayer`
is the single place where a variant's norm placement and residual are applied; :class:`Block` is
two sublayers; :class:`Transformer` adds embeddings, the optional final norm and the LM head.
The model knows nothing of logging or probes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .norms import make_norm
from .variants import SublayerSpec, Variant, get_variant

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


@dataclass(frozen=True)
class ModelShape:
    """Everything the model's structure depends on, resolved from the config."""

    variant: str
    depth: int
    d_model: int
    n_heads: int
    d_ff: int
    vocab_size: int
    context: int
    norm_layer: str
    norm_eps: float = 1e-5
    activation: str = "gelu"
    bias: bool = True
    tie_weights: bool = False

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        m = cfg.model
        variant = get_variant(m.norm)
        return cls(
            variant=m.norm, depth=int(cfg.depth), d_model=m.d_model, n_heads=m.n_heads,
            d_ff=m.d_ff or 4 * m.d_model, vocab_size=m.vocab_size, context=cfg.train.seq_len,
            norm_layer=m.norm_layer or variant.norm_layer, norm_eps=m.norm_eps,
            activation=m.activation, bias=m.bias, tie_weights=m.tie_weights,
        )


class Attention(nn.Module):
    """Causal multi-head self-attention with one fused QKV projection."""

    def __init__(self, d_model: int, n_heads: int, bias: bool):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Sublayer(nn.Module):
    """One residual sublayer: the norm placement of every variant is applied here and nowhere else.

    See :class:`resnorm.variants.SublayerSpec` for the equation.
    """

    def __init__(self, branch: nn.Module, spec: SublayerSpec, shape: ModelShape):
        super().__init__()
        self.branch = branch
        self.spec = spec

        def norm_if(flag: bool) -> Optional[nn.Module]:
            return make_norm(shape.norm_layer, shape.d_model, shape.norm_eps) if flag else None

        self.pre_norm = norm_if(spec.pre_norm)
        self.out_norm = norm_if(spec.out_norm)
        self.sum_norm = norm_if(spec.sum_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        h = x
        if self.pre_norm is not None:
            h = self.pre_norm(h)
        if s.input_scale != 1.0:
            h = h * s.input_scale
        f = self.branch(h)
        if self.out_norm is not None:
            f = self.out_norm(f)
        if s.branch_scale != 1.0:
            f = f * s.branch_scale
        if s.residual == "identity":
            y = x + f if s.skip_scale == 1.0 else s.skip_scale * x + f
        else:
            y = f
        if self.sum_norm is not None:
            y = self.sum_norm(y)
        return y


class Block(nn.Module):
    def __init__(self, spec: SublayerSpec, shape: ModelShape):
        super().__init__()
        self.attn = Sublayer(Attention(shape.d_model, shape.n_heads, shape.bias), spec, shape)
        self.mlp = Sublayer(MLP(shape.d_model, shape.d_ff, shape.activation, shape.bias), spec, shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


class Transformer(nn.Module):
    """Token + learned position embeddings, ``depth`` blocks, optional final norm, LM head."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.shape = shape
        self.variant: Variant = get_variant(shape.variant)
        self.tok_emb = nn.Embedding(shape.vocab_size, shape.d_model)
        self.pos_emb = nn.Embedding(shape.context, shape.d_model)
        self.blocks = nn.ModuleList(Block(spec, shape) for spec in self.variant.specs(shape.depth))
        self.final_norm = (make_norm(shape.norm_layer, shape.d_model, shape.norm_eps)
                           if self.variant.final_norm else None)
        self.head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        if shape.tie_weights:
            self.head.weight = self.tok_emb.weight

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The residual stream after the last block and the final norm (the input of the head)."""
        t = idx.shape[1]
        if t > self.shape.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context {self.shape.context}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return x if self.final_norm is None else self.final_norm(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(idx))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))

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


def build_model(cfg) -> Transformer:
    """Build and initialise the model a composed config describes (init scheme from ``model.init``)."""
    from .initialization import initialise

    model = Transformer(ModelShape.from_config(cfg))
    initialise(model, cfg.model.init)
    return model
