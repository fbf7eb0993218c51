"""A run's checkpoint: everything needed to continue it bit for bit, in ``<job>/checkpoint.pt``.

Written atomically every ``train.checkpoint_every`` steps (and never at the last step); removed
when the run completes or diverges, unless ``train.keep_checkpoint=true`` (then it holds the final
state). A resumed run continues from the checkpoint's step with the same:

- model and optimizer state (AdamW moments and step counts), and hence the learning-rate schedule,
  which is a function of the step;
- batch sampler generator, torch CPU (and CUDA) random states;
- rows stored so far (metrics and per-layer tables; see :meth:`resnorm.runfolder.RunStore.state_dict`),
  the probes' state (if a probe has any), the initial loss (the divergence guard's reference), best
  and last validation loss, training time and attempts so far.

A checkpoint of another run (its ``run_id`` differs) or an unreadable one is ignored with a warning:
the run then starts over.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .runfolder import atomic_write

log = logging.getLogger(__name__)
FORMAT = 1


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
        log.warning("ignoring checkpoint %s: it belongs to run %s, not %s", path, state.get("run_id"), run_id)
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
