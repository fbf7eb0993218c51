"""Reading a sweep's run folders in bulk: what :func:`analysis.load.load_sweep` uses.

The per-run reader (:func:`analysis.load.load_run`) builds three pandas frames per run and the
sweep concatenates them, which costs milliseconds a run. Here the summaries and the parquet files
are read by a pool of threads (pyarrow releases the GIL while it reads and decodes), the step and
layer tables are concatenated once as Arrow tables, and each run's key columns are repeated over
its rows in one vectorised step. The result is the per-run reader's, row for row and column for
column (tests/test_analysis_bulk.py compares the two on a real sweep).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from resnorm.runs.folder import SUMMARY, read_summary, summary_problem

#: threads reading files at once
READERS = min(8, (os.cpu_count() or 1) * 2)


def _summary(run_dir: Path) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(summary, None) or (None, why it is skipped): :func:`analysis.load.load_run`'s checks."""
    try:
        summary = read_summary(run_dir, strict=True)
    except (ValueError, FileNotFoundError) as exc:
        return None, str(exc)
    problem = summary_problem(summary)
    if problem:
        return None, f"{run_dir / SUMMARY}: malformed: {problem}"
    return summary, None


def read_table(path: Path):
    """A parquet file as an Arrow table; None if absent or unreadable (the latter with a warning). The
    one reader of a run's tables, in bulk here and run by run in :func:`analysis.load.load_run`."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return None
    try:
        return pq.read_table(path)
    except Exception as exc:  # noqa: BLE001  # pyarrow raises several types for a truncated file
        warnings.warn(f"{path}: unreadable parquet file ({type(exc).__name__}: {exc}); ignored", stacklevel=3)
        return None


def read_runs(run_dirs: Sequence[Path]) -> List[Tuple[Path, Optional[Dict[str, Any]], Optional[str]]]:
    """Each run folder's summary (or why it is skipped), read by :data:`READERS` threads."""
    with ThreadPoolExecutor(READERS) as pool:
        return [(d, *r) for d, r in zip(run_dirs, pool.map(_summary, run_dirs))]


def read_tables(run_dirs: Sequence[Path], name: str) -> List[Any]:
    """Each run folder's parquet file ``name`` as an Arrow table (None where absent or unreadable)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(READERS) as pool:
            tables = list(pool.map(lambda d: read_table(Path(d) / name), run_dirs))
    for w in caught:  # re-issued from this thread, in order
        warnings.warn(str(w.message), stacklevel=2)
    return tables


def keyed_frame(tables: Sequence[Any], infos: Sequence[Dict[str, Any]], keys: Sequence[str]) -> pd.DataFrame:
    """The tables of the runs stacked into one frame, each row prefixed with its run's ``keys``
    (a per-step ``lr`` column becomes ``step_lr``): :func:`analysis.load._with_keys` and
    :func:`analysis.load._concat` of every run at once."""
    import pyarrow as pa

    kept = [(t, info) for t, info in zip(tables, infos) if t is not None and t.num_rows]
    if not kept:
        return pd.DataFrame({k: pd.Series(dtype=object) for k in keys})
    frames = [t.to_pandas() for t, _ in kept] if len({tuple(t.schema.names) for t, _ in kept}) > 1 else None
    if frames is None:  # every run has the same columns: one Arrow concatenation
        body = pa.concat_tables([t for t, _ in kept]).to_pandas()
    else:  # columns differ between runs (files of different versions): pandas' union, as before
        body = pd.concat(frames, ignore_index=True)
    if "lr" in body.columns:
        body = body.rename(columns={"lr": "step_lr"})
    body = body.drop(columns=[c for c in keys if c in body.columns])
    lengths = np.array([t.num_rows for t, _ in kept])
    head = {}
    for k in keys:
        values = pd.Series([info[k] for _, info in kept])  # the dtype pandas gives one run's column
        head[k] = values.repeat(lengths).reset_index(drop=True)
    return pd.concat([pd.DataFrame(head), body.reset_index(drop=True)], axis=1)
