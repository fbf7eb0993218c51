"""W&B tracking (resnorm.runs.tracking): the installed packages a run records, read once per process."""

from __future__ import annotations

import importlib.metadata
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from resnorm.runs import tracking


def requirements(run_dir: Path) -> str:
    (found,) = Path(run_dir).glob("wandb/offline-run-*/files/requirements.txt")
    return found.read_text()


def test_two_offline_runs_record_the_same_packages_read_once(tmp_path, monkeypatch):
    """Two real offline W&B runs in one process record the same requirements list, the installed
    packages as the standard library lists them, and the second run does not read them again."""
    pytest.importorskip("wandb")
    from wandb import util

    scans = []
    listed = importlib.metadata.distributions

    def distributions(*args, **kwargs):  # counts the scans of the installed packages
        scans.append(1)
        return listed(*args, **kwargs)

    monkeypatch.setattr(importlib.metadata, "distributions", distributions)
    # this test's process may have cached the list already (an earlier test's run): start uncached
    monkeypatch.setattr(util, "working_set", getattr(util.working_set, "__wrapped__", util.working_set))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = OmegaConf.create(dict(wandb=True, mode="offline", project="p", entity=None))
    counts = []
    for i in range(2):
        with tracking.WandbTracker(cfg, tmp_path / f"r{i}", "g", f"n{i}", {"seed": i}, run_id=f"run{i}") as tracker:
            assert tracker.run is not None, tracker.error
            tracker.log({"loss": 1.0}, step=0)
        counts.append(len(scans))
    assert counts == [1, 1], "the second run read the installed packages again"
    first, second = requirements(tmp_path / "r0"), requirements(tmp_path / "r1")
    assert first == second
    installed = {f"{d.metadata['Name']}=={d.version}" for d in listed() if d.metadata["Name"]}
    assert set(first.split()) == installed and f"wandb=={importlib.metadata.version('wandb')}" in first.split()


def test_a_wandb_without_a_working_set_is_left_alone():
    """A W&B version whose ``util`` has no ``working_set`` gets nothing added (and a tracker still opens)."""
    util = types.SimpleNamespace()
    assert tracking.cache_working_set(util) is False and not hasattr(util, "working_set")
    assert tracking.cache_working_set(None) is False
