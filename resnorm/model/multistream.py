"""Streams with state across layers: value residuals, DenseFormer, Hyper-Connections, mHC.

Each ``*_stream(model, x0, parts)`` is registered in :data:`resnorm.model.transformer.STREAMS`; its learned
parameters live in the module :func:`stream_module` builds, which the :class:`Transformer` owns as
``model.stream_params`` (checkpointed and optimised with the rest). The sublayers are called only
through :meth:`Sublayer.run`, so the norm placement stays in :class:`resnorm.model.blocks.Sublayer`; the
orthogonal residual update is a sublayer residual (``SublayerSpec.residual="orthogonal"``), not a
stream. Equations, inits and the choices made: docs/variants.md.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

#: epsilon of the orthogonal residual update's <x, x> (Oh et al., arXiv:2505.11881)
ORTHOGONAL_EPS = 1e-6


def orthogonal_part(f: torch.Tensor, x: torch.Tensor, eps: float = ORTHOGONAL_EPS) -> torch.Tensor:
    """Per token: f - (<f, x> / (<x, x> + eps)) x, the part of f orthogonal to the stream x."""
    return f - ((f * x).sum(-1, keepdim=True) / ((x * x).sum(-1, keepdim=True) + eps)) * x


def _record(parts: Optional[list], p) -> None:
    if parts is not None:
        parts.append(p)


def _final(model, x: torch.Tensor) -> torch.Tensor:
    return x if model.final_norm is None else model.final_norm(x)


# --- value residual (ResFormer, Zhou et al., arXiv:2410.17897) -----------------------------------------

class ValueMix(nn.Module):
    """lambda1, lambda2 of every attention layer n >= 2 (index 0 unused): learned scalars when
    ``model.value_residual_learned``, else fixed buffers; both start at 0.5."""

    def __init__(self, depth: int, learned: bool):
        super().__init__()
        lam = torch.full((depth, 2), 0.5)
        if learned:
            self.lambdas = nn.Parameter(lam)
        else:
            self.register_buffer("lambdas", lam)


def value_residual_stream(model, x: torch.Tensor, parts: Optional[list]) -> torch.Tensor:
    """x_{l+1} = Block_l(x_l), with the values of every attention layer n >= 2 replaced by
    lambda1 V_1 + lambda2 V_n (V_1: the first attention layer's values)."""
    lam = model.stream_params.lambdas
    first = []

    def keep(v):
        first.append(v)
        return v

    for n, block in enumerate(model.blocks):
        attn = block.attn.branch
        attn.value_hook = keep if n == 0 else (lambda v, n=n: lam[n, 0] * first[0] + lam[n, 1] * v)
        try:
            x = block.attn(x, parts=parts)
        finally:
            attn.value_hook = None
        x = block.mlp(x, parts=parts)
    return _final(model, x)


# --- DenseFormer (Pagliardini et al., arXiv:2402.02622) ------------------------------------------------

class DepthWeights(nn.Module):
    """alpha_{i,j}, j = 0..i, after every block i = 1..L: alpha_ii = 1, the others 0 at init."""

    def __init__(self, depth: int):
        super().__init__()
        self.alphas = nn.ParameterList(nn.Parameter(F.one_hot(torch.tensor(i + 1), i + 2).float())
                                       for i in range(depth))


def dense_stream(model, x: torch.Tensor, parts: Optional[list]) -> torch.Tensor:
    """X_0 = x0; X_i = Block_i(Y_{i-1}); Y_i = sum_{j<=i} alpha_ij X_j (Y_0 = X_0); head reads Y_L."""
    outs = [x]
    for block, alpha in zip(model.blocks, model.stream_params.alphas):
        outs.append(block(x, parts))
        x = torch.einsum("j,j...->...", alpha.to(x.dtype), torch.stack(outs))
    return _final(model, x)


# --- Hyper-Connections (Zhu et al., arXiv:2409.19606) and mHC (Xie et al., arXiv:2512.24880) -----------

class HyperConnection(nn.Module):
    """One sublayer's connections over ``n`` streams H (n, ..., d), sublayer index ``k``.

    Static: A_m = e_{k mod n}, A_r = I_n, B = 1 (Pre-LN at init). ``dynamic``: plus
    s_a * tanh(N(H) W_a) and s_b * tanh(N(H) W_b), W = 0, s = 0.01, N a LayerNorm per stream.
    ``alpha`` is (n, 1 + n): column 0 the branch input weights A_m, columns 1.. A_r (source, target).
    """

    def __init__(self, n: int, d: int, k: int, dynamic: bool, norm: Optional[nn.Module]):
        super().__init__()
        alpha = torch.cat([F.one_hot(torch.tensor(k % n), n).float()[:, None], torch.eye(n)], dim=1)
        self.static_alpha = nn.Parameter(alpha)
        self.static_beta = nn.Parameter(torch.ones(n))
        self.dynamic = dynamic
        if dynamic:
            self.norm = norm
            self.alpha_fn = nn.Parameter(torch.zeros(d, n + 1))
            self.alpha_scale = nn.Parameter(torch.tensor(0.01))
            self.beta_fn = nn.Parameter(torch.zeros(d))
            self.beta_scale = nn.Parameter(torch.tensor(0.01))

    def weights(self, H: torch.Tensor):
        """(alpha (n, ..., 1+n), beta (n, ..., 1)) for the streams H."""
        shape = (H.shape[0],) + (1,) * (H.dim() - 2)
        alpha = self.static_alpha.view(*shape, -1)
        beta = self.static_beta.view(*shape, 1)
        if self.dynamic:
            h = self.norm(H)
            alpha = alpha + self.alpha_scale * torch.tanh(h @ self.alpha_fn)
            beta = beta + self.beta_scale * torch.tanh(h @ self.beta_fn)[..., None]
        return alpha, beta

    def residual_map(self, H: torch.Tensor) -> torch.Tensor:
        """A_r as (..., n, n) [target, source] for the streams H: H <- A_r H + B f (monitor accessor)."""
        return self.weights(H)[0][..., 1:].movedim(0, -1)

    def forward(self, H: torch.Tensor, sub, parts: Optional[list]) -> torch.Tensor:
        alpha, beta = self.weights(H)
        mix = torch.einsum("s...t,s...d->t...d", alpha.expand(*H.shape[:-1], -1), H)
        p = sub.run(mix[0])
        _record(parts, p)
        return mix[1:] + beta * p.f


#: DeepSeek's reference (deepseek-ai/TileKernels, tile_kernels/torch/mhc.py and modeling/mhc/functional.py):
#: H_pre = sigmoid(.) + MHC_PRE_EPS (also the head's mix); Sinkhorn adds MHC_SINKHORN_EPS to the softmax and
#: to every denominator
MHC_PRE_EPS = 1e-6
MHC_SINKHORN_EPS = 1e-6


def sinkhorn(logits: torch.Tensor, iters: int, eps: float = MHC_SINKHORN_EPS) -> torch.Tensor:
    """A doubly stochastic matrix from logits (..., t, s) [target, source], as DeepSeek's
    ``sinkhorn_normalize_ref`` (``repeat`` = ``iters``): softmax over the targets + eps, then the sources
    normalised (each target's row sums to 1), then ``iters - 1`` x (targets, sources); every
    denominator + eps. With eps = 0 and many iterations it converges to the same matrix as a start
    over the sources (both are diagonal rescalings of exp(logits))."""
    m = logits.softmax(dim=-2) + eps
    m = m / (m.sum(dim=-1, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
    return m


def _rms_mixes(H: torch.Tensor, phi: torch.Tensor, eps: float) -> torch.Tensor:
    """x~ phi with x~ = RMSNorm(vec H) (no gain) per token; H is (n, ..., d)."""
    flat = H.movedim(0, -2).flatten(-2)  # (..., n d), stream-major as DeepSeek's flatten(2, 3)
    return F.rms_norm(flat, (flat.shape[-1],), eps=eps) @ phi


class ManifoldHyperConnection(nn.Module):
    """mHC: x~ = RMSNorm(vec H) (no gain, eps ``model.norm_eps``), per token;
    H_pre = sigmoid(b_pre + a_pre x~ phi_pre) + 1e-6, H_post = 2 sigmoid(b_post + a_post x~ phi_post),
    H_res = Sinkhorn(b_res + a_res mat(x~ phi_res)); h = H_pre . H; H <- H_res H + H_post f.
    Init: phi = 0, a = 0.01, b_pre = e_{k mod n}, b_post = 0 (H_post = 1), b_res = I (logits)."""

    def __init__(self, n: int, d: int, k: int, iters: int, eps: float):
        super().__init__()
        self.n, self.iters, self.eps = n, iters, eps
        self.b_pre = nn.Parameter(F.one_hot(torch.tensor(k % n), n).float())
        self.b_post = nn.Parameter(torch.zeros(n))
        self.b_res = nn.Parameter(torch.eye(n))
        self.phi = nn.Parameter(torch.zeros(n * d, 2 * n + n * n))
        self.scales = nn.Parameter(torch.full((3,), 0.01))

    def weights(self, H: torch.Tensor):
        """(H_pre (..., n), H_post (..., n), H_res (..., n, n) [target, source]) per token."""
        n = self.n
        z = _rms_mixes(H, self.phi, self.eps)
        pre = torch.sigmoid(self.b_pre + self.scales[0] * z[..., :n]) + MHC_PRE_EPS
        post = 2 * torch.sigmoid(self.b_post + self.scales[1] * z[..., n:2 * n])
        res = sinkhorn(self.b_res + self.scales[2] * z[..., 2 * n:].unflatten(-1, (n, n)), self.iters)
        return pre, post, res

    def residual_map(self, H: torch.Tensor) -> torch.Tensor:
        """H_res (..., n, n) [target, source] per token (monitor accessor)."""
        return self.weights(H)[2]

    def forward(self, H: torch.Tensor, sub, parts: Optional[list]) -> torch.Tensor:
        pre, post, res = self.weights(H)
        p = sub.run(torch.einsum("...s,s...d->...d", pre, H))
        _record(parts, p)
        return torch.einsum("...ts,s...d->t...d", res, H) + post.movedim(-1, 0)[..., None] * p.f


class ManifoldHead(nn.Module):
    """mHC's read-out before the final norm (DeepSeek's ``mhc_head``): sum_s m_s H_s with
    m = sigmoid(scale x~ phi + b) + 1e-6, x~ = RMSNorm(vec H) (eps ``model.norm_eps``); its own phi (n d, n),
    scalar scale and bias b. Init phi = 0, scale 0.01, b = 0: m = 1/2 for every stream, so the final
    norm reads (up to its epsilon) what the plain sum would give."""

    def __init__(self, n: int, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.phi = nn.Parameter(torch.zeros(n * d, n))
        self.scale = nn.Parameter(torch.tensor(0.01))
        self.bias = nn.Parameter(torch.zeros(n))

    def mix(self, H: torch.Tensor) -> torch.Tensor:
        """m (..., n) per token."""
        return torch.sigmoid(self.scale * _rms_mixes(H, self.phi, self.eps) + self.bias) + MHC_PRE_EPS

    def forward(self, H: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...s,s...d->...d", self.mix(H), H)


class StreamConnections(nn.Module):
    """One connection module per sublayer, bottom to top; ``head`` reads the streams out (mHC's learned
    mix with ``model.mhc_head=mix``; else None, the plain sum)."""

    def __init__(self, shape, kind: str):
        super().__init__()
        n, d, o = shape.options.hc_streams, shape.d_model, shape.options
        self.n = n
        if kind == "mhc":
            make = lambda k: ManifoldHyperConnection(n, d, k, o.mhc_sinkhorn_iters, shape.norm_eps)  # noqa: E731
        else:
            make = lambda k: HyperConnection(n, d, k, kind == "hyper_dynamic",  # noqa: E731
                                             shape.norm() if kind == "hyper_dynamic" else None)
        self.layers = nn.ModuleList(make(k) for k in range(2 * shape.depth))
        self.head = ManifoldHead(n, d, shape.norm_eps) if kind == "mhc" and o.mhc_head == "mix" else None

    def read(self, H: torch.Tensor) -> torch.Tensor:
        """The head's input before the final norm: the head's mix, or the sum of the streams."""
        return H.sum(0) if self.head is None else self.head(H)


def hyper_stream(model, x: torch.Tensor, parts: Optional[list]) -> torch.Tensor:
    """H_0 = n copies of x0; every sublayer through its (m)HC; the head reads N_final(read(H_L))
    (the sum of the streams, or mHC's learned mix)."""
    conns = model.stream_params
    H = x.unsqueeze(0).expand(conns.n, *x.shape)
    for sub, conn in zip(model.sublayers(), conns.layers):
        H = conn(H, sub, parts)
    return _final(model, conns.read(H))


def stream_module(kind: str, shape) -> Optional[nn.Module]:
    """The learned parameters of the stream ``kind`` (None for streams without any)."""
    if kind == "value_residual":
        return ValueMix(shape.depth, shape.options.value_residual_learned)
    if kind == "dense":
        return DepthWeights(shape.depth)
    if kind in ("hyper", "hyper_dynamic", "mhc"):
        return StreamConnections(shape, kind)
    return None


STREAMS_MULTI = {"value_residual": value_residual_stream, "dense": dense_stream, "hyper": hyper_stream,
               "hyper_dynamic": hyper_stream, "mhc": hyper_stream}
