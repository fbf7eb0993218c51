"""The run folder: the on-disk contract of one job, written by training and read by everyone else.

One job, one folder (``multirun/<name>/<run_id>/`` in a sweep, see :mod:`resnorm.runs.identity`):

- :data:`SUMMARY` (``summary.json``): the run's record; ``status`` is one of :data:`STATUSES`
  (``running`` while it trains, then ``completed``, ``diverged`` or ``failed``), plus losses,
  throughput, versions, ``run_id``, ``run_name``, overrides and the resolved ``config``. Non-finite
  floats are stored as ``null`` (:func:`json_safe`).
- :data:`METRICS` (``metrics.parquet``): one row per step, columns :data:`STEP_COLUMNS`
  (``val_loss`` is NaN except on evaluation steps).
- :data:`LAYERS` (``layers.parquet``): the tidy per-layer table, columns :data:`LAYER_COLUMNS`.
- :data:`CHECKPOINT` (``checkpoint.pt``, see :mod:`resnorm.train.checkpoint`) while the run is unfinished
  (or kept with ``train.keep_checkpoint=true``); it holds the rows so far
  (:meth:`RunStore.state_dict`), so a resumed run never stores a step twice.
- :data:`LOCK` (``.lock``): :func:`job_lock` holds it while a process trains the job.
- :data:`TENSORBOARD` (``tensorboard/``): TensorBoard event files, with ``logger.tensorboard=true``.

Every file is written by :func:`atomic_write`: to a fresh temporary name in the same folder, then
``os.replace``, so a reader never sees half a file; files get the usual permissions (0644 under a
umask of 022), so colleagues can read a shared sweep. What a re-run does with a folder is
:func:`job_state`: ``new``, ``completed``/``diverged`` (the statuses in :data:`DONE`: skipped),
``resume`` (a checkpoint is there), ``retry`` (failed or interrupted before any checkpoint) or
``foreign`` (the folder holds another run: left alone). ``docs/run-folder.md`` is the long form.

This module imports no torch (nor pandas; pyarrow only when :meth:`RunStore.flush_tables` writes),
so the analysis and the sweeper read run folders through it on any machine.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

#: the files of a run folder
SUMMARY = "summary.json"
METRICS = "metrics.parquet"
LAYERS = "layers.parquet"
CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
TENSORBOARD = "tensorboard"  # logger.tensorboard=true: the TensorBoard event files
FINETUNE = "finetune"  # <run>/finetune/<task>/, a fine-tune's own run folder (resnorm.finetune)

#: a run's ``status`` in its summary, in the order of its life: it is ``running`` until it ends
STATUSES = ("running", "completed", "diverged", "failed")
#: statuses after which a run is over: a re-run of the sweep skips it (``failed`` is retried)
DONE = ("completed", "diverged")
#: the columns of ``metrics.parquet``, one row per step: ``val_*`` are NaN except on evaluation steps
#: (``val_log_z``: mean log-sum-exp of the validation logits; ``val_logit_rms``: their RMS);
#: ``spike``: the loss or the gradient norm was a spike (:mod:`resnorm.train.spikes`); ``skipped``: the
#: step's update was not applied (``optim.skip_spikes``); ``scaler_skipped``: fp16's gradient scaler
#: skipped the update (an overflow, :mod:`resnorm.train.precision`); ``loss_scale``: the fp16 loss scale of
#: the step's backward (NaN without fp16)
STEP_COLUMNS = ("step", "train_loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_log_z",
                "val_logit_rms", "spike", "skipped", "scaler_skipped", "loss_scale")
#: the scientific verdict on a finished run (``outcome`` in its summary, :func:`classify_outcome`):
#: it learned; it stayed within ``train.stall_margin`` of the data's unigram loss; its loss blew up
#: (``train.diverge_factor``); a loss, gradient or validation loss went non-finite
OUTCOMES = ("trained", "stalled", "diverged", "nonfinite")
#: the columns of ``layers.parquet``, one row per (step, layer, sublayer, quantity)
LAYER_COLUMNS = ("step", "layer", "sublayer", "quantity", "value")


# --- writing files ------------------------------------------------------------------------------

def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary name is fresh and ``write`` creates the file itself, so it gets the permissions
    the umask gives (0644 under 022, not ``mkstemp``'s owner-only 0600). It keeps ``path``'s suffix,
    so writers that infer the format from the name (matplotlib's ``savefig``, pandas' ``to_csv``)
    behave as for ``path``. The folder is created if needed. On any error the temporary file is
    removed and the error re-raised; an existing ``path`` is then left untouched. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        full = is_disk_full(exc) or (isinstance(exc, (OSError, RuntimeError)) and _no_space_left(path.parent))
        tmp.unlink(missing_ok=True)
        if full and not isinstance(exc, DiskFullError):
            raise DiskFullError(path) from None
        raise
    return path


def _no_space_left(folder: Path) -> bool:
    """Whether ``folder``'s disk has less than :data:`FULL_BELOW` bytes free: a writer that failed there
    (torch's, which says only ``unexpected pos``) most likely ran out of space."""
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        return False


#: a failed write on a disk with less free space than this is reported as a full disk
FULL_BELOW = 1 << 20
#: the errno values of a full disk (no space; the user's quota exhausted)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the disk is full."""
    while exc is not None:
        if isinstance(exc, OSError) and (exc.errno in DISK_FULL_ERRNOS or "No space left on device" in str(exc)):
            return True  # pyarrow's and numpy's write errors carry the words, not the errno
        exc = exc.__cause__ or exc.__context__
    return False


class DiskFullError(OSError):
    """A file could not be written because its disk is full: one line naming the file."""

    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC, f"cannot write {path}: the disk is full (free space, then run the same "
                                       "command again: it resumes)")
        self.filename = str(path)

    def __str__(self) -> str:
        return self.strerror


