"""The training loop's own state (:class:`LoopState`): what a checkpoint holds besides the model, the
optimizer, the sampler and the random states (:mod:`resnorm.train.checkpoint`)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from resnorm.train.spikes import SpikeTracker

FINAL_LOSS_WINDOW = 10  # final_train_loss is the mean of the last 10 steps' finite losses


@dataclass
class LoopState:
    """The loop's own state: what a checkpoint holds besides model, optimizer, sampler and RNG."""

    step: int = 0  # the next step to train
    initial_loss: Optional[float] = None  # the first step's loss: the guard's reference
    val_loss: Optional[float] = None  # the last evaluation
    best_val: float = math.inf
    train_time: float = 0.0  # seconds spent in steps, over every attempt
    wall_s: float = 0.0  # wall time of the earlier attempts
    recent_losses: List[float] = field(default_factory=list)  # the last FINAL_LOSS_WINDOW losses
    status: str = "running"  # running | completed | diverged
    diverged_step: Optional[int] = None
    diverge_reason: Optional[str] = None
    diverge_kind: Optional[str] = None  # the guard's verdict (resnorm.train.guard.divergence)
    spikes: SpikeTracker = field(default_factory=SpikeTracker)
    scaler_skipped_steps: List[int] = field(default_factory=list)  # fp16 (resnorm.train.precision)

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "LoopState":
        return cls(**{**state, "spikes": SpikeTracker(**state["spikes"])})

    def record_loss(self, loss: float) -> None:
        self.recent_losses = list(deque(self.recent_losses + [loss], maxlen=FINAL_LOSS_WINDOW))
