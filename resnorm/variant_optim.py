"""A variant's optimizer rules (issue 13): its optimizer preset, per-group LR/epsilon multipliers and
post-step hook, declared on :class:`resnorm.variants.Variant` and applied here, in three calls:

- :func:`apply_preset` (in :func:`resnorm.loop.fit`, before set-up): ``Variant.optim_preset`` replaces
  the schema default of its ``optim.*`` keys (nGPT: ``warmup_steps=0``, ``weight_decay=0``); the config
  RULE ``variant_optim_preset`` has already rejected any other explicit value. A value equal to the
  schema default cannot be told from no value and so takes the preset. The run's identity is the
  hash of the config as given (it determines the preset); ``summary.json``'s ``config`` holds what
  trained.
- :func:`scaled_groups` (in :func:`resnorm.loop.make_optimizer`): ``Variant.param_group_scales`` splits
  each parameter group into the blocks' parameters ("hidden") and the rest ("other", embeddings,
  final norm, head, stream parameters) with an ``lr_scale`` (read by :func:`resnorm.loop.set_lr`)
  and an ``eps`` each (CompleteP's depth rules).
- :func:`attach_post_step` (in :func:`resnorm.loop.make_optimizer`): ``Variant.post_step`` names a hook
  of :data:`POST_STEP` registered with ``optimizer.register_step_post_hook``, so it runs after every
  optimizer step, whoever takes it (the loop, the reproductions, a test): the one mechanism for
  nGPT's renormalisation. A skipped or diverged step takes no optimizer step and so no hook.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch


def apply_preset(cfg):
    """``cfg`` with its variant's optimizer preset in place of the schema defaults (a copy when there
    is one; ``cfg`` itself otherwise)."""
    from omegaconf import OmegaConf, open_dict

    from .variants import get_variant

    preset = get_variant(cfg.model.norm).optim_preset
    if not preset:
        return cfg
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else cfg
    with open_dict(out):
        for name, value in preset:
            out.optim[name] = value
    return out


def _hidden_ids(model) -> set:
    return {id(p) for p in model.blocks.parameters()}


def scaled_groups(model, groups: List[dict], optim_cfg) -> List[dict]:
    """The parameter groups with the variant's LR (``lr_scale``) and epsilon multipliers, or unchanged."""
    rule = model.variant.param_group_scales
    if rule is None:
        return groups
    scales = rule(model.shape.depth, model.shape.options)
    hidden = _hidden_ids(model)
    out = []
    for group in groups:
        for kind in ("hidden", "other"):
            params = [p for p in group["params"] if (id(p) in hidden) == (kind == "hidden")]
            if params:
                lr_scale, eps_scale = scales[kind]
                out.append({**group, "params": params, "lr_scale": lr_scale, "eps": optim_cfg.eps * eps_scale})
    return out


def _ngpt_renormalise(model) -> None:
    from .ngpt import normalize_matrices

    normalize_matrices(model)


#: post-step hooks by name (``Variant.post_step``): each takes the model
POST_STEP: Dict[str, Callable[[torch.nn.Module], None]] = {"ngpt_renormalise": _ngpt_renormalise}


def attach_post_step(model, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Register the variant's post-step hook on ``optimizer`` (none for most variants)."""
    name = model.variant.post_step
    if name is not None:
        hook = POST_STEP[name]
        optimizer.register_step_post_hook(lambda opt, args, kwargs: hook(model))
    return optimizer