def writable_folder_problem(folder: Path) -> Optional[str]:
    """Why files cannot be created in ``folder`` (created if absent), or None: a file where the folder
    should be, no permission, a read-only or full disk (a file is created and removed to find out)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        probe.unlink()
    except FileExistsError:
        return f"{folder} is a file, not a folder"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror}"
    return None


def write_text(path: Path, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``; returns ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, in nested dicts and lists:
    JSON has no NaN; the status and ``diverge_reason`` say what happened."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def check_status(summary: Dict[str, Any]) -> None:
    """Raise ValueError unless ``summary["status"]`` is one of :data:`STATUSES`."""
    if summary.get("status") not in STATUSES:
        raise ValueError(f"summary status {summary.get('status')!r} is not one of {STATUSES}")


def write_summary(run_dir: Path, summary: Dict[str, Any], in_place_if_full: bool = False) -> Path:
    """Check the status, then atomically write ``run_dir/summary.json`` (sorted keys, NaN as null).

    ``in_place_if_full`` (the failure record of a run whose disk filled up): when the atomic write
    finds the disk full, the file is rewritten in place instead, into the blocks it already holds, so
    the run is not left ``running``; a crash in that write leaves a summary that does not parse, which
    a re-run treats as none (it resumes from the checkpoint). A final status also gets its line in the
    sweep folder's run index (:func:`record`)."""
    check_status(summary)
    text = json.dumps(json_safe(summary), indent=2, sort_keys=True)
    path = Path(run_dir) / SUMMARY
    try:
        write_text(path, text)
    except DiskFullError:
        if not in_place_if_full or not path.is_file():
            raise
        with open(path, "r+", encoding="utf-8") as f:
            f.write(text)
            f.truncate()
    record(run_dir, summary)
    return path


#: the run index in a sweep folder: one JSON line per finished attempt of a run (resnorm.runs.index reads it)
INDEX = ".runs.jsonl"
#: statuses that end an attempt: the index gets a line for each
FINAL = ("completed", "diverged", "failed")


#: in a sweep folder: the launch's start and size (resnorm.sweep.plan.write_plan); marks a launched sweep
PLAN_FILE = ".sweep.json"


