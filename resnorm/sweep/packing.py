"""Packed jobs: several jobs of a sweep on one GPU at a time (``hydra.launcher.jobs_per_device``).

The small models of a depth sweep leave most of a large GPU idle. With ``jobs_per_device=N`` the
``local`` launcher gives each GPU N slots, each a lock of its own (:mod:`resnorm.train.devices`), so N jobs
share the GPU; ``auto`` picks N per GPU from the GPU's free memory and the largest job's estimated
memory (:func:`job_memory_bytes`):

    N = floor(free * PACK_SAFETY / job memory), at least 1, at most PACK_MAX.

The estimate (fp32 weights, gradients and AdamW's two moments: 16 bytes a parameter; the
activations a layer keeps for the backward pass, after Korthikanti et al., arXiv:2205.05198 (their
34 s b h bytes a layer at 16 bits): about (9 d + 2 d_ff) values a token, plus 2 heads x seq_len of
attention scores where they are materialised (``model.attn_softcap``; SDPA's fused GPU kernels keep
none); the logits and their gradient, 3 x vocab
values a token, in fp32; and :data:`CUDA_CONTEXT_BYTES` for the process's CUDA context) was written
without a GPU to check it on: the safety factor and the context size are guesses, not measurements.

Only the free-memory query touches a GPU (:func:`cuda_free_bytes`); everything else takes numbers
as arguments, so it is tested on the CPU. CPU jobs are not packed (one core each, as before).
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Union

from resnorm.errors import ConfigError

KEY = "hydra.launcher.jobs_per_device"
PACK_SAFETY = 0.8  # of a GPU's free memory that auto packing fills
PACK_MAX = 8  # jobs on one GPU at most (auto): more only share its compute thinner
CUDA_CONTEXT_BYTES = 1 << 30  # a process's CUDA context and allocator slack (a guess: no GPU here)

JobsPerDevice = Union[int, str]


def parse_jobs_per_device(value: Any) -> JobsPerDevice:
    """``hydra.launcher.jobs_per_device``: a positive integer, or ``auto``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and value.strip().isdigit():
        n = int(value)
    else:
        n = 0
    if n < 1:
        raise ConfigError(KEY, value, "must be a positive integer or 'auto'")
    return n


def job_memory_bytes(cfg, n_params: int) -> float:
    """Estimated GPU memory of one process of the job ``cfg`` (a model of ``n_params`` parameters):
    see the module docstring. With ``train.devices`` > 1 each process holds the whole model and its
    share of the batch."""
    m, t = cfg.model, cfg.train
    d, d_ff = int(m.d_model), int(m.d_ff or 4 * m.d_model)
    tokens = max(1, int(t.batch_size) // max(1, int(t.devices))) * int(t.seq_len)
    per_token = 9 * d + 2 * d_ff + (2 * int(m.n_heads) * int(t.seq_len) if m.get("attn_softcap") else 0)
    act_bytes = 2 if t.get("precision") == "bf16" else 4
    activations = int(cfg.depth) * tokens * per_token * act_bytes
    logits = 3 * tokens * int(m.vocab_size) * 4
    return 16.0 * n_params + activations + logits + CUDA_CONTEXT_BYTES


def auto_jobs_per_device(free_bytes: float, job_bytes: float) -> int:
    """How many jobs of ``job_bytes`` fit in ``free_bytes`` of one GPU: in [1, PACK_MAX]."""
    return max(1, min(PACK_MAX, math.floor(free_bytes * PACK_SAFETY / max(job_bytes, 1.0))))


def slots_per_device(setting: JobsPerDevice, n_devices: int, free_bytes: Callable[[], Sequence[float]],
                     job_bytes: Callable[[], float]) -> List[int]:
    """Jobs at a time on each of ``n_devices`` GPUs. ``free_bytes`` (each GPU's free memory) and
    ``job_bytes`` (the largest job's estimate) are only called for ``auto``."""
    if setting != "auto":
        return [int(setting)] * n_devices
    need = job_bytes()
    return [auto_jobs_per_device(free, need) for free in free_bytes()]


def cuda_free_bytes(indices: Sequence[int]) -> List[float]:
    """Free memory of each CUDA device now (``torch.cuda.mem_get_info``): the one GPU-only call.

    Asked in a child process: in the sweep's own process the query would create a CUDA context on
    every GPU (hundreds of MB each) and keep it for the whole sweep, beside the jobs."""
    import json
    import subprocess
    import sys

    code = ("import json, sys, torch; print(json.dumps([torch.cuda.mem_get_info(i)[0] "
            "for i in json.loads(sys.argv[1])]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(list(indices))], capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{KEY}=auto: could not read the GPUs' free memory: {last}")
    return [float(b) for b in json.loads(out.stdout.strip().splitlines()[-1])]


def describe(per_device: Sequence[int], setting: JobsPerDevice, job_bytes: Optional[float] = None) -> str:
    """``3 jobs per device (hydra.launcher.jobs_per_device=auto: 1.2 GB a job)`` and the like."""
    counts = sorted(set(per_device))
    text = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    why = f"{KEY.rsplit('.', 1)[-1]}={setting}"
    if job_bytes is not None:
        why += f": {job_bytes / 1e9:.3g} GB a job"
    return f"{text} job(s) per device ({why})"


#: the ``local`` launcher the sweep set up last (``ParallelLauncher.setup``): the dry run's job table
#: shows its slots, as Hydra hands the sweeper's table no launcher (kept here, not on the class:
#: Hydra's plugin scan executes the plugin modules again, which makes a new class)
LATEST_LAUNCHER: Optional[Any] = None


def dry_run_slots(job_bytes: float, launcher: str) -> Optional[str]:
    """The dry run's line on the ``local`` launcher's slots, with ``job_bytes`` the largest job's
    estimate; None under another launcher (``launcher``: the class name the job table shows)."""
    from resnorm.train.devices import format_pool

    if launcher != "ParallelLauncher" or LATEST_LAUNCHER is None:
        return None
    slots, text = LATEST_LAUNCHER.slots(lambda: job_bytes)
    if not slots:
        return "slots: none (CPU: one core per job)"
    return f"slots: {format_pool(slots)} ({text})"
