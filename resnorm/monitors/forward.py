"""Forward- and backward-side monitors (issue 11): outliers, attention, the stream's gradient, logits.

Two :class:`resnorm.probes.Probe` subclasses, both read every ``train.probe_every`` steps and on the
last step (the cadence of :class:`resnorm.probes.ActivationProbe`), both per (layer, sublayer) with the
labels of :func:`resnorm.probes.sublayer_modules` (every attention and MLP sublayer, in depth order,
so their rows in ``layers.parquet`` line up with the other probes' rows), both in ``before_update``
(after ``backward``, before the guard, clipping and the optimizer step: the pre-update weights), both
on the step's training batch, outside autocast (float32), in eval mode (the model has no dropout, so
eval and train mode compute the same; the mode is restored):

:class:`ForwardStatsProbe`, one no-grad :meth:`resnorm.model.Transformer.trace`:

- ``act_absmax``: max |y| of the sublayer's output stream ``parts[i].y`` (units of the stream);
- ``act_kurtosis``: the plain (not excess) kurtosis E[(y - mu)^4] / sigma^4 of the same ``y``, over
  all its elements (batch, tokens and channels together, population moments): 3 for a Gaussian, 1.8
  for a uniform, large when a few tokens or channels carry outliers (a per-token average would
  dilute one massive token by 1/T, so all elements it is). Dimensionless;
- ``attn_entropy_mean``: the entropy -sum_j p_ij log p_ij of each query's attention distribution
  (:meth:`resnorm.model.Attention.attention_probs`, causal mask included), in nats, averaged over
  heads, batch and queries; uniform causal attention gives mean_t log(t + 1);
- ``attn_entropy_min_head``: the lowest over heads of the head's entropy averaged over batch and
  queries, in nats;
- ``attn_sink_mass``: the attention probability on the first token, averaged over heads, batch and
  queries (a probability in [0, 1]; uniform causal attention gives mean_t 1 / (t + 1)).

The three ``attn_*`` quantities are NaN on MLP sublayers (as ``max_attn_logit`` is).

:class:`StreamGradProbe`, one separate forward with grad enabled and ``torch.autograd.grad``:

- ``stream_grad_rms``: the RMS over all elements of dL/dx, x = ``parts[i].x`` the residual stream
  entering the sublayer (the tensor ``Sublayer.run`` computes with) and L the training loss: the mean
  next-token cross-entropy, plus the z-loss term when ``model.z_loss`` > 0. L is a mean over the
  batch's tokens, so the values scale as 1 / (batch x tokens): compare runs of one batch shape.
  ``torch.autograd.grad`` returns the gradients without accumulating into any ``p.grad``: the
  parameters' gradients of the step are left as they were, bit for bit.

  Targets: the :class:`~resnorm.probes.Probe` protocol passes only ``x``, so the protocol is kept and
  :meth:`StreamGradProbe.set_targets` takes the step's targets ``y`` (the caller sets them before
  ``before_update``; they are used once). Without them the probe uses next-token targets from ``x``
  itself: the logits at positions 0..T-2 against ``x[:, 1:]`` (one position fewer than training).

The output logits' log Z and RMS are read at every evaluation by :func:`resnorm.loop.evaluate`
(``val_log_z``, ``val_logit_rms`` in ``metrics.parquet``), not here.

:func:`forward_probes` builds the two probes from ``train`` (off when ``train.probes`` is false or
``train.probe_every`` is 0). Formulas live in :mod:`resnorm.measure` (``absmax``, ``kurtosis``,
``attention_entropy``, ``sink_mass``, ``log_partition``, ``rms``).
"""

from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..measure import absmax, attention_entropy, kurtosis, log_partition, rms, sink_mass
from ..model import Attention
from ..probes import Probe, sublayer_modules


class _Periodic(Probe):
    """Due every ``every`` steps and on the last; labels: every (layer, sublayer) of the model."""

    def __init__(self, model, every: int, total_steps: int):
        self.model, self.every, self.total_steps = model, every, total_steps
        self.labels = [(layer, sub) for layer, sub, _ in sublayer_modules(model)]

    def due(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode inside, the caller's mode (train or eval) restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def attention_stats(attn: Attention, h: torch.Tensor) -> torch.Tensor:
    """[mean entropy, lowest head entropy, sink mass] of one attention on its input ``h``."""
    p = attn.attention_probs(h)  # (batch, heads, T, T)
    ent = attention_entropy(p)  # (batch, heads, T)
    return torch.stack([ent.mean(), ent.mean(dim=(0, 2)).min(), sink_mass(p)])


class ForwardStatsProbe(_Periodic):
    """``act_absmax``, ``act_kurtosis`` and the attention entropies and sink mass (see the module
    docstring), from one no-grad trace of the step's batch in eval mode."""

    quantities_before = ("act_absmax", "act_kurtosis", "attn_entropy_mean", "attn_entropy_min_head",
                         "attn_sink_mass")

    @torch.no_grad()
    def before_update(self, x: torch.Tensor) -> torch.Tensor:
        with _eval_mode(self.model):
            parts = self.model.trace(x, max_logits=False)["parts"]
            nan = torch.full((3,), float("nan"), device=x.device)
            cols = []
            for sub, p in zip(self.model.sublayers(), parts):
                attn = attention_stats(sub.branch, p.h) if isinstance(sub.branch, Attention) else nan
                cols.append(torch.cat([torch.stack([absmax(p.y), kurtosis(p.y)]), attn]))
        return torch.stack(cols, dim=1)  # (quantities, sublayers)


def training_loss(model, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss :meth:`resnorm.model.Transformer.loss` trains on, from logits already computed."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(logits, targets.reshape(-1))
    if model.shape.z_loss:
        loss = loss + model.shape.z_loss * log_partition(logits).pow(2).mean()
    return loss


class StreamGradProbe(_Periodic):
    """``stream_grad_rms``: RMS of dL/dx for the stream x entering every sublayer (see the module
    docstring), from a separate forward with grad enabled; no parameter's ``.grad`` is touched."""

    quantities_before = ("stream_grad_rms",)

    def __init__(self, model, every: int, total_steps: int):
        super().__init__(model, every, total_steps)
        self._targets: Optional[torch.Tensor] = None

    def set_targets(self, y: Optional[torch.Tensor]) -> None:
        """The targets of the next :meth:`before_update` (the step's ``y``, same shape as ``x``)."""
        self._targets = y

    def before_update(self, x: torch.Tensor) -> torch.Tensor:
        y, self._targets = self._targets, None
        with _eval_mode(self.model), torch.enable_grad():
            tr = self.model.trace(x, max_logits=False)
            logits = self.model.head(tr["hidden"])
            if y is None:  # next-token targets from x itself
                logits, y = logits[:, :-1], x[:, 1:]
            loss = training_loss(self.model, logits, y)
            xs = [p.x for p in tr["parts"]]
            grads = torch.autograd.grad(loss, xs, allow_unused=True)
        vals = [rms(g) if g is not None else torch.zeros((), device=x.device) for g in grads]
        return torch.stack(vals).view(1, -1).detach()


@torch.no_grad()
def forward_probes(model, train_cfg) -> List[Probe]:
    """[ForwardStatsProbe, StreamGradProbe] every ``train_cfg.probe_every`` steps (and the last), or
    [] when ``train_cfg.probes`` is false or ``probe_every`` is 0."""
    if not (train_cfg.probes and train_cfg.probe_every):
        return []
    every, steps = train_cfg.probe_every, train_cfg.steps
    return [ForwardStatsProbe(model, every, steps), StreamGradProbe(model, every, steps)]
