"""Probes: per-(layer, sublayer) statistics read from the model during training, without hooks.

One protocol (:class:`Probe`) for every probe; the training loop (:func:`resnorm.train.loop.fit`) calls it
at two fixed points of a step, and the order is part of the study:

0. ``before_forward()``: on a due step, before its forward (a probe that reads the step's own
   backward arms its hooks here);
1. ``before_update(x)``: after ``backward``, before the divergence guard, gradient clipping and the
   optimizer step, so gradients are the raw ones and weights the pre-update ones. It returns a
   ``(len(quantities_before), n_sublayers)`` tensor on the device (or None); the loop moves it to the
   host **together with the loss**, in the step's one host transfer.
2. ``after_update()``: after the optimizer step (only when the step was taken). It returns the
   quantities that need the update (e.g. the update ratio) as a ``(len(quantities_after),
   n_sublayers)`` device tensor, or None.

``due(step, last)`` says on which steps a probe reads; the loop stores its rows in
``layers.parquet`` through :meth:`Probe.rows`. The probes here:

- :class:`GradNormProbe`: the total gradient norm (every step: the guard and clipping read it) and,
  with ``train.probes``, the gradient norm of every sublayer's parameters, every ``train.log_every``
  steps; one batched ``torch._foreach_norm`` and one ``index_add_``.
- :class:`ActivationProbe`: every ``train.probe_every`` steps (and the last), ``act_rms``,
  ``branch_ratio`` ||F||/||x|| and ``max_attn_logit`` from a no-grad trace of the batch, and
  ``update_ratio`` ||dW||_F/||W||_F over the step's optimizer update.

The formulas (``rms``, ``branch_ratio``) are :mod:`resnorm.monitors.measure`'s, where each paper's formula lives.
Every quantity a probe writes is declared once in :mod:`resnorm.runs.quantities` (unit, sublayers, how
a block's sublayers combine in the figures, one-line description; docs/monitors.md is generated from it).
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from resnorm.monitors.measure import branch_ratio, rms
from resnorm.runs.quantities import SUBLAYERS

Label = Tuple[int, str]


def sublayer_modules(model: nn.Module) -> List[Tuple[int, str, nn.Module]]:
    """(layer index, sublayer name, module) for every residual sublayer, in depth order."""
    return [(i, name, getattr(block, name)) for i, block in enumerate(model.blocks) for name in SUBLAYERS]


class Probe:
    """The protocol (see the module docstring). Subclasses set ``labels``, ``quantities_before``,
    ``quantities_after`` and implement :meth:`due`, :meth:`before_update`, :meth:`after_update`."""

    labels: List[Label] = []
    quantities_before: Tuple[str, ...] = ()
    quantities_after: Tuple[str, ...] = ()

    def due(self, step: int, last: bool) -> bool:
        raise NotImplementedError

    def before_forward(self) -> None:
        """On a due step, before its forward (e.g. arm hooks that read the step's own backward)."""

    def before_update(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def after_update(self) -> Optional[torch.Tensor]:
        return None

    def rows(self, quantities: Sequence[str], values: Sequence[Sequence[float]]) -> Iterator[tuple]:
        """(quantity, labels, values) per quantity, for :meth:`resnorm.runs.folder.RunStore.add_layers`."""
        for quantity, vals in zip(quantities, values):
            yield quantity, self.labels, vals

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class GradNormProbe(Probe):
    """Total and per-(layer, sublayer) gradient norms from ``p.grad``, read after ``backward``.

    ``before_update`` returns ``[total, norm of sublayer 0, sublayer 1, ...]`` as one row (the
    total first: the loop's guard and clipping read it every step; the rest are the ``grad_norm``
    rows, on logging steps). Parameters outside the sublayers (embeddings, final norm, head) count
    in the total only.
    """

    quantities_before = ("grad_norm",)

    def __init__(self, model: nn.Module, per_layer: bool = True, log_every: int = 1):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.log_every = log_every
        self.labels = []
        group_of = {}
        if per_layer:
            for gid, (layer, sub, module) in enumerate(sublayer_modules(model)):
                self.labels.append((layer, sub))
                for p in module.parameters():
                    group_of[id(p)] = gid
        other = len(self.labels)
        device = self.params[0].device
        self.index = torch.tensor([group_of.get(id(p), other) for p in self.params], device=device)
        self.n_groups = other + 1

    def due(self, step: int, last: bool) -> bool:
        return bool(self.labels) and step % self.log_every == 0

    @torch.no_grad()
    def before_update(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A 1-D tensor on the parameters' device: [total norm, norm of group 0, group 1, ...]."""
        grads, index = [], self.index
        present = [p.grad is not None for p in self.params]
        if all(present):
            grads = [p.grad for p in self.params]
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            index = index[torch.tensor(present, device=index.device)]
        sq = torch.stack(torch._foreach_norm(grads)).float().pow(2)
        groups = torch.zeros(self.n_groups, device=sq.device).index_add_(0, index, sq)
        return torch.cat([sq.sum().sqrt().view(1), groups[:-1].sqrt()])


class ActivationProbe(Probe):
    """Per-(layer, sublayer) statistics every ``every`` steps (and on the last step).

    Before the update: ``act_rms`` (RMS of the sublayer's output stream), ``branch_ratio``
    (||F|| / ||x||) and ``max_attn_logit`` (attention sublayers; NaN for MLPs), from a no-grad
    trace of the step's batch in eval mode; a copy of the 2-D weights is kept. After the update:
    ``update_ratio`` (||dW||_F / ||W||_F of the sublayer's 2-D weights over the step's update).
    """

    quantities_before = ("act_rms", "branch_ratio", "max_attn_logit")
    quantities_after = ("update_ratio",)

    def __init__(self, model, every: int, total_steps: int):
        self.model, self.every, self.total_steps = model, every, total_steps
        groups = sublayer_modules(model)
        self.labels = [(layer, sub) for layer, sub, _ in groups]
        self.weights = [[p for p in module.parameters() if p.dim() == 2] for _, _, module in groups]
        self._saved: Optional[List[List[torch.Tensor]]] = None
        self.last_trace = None

    def due(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last

    @torch.no_grad()
    def before_update(self, x: torch.Tensor) -> torch.Tensor:
        from resnorm.model.blocks import eval_mode

        with eval_mode(self.model):
            tr = self.model.trace(x)
        self.last_trace = (x, tr)  # for the forward monitors due on the same step (dropped after the step)
        parts, logits = tr["parts"], tr["max_logit"]
        nan = torch.full((), float("nan"), device=x.device)
        act = torch.stack([rms(p.y) for p in parts])
        ratio = torch.stack([branch_ratio(p.f, p.x) for p in parts])
        it = iter(logits)
        mx = torch.stack([next(it).float() if kind == "attn" else nan for kind in tr["kinds"]])
        self._saved = [[w.detach().clone() for w in ws] for ws in self.weights]
        return torch.stack([act, ratio, mx])

    @torch.no_grad()
    def after_update(self) -> torch.Tensor:
        self.last_trace = None
        upd = []
        for ws, saved in zip(self.weights, self._saved):
            num = torch.sqrt(sum((w.float() - s.float()).pow(2).sum() for w, s in zip(ws, saved)))
            den = torch.sqrt(sum(s.float().pow(2).sum() for s in saved))
            upd.append(num / den)
        self._saved = None
        return torch.stack(upd).view(1, -1)

