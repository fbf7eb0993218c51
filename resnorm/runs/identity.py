"""A job's identity, and the name of the job folder it is kept in.

The identity (``run_id``) is the first 12 hex digits of the SHA-256 of the job's resolved config as
canonical JSON, without the keys in :data:`OPERATIONAL_KEYS`: those say where, how fast or how
verbosely a job runs (W&B and TensorBoard settings, progress bar, threads, device, number of DDP
processes, micro-batches per step, ``torch.compile``, checkpoint interval, the data cache's folder),
not what it computes. Everything else counts, the sweep's ``name`` included (it is the W&B group, and
the W&B run id is the identity, which W&B wants unique in a project). So the same job always gets the
same id, whatever launcher, machine or command line produced it; a config key added to the schema
later changes every id (the runs are then new runs).

In a multirun the job folder is ``multirun/<name>/<run_id>/`` (``hydra.sweep.subdir: ${run_id:}``
in ``conf/config.yaml``): re-running a sweep finds every job where it left it. The readable name
(Hydra's ``override_dirname``, e.g. ``depth=24,model.norm=post``) is the ``run_name`` in
``summary.json`` and the W&B run's display name; ``python run.py -m ... --dry-run`` prints the table
of both.

What the folder holds, its lock and what a re-run does with it (skip, resume, retry) are the run
folder's contract, :mod:`resnorm.runs.folder`.

This module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict

#: dotted keys that do not change what a job computes, so not part of its identity
OPERATIONAL_KEYS = (
    "logger",
    "train.progress",
    "train.threads",
    "train.device",
    "train.devices",
    "train.grad_accum",  # micro-batches of the same global batch: the same step, as train.devices
    "train.compile",
    "train.checkpoint_every",
    "train.keep_checkpoint",
    "data.cache_dir",  # where tokenizers and token streams are cached, not what they hold
)
# --- stacked ensembles ---
#: dotted keys that leave every parameter shape, the batch shape and the loop's length unchanged:
#: jobs of a sweep that differ only in these are trained as one stack (``hydra.sweeper.stack``,
#: :mod:`resnorm.train.stack`). Deliberately short: ``model.*``, ``depth``, ``data.*`` and every
#: ``train.*`` key that shapes a step or the loop (batch, sequence, steps, cadences) are not in it.
STACKABLE_KEYS = (
    "seed",
    "optim.lr",
    "optim.warmup_steps",
    "optim.schedule",
    "optim.min_lr_ratio",
    "optim.weight_decay",
    "optim.weight_decay_coupling",
    "optim.beta1",
    "optim.beta2",
    "optim.eps",
    "optim.grad_clip",
    "optim.skip_spikes",
    "train.diverge_factor",
    "train.stall_margin",
    "train.spike_window",
    "train.spike_sigma",
)
ID_LENGTH = 12
RESOLVER = "run_id"


def _plain(cfg: Any) -> Dict[str, Any]:
    """The resolved config as plain dicts and lists, without Hydra's own ``hydra`` node."""
    if isinstance(cfg, dict):
        return {k: v for k, v in cfg.items() if k != "hydra"}
    from omegaconf import OmegaConf

    out = {}
    for key in cfg:
        if key == "hydra":
            continue
        value = cfg[key]
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def identity_config(cfg: Any) -> Dict[str, Any]:
    """What the identity hashes: the resolved config minus :data:`OPERATIONAL_KEYS`."""
    return _without(cfg, OPERATIONAL_KEYS)


def _without(cfg: Any, keys) -> Dict[str, Any]:
    """A deep copy of the resolved config (as plain dicts) without the dotted ``keys``."""
    plain = json.loads(json.dumps(_plain(cfg)))  # a deep copy
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        node = plain
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return plain


def stack_key(cfg: Any) -> str:
    """What jobs trained as one stack share: the resolved config without :data:`STACKABLE_KEYS`
    (operational keys included: a stack runs on one device, with one thread count), as canonical JSON."""
    return json.dumps(_without(cfg, STACKABLE_KEYS), sort_keys=True, separators=(",", ":"), allow_nan=True)


def run_id(cfg: Any) -> str:
    """The job's identity: 12 hex digits of the SHA-256 of :func:`identity_config` as canonical JSON."""
    text = json.dumps(identity_config(cfg), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:ID_LENGTH]


def _resolve_run_id(_root_) -> str:
    return run_id(_root_)


def register_resolver() -> None:
    """Make ``${run_id:}`` (the identity of the config it appears in) usable in Hydra configs."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _resolve_run_id)
