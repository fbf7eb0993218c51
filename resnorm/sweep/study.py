"""The verdict study: tune the learning rate per (variant, depth) cell, then train fresh paired seeds.

``python run.py -m +study=verdict model.norm=pre,post depth=6,24,48`` (``conf/study/verdict.yaml``):
the grid's jobs are the study's *cells*; ``hydra.sweeper.study`` says the rest.

1. **tune**: every cell at every rate of ``lrs`` (at least 5) on the ``tuning_seeds``;
2. **pick**: per cell, the rate whose runs all ended ``trained`` with the lowest mean final
   validation loss (ties: the smaller rate); a cell with no such rate fails at that depth and is
   reported with its outcomes (the report's verdicts), it gets no evaluation runs;
3. **evaluate**: every cell that picked a rate at each of the ``eval_seeds`` (at least 3, none a
   tuning seed): the same seed in every cell, so the same initialisation stream and data order.

Every job is an ordinary run folder of the sweep (``multirun/<name>/<run_id>``), so a killed study
resumes like any sweep: re-run the command, done jobs are skipped, interrupted ones resume from
their checkpoint, the picks are read again from the tuning runs' summaries. W&B groups the runs as
``<name>/tune`` and ``<name>/eval`` (``logger.group``). ``--dry-run`` prints the tuning jobs and
the evaluation jobs whose cell is tuned; the others are listed as waiting on their cell.
``study.json`` in the sweep folder keeps the study's settings, each cell's pick and tuning
outcomes, each stage's run ids and the wall time of each stage of each invocation; the report
(:mod:`analysis.report`) reads it. Imports no torch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from resnorm.runs.folder import DONE, read_summary, write_text

log = logging.getLogger(__name__)

STUDY_FILE = "study.json"
#: the fewest rates and evaluation seeds a study accepts
MIN_LRS, MIN_EVAL_SEEDS = 5, 3
#: keys a study sets on every job: the grid may not sweep them
STUDY_KEYS = ("optim.lr", "seed", "logger.group")
STAGES = ("tune", "eval")
#: the corrections the report knows (analysis.verdicts.CORRECTIONS; tests/test_verdicts.py keeps them equal)
CORRECTIONS = ("holm", "bh", "bonferroni", "none")


def _error(message: str) -> None:
    import sys

    print(f"config error: {message}", file=sys.stderr)
    raise SystemExit(2)


@dataclass
class StudySpec:
    """``hydra.sweeper.study``: the rate grid, the seeds of each stage, the baseline."""

    lrs: List[float]
    tuning_seeds: List[int] = field(default_factory=lambda: [0])
    eval_seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    baseline: str = "pre"
    correction: str = "holm"

    @classmethod
    def from_node(cls, node: Any) -> "StudySpec":
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            _error(f"hydra.sweeper.study has unknown keys {sorted(unknown)}: allowed {sorted(cls.__dataclass_fields__)}")
        spec = cls(**raw)
        spec.lrs = sorted(float(x) for x in spec.lrs)
        spec.tuning_seeds = [int(s) for s in spec.tuning_seeds]
        spec.eval_seeds = [int(s) for s in spec.eval_seeds]
        if len(set(spec.lrs)) < MIN_LRS or not all(x > 0 and math.isfinite(x) for x in spec.lrs):
            _error(f"hydra.sweeper.study.lrs={spec.lrs} is invalid: give at least {MIN_LRS} distinct rates > 0")
        if len(set(spec.eval_seeds)) < MIN_EVAL_SEEDS:
            _error(f"hydra.sweeper.study.eval_seeds={spec.eval_seeds} is invalid: give at least {MIN_EVAL_SEEDS} seeds")
        if not spec.tuning_seeds or set(spec.tuning_seeds) & set(spec.eval_seeds):
            _error(f"hydra.sweeper.study.tuning_seeds={spec.tuning_seeds} is invalid: give at least one, none of "
                   f"them an evaluation seed ({spec.eval_seeds})")
        if spec.correction not in CORRECTIONS:
            _error(f"hydra.sweeper.study.correction={spec.correction!r} is invalid: choose one of "
                   f"{', '.join(CORRECTIONS)}")
        return spec


@dataclass
class Cell:
    """One (variant, depth) of the study: its grid overrides, and what its tuning decided."""

    overrides: List[str]
    variant: str
    depth: int
    tune_ids: List[str] = field(default_factory=list)
    ready: bool = False  # every tuning run done (completed or diverged)
    lr: Optional[float] = None  # the picked rate; None: not ready, or failing
    failing: bool = False
    outcomes: str = ""  # the tuning runs' outcomes, e.g. "3 trained, 2 diverged"
    per_lr: Dict[str, Any] = field(default_factory=dict)  # rate -> mean final val loss (null if not trained)
    label: str = ""  # the overrides that tell it from the other cells


def _key(key: str, overrides: Sequence[str]) -> Optional[str]:
    for o in overrides:
        k, _, v = o.partition("=")
        if k.lstrip("+~") == key:
            return v
    return None


def stage_overrides(cell_overrides: Sequence[str], lr: float, seed: int, group: str) -> List[str]:
    """A stage job: the cell's overrides, its rate and seed, and the stage's W&B group."""
    return list(cell_overrides) + [f"optim.lr={lr!r}", f"seed={seed}", f"logger.group={group}"]


def pick(cell: Cell, plans) -> Cell:
    """Stage 2 for one cell from its tuning plans (:class:`resnorm.sweeper.JobPlan`, read again
    from their folders): ready when all are done; the rate whose runs are all ``trained`` with the
    lowest mean final validation loss, else the cell fails."""
    summaries = [read_summary(p.run_dir) or {} if p.run_dir is not None else {} for p in plans]
    cell.tune_ids = [p.run_id for p in plans]
    cell.ready = all(s.get("status") in DONE for s in summaries)
    outcomes = Counter(s.get("outcome") or s.get("status") or "not run" for s in summaries)
    cell.outcomes = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))
    by_lr: Dict[float, List[Tuple[str, float]]] = {}
    for plan, summary in zip(plans, summaries):
        loss = summary.get("final_val_loss")
        by_lr.setdefault(float(plan.cfg.optim.lr), []).append(
            (summary.get("outcome"), float(loss) if isinstance(loss, (int, float)) else math.nan))
    cell.per_lr = {}
    for lr, runs in sorted(by_lr.items()):
        good = all(o == "trained" and math.isfinite(v) for o, v in runs)
        cell.per_lr[repr(lr)] = sum(v for _, v in runs) / len(runs) if good else None
    if not cell.ready:
        return cell
    trained = [(v, float(lr)) for lr, v in cell.per_lr.items() if v is not None]
    cell.lr = min(trained)[1] if trained else None
    cell.failing = not trained
    return cell


def write_study(sweep_dir: Path, spec: StudySpec, cells: List[Cell], eval_ids: Dict[str, List[str]],
                timing: Optional[Dict[str, Any]] = None) -> None:
    """``study.json``: settings, cells (pick, outcomes, run ids of both stages), stage timings
    (appended per invocation)."""
    path = Path(sweep_dir) / STUDY_FILE
    try:
        previous = json.loads(path.read_text()).get("timings", [])
    except (OSError, ValueError):
        previous = []
    data = dict(spec=asdict(spec), stages=list(STAGES),
                cells=[dict(asdict(c), eval_ids=eval_ids.get(c.label, [])) for c in cells],
                timings=previous + ([timing] if timing else []))
    write_text(path, json.dumps(data, indent=1))


def read_study(sweep_dir) -> Optional[Dict[str, Any]]:
    """The sweep's ``study.json``, None when the sweep is not a study (or the file is unreadable)."""
    try:
        return json.loads((Path(sweep_dir) / STUDY_FILE).read_text())
    except (OSError, ValueError):
        return None


