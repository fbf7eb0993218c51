"""The ``local`` launcher's jobs in joblib's worker processes: hydra-joblib-launcher's job runner, plus

- a job the sweeper planned fast (:class:`resnorm.sweep.fastplan.Prepared`) is built in the worker
  from the sweep's own composition of its group choices with the job's values set
  (:func:`resnorm.sweep.fastplan.job_config`, checked node for node against Hydra's compose by
  tests/test_fastplan.py) instead of being composed again by Hydra (a fifth of a second a job); any
  other job is composed by Hydra as before;
- a worker keeps the plugin registry Hydra scanned for its first job: Hydra's ``Singleton.set_state``
  drops it and scans every plugin module again for each job, although the plugins a running process
  can import do not change.

Imports neither torch nor joblib at import time (Hydra imports this module on every start).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from hydra.core.utils import JobReturn

log = logging.getLogger(__name__)

#: this worker process's plugin registry, once Hydra has scanned it
_SCANNED: Dict[str, Any] = {}


def restore_singletons(state: Dict[str, Any]) -> None:
    """Hydra's ``Singleton.set_state``, with the plugin registry this process scanned before put back
    first, so that it is not scanned again (``get_state`` leaves it out of the state it sends)."""
    from hydra.core.plugins import Plugins
    from hydra.core.singleton import Singleton

    if "plugins" in _SCANNED:
        state["instances"][Plugins] = _SCANNED["plugins"]
    Singleton.set_state(state)
    _SCANNED["plugins"] = Plugins.instance()


def execute_job(idx: int, overrides: Sequence[str], hydra_context: Any, config: Any, task_function: Any,
                singleton_state: Dict[str, Any], prepared: Optional[Tuple] = None) -> JobReturn:
    """One job in a worker: hydra-joblib-launcher's ``execute_job``, the job's config built from
    ``prepared`` (:meth:`resnorm.sweep.fastplan.Prepared.payload`) when given, else composed from ``config``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job, setup_globals
    from omegaconf import open_dict

    setup_globals()
    restore_singletons(singleton_state)
    if prepared is None:
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    else:
        from resnorm.sweep.fastplan import job_config

        sweep_config = job_config(*prepared)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    return run_job(hydra_context=hydra_context, config=sweep_config, task_function=task_function,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
           prepared: Mapping[Tuple[str, ...], Any]) -> List[JobReturn]:
    """hydra-joblib-launcher's ``launch`` with :func:`execute_job`; ``prepared``: the fast-planned
    jobs' :class:`resnorm.sweep.fastplan.Prepared`, by their overrides."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, filter_overrides, setup_globals
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
    from joblib import Parallel, delayed

    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    joblib_cfg = launcher.joblib
    joblib_cfg["backend"] = "loky"  # as hydra-joblib-launcher: the threading backend cannot run Hydra jobs
    process_joblib_cfg(joblib_cfg)
    payloads = [prepared.get(tuple(o)) for o in job_overrides]
    payloads = [p.payload() if p is not None else None for p in payloads]
    built = sum(p is not None for p in payloads)
    log.info("Joblib.Parallel(%s) is launching %d jobs (%d built from the sweep's plan, %d composed by Hydra)",
             ",".join(f"{k}={v}" for k, v in joblib_cfg.items()), len(job_overrides), built,
             len(job_overrides) - built)
    log.info("Launching jobs, sweep output dir : %s", sweep_dir)
    for idx, overrides in enumerate(job_overrides):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
    state = Singleton.get_state()
    runs = Parallel(**joblib_cfg)(
        delayed(execute_job)(initial_job_idx + idx, overrides, launcher.hydra_context,
                             launcher.config if payload is None else None, launcher.task_function, state, payload)
        for idx, (overrides, payload) in enumerate(zip(job_overrides, payloads)))
    assert isinstance(runs, list) and all(isinstance(r, JobReturn) for r in runs)
    return runs
