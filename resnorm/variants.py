"""The variant registry: a residual/normalization scheme is data, not a class per paper.

For every sublayer (attention, MLP) of layer ``l`` in a model of ``L`` layers a variant says, as a
:class:`SublayerSpec`: which norm sits before the branch, after the branch and after the sum; how the
residual stream is carried (identity or none, with a fixed skip factor) and how the branch output is
scaled. It also says which norm layer it uses, whether a final norm sits before the head, and how
its branch weights are initialised (a depth-dependent Xavier gain).

The forward pass that reads these records lives in one place: :class:`resnorm.model.Sublayer`.
This module imports no torch, so configs can be validated before anything heavy is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List

RESIDUALS = ("identity", "none")


@dataclass(frozen=True)
class SublayerSpec:
    """How one residual sublayer combines the stream ``x`` with its branch ``F``.

    The computation, in order (see :class:`resnorm.model.Sublayer`)::

        h = N_pre(x) * input_scale      if pre_norm      else x
        f = F(h)
        f = N_out(f)                    if out_norm
        f = f * branch_scale
        y = skip_scale * x + f          if residual == "identity"
        y = f                           if residual == "none"
        y = N_sum(y)                    if sum_norm
    """

    pre_norm: bool = False
    out_norm: bool = False
    sum_norm: bool = False
    residual: str = "identity"
    skip_scale: float = 1.0
    branch_scale: float = 1.0
    input_scale: float = 1.0

    def __post_init__(self):
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual={self.residual!r}: choose one of {', '.join(RESIDUALS)}")


@dataclass(frozen=True)
class Variant:
    """A named residual/normalization scheme, pinned to its paper.

    ``sublayer(layer, depth)`` gives the :class:`SublayerSpec` of both sublayers of block ``layer``
    (0-based) in a model of ``depth`` blocks. ``branch_gain(depth)`` multiplies the Xavier gain of
    the branch weights that carry the signal (attention value and output projections, both MLP
    matrices); query and key projections keep gain 1, as in DeepNet's pseudo-code.
    """

    name: str
    title: str
    citation: str
    equation: str
    sublayer: Callable[[int, int], SublayerSpec]
    norm_layer: str = "layernorm"
    final_norm: bool = True
    branch_gain: Callable[[int], float] = field(default=lambda depth: 1.0)

    def specs(self, depth: int) -> List[SublayerSpec]:
        return [self.sublayer(layer, depth) for layer in range(depth)]


VARIANTS: Dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    if variant.name in VARIANTS:
        raise ValueError(f"variant {variant.name!r} is registered twice")
    VARIANTS[variant.name] = variant
    return variant


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"model.norm={name!r}: unknown variant; choose one of {', '.join(VARIANTS)}") from None


# --- DeepNet constants (Wang et al. 2022, arXiv 2203.00555, Table in Sec. 4 / PAPERS.md §2) -------

def deepnorm_alpha(depth: int) -> float:
    """Skip factor alpha for a decoder-only model of ``depth`` layers: (2N)^(1/4)."""
    return (2.0 * depth) ** 0.25


def deepnorm_beta(depth: int) -> float:
    """Branch-weight Xavier gain beta for a decoder-only model of ``depth`` layers: (8N)^(-1/4)."""
    return (8.0 * depth) ** -0.25


# --- the five variants the users named first -------------------------------------------------------

register(Variant(
    name="post",
    title="Post-LN (Vaswani et al. 2017, Attention Is All You Need; Xiong et al. 2020, On Layer "
          "Normalization in the Transformer Architecture)",
    citation="arXiv:1706.03762; arXiv:2002.04745",
    equation="x <- LN(x + F(x)); no final norm",
    sublayer=lambda layer, depth: SublayerSpec(sum_norm=True),
    final_norm=False,
))

register(Variant(
    name="pre",
    title="Pre-LN (Xiong et al. 2020, On Layer Normalization in the Transformer Architecture)",
    citation="arXiv:2002.04745",
    equation="x <- x + F(LN(x)); final LN before the head",
    sublayer=lambda layer, depth: SublayerSpec(pre_norm=True),
))

register(Variant(
    name="rmsnorm",
    title="Pre-RMSNorm (Zhang & Sennrich 2019, Root Mean Square Layer Normalization)",
    citation="arXiv:1910.07467",
    equation="x <- x + F(RMSNorm(x)), RMSNorm(x) = g * x / sqrt(mean(x^2) + eps); final RMSNorm",
    sublayer=lambda layer, depth: SublayerSpec(pre_norm=True),
    norm_layer="rmsnorm",
))

register(Variant(
    name="deepnorm",
    title="DeepNorm (Wang et al. 2022, DeepNet: Scaling Transformers to 1,000 Layers)",
    citation="arXiv:2203.00555",
    equation="x <- LN(alpha * x + F(x)), alpha = (2N)^(1/4); v, out, fc1, fc2 Xavier gain beta = (8N)^(-1/4)",
    sublayer=lambda layer, depth: SublayerSpec(sum_norm=True, skip_scale=deepnorm_alpha(depth)),
    final_norm=False,
    branch_gain=deepnorm_beta,
))

register(Variant(
    name="noresidual",
    title="No residual: the Pre-LN block with the skip removed (isolates the residual's effect)",
    citation="arXiv:2103.03404 (Dong et al. 2021, on what the skip prevents)",
    equation="x <- F(LN(x)); final LN before the head",
    sublayer=lambda layer, depth: SublayerSpec(pre_norm=True, residual="none"),
))


def variant_table() -> List[dict]:
    """One row per registered variant (name, equation, paper), for the README and ``--help``."""
    return [dict(name=v.name, equation=v.equation, title=v.title, citation=v.citation)
            for v in VARIANTS.values()]


__all__ = ["SublayerSpec", "Variant", "VARIANTS", "register", "get_variant", "deepnorm_alpha",
           "deepnorm_beta", "variant_table"]
