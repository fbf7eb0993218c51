"""A sweep's progress as its run folders show it: the line printed after each job of a multirun, and the
outcome counts of the last sweep run in this process (the entry point's exit code). Torch-free."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from resnorm.runs.folder import DONE, read_summary

#: statuses of the jobs of the last sweep run in this process (read by run.py for the exit code),
#: the jobs skipped because their folder says they are done included
LAST_OUTCOME: Counter = Counter()

PLAN_FILE = ".sweep.json"  # in the sweep folder: the launched jobs and their estimated FLOPs (resnorm.sweep.plan.write_plan)


def duration(seconds: float) -> str:
    if seconds < 1:
        return "<1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_line(sweep_dir: Path) -> Optional[str]:
    """``sweep NAME: k/N finished (outcomes so far), about T left``, or None outside a planned sweep.

    T extrapolates the wall time so far over the estimated FLOPs of the jobs still to finish (so
    parallel workers are accounted for), from the plan :func:`resnorm.sweep.plan.write_plan` wrote at the launch.
    """
    try:
        plan = json.loads((Path(sweep_dir) / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    counts: Counter = Counter()
    done_flops = left_flops = 0.0
    for job in plan.get("jobs", []):
        summary = read_summary(Path(sweep_dir) / job["run_id"]) or {}
        status = summary.get("status")
        if status in DONE or status == "failed":
            counts[summary.get("outcome") or status] += 1
            done_flops += job["flops"]
        else:
            left_flops += job["flops"]
    finished, total = sum(counts.values()), len(plan.get("jobs", []))
    text = f"sweep {Path(sweep_dir).name}: {finished}/{total} finished"
    if counts:
        text += " (" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")"
    if done_flops and left_flops:
        text += f", about {duration((time.time() - plan['started_at']) * left_flops / done_flops)} left"
    return text

