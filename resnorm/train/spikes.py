"""Online spike detection (OLMo-core's rule): a loss or a global gradient norm above the mean plus
``sigma`` standard deviations of the previous ``window`` finite values of the same series.

:func:`is_spike` is a pure function of the value and the history; :class:`SpikeTracker` keeps the
two histories (loss, gradient norm) and the spike and skipped steps, and is part of
:class:`resnorm.train.loop.LoopState`, so its state survives a resume. Until ``window`` finite values
have been seen nothing counts as a spike (OLMo-core's ``SkipStepAdamW`` waits for a full window
too). The standard deviation is the population one (``ddof=0``). Non-finite values are not
spikes (the divergence guard handles them) and are not added to the history.

``optim.skip_spikes=true`` skips the update of a spike step (the optimizer state is untouched);
off by default, since skipping hides the instability under study.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence


def is_spike(value: float, history: Sequence[float], sigma: float, window: int) -> bool:
    """``value > mean + sigma * sd`` of the last ``window`` values of ``history`` (once it has that many)."""
    if not math.isfinite(value) or len(history) < window:
        return False
    recent = history[-window:]
    mean = sum(recent) / window
    sd = math.sqrt(sum((v - mean) ** 2 for v in recent) / window)
    return value > mean + sigma * sd


@dataclass
class SpikeTracker:
    """The histories and the steps found; ``observe`` once per step."""

    window: int = 128
    sigma: float = 6.0
    losses: List[float] = field(default_factory=list)
    grad_norms: List[float] = field(default_factory=list)
    spike_steps: List[int] = field(default_factory=list)
    skipped_steps: List[int] = field(default_factory=list)

    def observe(self, step: int, loss: float, grad_norm: float) -> bool:
        """Whether this step's loss or gradient norm is a spike; then add both to their histories."""
        spike = (is_spike(loss, self.losses, self.sigma, self.window)
                 or is_spike(grad_norm, self.grad_norms, self.sigma, self.window))
        for series, value in ((self.losses, loss), (self.grad_norms, grad_norm)):
            if math.isfinite(value):
                series.append(value)
                del series[:-self.window]
        if spike:
            self.spike_steps.append(step)
        return spike

    def state_dict(self) -> Dict:
        return asdict(self)
