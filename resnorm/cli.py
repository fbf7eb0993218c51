"""What the entry point prints and returns: one-line config errors, the ``--dry-run`` flag, and a
sweep's exit code.

Importing this module registers the ``${run_id:}`` resolver (the job folder's name in a sweep,
see :mod:`resnorm.runs.identity`): ``run.py`` imports it, and so does every process that unpickles
``run.py``'s task function (the parallel, SLURM and Ray launchers' workers).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

from resnorm.errors import ConfigError
from resnorm.runs.identity import register_resolver

register_resolver()

DRY_RUN_FLAG = "--dry-run"


@contextlib.contextmanager
def report_config_errors():
    """Turn a ConfigError into one line on stderr and exit status 2 (SystemExit passes through Hydra)."""
    try:
        yield
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _job_lines(parsed, multirun: bool) -> List[List[str]]:
    """The override lines of the jobs to check before Hydra starts: the single run's; in a sweep,
    the fixed overrides with each value of each swept key in turn (one value is enough to catch its
    error; the sweeper checks every job it composes)."""
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    if not multirun:
        return [fixed]
    jobs = [fixed]
    for o in parsed:
        if o.is_sweep_override():
            jobs += [fixed + [f"{o.get_key_element()}={v}"] for v in o.sweep_string_iterator()]
    return jobs


def preflight(argv: List[str]) -> None:
    """Check the command line before Hydra starts, so that a bad config writes nothing: Hydra's own
    errors (a value of the wrong type, an unknown key or group option, a sweep without ``-m``) and,
    for a single run, every check of :func:`resnorm.train.preflight.validate` become one ``config error:``
    line and exit status 2. A command with other flags (``--help``, ``--cfg``, ``-cn``) is left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from resnorm.config.compose import check_override, composition_error, compose

    from resnorm.train.preflight import validate

    args = argv[1:]
    multirun = any(a in ("-m", "--multirun") for a in args)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return
    lines = [a for a in args if a not in ("-m", "--multirun")]
    # hydra.* values are Hydra's to check; the group choices (hydra/launcher=...) compose with the rest
    lines = [a for a in lines if not a.lstrip("+~").startswith("hydra.")]
    with report_config_errors():
        try:
            parsed = OverridesParser.create().parse_overrides(lines)
        except Exception as exc:  # noqa: BLE001  # Hydra's grammar
            raise composition_error(lines, exc) from None
        if not multirun:
            swept = [o for o in parsed if o.is_sweep_override()]
            if swept:
                o = swept[0]
                raise ConfigError(o.key_or_group, o.input_line.split("=", 1)[-1],
                                  "several values: add -m to sweep them (one job each), or write a list "
                                  "[a,b] or a quoted string 'a,b'")
        for job in _job_lines(parsed, multirun):
            for o in OverridesParser.create().parse_overrides(job):
                check_override(o)
            try:
                cfg = compose(job)
            except Exception as exc:  # noqa: BLE001  # Hydra's composition errors
                raise composition_error(job, exc) from None
            if not multirun:
                validate(cfg)
                _check_writable(_single_run_dir(args, cfg))


def _single_run_dir(args: List[str], cfg) -> Path:
    """Where Hydra will write a single run: ``hydra.run.dir`` from the command line, else
    ``outputs/<name>/<run_id>`` (conf/config.yaml)."""
    from resnorm.runs.identity import run_id

    given = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("hydra.run.dir=")]
    return Path(given[-1]) if given else Path("outputs") / str(cfg.name) / run_id(cfg)


def _check_writable(folder: Path) -> None:
    """One line and exit 2 when ``folder`` cannot be created or written (a path component is a
    file, or the nearest existing folder is not writable), before Hydra tries and prints a traceback."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    problem = None
    if not probe.is_dir():
        problem = f"{probe} is not a folder"
    elif not os.access(probe, os.W_OK | os.X_OK):
        problem = f"{probe} is not writable"
    if problem:
        print(f"error: cannot write the run folder {folder} ({problem}); choose another with "
              "hydra.run.dir=DIR", file=sys.stderr)
        raise SystemExit(2)


def expand_flags(argv: List[str]) -> List[str]:
    """``--dry-run`` is ``-m ... hydra.sweeper.dry_run=true``: print the job table, launch nothing."""
    if DRY_RUN_FLAG not in argv:
        return list(argv)
    out = [a for a in argv if a != DRY_RUN_FLAG]
    if not any(a in ("-m", "--multirun") for a in out[1:]):
        out.insert(1, "-m")
    return out + ["hydra.sweeper.dry_run=true"]


#: the result of this process's single run (no ``-m``), for the exit code; a sweep's jobs are
#: counted by the sweeper (:data:`resnorm.runs.progress.LAST_OUTCOME`)
SINGLE: Dict[str, Any] = {}


def record_single(result: Dict[str, Any]) -> Dict[str, Any]:
    """Keep the task function's ``result`` when Hydra runs a single job (not a sweep's); return it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
        SINGLE.update(result, run_dir=HydraConfig.get().runtime.output_dir)
    return result


def exit_code() -> int:
    """A single run: 0 when it completed or diverged (a finding, not an error), else 1. A sweep: 0
    when every job completed or diverged; else the number of jobs that failed or were left to another
    process running them (the same sweep started twice), at most 125."""
    from resnorm.runs.folder import DONE
    from resnorm.runs.progress import LAST_OUTCOME

    if SINGLE:
        status = SINGLE.get("status")
        if status in DONE:
            return 0
        why = SINGLE.get("error") or SINGLE.get("note") or "see its summary.json"
        print(f"run {status}: {why} ({SINGLE.get('run_dir')})", file=sys.stderr)
        return 1
    failed = LAST_OUTCOME.get("failed", 0) + LAST_OUTCOME.get("unknown", 0)
    running = LAST_OUTCOME.get("running", 0)
    total = sum(LAST_OUTCOME.values())
    if failed:
        print(f"{failed} of {total} runs failed: see their summary.json", file=sys.stderr)
    if running:
        print(f"{running} of {total} runs are being trained by another process (the same sweep started "
              "twice?): not waited for; run the command again once it is done", file=sys.stderr)
    return min(failed + running, 125)
