"""Hydra plugin: the resnorm sweeper (Hydra only loads plugins from the ``hydra_plugins`` package).

Hydra's basic sweeper (the same grid syntax, ``hydra.sweeper.params``, ``max_batch_size``) plus:

- every job is composed and validated before any job runs (:mod:`resnorm.sweep.fastplan`: one Hydra
  compose per set of group choices, each job built from it; a job outside what it reproduces is
  composed by Hydra in full): a typo'd key is caught by Hydra when
  it composes the job, a bad value (``depth=0``, an unknown variant) here, in one line, exit 2;
- two jobs that would be the same run (they differ only in keys that do not change what a run
  computes, see :data:`resnorm.runs.identity.OPERATIONAL_KEYS`) are refused;
- jobs whose folder (``multirun/<name>/<run_id>``) says ``completed`` or ``diverged`` are not
  launched again (Hydra has no sweep resume; the sweep folder's run index, :mod:`resnorm.runs.index`,
  says which without reading every summary); interrupted ones are launched and resume from their
  checkpoint in the task function;
- ``dry_run=true`` (``run.py --dry-run``) prints the job table and exits without launching
  anything (nor the end-of-sweep analysis);
- the jobs still to run are launched longest first (estimated FLOPs; ``order=longest_first``, the
  default) so that parallel launchers do not end on one long job with idle workers; ``order=given``
  keeps the grid's order;
- ``stack=on|auto|off`` (:mod:`resnorm.train.stack_plan`): jobs that differ only in keys that leave
  every parameter shape unchanged (seed, optimizer settings, ...) are launched as one job that trains
  them as one stacked model (:mod:`resnorm.train.stack`); each still writes its own run folder. ``auto``
  (the default) stacks only jobs that train on a CUDA device; the dry run shows the stacks;
- the outcome of every job is counted in :data:`resnorm.runs.progress.LAST_OUTCOME` (the exit code);
- ``study={...}`` (``+study=verdict``, :mod:`resnorm.sweep.study`): the grid's jobs are the cells of a
  study that tunes the learning rate per cell, then trains fresh paired seeds at the chosen rate.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from resnorm.config.compose import check_override, composition_error

from resnorm.train.preflight import validate
from resnorm.errors import ConfigError
from resnorm.runs.folder import DONE, link_problem
from resnorm.runs.identity import OPERATIONAL_KEYS, register_resolver
from resnorm.runs.index import done_runs
from resnorm.runs.progress import LAST_OUTCOME
from resnorm.sweep.fastplan import FastPlanner
from resnorm.sweep.plan import JobPlan, duplicates, job_table, longest_first, plan_job, version_note, write_plan
from resnorm.train.stack_plan import STACK_MODES, group_labels, launch_overrides, stack_groups

register_resolver()  # also in the launchers' workers, which unpickle Hydra's plugin registry
log = logging.getLogger(__name__)


def _config_error(message: str) -> None:
    # one line, before any job has run (SystemExit passes through Hydra's error report)
    print(f"config error: {message}", file=sys.stderr)
    raise SystemExit(2)


#: the launchers whose jobs train on the machine the sweep is started on
HERE_LAUNCHERS = ("BasicLauncher", "ParallelLauncher")
#: hydra.sweeper.order: the launch order of the jobs still to run
ORDERS = ("longest_first", "given")


def _refuse_links(run_dir, overrides: Sequence[str]) -> None:
    """A job folder that is a symbolic link, or holds one at its top level, is refused in one line
    before anything is written (docs/run-folder.md)."""
    linked = link_problem(run_dir) if run_dir is not None else None
    if linked:
        print(f"error: refusing the job folder {run_dir}: {linked} (job: {' '.join(overrides)})", file=sys.stderr)
        raise SystemExit(2)


class ValidatingSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int], params: Optional[Dict[str, str]] = None,
                 dry_run: bool = False, flops_per_s: float = 1e10, order: str = "longest_first",
                 stack: str = "auto", fast_plan: bool = True, study: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.dry_run = bool(dry_run)
        self.flops_per_s = float(flops_per_s)
        if order not in ORDERS:
            _config_error(f"hydra.sweeper.order={order!r} is invalid: choose one of {', '.join(ORDERS)}")
        self.order = order
        if isinstance(stack, bool):  # YAML reads a bare on/off as a boolean (0 and 1 stay numbers: refused)
            stack = "on" if stack else "off"
        if not isinstance(stack, str) or stack not in STACK_MODES:
            _config_error(f"hydra.sweeper.stack={stack!r} is invalid: choose one of {', '.join(STACK_MODES)}")
        self.stack = stack
        self.fast_plan = bool(fast_plan)
        self.study = study

    def _compose(self, overrides: Sequence[str]):
        return self.hydra_context.config_loader.load_sweep_config(
            master_config=self.config, sweep_overrides=list(overrides))

    def _job_dir(self, cfg) -> Optional[Path]:
        """The folder Hydra will give this job (None if it depends on what only the launch knows)."""
        previous = HydraConfig.instance().cfg
        try:
            HydraConfig.instance().set_config(cfg)
            return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        except Exception:  # e.g. a subdir made of ${hydra.job.num}
            return None
        finally:
            HydraConfig.instance().cfg = previous

    def jobs_run_here(self) -> bool:
        """Whether the jobs train on this machine (the basic and local launchers), so that the checks
        of this machine's devices (:data:`resnorm.train.preflight.HOST_RULES`) apply to them."""
        target = str(OmegaConf.select(self.config, "hydra.launcher._target_", default=""))
        return target.endswith(HERE_LAUNCHERS)

    def plan(self, overrides: Sequence[str], planner: Optional[FastPlanner] = None,
             indexed: Optional[Dict] = None) -> JobPlan:
        """Compose one job (as Hydra does), validate its values, find its folder and state: from the
        fast planner's base config where it can (:mod:`resnorm.sweep.fastplan`), else composed in full."""
        fast = planner.plan(overrides) if planner is not None else None
        if fast is not None:
            cfg, rid, run_dir, run_name, hydra_yaml, prepared = fast
            _refuse_links(run_dir, overrides)
            return plan_job(overrides, cfg, run_dir, run_name, hydra_yaml, rid=rid, indexed=indexed,
                            prepared=prepared)
        try:
            for o in OverridesParser.create().parse_overrides(list(overrides)):
                check_override(o)
        except ConfigError as err:
            _config_error(f"{err} (job: {' '.join(overrides)})")
        try:
            cfg = self._compose(overrides)
        except Exception as exc:  # noqa: BLE001  # Hydra's composition errors: one line too
            _config_error(f"{composition_error(overrides, exc)} (job: {' '.join(overrides)})")
        run_dir = self._job_dir(cfg)
        run_name = str(OmegaConf.select(cfg, "hydra.job.override_dirname", default="") or "default")
        hydra_yaml = OmegaConf.to_yaml(OmegaConf.create({"hydra": cfg.hydra}))
        with open_dict(cfg):
            del cfg["hydra"]
        try:
            validate(cfg, host=self.jobs_run_here())
        except ConfigError as err:
            _config_error(f"{err} (job: {' '.join(overrides)})")
        _refuse_links(run_dir, overrides)
        return plan_job(overrides, cfg, run_dir, run_name, hydra_yaml, indexed=indexed)

    def offer_prepared(self, groups: Sequence[Sequence[JobPlan]]) -> None:
        """Give a launcher that takes them (``take_prepared``) the fast-planned jobs' configs, by their
        overrides, so that its workers build each job from them instead of composing it again."""
        take = getattr(self.launcher, "take_prepared", None)
        if take is not None:
            take({tuple(g[0].overrides): g[0].prepared for g in groups if len(g) == 1 and g[0].prepared is not None})

    def sweep(self, arguments: List[str]) -> Any:
        LAST_OUTCOME.clear()
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        (jobs,) = self.split_arguments(overrides, None)
        if self.study is not None:  # the grid's jobs are the study's cells
            from resnorm.sweep.study import run_study

            return run_study(self, jobs)
        return self.run_jobs(jobs)

    def run_jobs(self, jobs: List[List[str]], plans: Optional[List[JobPlan]] = None) -> Any:
        """Plan (unless ``plans`` are given), then launch the jobs not done; the dry run prints them."""
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        if plans is None:
            planner = (FastPlanner(self.config, self.hydra_context.config_loader, self.jobs_run_here())
                       if self.fast_plan else None)
            indexed = done_runs(sweep_dir, DONE)
            plans = [self.plan(job, planner, indexed) for job in jobs]
            fast = planner.fast if planner else 0
            log.info("planned %d jobs: %d from the base configs, %d composed in full", len(plans), fast,
                     len(plans) - fast)
        same = duplicates(plans)
        if same:
            a, b = same
            _config_error(f"jobs '{' '.join(a.overrides)}' and '{' '.join(b.overrides)}' are the same run "
                          f"{a.run_id}: they differ only in keys that do not change what a run computes "
                          f"({', '.join(OPERATIONAL_KEYS)})")
        if self.dry_run:
            launcher = OmegaConf.select(self.config, "hydra.launcher._target_", default="?").rsplit(".", 1)[-1]
            labels = group_labels(stack_groups([p for p in plans if not p.done], self.stack))
            print(job_table(plans, self.flops_per_s, str(sweep_dir), launcher, labels), flush=True)
            raise SystemExit(0)  # launches nothing; Hydra's end-of-sweep callbacks do not run either

        done = [p for p in plans if p.done]
        for plan in done:
            LAST_OUTCOME[plan.state] += 1
        if done:
            log.info("%d of %d jobs already done in %s, not launched again: %s", len(done), len(plans),
                     sweep_dir, ", ".join(f"{p.run_id} ({p.state})" for p in done))
        versions = version_note(plans)
        if versions:
            log.warning(versions)
        todo_plans = [p for p in plans if not p.done]
        if self.order == "longest_first" and len(todo_plans) > 1:
            todo_plans = longest_first(todo_plans)
        groups = stack_groups(todo_plans, self.stack)
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
            write_plan(sweep_dir, plans, groups)  # each finished job counts itself and prints the progress line
            todo = launch_overrides(sweep_dir, groups)  # a stack: one launcher job (its file written)
            self.offer_prepared(groups)
        except OSError as exc:  # one line, before any job ran (exit 2, like a config error)
            print(f"error: cannot write the sweep folder {sweep_dir} ({type(exc).__name__}: {exc.strerror}); "
                  "choose another with hydra.sweep.dir=DIR", file=sys.stderr)
            raise SystemExit(2) from None
        returns = []
        initial_job_idx = 0
        for batch in self.split_overrides_to_chunks(todo, self.max_batch_size) if todo else []:
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            for ret in results:
                value = ret.return_value  # raises if the task function itself raised
                members = value.get("stack", [value]) if isinstance(value, dict) else [value]
                for v in members:  # a stack's launcher job returns every member's result
                    LAST_OUTCOME[v.get("status", "unknown") if isinstance(v, dict) else "unknown"] += 1
            initial_job_idx += len(batch)
            returns.append(results)
        log.info("sweep %s: %s", sweep_dir, ", ".join(f"{n} {s}" for s, n in sorted(LAST_OUTCOME.items()))
                 or "no jobs")
        return returns
