"""Hydra plugin: the ``local`` launcher, jobs in parallel on one machine, each with devices of its own.

It runs the jobs with hydra-joblib-launcher (``pip install -e ".[local]"``) and adds what that
launcher lacks (hydra#1331, #2757: parallel jobs get no GPU of their own):

- with GPUs, the machine's GPUs form a device pool (``RESNORM_DEVICE_POOL``); each job takes
  ``train.devices`` of them exclusively while it runs (file locks, see :mod:`resnorm.train.devices`), and
  ``n_jobs`` defaults to the number of slots divided by ``train.devices``; a GPU has
  ``jobs_per_device`` slots (1; N: N jobs share it; ``auto``: as many as its free memory holds by
  the largest job's estimate, :mod:`resnorm.sweep.packing`);
- on a CPU machine, ``n_jobs`` defaults to the number of cores divided by the threads of a job
  (``threads_per_job``, else ``train.threads``, null: 1; ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY=PASSIVE``),
  as parallel jobs that each used every core ran 10-40x slower here. A job trains with
  ``train.threads`` (null: 1) however many jobs are left, so its numbers never depend on the
  launcher; a single job runs in the sweep's own process;
- a worker builds each job the sweeper planned fast from the sweep's plan instead of composing it
  again with Hydra, and keeps the plugin registry it scanned once
  (:mod:`hydra_plugins.resnorm_launcher.local_jobs`).

Options (``hydra.launcher.<option>=...``): ``n_jobs``, ``gpus`` (a list of GPU indices; null: all
visible), ``jobs_per_device``, ``fake_gpus`` (N pretend GPUs that train on the CPU: to try a sweep's
scheduling on a machine without GPUs) and ``fake_gpu_free_gb`` (their free memory, for
``jobs_per_device=auto``), ``threads_per_job``, ``lock_dir``, and ``joblib`` (more joblib.Parallel
arguments). This module imports neither torch nor joblib: Hydra imports it on every start.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _has_gpu_driver() -> bool:
    """Cheap check before importing torch to count GPUs (a CPU machine has neither)."""
    return bool(shutil.which("nvidia-smi")) or os.path.exists("/dev/nvidia0")


class ParallelLauncher(Launcher):
    def __init__(self, n_jobs: Optional[int] = None, gpus: Optional[Sequence[int]] = None,
                 fake_gpus: int = 0, threads_per_job: Optional[int] = None, lock_dir: Optional[str] = None,
                 joblib: Optional[Dict[str, Any]] = None, jobs_per_device: Any = 1,
                 fake_gpu_free_gb: Optional[float] = None) -> None:
        from resnorm.errors import ConfigError
        from resnorm.sweep.packing import parse_jobs_per_device

        try:
            self.jobs_per_device = parse_jobs_per_device(jobs_per_device)
        except ConfigError as exc:  # one line, before any job runs (SystemExit passes through Hydra)
            print(f"config error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        self.fake_gpu_free_gb = fake_gpu_free_gb
        self.n_jobs, self.fake_gpus, self.threads_per_job = n_jobs, int(fake_gpus or 0), threads_per_job
        if self.jobs_per_device == "auto" and self.fake_gpus and fake_gpu_free_gb is None:
            self._no_fake_free_memory()  # before the sweeper writes the sweep folder
        self.gpus = None if gpus is None else [int(g) for g in gpus]
        self.lock_dir = lock_dir
        self.joblib_extra = OmegaConf.to_container(joblib) if OmegaConf.is_config(joblib) else dict(joblib or {})
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None
        self.joblib: Dict[str, Any] = {}
        self.prepared: Dict[Tuple[str, ...], Any] = {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        from resnorm.sweep import packing

        packing.LATEST_LAUNCHER = self  # the dry run's job table shows its slots

    def take_prepared(self, prepared: Dict[Tuple[str, ...], Any]) -> None:
        """The sweep's fast-planned jobs (:class:`resnorm.sweep.fastplan.Prepared`, by their overrides):
        the workers build these jobs' configs from them instead of composing them again
        (:mod:`hydra_plugins.resnorm_launcher.local_jobs`)."""
        self.prepared = dict(prepared)

    def pool(self) -> List:
        from resnorm.train.devices import Slot, visible_gpus

        if self.fake_gpus:
            return [Slot(i, fake=True) for i in range(self.fake_gpus)]
        if self.gpus is not None:
            return [Slot(i) for i in self.gpus]
        return [Slot(i) for i in visible_gpus()] if _has_gpu_driver() else []

    def free_bytes(self, devices: Sequence) -> List[float]:
        """Each device's free memory: the fake GPUs' ``fake_gpu_free_gb``, else CUDA's answer."""
        from resnorm.sweep.packing import cuda_free_bytes

        if not self.fake_gpus:
            return cuda_free_bytes([d.index for d in devices])
        if self.fake_gpu_free_gb is None:
            self._no_fake_free_memory()
        return [float(self.fake_gpu_free_gb) * 1e9] * len(devices)

    @staticmethod
    def _no_fake_free_memory() -> None:
        print("config error: hydra.launcher.jobs_per_device=auto with fake_gpus needs their free memory: "
              "set hydra.launcher.fake_gpu_free_gb", file=sys.stderr)
        raise SystemExit(2)

    def job_bytes(self, job_overrides: Optional[Sequence[Sequence[str]]]) -> float:
        """The largest estimated GPU memory of the jobs (:func:`resnorm.sweep.packing.job_memory_bytes`)."""
        from resnorm.sweep.packing import job_memory_bytes
        from resnorm.sweep.plan import model_size

        if job_overrides and self.hydra_context is not None:
            load = self.hydra_context.config_loader.load_sweep_config
            configs = [load(self.config, list(o)) for o in job_overrides]
        else:
            configs = [self.config]
        sizes: Dict[str, int] = {}  # a grid of seeds or learning rates counts each model once
        largest = 0.0
        for cfg in configs:
            shape = OmegaConf.to_yaml(cfg.model) + f"depth={cfg.depth}"
            if shape not in sizes:
                sizes[shape] = model_size(cfg)[0]
            largest = max(largest, job_memory_bytes(cfg, sizes[shape]))
        return largest

    def slots(self, job_bytes: Callable[[], float]) -> Tuple[List, str]:
        """The pool's slots (``jobs_per_device`` of each GPU; none on a CPU machine) and a description;
        ``job_bytes`` (the largest job's estimated memory) is called for ``jobs_per_device=auto`` only."""
        from resnorm.sweep import packing
        from resnorm.train.devices import packed

        devices = self.pool()
        if not devices:
            return [], ""
        estimate: Dict[str, float] = {}

        def largest() -> float:
            estimate["bytes"] = job_bytes()
            return estimate["bytes"]

        per_device = packing.slots_per_device(self.jobs_per_device, len(devices), lambda: self.free_bytes(devices),
                                              largest)
        return packed(devices, per_device), packing.describe(per_device, self.jobs_per_device, estimate.get("bytes"))

    def plan(self, n_todo: Optional[int] = None, job_overrides: Optional[Sequence[Sequence[str]]] = None
             ) -> Dict[str, Any]:
        """n_jobs, and the environment of the workers (device pool and threads), for ``n_todo`` jobs."""
        from resnorm.train.devices import LOCK_DIR_ENV, POOL_ENV, THREADS_ENV, cpu_count, format_pool

        per_job = int(OmegaConf.select(self.config, "train.devices", default=1) or 1)
        # a job's thread count is its config's (train.threads, null: 1), never the launcher's: it
        # changes a CPU run's last bits (resnorm.train.devices.job_threads)
        threads = int(OmegaConf.select(self.config, "train.threads", default=None) or 1)
        slots, packing = self.slots(lambda: self.job_bytes(job_overrides))
        cores = cpu_count()
        if slots:
            n_jobs = self.n_jobs or max(1, len(slots) // per_job)
        else:  # as many processes at once as there are cores for their threads (DDP: train.devices each)
            n_jobs = self.n_jobs or max(1, cores // ((self.threads_per_job or threads) * per_job))
        n_jobs = min(n_jobs, n_todo or n_jobs)
        env = {THREADS_ENV: str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        if slots:
            env[POOL_ENV] = format_pool(slots)
        if self.lock_dir:
            env[LOCK_DIR_ENV] = str(self.lock_dir)
        return {"n_jobs": int(n_jobs), "threads": threads, "pool": format_pool(slots), "env": env,
                "packing": packing}

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        plan = self.plan(len(job_overrides), job_overrides)
        log.info("local launcher: %d jobs at a time, %d thread(s) each, device pool: %s%s", plan["n_jobs"],
                 plan["threads"], plan["pool"] or "none (CPU)", f"; {plan['packing']}" if plan["packing"] else "")
        try:
            from hydra_plugins.hydra_joblib_launcher import _core
        except ImportError:
            _core = None
            log.warning('hydra-joblib-launcher is not installed (pip install -e ".[local]"): '
                        "the jobs run one after the other")
        from resnorm.train.devices import environ

        with environ(plan["env"]):
            if plan["n_jobs"] == 1 or _core is None:  # no worker processes to start
                from hydra._internal.core_plugins.basic_launcher import BasicLauncher

                basic = BasicLauncher()
                basic.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
                return basic.launch(job_overrides, initial_job_idx=initial_job_idx)
            # the workers (loky processes, started by this launch) inherit this environment
            self.joblib = {"batch_size": 1, **self.joblib_extra, "n_jobs": plan["n_jobs"]}
            from hydra_plugins.resnorm_launcher import local_jobs

            return local_jobs.launch(self, job_overrides, initial_job_idx, self.prepared)


def _run_bundle(hydra_context: HydraContext, configs: Sequence[DictConfig], task_function: TaskFunction,
                singleton_state: Any) -> List[JobReturn]:
    """One Ray task training a bundle of jobs one after the other (hydra-ray-launcher's job runner each)."""
    from hydra_plugins.hydra_ray_launcher._launcher_util import _run_job

    return [_run_job(hydra_context=hydra_context, sweep_config=c, task_function=task_function,
                     singleton_state=singleton_state) for c in configs]


class RayLauncher(Launcher):
    """hydra-ray-launcher (``pip install -e ".[ray]"``), with one task per job that asks for
    ``train.devices`` GPUs when the Ray cluster has GPUs (Ray then sets the task's
    ``CUDA_VISIBLE_DEVICES``), else for ``threads_per_job`` CPUs, with that many torch threads.
    ``jobs_per_task=K`` (1): each task trains K jobs one after the other (each its own run folder)."""

    def __init__(self, ray: Any = None, threads_per_job: int = 1, jobs_per_task: int = 1) -> None:
        if not isinstance(jobs_per_task, int) or isinstance(jobs_per_task, bool) or jobs_per_task < 1:
            print(f"config error: hydra.launcher.jobs_per_task={jobs_per_task!r} is invalid: a positive integer "
                  "(jobs trained one after the other by one Ray task)", file=sys.stderr)
            raise SystemExit(2)
        self.jobs_per_task = jobs_per_task
        ray = OmegaConf.to_container(ray) if OmegaConf.is_config(ray) else dict(ray or {})
        self.init_cfg = dict(ray.get("init") or {})
        self.remote_cfg = dict(ray.get("remote") or {})
        self.threads_per_job = int(threads_per_job)
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None
        self.ray_cfg: Optional[DictConfig] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def remote_options(self, cluster_gpus: float) -> Dict[str, Any]:
        from resnorm.train.devices import THREADS_ENV

        per_job = int(OmegaConf.select(self.config, "train.devices", default=1) or 1)
        remote = dict(self.remote_cfg)
        if cluster_gpus:
            remote.setdefault("num_gpus", per_job)
        else:
            remote.setdefault("num_cpus", self.threads_per_job)
            env = {THREADS_ENV: str(self.threads_per_job), "OMP_WAIT_POLICY": "PASSIVE"}
            remote.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
        return remote

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            import ray
            from hydra_plugins.hydra_ray_launcher import _core
            from hydra_plugins.hydra_ray_launcher._launcher_util import start_ray
        except ImportError:
            raise ImportError('hydra/launcher=ray needs hydra-ray-launcher: pip install -e ".[ray]"') from None
        init = OmegaConf.create({"object_store_memory": 78643200, **self.init_cfg})  # as hydra-ray-launcher
        start_ray(init)
        remote = self.remote_options(ray.cluster_resources().get("GPU", 0))
        log.info("ray launcher: each job asks for %s", remote)
        self.ray_cfg = OmegaConf.create({"init": init, "remote": remote})
        if self.jobs_per_task == 1:
            return _core.launch(launcher=self, job_overrides=job_overrides, initial_job_idx=initial_job_idx)
        return self.launch_bundles(job_overrides, initial_job_idx, remote)

    def launch_bundles(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
                       remote: Dict[str, Any]) -> List[JobReturn]:
        """``jobs_per_task`` jobs per Ray task, composed here as hydra-ray-launcher composes each job."""
        import ray
        from hydra.core.singleton import Singleton
        from omegaconf import open_dict

        configs = []
        for i, overrides in enumerate(job_overrides):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = f"job_id_for_{initial_job_idx + i}"
                cfg.hydra.job.num = initial_job_idx + i
            configs.append(cfg)
        k = self.jobs_per_task
        bundles = [configs[i:i + k] for i in range(0, len(configs), k)]
        log.info("ray launcher: %d jobs, %d per task: %d task(s)", len(configs), k, len(bundles))
        run = ray.remote(**remote)(_run_bundle) if remote else ray.remote(_run_bundle)
        state = Singleton.get_state()
        refs = [run.remote(self.hydra_context, b, self.task_function, state) for b in bundles]
        return [ret for ref in refs for ret in ray.get(ref)]
