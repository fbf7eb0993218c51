"""A variant's optimizer rules: its optimizer preset, per-group LR/epsilon multipliers and
post-step hook, declared on :class:`resnorm.config.variants.Variant` and applied here, in three calls:

- :func:`apply_preset` (first in :func:`resnorm.train.loop.setup`): ``Variant.optim_preset`` replaces
  the schema default of its ``optim.*`` keys (nGPT: ``warmup_steps=0``, ``weight_decay=0``); the config
  RULE ``variant_optim_preset`` has already rejected any other explicit value. A value equal to the
  schema default cannot be told from no value and so takes the preset. The run's identity is the
  hash of the config as given (it determines the preset); ``summary.json``'s ``config`` holds what
  trained.
- :func:`scale_groups` (in :func:`resnorm.train.optimizers.make_optimizer`, for every ``optim.name``):
  ``Variant.param_group_scales`` splits each parameter group into the blocks' parameters ("hidden") and
  the rest ("other", embeddings, final norm, head, stream parameters), folding its LR factor into the
  group's ``lr_scale`` (read by :func:`resnorm.train.loop.set_lr`) and its epsilon factor into ``eps``
  (CompleteP's depth rules, stated for AdamW).
- :func:`attach_post_step` (in :func:`resnorm.train.optimizers.make_optimizer`): ``Variant.post_step`` names a hook
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

    from resnorm.config.variants import get_variant

    preset = get_variant(cfg.model.norm).optim_preset
    if not preset:
        return cfg
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else cfg
    with open_dict(out):
        for name, value in preset:
            out.optim[name] = value
    return out


def _inner(optimizer) -> List[torch.optim.Optimizer]:
    """The torch optimizers behind ``optimizer`` (an :class:`resnorm.train.optimizers.OptimizerChain`'s, or itself)."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


def scale_groups(model, optimizer):
    """Split every parameter group of the (not yet stepped) ``optimizer`` into the blocks' parameters
    ("hidden") and the rest ("other"), each with the variant's LR factor folded into its ``lr_scale``
    and its epsilon factor into its ``eps`` (where the optimizer has one); unchanged without a rule."""
    rule = model.variant.param_group_scales
    if rule is None:
        return optimizer
    scales = rule(model.shape.depth, model.shape.options)
    hidden = {id(p) for p in model.blocks.parameters()}
    for opt in _inner(optimizer):
        groups = []
        for group in opt.param_groups:
            for kind in ("hidden", "other"):
                params = [p for p in group["params"] if (id(p) in hidden) == (kind == "hidden")]
                if not params:
                    continue
                lr_scale, eps_scale = scales[kind]
                new = {**group, "params": params, "lr_scale": group.get("lr_scale", 1.0) * lr_scale}
                if "eps" in group:
                    new["eps"] = group["eps"] * eps_scale
                groups.append(new)
        opt.param_groups[:] = groups
    return optimizer


def _ngpt_renormalise(model) -> None:
    from resnorm.model.ngpt import normalize_matrices

    normalize_matrices(model)


#: post-step hooks by name (``Variant.post_step``): each takes the model
POST_STEP: Dict[str, Callable[[torch.nn.Module], None]] = {"ngpt_renormalise": _ngpt_renormalise}


def attach_post_step(model, optimizer):
    """Register the variant's post-step hook (none for most variants) on ``optimizer``, or on the last
    optimizer of a chain (so it runs once a step, after every part has stepped)."""
    name = model.variant.post_step
    if name is not None:
        hook = POST_STEP[name]
        _inner(optimizer)[-1].register_step_post_hook(lambda opt, args, kwargs: hook(model))
    return optimizer