def record(run_dir: Path, summary: Mapping[str, Any]) -> None:
    """Append the run's line to its sweep folder's index (``run_dir``'s parent) when ``summary``'s
    status is final and the folder is a launched sweep's (it holds :data:`PLAN_FILE`: a single run's
    ``outputs/<name>/`` gets no index); a run without a ``run_id`` is not indexed. Never raises for
    an index it cannot write (the run folder is the truth; a re-run then reads the folder)."""
    if summary.get("status") not in FINAL or not summary.get("run_id"):
        return
    if not (Path(run_dir).parent / PLAN_FILE).is_file():
        return
    from resnorm.runs.locks import exclusive

    run_dir = Path(run_dir)
    try:
        stat = (run_dir / SUMMARY).stat()  # the index trusts the summary only while it is this file
        line = json.dumps(dict(run_id=summary["run_id"], dir=run_dir.name, status=summary["status"],
                               outcome=summary.get("outcome"), size=stat.st_size, mtime_ns=stat.st_mtime_ns),
                          sort_keys=True)
    except OSError:
        return
    index = run_dir.parent / INDEX
    try:
        with exclusive(index.parent / (INDEX + ".lock")), open(index, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError:
        pass


# --- reading ------------------------------------------------------------------------------------

def find_run_dirs(root: Path) -> List[Path]:
    """Every folder under ``root`` (``root`` included) holding a ``summary.json``, sorted.

    Hidden folders (name starting with ``.``) are skipped, and the search does not descend into a
    run folder (its ``wandb/``, checkpoints and ``finetune/`` hold no other runs of the sweep). The
    analysis and ``python -m resnorm.finetune`` find runs with it.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if SUMMARY in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []
        else:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found)


def read_summary(run_dir: Path, strict: bool = False) -> Optional[Dict[str, Any]]:
    """The ``summary.json`` of ``run_dir`` as a dict.

    Lenient (the default, for training and the sweeper): None when the file is absent, unreadable or
    not a JSON object. ``strict=True`` (for the analysis): FileNotFoundError when absent, ValueError
    naming the file when it cannot be read (permissions), is not valid JSON (half-written by a tool
    that does not write atomically, corrupt) or is not a JSON object.
    """
    if not strict:
        try:
            return read_summary(run_dir, strict=True)
        except (OSError, ValueError):
            return None
    path = Path(run_dir) / SUMMARY
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {SUMMARY} in {run_dir}") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({type(exc).__name__}: {exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); is it half-written or corrupt?") from None
    except RecursionError:  # JSON nested deeper than Python's parser recurses: no summary is
        raise ValueError(f"{path}: nested too deeply to be a run's summary") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def classify_outcome(status: Optional[str], diverge_kind: Optional[str], final_val_loss: Optional[float],
                     unigram_loss: Optional[float], stall_margin: float) -> Optional[str]:
    """The run's outcome (one of :data:`OUTCOMES`), or None while it runs or when it failed.

    ``diverge_kind`` is the guard's verdict (``nonfinite_loss``, ``nonfinite_grad`` or
    ``loss_factor``, :func:`resnorm.train.guard.divergence`). A completed run is ``stalled`` when its final
    validation loss is above ``unigram_loss - stall_margin`` (it did not get meaningfully below the
    data's trivial baseline; without a known baseline it counts as ``trained``), ``nonfinite`` when
    that loss is not finite.
    """
    if status == "diverged":
        return "diverged" if diverge_kind == "loss_factor" else "nonfinite"
    if status != "completed":
        return None
    if final_val_loss is None or not math.isfinite(final_val_loss):
        return "nonfinite"
    if unigram_loss is not None and final_val_loss > unigram_loss - stall_margin:
        return "stalled"
    return "trained"


def diverge_kind_of(reason: Optional[str]) -> Optional[str]:
    """The guard's verdict recovered from a ``diverge_reason`` text (summaries written before
    ``diverge_kind`` was recorded)."""
    if not reason:
        return None
    if reason.startswith("non-finite loss"):
        return "nonfinite_loss"
    if reason.startswith("non-finite gradient"):
        return "nonfinite_grad"
    return "loss_factor"


#: the JSON types of the summary's fields that readers rely on (null is allowed for every one)
SUMMARY_TYPES: Dict[str, tuple] = {
    "status": (str,), "run_id": (str,), "run_name": (str,), "group": (str,), "overrides": (list, str),
    "config": (dict,), "diverge_reason": (str,), "error": (str,), "torch_version": (str,), "git_commit": (str,),
    "diverged_step": (int,), "steps_done": (int,), "n_params": (int,), "checkpoint_step": (int,),
    **{k: (int, float) for k in ("initial_loss", "final_train_loss", "final_val_loss", "best_val_loss",
                                 "tokens_per_s", "wall_s", "unigram_loss", "entropy_rate", "stall_margin", "mfu")},
    "outcome": (str,), "diverge_kind": (str,), "spike_count": (int,), "spike_steps": (list,),
    "skipped_steps": (list,),
}


def summary_problem(summary: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the types of a parsed summary (a number where a list belongs, a list where
    the status belongs, ...; see :data:`SUMMARY_TYPES`), or None."""
    for key, types in SUMMARY_TYPES.items():
        value = summary.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            want = " or ".join({str: "a string", list: "a list", dict: "an object", int: "an integer",
                                float: "a number"}[t] for t in types)
            return f"{key} is {type(value).__name__} {json.dumps(value)[:40]}, not {want}"
        if key == "overrides" and isinstance(value, list) and not all(isinstance(o, str) for o in value):
            return "overrides holds a non-string"
    return None