def make_cells(jobs: Sequence[Sequence[str]], plans) -> List[Cell]:
    """The study's cells from the grid's jobs and their plans (one per job: the variant and depth of
    its composed config); refuses a grid that sweeps a key the study sets or repeats a cell."""
    cells, seen = [], {}
    for job, plan in zip(jobs, plans):
        for key in STUDY_KEYS:
            if _key(key, job) is not None:
                _error(f"{key} is set by the study (hydra.sweeper.study): leave it out of the grid (job: {' '.join(job)})")
        cell = Cell(list(job), str(plan.cfg.model.norm), int(plan.cfg.depth))
        if (cell.variant, cell.depth) in seen:
            _error(f"jobs '{seen[cell.variant, cell.depth]}' and '{' '.join(job)}' are the same study cell "
                   f"({cell.variant}, depth {cell.depth}): a study compares variants by depth")
        seen[cell.variant, cell.depth] = " ".join(job)
        cells.append(cell)
    common = set.intersection(*(set(c.overrides) for c in cells)) if len(cells) > 1 else set()
    for cell in cells:
        cell.label = " ".join(o for o in cell.overrides if o not in common) or " ".join(cell.overrides) or "(defaults)"
    return cells


def _waiting_lines(cells: List[Cell], spec: StudySpec, tune_plans) -> List[str]:
    lines = []
    for cell, plans in zip(cells, tune_plans):
        if cell.ready:
            continue
        done = sum(p.done for p in plans)
        lines.append(f"  waiting on stage-1 cell {cell.label} ({done} of {len(plans)} tuning runs done): "
                     f"{len(spec.eval_seeds)} jobs, seed={','.join(map(str, spec.eval_seeds))} at the rate it picks")
    return lines


