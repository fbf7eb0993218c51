"""The optimizers ``optim.name`` chooses (``optim=adamw|sgd|muon``), one builder each in :data:`OPTIMIZERS`.

Every builder takes the model and the ``optim`` config and returns something the loop drives as one
optimizer: ``param_groups`` (each group's ``lr`` is set every step by :func:`resnorm.train.loop.set_lr`,
as the schedule's LR times the group's ``lr_scale``, 1 where absent), ``zero_grad``, ``step``,
``state``, ``state_dict`` / ``load_state_dict`` (the checkpoint).

- ``adamw`` (the default): ``torch.optim.AdamW`` with ``optim.beta1``, ``beta2``, ``eps``;
- ``sgd``: ``torch.optim.SGD`` with ``optim.sgd_momentum`` and ``optim.sgd_nesterov``; its weight
  decay is PyTorch's (L2 added to the gradient), so each step decays w by lr_t * weight_decay before
  momentum;
- ``muon``: ``torch.optim.Muon`` (orthogonalised momentum, Keller Jordan 2024) for the *hidden
  matrices* (:func:`muon_matrices`: the weight of every ``nn.Linear`` inside ``model.blocks``) and
  AdamW, as ``adamw`` above, for everything else (embeddings, the LM head, norms, biases, learned
  scalars, the multi-stream connection parameters), as its authors use it (Muon's README:
  "MuonWithAuxAdam"). ``optim.muon_lr`` is the Muon matrices' peak LR, ``optim.lr`` the AdamW part's;
  one schedule scales both. The two are one :class:`OptimizerChain`.

Weight decay (``optim.weight_decay``, ``optim.weight_decay_coupling``) is the same rule in all
three: matrices only (:func:`decay_groups`: never norms, biases, scalars or embeddings; the LM head
is a matrix), and ``independent`` divides it by the group's own peak LR, so the decay per step is
weight_decay x the schedule's factor whatever the peak. Keys of another optimizer (``optim.beta1``
under ``optim=sgd``, ``optim.muon_lr`` under ``optim=adamw``) are ignored, as a variant's options are
under another variant; each key's help names the optimizer that reads it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch
from torch import nn


def decay_groups(params: List[nn.Parameter], model, weight_decay: float) -> List[Dict[str, Any]]:
    """Two parameter groups of ``params``: the matrices (weight decay ``weight_decay``) and the rest
    (norms, biases, scalars, the token and position embeddings: no decay)."""
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def coupled_decay(optim_cfg, peak_lr: float) -> float:
    """The weight decay the optimizer is given: ``optim.weight_decay``, over ``peak_lr`` when the
    coupling is ``independent`` (Wortsman et al. 2023, arXiv:2309.14322 §3.2.2)."""
    wd = optim_cfg.weight_decay
    return wd / peak_lr if optim_cfg.weight_decay_coupling == "independent" else wd


def adamw(model, optim_cfg, params=None) -> torch.optim.AdamW:
    """AdamW over ``params`` (default: all the model's), weight decay on the matrices only."""
    params = list(model.parameters()) if params is None else params
    groups = decay_groups(params, model, coupled_decay(optim_cfg, optim_cfg.lr))
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                             eps=optim_cfg.eps, foreach=True)


def sgd(model, optim_cfg) -> torch.optim.SGD:
    """SGD with momentum (``optim.sgd_momentum``, ``optim.sgd_nesterov``), weight decay on the matrices only."""
    groups = decay_groups(list(model.parameters()), model, coupled_decay(optim_cfg, optim_cfg.lr))
    return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.sgd_momentum,
                           nesterov=optim_cfg.sgd_nesterov, foreach=True)


def muon_matrices(model) -> List[nn.Parameter]:
    """The hidden matrices Muon trains: the weight of every ``nn.Linear`` inside ``model.blocks``
    (attention QKV (one fused matrix), output projection and gate, the MLP's two layers). Not the
    embeddings, the LM head, norms, biases, learned scalars or the multi-stream parameters."""
    seen, out = set(), []
    for module in model.blocks.modules():
        w = module.weight if isinstance(module, nn.Linear) else None
        if w is not None and w.requires_grad and id(w) not in seen:
            seen.add(id(w))
            out.append(w)
    return out


def muon(model, optim_cfg) -> "OptimizerChain":
    """Muon for :func:`muon_matrices` at peak ``optim.muon_lr``, AdamW (as :func:`adamw`) for the rest."""
    matrices = muon_matrices(model)
    ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in ids]
    group = {"params": matrices, "lr_scale": optim_cfg.muon_lr / optim_cfg.lr}
    inner = torch.optim.Muon([group], lr=optim_cfg.muon_lr, weight_decay=coupled_decay(optim_cfg, optim_cfg.muon_lr),
                             momentum=optim_cfg.muon_momentum, nesterov=optim_cfg.muon_nesterov,
                             ns_steps=optim_cfg.muon_ns_steps, adjust_lr_fn=optim_cfg.muon_adjust_lr)
    return OptimizerChain([inner, adamw(model, optim_cfg, rest)])


class OptimizerChain:
    """Several optimizers over disjoint parameters, driven as one: ``param_groups`` is theirs in
    order (so :func:`resnorm.train.loop.set_lr` and ``torch.amp.GradScaler.unscale_`` reach every group),
    ``step`` and ``zero_grad`` call each, ``state`` is their states merged (keyed by parameter), and
    ``state_dict`` holds one state dict per optimizer."""

    def __init__(self, optimizers: List[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> Dict[Any, Dict[str, Any]]:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("OptimizerChain.step takes no closure")
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved = state["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"the state holds {len(saved)} optimizers, this chain {len(self.optimizers)}")
        for opt, s in zip(self.optimizers, saved):
            opt.load_state_dict(s)


#: optim.name -> builder(model, optim_cfg); resnorm.config.schema.OPTIMIZERS is a torch-free copy of the names
OPTIMIZERS: Dict[str, Callable[..., Any]] = {"adamw": adamw, "sgd": sgd, "muon": muon}


def task_optimizer(model, lr: float, recipe):
    """A fine-tune's optimizer: the recipe's AdamW groups (:func:`resnorm.tasks.recipe.optimizer_for`: the
    head at ``recipe.head_lr_scale`` times ``lr``), with the variant's rules as :func:`make_optimizer`
    applies them. The recipe's trials and the loop's fine-tune both train with it."""
    from resnorm.tasks.recipe import optimizer_for
    from resnorm.train.variant_optim import attach_post_step, scale_groups

    return attach_post_step(model, scale_groups(model, optimizer_for(model, lr, recipe)))


def make_optimizer(model, optim_cfg):
    """The optimizer ``optim.name`` names, built for ``model`` (see the module docstring), with the
    variant's per-group LR/epsilon multipliers (CompleteP) and post-step hook (nGPT's renormalisation):
    :mod:`resnorm.train.variant_optim`."""
    from resnorm.train.variant_optim import attach_post_step, scale_groups

    return attach_post_step(model, scale_groups(model, OPTIMIZERS[optim_cfg.name](model, optim_cfg)))
