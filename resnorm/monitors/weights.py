"""Weight- and optimizer-side monitors: :class:`resnorm.monitors.probes.Probe` subclasses, one row per
(layer, sublayer) and quantity in ``layers.parquet``.

Every monitor reads a sublayer's parameters as :func:`resnorm.monitors.probes.sublayer_modules` gives them
(its branch, its norms, its learned scalars). A parameter two sublayers hold (ReZero's gate, shared
by the attention and MLP sublayers of a block) counts once, in the later (MLP) sublayer, as in
:class:`resnorm.monitors.probes.GradNormProbe`, so the groups partition the block parameters. All norms are
Frobenius norms of the group's tensors concatenated, computed in float32 on the device.

Quantities (name: definition [unit], cadence):

- ``param_norm``: ||W||_F of the sublayer's parameters, read before the optimizer step [weight
  units], every ``train.log_every`` steps.
- ``adam_m_norm``: ||m||_F of AdamW's first moment ``exp_avg``, after the step [gradient units],
  every ``train.log_every`` steps.
- ``adam_v_norm``: ||v||_F of AdamW's second moment ``exp_avg_sq``, after the step [gradient
  units squared], every ``train.log_every`` steps.
- ``update_norm``: ||W_after - W_before||_F over the step (learning rate, weight decay and, if on,
  clipping included) [weight units], every ``train.probe_every`` steps and on the last.
- ``update_grad_cos``: cos(W_after - W_before, g), g the raw (pre-clip) gradient [1, in -1..1;
  -1 for plain SGD without decay; AdamW's sign-like update is less aligned], as ``update_norm``.
- ``rezero_alpha``: ReZero's learned branch scalar (the gate) [1], every ``train.log_every``
  steps; the gate is shared by a block's two sublayers, which both show it.
- ``admin_omega_mean``, ``admin_omega_min``, ``admin_omega_max``: mean, min and max over the
  channels of Admin's learned skip vector omega [1], every ``train.log_every`` steps.
- ``dyt_alpha``: mean of the learned alpha of the sublayer's DyT norms (pre, out and sum norms
  that are DyT) [1], every ``train.log_every`` steps.

The probes (the update needs a weight and gradient snapshot, so it has its own, sparser cadence):

- :class:`ParamNormProbe`: ``param_norm`` in ``before_update`` (one ``torch._foreach_norm``).
- :class:`OptimizerStateProbe`: ``adam_m_norm``, ``adam_v_norm`` in ``after_update`` (two
  ``_foreach_norm``). A parameter without optimizer state (no gradient yet) is left out; a sublayer
  none of whose parameters has state reads NaN. Only under ``optim=adamw``: SGD keeps one momentum
  buffer and no second moment, and under ``optim=muon`` the blocks' matrices are Muon's (a momentum
  buffer) while AdamW holds only their biases and norms, so a per-sublayer "Adam moment" would
  describe a few vectors; with those optimizers the probe is left out (the update probes stay).
- :class:`UpdateProbe`: ``before_update`` copies the sublayer parameters and their raw gradients
  (two copies of the block parameters, on due steps only); ``after_update`` gives ``update_norm``
  and ``update_grad_cos``. On the same steps :class:`resnorm.monitors.probes.ActivationProbe` gives
  ``update_ratio`` over the 2-D weights only; ``update_norm`` covers every sublayer parameter.
- :class:`LearnedScalarProbe`: the learned residual/normalization scalars of :data:`SCALARS`, in
  ``before_update`` (the values the step's forward pass used). Only the quantities some sublayer
  has are kept; a sublayer without one reads NaN. A new scheme registers its scalars with
  :func:`register_scalar`.

:func:`weight_probes` builds the ones that apply (none when ``train.probes`` is false). Through
:class:`resnorm.train.callbacks.ProbeCallback`, before-update values ride the step's one host transfer;
after-update values (moments, update) cost one more host read on their due steps. As for every
probe, a step whose update was not taken (diverged) keeps no rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from resnorm.model.norms import DyT
from resnorm.monitors.probes import Label, Probe, sublayer_modules


def sublayer_params(model: nn.Module) -> Tuple[List[Label], List[nn.Parameter], torch.Tensor]:
    """(labels, parameters, group index of each parameter): every trainable parameter of the
    sublayers, each in one group (a shared one in the last sublayer that holds it)."""
    labels, group_of, params = [], {}, {}
    for gid, (layer, sub, module) in enumerate(sublayer_modules(model)):
        labels.append((layer, sub))
        for p in module.parameters():
            if p.requires_grad:
                group_of[id(p)] = gid
                params[id(p)] = p
    ps = list(params.values())
    device = ps[0].device if ps else torch.device("cpu")
    return labels, ps, torch.tensor([group_of[id(p)] for p in ps], dtype=torch.long, device=device)


def group_sums(values: Sequence[torch.Tensor], index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum of 0-d ``values`` per group (``index`` gives each value's group), in float32."""
    out = torch.zeros(n_groups, device=index.device)
    if len(values) == 0:
        return out
    return out.index_add_(0, index, torch.stack(list(values)).float())


