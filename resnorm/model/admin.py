"""Admin's profiling pass (Liu et al. 2020, Understanding the Difficulty of Training Transformers,
arXiv:2004.08249, Sec. 4; official code LiyuanLucasLiu/Transformer-Clinic, ``adaptive-profiling``).

Admin's sublayer is ``x_{i+1} = LN(omega_i * x_i + F_i(x_i))`` with ``omega_i`` a learned per-channel
vector. Before training, one forward pass over one batch sets every ``omega_i`` in order, bottom to
top, exactly as the official code does::

    omega_1 = 1
    omega_{i+1} = sqrt(Var(omega_i * x_i) + Var(F_i(x_i)))

where ``x_i`` is the input of sublayer ``i`` (the embedding for i = 1, the previous LayerNorm's
output after that) and ``Var`` is the population variance over every element of the batch (the
official code's ``np.var`` of the flattened tensor). Each sublayer's output is computed with its
freshly set ``omega_i``, so ``x_{i+1}`` is what the initialised model computes. As ``Var(x_i) ~ 1``
after a LayerNorm, this is ``omega_i^2 = 1 + sum_{j<i} Var(F_j)``: the share of each branch in
the sum then matches Pre-LN's at init. With every variance 1 it is the closed form
``omega_i = sqrt(i)`` (``model.admin_mode=closed_form``; no pass is run).

The batch is real data: :func:`resnorm.model.transformer.build_model` takes the configured dataset's training
stream and :func:`profile_batch` cuts ``min(batch_size, 8192 // seq_len)`` evenly spaced windows
from it (the paper profiles on one batch of fewer than 8192 tokens). No random numbers are used,
so profiling does not shift the run's random stream.
"""

from __future__ import annotations

import logging
import math
from typing import List

import torch

from resnorm.data.corpora import fixed_batches

log = logging.getLogger(__name__)
PROFILE_TOKENS = 8192  # the paper profiles on one batch of fewer than 8192 tokens


def profile_batch(stream: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """One deterministic batch of token windows from a 1-D token stream, at most 8192 tokens."""
    n = max(1, min(batch_size, PROFILE_TOKENS // seq_len))
    (x, _), = fixed_batches(stream, 1, n, seq_len)
    return x


def _var(t: torch.Tensor) -> float:
    return t.double().var(unbiased=False).item()


@torch.no_grad()
def profile(model, idx: torch.Tensor) -> List[float]:
    """Set every sublayer's omega from one forward pass over ``idx``; return the omegas (scalars).

    The model must be a single-stream variant whose sublayers all have a learned skip (``omega``).
    """
    if model.variant.stream != "single":
        raise ValueError(f"Admin profiling needs a single residual stream, not {model.variant.stream!r}")
    subs = model.sublayers()
    if any(sub.omega is None for sub in subs):
        raise ValueError(f"model.norm={model.variant.name!r} has no learned skip factor (omega) to profile")
    idx = idx.to(model.tok_emb.weight.device)
    x = model.embed(idx)
    ratio, omegas = 1.0, []
    for sub in subs:
        sub.omega.fill_(ratio)
        omegas.append(ratio)
        f = sub.branch_out(x)
        ratio = math.sqrt(_var(sub.omega * x) + _var(f))
        x = sub.combine(x, f)
    log.info("admin: profiled omega on %d tokens: %s", idx.numel(),
             " ".join(f"{w:.3f}" for w in omegas))
    return omegas


def omegas(model) -> List[float]:
    """The current omega of every sublayer (mean over channels), bottom to top."""
    return [sub.omega.mean().item() for sub in model.sublayers()]
