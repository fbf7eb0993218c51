"""Normalization layers behind one factory: ``make_norm(kind, d, eps)``.

- ``layernorm``: gamma * (x - mean) / sqrt(var + eps) + beta (torch.nn.LayerNorm).
- ``rmsnorm``: g * x / sqrt(mean(x^2) + eps), no mean subtraction, no bias (Zhang & Sennrich 2019,
  arXiv:1910.07467). eps sits inside the square root (LLaMA style), not outside as in the authors'
  reference code (``x / (||x|| n^-1/2 + 1e-8)``); at eps=1e-5 the two differ only for tiny inputs.
"""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn

NORM_FACTORIES: Dict[str, Callable[[int, float], nn.Module]] = {
    "layernorm": lambda d, eps: nn.LayerNorm(d, eps=eps),
    "rmsnorm": lambda d, eps: nn.RMSNorm(d, eps=eps),
}


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    try:
        factory = NORM_FACTORIES[kind]
    except KeyError:
        raise KeyError(f"model.norm_layer={kind!r}: choose one of {', '.join(NORM_FACTORIES)}") from None
    return factory(d, eps)