def group_norms(tensors: Sequence[torch.Tensor], index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Frobenius norm of each group's tensors concatenated (one batched ``_foreach_norm``)."""
    if len(tensors) == 0:
        return torch.zeros(n_groups, device=index.device)
    sq = torch.stack(torch._foreach_norm(list(tensors))).float().pow(2)
    return torch.zeros(n_groups, device=sq.device).index_add_(0, index, sq).sqrt()


class _Every(Probe):
    """A probe over the sublayer parameter groups, due every ``every`` steps (and the last, if
    ``with_last``)."""

    def __init__(self, model: nn.Module, every: int, with_last: bool = False):
        self.labels, self.params, self.index = sublayer_params(model)
        self.every, self.with_last = every, with_last

    def due(self, step: int, last: bool) -> bool:
        return bool(self.every) and (step % self.every == 0 or (self.with_last and last))


class ParamNormProbe(_Every):
    """``param_norm``: ||W||_F of each sublayer's parameters, before the optimizer step."""

    quantities_before = ("param_norm",)

    @torch.no_grad()
    def before_update(self, x=None) -> torch.Tensor:
        return group_norms(self.params, self.index, len(self.labels)).view(1, -1)


class OptimizerStateProbe(_Every):
    """``adam_m_norm`` and ``adam_v_norm``: norms of AdamW's moments of each sublayer's parameters,
    after the optimizer step. ``before_update`` returns an empty row (the probe has nothing to read
    before the step, but the callback calls ``after_update`` only for probes that returned one)."""

    quantities_after = ("adam_m_norm", "adam_v_norm")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int):
        super().__init__(model, every)
        self.optimizer = optimizer

    def before_update(self, x=None) -> torch.Tensor:
        return torch.empty(0, len(self.labels), device=self.index.device)

    @torch.no_grad()
    def after_update(self) -> torch.Tensor:
        n, state = len(self.labels), self.optimizer.state
        keep = [i for i, p in enumerate(self.params) if "exp_avg" in state.get(p, {})]
        index = self.index[keep] if len(keep) < len(self.params) else self.index
        m = group_norms([state[self.params[i]]["exp_avg"] for i in keep], index, n)
        v = group_norms([state[self.params[i]]["exp_avg_sq"] for i in keep], index, n)
        has = torch.zeros(n, device=index.device).index_add_(0, index, torch.ones(len(keep), device=index.device))
        nan = torch.full_like(m, math.nan)
        return torch.stack([torch.where(has > 0, m, nan), torch.where(has > 0, v, nan)])


class UpdateProbe(_Every):
    """``update_norm`` ||W_after - W_before||_F and ``update_grad_cos`` cos(dW, g) per sublayer,
    g the raw gradient as ``backward`` left it (copied before clipping can scale it). Due every
    ``every`` steps and on the last. A parameter without a gradient counts with g = 0."""

    quantities_after = ("update_norm", "update_grad_cos")

    def __init__(self, model: nn.Module, every: int):
        super().__init__(model, every, with_last=True)
        self._saved: Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]] = None

    @torch.no_grad()
    def before_update(self, x=None) -> torch.Tensor:
        weights = [p.detach().clone() for p in self.params]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.params]
        self._saved = (weights, grads)
        return torch.empty(0, len(self.labels), device=self.index.device)

    @torch.no_grad()
    def after_update(self) -> torch.Tensor:
        weights, grads = self._saved
        self._saved = None
        n = len(self.labels)
        delta = torch._foreach_sub([p.detach() for p in self.params], weights)
        upd = group_norms(delta, self.index, n)
        g = group_norms(grads, self.index, n)
        dot = group_sums([(d.float() * gr.float()).sum() for d, gr in zip(delta, grads)], self.index, n)
        return torch.stack([upd, dot / (upd * g)])


