"""``python -m resnorm.finetune SWEEP_OR_RUN_DIR --task NAME``: fine-tune finished runs on a labelled task.

Every run under the folder (any folder holding a ``summary.json``; the search does not descend into
a run) that completed and kept its checkpoint (``train.keep_checkpoint=true``) is fine-tuned on the
task. First the recipe (:func:`choose`, :mod:`resnorm.tasks.recipe`): the floors (:mod:`resnorm.tasks.floors`),
then a learning-rate grid fine-tuned on the training rows less a validation part carved from them,
early-stopped on that part's score; then the chosen rate for the chosen number of steps through the
same loop as pre-training (:func:`resnorm.train.job.execute`: lock, skip, resume, failure record; guard,
outcomes, probes, monitors, W&B as the run's own config says). Its config is the run's own, with
``finetune.task`` and ``finetune.init_from`` set, ``optim.lr`` and ``train.steps`` the recipe's
choice, a constant rate after the warm-up, ``train.batch_size`` from the flags, no checkpoint kept.
The results go to ``<run>/finetune/<task>/``: an ordinary run folder whose ``summary.json`` adds
the task's score (``task_metric``: ``accuracy`` or ``span_f1``, ``task_score``, the majority-class
accuracy or the span precision and recall, ``pretrained_run_id``), the floors (``floor_*``) and the
recipe's choice (``recipe_*``).
Re-running skips what is done. ``python -m analysis`` then draws the downstream score against depth.

Bad input is one line and exit status 2: a folder that does not exist or holds no run, an unknown
task, a task file without the columns its kind needs, a flag out of range, a run (or a sweep none
of whose runs) without ``checkpoint.pt``. In a sweep, a run that cannot be fine-tuned (not
completed, no checkpoint) is one ``skipped`` line and the rest go on. Exit status otherwise: the
number of fine-tunes that failed (at most 125).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from resnorm.errors import ConfigError, DataError

#: the flags' defaults; None: the task kind's (resnorm.tasks.recipe.KIND_DEFAULTS)
DEFAULTS = dict(steps=None, lr=None, batch=16, head_lr_scale=None, patience=None, eval_every=25)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a positive {'integer' if kind is int else 'number'}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (python -m resnorm.finetune --help)\n")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = _Parser(prog="python -m resnorm.finetune",
                                description="Fine-tune every finished run (with train.keep_checkpoint=true) on a task.")
    p.add_argument("path", metavar="SWEEP_OR_RUN_DIR", help="a sweep folder (multirun/<name>) or one run folder")
    p.add_argument("--task", required=True, help="a built-in task (play_genre, speaker_tags) or a CSV / JSON "
                                                 "lines file or HF dataset folder with columns text,label or tokens,tags")
    p.add_argument("--steps", type=_positive(int), default=DEFAULTS["steps"],
                   help="most fine-tuning steps per rate; early stopping may end sooner (default: 1000 to "
                        "classify, 400 to tag)")
    p.add_argument("--lr", type=_positive(float), action="append", default=DEFAULTS["lr"],
                   help="a learning rate of the grid (repeat for several; default: 3e-4 1e-3 3e-3)")
    p.add_argument("--head-lr-scale", type=_positive(float), default=DEFAULTS["head_lr_scale"],
                   help="the head's learning rate over the body's (default: 30 to classify, 1 to tag)")
    p.add_argument("--batch", type=_positive(int), default=DEFAULTS["batch"], help="examples per step (default 16)")
    p.add_argument("--eval-every", type=_positive(int), default=DEFAULTS["eval_every"],
                   help="steps between validation scores (default 25)")
    p.add_argument("--patience", type=_positive(int), default=DEFAULTS["patience"],
                   help="validation scores without a new best before a rate stops (default: 12 to classify, "
                        "4 to tag)")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                   help="where and how the fine-tunes run: logger.*, train.device, train.threads and the other "
                        "keys outside a run's identity (resnorm.runs.identity.OPERATIONAL_KEYS); a copied run "
                        "folder's own values of these are never used")
    args = p.parse_intermixed_args(argv)  # KEY=VALUE settings may follow the flags
    for line in args.settings:
        key = line.split("=", 1)[0].lstrip("+")
        if "=" not in line or not _operational(key):
            p.error(f"{line!r}: only KEY=VALUE of the keys outside a run's identity can be set here "
                    "(logger.*, train.device, train.devices, train.threads, train.progress, ...)")
    return args


#: the keys a copied run folder never sets for a fine-tune: where its results are sent (W&B), which
#: devices it takes, where it caches; they come from the fine-tune's command line (else their defaults).
#: The other operational keys (checkpoint interval, threads, micro-batches) are inherited from the run.
FROM_COMMAND = ("logger", "train.device", "train.devices", "data.cache_dir")


def _under(dotted: str, keys) -> bool:
    return any(dotted == k or dotted.startswith(k + ".") for k in keys)


def _operational(dotted: str) -> bool:
    """Whether ``dotted`` is one of (or under one of) resnorm.runs.identity.OPERATIONAL_KEYS."""
    from resnorm.runs.identity import OPERATIONAL_KEYS

    return _under(dotted, OPERATIONAL_KEYS)


def with_kind_defaults(args, task: str) -> argparse.Namespace:
    """``args`` with each flag left unset (None) at the default of ``task``'s kind
    (:data:`resnorm.tasks.recipe.KIND_DEFAULTS`); the task is read for its kind only when a flag is unset."""
    from resnorm.tasks.labelled import task_kind
    from resnorm.tasks.recipe import KIND_DEFAULTS

    values = vars(args).copy()
    unset = {k for defaults in KIND_DEFAULTS.values() for k in defaults if values.get(k) is None}
    if unset:
        defaults = KIND_DEFAULTS[task_kind(task)]
        values.update({k: defaults[k] for k in unset})
    return argparse.Namespace(**values)


def recipe_of(args, seed: int = 0):
    """The :class:`resnorm.tasks.recipe.Recipe` the flags describe."""
    from resnorm.tasks.recipe import LR_GRID, Recipe

    return Recipe(lrs=tuple(args.lr or LR_GRID), steps=args.steps, batch=args.batch,
                  head_lr_scale=args.head_lr_scale, eval_every=args.eval_every, patience=args.patience,
                  warmup=min(30, max(1, args.steps // 10)), seed=seed)


def why_not(run_dir: Path, summary: Optional[Dict[str, Any]]) -> Optional[str]:
    """Why a run folder cannot be fine-tuned (None: it can)."""
    from resnorm.runs.folder import CHECKPOINT

    if summary is None:
        return "its summary.json cannot be read"
    if summary.get("status") != "completed":
        return f"status {summary.get('status')}: only completed runs are fine-tuned"
    if not (run_dir / CHECKPOINT).is_file():
        return f"no {CHECKPOINT}: pre-train it with train.keep_checkpoint=true to fine-tune it"
    from resnorm.tasks.heads import checkpoint_problem

    return checkpoint_problem(run_dir / CHECKPOINT, summary.get("run_id"))


def _flat(node: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stored_overrides(run_dir: Path, summary: Dict[str, Any]) -> List[str]:
    """The run's resolved config (its summary's, else ``.hydra/config.yaml``) as one override per key,
    so :func:`resnorm.config.compose.compose` rebuilds it on the current schema (keys added since take their
    defaults). Stored values are data: quoted so that nothing in them is resolved (an ``${oc.env:...}``
    stays that text), and the keys of :data:`FROM_COMMAND` (W&B, devices, the cache folder: the folder
    may be someone else's) are left out, to come from the fine-tune's own command line."""
    from resnorm.config.compose import override

    stored = summary.get("config")
    if stored is None:
        import yaml

        stored = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    if not isinstance(stored, dict):
        raise DataError(f"{run_dir}: its stored config is a {type(stored).__name__}, not an object")
    flat = _flat({k: v for k, v in stored.items() if k != "hydra"})
    return [override(k, v) for k, v in flat.items() if not _under(k, FROM_COMMAND)]


def finetune_config(run_dir: Path, summary: Dict[str, Any], task: str, args, lr: Optional[float] = None,
                    steps: Optional[int] = None) -> Tuple[Any, List[str]]:
    """The fine-tune's config (validated) and its overrides against the run's own config: the
    recipe's chosen rate ``lr`` (default: the grid's first) for ``steps`` (default ``--steps``),
    its warm-up, then a constant rate."""
    from resnorm.config.compose import compose, override
    from resnorm.tasks.labelled import _builtins
    from resnorm.train.preflight import validate

    base = stored_overrides(run_dir, summary)
    recipe = recipe_of(args)
    steps = steps or args.steps
    spec = task if task in _builtins() else str(Path(task).expanduser().resolve())
    values = {"finetune.task": spec, "finetune.init_from": str(run_dir.resolve()), "train.steps": steps,
              "optim.lr": lr or recipe.lrs[0], "train.batch_size": args.batch,
              "train.eval_every": max(1, min(args.eval_every, steps)), "optim.schedule": "constant",
              "optim.warmup_steps": min(recipe.warmup, steps), "train.keep_checkpoint": False,
              "finetune.head_lr_scale": recipe.head_lr_scale, "optim.grad_clip": recipe.grad_clip}
    overrides = [override(k, v) for k, v in values.items()] + list(getattr(args, "settings", None) or [])
    cfg = compose(base + overrides)
    validate(cfg)
    return cfg, overrides


@dataclass
class TaskSetup:
    """A fine-tune's parts: its config, the task's data (:class:`resnorm.tasks.TaskData`, with the
    validation part carved from the training rows) and the pre-trained model with a fresh head."""

    cfg: Any
    data: Any
    model: Any

    @property
    def fit(self):
        return self.data.fit

    @property
    def val(self):
        return self.data.dev


def task_setup(run_dir: Path, task: str, seed: int = 0, args=None) -> TaskSetup:
    """The config, data and model of fine-tuning the run ``run_dir`` on ``task`` (no training)."""
    import torch

    from resnorm.runs.folder import read_summary
    from resnorm.tasks.heads import build_task_model
    from resnorm.tasks.labelled import load_task_data

    args = with_kind_defaults(args or argparse.Namespace(**DEFAULTS), task)
    cfg, _ = finetune_config(run_dir, read_summary(run_dir), task, args)
    data = load_task_data(cfg)
    torch.manual_seed(seed)
    return TaskSetup(cfg, data, build_task_model(cfg, data))


def identity_config(cfg, summary: Dict[str, Any]):
    """What a fine-tune's identity hashes: its config with the two paths replaced by what they stand
    for, the pre-trained run's ``run_id`` and the task's name and content
    (:func:`resnorm.tasks.task_fingerprint`), so a sweep moved or copied elsewhere finds its
    fine-tunes done (and a task file edited since is a new fine-tune)."""
    import copy

    from resnorm.tasks.labelled import task_fingerprint

    ident = copy.deepcopy(cfg)
    ident.finetune.init_from = summary.get("run_id")
    ident.finetune.task = task_fingerprint(cfg.finetune.task)
    return ident


def choose(run_dir: Path, task: str, args) -> Dict[str, Any]:
    """The recipe on one run: the floors (the probe on the frozen pre-trained features), then the
    rate grid on the validation part carved from the training rows (:func:`resnorm.tasks.recipe.select`).
    The held-out rows are scored only by the floors' final models here; the fine-tune's own held-out
    score is the loop's (:class:`resnorm.train.callbacks.TaskScore`)."""
    import time

    import torch

    from resnorm.tasks.heads import floors
    from resnorm.tasks.recipe import select, trials_record
    from resnorm.train.devices import job_threads
    from resnorm.train.optimizers import task_optimizer

    t0 = time.time()
    args = with_kind_defaults(args, task)
    seed = int(read_seed(run_dir))
    setup = task_setup(run_dir, task, seed, args)
    torch.set_num_threads(job_threads(setup.cfg.train.threads, 1))  # the loop's threads: its replay sums alike
    out = floors(setup.model, setup.data, setup.cfg.train.seq_len)
    best, trials = select(setup.model, setup.data, setup.fit, setup.val, recipe_of(args, seed), task_optimizer)
    return {**out, "recipe_lr": best.lr, "recipe_steps": max(best.best_step, 1), "recipe_val_score": best.best_score,
            "recipe_grid": trials_record(trials), "recipe_seconds": time.time() - t0}


