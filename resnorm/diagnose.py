"""Say where a non-finite value first appears (fairseq's habit), for the divergence reason.

Used only after the guard has fired, so the hooks it installs never touch the training step.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def _first_nonfinite_output(model: nn.Module, x: torch.Tensor) -> str | None:
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


def first_nonfinite(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str:
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


if __name__ == "__main__":  # python -m resnorm.diagnose ...: init-time diagnostics (resnorm/diagnose_cli.py)
    import sys

    from resnorm.diagnose_cli import main

    sys.exit(main())
