"""Which jobs of a sweep train as one stack (``hydra.sweeper.stack``), and how a stack is handed to a job.

Jobs that differ only in :data:`resnorm.runs.identity.STACKABLE_KEYS` (seed, optimizer settings, warm-up,
the guard's thresholds) have the same parameter shapes, batch shape and loop length: they can be
trained as one stacked model in one process (:mod:`resnorm.train.stack`). :func:`stack_groups` groups them
by :func:`resnorm.runs.identity.stack_key`; a job that cannot be stacked (:func:`why_not_stackable`)
stays a group of one.

``hydra.sweeper.stack``: ``on`` stacks every group it can, ``off`` never, ``auto`` (the default)
stacks only where stacking was measured to pay. On the CPU it did not (benchmarks/bench_stack.py,
docs/scaling.md), so ``auto`` stacks only jobs that train on a CUDA device (not measured here).

A group of more than one job is launched as one launcher job: its first member's overrides plus
``+hydra.job.env_set.RESNORM_STACK=<file>`` (:func:`stack_override`); the file, in
``<sweep dir>/.stacks/``, lists every member's run id, folder, name, overrides and composed config
(:func:`write_group`), and the task function trains them together (:func:`resnorm.train.stack.run_stack_job`).
Each member still writes its own ordinary run folder, ``<sweep dir>/<member run_id>/``.

This module imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from resnorm.runs.identity import stack_key

#: hydra.sweeper.stack
STACK_MODES = ("auto", "on", "off")
#: the environment variable that makes a launcher job a stack (the name of its group file)
STACK_ENV = "RESNORM_STACK"
STACK_DIR = ".stacks"
#: variants whose model cannot be stacked (vmapped) exactly; every registered variant can today
#: (tests/test_stack.py checks each one against its solo forward and backward)
UNSTACKABLE_VARIANTS: Dict[str, str] = {}


def why_not_stackable(cfg: Any) -> Optional[str]:
    """Why this job must train alone (None: it can be stacked)."""
    t = cfg.train
    if int(t.devices) > 1:
        return "train.devices > 1 (data parallel)"
    if bool(t.compile):
        return "train.compile (the stacked step runs eagerly)"
    if int(t.get("grad_accum", 1)) > 1:
        return "train.grad_accum > 1 (the stacked step is one forward and backward of the whole batch)"
    if t.get("precision", "fp32") == "fp16":
        return "train.precision=fp16 (the stacked step has no gradient scaler)"
    if cfg.model.get("objective", "clm") != "clm":
        return f"model.objective={cfg.model.objective} (only the causal LM is checked against its solo runs)"
    if cfg.model.norm in UNSTACKABLE_VARIANTS:
        return f"model.norm={cfg.model.norm}: {UNSTACKABLE_VARIANTS[cfg.model.norm]}"
    return None


def stacks_here(cfg: Any) -> bool:
    """``auto``: whether stacking pays for this job, i.e. whether it trains on a CUDA device."""
    device = str(cfg.train.device)
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    from resnorm.train.devices import visible_gpus

    try:
        return bool(visible_gpus())
    except Exception:  # no driver: a CPU machine
        return False


def stack_groups(plans: Sequence[Any], mode: str) -> List[List[Any]]:
    """The plans (:class:`resnorm.sweep.plan.JobPlan`) as launch groups, in the plans' order (a group
    where its first member was): groups of jobs that differ only in stackable keys, and groups of one."""
    if mode not in STACK_MODES:
        raise ValueError(f"hydra.sweeper.stack={mode!r} is invalid: choose one of {', '.join(STACK_MODES)}")
    groups: Dict[str, List[Any]] = {}
    out: List[List[Any]] = []
    for i, plan in enumerate(plans):
        stack = mode == "on" or (mode == "auto" and stacks_here(plan.cfg))
        if not stack or why_not_stackable(plan.cfg) is not None:
            out.append([plan])
            continue
        key = stack_key(plan.cfg)
        if key not in groups:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(plan)
    return out


def group_file(sweep_dir: Path, leader_run_id: str) -> Path:
    return Path(sweep_dir) / STACK_DIR / f"{leader_run_id}.json"


def write_group(sweep_dir: Path, group: Sequence[Any]) -> Path:
    """Write the members of a stack (run id, folder, name, overrides, config) for its launcher job."""
    from omegaconf import OmegaConf

    from resnorm.runs.folder import write_text

    members = [dict(run_id=p.run_id, run_dir=str(p.run_dir), run_name=p.run_name or "default",
                    overrides=list(p.overrides), config=OmegaConf.to_container(p.cfg, resolve=True),
                    hydra=p.hydra_yaml) for p in group]
    return write_text(group_file(sweep_dir, group[0].run_id), json.dumps(dict(members=members), indent=1))


def read_group(path: Path) -> List[Dict[str, Any]]:
    return json.loads(Path(path).read_text())["members"]


def stack_override(path: Path) -> str:
    """The override that makes the leader's launcher job train the whole stack."""
    return f"+hydra.job.env_set.{STACK_ENV}={Path(path).name}"


def launch_overrides(sweep_dir: Path, groups: Sequence[Sequence[Any]]) -> List[List[str]]:
    """One launcher job per group: a group of one is its job's own overrides; a stack is its first
    member's overrides plus :func:`stack_override` (after writing the group's file)."""
    jobs = []
    for group in groups:
        if len(group) == 1:
            jobs.append(list(group[0].overrides))
        else:
            jobs.append(list(group[0].overrides) + [stack_override(write_group(sweep_dir, group))])
    return jobs


def group_labels(groups: Sequence[Sequence[Any]]) -> Dict[str, str]:
    """run_id -> ``s<k>`` for the members of the k-th stack (of more than one job), for the dry run."""
    labels, k = {}, 0
    for group in groups:
        if len(group) > 1:
            k += 1
            for plan in group:
                labels[plan.run_id] = f"s{k}"
    return labels