def read_seed(run_dir: Path) -> int:
    from resnorm.runs.folder import read_summary

    summary = read_summary(run_dir) or {}
    return int((summary.get("config") or {}).get("seed", 0) or 0)


def recipe_key(summary: Dict[str, Any], task: str, args) -> str:
    """What the recipe's choice depends on: the pre-trained run, the task's content, the flags."""
    import dataclasses
    import hashlib
    import json

    from resnorm.tasks.labelled import task_fingerprint

    spec = dict(run=summary.get("run_id"), task=task_fingerprint(task), recipe=dataclasses.asdict(recipe_of(args)))
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finetune_run(run_dir: Path, summary: Dict[str, Any], task: str, args) -> Dict[str, Any]:
    """Fine-tune one run on ``task`` in ``<run>/finetune/<task>/`` (skipped when done); its summary.
    The recipe (:func:`choose`) picks the rate and the steps; the loop then fine-tunes at that rate
    for that many steps on the same fitting rows and scores the held-out rows once."""
    from resnorm.runs.folder import FINETUNE, read_summary
    from resnorm.runs.identity import run_id
    from resnorm.tasks.labelled import task_name
    from resnorm.train.callbacks import TaskScore, default_callbacks
    from resnorm.train.job import JobInfo, execute

    args = with_kind_defaults(args, task)
    name = task_name(task)
    folder = run_dir / FINETUNE / name
    key = recipe_key(summary, task, args)
    done = read_summary(folder) if (folder / "summary.json").is_file() else None
    if done is not None and done.get("status") == "completed" and done.get("recipe_key") == key:
        return {**done, "skipped": True}  # the same run, task content and recipe: no need to choose again
    chosen = {**choose(run_dir, task, args), "recipe_key": key}
    cfg, overrides = finetune_config(run_dir, summary, task, args, chosen["recipe_lr"], chosen["recipe_steps"])
    job = JobInfo(folder, f"{summary.get('run_name', run_dir.name)} finetune={name}",
                  cfg.name, list(summary.get("overrides") or []) + overrides,
                  run_id(identity_config(cfg, summary)))
    extra = [TaskScore(summary.get("run_id"), chosen)]
    return execute(cfg, job, callbacks=lambda run: default_callbacks(run, extra=extra))


