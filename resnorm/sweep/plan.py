"""The sweep plan: every job's identity, folder and state, the dry run's job table, and the outcome.

Shared between the resnorm sweeper plugin (which must live in ``hydra_plugins/resnorm_sweeper``)
and the entry point (``run.py`` reads :data:`resnorm.runs.progress.LAST_OUTCOME` for the exit code).
Imports no torch, except to count a dry run's parameters.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from resnorm.runs.identity import run_id
from resnorm.runs.folder import DONE, job_state, read_summary
from resnorm.runs.progress import PLAN_FILE, duration as _duration
from resnorm.model.flops import train_flops_per_token



@dataclass
class JobPlan:
    """One job of a sweep as the sweeper sees it before launching anything."""

    overrides: List[str]
    run_id: str
    run_dir: Optional[Path]  # None when the job folder cannot be known before the job runs
    state: str  # see resnorm.runs.folder.job_state; "unknown" without a run_dir
    cfg: Any  # the composed job config, without the hydra node (resnorm.sweep.fastplan.Values on the fast path)
    run_name: Optional[str] = None  # Hydra's override_dirname (the summary's run_name)
    hydra_yaml: Any = None  # the job's hydra node as Hydra saves it (.hydra/hydra.yaml), or a function making it
    prepared: Any = None  # a fast-planned job's resnorm.sweep.fastplan.Prepared (a launcher's workers build from it)

    @property
    def done(self) -> bool:
        return self.state in DONE

    def hydra_text(self) -> Optional[str]:
        return self.hydra_yaml() if callable(self.hydra_yaml) else self.hydra_yaml

    def config(self) -> Any:
        """The job config as a DictConfig (made from the plain values on the fast path)."""
        from omegaconf import OmegaConf

        return OmegaConf.create(dict(self.cfg)) if isinstance(self.cfg, dict) else self.cfg

    def plain_config(self) -> Dict[str, Any]:
        """The resolved job config as plain dicts and lists (a copy)."""
        import json

        from omegaconf import OmegaConf

        if isinstance(self.cfg, dict):
            return json.loads(json.dumps(self.cfg))
        return OmegaConf.to_container(self.cfg, resolve=True)

    def state_label(self) -> str:
        if self.done:
            return f"done: {self.state}"
        if self.state == "resume":
            step = checkpoint_step(self.run_dir, self.run_id)
            return "resume? (checkpoint unreadable: restarts)" if step is None else f"resume @{step}"
        if self.state == "retry":
            status = (read_summary(self.run_dir) or {}).get("status")
            return f"retry ({status})" if status else "retry"
        return self.state


def checkpoint_step(run_dir: Path, rid: str) -> Optional[int]:
    """The step the run folder's checkpoint resumes from; None if it does not open or is not run
    ``rid``'s (then the job restarts: :func:`resnorm.train.checkpoint.load`, its warning kept quiet)."""
    import logging

    from resnorm.train import checkpoint

    quiet = logging.getLogger(checkpoint.__name__)
    level, quiet.level = quiet.level, logging.ERROR
    try:
        state = checkpoint.load(checkpoint.checkpoint_path(run_dir), rid)
        return None if state is None else int(state["step"])
    finally:
        quiet.setLevel(level)


def plan_job(overrides: Sequence[str], cfg: Any, run_dir: Optional[Path], run_name: Optional[str] = None,
             hydra_yaml: Any = None, rid: Optional[str] = None,
             indexed: Optional[Dict[Tuple[str, str], str]] = None, prepared: Any = None) -> JobPlan:
    """The job's plan; ``indexed``: the runs the sweep folder's index says are done
    (:func:`resnorm.runs.index.done_runs`), whose state is taken from it instead of their folder."""
    rid = rid or run_id(cfg)
    if run_dir is None:
        state = "unknown"
    else:
        state = (indexed or {}).get((str(run_dir), rid)) or job_state(run_dir, rid)
    return JobPlan(list(overrides), rid, run_dir, state, cfg, run_name, hydra_yaml, prepared)


