"""The sweep folder's run index and progress counters: what a re-run and the progress line read
instead of every run's summary.

- :data:`INDEX` (``.runs.jsonl`` in the sweep folder): one JSON line per finished attempt of a run
  (``run_id``, ``dir``: the run folder's name, ``status``, ``outcome``), appended under a file lock
  (:mod:`resnorm.runs.locks`, :func:`resnorm.runs.folder.record`) by :func:`resnorm.runs.folder.write_summary`
  whenever it writes a final status (``completed``, ``diverged``, ``failed``). The last line of a run wins. It is a
  cache of the run folders, which stay the truth: a run the index calls done counts as done only
  while its ``summary.json`` is there (:func:`done_runs`); a run it does not know is read from its
  folder as before (a run killed before it finished has no line).
- :data:`COUNTERS` (``.progress.json``): the sweep's launch (start time, jobs, estimated FLOPs)
  and what has finished so far (count per outcome, FLOPs done), updated by each finished job in
  O(1) (:func:`count_finished`): the progress line never re-reads the sibling runs. The estimated
  FLOPs of each launcher job are in :data:`FLOPS_FILE` (``.sweep.flops``: one little-endian float64
  per job, in launch order), so a job reads its own 8 bytes (its ``hydra.job.num``).

This module imports no torch (nor pandas).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from resnorm.runs.folder import INDEX, SUMMARY, atomic_write, write_text
from resnorm.runs.locks import exclusive

#: the sweep's progress counters (one small JSON object)
COUNTERS = ".progress.json"
#: the launcher jobs' estimated FLOPs, float64 each, in launch order
FLOPS_FILE = ".sweep.flops"


def _locked(path: Path):
    """The lock of a sweep-folder file (``<file>.lock``, :func:`resnorm.runs.locks.exclusive`)."""
    return exclusive(Path(str(path) + ".lock"))


def read_index(sweep_dir: Path) -> Dict[str, Dict[str, Any]]:
    """``run_id`` -> its last line in the sweep folder's index ({} without one). A line that does
    not parse (a torn write of a killed process) is ignored."""
    path = Path(sweep_dir) / INDEX
    out: Dict[str, Dict[str, Any]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("run_id"):
            out[entry["run_id"]] = entry
    return out


def done_runs(sweep_dir: Path, done: Sequence[str]) -> Dict[Tuple[str, str], str]:
    """(run folder ``str(sweep_dir / dir)``, run_id) -> status of the runs the index says are over (a status
    in ``done``) whose folder still holds the very ``summary.json`` the index recorded (same size and
    modification time: one ``stat`` a run, no read); a summary changed since (copied over, damaged) is
    left to the sweeper's full read of the folder."""
    sweep_dir = Path(sweep_dir)
    out = {}
    for entry in read_index(sweep_dir).values():
        folder = sweep_dir / str(entry.get("dir"))
        if entry.get("status") not in done:
            continue
        try:
            stat = (folder / SUMMARY).stat()
        except OSError:
            continue
        if (stat.st_size, stat.st_mtime_ns) == (entry.get("size"), entry.get("mtime_ns")):
            out[(str(folder), entry["run_id"])] = entry["status"]
    return out


# --- progress counters ------------------------------------------------------------------------------

def start_counters(sweep_dir: Path, job_flops: Sequence[float], runs: int, done: Mapping[str, int]) -> None:
    """Reset the counters for a launch of the launcher jobs whose estimated FLOPs are ``job_flops``
    (in launch order, written to :data:`FLOPS_FILE`), in a sweep of ``runs`` runs of which those
    counted in ``done`` (outcome -> runs) were over before the launch."""
    sweep_dir = Path(sweep_dir)
    data = struct.pack(f"<{len(job_flops)}d", *job_flops)
    atomic_write(sweep_dir / FLOPS_FILE, lambda tmp: tmp.write_bytes(data))
    with _locked(sweep_dir / COUNTERS):
        write_text(sweep_dir / COUNTERS, json.dumps(dict(started_at=time.time(), runs=int(runs),
                                                         flops=float(sum(job_flops)), finished=sum(done.values()),
                                                         done_flops=0.0, counts=dict(done))))


def job_flops(sweep_dir: Path, job_num: Optional[int]) -> float:
    """The estimated FLOPs of launcher job ``job_num`` (0 when unknown)."""
    if job_num is None or job_num < 0:
        return 0.0
    try:
        with open(Path(sweep_dir) / FLOPS_FILE, "rb") as f:
            f.seek(8 * int(job_num))
            raw = f.read(8)
    except OSError:
        return 0.0
    return struct.unpack("<d", raw)[0] if len(raw) == 8 else 0.0


def count_finished(sweep_dir: Path, outcomes: Sequence[str], flops: float) -> Optional[Dict[str, Any]]:
    """Add a finished launcher job (its runs' ``outcomes``, its estimated ``flops``) to the counters;
    return them updated, or None outside a launched sweep (no counters file)."""
    path = Path(sweep_dir) / COUNTERS
    if not path.is_file():
        return None
    try:
        with _locked(path):
            counters = json.loads(path.read_text(encoding="utf-8"))
            counters["finished"] += len(outcomes)
            counters["done_flops"] += float(flops)
            for outcome in outcomes:
                counters["counts"][outcome] = counters["counts"].get(outcome, 0) + 1
            write_text(path, json.dumps(counters))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return counters
