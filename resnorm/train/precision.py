"""``train.precision``: the autocast a step runs under and, for fp16, the gradient scaler.

- ``fp32`` (the default): no autocast; ``bf16``: ``torch.autocast(dtype=bfloat16)``, no scaler
  (bf16 has fp32's exponent range); ``fp16``: ``torch.autocast(dtype=float16)`` and a
  ``torch.amp.GradScaler`` of the device type (CUDA and CPU alike).
- Under fp16 the loop (:func:`resnorm.train.loop.forward_backward`) back-propagates the scaled loss and
  *unscales the gradients right after backward*, so the gradient-norm probe, every monitor, the
  divergence guard and clipping see the true gradients, as in fp32.
- **A scaler-skipped step**: the unscaled gradient norm is not finite while the loss is (an fp16
  overflow in the scaled backward). The optimizer step is not taken, the scaler halves its scale, the
  step is recorded (``scaler_skipped`` column, ``scaler_skipped_count`` / ``scaler_skipped_steps``
  in the summary, ``train/scaler_skipped`` in W&B) and training goes on: it is the scaler's
  business, not a divergence (:func:`scaler_overflow`). The decision is read from the step's one
  host transfer (the gradient norm is non-finite exactly when some gradient is, which is the
  scaler's own found-inf test), so fp16 adds no host sync to a step.
- **When it is a divergence all the same** (the guard's rule, :func:`scaler_overflow`): a non-finite
  *loss* (the forward overflowed; the scale does not touch the forward, so no lowering of it can
  help), or a non-finite gradient while the loss scale is already <= 1 (:data:`MIN_LOSS_SCALE`):
  the backward overflows without any amplification, so the gradient itself is out of range and
  lowering the scale further only hides it. The factor rule (``train.diverge_factor``) is unchanged.
- The scale a step's backward used is ``loss_scale`` (a ``metrics.parquet`` column, NaN without
  fp16; ``train/loss_scale`` in W&B) and the final one ``loss_scale`` in the summary; the scaler's
  state is checkpointed, so a resumed run continues with the same scale.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

#: train.precision -> the autocast dtype (None: no autocast); resnorm.config.schema.PRECISIONS lists the names
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: a non-finite gradient at a loss scale at or below this is a divergence, not an fp16 overflow
MIN_LOSS_SCALE = 1.0


def autocast(device: torch.device, precision: str):
    """The autocast context of ``train.precision`` on ``device`` (disabled for fp32)."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def make_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A GradScaler for fp16 (PyTorch's defaults: scale 2^16, halved on an overflow, doubled after
    2000 steps without one); None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The scaler's current scale as a 1-element float tensor on the device, to ride the step's host
    transfer (``get_scale()`` would read it to the host on its own). Read only after the first
    ``scale()``, which creates it."""
    return scaler._scale.float().view(1)


def scaler_overflow(kind: Optional[str], loss_scale: float) -> bool:
    """Whether the guard's verdict ``kind`` (:func:`resnorm.train.guard.divergence`) on an fp16 step is an
    overflow the scaler handles (skip the step, lower the scale) rather than a divergence: a
    non-finite gradient with a finite loss, at a loss scale above :data:`MIN_LOSS_SCALE`."""
    return kind == "nonfinite_grad" and math.isfinite(loss_scale) and loss_scale > MIN_LOSS_SCALE

