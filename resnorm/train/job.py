"""One job in its folder: what Hydra's task function (:func:`resnorm.train.task.run_job`), the
stacks, the fine-tunes and the reproductions call for each run.

:func:`execute` holds the job folder's lock, skips a job whose folder says ``completed`` or ``diverged``
(:func:`resnorm.runs.folder.job_state`), trains the rest with :func:`train` (resuming an interrupted
one from its checkpoint) and always leaves a ``summary.json`` behind: a training failure is recorded
as ``failed`` and the sweep goes on with the next job. ``train.devices=N`` runs the job on N
data-parallel processes (:mod:`resnorm.train.devices`). The training loop itself is
:func:`resnorm.train.loop.fit`.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from resnorm.train import devices
from resnorm.runs.identity import run_id
from resnorm.train.loop import fit
from resnorm.runs.folder import (DONE, DiskFullError, is_disk_full, job_lock, job_state, link_problem,
                                 read_summary, remove_stale_temporaries, write_summary)

log = logging.getLogger(__name__)


@dataclass
class JobInfo:
    """Where a job writes and how it is named; taken from Hydra when Hydra runs the job.

    ``run_id`` is the job's identity (:func:`resnorm.runs.identity.run_id` of its config when not given).
    """

    run_dir: Path
    run_name: str
    group: str
    overrides: List[str]
    run_id: Optional[str] = None

    @classmethod
    def from_hydra(cls, cfg) -> "JobInfo":
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        if not HydraConfig.initialized():
            return cls(Path.cwd(), "default", cfg.name, [], run_id(cfg))
        hc = HydraConfig.get()
        group = OmegaConf.select(cfg, "logger.group", default=None) or cfg.name
        return cls(Path(hc.runtime.output_dir), hc.job.override_dirname or "default", group,
                   list(hc.overrides.task), run_id(cfg))


def train(cfg, job: JobInfo, rank: int = 0, world: int = 1, slots: Optional[Sequence[devices.Slot]] = None,
          callbacks: Optional[Callable] = None) -> Dict[str, Any]:
    """Train one model (process ``rank`` of ``world``) and write its run folder; return the summary."""
    return fit(cfg, job, callbacks, rank=rank, world=world, slots=slots)


def _ddp_process(rank: int, world: int, cfg, job: JobInfo, slots) -> None:
    train(cfg, job, rank=rank, world=world, slots=slots)


def job_result(summary: Dict[str, Any], **extra) -> Dict[str, Any]:
    """What a job returns to Hydra (and so to the sweeper, which counts the statuses)."""
    keys = ("status", "outcome", "run_name", "run_id", "final_val_loss", "diverged_step", "error")
    return {**{k: summary.get(k) for k in keys}, **extra}


def admit(job: JobInfo, ours: bool) -> Optional[Dict[str, Any]]:
    """Whether a job whose folder lock was taken (``ours``) or not should train: None if it should,
    else its result (left to the process holding the lock, a foreign folder, already done)."""
    if not ours:
        log.warning("run %s (%s) is running in another process: left to it", job.run_id, job.run_name)
        return {"status": "running", "run_name": job.run_name, "run_id": job.run_id,
                "note": "running in another process"}
    remove_stale_temporaries(job.run_dir)  # half-written files of a killed attempt
    state = job_state(job.run_dir, job.run_id)
    if state == "foreign":
        other = read_summary(job.run_dir).get("run_id")
        error = f"{job.run_dir} holds another run ({other}): left untouched; give this job another folder"
        log.error(error)
        return {"status": "failed", "run_name": job.run_name, "run_id": job.run_id, "error": error}
    if state in DONE:
        log.info("run %s (%s) is already %s: skipped", job.run_id, job.run_name, state)
        return {**read_summary(job.run_dir), "skipped": True}
    return None


def execute(cfg, job: JobInfo, callbacks: Optional[Callable] = None) -> Dict[str, Any]:
    """Skip, resume or train a validated job in its folder; return its summary (``skipped``: True
    when the folder already held the finished run). A crash becomes ``failed``; a folder locked by
    another process (the same sweep started twice) is left to it and returned as ``running``; a folder
    that is (or holds) a symbolic link is refused untouched (:func:`resnorm.runfolder.link_problem`)."""
    linked = link_problem(job.run_dir)
    if linked:
        log.error("run %s not trained: %s", job.run_name, linked)
        return {"status": "failed", "run_name": job.run_name, "run_id": job.run_id, "error": linked}
    with job_lock(job.run_dir) as ours:
        verdict = admit(job, ours)
        if verdict is not None:
            return verdict
        try:
            with devices.claim(cfg.train.device, cfg.train.devices) as slots:
                if cfg.train.devices > 1:
                    devices.spawn(_ddp_process, cfg.train.devices, (cfg, job, slots))
                    return read_summary(job.run_dir)
                return train(cfg, job, slots=slots, callbacks=callbacks)
        except Exception as exc:
            return record_failure(job, exc)


def record_failure(job: JobInfo, exc: Exception) -> Dict[str, Any]:
    """Record the run as ``failed`` with the error; a full disk is one line (the file that could not be
    written), without the traceback, written in place if need be (:func:`resnorm.runs.folder.write_summary`)."""
    summary = read_summary(job.run_dir) or {"run_name": job.run_name, "group": job.group,
                                            "overrides": job.overrides, "run_id": job.run_id}
    full = is_disk_full(exc)
    error = f"{type(exc).__name__}: {exc}"
    if full and getattr(exc, "filename", None) and not isinstance(exc, DiskFullError):
        error = f"DiskFullError: {DiskFullError(exc.filename)}"
    elif full and "disk is full" not in error:
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} (the disk is full)"
    summary.update(status="failed", error=error, traceback=None if full else traceback.format_exc())
    try:
        write_summary(job.run_dir, summary, in_place_if_full=full)
    except OSError as again:
        log.error("run %s failed (%s) and its summary.json could not be updated (%s)", job.run_name,
                  summary["error"], again)
        return summary
    log.error("run %s failed: %s", job.run_name, summary["error"])
    return summary


def quiet_log_file_errors() -> None:
    """A log file that cannot be written costs at most one warning line (none for a full disk, which
    the run's failure reports), not Python's ``--- Logging error ---`` traceback for every record: its
    handler is then dropped (the console handler keeps the lines)."""
    import sys

    def handler_error(handler: logging.FileHandler):
        def handle_error(record) -> None:
            exc = sys.exc_info()[1]
            logging.getLogger().removeHandler(handler)
            if not is_disk_full(exc):  # a full disk: the run's own failure line names the file and says so
                print(f"warning: cannot write the log file {handler.baseFilename} ({type(exc).__name__}: {exc}); "
                      "its lines go to the console only", file=sys.stderr, flush=True)
        return handle_error

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and not getattr(handler, "_resnorm_quiet", False):
            handler.handleError = handler_error(handler)
            handler._resnorm_quiet = True
