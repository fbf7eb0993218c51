"""Normalization layers behind one factory: ``make_norm(kind, d, eps, dyt_alpha0, derf_alpha0)``.

- ``layernorm``: gamma * (x - mean) / sqrt(var + eps) + beta (torch.nn.LayerNorm); gamma 1, beta 0.
- ``rmsnorm``: g * x / sqrt(mean(x^2) + eps), no mean subtraction, no bias (Zhang & Sennrich 2019,
  arXiv:1910.07467). eps sits inside the square root (LLaMA style), not outside as in the authors'
  reference code (``x / (||x|| n^-1/2 + 1e-8)``); at eps=1e-5 the two differ only for tiny inputs.
- ``scalenorm``: g * x / max(||x||_2, eps), one learned scalar g initialised at sqrt(d) (Nguyen &
  Salazar 2019, arXiv:1910.05895; their code clamps the norm at eps=1e-5, here ``model.norm_eps``).
- ``dyt``: gamma * tanh(alpha * x) + beta, one learned scalar alpha initialised at alpha0
  (``model.dyt_alpha0``, the paper's default 0.5), per-channel gamma 1 and beta 0 (Zhu et al. 2025,
  arXiv:2503.10622). Not a normalization: eps is not used.
- ``derf``: gamma * erf(alpha * x + s) + beta, learned scalars alpha (init alpha0, ``model.derf_alpha0``,
  the paper's default 0.5) and s (init 0), per-channel gamma 1 and beta 0 (Chen, Lu, Zhu, Sun & Liu
  2025, Stronger Normalization-Free Transformers, arXiv:2512.10938; the authors' ``Dynamic_erf``:
  ``alpha`` and ``shift`` are ``torch.ones(1)`` parameters). eps is not used.

Every layer here has ``reset_parameters()``, which :func:`resnorm.model.initialization.initialise` calls:
the norms' initial values are part of the variant's recorded initialisation.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch import nn


class ScaleNorm(nn.Module):
    """``g * x / max(||x||, eps)`` over the last dimension, one learned scalar ``g`` (init sqrt(d))."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.d, self.eps = d, eps
        self.g = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.g.fill_(math.sqrt(self.d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp(min=self.eps)

    def extra_repr(self) -> str:
        return f"{self.d}, eps={self.eps}"


class _Pointwise(nn.Module):
    """``weight * phi(alpha * x [+ shift]) + bias``: a learned scalar ``alpha`` (init alpha0), with
    ``shift`` a learned scalar (init 0) if asked, per-channel ``weight`` (1) and ``bias`` (0).
    Subclasses give ``phi`` in ``forward``; DyT and Derf are distinct classes (neither is the other)."""

    def __init__(self, d: int, alpha0: float, shift: bool):
        super().__init__()
        self.d, self.alpha0 = d, alpha0
        self.alpha = nn.Parameter(torch.empty(1))
        self.shift = nn.Parameter(torch.empty(1)) if shift else None
        self.weight = nn.Parameter(torch.empty(d))
        self.bias = nn.Parameter(torch.empty(d))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.alpha.fill_(self.alpha0)
        if self.shift is not None:
            self.shift.zero_()
        self.weight.fill_(1.0)
        self.bias.zero_()

    def extra_repr(self) -> str:
        return f"{self.d}, alpha0={self.alpha0}"


class DyT(_Pointwise):
    """Dynamic Tanh: ``weight * tanh(alpha * x) + bias``, one learned scalar ``alpha`` (init alpha0)."""

    def __init__(self, d: int, alpha0: float = 0.5):
        super().__init__(d, alpha0, shift=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha * x) * self.weight + self.bias


class Derf(_Pointwise):
    """Dynamic erf: ``weight * erf(alpha * x + shift) + bias``; learned scalars ``alpha`` (init alpha0)
    and ``shift`` (init 0), per-channel ``weight`` (1) and ``bias`` (0), as the authors' code."""

    def __init__(self, d: int, alpha0: float = 0.5):
        super().__init__(d, alpha0, shift=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(self.alpha * x + self.shift) * self.weight + self.bias


# each factory: (d, eps, dyt_alpha0, derf_alpha0) -> a fresh layer
NORM_FACTORIES: Dict[str, Callable[..., nn.Module]] = {
    "layernorm": lambda d, eps, dyt, derf: nn.LayerNorm(d, eps=eps),
    "rmsnorm": lambda d, eps, dyt, derf: nn.RMSNorm(d, eps=eps),
    "scalenorm": lambda d, eps, dyt, derf: ScaleNorm(d, eps=eps),
    "dyt": lambda d, eps, dyt, derf: DyT(d, alpha0=dyt),
    "derf": lambda d, eps, dyt, derf: Derf(d, alpha0=derf),
}
NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, ScaleNorm, DyT, Derf)


def make_norm(kind: str, d: int, eps: float, dyt_alpha0: float = 0.5, derf_alpha0: float = 0.5) -> nn.Module:
    try:
        factory = NORM_FACTORIES[kind]
    except KeyError:
        raise KeyError(f"model.norm_layer={kind!r}: choose one of {', '.join(NORM_FACTORIES)}") from None
    return factory(d, eps, dyt_alpha0, derf_alpha0)