def remove_stale_temporaries(run_dir: Path) -> List[Path]:
    """Remove the temporary files of :func:`atomic_write` that a killed process left in ``run_dir``
    (call it holding the job's lock: no other writer is then at work); returns them."""
    stale = [p for p in Path(run_dir).glob(".*.tmp*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT


def tensorboard_dir(run_dir: Path) -> Path:
    """Where ``logger.tensorboard=true`` writes its event files."""
    return Path(run_dir) / TENSORBOARD


def link_problem(run_dir: Path) -> Optional[str]:
    """Why a job folder is refused, or None: it is a symbolic link, or it holds one at its top (a
    ``run.log``, ``summary.json``, ``checkpoint.pt``, ... pointing elsewhere). Run files are written only
    where the folder lies, so a folder copied from someone else cannot direct them at another file. The
    folders above it may be links (``multirun`` -> a scratch disk): those were made by the user."""
    path = Path(run_dir)
    if path.is_symlink():
        return f"{path} is a symbolic link (to {os.readlink(path)}): a job folder must be a real folder"
    if not path.is_dir():
        return None
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_symlink():
            return (f"{path / entry.name} is a symbolic link (to {os.readlink(entry.path)}): run files are written "
                    "only where the job folder lies; remove the link")
    return None


# --- the folder's state machine and its lock ----------------------------------------------------

def job_state(run_dir: Path, run_id: str) -> str:
    """What a re-run does with the job folder of run ``run_id``:

    - ``new``: no summary and no checkpoint (train from step 0);
    - ``completed`` / ``diverged``: the run is over (:data:`DONE`): skipped;
    - ``resume``: not over and a checkpoint is there: continue from it;
    - ``retry``: ``failed``, or ``running`` (interrupted) before any checkpoint: train from step 0;
    - ``foreign``: the summary names another ``run_id``: left untouched.

    An unreadable summary counts as none (the run is then resumed or trained again).
    """
    summary = read_summary(run_dir)
    has_checkpoint = checkpoint_path(run_dir).exists()
    if summary is None:
        return "resume" if has_checkpoint else "new"
    if summary.get("run_id") not in (None, run_id):
        return "foreign"
    status = summary.get("status")
    if status in DONE:
        return status
    return "resume" if has_checkpoint else "retry"


@contextlib.contextmanager
def job_lock(run_dir: Path) -> Iterator[bool]:
    """Hold an exclusive, non-blocking lock on ``<run_dir>/.lock``; yields False if another process
    has it. The OS releases it when the process dies, even by ``kill -9`` (:mod:`resnorm.runs.locks`)."""
    from resnorm.runs.locks import exclusive

    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    with exclusive(path / LOCK, wait=False) as ours:
        yield ours


# --- the training side: rows in memory, written atomically --------------------------------------

class RunStore:
    """Collects a run's rows in memory and writes the run folder's files atomically.

    ``RunStore(None)`` keeps the rows but writes nothing (the DDP processes other than rank 0).
    """

    def __init__(self, run_dir: Optional[Path]):
        self.run_dir = None if run_dir is None else Path(run_dir)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.steps: Dict[str, List[float]] = {c: [] for c in STEP_COLUMNS}
        self.layers: Dict[str, list] = {c: [] for c in LAYER_COLUMNS}

    @property
    def writes(self) -> bool:
        return self.run_dir is not None

    @property
    def summary_path(self) -> Path:
        return self.run_dir / SUMMARY

    def state_dict(self) -> Dict[str, Dict[str, list]]:
        """The rows so far (plain lists), for a checkpoint."""
        return {"steps": {k: list(v) for k, v in self.steps.items()},
                "layers": {k: list(v) for k, v in self.layers.items()}}

    def load_state_dict(self, state: Dict[str, Dict[str, list]]) -> None:
        """Continue from a checkpoint's rows (the rows stored after it are dropped on the next flush)."""
        self.steps = {k: list(state["steps"][k]) for k in STEP_COLUMNS}
        self.layers = {k: list(state["layers"][k]) for k in LAYER_COLUMNS}

    def add_step(self, step: int, train_loss: float, lr: float, grad_norm: float, tokens_per_s: float,
                 val_loss: Optional[float] = None, val_log_z: Optional[float] = None,
                 val_logit_rms: Optional[float] = None, spike: bool = False, skipped: bool = False,
                 scaler_skipped: bool = False, loss_scale: float = float("nan")) -> None:
        nan = float("nan")
        row = dict(step=step, train_loss=train_loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                   val_loss=nan if val_loss is None else val_loss,
                   val_log_z=nan if val_log_z is None else val_log_z,
                   val_logit_rms=nan if val_logit_rms is None else val_logit_rms,
                   spike=bool(spike), skipped=bool(skipped), scaler_skipped=bool(scaler_skipped),
                   loss_scale=float(loss_scale))
        for k in STEP_COLUMNS:
            self.steps[k].append(row[k])

    def set_val_loss(self, step: int, val_loss: float) -> None:
        """Attach an evaluation to the row of ``step`` (the last row, as evaluation follows the step)."""
        if self.steps["step"] and self.steps["step"][-1] == step:
            self.steps["val_loss"][-1] = val_loss

    def add_layers(self, step: int, labels, quantity: str, values) -> None:
        for (layer, sub), v in zip(labels, values):
            self.layers["step"].append(step)
            self.layers["layer"].append(layer)
            self.layers["sublayer"].append(sub)
            self.layers["quantity"].append(quantity)
            self.layers["value"].append(float(v))

    def flush_tables(self) -> None:
        """Write ``metrics.parquet`` (always) and ``layers.parquet`` (once it has rows)."""
        if not self.writes:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        def write_table(columns: Dict[str, list], name: str) -> None:
            table = pa.table(columns)
            atomic_write(self.run_dir / name, lambda tmp: pq.write_table(table, tmp))

        write_table(self.steps, METRICS)
        if self.layers["step"]:
            write_table(self.layers, LAYERS)

    def write_summary(self, summary: Dict[str, Any]) -> None:
        """Check the status (on every process), then write ``summary.json`` (where this store writes)."""
        check_status(summary)
        if self.writes:
            write_summary(self.run_dir, summary)

    def read_summary(self) -> Optional[Dict[str, Any]]:
        return read_summary(self.run_dir) if self.writes else None