def _check_task(task: str) -> None:
    """One-line DataError for an unknown task, a file without the needed columns or with one label, or a
    name that makes no folder, before any run."""
    from resnorm.tasks.labelled import _builtins, check_label_count, kind_of, label_set, read_rows, split_rows, task_name

    if task in _builtins():
        return
    task_name(task)
    rows, source = read_rows(task)
    kind = kind_of(rows, source)
    labels = label_set(rows, kind, source)
    split_rows(rows, source)
    check_label_count(labels, kind, source)


def _report(run_dir: Path, result: Dict[str, Any]) -> str:
    if result.get("skipped"):
        return f"{run_dir}: already fine-tuned ({result.get('task_metric')} {result.get('task_score')}): skipped"
    if result.get("status") == "completed":
        return f"{run_dir}: {result.get('task')} {result.get('task_metric')} {result['task_score']:.4f}"
    return f"{run_dir}: fine-tune {result.get('status')}" + (f" ({result['error']})" if result.get("error") else "")


def main(argv: Optional[List[str]] = None) -> int:
    from resnorm.runs.folder import find_run_dirs, read_summary

    args = parse_args(argv)
    root = Path(args.path)
    if not root.is_dir():
        print(f"error: {args.path}: {'not a folder' if root.exists() else 'no such folder'}", file=sys.stderr)
        return 2
    try:
        _check_task(args.task)
        args = with_kind_defaults(args, args.task)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = [(d, read_summary(d)) for d in find_run_dirs(root)]
    if not runs:
        print(f"error: {args.path}: no run folder (with a summary.json) under it", file=sys.stderr)
        return 2
    runs = [(d, s, why_not(d, s)) for d, s in runs]
    ready = [(d, s) for d, s, why in runs if why is None]
    if not ready:
        d, s, why = runs[0]
        why = why if len(runs) == 1 else f"none of its {len(runs)} runs can be fine-tuned (the first: {why})"
        print(f"error: {d if len(runs) == 1 else args.path}: {why}", file=sys.stderr)
        return 2
    for d, s, why in runs:
        if why is not None:
            print(f"{d}: skipped, {why}", file=sys.stderr)
    failed = 0
    for d, s in ready:
        try:
            result = finetune_run(d, s, args.task, args)
        except (ConfigError, DataError) as exc:
            print(f"error: {d}: {exc}", file=sys.stderr)
            return 2
        failed += result.get("status") == "failed"
        print(_report(d, result), flush=True)
    return min(failed, 125)


if __name__ == "__main__":
    sys.exit(main())
