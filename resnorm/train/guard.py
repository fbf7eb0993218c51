"""The divergence guard: when a run stops as ``diverged``, and where a non-finite value first appeared.

:func:`divergence` is a pure function of one step's numbers, called by :func:`resnorm.train.loop.fit`
after the step's host transfer and before gradient clipping and the optimizer step (so a step whose
loss or gradient blew up never updates the weights). A run diverges when

- its loss is not finite, or its (unclipped) global gradient norm is not finite; or
- ``train.diverge_factor`` is set and the loss exceeds ``diverge_factor`` x the run's first loss.

``train.diverge_factor=null`` keeps only the non-finite rule (the training-time reproductions use it,
as their papers count only a NaN/inf loss as a failed run). :func:`first_nonfinite` names the first
module whose output, or else the first parameter whose gradient, is non-finite (fairseq's habit);
it runs only after the guard has fired, so its hooks never touch a training step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def divergence(loss: float, grad_norm: float, initial_loss: Optional[float],
               factor: Optional[float]) -> Optional[str]:
    """Why this step diverged (``"nonfinite_loss"``, ``"nonfinite_grad"`` or ``"loss_factor"``), or None.

    ``initial_loss`` is the run's first training loss (the reference of the factor rule); ``factor``
    is ``train.diverge_factor`` (None: the factor rule is off).
    """
    if not math.isfinite(loss):
        return "nonfinite_loss"
    if not math.isfinite(grad_norm):
        return "nonfinite_grad"
    if factor is not None and initial_loss is not None and loss > factor * initial_loss:
        return "loss_factor"
    return None


def describe(kind: str, loss: float, initial_loss: Optional[float], factor: Optional[float],
             model: nn.Module, x: torch.Tensor) -> str:
    """The ``diverge_reason`` written to the summary for a :func:`divergence` verdict."""
    if kind == "nonfinite_loss":
        return f"non-finite loss ({loss}); {first_nonfinite(model, x)}"
    if kind == "nonfinite_grad":
        return f"non-finite gradient norm; {first_nonfinite(model, x)}"
    return (f"loss {loss:.4g} exceeds train.diverge_factor={factor} "
            f"x initial loss {initial_loss:.4g}")


@torch.no_grad()
def _first_nonfinite_output(model: nn.Module, x: torch.Tensor) -> Optional[str]:
    found: list = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, args, output):
        if not found and isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
            found.append(names.get(module, type(module).__name__))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def first_nonfinite(model: nn.Module, x: torch.Tensor) -> str:
    """Name the first module whose forward output, or else the first parameter whose gradient, is non-finite."""
    module = _first_nonfinite_output(model, x)
    if module is not None:
        return f"first non-finite output in module '{module}'"
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"forward finite; first non-finite gradient in '{name}'"
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return f"non-finite parameter '{name}'"
    return "no non-finite tensor found on re-check (the loss itself overflowed)"