def dry_run(sweeper, cells: List[Cell], spec: StudySpec, tune_plans, eval_plans, sweep_dir: Path) -> None:
    """Print the study's stages (the tuning jobs, the evaluation jobs known, those waiting) and exit 0."""
    from resnorm.sweep.plan import job_table

    launcher = str(sweeper.config.hydra.launcher.get("_target_", "?")).rsplit(".", 1)[-1]
    flat = [p for plans in tune_plans for p in plans]
    print(f"study {sweep_dir.name}: {len(cells)} cells x {len(spec.lrs)} rates x {len(spec.tuning_seeds)} tuning "
          f"seed(s), then {len(spec.eval_seeds)} evaluation seeds per cell at its picked rate")
    print("stage 1 (tune):\n" + job_table(flat, sweeper.flops_per_s, str(sweep_dir), launcher))
    print("stage 2 (pick): " + "; ".join(
        f"{c.label}: " + ("fails at every rate" if c.failing else f"lr {c.lr!r}" if c.ready else "not tuned yet")
        for c in cells))
    known = [p for plans in eval_plans for p in plans]
    print(f"stage 3 (evaluate): {len(known)} jobs planned" + (":\n" + job_table(
        known, sweeper.flops_per_s, str(sweep_dir), launcher) if known else ""))
    waiting = _waiting_lines(cells, spec, tune_plans)
    if waiting:
        print("\n".join(waiting))
    raise SystemExit(0)


def _run_stage(sweeper, name: str, jobs: List[List[str]], plans) -> Tuple[List[Any], Dict[str, Any]]:
    started = time.time()
    todo = sum(not p.done for p in plans)
    results = sweeper.run_jobs(jobs, plans) if jobs else []
    wall = time.time() - started
    log.info("study stage %s: %d jobs (%d launched) in %.0f s", name, len(jobs), todo, wall)
    return list(results or []), dict(stage=name, started_at=started, wall_s=wall, jobs=len(jobs), launched=todo)


def run_study(sweeper, jobs: List[List[str]]) -> List[Any]:
    """The three stages of a study over the grid's ``jobs`` (its cells) with the sweeper's planning
    and launching (``plan``, ``run_jobs``); returns the launch results of both stages."""
    spec = StudySpec.from_node(sweeper.study)
    sweep_dir = Path(str(sweeper.config.hydra.sweep.dir))
    name = sweep_dir.name
    cells = make_cells(jobs, [sweeper.plan(j) for j in jobs])
    tune_jobs = [[stage_overrides(c.overrides, lr, s, f"{name}/tune") for lr in spec.lrs for s in spec.tuning_seeds]
                 for c in cells]
    tune_plans = [[sweeper.plan(j) for j in js] for js in tune_jobs]

    def evaluation():
        out_jobs, out_plans = [], []
        for cell, plans in zip(cells, tune_plans):
            pick(cell, plans)
            js = [stage_overrides(cell.overrides, cell.lr, s, f"{name}/eval") for s in spec.eval_seeds] \
                if cell.lr is not None else []
            out_jobs.append(js)
            out_plans.append([sweeper.plan(j) for j in js])
        return out_jobs, out_plans

    if sweeper.dry_run:
        dry_run(sweeper, cells, spec, tune_plans, evaluation()[1], sweep_dir)
    results, timing = _run_stage(sweeper, "tune", [j for js in tune_jobs for j in js],
                                 [p for ps in tune_plans for p in ps])
    tune_plans = [[sweeper.plan(j) for j in js] for js in tune_jobs]  # their state after the stage
    eval_jobs, eval_plans = evaluation()
    ids = {c.label: [p.run_id for p in ps] for c, ps in zip(cells, eval_plans)}
    write_study(sweep_dir, spec, cells, ids, timing)
    for cell in cells:
        if not cell.ready:
            log.warning("study cell %s: tuning runs not all done (%s); re-run the command to finish it",
                        cell.label, cell.outcomes)
    more, timing = _run_stage(sweeper, "eval", [j for js in eval_jobs for j in js],
                              [p for ps in eval_plans for p in ps])
    write_study(sweep_dir, spec, cells, ids, timing)
    return results + more
