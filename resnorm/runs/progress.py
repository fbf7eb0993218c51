"""A sweep's progress from its counters (:mod:`resnorm.runs.index`): the line printed after each job of
a multirun, and the outcome counts of the last sweep run in this process (the entry point's exit code).
Torch-free."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from resnorm.runs.folder import PLAN_FILE  # noqa: F401  (the sweep folder's launch record, read by the sweeper)

#: statuses of the jobs of the last sweep run in this process (read by run.py for the exit code),
#: the jobs skipped because their folder says they are done included
LAST_OUTCOME: Counter = Counter()



def duration(seconds: float) -> str:
    if seconds < 1:
        return "<1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_line(sweep_dir: Path, outcomes: Sequence[str], job_num: Optional[int]) -> Optional[str]:
    """``sweep NAME: k/N finished (outcomes so far), about T left`` after launcher job ``job_num``
    finished with its runs' ``outcomes``; None outside a launched sweep. O(1): the counters of
    :mod:`resnorm.runs.index`, never the sibling runs' files.

    T extrapolates the wall time so far over the estimated FLOPs of the jobs still to finish (so
    parallel workers are accounted for), from the counters :func:`resnorm.sweep.plan.write_plan`
    started at the launch.
    """
    from resnorm.runs.index import count_finished, job_flops

    counters = count_finished(sweep_dir, outcomes, job_flops(sweep_dir, job_num))
    if counters is None:
        return None
    counts = counters["counts"]
    text = f"sweep {Path(sweep_dir).name}: {counters['finished']}/{counters['runs']} finished"
    if counts:
        text += " (" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")"
    done_flops, left_flops = counters["done_flops"], counters["flops"] - counters["done_flops"]
    if done_flops > 0 and left_flops > 0:
        text += f", about {duration((time.time() - counters['started_at']) * left_flops / done_flops)} left"
    return text
