"""The sublayers of a Transformer whose residual/normalization scheme comes from a variant.

Read top to bottom: :class:`ModelShape` is what a config says about the model; :class:`Attention` and
:class:`MLP` are the branches ``F``; :class:`Sublayer` is the single place where a variant's norm
placement, branch scaling and residual are applied; :class:`Block` is two sublayers. Attention is causal
(a decoder) unless the shape says otherwise (an encoder, for ``model.objective=mlm``: the config's
:data:`resnorm.config.schema.OBJECTIVE_SHAPES`). The whole model, its streams and its construction
are in :mod:`resnorm.model.transformer`. The model knows nothing of training, logging or probes.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from resnorm.model.multistream import orthogonal_part
from resnorm.model.norms import make_norm
from resnorm.config.schema import OBJECTIVE_SHAPES
from resnorm.config.variants import SublayerSpec, VariantOptions, get_variant

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
    options: VariantOptions = field(default_factory=VariantOptions)
    qk_norm: bool = False  # normalise queries and keys (Wortsman et al. 2023)
    z_loss: float = 0.0  # c in c * mean(logsumexp(logits)^2), added to the loss; 0 = off
    qk_norm_axis: str = "head"  # head: over the head dim, shared by the heads; flat: over d_model (OLMo 2)
    qk_norm_kind: str = "layernorm"  # the qk-norm layer (QK_NORMS)
    attn_gate: bool = False  # Y * sigmoid(h W_g + b_g) before the output projection (Qiu et al. 2025)
    attn_softcap: Optional[float] = None  # attention logits -> C tanh(logits / C); None = off
    logit_softcap: Optional[float] = None  # output logits -> C tanh(logits / C); None = off
    causal: bool = True  # False for an encoder (model.objective=mlm, resnorm.train.objectives)

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        m = cfg.model
        variant = get_variant(m.norm)
        causal, extra_ids = objective_io(m)  # mlm is bidirectional and adds the mask token's id
        return cls(
            variant=m.norm, depth=int(cfg.depth), d_model=m.d_model, n_heads=m.n_heads,
            d_ff=m.d_ff or 4 * m.d_model, vocab_size=m.vocab_size + extra_ids, context=cfg.train.seq_len,
            norm_layer=m.norm_layer or variant.norm_layer, norm_eps=m.norm_eps,
            activation=m.activation, bias=m.bias, tie_weights=m.tie_weights,
            options=VariantOptions.from_config(m),
            qk_norm=bool(m.qk_norm), z_loss=float(m.z_loss), **_attention_options(m), causal=causal,
        )

    def norm(self, d: Optional[int] = None, eps: Optional[float] = None) -> nn.Module:
        """A fresh norm layer of the configured kind, of width ``d`` (default d_model), epsilon ``eps``
        (default ``model.norm_eps``)."""
        return make_norm(self.norm_layer, d or self.d_model, self.norm_eps if eps is None else eps,
                         self.options.dyt_alpha0, self.options.derf_alpha0)

    def attention(self, spec: Optional[SublayerSpec] = None) -> "Attention":
        """A fresh attention branch with the configured options (qk-norm, gate, soft-cap) and the
        spec's branch features (head scales, QKV-norm, the inner norm before W_o)."""
        spec = spec or SublayerSpec()
        attn = Attention(self.d_model, self.n_heads, self.bias, self.qk_norm, self.norm_eps,
                         qk_norm_axis=self.qk_norm_axis, qk_norm_kind=self.qk_norm_kind,
                         gate=self.attn_gate, softcap=self.attn_softcap, head_scale=spec.head_scale,
                         qkv_norms=tuple(self.norm(self.d_model // self.n_heads) for _ in range(3))
                         if spec.qkv_norm else None, inner_norm=self.norm() if spec.inner_norm else None)
        attn.causal = self.causal
        return attn

    def mlp(self, spec: Optional[SublayerSpec] = None) -> "MLP":
        """A fresh MLP branch; with the spec's ``inner_norm`` a norm of width d_ff after the activation."""
        inner = self.norm(self.d_ff) if spec is not None and spec.inner_norm else None
        return MLP(self.d_model, self.d_ff, self.activation, self.bias, inner_norm=inner)


def _attention_options(m) -> dict:
    """The model options every variant can use (docs/configuration.md); a config written before a key
    existed gets the key's default (off)."""
    get = m.get if hasattr(m, "get") else lambda k, d: getattr(m, k, d)
    cap = lambda v: None if v is None else float(v)  # noqa: E731
    return dict(qk_norm_axis=get("qk_norm_axis", "head"), qk_norm_kind=get("qk_norm_kind", "layernorm"),
                attn_gate=bool(get("attn_gate", False)), attn_softcap=cap(get("attn_softcap", None)),
                logit_softcap=cap(get("logit_softcap", None)))


def objective_io(m) -> Tuple[bool, int]:
    """(causal attention, extra token ids) of ``model.objective`` (absent in an older config: clm)."""
    name = m.get("objective", "clm") if hasattr(m, "get") else getattr(m, "objective", "clm")
    if name not in OBJECTIVE_SHAPES:
        raise KeyError(f"model.objective={name!r}: choose one of {', '.join(OBJECTIVE_SHAPES)}")
    shape = OBJECTIVE_SHAPES[name]
    return shape.causal, shape.extra_ids


def softcap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """Gemma 2's soft-cap (arXiv:2408.00118 §2): ``cap * tanh(x / cap)``; ``x`` itself when ``cap`` is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


#: the qk-norm layers (``model.qk_norm_kind``; resnorm.config.schema.QK_NORM_KINDS is the torch-free copy)
QK_NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}
QK_NORM_AXES = ("head", "flat")


class SoftcapLinear(nn.Linear):
    """The LM head with Gemma 2's final-logit soft-cap, ``cap * tanh((x W^T) / cap)``: every caller of
    ``model.head`` (forward, loss, evaluation, the probes) sees the capped logits."""

    def __init__(self, d_in: int, d_out: int, cap: float):
        super().__init__(d_in, d_out, bias=False)
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(super().forward(x), self.cap)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cap={self.cap}"


class Attention(nn.Module):
    """Causal multi-head self-attention with one fused QKV projection.

    ``qk_norm``: a norm (``qk_norm_kind``: LayerNorm or RMSNorm) of queries and keys, over the head
    dimension and shared by all heads (``qk_norm_axis="head"``, qk-layernorm, Wortsman et al. 2023),
    or over all heads flattened, one norm of size d_model on q and one on k before the split into
    heads (``"flat"``, OLMo 2). ``gate``: gated attention (Qiu et al. 2025, arXiv:2505.06708), the
    SDPA output Y (heads concatenated) times ``sigmoid(gate(h))``, elementwise, so each head's channels
    have their own gate, before the output projection; h is the branch input. ``softcap``: attention
    logits ``C * tanh(s / C)`` before the softmax (Gemma 2), computed explicitly (SDPA has no hook).
    ``head_scale``: each head's output times a learned scalar (init 1) before the output projection
    (NormFormer's HeadScale, arXiv:2110.09456). ``qkv_norms``: three norm modules applied to q, k and v,
    each over d_model before the split into heads (HybridNorm's QKV-norm, arXiv:2503.04598); not
    combined with ``qk_norm``.
    ``causal`` is an attribute, set from ``model.objective`` (False for ``mlm``, an encoder; the
    rank-collapse reproduction also sets it to False). ``key_mask``: None, or a (batch, T) bool tensor
    of the keys a query may see (False: padding), set for one batch by
    :class:`resnorm.tasks.heads.TaskModel` (fine-tuning); it joins the causal mask in forward and in the probes'
    :meth:`scores`, :meth:`max_logit` and :meth:`attention_probs`.
    """

    def __init__(self, d_model: int, n_heads: int, bias: bool, qk_norm: bool = False, eps: float = 1e-5, *,
                 qk_norm_axis: str = "head", qk_norm_kind: str = "layernorm", gate: bool = False,
                 softcap: Optional[float] = None, head_scale: bool = False,
                 qkv_norms: Optional[Tuple[nn.Module, nn.Module, nn.Module]] = None,
                 inner_norm: Optional[nn.Module] = None):
        super().__init__()
        if qk_norm_axis not in QK_NORM_AXES:
            raise ValueError(f"qk_norm_axis={qk_norm_axis!r}: choose one of {', '.join(QK_NORM_AXES)}")
        if qk_norm and qkv_norms is not None:
            raise ValueError("model.qk_norm with a variant that normalises q, k and v (hybridnorm): "
                             "the queries and keys are normalised already; drop model.qk_norm")
        self.n_heads = n_heads
        self.causal = True
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        norm_dim = d_model // n_heads if qk_norm_axis == "head" else d_model
        self.qk_norm_axis = qk_norm_axis
        self.q_norm = QK_NORMS[qk_norm_kind](norm_dim, eps=eps) if qk_norm else None
        self.k_norm = QK_NORMS[qk_norm_kind](norm_dim, eps=eps) if qk_norm else None
        self.gate = nn.Linear(d_model, d_model, bias=bias) if gate else None
        self.softcap = softcap
        self.head_scale = nn.Parameter(torch.ones(n_heads)) if head_scale else None
        self.qkv_norms = nn.ModuleList(qkv_norms) if qkv_norms is not None else None
        self.inner_norm = inner_norm  # Sub-LN: a norm on the concatenated heads, before W_o
        self.value_hook = None  # set by the value_residual stream for one call (V -> V')
        self.softmax_scale: Optional[float] = None  # nGPT's attention scale: None = 1/sqrt(d_head), SDPA's default
        self.key_mask: Optional[torch.Tensor] = None  # fine-tuning: (batch, T) keys visible; None: all

    def _qkv(self, x: torch.Tensor):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        if self.q_norm is not None and self.qk_norm_axis == "flat":
            q, k = self.q_norm(q), self.k_norm(k)
        # split then transpose: no copy of the whole QKV gradient in backward (benchmarks/speedups.py)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        if self.qkv_norms is not None:  # HybridNorm: per head, over d_head
            q, k, v = (norm(z) for norm, z in zip(self.qkv_norms, (q, k, v)))
        if self.q_norm is not None and self.qk_norm_axis == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _mask(self, s: torch.Tensor, value: float) -> torch.Tensor:
        """``s`` with ``value`` above the diagonal when ``causal`` (SDPA's ``is_causal`` mask) and at
        the keys ``key_mask`` hides."""
        if self.key_mask is not None:  # padding (fine-tuning)
            s = s.masked_fill(~self.key_mask[:, None, None, :], value)
        if not self.causal:
            return s
        t = s.shape[-1]
        return s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool, device=s.device), 1), value)

    def _visible(self, t: int) -> torch.Tensor:
        """The (batch, 1, T, T) bool mask of the pairs a query sees (``key_mask``, causal)."""
        mask = self.key_mask[:, None, None, :]
        if self.causal:
            mask = mask & torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
        return mask

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The masked pre-softmax logits ``softcap(q k^T / sqrt(d_head)) + M`` (M = -inf above the
        diagonal when ``causal``), at least in float32."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        s = self.scaled(q.to(dtype) @ k.to(dtype).transpose(-1, -2), q.shape[-1])
        return self._mask(softcap(s, self.softcap), float("-inf"))

    def scaled(self, qk: torch.Tensor, d_head: int) -> torch.Tensor:
        """q k^T / sqrt(d_head), or q k^T * ``softmax_scale`` when it is set (nGPT's sqrt(d_head))."""
        return qk / math.sqrt(d_head) if self.softmax_scale is None else qk * self.softmax_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self._qkv(x)
        if self.value_hook is not None:  # ResFormer's value residual (resnorm.model.multistream)
            v = self.value_hook(v)
        if self.softcap is None and self.key_mask is not None:  # padded batches (fine-tuning)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._visible(t), scale=self.softmax_scale)
        elif self.softcap is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.softmax_scale)
        else:
            y = self.scores(q, k).softmax(dim=-1).to(v.dtype) @ v
        if self.head_scale is not None:
            y = y * self.head_scale.view(1, -1, 1, 1).to(y.dtype)
        y = y.transpose(1, 2).reshape(b, t, d)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x))
        if self.inner_norm is not None:
            y = self.inner_norm(y)
        return self.out(y)

    def max_logit(self, x: torch.Tensor) -> torch.Tensor:
        """max |q_i . k_j| / sqrt(d_head) (or times ``softmax_scale``) over batch, heads and the (causally)
        visible pairs i, j: the raw logit, before any soft-cap (the quantity that grows; the cap bounds
        what the softmax sees)."""
        q, k, _ = self._qkv(x)
        z = self.scaled((q @ k.transpose(-1, -2)).abs(), q.shape[-1])
        return self._mask(z, 0.0).amax()

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The (batch, heads, T, T) attention probabilities of :meth:`forward`, in float32:
        softmax(softcap(q k^T / sqrt(d_head)) + M) with M = -inf above the diagonal when ``causal``
        (the mask and default scale of ``F.scaled_dot_product_attention(..., is_causal=True)``); rows
        sum to 1."""
        q, k, _ = self._qkv(x)
        return self.scores(q.float(), k.float()).softmax(dim=-1)


class MLP(nn.Module):
    """fc2(act(fc1(x))); with ``inner_norm`` fc2(N(act(fc1(x)))) (NormFormer's FFN LN, Sub-LN's)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool,
                 inner_norm: Optional[nn.Module] = None):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.inner_norm = inner_norm
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        return self.fc2(h if self.inner_norm is None else self.inner_norm(h))


class SublayerParts(NamedTuple):
    """One sublayer's internals, as :meth:`Transformer.trace` returns them (all (batch, tokens, d))."""

    x: torch.Tensor  # the residual stream entering the sublayer
    h: torch.Tensor  # the branch input (after the pre-norm and input scale)
    f: torch.Tensor  # the branch output as added to the stream (after out-norm and branch scale)
    z: torch.Tensor  # skip + branch, before the sum norm (= y when there is none)
    y: torch.Tensor  # the sublayer's output


class Sublayer(nn.Module):
    """One residual sublayer: the norm placement of every variant is applied here and nowhere else.

    See :class:`resnorm.config.variants.SublayerSpec` for the equation. ``gate`` is the learned branch
    scalar (ReZero's alpha), ``omega`` the learned per-channel skip factor (Admin's omega), ``lam``
    the learned per-channel branch scale (LayerScale's lambda); each exists only when the spec asks.
    """

    def __init__(self, branch: nn.Module, spec: SublayerSpec, shape: ModelShape):
        super().__init__()
        self.branch = branch
        self.spec = spec
        self.pre_norm = shape.norm() if spec.pre_norm else None
        self.out_norm = shape.norm() if spec.out_norm else None
        self.sum_norm = shape.norm() if spec.sum_norm else None
        self.gate = nn.Parameter(torch.empty(1)) if spec.branch_learned else None
        self.omega = nn.Parameter(torch.empty(shape.d_model)) if spec.skip_learned else None
        self.lam = nn.Parameter(torch.empty(shape.d_model)) if spec.branch_channel_learned else None
        self.grad_sink = None  # set by resnorm.monitors.forward.StreamGradProbe on its due steps
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The variant's initial values of the learned scalars (ReZero alpha, Admin omega, LayerScale
        lambda; NormFormer's head scales 1)."""
        if self.gate is not None:
            self.gate.fill_(self.spec.branch_scale)
        if self.lam is not None:
            self.lam.fill_(self.spec.branch_scale)
        if getattr(self.branch, "head_scale", None) is not None:
            self.branch.head_scale.fill_(1.0)
        if self.omega is not None:
            self.omega.fill_(self.spec.skip_scale)

    def run(self, x: torch.Tensor, bottom: Optional[torch.Tensor] = None) -> SublayerParts:
        """The sublayer's equation, keeping its intermediate values:
        h = N_pre(x) * input_scale; f = a * N_out(F(h)); z = w * x + f [+ bottom]; y = N_sum(z)."""
        s = self.spec
        if self.grad_sink is not None and x.requires_grad:  # a monitor reading dL/dx (read-only hook)
            x.register_hook(self.grad_sink)
        h = x if self.pre_norm is None else self.pre_norm(x)
        if s.input_scale != 1.0:
            h = h * s.input_scale
        f = self.branch(h)
        if self.out_norm is not None:
            f = self.out_norm(f)
        if self.gate is not None:
            f = self.gate * f
        elif self.lam is not None:
            f = self.lam * f
        elif s.branch_scale != 1.0:
            f = f * s.branch_scale
        z = self.residual_sum(x, f, bottom)
        y = z if self.sum_norm is None else self.sum_norm(z)
        return SublayerParts(x, h, f, z, y)

    def residual_sum(self, x: torch.Tensor, f: torch.Tensor, bottom: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z = w * x + f [+ bottom]: w is 1, the fixed skip factor, Admin's omega, or 0 (no residual)."""
        s = self.spec
        if s.residual == "none":
            z = f
        elif s.residual == "orthogonal":  # Oh et al., only f's part orthogonal to x is added
            z = x + orthogonal_part(f, x)
        elif self.omega is not None:
            z = self.omega * x + f
        elif s.skip_scale != 1.0:
            z = s.skip_scale * x + f
        else:
            z = x + f
        return z if bottom is None else z + bottom

    def branch_out(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled branch output f (see :meth:`run`)."""
        return self.run(x).f

    def combine(self, x: torch.Tensor, f: torch.Tensor, bottom: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The residual sum and the norm after it, for a branch output ``f`` computed before."""
        z = self.residual_sum(x, f, bottom)
        return z if self.sum_norm is None else self.sum_norm(z)

    def forward(self, x: torch.Tensor, bottom: Optional[torch.Tensor] = None,
                parts: Optional[list] = None) -> torch.Tensor:
        """``parts``: a list that receives this sublayer's :class:`SublayerParts` (Transformer.trace)."""
        p = self.run(x, bottom)
        if parts is not None:
            parts.append(p)
        return p.y


class Block(nn.Module):
    """Attention then MLP sublayer. When both specs ask for ``share_gate``, the two sublayers hold
    the same learned branch scalar."""

    def __init__(self, specs: Tuple[SublayerSpec, SublayerSpec], shape: ModelShape):
        super().__init__()
        self.attn = Sublayer(shape.attention(specs[0]), specs[0], shape)
        self.mlp = Sublayer(shape.mlp(specs[1]), specs[1], shape)
        if specs[0].share_gate and specs[1].share_gate:
            self.mlp.gate = self.attn.gate  # one learned branch scalar per layer (ReZero)

    def forward(self, x: torch.Tensor, parts: Optional[list] = None) -> torch.Tensor:
        return self.mlp(self.attn(x, parts=parts), parts=parts)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside, the caller's mode (train or eval) restored after, also when it raises."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
