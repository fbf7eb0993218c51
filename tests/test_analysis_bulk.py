"""The bulk sweep reader (analysis.bulk, analysis.load.load_sweep) against the per-run reader
(analysis.load.load_sweep_per_run): the same tables, and the same report files, on a real sweep
trained by the CLI and on the hand-made sweep of tests/test_analysis.py (corrupt and incomplete runs)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY, run_cli
from test_analysis import build_sweep


def assert_same(a, b) -> None:
    for table in ("runs", "steps", "layers"):
        pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table), check_exact=True)
    assert a.axes == b.axes and a.skipped == b.skipped and a.path == b.path


def loaded_both_ways(sweep: Path):
    from analysis.load import load_sweep, load_sweep_per_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_sweep(sweep), load_sweep_per_run(sweep)


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("bulk")
    proc = run_cli("-m", *TINY, "model.norm=pre,post", "depth=1,2", "seed=0,1", "name=bulk", "hydra/launcher=basic",
                   "~hydra.callbacks.analysis", cwd=cwd, env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd / "multirun" / "bulk"


def test_bulk_reader_equals_the_per_run_reader_on_a_real_sweep(real_sweep):
    bulk, per_run = loaded_both_ways(real_sweep)
    assert len(bulk.runs) == 8 and len(bulk.steps) == 8 * 6 and len(bulk.layers)
    assert_same(bulk, per_run)


def test_bulk_reader_equals_the_per_run_reader_on_corrupt_and_incomplete_runs(tmp_path):
    bulk, per_run = loaded_both_ways(build_sweep(tmp_path))
    assert bulk.skipped  # the corrupt summary and the run without tables
    assert_same(bulk, per_run)


def test_the_report_is_the_same_with_either_reader(real_sweep, tmp_path, monkeypatch):
    import analysis.report as report
    from analysis.load import load_sweep_per_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bulk = report.make_report(real_sweep, tmp_path / "bulk")
        monkeypatch.setattr(report, "load_sweep", load_sweep_per_run)
        per_run = report.make_report(real_sweep, tmp_path / "per_run")
    assert [Path(p).name for p in bulk] == [Path(p).name for p in per_run]
    for name in ("summary.csv", "seed_summary.csv", "report.md"):
        assert (tmp_path / "bulk" / name).read_text() == (tmp_path / "per_run" / name).read_text(), name
