"""A decoder-only causal language model whose residual/normalization scheme comes from a variant.

Read top to bottom: :class:`Attention` and :class:`MLP` are the branches ``F``; :class:`Sublayer`
is the single place where a variant's norm placement and residual are applied; :class:`Block` is
two sublayers; :class:`Transformer` adds embeddings, the optional final norm and the LM head.
The model knows nothing of logging or probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional

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
    qk_norm: bool = False  # LayerNorm over the head dim of queries and keys (Wortsman et al. 2023)
    z_loss: float = 0.0  # c in c * mean(logsumexp(logits)^2), added to the loss; 0 = off

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        m = cfg.model
        variant = get_variant(m.norm)
        return cls(
            variant=m.norm, depth=int(cfg.depth), d_model=m.d_model, n_heads=m.n_heads,
            d_ff=m.d_ff or 4 * m.d_model, vocab_size=m.vocab_size, context=cfg.train.seq_len,
            norm_layer=m.norm_layer or variant.norm_layer, norm_eps=m.norm_eps,
            activation=m.activation, bias=m.bias, tie_weights=m.tie_weights,
            qk_norm=bool(getattr(m, "qk_norm", False)), z_loss=float(getattr(m, "z_loss", 0.0)),
        )


class Attention(nn.Module):
    """Causal multi-head self-attention with one fused QKV projection.

    ``qk_norm``: LayerNorm over the head dimension of queries and keys, shared by all heads
    (qk-layernorm, Wortsman et al. 2023). ``causal`` is an attribute, not a config key: the
    rank-collapse reproduction sets it to False for bidirectional attention.
    """

    def __init__(self, d_model: int, n_heads: int, bias: bool, qk_norm: bool = False, eps: float = 1e-5):
        super().__init__()
        self.n_heads = n_heads
        self.causal = True
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        head_dim = d_model // n_heads
        self.q_norm = nn.LayerNorm(head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim, eps=eps) if qk_norm else None

    def _qkv(self, x: torch.Tensor):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, t, d))

    def max_logit(self, x: torch.Tensor) -> torch.Tensor:
        """max |q_i . k_j| / sqrt(d_head) over batch, heads and the (causally) visible pairs i, j."""
        q, k, _ = self._qkv(x)
        z = (q @ k.transpose(-1, -2)).abs() / math.sqrt(q.shape[-1])
        if self.causal:
            t = z.shape[-1]
            z = z.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool, device=z.device), 1), 0.0)
        return z.amax()


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SublayerParts(NamedTuple):
    """One sublayer's internals, as :meth:`Transformer.trace` returns them (all (batch, tokens, d))."""

    x: torch.Tensor  # the residual stream entering the sublayer
    h: torch.Tensor  # the branch input (after the pre-norm and input scale)
    f: torch.Tensor  # the branch output as added to the stream (after out-norm and branch scale)
    z: torch.Tensor  # skip + branch, before the sum norm (= y when there is none)
    y: torch.Tensor  # the sublayer's output


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

    def forward(self, x: torch.Tensor, parts: Optional[list] = None) -> torch.Tensor:
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
        z = y
        if self.sum_norm is not None:
            y = self.sum_norm(y)
        if parts is not None:  # Transformer.trace: read the internals without hooks
            parts.append(SublayerParts(x, h, f, z, y))
        return y


class Block(nn.Module):
    def __init__(self, spec: SublayerSpec, shape: ModelShape):
        super().__init__()
        self.attn = Sublayer(Attention(shape.d_model, shape.n_heads, shape.bias, shape.qk_norm, shape.norm_eps),
                             spec, shape)
        self.mlp = Sublayer(MLP(shape.d_model, shape.d_ff, shape.activation, shape.bias), spec, shape)

    def forward(self, x: torch.Tensor, parts: Optional[list] = None) -> torch.Tensor:
        return self.mlp(self.attn(x, parts), parts)


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

    def hidden(self, idx: torch.Tensor, parts: Optional[list] = None) -> torch.Tensor:
        """The residual stream after the last block and the final norm (the input of the head).

        ``parts``: a list to which every sublayer appends its :class:`SublayerParts` (see :meth:`trace`).
        """
        t = idx.shape[1]
        if t > self.shape.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context {self.shape.context}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x, parts)
        return x if self.final_norm is None else self.final_norm(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(idx))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx).reshape(-1, self.shape.vocab_size).float()
        loss = F.cross_entropy(logits, targets.reshape(-1))
        if self.shape.z_loss:  # Wortsman et al. 2023 / PaLM: c * mean(log Z ^ 2)
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


def build_model(cfg) -> Transformer:
    """Build and initialise the model a composed config describes (init scheme from ``model.init``)."""
    from .initialization import initialise

    model = Transformer(ModelShape.from_config(cfg))
    initialise(model, cfg.model.init)
    return model
