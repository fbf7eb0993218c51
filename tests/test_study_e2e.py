"""The verdict study end to end: a real Hydra multirun of a tiny study, its dry run, kill -9 in
stage 1 and in stage 3 and the re-runs, then the report's Verdicts section."""

from __future__ import annotations

import json
import os
import subprocess

import pandas as pd
import pytest

from conftest import PYTHON, ROOT, TINY, run_cli

pytestmark = pytest.mark.slow

TINY_TEXT = tuple(o for o in TINY if not o.startswith(("data", "train.steps", "train.batch_size", "train.eval_every")))
# a repetitive text the tiny model learns below its unigram loss in a few steps, so the tuning picks a
# rate (a stalled run counts as a failure); written into the test's folder
STUDY = ("-m", "+study=verdict", "model.norm=pre,post", "depth=1", *TINY_TEXT, "data=text", "data.path=corpus.txt",
         "train.steps=24", "train.batch_size=8", "optim.warmup_steps=2", "train.eval_every=8",
         "train.checkpoint_every=8", "hydra/launcher=basic", "hydra.sweeper.order=given", "name=st")


def corpus(folder) -> None:
    (folder / "corpus.txt").write_text("the cat sat on the mat. " * 400)


def fault_cli(fault: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "RESNORM_FAULT": fault}
    return subprocess.run([PYTHON, str(ROOT / "tests" / "faultrun.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env=env)


def summaries(sweep):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


def test_study_dry_run_kill_resume_and_verdicts(tmp_path):
    corpus(tmp_path)
    proc = run_cli(*STUDY, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 1 (tune):" in proc.stdout and "dry run: 10 jobs" in proc.stdout
    assert proc.stdout.count("waiting on stage-1 cell model.norm=") == 2
    assert not (tmp_path / "multirun").exists()

    proc = fault_cli("kill_in_summary:3", *STUDY, "~hydra.callbacks.analysis", cwd=tmp_path)  # stage 1
    assert proc.returncode == -9, proc.stderr[-3000:]
    sweep = tmp_path / "multirun" / "st"
    assert sum(s["status"] == "completed" for s in summaries(sweep).values()) == 2
    # the killed job resumes and 7 more finish in stage 1; the 9th completion is stage 3's first job
    proc = fault_cli("kill_in_summary:9", *STUDY, "~hydra.callbacks.analysis", cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]
    study = json.loads((sweep / "study.json").read_text())
    assert all(c["ready"] for c in study["cells"]) and [t["stage"] for t in study["timings"]] == ["tune"]

    proc = run_cli(*STUDY, "--dry-run", cwd=tmp_path)  # stage 3 now planned, nothing waiting
    assert proc.returncode == 0 and "waiting on" not in proc.stdout and "stage 3 (evaluate)" in proc.stdout

    proc = run_cli(*STUDY, cwd=tmp_path, timeout=1800)  # the end-of-sweep report draws every figure
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = summaries(sweep)
    study = json.loads((sweep / "study.json").read_text())
    picked = [c for c in study["cells"] if not c["failing"]]
    assert len(runs) == 10 + 3 * len(picked)
    assert all(s["status"] == "completed" for s in runs.values())
    attempts = sorted(s["attempts"] for s in runs.values())
    assert attempts.count(2) == 2 and set(attempts) == {1, 2}, "a finished run was trained again"
    for cell in picked:
        evals = [runs[i] for i in cell["eval_ids"]]
        assert sorted(s["seed"] for s in evals) == [1, 2, 3]
        assert {s["config"]["optim"]["lr"] for s in evals} == {cell["lr"]}
        assert {s["group"] for s in evals} == {"st/eval"}
    assert {runs[i]["group"] for c in study["cells"] for i in c["tune_ids"]} == {"st/tune"}

    report = (tmp_path / "results" / "st" / "report.md").read_text()
    assert report.index("## Verdicts") < report.index("## Runs")
    table = pd.read_csv(tmp_path / "results" / "st" / "verdicts.csv")
    assert list(table["variant"]) == ["post"] and list(table["depth"]) == [1]
    assert table["sentence"].iloc[0].startswith("depth 1: ")
    assert (tmp_path / "results" / "st" / "verdicts.png").stat().st_size > 5_000


def test_study_settings_are_checked_before_any_job(tmp_path):
    corpus(tmp_path)
    proc = run_cli(*STUDY, "hydra.sweeper.study.eval_seeds=[0,1,2]", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "tuning_seeds=[0] is invalid" in proc.stderr
    proc = run_cli(*STUDY, "hydra.sweeper.study.lrs=[0.001,0.01]", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "give at least 5 distinct rates" in proc.stderr
    proc = run_cli(*STUDY, "seed=4", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "seed is set by the study" in proc.stderr
