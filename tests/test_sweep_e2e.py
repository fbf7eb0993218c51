"""The user's command end to end: a real Hydra multirun through run.py, into a temporary folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow


def summaries(sweep):
    """{run_name: summary} of every job under the sweep folder (job folders are named by run id)."""
    out = {}
    for p in sweep.rglob("summary.json"):
        summary = json.loads(p.read_text())
        assert summary["run_name"] not in out, f"two job folders for {summary['run_name']}"
        out[summary["run_name"]] = summary
    return out


def test_multirun_trains_logs_and_plots(tmp_path):
    proc = run_cli("-m", "model.norm=pre,post", "depth=2", *TINY, "logger.mode=offline", "name=e2e", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = summaries(tmp_path / "multirun" / "e2e")
    assert sorted(r["variant"] for r in runs.values()) == ["post", "pre"]
    assert all("model.norm=" + r["variant"] in name for name, r in runs.items())
    assert {r["status"] for r in runs.values()} == {"completed"}
    for summary in runs.values():
        assert list((tmp_path / "multirun" / "e2e" / summary["run_id"] / "wandb").glob("offline-run-*/run-*.wandb"))
    results = tmp_path / "results" / "e2e"
    for figure in ("depth_vs_val_loss.png", "loss_curves.png", "layer_profiles.png"):
        assert (results / figure).stat().st_size > 5_000, figure
    table = pd.read_csv(results / "summary.csv")
    assert sorted(table["variant"]) == ["post", "pre"] and set(table["status"]) == {"completed"}


def test_diverged_job_is_recorded_and_the_next_job_completes(tmp_path):
    proc = run_cli("-m", "optim.lr=1e4,1e-3", "optim.warmup_steps=0", "model.norm=post", "depth=2", *TINY,
                   "train.steps=12", "name=div", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = summaries(tmp_path / "multirun" / "div")
    by_lr = {r["config"]["optim"]["lr"]: r for r in runs.values()}
    assert by_lr[1e4]["status"] == "diverged" and by_lr[1e4]["diverged_step"] is not None
    assert by_lr[1e-3]["status"] == "completed" and by_lr[1e-3]["steps_done"] == 12
    table = pd.read_csv(tmp_path / "results" / "div" / "summary.csv")
    assert sorted(table["status"]) == ["completed", "diverged"]


def test_a_failing_job_is_recorded_and_counted_in_the_exit_code(tmp_path):
    """The first checkpoint write raises (tests/faultrun.py): that job fails, the sweep goes on.
    (A corpus too short for one sequence is now a config error before any job: tests/test_faults.py.)"""
    import os
    import subprocess

    from conftest import PYTHON, ROOT

    env = {**os.environ, "WANDB_SILENT": "true", "RESNORM_FAULT": "raise_in_checkpoint:1"}
    proc = subprocess.run([PYTHON, str(ROOT / "tests" / "faultrun.py"), "-m", "hydra/launcher=basic", "seed=0,1",
                           "depth=1", "train.checkpoint_every=2", *TINY, "name=fail"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 2 runs failed" in proc.stderr
    statuses = sorted(r["status"] for r in summaries(tmp_path / "multirun" / "fail").values())
    assert statuses == ["completed", "failed"]
    failed = [r for r in summaries(tmp_path / "multirun" / "fail").values() if r["status"] == "failed"][0]
    assert "No space left on device (injected)" in failed["error"]
