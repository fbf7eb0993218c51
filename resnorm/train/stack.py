"""Stacked ensembles: several runs of one shape trained as one stacked model in one process.

Every member is an ordinary :class:`resnorm.train.loop.Run` (:func:`resnorm.train.loop.setup` with its own
config: its model built from its own seed, its own optimizer, sampler, probes, callbacks, loop state,
run folder and W&B run). A step of the stack is the loop's own step, split where the forward is
(:func:`resnorm.train.loop.start_step`, :func:`resnorm.train.loop.end_step`): every member starts its step (its
learning rate, its batch), then **one** forward and backward for all (:func:`stacked_forward_backward`:
the members' parameters stacked along a leading dimension, ``torch.func.vmap`` of
``functional_call`` over it, the sum of the members' losses backward, so each member's ``.grad``
is exactly the gradient of its own loss), then every member ends its step as a solo run does (its
probes, guard, optimizer step with its own hyperparameters, evaluation, checkpoint, callbacks).

A member that diverges is finished at that step with its own outcome and leaves the stack; the
others go on. A stack resumes every member from its own checkpoint; members resumed at different
steps wait for the stack to reach them. On a step where a member's backward is hooked (the
stream-gradient monitor, :class:`resnorm.monitors.forward.StreamGradProbe`: its tensor hooks do not
run under vmap) the members do their forward and backward one after the other instead, as solo runs.

:func:`run_stack_job` is what a launcher job of a stack runs (``RESNORM_STACK`` set, see
:mod:`resnorm.train.stack_plan`): each member's lock, skip-if-done and failure record, as
:func:`resnorm.train.job.execute` for one job.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from resnorm.train.loop import end, end_step, forward_backward, setup, start, start_step

log = logging.getLogger(__name__)


class _Loss(nn.Module):
    """``model.loss`` as a module's forward, for ``functional_call``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


def hooked(run) -> bool:
    """Whether this step's backward of ``run`` is hooked (a sublayer's ``grad_sink`` is armed)."""
    return any(sub.grad_sink is not None for sub in run.model.sublayers())


