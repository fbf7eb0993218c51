"""Weights & Biases logging, kept behind one small class so training never depends on it.

``logger.mode=offline`` (the default) needs no account or network: runs are written under the job's
folder (``<job>/wandb/``) and can be uploaded later with ``wandb sync``. ``online`` logs live;
``disabled`` (or ``logger.wandb=false``) turns W&B off. The run store is written either way.
``online`` waits at most ``logger.init_timeout`` seconds for the server (one line when it starts
waiting, one if it gives up); a server that does not answer, or refuses, gets the run offline in the
job folder instead, to be uploaded later with ``wandb sync``: training never waits on W&B longer.

Hydra's launchers reuse processes, so the run is opened with ``reinit="finish_previous"``: an
unfinished run never swallows the next job. If W&B fails (not installed, unreachable, broken), the
error is reported once and training goes on with the local run store alone.

Runs of one sweep share a W&B group (the sweep's ``name``); the job type is the variant and the
tags are the variant and the depth. The W&B run id is the job's identity (``run_id``, see
:mod:`resnorm.runs.identity`), opened with ``resume="allow"``: a resumed job continues the same W&B run
(W&B keeps each step once: the steps a resumed run logs again were logged before with the same
values). Under a W&B sweep agent (``WANDB_SWEEP_ID`` set) the agent names the run instead.

W&B records the installed packages with each run (its requirements list), reading every installed
distribution's metadata again for each run (a fifth of a second a run); :func:`cache_working_set`
makes it read them once per process (the installed packages do not change under a sweep's workers).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional

log = logging.getLogger(__name__)
DEFAULT_INIT_TIMEOUT = 30.0  # seconds; the schema's logger.init_timeout


def answers(url: str, timeout: float) -> None:
    """Raise (URLError, TimeoutError, OSError) unless the server at ``url`` answers an HTTP request
    within ``timeout`` seconds; any HTTP status counts as an answer."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        pass


def drop_empty_wandb_env() -> None:
    """Unset every ``WANDB_*`` variable that is set to the empty string (``WANDB_MODE=`` in a job script):
    W&B reads an empty one as a value and refuses to start (``mode: Input should be 'online', ...``),
    where a user means "not set"."""
    for name in [k for k, v in os.environ.items() if k.startswith("WANDB_") and v == ""]:
        log.info("wandb: %s is set but empty: treated as unset", name)
        del os.environ[name]


def cache_working_set(util: Any) -> bool:
    """Make W&B's ``util.working_set()`` (the installed distributions a run records as its
    requirements) read the installed packages once per process and give the same list after;
    False where this W&B has no such function (then it is left as it is)."""
    scan: Optional[Callable[[], Iterable[Any]]] = getattr(util, "working_set", None)
    if scan is None or getattr(scan, "cached", None) is not None:
        return scan is not None
    found: list = []

    @functools.wraps(scan)
    def working_set() -> Iterable[Any]:
        if not found:
            found.append(tuple(scan()))
        return iter(found[0])

    working_set.cached = found  # type: ignore[attr-defined]  # the list read once (empty until then)
    util.working_set = working_set
    return True


class WandbTracker:
    def __init__(self, logger_cfg, run_dir: Path, group: str, name: str, config: Dict[str, Any],
                 run_id: Optional[str] = None, tags=None, job_type: Optional[str] = None,
                 enabled: bool = True, reinit: str = "finish_previous"):
        self.reinit = reinit  # "create_new": several runs open at once (the members of a stack)
        self.cfg, self.run_dir, self.group, self.name = logger_cfg, Path(run_dir), group, name
        self.config, self.tags, self.job_type = config, list(tags or []), job_type
        # under a sweep agent, the agent's run id (WANDB_RUN_ID) names the run
        self.requested_id = None if os.environ.get("WANDB_SWEEP_ID") else run_id
        self.run = None
        self.run_id: Optional[str] = None  # the id of the W&B run once open
        self.error: Optional[str] = None
        self._wanted = enabled

    @property
    def enabled(self) -> bool:
        return self._wanted and bool(self.cfg.wandb) and self.cfg.mode != "disabled"

    def __enter__(self) -> "WandbTracker":
        if not self.enabled:
            return self
        try:
            import wandb

            try:
                from wandb import util as wandb_util
            except ImportError:  # a W&B without it: runs record their packages its own way
                wandb_util = None
            cache_working_set(wandb_util)
            os.environ.setdefault("WANDB_SILENT", "true")
            drop_empty_wandb_env()
            if self.cfg.mode == "online":
                self.run = self._online(wandb)
            else:
                self.run = self._init(wandb, self.cfg.mode)
            self.run_id = self.run.id
        except Exception as exc:  # W&B must never take a run down with it
            self._fail("init", exc)
        return self

    def _init(self, wandb, mode: str, timeout: Optional[float] = None):
        settings = dict(console="off", x_disable_stats=True, x_disable_machine_info=True)
        if timeout is not None:  # every wait on the server bounded (W&B's own defaults add up to ~97 s)
            settings.update(init_timeout=timeout, x_graphql_timeout_seconds=timeout, x_graphql_retry_max=1,
                            finish_timeout=timeout)
        return wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, group=self.group, name=self.name,
            config=self.config, dir=str(self.run_dir), mode=mode, id=self.requested_id,
            resume="allow" if self.requested_id else None, tags=self.tags, job_type=self.job_type,
            reinit=self.reinit, settings=wandb.Settings(**settings),
        )

    def _online(self, wandb):
        """Open the run online, waiting at most ``logger.init_timeout`` seconds for the server; if it
        does not answer (or refuses), open it offline in the job folder instead (``wandb sync`` it later)."""
        timeout = float(self.cfg.get("init_timeout", DEFAULT_INIT_TIMEOUT) if hasattr(self.cfg, "get")
                        else getattr(self.cfg, "init_timeout", DEFAULT_INIT_TIMEOUT))
        server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        log.info("wandb: connecting to %s (at most %g s, logger.init_timeout)", server, timeout)
        try:
            answers(server, timeout)
            return self._init(wandb, "online", timeout)
        except Exception as exc:  # unreachable, no account, refused: log offline instead
            folder = self.run_dir / "wandb"
            self.error = (f"wandb online init failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          f"logged offline in {folder}")
            log.warning("wandb: no answer from %s (%s): logging offline in %s; upload later with "
                        "`wandb sync %s/offline-run-*`", server, type(exc).__name__, folder, folder)
            return self._init(wandb, "offline", timeout)  # its exit bounded too

    def _fail(self, where: str, exc: Exception) -> None:
        self.error = f"wandb {where} failed: {type(exc).__name__}: {exc}"
        log.warning("%s; training goes on, the run store stays complete", self.error)
        self.run = None

    def log(self, data: Dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data, step=step)
        except Exception as exc:
            self._fail("log", exc)

    def summary(self, data: Dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(data)
        except Exception as exc:
            self._fail("summary", exc)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=0 if exc_type is None else 1)
        except Exception as err:
            self._fail("finish", err)
        self.run = None
