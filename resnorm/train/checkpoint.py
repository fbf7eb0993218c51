"""A run's checkpoint: everything needed to continue it bit for bit, in ``<job>/checkpoint.pt``.

Written atomically every ``train.checkpoint_every`` steps (and never at the last step) by
:class:`resnorm.train.callbacks.Checkpointer`; removed when the run completes or diverges, unless
``train.keep_checkpoint=true`` (then it holds the final state). It holds (:func:`save_run`):

- ``model`` and ``optimizer`` state (AdamW moments and step counts; every optimizer's under
  ``optim=muon``), and hence the learning-rate schedule, which is a function of the step;
- ``scaler``: the fp16 gradient scaler's state (its scale and growth tracker), when there is one;
- ``sampler`` (the batch sampler's generator) and ``rng`` (torch CPU, and CUDA, random states);
- ``loop``: the :class:`resnorm.train.state.LoopState` (next step, initial loss, best and last validation
  loss, the last losses, training and wall time so far);
- ``callbacks``: each named callback's ``state_dict`` (the run store's rows so far, so a resumed run
  continues the tables from the checkpoint's step and never stores a step twice).

A checkpoint of another run (its ``run_id`` differs), of another format, or an unreadable one is
ignored with a warning: the run then starts over.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from resnorm.runs.folder import atomic_write, checkpoint_path

log = logging.getLogger(__name__)
FORMAT = 2  # 2: the loop's state as one LoopState record and the callbacks' states by name


def save(path: Path, state: Dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def load(path: Path, run_id: str) -> Optional[Dict[str, Any]]:
    """The checkpoint at ``path`` if it belongs to ``run_id``; else None."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint that cannot be read is no reason to lose the run
        log.warning("ignoring unreadable checkpoint %s (%s: %s); the run starts over", path,
                    type(exc).__name__, exc)
        return None
    if state.get("format") != FORMAT or state.get("run_id") != run_id:
        log.warning("ignoring checkpoint %s: it belongs to run %s (format %s), not %s (format %s)", path,
                    state.get("run_id"), state.get("format"), run_id, FORMAT)
        return None
    return state


def rng_state(device: torch.device) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_run(run) -> None:
    """Checkpoint a :class:`resnorm.train.loop.Run` as it stands after its last finished step."""
    loop = {**run.state.state_dict(), "wall_s": run.wall_s()}  # a resumed attempt adds its own
    save(checkpoint_path(run.job.run_dir), dict(
        run_id=run.summary["run_id"], step=run.state.step, model=run.model.state_dict(),
        optimizer=run.optimizer.state_dict(), sampler=run.sampler.generator.get_state(),
        rng=rng_state(run.device), loop=loop, callbacks=run.callbacks.state_dict(),
        **({} if run.scaler is None else {"scaler": run.scaler.state_dict()}),
    ))


def restore(run, callbacks) -> bool:
    """Continue ``run`` from its job folder's checkpoint, if it has one of this run; True if it did."""
    from resnorm.train.state import LoopState

    state = load(checkpoint_path(run.job.run_dir), run.summary["run_id"])
    if state is None:
        return False
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    run.sampler.generator.set_state(state["sampler"])
    set_rng_state(state["rng"], run.device)
    run.state = LoopState.from_state_dict(state["loop"])
    for cb in callbacks.callbacks:
        if cb.name and cb.name in state["callbacks"]:
            cb.load_state_dict(state["callbacks"][cb.name])
    step = run.state.step
    run.summary.update(initial_loss=run.state.initial_loss, steps_done=step, resumed_from_step=step,
                       checkpoint_step=step)
    log.info("run %s resumes from its checkpoint at step %d", run.summary["run_id"], step)
    return True
