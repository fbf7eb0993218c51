"""The slurm launcher on a real SLURM cluster: a job array from ``hydra/launcher=slurm``, and a job
that ``scontrol requeue`` kills mid-run and that resumes from its checkpoint.

The cluster is the single-node one ``scripts/cluster_setup.sh`` sets up on this machine (Debian's
slurm-wlm and munge, run as root; ``.ci/run`` calls it). These tests skip, saying why, where SLURM
is not installed, where another cluster answers (its nodes would not see this machine's /tmp), and,
outside CI, where no controller with a usable node answers ``sinfo``; in CI (``CI=true``) an
installed SLURM whose cluster is not up fails them. The jobs run the sweep's own Python on the
node (the same machine, so the same file system), with the profile's GPU, core and memory requests
turned down to what the node has (:data:`ON_THIS_NODE`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Optional

import pandas as pd
import pytest

from conftest import PYTHON, ROOT, TINY, compose, run_cli
from resnorm.runs.identity import run_id
from resnorm.train.job import JobInfo, train

NO_ANALYSIS = "~hydra.callbacks.analysis"
STEP_COLUMNS = ["step", "train_loss", "lr", "grad_norm", "val_loss"]
# the slurm profile asks for a GPU, 8 cores and 32 GB per job; the test node has 2 cores, no GPU
ON_THIS_NODE = ("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
                "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10")


CLUSTER_NAME = "resnorm"  # scripts/cluster_setup.sh's ClusterName
INSTALLED = all(shutil.which(p) for p in ("sbatch", "srun", "sinfo", "scontrol", "squeue"))


def cluster_missing() -> Optional[str]:
    """Why the tests cannot run here, or None when the test cluster's node is up."""
    if not INSTALLED:
        return "SLURM is not installed: run `bash scripts/cluster_setup.sh` as root (Debian's slurm-wlm, munge)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s: is slurmctld running? (bash scripts/cluster_setup.sh)"
    states = out.stdout.split()
    if out.returncode != 0:
        return f"no SLURM controller answers: {out.stderr.strip()[:200]} (bash scripts/cluster_setup.sh)"
    if not any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states):
        return f"no usable SLURM node (sinfo states: {' '.join(states) or 'none'}; bash scripts/cluster_setup.sh)"
    return None


def foreign_cluster() -> Optional[str]:
    """Why a cluster that answers is not the test one: the jobs write to this machine's /tmp."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    name = re.search(r"^ClusterName\s*=\s*(\S+)", config, re.M)
    if name and name[1] == CLUSTER_NAME:
        return None
    return f"SLURM cluster {name[1] if name else '?'!r} is not the single-node one of scripts/cluster_setup.sh"


MISSING = cluster_missing()
FOREIGN = None if MISSING else foreign_cluster()
# .ci/run set the cluster up: there (CI=true), installed packages without a working cluster fail
# the tests; they skip only where the packages are not installed (or elsewhere, saying why)
SKIP = FOREIGN or (MISSING if not (INSTALLED and os.environ.get("CI") == "true") else None)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


@pytest.fixture(autouse=True)
def cluster_is_up():
    if MISSING:
        pytest.fail(f"SLURM is installed but the test cluster is not up: {MISSING}")


def job_env() -> dict:
    """The batch jobs get the sweep's environment (sbatch --export=ALL): resnorm from this checkout."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"OMP_NUM_THREADS": "1", "RESNORM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONPATH": pythonpath}


def summaries(sweep_dir: Path):
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(sweep_dir).glob("*/summary.json"))}


