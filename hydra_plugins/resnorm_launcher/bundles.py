"""Hydra plugin: the ``slurm`` launcher with bundles of jobs, and arrays split to the cluster's size.

hydra-submitit-launcher submits one SLURM array task per job, and each task starts Python and
imports torch (seconds) to train one job; a sweep of thousands of tiny jobs spends most of its
time starting. ``hydra.launcher.jobs_per_task=K`` makes each array task train K jobs one after the
other in one warm process. Each job keeps its own run folder, checkpoint and result: a task that is
preempted or times out is requeued whole (submitit's checkpoint), and the requeued task skips the
jobs of its bundle that finished (their folders say so) and resumes the interrupted one from its
checkpoint. A job that raises is recorded ``failed`` and the bundle goes on; a task killed outright
loses the rest of its bundle until the sweep is run again (those folders are then resumed or
retried). An array larger than the cluster's ``MaxArraySize`` (``scontrol show config``) is
submitted as several arrays.

Options: the submitit SLURM launcher's, plus ``jobs_per_task`` (1) and ``max_array_size`` (null:
the cluster's ``MaxArraySize``). Imports no torch: Hydra imports it on every start.
"""

# no `from __future__ import annotations`: Hydra execs plugin modules outside sys.modules, where
# a dataclass with string annotations cannot resolve them
import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

#: the profile's name in the hydra/launcher group (conf/hydra/launcher/slurm.yaml builds on it)
PROFILE = "resnorm_slurm"


@dataclass
class BundledSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.resnorm_launcher.bundles.BundledSlurmLauncher"
    jobs_per_task: int = 1  # jobs trained one after the other by one array task (one process)
    max_array_size: Optional[int] = None  # tasks per array; null: the cluster's MaxArraySize


ConfigStore.instance().store(group="hydra/launcher", name=PROFILE, node=BundledSlurmConf(), provider="resnorm")


def cluster_max_array_size() -> Optional[int]:
    """The cluster's ``MaxArraySize`` (an array's indices are below it), or None if it cannot be read."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(found[1]) if found else None


def chunks(items: Sequence[Any], size: int) -> List[List[Any]]:
    return [list(items[i:i + size]) for i in range(0, len(items), max(1, size))]


class BundledSlurmLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher; each array task trains a bundle of jobs."""

    def __init__(self, jobs_per_task: int = 1, max_array_size: Optional[int] = None, **params: Any) -> None:
        import sys

        if not isinstance(jobs_per_task, int) or isinstance(jobs_per_task, bool) or jobs_per_task < 1:
            print(f"config error: hydra.launcher.jobs_per_task={jobs_per_task!r} is invalid: a positive integer "
                  "(jobs trained one after the other by one array task)", file=sys.stderr)
            raise SystemExit(2)
        self.jobs_per_task = jobs_per_task
        self.max_array_size = max_array_size
        super().__init__(**params)

    def __call__(self, *job: Any) -> Any:
        """One array task: a bundle (a list of jobs' arguments) trained in turn, or one job."""
        # the base class by name: Hydra's plugin scan and the task's unpickling load this module twice
        if len(job) == 1 and isinstance(job[0], list):
            return [SlurmLauncher.__call__(self, *args) for args in job[0]]
        return SlurmLauncher.__call__(self, *job)

    def _executor(self) -> Any:
        """The submitit executor with the profile's parameters (as hydra-submitit-launcher builds it)."""
        import submitit

        init = {"folder": self.params["submitit_folder"],
                **{f"{self._EXECUTOR}_max_num_timeout": v for k, v in self.params.items() if k == "max_num_timeout"}}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                      if k not in ("submitit_folder", "max_num_timeout")})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and len(job_overrides) > 0
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        state = Singleton.get_state()
        jobs = []
        for i, overrides in enumerate(job_overrides):
            log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(overrides))}")
            jobs.append((list(overrides), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{initial_job_idx + i}",
                         state))
        bundles = chunks(jobs, self.jobs_per_task)
        limit = self.max_array_size or cluster_max_array_size() or len(bundles)
        arrays = chunks(bundles, limit)
        log.info("slurm launcher: %d jobs, %d per task: %d array task(s) in %d array(s) (MaxArraySize %s)",
                 len(jobs), self.jobs_per_task, len(bundles), len(arrays), limit)
        executor = self._executor()
        submitted = [executor.map_array(self, array) for array in arrays]
        return [ret for array in submitted for task in array for ret in task.results()[0]]
