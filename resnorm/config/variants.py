"""The variant registry: a residual/normalization scheme is data, not a class per paper.

For every sublayer (attention, MLP) of layer ``l`` in a model of ``L`` layers a variant says, as a
:class:`SublayerSpec`: which norm sits before the branch, after the branch and after the sum; how the
residual stream is carried (identity or none; a fixed skip factor or a learned per-channel one) and
how the branch output is scaled (fixed, or a learned scalar initialised at a value). The
:class:`Variant` adds what is not per sublayer: which norm layer it uses, whether the embedding is
normalised, whether a final norm sits before the head, how the stream is threaded through the
layers (:data:`STREAMS`), and how its branch weights are initialised (depth-dependent Xavier gains).

The forward pass that reads these records: :class:`resnorm.model.blocks.Sublayer` applies a
sublayer's spec (its branch features are read where the branch is built, ``ModelShape.attention``
and ``ModelShape.mlp``); ``Variant.stream`` picks the function of
:data:`resnorm.model.transformer.STREAMS` that :meth:`resnorm.model.transformer.Transformer.hidden`
runs, and is also read where the model is built (the stream's own parameters,
``Transformer.__init__``), by the scheme monitors and by Admin's profiling.
Variant parameters a user may change (Mix-LN's fraction, DyT's alpha0, ...) arrive as
:class:`VariantOptions`, whose fields are the ``model.*`` schema fields marked ``variant_option``
in :mod:`resnorm.config.schema` (declared there once). The full table, with each
paper's equation and the choices made where a paper is ambiguous, is in ``docs/variants.md``.

This module imports no torch, so configs can be validated before anything heavy is loaded. It is a data
table (one record per variant, with its paper) and longer than the other modules for that reason: splitting
the records by paper would scatter the one list a reader scans to compare schemes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

from resnorm.config.schema import variant_option_fields

RESIDUALS = ("identity", "none", "orthogonal")  # orthogonal: the orthogonal residual update (Oh et al.)
#: How the layers are threaded, declared once (read in resnorm.model.transformer.Transformer.hidden, nowhere
#: else; its dict ``STREAMS`` holds one function per name, in this order, and a test checks the two agree):
#: - ``single``: one residual stream, x_{i+1} = Sublayer_i(x_i);
#: - ``b2t``: as ``single``, and the MLP sublayer of every layer also adds the layer's input x_l to
#:   its sum before its last norm (Takase et al.'s bottom-to-top connection);
#: - ``dual``: ResiDual's two streams, a Post-LN stream x and an un-normalised stream y that
#:   accumulates every branch output; the head reads x_L + N_final(y_L);
#: - multi-stream and cross-layer residuals (resnorm.model.multistream): ``value_residual`` (ResFormer's
#:   V' = l1 V_1 + l2 V_n), ``dense`` (DenseFormer's depth-weighted averages), ``hyper`` /
#:   ``hyper_dynamic`` / ``mhc`` (Hyper-Connections and mHC: n streams);
#: - Attention Residuals (resnorm.model.attnres): ``attnres`` / ``attnres_block`` (softmax attention over depth);
#: - nGPT (resnorm.model.ngpt): ``ngpt``, the hypersphere stream h <- Norm(h + alpha (Norm(F(h)) - h)).
STREAMS = ("single", "b2t", "dual", "value_residual", "dense", "hyper", "hyper_dynamic", "mhc", "attnres",
           "attnres_block", "ngpt")
#: Norm layers behind resnorm.model.norms.make_norm; ``none`` marks a variant without any norm (ReZero).
NORM_LAYERS = ("layernorm", "rmsnorm", "scalenorm", "dyt", "derf")
ADMIN_MODES = ("profile", "closed_form")


@dataclass(frozen=True)
class SublayerSpec:
    """How one residual sublayer combines the stream ``x`` with its branch ``F``.

    The computation, in order (see :class:`resnorm.model.blocks.Sublayer`)::

        h = N_pre(x) if pre_norm else x
        h = h * input_scale
        f = F(h)
        f = N_out(f)                    if out_norm
        f = a * f                       a = branch_scale, or a learned scalar initialised at
                                        branch_scale if branch_learned (ReZero's alpha; one per
                                        layer, shared by its two sublayers, if share_gate)
        y = w * x + f                   if residual == "identity"; w = skip_scale, or a learned
                                        per-channel vector initialised at skip_scale if
                                        skip_learned (Admin's omega)
        y = f                           if residual == "none"
        y = y + x_bottom                only in the MLP sublayer of a ``b2t`` stream
        y = N_sum(y)                    if sum_norm

    Branch features (read by resnorm.model.blocks's Attention and MLP, and Sublayer.run):
    ``branch_channel_learned``: f = diag(lambda) f with a learned per-channel lambda initialised at
    branch_scale (LayerScale); ``head_scale``: each attention head's output times a learned scalar
    (init 1) before the output projection (NormFormer); ``qkv_norm``: a norm of the norm layer's kind
    on q, k and v, each over a head's d_head (one norm per q, k, v, shared by the heads), after the
    split into heads (HybridNorm's official code); ``inner_norm``: a
    norm inside the branch before its output projection: in the MLP of width d_ff after the activation
    (NormFormer, Sub-LN), in attention of width d_model on the concatenated heads (Sub-LN).
    """

    pre_norm: bool = False
    out_norm: bool = False
    sum_norm: bool = False
    residual: str = "identity"
    skip_scale: float = 1.0
    skip_learned: bool = False
    branch_scale: float = 1.0
    branch_learned: bool = False
    share_gate: bool = False
    input_scale: float = 1.0
    # --- branch features ---
    branch_channel_learned: bool = False
    head_scale: bool = False
    qkv_norm: bool = False
    inner_norm: bool = False
    def __post_init__(self):
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual={self.residual!r}: choose one of {', '.join(RESIDUALS)}")
        if self.skip_learned and self.residual != "identity":
            raise ValueError("skip_learned needs residual='identity' (there is no skip to scale)")
        if self.share_gate and not self.branch_learned:
            raise ValueError("share_gate needs branch_learned (there is no learned scalar to share)")
        if self.branch_channel_learned and self.branch_learned:
            raise ValueError("branch_channel_learned and branch_learned: choose one learned branch scale")

    @property
    def norms(self) -> int:
        return (int(self.pre_norm) + int(self.out_norm) + int(self.sum_norm)
                + 3 * int(self.qkv_norm) + int(self.inner_norm))


def _options_from_config(cls, model_cfg) -> "VariantOptions":
    """Read the options from a ``model`` config node (DictConfig, dataclass or dict); an absent key
    (a config written before the option existed) takes its default."""
    get = model_cfg.get if isinstance(model_cfg, dict) else lambda k, d: getattr(model_cfg, k, d)
    return cls(**{f.name: get(f.name, f.default) for f in fields(cls)})


_OPTIONS_DOC = """The variant parameters a user may set, one typed ``model.<name>`` config key each.

Its fields are the :class:`resnorm.config.schema.ModelConfig` fields marked ``variant_option``, with their
types, defaults (the papers' values) and metadata (``help``, ``range``, ...): declared there, once.
Each applies only where its variant (or norm layer) is used and is ignored elsewhere, so one sweep
can vary ``model.norm`` with the others fixed. ``VariantOptions.from_config(cfg.model)`` reads them.
"""

VariantOptions = make_dataclass(
    "VariantOptions",
    [(f.name, f.type, field(default=f.default, metadata=f.metadata)) for f in variant_option_fields()],
    frozen=True,
    namespace={"__module__": __name__, "__doc__": _OPTIONS_DOC, "from_config": classmethod(_options_from_config)},
)


DEFAULTS = VariantOptions()
SpecFn = Callable[[int, int, VariantOptions], Union[SublayerSpec, Tuple[SublayerSpec, SublayerSpec]]]
GainFn = Callable[[int, VariantOptions], float]


def _one(depth: int, opts: VariantOptions) -> float:
    return 1.0


@dataclass(frozen=True)
class Variant:
    """A named residual/normalization scheme, pinned to its paper.

    ``sublayer(layer, depth, opts)`` gives the spec of block ``layer`` (0-based) in a model of
    ``depth`` blocks: one :class:`SublayerSpec` for both sublayers, or an ``(attention, mlp)`` pair.
    ``branch_gain(depth, opts)`` multiplies the initial value and output projections and both MLP
    matrices (DeepNet's beta); ``qk_gain(depth, opts)`` the query and key projections (1 except
    b2t's optional rescaling). ``norm_layer="none"`` marks a variant with no norm at all.
    ``profiled_skip``: the learned skip factors are set by Admin's profiling pass
    (:mod:`resnorm.model.admin`) when ``model.admin_mode=profile``; the spec's value is the closed form.
    """

    name: str
    title: str
    citation: str
    equation: str
    sublayer: SpecFn
    init: str = "Xavier-normal, N(0,1) token embeddings"
    norm_layer: str = "layernorm"
    final_norm: bool = True
    embed_norm: bool = False
    stream: str = "single"
    branch_gain: GainFn = field(default=_one)
    qk_gain: GainFn = field(default=_one)
    profiled_skip: bool = False
    # --- a variant's optimizer rules, read by resnorm.train.variant_optim ---
    #: (optim key, value) pairs the variant trains with (nGPT: no warm-up, no weight decay); they replace
    #: the schema defaults, and a different explicit value is an error (config RULE variant_optim_preset)
    optim_preset: Tuple[Tuple[str, object], ...] = ()
    #: (depth, opts) -> {"hidden": (lr factor, eps factor), "other": (...)}: AdamW's per-group LR and
    #: epsilon multipliers ("hidden": the blocks' parameters; "other": embeddings, final norm, head); None: 1
    param_group_scales: Optional[Callable[[int, VariantOptions], Dict[str, Tuple[float, float]]]] = None
    #: the name of a hook in resnorm.train.variant_optim.POST_STEP run after every optimizer step (nGPT's renormalisation)
    post_step: Optional[str] = None
    #: opts -> the final norm's epsilon where the variant's authors fix it apart from ``model.norm_eps``
    #: (ResiDual's dual-stream norm: ``model.resi_dual_eps``, 1e-7 in microsoft/ResiDual); None: norm_eps
    final_norm_eps: Optional[Callable[[VariantOptions], float]] = None

    def __post_init__(self):
        if self.stream not in STREAMS:
            raise ValueError(f"{self.name}: stream={self.stream!r}: choose one of {', '.join(STREAMS)}")
        if self.norm_layer not in NORM_LAYERS + ("none",):
            raise ValueError(f"{self.name}: norm_layer={self.norm_layer!r}")
        if self.stream == "dual" and not self.final_norm:
            raise ValueError(f"{self.name}: the dual stream is read through the final norm")

    @property
    def has_norm(self) -> bool:
        return self.norm_layer != "none"

    def layer_specs(self, depth: int, opts: VariantOptions = DEFAULTS) -> List[Tuple[SublayerSpec, SublayerSpec]]:
        """``(attention spec, MLP spec)`` of every block, bottom to top."""
        out = []
        for layer in range(depth):
            spec = self.sublayer(layer, depth, opts)
            out.append((spec, spec) if isinstance(spec, SublayerSpec) else tuple(spec))
        return out


VARIANTS: Dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    if variant.name in VARIANTS:
        raise ValueError(f"variant {variant.name!r} is registered twice")
    if variant.has_norm is False:
        specs = variant.layer_specs(3)
        if variant.final_norm or variant.embed_norm or any(s.norms for pair in specs for s in pair):
            raise ValueError(f"variant {variant.name!r} has norm_layer='none' but places a norm")
    VARIANTS[variant.name] = variant
    return variant


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"model.norm={name!r}: unknown variant; choose one of {', '.join(VARIANTS)}") from None


# --- DeepNet constants (Wang et al. 2022, arXiv 2203.00555, Sec. 4 table / docs/papers.md §2) -----------

@dataclass(frozen=True)
class DeepNormConstants:
    """(alpha, beta) of each stack; ``None`` for a stack the model does not have."""

    encoder: Optional[Tuple[float, float]]
    decoder: Optional[Tuple[float, float]]


def deepnorm_constants(encoder_layers: int = 0, decoder_layers: int = 0) -> DeepNormConstants:
    """DeepNet's alpha (skip factor) and beta (Xavier gain) for a model with these stacks.

    The architecture is read from the layer counts, never from a separate flag:

    - encoder-only (N, 0):      alpha = (2N)^(1/4),            beta = (8N)^(-1/4)
    - decoder-only (0, M):      alpha = (2M)^(1/4),            beta = (8M)^(-1/4)
    - encoder-decoder (N, M):   encoder alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16);
                                decoder alpha = (3M)^(1/4),    beta = (12M)^(-1/4)

    The enc-dec encoder beta follows the paper (0.87). torchscale's code divides the weights by
    ``(N^4 M)^(1/16) / 1.15``, i.e. beta = 1.15 (N^4 M)^(-1/16), which does not match (docs/papers.md §2).
    """
    n, m = int(encoder_layers), int(decoder_layers)
    if n < 0 or m < 0 or n + m == 0:
        raise ValueError(f"deepnorm_constants: need a positive number of layers (got N={n}, M={m})")
    if n and m:
        return DeepNormConstants(encoder=(0.81 * (n ** 4 * m) ** (1 / 16), 0.87 * (n ** 4 * m) ** (-1 / 16)),
                                 decoder=((3.0 * m) ** 0.25, (12.0 * m) ** -0.25))
    if n:
        return DeepNormConstants(encoder=((2.0 * n) ** 0.25, (8.0 * n) ** -0.25), decoder=None)
    return DeepNormConstants(encoder=None, decoder=((2.0 * m) ** 0.25, (8.0 * m) ** -0.25))


def deepnorm_stack(depth: int, opts: VariantOptions = DEFAULTS) -> Tuple[float, float]:
    """(alpha, beta) of resnorm's model of ``depth`` layers: the encoder-only row of DeepNet's table
    when it is an encoder (``model.objective=mlm``), else the decoder-only row (the
    two rows have the same formulas, (2N)^(1/4) and (8N)^(-1/4))."""
    if getattr(opts, "objective", "clm") == "mlm":
        return deepnorm_constants(encoder_layers=depth).encoder
    return deepnorm_constants(decoder_layers=depth).decoder


def deepnorm_alpha(depth: int) -> float:
    """Skip factor alpha of resnorm's model (decoder-only, ``depth`` layers): (2M)^(1/4)."""
    return deepnorm_constants(decoder_layers=depth).decoder[0]


def deepnorm_beta(depth: int) -> float:
    """Branch-weight Xavier gain beta of resnorm's model (decoder-only, ``depth`` layers): (8M)^(-1/4)."""
    return deepnorm_constants(decoder_layers=depth).decoder[1]


# --- other constants --------------------------------------------------------------------------------

def admin_omega_closed_form(index: int) -> float:
    """Admin's omega of sublayer ``index`` (1-based, attention and MLP counted separately) when every
    branch output and the embedding have unit variance: omega_1 = 1, omega_{i+1}^2 = omega_i^2 + 1,
    i.e. omega_i = sqrt(i) (docs/papers.md §3, from Var(omega_i x_i) = omega_i^2 after a LayerNorm)."""
    return math.sqrt(index)


def mixln_post_layers(depth: int, fraction: float) -> int:
    """Number of Post-LN layers of Mix-LN: floor(fraction * L) (1e-9 guards float round-off)."""
    return int(math.floor(fraction * depth + 1e-9))


def lns_scale(layer: int) -> float:
    """LayerNorm Scaling's factor for 0-based ``layer``: 1/sqrt(l) with l = layer + 1."""
    return 1.0 / math.sqrt(layer + 1)


# --- the variants ---------------------------------------------------------------------------------

POST = SublayerSpec(sum_norm=True)
PRE = SublayerSpec(pre_norm=True)

register(Variant(
    name="post",
    title="Post-LN (Vaswani et al. 2017, Attention Is All You Need; Xiong et al. 2020, On Layer "
          "Normalization in the Transformer Architecture)",
    citation="arXiv:1706.03762; arXiv:2002.04745",
    equation="x <- LN(x + F(x)); no final norm",
    sublayer=lambda layer, depth, opts: POST,
    final_norm=False,
))

register(Variant(
    name="pre",
    title="Pre-LN (Xiong et al. 2020, On Layer Normalization in the Transformer Architecture)",
    citation="arXiv:2002.04745",
    equation="x <- x + F(LN(x)); final LN before the head",
    sublayer=lambda layer, depth, opts: PRE,
))

register(Variant(
    name="rmsnorm",
    title="Pre-RMSNorm (Zhang & Sennrich 2019, Root Mean Square Layer Normalization)",
    citation="arXiv:1910.07467",
    equation="x <- x + F(RMSNorm(x)), RMSNorm(x) = g * x / sqrt(mean(x^2) + eps); final RMSNorm",
    sublayer=lambda layer, depth, opts: PRE,
    init="Xavier-normal; g = 1",
    norm_layer="rmsnorm",
))

register(Variant(
    name="deepnorm",
    title="DeepNorm (Wang et al. 2022, DeepNet: Scaling Transformers to 1,000 Layers)",
    citation="arXiv:2203.00555",
    equation="x <- LN(alpha * x + F(x)), alpha = (2L)^(1/4) (decoder-only, and encoder-only for "
             "model.objective=mlm); no final norm",
    sublayer=lambda layer, depth, opts: SublayerSpec(sum_norm=True, skip_scale=deepnorm_stack(depth, opts)[0]),
    init="Xavier-normal; v, out, fc1, fc2 gain beta = (8L)^(-1/4), q, k gain 1",
    final_norm=False,
    branch_gain=lambda depth, opts: deepnorm_stack(depth, opts)[1],
))

register(Variant(
    name="noresidual",
    title="No residual: the Pre-LN block with the skip removed (isolates the residual's effect)",
    citation="arXiv:2103.03404 (Dong et al. 2021, on what the skip prevents)",
    equation="x <- F(LN(x)); final LN before the head",
    sublayer=lambda layer, depth, opts: SublayerSpec(pre_norm=True, residual="none"),
))

register(Variant(
    name="sandwich",
    title="Sandwich-LN (Ding et al. 2021, CogView: Mastering Text-to-Image Generation via Transformers)",
    citation="arXiv:2105.13290",
    equation="x <- x + LN(F(LN(x))); final LN",
    sublayer=lambda layer, depth, opts: SublayerSpec(pre_norm=True, out_norm=True),
))

register(Variant(
    name="peri",
    title="Peri-LN (Kim et al. 2025, Peri-LN: Revisiting Normalization Layer in the Transformer "
          "Architecture)",
    citation="arXiv:2502.02732",
    equation="x_0 <- LN(embed); x <- x + LN(F(LN(x))) (learnable output-norm gain); final LN",
    sublayer=lambda layer, depth, opts: SublayerSpec(pre_norm=True, out_norm=True),
    embed_norm=True,
))

register(Variant(
    name="rezero",
    title="ReZero (Bachlechner et al. 2020, ReZero is All You Need: Fast Convergence at Large Depth)",
    citation="arXiv:2003.04887",
    equation="x <- x + alpha_l * F(x), one learned scalar alpha_l per layer (its attention and MLP "
             "share it, as in the official code); no norm anywhere",
    sublayer=lambda layer, depth, opts: SublayerSpec(branch_scale=0.0, branch_learned=True, share_gate=True),
    init="Xavier-normal; alpha = 0 (the network is the identity at init)",
    norm_layer="none",
    final_norm=False,
))

register(Variant(
    name="admin",
    title="Admin (Liu et al. 2020, Understanding the Difficulty of Training Transformers)",
    citation="arXiv:2004.08249",
    equation="x <- LN(omega * x + F(x)), omega a learned per-channel vector per sublayer; no final norm",
    sublayer=lambda layer, depth, opts: (
        SublayerSpec(sum_norm=True, skip_learned=True, skip_scale=admin_omega_closed_form(2 * layer + 1)),
        SublayerSpec(sum_norm=True, skip_learned=True, skip_scale=admin_omega_closed_form(2 * layer + 2))),
    init="Xavier-normal; omega_1 = 1, omega_{i+1}^2 = Var(omega_i x_i) + Var(F_i(x_i)) on one batch "
         "(admin_mode=profile), or omega_i = sqrt(i) (admin_mode=closed_form)",
    final_norm=False,
    profiled_skip=True,
))

register(Variant(
    name="dyt",
    title="DyT (Zhu et al. 2025, Transformers without Normalization)",
    citation="arXiv:2503.10622",
    equation="x <- x + F(DyT(x)), DyT(x) = gamma * tanh(alpha * x) + beta; final DyT",
    sublayer=lambda layer, depth, opts: PRE,
    init="Xavier-normal; alpha = alpha0 (model.dyt_alpha0, 0.5), gamma = 1, beta = 0",
    norm_layer="dyt",
))

register(Variant(
    name="scalenorm",
    title="Pre-ScaleNorm (Nguyen & Salazar 2019, Transformers without Tears: Improving the "
          "Normalization of Self-Attention)",
    citation="arXiv:1910.05895",
    equation="x <- x + F(g * x / max(||x||, eps)), one scalar g per norm; final ScaleNorm",
    sublayer=lambda layer, depth, opts: PRE,
    init="Xavier-normal; g = sqrt(d)",
    norm_layer="scalenorm",
))

register(Variant(
    name="lns",
    title="LayerNorm Scaling (Sun et al. 2025, The Curse of Depth in Large Language Models)",
    citation="arXiv:2502.05795",
    equation="x <- x + F(LN(x) / sqrt(l)), l = 1..L the layer (same for attention and MLP); final LN",
    sublayer=lambda layer, depth, opts: SublayerSpec(pre_norm=True, input_scale=lns_scale(layer)),
))

register(Variant(
    name="mixln",
    title="Mix-LN (Li, Yin & Liu 2024, Mix-LN: Unleashing the Power of Deeper Layers by Combining "
          "Pre-LN and Post-LN)",
    citation="arXiv:2412.13795",
    equation="layers l <= floor(f * L): x <- LN(x + F(x)); later layers: x <- x + F(LN(x)); "
             "f = model.mixln_fraction (0.25); final LN",
    sublayer=lambda layer, depth, opts: POST if layer < mixln_post_layers(depth, opts.mixln_fraction) else PRE,
))

register(Variant(
    name="b2t",
    title="B2T connection (Takase, Kiyono, Kobayashi & Suzuki 2022, On Layer Normalizations and "
          "Residual Connections in Transformers)",
    citation="arXiv:2206.00330",
    equation="h = LN(x + Attn(x)); x <- LN(h + FFN(h) + x); no final norm",
    sublayer=lambda layer, depth, opts: POST,
    init="Xavier-normal; with model.b2t_rescale_init=true every block weight x L^(-1/2) (official code)",
    final_norm=False,
    stream="b2t",
    branch_gain=lambda depth, opts: depth ** -0.5 if opts.b2t_rescale_init else 1.0,
    qk_gain=lambda depth, opts: depth ** -0.5 if opts.b2t_rescale_init else 1.0,
))

register(Variant(
    name="resi_dual",
    title="ResiDual (Xie et al. 2023, ResiDual: Transformer with Dual Residual Connections)",
    citation="arXiv:2304.14802",
    equation="x <- LN(x + F(x)) and y <- y + s * F(x) per sublayer, y_0 = s * x_0; "
             "head reads x_L + LN_eps'(y_L); s = model.resi_dual_scale (1), eps' = model.resi_dual_eps (1e-7, "
             "the authors' code)",
    sublayer=lambda layer, depth, opts: POST,
    stream="dual",
    final_norm_eps=lambda opts: opts.resi_dual_eps,
))

register(Variant(
    name="depth_scaled",
    title="Depth-scaled residual branches (Yang, Yu, Zhu & Hayou 2023, Tensor Programs VI: Feature "
          "Learning in Infinite-Depth Neural Networks; Bordelon et al. 2023, Depthwise Hyperparameter "
          "Transfer in Residual Networks)",
    citation="arXiv:2310.02244; arXiv:2309.16620",
    equation="x <- x + (a / sqrt(L)) * F(LN(x)), a = model.depth_scale_a (1); final LN",
    sublayer=lambda layer, depth, opts: SublayerSpec(pre_norm=True, branch_scale=opts.depth_scale_a / math.sqrt(depth)),
))


# --- norm placements used at scale: reordered, layerscale, keel, normformer, hybridnorm ---
# Equations, inits and the choices where a paper is ambiguous: docs/variants.md; tests:
# tests/test_schemes_norm.py (float64 references, init, peers).

def layerscale_init(depth: int) -> float:
    """LayerScale's initial lambda (Touvron et al., arXiv:2103.17239 §2): 0.1 up to depth 18, 1e-5 up
    to depth 24 (the paper says "for depth 24"; 19-23 take 1e-5 here), 1e-6 deeper. Depth counts blocks."""
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


def keel_alpha(depth: int) -> float:
    """Keel's skip factor alpha = L, the number of sublayers: 2 per block (arXiv:2601.19895)."""
    return 2.0 * depth


def _hybridnorm(layer: int, depth: int, opts: VariantOptions) -> Tuple[SublayerSpec, SublayerSpec]:
    """HybridNorm, as the paper's equations and its official code (BryceZhuo/HybridNorm, OLMo's block
    with ``attn_norm: false, ffn_norm: true, ffn_residual_after_norm: true`` and per-head q, k, v norms)
    write it: ``y = x + Attn_QKV-norm(x)``; ``x' = LN(y) + FFN(LN(y))``, i.e. the norm closes the attention
    sublayer's sum and the FFN adds to the normalised value; a final norm. HybridNorm*
    (``hybridnorm_star``; the code's ``{0: {attn_norm: True, ffn_residual: False}}``): the first block
    is Pre-Norm in both sublayers, QKV-norm kept."""
    if layer == 0 and opts.hybridnorm_star:
        return SublayerSpec(pre_norm=True, qkv_norm=True), PRE
    return SublayerSpec(sum_norm=True, qkv_norm=True), SublayerSpec()


register(Variant(
    name="reordered",
    title="Reordered norm (Team OLMo 2025, 2 OLMo 2 Furious)",
    citation="arXiv:2501.00656",
    equation="x <- x + RMSNorm(F(x)) (no input norm); final RMSNorm; meant with "
             "model.qk_norm=true model.qk_norm_axis=flat model.qk_norm_kind=rmsnorm",
    sublayer=lambda layer, depth, opts: SublayerSpec(out_norm=True),
    init="Xavier-normal (model.init); RMSNorm gains 1",
    norm_layer="rmsnorm",
))

register(Variant(
    name="layerscale",
    title="LayerScale (Touvron et al. 2021, Going deeper with Image Transformers (CaiT))",
    citation="arXiv:2103.17239",
    equation="x <- x + diag(lambda) F(LN(x)), a learned per-channel lambda per sublayer; final LN",
    sublayer=lambda layer, depth, opts: SublayerSpec(pre_norm=True, branch_scale=layerscale_init(depth),
                                                     branch_channel_learned=True),
    init="Xavier-normal; lambda = 0.1 (L <= 18), 1e-5 (L <= 24), 1e-6 (deeper)",
))

register(Variant(
    name="keel",
    title="Keel (Chen & Wei 2026, Post-LayerNorm Is Back: Stable, ExpressivE, and Deep)",
    citation="arXiv:2601.19895",
    equation="x <- LN(alpha * x + F(LN(x))), alpha = 2L (the number of sublayers); no final norm",
    sublayer=lambda layer, depth, opts: SublayerSpec(pre_norm=True, sum_norm=True, skip_scale=keel_alpha(depth)),
    init="Xavier-normal (no special init, as the paper)",
    final_norm=False,
))

register(Variant(
    name="normformer",
    title="NormFormer (Shleifer, Weston & Ott 2021, NormFormer: Improved Transformer Pretraining with "
          "Extra Normalization)",
    citation="arXiv:2110.09456",
    equation="x <- x + LN(W_o HeadScale(MHA(LN(x)))); x <- x + W_2 LN(GELU(W_1 LN(x))); final LN",
    sublayer=lambda layer, depth, opts: (SublayerSpec(pre_norm=True, out_norm=True, head_scale=True),
                                         SublayerSpec(pre_norm=True, inner_norm=True)),
    init="Xavier-normal; head scales gamma_h = 1; LN gains 1",
))

register(Variant(
    name="hybridnorm",
    title="HybridNorm (Zhuo et al. 2025, HybridNorm: Towards Stable and Efficient Transformer Training via "
          "Hybrid Normalization)",
    citation="arXiv:2503.04598",
    equation="x <- LN(x + W_o MHA(LN(q), LN(k), LN(v))) with q, k, v = x W_q, x W_k, x W_v normalised per "
             "head; x <- x + FFN(x); final LN; model.hybridnorm_star: block 1 Pre-LN in both sublayers "
             "(QKV-norm kept)",
    sublayer=_hybridnorm,
    init="Xavier-normal (model.init; the paper recommends Megatron-style init, model.init=gpt2 is close)",
))


def magneto_gain(depth: int, opts: VariantOptions) -> float:
    """Magneto's init gain sqrt(log 2N) (Wang et al., arXiv:2210.06423; torchscale's ``subln`` init for an
    encoder-only or decoder-only stack of N layers), on v, out, fc1 and fc2."""
    return math.sqrt(math.log(2.0 * depth))


register(Variant(
    name="subln",
    title="Sub-LN (Wang et al. 2022, Foundation Transformers (Magneto))",
    citation="arXiv:2210.06423",
    equation="x <- x + W_o LN(MHA(LN(x))) (LN on the concatenated heads); x <- x + W_2 LN(GELU(W_1 LN(x))); "
             "final LN",
    sublayer=lambda layer, depth, opts: SublayerSpec(pre_norm=True, inner_norm=True),
    init="Xavier-normal; v, out, fc1, fc2 gain sqrt(log(2L)) (torchscale's subln=True); LN gains 1",
    branch_gain=magneto_gain,
))

# --- nGPT, CompleteP, Derf ---
# Equations, inits and the choices where a paper is ambiguous: docs/variants.md; tests:
# tests/test_schemes_ngpt.py (float64 references, init, renormalisation, peers).


def completep_multiplier(depth: int, opts: VariantOptions) -> float:
    """CompleteP's branch multiplier (L / L_base)^(-alpha) (Dey et al., arXiv:2505.01618; reference code
    EleutherAI/nanoGPT-mup@completep: ``residual_scaling = depth_multiplier ** -depth_alpha_exp``)."""
    return (depth / opts.completep_base_depth) ** -opts.completep_alpha


def completep_group_scales(depth: int, opts: VariantOptions) -> Dict[str, Tuple[float, float]]:
    """CompleteP's AdamW rules at width multiplier 1 (the reference code's ``configure_optimizers``):
    the blocks' weights, biases and norm parameters take LR x m^(alpha - 1), m = L / L_base; the
    embeddings, final norm and head keep the base LR; epsilon x m^(-alpha) in every group."""
    m, a = depth / opts.completep_base_depth, opts.completep_alpha
    return {"hidden": (m ** (a - 1.0), m ** -a), "other": (1.0, m ** -a)}


register(Variant(
    name="ngpt",
    title="nGPT (Loshchilov, Hsieh, Sun & Ginsburg 2024, nGPT: Normalized Transformer with Representation "
          "Learning on the Hypersphere)",
    citation="arXiv:2410.01131",
    equation="h <- Norm(h + |alpha_A| (Norm(Attn(h)) - h)); h <- Norm(h + |alpha_M| (Norm(MLP(h)) - h)); "
             "Norm(x) = x/||x||; q, k L2-normed per head times s_qk, softmax scale sqrt(d_head); SwiGLU "
             "with s_u, s_v sqrt(d); logits s_z E h; every matrix renormalised after each step; no norm layers",
    sublayer=lambda layer, depth, opts: SublayerSpec(),
    init="Xavier-normal, then every matrix unit-norm along d_model; alpha = model.ngpt_alpha_init (0.05) "
         "stored at 1/sqrt(d); s_qk, s_z = 1 stored at 1/sqrt(d); s_u, s_v = 1; trains with no warm-up, "
         "no weight decay",
    norm_layer="none",
    final_norm=False,
    stream="ngpt",
    optim_preset=(("warmup_steps", 0), ("weight_decay", 0.0)),
    post_step="ngpt_renormalise",
))

register(Variant(
    name="completep",
    title="CompleteP (Dey et al. 2025, Don't be lazy: CompleteP enables compute-efficient deep transformers)",
    citation="arXiv:2505.01618",
    equation="x <- x + (L/L_base)^(-alpha) F(LN(x)), alpha = model.completep_alpha (1), L_base = "
             "model.completep_base_depth (1); AdamW: the blocks' LR x (L/L_base)^(alpha-1), eps x (L/L_base)^(-alpha); "
             "final LN",
    sublayer=lambda layer, depth, opts: SublayerSpec(pre_norm=True, branch_scale=completep_multiplier(depth, opts)),
    init="Xavier-normal (model.init), as Pre-LN",
    param_group_scales=completep_group_scales,
))

register(Variant(
    name="derf",
    title="Derf (Chen, Lu, Zhu, Sun & Liu 2025, Stronger Normalization-Free Transformers)",
    citation="arXiv:2512.10938",
    equation="x <- x + F(Derf(x)), Derf(x) = gamma * erf(alpha * x + s) + beta; final Derf",
    sublayer=lambda layer, depth, opts: PRE,
    init="Xavier-normal; alpha = model.derf_alpha0 (0.5), s = 0, gamma = 1, beta = 0",
    norm_layer="derf",
))
# --- multi-stream and cross-layer schemes: value residual, orthogonal update, DenseFormer, Hyper-Connections, mHC ---

register(Variant(
    name="value_residual",
    title="ResFormer (Zhou, Wu, Jiang, Obeid & Lan 2024, Value Residual Learning)",
    citation="arXiv:2410.17897",
    equation="Pre-LN, and in every attention layer n >= 2 the values V_n <- lambda1 V_1 + lambda2 V_n "
             "(V_1: layer 1's values); lambda = 0.5, fixed or learned (model.value_residual_learned)",
    sublayer=lambda layer, depth, opts: PRE,
    init="Xavier-normal; lambda1 = lambda2 = 0.5",
    stream="value_residual",
))

register(Variant(
    name="orthogonal",
    title="Orthogonal residual update (Oh et al. 2025, Revisiting Residual Connections: Orthogonal "
          "Updates for Stable and Efficient Deep Networks)",
    citation="arXiv:2505.11881",
    equation="x <- x + f - (<f, x> / (<x, x> + eps)) x per token, f = F(LN(x)), eps = 1e-6; final LN",
    sublayer=lambda layer, depth, opts: SublayerSpec(pre_norm=True, residual="orthogonal"),
))

register(Variant(
    name="denseformer",
    title="DenseFormer (Pagliardini, Mohtashami, Fleuret & Jaggi 2024, DenseFormer: Enhancing "
          "Information Flow in Transformers via Depth Weighted Averaging)",
    citation="arXiv:2402.02622",
    equation="X_i = Block_i(Y_{i-1}) (Pre-LN), Y_i = sum_{j=0..i} alpha_ij X_j, X_0 = embedding; final LN",
    sublayer=lambda layer, depth, opts: PRE,
    init="Xavier-normal; alpha_ii = 1, alpha_ij = 0 (j < i): a Pre-LN model at init",
    stream="dense",
))

register(Variant(
    name="hyper",
    title="Static Hyper-Connections (Zhu et al. 2024, Hyper-Connections)",
    citation="arXiv:2409.19606",
    equation="n = model.hc_streams copies of x0; per sublayer h = A_m^T H, H <- A_r^T H + B^T F(LN(h)); "
             "head reads LN(sum of streams)",
    sublayer=lambda layer, depth, opts: PRE,
    init="Xavier-normal; A_m = e_(k mod n), A_r = I, B = 1: Pre-LN at init",
    stream="hyper",
))

register(Variant(
    name="hyper_dynamic",
    title="Dynamic Hyper-Connections (Zhu et al. 2024, Hyper-Connections)",
    citation="arXiv:2409.19606",
    equation="as hyper, with A = A_static + s_a tanh(LN(H) W_a), B = B_static + s_b tanh(LN(H) W_b)",
    sublayer=lambda layer, depth, opts: PRE,
    init="as hyper; W = 0, s = 0.01: Pre-LN at init",
    stream="hyper_dynamic",
))

register(Variant(
    name="mhc",
    title="mHC (Xie et al. 2025, mHC: Manifold-Constrained Hyper-Connections)",
    citation="arXiv:2512.24880",
    equation="H <- H_res H + H_post^T F(LN(H_pre H)); H_pre = sigmoid(.), H_post = 2 sigmoid(.), H_res = "
             "Sinkhorn(.) doubly stochastic (model.mhc_sinkhorn_iters), each from RMSNorm(vec H)",
    sublayer=lambda layer, depth, opts: PRE,
    init="Xavier-normal; phi = 0, alpha = 0.01, b_pre = e_(k mod n), b_post = 0, b_res = I (logits)",
    stream="mhc",
))
# --- Attention Residuals, full and block (resnorm.model.attnres) ---

ATTNRES_SPEC = SublayerSpec(pre_norm=True, residual="none")  # v_l = F(LN(h_l)); the stream holds the skips

register(Variant(
    name="attnres",
    title="Attention Residuals (Kimi Team 2026, Attention Residuals)",
    citation="arXiv:2603.15031",
    equation="per sublayer l: h_l = sum_{i<l} alpha_{i->l} v_i, alpha_{i->l} = softmax_i(w_l^T RMSNorm(v_i)), "
             "v_0 = embedding, v_i = F_i(LN(h_i)); head reads LN(sum_i alpha_{i->2L} v_i)",
    sublayer=lambda layer, depth, opts: ATTNRES_SPEC,
    init="Xavier-normal; pseudo-queries w_l = 0: uniform weights 1/l at init",
    stream="attnres",
))

register(Variant(
    name="attnres_block",
    title="Block Attention Residuals (Kimi Team 2026, Attention Residuals)",
    citation="arXiv:2603.15031",
    equation="as attnres over the sources v_0, the block sums b_n = sum of the F_i(LN(h_i)) of block n "
             "(model.attnres_block_size layers; null: ceil(depth / 8)) and the current block's partial sum",
    sublayer=lambda layer, depth, opts: ATTNRES_SPEC,
    init="Xavier-normal; pseudo-queries w_l = 0: uniform weights over the sources at init",
    stream="attnres_block",
))
def variant_table() -> List[dict]:
    """One row per registered variant (name, equation, init, paper), for the README and ``--help``."""
    return [dict(name=v.name, equation=v.equation, init=v.init, title=v.title, citation=v.citation)
            for v in VARIANTS.values()]


__all__ = ["SublayerSpec", "Variant", "VariantOptions", "VARIANTS", "STREAMS", "NORM_LAYERS", "ADMIN_MODES",
           "register", "get_variant", "deepnorm_constants", "deepnorm_alpha", "deepnorm_beta", "deepnorm_stack",
           "admin_omega_closed_form", "mixln_post_layers", "lns_scale", "variant_table",
           "layerscale_init", "keel_alpha", "magneto_gain", "completep_multiplier", "completep_group_scales"]
