"""A job's identity, and the name of the job folder it is kept in.

The identity (``run_id``) is the first 12 hex digits of the SHA-256 of the job's resolved config as
canonical JSON, without the keys in :data:`OPERATIONAL_KEYS`: those say where, how fast or how
verbosely a job runs (W&B and TensorBoard settings, progress bar, threads, device, number of DDP
processes, micro-batches per step, ``torch.compile``, checkpoint interval, the data cache's folder),
not what it computes. Everything else counts, the sweep's ``name`` included (it is the W&B group, and
the W&B run id is the identity, which W&B wants unique in a project). So the same job always gets the
same id, whatever launcher, machine or command line produced it. A key added to the schema later
declares its ``neutral`` value (:data:`resnorm.config.schema.METADATA_KEYS`: the value that reproduces the
behaviour from before it existed); at that value it is left out of the hash, so upgrading resnorm
leaves the identities of earlier runs, and a re-run of last month's sweep finds them done. A key
set to any other value counts, as every key does. (A key added without a ``neutral`` value changes
every id: tests/test_faults.py pins the default config's id to catch it.) The code version is not
part of the identity; every run records it (``git_commit`` in its summary, :mod:`resnorm.provenance`)
and the sweeper and the analysis say when one sweep mixes versions.

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
from typing import Any, Dict, Tuple

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
_ABSENT = object()
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


def neutral_keys(plain: Dict[str, Any]) -> Tuple[str, ...]:
    """The dotted keys of ``plain`` (a resolved config as plain dicts) that hold their schema ``neutral``
    value: keys added after runs were made, set to reproduce the behaviour from before they existed."""
    from resnorm.config.schema import leaves

    out = []
    for lf in leaves():
        if "neutral" not in lf.meta:
            continue
        node: Any = plain
        for part in lf.key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT and node == lf.meta["neutral"] and type(node) is type(lf.meta["neutral"]):
            out.append(lf.key)
    return tuple(out)


def unread_keys(plain: Dict[str, Any]) -> Tuple[str, ...]:
    """The dotted keys of ``plain`` whose schema ``read_by`` names the variants that read them, when the
    config's variant (``model.norm``) is not one of them: such a key cannot change what the run computes."""
    from resnorm.config.schema import leaves

    variant = (plain.get("model") or {}).get("norm") if isinstance(plain.get("model"), dict) else None
    return tuple(lf.key for lf in leaves() if "read_by" in lf.meta and variant not in lf.meta["read_by"])


def identity_config(cfg: Any) -> Dict[str, Any]:
    """What the identity hashes: the resolved config minus :data:`OPERATIONAL_KEYS` and minus every key
    at its schema ``neutral`` value (:func:`neutral_keys`), so adding a key that leaves behaviour as it
    was leaves every earlier run's identity as it was, and minus every key its run's variant does not read
    (:func:`unread_keys`)."""
    plain = _without(cfg, OPERATIONAL_KEYS)
    return _without(plain, neutral_keys(plain) + unread_keys(plain))


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