def stacked_forward_backward(runs: Sequence[Any], xs: Sequence[torch.Tensor],
                             ys: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """One forward and backward for every member of ``runs`` (each on its own batch); each member's
    parameters get the gradient of its own loss. Returns the members' loss tensors."""
    from torch.func import functional_call, vmap

    if len(runs) == 1 or any(hooked(r) for r in runs):
        return [forward_backward(r, x, y) for r, x, y in zip(runs, xs, ys)]
    base = _Loss(runs[0].model)
    names = [n for n, _ in runs[0].model.named_parameters()]
    members = [dict(r.model.named_parameters()) for r in runs]
    params = {f"model.{n}": torch.stack([m[n] for m in members]) for n in names}
    buffers = [dict(r.model.named_buffers()) for r in runs]
    params.update({f"model.{n}": torch.stack([b[n] for b in buffers]) for n in buffers[0]})

    def loss(p, x, y):
        return functional_call(base, p, (x, y))

    with runs[0].autocast(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")  # CPU SDPA: a loop over members
        losses = vmap(loss)(params, torch.stack(list(xs)), torch.stack(list(ys)))
    losses.sum().backward()
    return list(losses.unbind(0))


def _share_wandb(run) -> None:
    """Members' W&B runs are open at once: each opens a new run instead of finishing the previous."""
    from resnorm.train.callbacks import WandbLogger

    for cb in run.callbacks.callbacks:
        if isinstance(cb, WandbLogger):
            cb.reinit = "create_new"


def fit_stack(cfgs: Sequence[Any], jobs: Sequence[Any], callbacks: Optional[Callable] = None,
              slots=None) -> List[Dict[str, Any]]:
    """Train the members (one config and job each, of one stack) together; return their summaries.
    With one member this is :func:`resnorm.train.loop.fit` (the same steps, the same numbers)."""
    from resnorm.train.callbacks import CallbackList, default_callbacks

    runs: List[Any] = []
    try:
        for cfg, job in zip(cfgs, jobs):
            run = setup(cfg, job, 0, 1, slots)
            run.callbacks = CallbackList((callbacks or default_callbacks)(run))
            _share_wandb(run)
            runs.append(run)
            start(run)
        active = list(runs)
        steps = int(cfgs[0].train.steps)
        for step in range(min(r.state.step for r in runs), steps):
            now = [r for r in active if r.state.step == step]
            if not now:
                continue
            begun = [start_step(r, step) for r in now]
            losses = stacked_forward_backward(now, [b[1] for b in begun], [b[2] for b in begun])
            for r, (rec, x, _), loss in zip(now, begun, losses):
                if end_step(r, rec, x, loss):  # diverged: finished now, with its own outcome
                    active.remove(r)
                    end(r)
        for r in active:
            end(r)
    finally:
        for r in runs:
            r.callbacks.teardown(r)
    return [r.summary for r in runs]


# --- a launcher job that trains a stack --------------------------------------------------------------

def member_jobs(path: Path) -> List[tuple]:
    """(config, JobInfo, entry) of every member of the stack file ``path`` (:func:`resnorm.train.stack_plan.write_group`)."""
    from omegaconf import OmegaConf

    from resnorm.train.stack_plan import read_group
    from resnorm.train.job import JobInfo

    out = []
    for m in read_group(path):
        cfg = OmegaConf.create(m["config"])
        out.append((cfg, JobInfo(Path(m["run_dir"]), m["run_name"], str(cfg.name), m["overrides"],
                                 m["run_id"]), m))
    return out


def _write_hydra_files(job, cfg, member: Dict[str, Any]) -> None:
    """A member's ``.hydra/`` (config, overrides, Hydra's node), as Hydra writes it for a solo job."""
    import yaml
    from omegaconf import OmegaConf

    from resnorm.runs.folder import write_text

    folder = Path(job.run_dir) / ".hydra"
    if (folder / "config.yaml").exists():
        return
    write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text(folder / "overrides.yaml", yaml.safe_dump(list(job.overrides), default_flow_style=False))
    if member.get("hydra"):
        write_text(folder / "hydra.yaml", member["hydra"])


@contextlib.contextmanager
def _log_to(path: Path):
    """The stack's log lines also in a member's ``run.log`` (Hydra writes the leader's), while it trains."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def execute_stack(members: Sequence[tuple], callbacks: Optional[Callable] = None) -> List[Dict[str, Any]]:
    """Lock every member's folder, skip the done ones (and those another process holds), train the
    rest as one stack; return every member's result, in order. A crash is each unfinished member's
    ``failed``."""
    from resnorm.train import devices
    from resnorm.runs.folder import DONE, job_lock, read_summary
    from resnorm.train.job import record_failure, admit

    results: Dict[int, Dict[str, Any]] = {}
    with contextlib.ExitStack() as locks:
        todo = []
        for i, (cfg, job, member) in enumerate(members):
            verdict = admit(job, locks.enter_context(job_lock(job.run_dir)))
            if verdict is None:
                _write_hydra_files(job, cfg, member)
                todo.append(i)
            else:
                results[i] = verdict
        if todo:
            cfg0 = members[todo[0]][0]
            for i in (i for i in todo if i != 0):  # the leader's run.log is Hydra's own
                locks.enter_context(_log_to(Path(members[i][1].run_dir) / "run.log"))
            try:
                with devices.claim(cfg0.train.device, 1) as slots:
                    done = fit_stack([members[i][0] for i in todo], [members[i][1] for i in todo],
                                     callbacks, slots)
                results.update(zip(todo, done))
            except Exception as exc:
                for i in todo:
                    prior = read_summary(members[i][1].run_dir) or {}
                    results[i] = prior if prior.get("status") in DONE else record_failure(members[i][1], exc)
    return [results[i] for i in range(len(members))]


def run_stack_job(cfg, name: str) -> Dict[str, Any]:
    """The task function's work for a launcher job that is a stack: ``name`` is its group file in
    ``<sweep dir>/.stacks/`` (the leader, ``cfg``, is the first member). Returns the leader's result
    with ``stack``: every member's result."""
    from resnorm.train.stack_plan import STACK_DIR
    from resnorm.train.job import JobInfo, job_result

    leader = JobInfo.from_hydra(cfg)
    members = member_jobs(Path(leader.run_dir).parent / STACK_DIR / name)
    log.info("stack of %d runs: %s", len(members), ", ".join(j.run_id for _, j, _ in members))
    results = execute_stack(members)
    for (_, job, _), summary in zip(members, results):
        log.info("run %s (stacked): %s, %s (final val loss %s)", job.run_name, summary.get("status"),
                 summary.get("outcome"), summary.get("final_val_loss"))
    stack = [job_result(s, **{k: s[k] for k in ("skipped", "note") if k in s}) for s in results]
    return {**stack[0], "stack": stack}
