"""A job's identity, and the job folder it is kept in.

The identity (``run_id``) is the first 12 hex digits of the SHA-256 of the job's resolved config as
canonical JSON, without the keys in :data:`OPERATIONAL_KEYS`: those say where, how fast or how
verbosely a job runs (W&B settings, progress bar, threads, device, number of DDP processes,
``torch.compile``, checkpoint interval), not what it computes. Everything else counts, the sweep's
``name`` included (it is the W&B group, and the W&B run id is the identity, which W&B wants unique
in a project). So the same job always gets the same id, whatever launcher, machine or command line
produced it; a config key added to the schema later changes every id (the runs are then new runs).

In a multirun the job folder is ``multirun/<name>/<run_id>/`` (``hydra.sweep.subdir: ${run_id:}``
in ``conf/config.yaml``): re-running a sweep finds every job where it left it. The readable name
(Hydra's ``override_dirname``, e.g. ``depth=24,model.norm=post``) is the ``run_name`` in
``summary.json`` and the W&B run's display name; ``python run.py -m ... --dry-run`` prints the table
of both.

A job folder holds one job: :func:`job_lock` takes an exclusive lock on ``<job>/.lock`` while the
job runs (released by the OS when the process dies, even by ``kill -9``), so two sweeps started
on the same folder (twice the same command, a requeued SLURM task) never train the same run at once.

This module imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator

from .store import read_summary

#: dotted keys that do not change what a job computes, so not part of its identity
OPERATIONAL_KEYS = (
    "logger",
    "train.progress",
    "train.threads",
    "train.device",
    "train.devices",
    "train.compile",
    "train.checkpoint_every",
    "train.keep_checkpoint",
)
ID_LENGTH = 12
RESOLVER = "run_id"
#: statuses after which a run is over: a re-run of the sweep skips it
DONE = ("completed", "diverged")


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
    plain = json.loads(json.dumps(_plain(cfg)))  # a deep copy
    for dotted in OPERATIONAL_KEYS:
        *parents, leaf = dotted.split(".")
        node = plain
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return plain


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


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoint.pt"


def job_state(run_dir: Path, rid: str) -> str:
    """What a re-run would do with the job folder: ``new``, ``completed``/``diverged`` (skip),
    ``resume`` (a checkpoint is there), ``retry`` (failed or interrupted before a checkpoint), or
    ``foreign`` (the folder holds another run)."""
    summary = read_summary(run_dir)
    if summary is None:
        return "resume" if checkpoint_path(run_dir).exists() else "new"
    if summary.get("run_id") not in (None, rid):
        return "foreign"
    status = summary.get("status")
    if status in DONE:
        return status
    return "resume" if checkpoint_path(run_dir).exists() else "retry"


@contextlib.contextmanager
def job_lock(run_dir: Path) -> Iterator[bool]:
    """Hold an exclusive, non-blocking lock on ``<run_dir>/.lock``; yields False if another process has it."""
    import fcntl

    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