def duplicates(plans: Sequence[JobPlan]) -> Optional[Tuple[JobPlan, JobPlan]]:
    """Two jobs that are the same run (same folder), if any."""
    seen = {}
    for plan in plans:
        key = plan.run_dir if plan.run_dir is not None else plan.run_id
        if key in seen:
            return seen[key], plan
        seen[key] = plan
    return None


def version_note(plans: Sequence[JobPlan]) -> Optional[str]:
    """One line when the sweep's runs would come from more than one code version: the finished ones'
    ``git_commit`` (their summaries) and this checkout's for the jobs still to run; else None."""
    from resnorm.runs.provenance import git_commit, mixed_versions

    current = git_commit()
    commits = [(read_summary(p.run_dir) or {}).get("git_commit") if p.done else current for p in plans]
    mixed = mixed_versions(commits)
    if mixed is None:
        return None
    return (f"this sweep mixes code versions ({mixed}; the jobs to run use this checkout's): compare its runs "
            "only if the changes between them cannot move the numbers, or start a new sweep name")


# --- the dry run's job table ---------------------------------------------------------------------

def model_size(cfg) -> Tuple[int, int]:
    """(all parameters, parameters outside embedding tables), counted on the meta device: the model
    as constructed, without the init scheme and Admin's profiling pass, which set values, not shapes
    (tests/test_fastplan.py checks the counts against :func:`resnorm.model.transformer.build_model`)."""
    import torch

    from resnorm.model.transformer import ModelShape, Transformer

    try:
        with torch.device("meta"):
            model = Transformer(ModelShape.from_config(cfg))
    except Exception:  # a module that needs real tensors: build it on the CPU
        model = Transformer(ModelShape.from_config(cfg))
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)
                    for p in m.parameters(recurse=False))
    return total, total - embedding


#: model shape -> (parameters, matmul parameters), counted once per process
_SIZES: Dict[str, Tuple[int, int]] = {}


def job_costs(plans: Sequence[JobPlan]) -> List[Tuple[int, float]]:
    """``(parameters, estimated FLOPs)`` of each plan (:func:`train_flops`); jobs with the same model
    shape share one size count (a grid of seeds or learning rates builds each model once)."""
    import json

    from omegaconf import OmegaConf

    sizes = _SIZES
    out = []
    for plan in plans:
        model = json.dumps(plan.cfg["model"], sort_keys=True) if isinstance(plan.cfg, dict) else OmegaConf.to_yaml(
            plan.cfg.model)
        key = model + f"depth={plan.cfg.depth}"
        if key not in sizes:
            sizes[key] = model_size(plan.config())
        n_params, n_matmul = sizes[key]
        out.append((n_params, train_flops(plan.cfg, n_matmul)))
    return out


def longest_first(plans: Sequence[JobPlan]) -> List[JobPlan]:
    """``plans`` ordered by estimated training FLOPs, largest first (ties keep their order).

    With jobs in parallel on a few cores or GPUs, starting the long ones first shortens the sweep:
    when the long ones go last (a depth grid written small to large), they run while the other
    workers sit idle.
    """
    costs = job_costs(plans)
    order = sorted(range(len(plans)), key=lambda i: -costs[i][1])
    return [plans[i] for i in order]


def train_flops(cfg, n_matmul: int) -> float:
    """Training plus evaluation FLOPs of a job (:func:`train_flops_per_token`; N = parameters
    outside the embedding tables)."""
    t = cfg.train
    per_token = train_flops_per_token(n_matmul, cfg.depth, cfg.model.d_model, t.seq_len)
    tokens = t.steps * t.batch_size * t.seq_len
    evals = math.ceil(t.steps / t.eval_every)
    eval_tokens = evals * t.eval_batches * t.batch_size * t.seq_len
    return per_token * tokens + per_token / 3 * eval_tokens


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _split_common(plans: Sequence[JobPlan]) -> Tuple[List[str], List[List[str]]]:
    """(overrides every job has, each job's other overrides): the table shows what varies."""
    if len(plans) < 2:
        return [], [p.overrides for p in plans]
    common = [o for o in plans[0].overrides if all(o in p.overrides for p in plans[1:])]
    return common, [[o for o in p.overrides if o not in common] for p in plans]