# --- learned residual/normalization scalars ---------------------------------------------------------


@dataclass(frozen=True)
class LearnedScalar:
    """One learned scalar quantity: ``select(sublayer)`` gives the tensors it reads in that
    sublayer (empty: the sublayer has none), ``reduce(tensors)`` a 0-d tensor."""

    quantity: str
    select: Callable[[nn.Module], List[torch.Tensor]]
    reduce: Callable[[List[torch.Tensor]], torch.Tensor]


SCALARS: List[LearnedScalar] = []


def register_scalar(quantity: str, select: Callable[[nn.Module], List[torch.Tensor]],
                    reduce: Callable[[List[torch.Tensor]], torch.Tensor]) -> LearnedScalar:
    """Add a learned scalar to :data:`SCALARS` (a scheme to come registers its own here)."""
    if any(s.quantity == quantity for s in SCALARS):
        raise ValueError(f"learned scalar {quantity!r} is registered twice")
    scalar = LearnedScalar(quantity, select, reduce)
    SCALARS.append(scalar)
    return scalar


def _flat(tensors: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def _attr(name: str) -> Callable[[nn.Module], List[torch.Tensor]]:
    return lambda sub: [] if getattr(sub, name, None) is None else [getattr(sub, name)]


def _dyt_alphas(sub: nn.Module) -> List[torch.Tensor]:
    return [m.alpha for m in sub.modules() if isinstance(m, DyT)]


register_scalar("rezero_alpha", _attr("gate"), lambda ts: _flat(ts).mean())
register_scalar("admin_omega_mean", _attr("omega"), lambda ts: _flat(ts).mean())
register_scalar("admin_omega_min", _attr("omega"), lambda ts: _flat(ts).min())
register_scalar("admin_omega_max", _attr("omega"), lambda ts: _flat(ts).max())
register_scalar("dyt_alpha", _dyt_alphas, lambda ts: _flat(ts).mean())


class LearnedScalarProbe(Probe):
    """The registered learned scalars (:data:`SCALARS`) the model has, per sublayer, before the
    step, every ``every`` steps; NaN where a sublayer lacks one the model has elsewhere."""

    def __init__(self, model: nn.Module, every: int, scalars: Optional[Sequence[LearnedScalar]] = None):
        subs = sublayer_modules(model)
        self.labels = [(layer, sub) for layer, sub, _ in subs]
        self.every = every
        found = [(s, [s.select(m) for _, _, m in subs]) for s in (SCALARS if scalars is None else scalars)]
        self.reads = [(s, tensors) for s, tensors in found if any(tensors)]
        self.quantities_before = tuple(s.quantity for s, _ in self.reads)
        self.device = next(model.parameters()).device

    def due(self, step: int, last: bool) -> bool:
        return bool(self.quantities_before) and bool(self.every) and step % self.every == 0

    @torch.no_grad()
    def before_update(self, x=None) -> torch.Tensor:
        nan = torch.full((), math.nan, device=self.device)
        return torch.stack([torch.stack([s.reduce(ts) if ts else nan for ts in per_sub])
                            for s, per_sub in self.reads])


def weight_probes(model: nn.Module, optimizer: torch.optim.Optimizer, train_cfg) -> List[Probe]:
    """The weight/optimizer-side probes that apply, for :func:`resnorm.train.callbacks.probe_callbacks`
    (one :class:`resnorm.train.callbacks.ProbeCallback` each): none when ``train.probes`` is false;
    ``param_norm``, the AdamW moments (``optim=adamw`` only) and the learned scalars (if the model has any) every
    ``train.log_every`` steps; the update every ``train.probe_every`` steps and the last (not when
    ``probe_every`` is 0)."""
    if not train_cfg.probes:
        return []
    probes: List[Probe] = [ParamNormProbe(model, train_cfg.log_every)]
    if isinstance(optimizer, torch.optim.AdamW):  # the Adam moments exist (see the module docstring)
        probes.append(OptimizerStateProbe(model, optimizer, train_cfg.log_every))
    if train_cfg.probe_every:
        probes.append(UpdateProbe(model, train_cfg.probe_every))
    scalars = LearnedScalarProbe(model, train_cfg.log_every)
    if scalars.quantities_before:
        probes.append(scalars)
    return probes
