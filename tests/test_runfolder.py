"""The run folder's contract (resnorm.runs.folder, docs/run-folder.md): atomic writes that keep the
umask, one summary reader, the folder's state machine and lock, and one format shared by training
and analysis."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from resnorm.runs import folder as rf
from resnorm.runs.folder import DONE, STATUSES, RunStore, atomic_write, job_lock, job_state, read_summary


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return Path(path).stat().st_mode & 0o777


# --- atomic writes ------------------------------------------------------------------------------

def test_atomic_write_keeps_the_umask_and_the_suffix_and_cleans_up(tmp_path):
    with umask(0o022):
        path = rf.write_text(tmp_path / "a.md", "first")
    assert path.read_text() == "first" and mode(path) == 0o644  # not mkstemp's 0600
    with umask(0o077):
        private = rf.write_text(tmp_path / "b.md", "mine")
    assert mode(private) == 0o600
    # an old folder's 0600 file gets the umask's mode once it is written again
    os.chmod(private, 0o600)
    with umask(0o022):
        rf.write_text(private, "shared")
    assert mode(private) == 0o644

    seen = []

    def broken(tmp):
        seen.append(tmp)
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert seen[0].suffix == ".md" and seen[0].parent == tmp_path  # savefig / to_csv see the format
    assert path.read_text() == "first"  # the old file stays, the temporary one is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.md"]


def test_write_summary_checks_the_status_and_stores_nan_as_null(tmp_path):
    with pytest.raises(ValueError, match="not one of"):
        rf.write_summary(tmp_path, {"status": "finished"})
    with pytest.raises(ValueError, match="not one of"):
        RunStore(None).write_summary({"status": "finished"})  # checked on every DDP process
    assert not (tmp_path / rf.SUMMARY).exists()
    rf.write_summary(tmp_path, {"status": "diverged", "final_val_loss": float("nan"),
                                "losses": [1.0, float("inf")]})
    assert json.loads((tmp_path / rf.SUMMARY).read_text()) == {
        "status": "diverged", "final_val_loss": None, "losses": [1.0, None]}


# --- reading the summary ------------------------------------------------------------------------

def test_read_summary_lenient_and_strict(tmp_path, monkeypatch):
    assert read_summary(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no summary.json in"):
        read_summary(tmp_path, strict=True)
    path = tmp_path / rf.SUMMARY
    for text, message in (('{"status": "compl', "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                          (b"\xff\xfe", "not valid JSON")):
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        assert read_summary(tmp_path) is None
        with pytest.raises(ValueError, match=message) as err:
            read_summary(tmp_path, strict=True)
        assert str(path) in str(err.value)  # the message names the file
    path.write_text('{"status": "completed"}')
    assert read_summary(tmp_path) == read_summary(tmp_path, strict=True) == {"status": "completed"}

    def denied(self, *args, **kwargs):  # a colleague's 0600 file (the tests may run as root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    assert read_summary(tmp_path) is None
    with pytest.raises(ValueError, match="cannot be read .*Permission denied") as err:
        read_summary(tmp_path, strict=True)
    assert str(path) in str(err.value)


# --- the state machine and the lock -------------------------------------------------------------

def _folder(tmp_path: Path, name: str, summary=None, checkpoint: bool = False) -> Path:
    run_dir = tmp_path / name
    run_dir.mkdir()
    if summary is not None:
        (run_dir / rf.SUMMARY).write_text(summary if isinstance(summary, str) else json.dumps(summary))
    if checkpoint:
        rf.checkpoint_path(run_dir).write_bytes(b"")
    return run_dir


@pytest.mark.parametrize("summary, checkpoint, state", [
    (None, False, "new"),
    (None, True, "resume"),  # killed before its first summary was replaced: the checkpoint counts
    ('{"status": "runn', False, "new"),  # an unreadable summary counts as none
    ({"status": "running", "run_id": "me"}, False, "retry"),  # interrupted before any checkpoint
    ({"status": "running", "run_id": "me"}, True, "resume"),
    ({"status": "failed", "run_id": "me"}, False, "retry"),
    ({"status": "failed", "run_id": "me"}, True, "resume"),
    ({"status": "completed", "run_id": "me"}, True, "completed"),  # train.keep_checkpoint=true
    ({"status": "completed", "run_id": "me"}, False, "completed"),
    ({"status": "diverged", "run_id": "me"}, False, "diverged"),
    ({"status": "completed"}, False, "completed"),  # a summary without run_id (older) is taken as ours
    ({"status": "completed", "run_id": "other"}, False, "foreign"),
    ({"status": "running", "run_id": "other"}, True, "foreign"),
])
def test_job_state(tmp_path, summary, checkpoint, state):
    assert job_state(_folder(tmp_path, "job", summary, checkpoint), "me") == state


def test_done_statuses_are_the_ends_of_a_run():
    assert set(DONE) < set(STATUSES) and "failed" not in DONE and STATUSES[0] == "running"


def test_job_lock_is_exclusive_and_released(tmp_path):
    with umask(0o022):
        with job_lock(tmp_path / "job") as first:
            with job_lock(tmp_path / "job") as second:
                assert first and not second
    assert mode(tmp_path / "job" / rf.LOCK) == 0o644
    with job_lock(tmp_path / "job") as again:
        assert again


# --- the store's rows ---------------------------------------------------------------------------

def test_run_store_rows_round_trip_through_a_checkpoint_state(tmp_path):
    import pandas as pd

    store = RunStore(tmp_path / "run")
    for step in range(3):
        store.add_step(step, 3.0 - step, 1e-3, 0.5, 100.0)
    store.set_val_loss(2, 2.5)
    store.add_layers(2, [(0, "attn"), (0, "mlp")], "grad_norm", [0.1, 0.2])
    state = store.state_dict()
    store.add_step(3, 9.0, 1e-3, 0.5, 100.0)  # a step after the checkpoint, lost by the kill
    resumed = RunStore(tmp_path / "run")
    resumed.load_state_dict(state)
    resumed.flush_tables()
    steps = pd.read_parquet(tmp_path / "run" / rf.METRICS)
    layers = pd.read_parquet(tmp_path / "run" / rf.LAYERS)
    assert tuple(steps.columns) == rf.STEP_COLUMNS and tuple(layers.columns) == rf.LAYER_COLUMNS
    assert steps["step"].tolist() == [0, 1, 2] and steps["val_loss"].isna().tolist() == [True, True, False]
    assert layers["value"].tolist() == [0.1, 0.2]
    RunStore(None).flush_tables()  # writes nothing, raises nothing


# --- one format -----------------------------------------------------------------------------------

def test_analysis_uses_the_one_format():
    import analysis.load
    import analysis.metrics
    import analysis.canvas
    import analysis.report
    import resnorm.train.checkpoint
    import resnorm.sweep.plan
    import resnorm.train.job

    assert not hasattr(analysis.load, "STATUSES")
    assert analysis.metrics.EXCLUDED_STATUSES == tuple(s for s in STATUSES if s not in DONE)
    assert analysis.load.read_summary is resnorm.sweep.plan.read_summary is resnorm.train.job.read_summary is read_summary
    assert analysis.report.atomic_write is analysis.canvas.atomic_write is resnorm.train.checkpoint.atomic_write is atomic_write
    assert resnorm.train.job.DONE is resnorm.sweep.plan.DONE is DONE
    root = Path(rf.__file__).resolve().parent.parent
    for gone in ("resnorm/store.py", "analysis/files.py"):  # the format's old second homes
        assert not (root / gone).exists(), gone


# --- a real run, read by a colleague --------------------------------------------------------------

def test_a_real_run_and_its_report_are_readable_by_others(tmp_path):
    import torch

    from analysis.report import make_report
    from conftest import TINY, compose
    from resnorm.train.job import JobInfo, train

    run_dir, out = tmp_path / "multirun" / "shared" / "job", tmp_path / "results"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with umask(0o022):
            summary = train(compose(*TINY, "depth=1", "train.keep_checkpoint=true", "train.probe_every=3"),
                            JobInfo(run_dir, "job", "shared", []))
            written = make_report(run_dir.parent, out)
    finally:
        torch.set_num_threads(threads)
    assert summary["status"] == "completed" and summary["checkpoint_step"] == 6
    for name in (rf.SUMMARY, rf.METRICS, rf.LAYERS, rf.CHECKPOINT):
        assert mode(run_dir / name) == 0o644, name
    assert not list(run_dir.glob(".*.tmp*")), "temporary files left behind"
    names = {Path(p).name for p in written}
    assert {"summary.csv", "report.md"} <= names and any(n.endswith(".png") for n in names)
    for path in written:
        assert mode(path) == 0o644, path
