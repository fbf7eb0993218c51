"""``python -m resnorm.finetune SWEEP_OR_RUN_DIR --task NAME``: fine-tune finished runs on a labelled task.

Every run under the folder (any folder holding a ``summary.json``; the search does not descend into
a run) that completed and kept its checkpoint (``train.keep_checkpoint=true``) is fine-tuned on the
task, through the same loop as pre-training (:func:`resnorm.train.job.execute`: lock, skip, resume,
failure record; guard, outcomes, probes, monitors, W&B as the run's own config says). Its config is
the run's own, with ``finetune.task`` and ``finetune.init_from`` set and ``train.steps``,
``optim.lr``, ``train.batch_size``, ``train.eval_every`` from the flags (warm-up: at most a tenth
of the steps; no checkpoint kept). The results go to ``<run>/finetune/<task>/``: an ordinary run
folder whose ``summary.json`` adds the task's score (``task_metric``: ``accuracy`` or ``span_f1``,
``task_score``, the majority-class accuracy or the span precision and recall, ``pretrained_run_id``).
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
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from resnorm.errors import ConfigError, DataError

DEFAULTS = dict(steps=200, lr=3e-4, batch=16)


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
    p.add_argument("--steps", type=_positive(int), default=DEFAULTS["steps"], help="fine-tuning steps (default 200)")
    p.add_argument("--lr", type=_positive(float), default=DEFAULTS["lr"], help="peak learning rate (default 3e-4)")
    p.add_argument("--batch", type=_positive(int), default=DEFAULTS["batch"], help="examples per step (default 16)")
    p.add_argument("--eval-every", type=_positive(int), default=None,
                   help="steps between held-out losses (default: a quarter of the steps)")
    return p.parse_args(argv)


def why_not(run_dir: Path, summary: Optional[Dict[str, Any]]) -> Optional[str]:
    """Why a run folder cannot be fine-tuned (None: it can)."""
    from resnorm.runs.folder import CHECKPOINT

    if summary is None:
        return "its summary.json cannot be read"
    if summary.get("status") != "completed":
        return f"status {summary.get('status')}: only completed runs are fine-tuned"
    if not (run_dir / CHECKPOINT).is_file():
        return f"no {CHECKPOINT}: pre-train it with train.keep_checkpoint=true to fine-tune it"
    return None


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
    defaults)."""
    from resnorm.config.compose import override

    stored = summary.get("config")
    if stored is None:
        import yaml

        stored = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    return [override(k, v) for k, v in _flat({k: v for k, v in stored.items() if k != "hydra"}).items()]


def finetune_config(run_dir: Path, summary: Dict[str, Any], task: str, args) -> Tuple[Any, List[str]]:
    """The fine-tune's config (validated) and its overrides against the run's own config."""
    from resnorm.config.compose import compose, override
    from resnorm.tasks.labelled import _builtins
    from resnorm.train.preflight import validate

    base = stored_overrides(run_dir, summary)
    warmup = int(compose(base).optim.warmup_steps)
    spec = task if task in _builtins() else str(Path(task).expanduser().resolve())
    values = {"finetune.task": spec, "finetune.init_from": str(run_dir.resolve()), "train.steps": args.steps,
              "optim.lr": args.lr, "train.batch_size": args.batch,
              "train.eval_every": args.eval_every or max(1, args.steps // 4),
              "optim.warmup_steps": min(warmup, args.steps // 10), "train.keep_checkpoint": False}
    overrides = [override(k, v) for k, v in values.items()]
    cfg = compose(base + overrides)
    validate(cfg)
    return cfg, overrides


def identity_config(cfg, summary: Dict[str, Any]):
    """What a fine-tune's identity hashes: its config with the two paths replaced by what they stand
    for, the pre-trained run's ``run_id`` and the task's name and content
    (:func:`resnorm.tasks.labelled.task_fingerprint`), so a sweep moved or copied elsewhere finds its
    fine-tunes done (and a task file edited since is a new fine-tune)."""
    import copy

    from resnorm.tasks.labelled import task_fingerprint

    ident = copy.deepcopy(cfg)
    ident.finetune.init_from = summary.get("run_id")
    ident.finetune.task = task_fingerprint(cfg.finetune.task)
    return ident


def finetune_run(run_dir: Path, summary: Dict[str, Any], task: str, args) -> Dict[str, Any]:
    """Fine-tune one run on ``task`` in ``<run>/finetune/<task>/`` (skipped when done); its summary."""
    from resnorm.train.callbacks import TaskScore, default_callbacks
    from resnorm.runs.identity import run_id
    from resnorm.runs.folder import FINETUNE
    from resnorm.tasks.labelled import task_name
    from resnorm.train.job import JobInfo, execute

    cfg, overrides = finetune_config(run_dir, summary, task, args)
    name = task_name(task)
    job = JobInfo(run_dir / FINETUNE / name, f"{summary.get('run_name', run_dir.name)} finetune={name}",
                  cfg.name, list(summary.get("overrides") or []) + overrides,
                  run_id(identity_config(cfg, summary)))
    extra = [TaskScore(summary.get("run_id"))]
    return execute(cfg, job, callbacks=lambda run: default_callbacks(run, extra=extra))


def _check_task(task: str) -> None:
    """One-line DataError for an unknown task or a file without the needed columns, before any run."""
    from resnorm.tasks.labelled import _builtins, kind_of, label_set, read_rows, split_rows

    if task in _builtins():
        return
    rows, source = read_rows(task)
    label_set(rows, kind_of(rows, source), source)
    split_rows(rows, source)


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
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = [(d, read_summary(d)) for d in find_run_dirs(root)]
    if not runs:
        print(f"error: {args.path}: no run folder (with a summary.json) under it", file=sys.stderr)
        return 2
    ready = [(d, s) for d, s in runs if why_not(d, s) is None]
    if not ready:
        d, s = runs[0]
        why = why_not(d, s) if len(runs) == 1 else \
            f"none of its {len(runs)} runs can be fine-tuned (the first: {why_not(d, s)})"
        print(f"error: {d if len(runs) == 1 else args.path}: {why}", file=sys.stderr)
        return 2
    for d, s in runs:
        if why_not(d, s) is not None:
            print(f"{d}: skipped, {why_not(d, s)}", file=sys.stderr)
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