def scontrol_job(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout


def submitted_job(sweep_dir: Path) -> str:
    """The SLURM job id of the sweep's array (submitit's folder ``.submitit/<id>/``)."""
    (script,) = (Path(sweep_dir) / ".submitit").glob("*/*_submission.sh")
    return script.parent.name


def test_job_array_runs_on_the_cluster(tmp_path):
    """Two jobs as one SLURM array: both run on this node under SLURM and write their run folders."""
    name = f"resnorm-{uuid.uuid4().hex[:8]}"
    proc = run_cli("-m", *ON_THIS_NODE, f"hydra.launcher.name={name}", *TINY, "depth=1,2", "train.threads=1",
                   "name=cluster", NO_ANALYSIS, cwd=tmp_path, env_extra=job_env(), timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sweep = tmp_path / "multirun" / "cluster"
    runs = summaries(sweep)
    expected = {run_id(compose(*TINY, f"depth={d}", "name=cluster")) for d in (1, 2)}
    assert set(runs) == expected
    assert all(s["status"] == "completed" and s["steps_done"] == 6 and s["attempts"] == 1 for s in runs.values())
    array = submitted_job(sweep)
    script = (sweep / ".submitit" / array / f"{array}_submission.sh").read_text()
    assert "#SBATCH --array=0-1%2" in script and f"#SBATCH --job-name={name}" in script
    # SLURM ran both tasks (scontrol keeps finished jobs MinJobAge=300 s) on this node
    for task in (0, 1):
        info = scontrol_job(f"{array}_{task}")
        assert "JobState=COMPLETED" in info and f"ArrayJobId={array}" in info, info
        log = (sweep / ".submitit" / f"{array}_{task}" / f"{array}_{task}_0_log.out").read_text()
        assert f"hostname={socket.gethostname()}" in log, log[-2000:]


def wait_for(predicate, timeout: float, what: str, proc: Optional[subprocess.Popen] = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep ended before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def checkpointed(run_dir: Path, step: int) -> bool:
    try:
        return (json.loads((run_dir / "summary.json").read_text()).get("checkpoint_step") or 0) >= step
    except (OSError, ValueError):  # not written yet, or being replaced
        return False


def test_requeued_job_resumes_from_its_checkpoint(tmp_path):
    """``scontrol requeue`` kills the running job (SIGTERM, SIGKILL after KillWait) and queues it
    again; the new attempt resumes from the run's checkpoint and ends with the curve of an
    uninterrupted run, every step stored once."""
    steps, name = 2000, f"resnorm-{uuid.uuid4().hex[:8]}"
    # batch 16 (not TINY's 4): the ~1900 steps after the requeue must outlast SLURM's kill, which comes
    # ~4 s after the requeue (srun waits 4 s; submitit ignores the SIGTERM); at batch 4 an idle machine
    # finished the run first (2026-12-02), and the requeued job then found it completed
    train_args = (*TINY, f"train.steps={steps}", "train.eval_every=500", "depth=1", "train.batch_size=16")
    cmd = [PYTHON, str(ROOT / "run.py"), "-m", *ON_THIS_NODE, f"hydra.launcher.name={name}", *train_args,
           "train.checkpoint_every=50", "train.threads=1", "name=requeue", NO_ANALYSIS]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, **job_env()}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "multirun" / "requeue" / run_id(compose(*train_args, "name=requeue"))
    try:
        wait_for(lambda: checkpointed(run_dir, 100), 240, "the job's second checkpoint", proc)
        job = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout.strip()
        assert job, f"squeue does not list the job {name}"
        subprocess.run(["scontrol", "requeue", job], check=True)
        # SLURM holds a requeued job for about two minutes (its BeginTime); let it start now
        wait_for(lambda: "JobState=PENDING" in scontrol_job(job), 60, "the job to be pending again", proc)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["scancel", "-n", name])  # never leave a requeued job to start later
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"\bRestarts=1\b", scontrol_job(job)), scontrol_job(job)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["attempts"] == 2, summary
    assert summary["resumed_from_step"] >= 100
    stored = pd.read_parquet(run_dir / "metrics.parquet")
    assert stored["step"].tolist() == list(range(steps))
    reference = train(compose(*train_args, "train.threads=1"), JobInfo(tmp_path / "reference", "r", "g", []))
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "reference" / "metrics.parquet")[STEP_COLUMNS],
                                  stored[STEP_COLUMNS])
    assert summary["final_val_loss"] == reference["final_val_loss"]