def job_table(plans: Sequence[JobPlan], flops_per_s: float, sweep_dir: str, launcher: str,
              stacks: Optional[Dict[str, str]] = None) -> str:
    """The dry run's report: one row per job, then the totals. ``stacks``: run_id -> the label of the
    stack it trains in (:func:`resnorm.train.stack_plan.group_labels`), shown as a column."""
    from resnorm.sweep.packing import dry_run_slots, job_memory_bytes

    stacks = stacks or {}
    header = (("#", "run_id", "state", "params", "mem/job", "FLOPs", "est. time") + (("stack",) if stacks else ())
              + ("overrides",))
    common, own = _split_common(plans)
    rows, todo_flops, todo, memory = [], 0.0, 0, []
    for i, (plan, (n_params, flops)) in enumerate(zip(plans, job_costs(plans))):
        if not plan.done:
            todo_flops += flops
            todo += 1
        memory.append(job_memory_bytes(plan.cfg, n_params))  # on a GPU: resnorm.sweep.packing
        rows.append((str(i), plan.run_id, plan.state_label(), _si(n_params), _si(memory[-1]) + "B", _si(flops),
                     _duration(flops / flops_per_s)) + ((stacks.get(plan.run_id, "-"),) if stacks else ())
                    + (" ".join(own[i]) or "(defaults)",))
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header) - 1)]
    lines = [f"dry run: {len(plans)} jobs, sweep folder {sweep_dir}/<run_id>, launcher {launcher}; "
             "nothing is launched"]
    if common:
        lines.append(f"every job: {' '.join(common)}")
    for r in [header, *rows]:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
    slots = dry_run_slots(max(memory, default=0.0), launcher)
    if slots:
        lines.append(slots)
    versions = version_note(plans)
    if versions:
        lines.append(f"warning: {versions}")
    done = len(plans) - todo
    lines.append(f"to run: {todo} of {len(plans)} jobs, {_si(todo_flops)}FLOP, about {_duration(todo_flops / flops_per_s)} "
                 f"one after the other at {flops_per_s:.2g} FLOP/s per job (hydra.sweeper.flops_per_s); "
                 f"already done: {done}")
    if stacks:
        sizes = Counter(stacks.values())
        lines.append(f"stacked: {len(sizes)} stack(s) of {', '.join(str(n) for n in sizes.values())} jobs "
                     "(column 'stack'; each trains as one stacked model in one process, hydra.sweeper.stack)")
    return "\n".join(lines)


# --- the launch's record, read by the progress line (resnorm.runs.progress) -------------------------


def write_plan(sweep_dir: Path, plans: Sequence[JobPlan], launched: Sequence[Sequence[JobPlan]] = ()) -> None:
    """Start the progress counters of this launch (:mod:`resnorm.runs.index`): ``launched`` holds the
    plans of each launcher job in launch order (a stack is one job of several runs; default: each
    plan not done, one job each); each finished job adds its runs and its estimated FLOPs
    (:func:`resnorm.runs.progress.progress_line`)."""
    import json
    import time

    from resnorm.runs.folder import write_text
    from resnorm.runs.index import read_index, start_counters

    launched = list(launched) or [[p] for p in plans if not p.done]
    costs = iter([c for _, c in job_costs([p for group in launched for p in group])])
    flops = [sum(next(costs) for _ in group) for group in launched]
    index = read_index(sweep_dir)
    done: Counter = Counter((index.get(p.run_id) or {}).get("outcome") or p.state for p in plans if p.done)
    start_counters(sweep_dir, flops, len(plans), done)
    write_text(Path(sweep_dir) / PLAN_FILE, json.dumps(dict(started_at=time.time(), runs=len(plans),
                                                            jobs=len(launched))))
