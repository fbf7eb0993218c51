"""Forward- and backward-side monitors: outliers, attention, the stream's gradient, logits.

Two :class:`resnorm.monitors.probes.Probe` subclasses, both read every ``train.probe_every`` steps and on the
last step (the cadence of :class:`resnorm.monitors.probes.ActivationProbe`), both per (layer, sublayer) with the
labels of :func:`resnorm.monitors.probes.sublayer_modules` (every attention and MLP sublayer, in depth order,
so their rows in ``layers.parquet`` line up with the other probes' rows), both in ``before_update``
(after ``backward``, before the guard, clipping and the optimizer step: the pre-update weights), both
on the step's training batch, outside autocast (float32), in eval mode (the model has no dropout, so
eval and train mode compute the same; the mode is restored):

:class:`ForwardStatsProbe`, one no-grad :meth:`resnorm.model.transformer.Transformer.trace`:

- ``act_absmax``: max |y| of the sublayer's output stream ``parts[i].y`` (units of the stream);
- ``act_kurtosis``: the plain (not excess) kurtosis E[(y - mu)^4] / sigma^4 of the same ``y``, over
  all its elements (batch, tokens and channels together, population moments): 3 for a Gaussian, 1.8
  for a uniform, large when a few tokens or channels carry outliers (a per-token average would
  dilute one massive token by 1/T, so all elements it is). Dimensionless;
- ``attn_entropy_mean``: the entropy -sum_j p_ij log p_ij of each query's attention distribution
  (:meth:`resnorm.model.blocks.Attention.attention_probs`, causal mask included), in nats, averaged over
  heads, batch and queries; uniform causal attention gives mean_t log(t + 1);
- ``attn_entropy_min_head``: the lowest over heads of the head's entropy averaged over batch and
  queries, in nats;
- ``attn_sink_mass``: the attention probability on the first token, averaged over heads, batch and
  queries (a probability in [0, 1]; uniform causal attention gives mean_t 1 / (t + 1)).

The three ``attn_*`` quantities are NaN on MLP sublayers (as ``max_attn_logit`` is).

:class:`StreamGradProbe`, read from the training step's own backward, at no extra forward or backward:

- ``stream_grad_rms``: the RMS over all elements of dL/dx, x the residual stream entering the
  sublayer (the tensor :meth:`resnorm.model.blocks.Sublayer.run` computes with) and L the step's training
  loss (cross-entropy, plus the z-loss term when ``model.z_loss`` > 0, in the step's own mode and
  precision). Before a due step's forward (``before_forward``) the probe arms a read-only tensor
  hook on that x in every sublayer (``Sublayer.grad_sink``); the hooks record g^2's mean as the
  backward passes and change nothing (they return None: the step's gradients are bit for bit those
  of an unprobed step); ``before_update`` reads the values and disarms them. L is a mean over the
  batch's tokens, so the values scale as 1 / (batch x tokens): compare runs of one batch shape.
  With ``train.grad_accum`` > 1 the hooks fire once per micro-batch and the probe averages g^2 over
  them (equal micro-batches, each loss over N: the whole batch's dL/dx); under fp16 it divides by
  the loss scale of the step's backward (the hooks see the scaled gradient).

The output logits' log Z and RMS are read at every evaluation by :func:`resnorm.train.loop.evaluate`
(``val_log_z``, ``val_logit_rms`` in ``metrics.parquet``), not here.

:func:`forward_probes` builds the two probes from ``train`` (off when ``train.probes`` is false or
``train.probe_every`` is 0). Formulas live in :mod:`resnorm.monitors.measure` (``absmax``, ``kurtosis``,
``attention_entropy``, ``sink_mass``).
"""

from __future__ import annotations

import functools
from typing import List, Optional

import torch

from resnorm.monitors.measure import absmax, attention_entropy, kurtosis, sink_mass
from resnorm.model.blocks import Attention, eval_mode
from resnorm.monitors.probes import Probe, sublayer_modules


class _Periodic(Probe):
    """Due every ``every`` steps and on the last; labels: every (layer, sublayer) of the model."""

    def __init__(self, model, every: int, total_steps: int):
        self.model, self.every, self.total_steps = model, every, total_steps
        self.labels = [(layer, sub) for layer, sub, _ in sublayer_modules(model)]

    def due(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last


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

    def __init__(self, model, every: int, total_steps: int, share=None):
        super().__init__(model, every, total_steps)
        self.share = share  # a resnorm.monitors.probes.ActivationProbe due on the same steps: reuse its trace

    @torch.no_grad()
    def before_update(self, x: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.model):
            shared = getattr(self.share, "last_trace", None)
            parts = shared[1]["parts"] if shared is not None and shared[0] is x else \
                self.model.trace(x, max_logits=False)["parts"]
            nan = torch.full((3,), float("nan"), device=x.device)
            cols = []
            for sub, p in zip(self.model.sublayers(), parts):
                attn = attention_stats(sub.branch, p.h) if isinstance(sub.branch, Attention) else nan
                cols.append(torch.cat([torch.stack([absmax(p.y), kurtosis(p.y)]), attn]))
        return torch.stack(cols, dim=1)  # (quantities, sublayers)


class StreamGradProbe(_Periodic):
    """``stream_grad_rms``: RMS of dL/dx for the stream x entering every sublayer (see the module
    docstring), read by hooks during the step's own backward; no gradient is changed."""

    quantities_before = ("stream_grad_rms",)

    def __init__(self, model, every: int, total_steps: int, loss_scale=None):
        super().__init__(model, every, total_steps)
        self.loss_scale = loss_scale  # fp16: () -> the gradient scaler's scale (the hooks see scaled gradients)
        self._sq: List[Optional[torch.Tensor]] = []
        self._calls: List[int] = []

    def _record(self, i: int, grad: torch.Tensor) -> None:
        sq = grad.detach().float().pow(2).mean()  # returns None: the gradient passes unchanged
        self._sq[i] = sq if self._sq[i] is None else self._sq[i] + sq  # micro-batches (train.grad_accum)
        self._calls[i] += 1

    def before_forward(self) -> None:
        subs = self.model.sublayers()
        self._sq, self._calls = [None] * len(subs), [0] * len(subs)
        for i, sub in enumerate(subs):
            sub.grad_sink = functools.partial(self._record, i)

    def before_update(self, x: torch.Tensor) -> torch.Tensor:
        for sub in self.model.sublayers():
            sub.grad_sink = None
        zero = torch.zeros((), device=x.device)
        vals = [zero if sq is None else (sq / n).sqrt() for sq, n in zip(self._sq, self._calls)]
        vals = vals or [zero] * len(self.labels)
        self._sq, self._calls = [], []
        out = torch.stack(vals).view(1, -1)
        return out if self.loss_scale is None else out / self.loss_scale()


@torch.no_grad()
def forward_probes(model, train_cfg, share=None, loss_scale=None) -> List[Probe]:
    """[ForwardStatsProbe, StreamGradProbe] every ``train_cfg.probe_every`` steps (and the last), or
    [] when ``train_cfg.probes`` is false or ``probe_every`` is 0. ``share``: the run's
    :class:`resnorm.monitors.probes.ActivationProbe`, whose trace of the step's batch the forward statistics reuse;
    ``loss_scale``: under fp16, a function giving the gradient scaler's current scale as a 1-element
    tensor (:func:`resnorm.train.precision.scale_tensor`)."""
    if not (train_cfg.probes and train_cfg.probe_every):
        return []
    every, steps = train_cfg.probe_every, train_cfg.steps
    return [ForwardStatsProbe(model, every, steps, share=share), StreamGradProbe(model, every, steps, loss_scale)]
