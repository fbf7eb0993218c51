"""Hydra's task function (:func:`run_job`): validate the job's config, then train it alone
(:func:`resnorm.train.job.execute`) or, when the sweeper planned it into a stack, train its stack
(:func:`resnorm.train.stack.run_stack_job`); after each job of a multirun, the sweep's progress line."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict

from resnorm.train.job import JobInfo, execute, job_result
from resnorm.train.stack_plan import STACK_ENV

log = logging.getLogger(__name__)


def _print_progress(job: JobInfo) -> None:
    """The sweep-level line (jobs finished / total, outcomes so far, time left) after each job of a
    multirun, on stderr beside the per-run bars (:func:`resnorm.runs.progress.progress_line`)."""
    import sys

    from resnorm.runs.progress import progress_line

    line = progress_line(Path(job.run_dir).parent)
    if line:
        print(line, file=sys.stderr, flush=True)


def run_job(cfg) -> Dict[str, Any]:
    """Hydra's task function: validate (raises ConfigError), then skip, resume or train the job."""
    from resnorm.train.preflight import validate

    validate(cfg)
    stack = os.environ.get(STACK_ENV)  # a launcher job that trains a stack of runs
    if stack:
        from resnorm.train.stack import run_stack_job

        result = run_stack_job(cfg, stack)
        _print_progress(JobInfo.from_hydra(cfg))
        return result
    job = JobInfo.from_hydra(cfg)
    summary = execute(cfg, job)
    log.info("run %s: %s, %s (final val loss %s)", job.run_name, summary["status"], summary.get("outcome"),
             summary.get("final_val_loss"))
    _print_progress(job)
    extra = {k: summary[k] for k in ("skipped", "note") if k in summary}
    return job_result(summary, **extra)
