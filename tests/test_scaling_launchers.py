"""Launchers and data parallelism, end to end on the CPU: the local launcher's device pool (fake
GPUs, one job per slot, two slots of one GPU with jobs_per_device=2, DDP jobs in its workers), DDP
on two gloo processes, SLURM's preemption signal through fake sbatch/srun/sacct/scontrol (submitit
requeues the job; the real cluster is tests/test_cluster_slurm.py), and a local Ray (scripts/setup.sh
installs it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import PYTHON, ROOT, TINY, compose, run_cli
from resnorm.runs.identity import run_id
from resnorm.train.job import JobInfo, train
from resnorm.train.task import run_job

NO_ANALYSIS = "~hydra.callbacks.analysis"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "RESNORM_THREADS": "1"}
STEP_COLUMNS = ["step", "train_loss", "lr", "grad_norm", "val_loss"]


def summaries(sweep_dir: Path):
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(sweep_dir).glob("*/summary.json"))}


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run_dir) / "metrics.parquet")


def slot_spans(runs) -> dict:
    """Each pool slot's (start, end) spans, sorted; asserts that no two jobs held one slot at once."""
    spans = {}
    for s in runs:
        (slot,) = s["device_slots"]
        spans.setdefault(slot, []).append((s["started_at"], s["finished_at"]))
    for slot, held in spans.items():
        held.sort()
        assert all(end <= start for (_, end), (start, _) in zip(held, held[1:])), f"{slot} shared: {held}"
    return spans


@pytest.mark.slow
def test_local_launcher_never_shares_a_device(tmp_path):
    """4 jobs of unequal length, 4 at a time, on a pool of 2 fake GPUs: each job holds a device
    of its own for as long as it runs, and jobs wait for a free one."""
    proc = run_cli("-m", "hydra/launcher=local", "hydra.launcher.fake_gpus=2", "hydra.launcher.n_jobs=4",
                   f"hydra.launcher.lock_dir={tmp_path / 'locks'}", *TINY, "depth=1",
                   "train.steps=3,30,6,20", "name=pool", NO_ANALYSIS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 jobs at a time, 1 thread(s) each, device pool: fake:0,fake:1" in proc.stdout
    runs = summaries(tmp_path / "multirun" / "pool")
    assert sorted(s["steps_done"] for s in runs.values()) == [3, 6, 20, 30]
    assert all(s["status"] == "completed" and s["threads"] == 1 and s["device"] == "cpu" for s in runs.values())
    assert set(slot_spans(runs.values())) == {"fake:0", "fake:1"}


@pytest.mark.slow
def test_local_launcher_packs_two_jobs_on_one_device(tmp_path):
    """jobs_per_device=2 on one fake GPU: two jobs share it at a time, each in a slot of its own.

    The pool hands out a device's slots in order, so a job that holds ``fake:0/1`` took it while
    another job held ``fake:0``: the second slot in use is the proof that two jobs shared the
    device. (Start and end times are not: they are stamped after the slot is taken and the model
    built, and a worker process that starts late shifts them.) The exact hold-and-wait behaviour of
    the slots is tests/test_scaling.py's packed-pool test."""
    proc = run_cli("-m", "hydra/launcher=local", "hydra.launcher.fake_gpus=1", "hydra.launcher.jobs_per_device=2",
                   f"hydra.launcher.lock_dir={tmp_path / 'locks'}", *TINY, "depth=1", "train.steps=240,200,6",
                   "name=packed", NO_ANALYSIS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("2 jobs at a time, 1 thread(s) each, device pool: fake:0,fake:0/1; "
            "2 job(s) per device (jobs_per_device=2)") in proc.stdout
    runs = list(summaries(tmp_path / "multirun" / "packed").values())
    assert sorted(s["steps_done"] for s in runs) == [6, 200, 240] and all(s["status"] == "completed" for s in runs)
    spans = slot_spans(runs)
    assert set(spans) == {"fake:0", "fake:0/1"}, f"no job ever took the device's second slot: {spans}"


@pytest.mark.slow
def test_ddp_jobs_in_local_workers_take_slots_on_distinct_devices(tmp_path):
    """Two DDP jobs (train.devices=2) in the local launcher's worker processes, on 2 fake GPUs x 2
    slots: each job's two processes hold slots of two different GPUs (and its spawned processes
    start inside a loky worker)."""
    proc = run_cli("-m", "hydra/launcher=local", "hydra.launcher.fake_gpus=2", "hydra.launcher.jobs_per_device=2",
                   f"hydra.launcher.lock_dir={tmp_path / 'locks'}", *TINY, "train.steps=4", "train.devices=2",
                   "depth=1,2", "name=ddp_packed", NO_ANALYSIS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 jobs at a time, 1 thread(s) each, device pool: fake:0,fake:1,fake:0/1,fake:1/1" in proc.stdout
    runs = list(summaries(tmp_path / "multirun" / "ddp_packed").values())
    assert len(runs) == 2 and all(s["status"] == "completed" and s["world_size"] == 2 for s in runs)
    for s in runs:
        assert {name.split("/")[0] for name in s["device_slots"]} == {"fake:0", "fake:1"}, s["device_slots"]


@pytest.mark.slow
def test_ddp_on_two_gloo_processes_follows_the_single_process_run(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    over = (*TINY, "depth=2", "train.steps=8", "train.threads=1")
    single = train(compose(*over), JobInfo(tmp_path / "single", "single", "g", []))
    monkeypatch.chdir(tmp_path)  # outside Hydra, run_job writes into the working directory
    result = run_job(compose(*over, "train.devices=2"))
    assert result["status"] == "completed", result
    ddp = json.loads((tmp_path / "summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["run_id"] == run_id(compose(*over))
    one, two = metrics(tmp_path / "single"), metrics(tmp_path)
    assert two["step"].tolist() == list(range(8))
    for column in ("train_loss", "grad_norm", "val_loss"):
        pd.testing.assert_series_equal(one[column], two[column], rtol=1e-5, atol=1e-6)
    assert ddp["final_val_loss"] == pytest.approx(single["final_val_loss"], rel=1e-5)


# --- SLURM without a cluster ---------------------------------------------------------------------

FAKE_SBATCH = '''
import os, re, subprocess, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"]); state.mkdir(exist_ok=True)
script = Path(sys.argv[-1])
counter = state / "next_id"
job = int(counter.read_text()) if counter.exists() else 4200
counter.write_text(str(job + 1))
text = script.read_text()
(state / f"{job}.sh").write_text(text)
with open(state / "sbatch_calls", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
m = re.search(r"^#SBATCH --array=(\\d+)-(\\d+)", text, re.M)
tasks = [str(t) for t in range(int(m[1]), int(m[2]) + 1)] if m else ["-"]
log = open(state / f"{job}.runner.log", "w")
subprocess.Popen([sys.executable, str(Path(__file__).with_name("fake_runner")), str(job), *tasks],
                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
print(f"Submitted batch job {job}")
'''

# runs the tasks of a job one after the other, and again when scontrol requeued one
FAKE_RUNNER = '''
import os, subprocess, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
job, tasks = sys.argv[1], sys.argv[2:]
for n, task in enumerate(tasks):
    env = dict(os.environ, SLURM_JOB_ID=str(int(job) + n + 1), SLURM_NTASKS="1", SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost")
    name = job
    if task != "-":
        env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=task)
        name = f"{job}_{task}"
    while True:
        code = subprocess.call(["bash", str(state / f"{job}.sh")], env=env)
        print(name, "exit", code, flush=True)
        requeue = state / f"{name}.requeue"
        if not requeue.exists():
            break
        requeue.unlink()
        print(name, "requeued", flush=True)
'''

# srun --unbuffered --output OUT --error ERR CMD...: CMD with its output in OUT and ERR, and its pid noted
FAKE_SRUN = '''
import os, sys
from pathlib import Path
args, files = sys.argv[1:], {}
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag in ("--output", "--error"):
        files[flag] = args.pop(0)
env = os.environ
job = env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"])
name = f"{job}_{env['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_TASK_ID" in env else job
def expand(p):
    return (p.replace("%A", env.get("SLURM_ARRAY_JOB_ID", "")).replace("%a", env.get("SLURM_ARRAY_TASK_ID", ""))
             .replace("%j", env["SLURM_JOB_ID"]).replace("%t", "0"))
for flag, fd in (("--output", 1), ("--error", 2)):
    if flag in files:
        path = Path(expand(files[flag])); path.parent.mkdir(parents=True, exist_ok=True)
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
(Path(env["FAKE_SLURM_DIR"]) / f"{name}.pid").write_text(str(os.getpid()))
os.execvp(args[0], args)
'''

FAKE_SACCT = 'print("JobID|State|NodeList")  # no news: submitit waits for the result files\n'

FAKE_SCONTROL = '''
import os, sys
from pathlib import Path
if sys.argv[1:2] == ["requeue"]:
    (Path(os.environ["FAKE_SLURM_DIR"]) / f"{sys.argv[2]}.requeue").touch()
'''


def fake_slurm(tmp_path: Path) -> dict:
    """A bin folder of fake SLURM programs that run the submitted batch scripts on this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    programs = {"sbatch": FAKE_SBATCH, "fake_runner": FAKE_RUNNER, "srun": FAKE_SRUN, "sacct": FAKE_SACCT,
                "scontrol": FAKE_SCONTROL, "scancel": ""}
    for name, code in programs.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path / "slurm")}


@pytest.mark.slow
def test_slurm_job_array_and_requeue_after_preemption(tmp_path):
    """The slurm profile's batch script, run by fake SLURM programs; the first job is preempted
    (SIGUSR2, as SLURM signals) after its second checkpoint: submitit requeues it and the run
    resumes from its checkpoint, ending with the same curve as an uninterrupted run."""
    # the batch script's python imports resnorm: installed by scripts/setup.sh, or from this checkout
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, **ONE_THREAD, **fake_slurm(tmp_path), "WANDB_SILENT": "true", "PYTHONPATH": pythonpath}
    steps = 400
    sweep = ["hydra/launcher=slurm", "hydra.launcher.partition=testq", "hydra.launcher.timeout_min=30",
             "hydra.launcher.array_parallelism=1", "hydra.sweeper.order=given",  # task 0 is depth=1
             *TINY, f"train.steps={steps}", "train.eval_every=50",
             "train.checkpoint_every=20", "train.threads=1", "depth=1,2", "name=slurm", NO_ANALYSIS]
    proc = subprocess.Popen([PYTHON, str(ROOT / "run.py"), "-m", *sweep], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    state = tmp_path / "slurm"
    first = tmp_path / "multirun" / "slurm" / run_id(compose(*TINY, f"train.steps={steps}", "train.eval_every=50",
                                                             "depth=1", "name=slurm"))
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            summary = json.loads((first / "summary.json").read_text()) if (first / "summary.json").exists() else {}
            if (summary.get("checkpoint_step") or 0) >= 40:
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.02)
        else:
            pytest.fail("the first job never reached its second checkpoint")
        (pid_file,) = state.glob("*_0.pid")
        os.kill(int(pid_file.read_text()), signal.SIGUSR2)  # SLURM's warning before preemption
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = out.decode()
    assert proc.returncode == 0, log[-3000:]

    # one array job of two tasks, submitted with the profile's resources and requeue settings
    assert len((state / "sbatch_calls").read_text().splitlines()) == 1
    (script,) = state.glob("*.sh")
    lines = set(script.read_text().splitlines())
    for expected in ("#SBATCH --partition=testq", "#SBATCH --gpus-per-node=1", "#SBATCH --time=30",
                     "#SBATCH --array=0-1%1", "#SBATCH --signal=USR2@120", "#SBATCH --requeue",
                     "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB",
                     "export OMP_WAIT_POLICY=PASSIVE"):
        assert expected in lines, expected
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)
    assert "requeued" in (next(state.glob("*.runner.log"))).read_text()

    runs = summaries(tmp_path / "multirun" / "slurm")
    assert len(runs) == 2 and all(s["status"] == "completed" for s in runs.values())
    resumed = runs[first.name]
    assert resumed["attempts"] == 2 and resumed["resumed_from_step"] >= 40
    assert metrics(first)["step"].tolist() == list(range(steps))
    reference = train(compose(*TINY, f"train.steps={steps}", "train.eval_every=50", "depth=1", "train.threads=1"),
                      JobInfo(tmp_path / "reference", "r", "g", []))
    pd.testing.assert_frame_equal(metrics(tmp_path / "reference")[STEP_COLUMNS], metrics(first)[STEP_COLUMNS])
    assert resumed["final_val_loss"] == reference["final_val_loss"]


@pytest.mark.slow
def test_ray_runs_two_jobs(tmp_path):
    pytest.importorskip("ray", reason="Ray is optional: pip install -e '.[ray]'")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="hydra-ray-launcher is optional: "
                        "pip install -e '.[ray]'")
    proc = run_cli("-m", "hydra/launcher=ray_tasks", "+hydra.launcher.ray.init.num_cpus=2",
                   "+hydra.launcher.ray.init.include_dashboard=false", *TINY, "depth=1,2", "name=ray",
                   NO_ANALYSIS, cwd=tmp_path, env_extra={"RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "each job asks for {'num_cpus': 1" in proc.stdout
    runs = summaries(tmp_path / "multirun" / "ray")
    assert len(runs) == 2
    assert all(s["status"] == "completed" and s["threads"] == 1 for s in runs.values())


@pytest.mark.slow
def test_ray_bundles_jobs_per_task(tmp_path):
    """``jobs_per_task=2``: three jobs in two Ray tasks, each job its own completed run folder."""
    pytest.importorskip("ray", reason="Ray is optional: pip install -e '.[ray]'")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="hydra-ray-launcher is optional: "
                        "pip install -e '.[ray]'")
    proc = run_cli("-m", "hydra/launcher=ray_tasks", "hydra.launcher.jobs_per_task=2",
                   "+hydra.launcher.ray.init.num_cpus=2", "+hydra.launcher.ray.init.include_dashboard=false", *TINY,
                   "depth=1", "seed=0,1,2", "name=raybundles", NO_ANALYSIS, cwd=tmp_path,
                   env_extra={"RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ray launcher: 3 jobs, 2 per task: 2 task(s)" in proc.stdout + proc.stderr
    runs = summaries(tmp_path / "multirun" / "raybundles")
    assert {run_id(compose(*TINY, "depth=1", f"seed={s}", "name=raybundles")) for s in range(3)} == set(runs)
    assert all(s["status"] == "completed" and s["threads"] == 1 for s in runs.values())


#: the summary's fields that say what a run is and what it computed (not when, nor how fast)
IDENTITY_FIELDS = ("run_id", "run_name", "config", "overrides", "group", "variant", "depth", "seed", "status",
                   "steps_done", "n_params", "threads", "final_train_loss", "final_val_loss", "initial_loss")


@pytest.mark.slow
def test_local_workers_build_planned_jobs_as_hydra_composes_them(tmp_path):
    """The local launcher's workers build each fast-planned job's config from the sweep's plan: the run
    folders are those of a sweep whose workers compose every job with Hydra (``fast_plan=false``): the
    summaries' identity fields, the metrics, and ``.hydra/*.yaml`` byte for byte (but for the switch's
    own value in hydra.yaml)."""
    args = ("-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", *TINY, "depth=1", "train.steps=2",
            "train.eval_every=2", "seed=0,1", "optim=adamw,sgd", "name=same", NO_ANALYSIS)
    folders = {}
    for fast in ("true", "false"):  # the same folder and sweep name: .hydra/hydra.yaml holds both
        proc = run_cli(*args, f"hydra.sweeper.fast_plan={fast}", cwd=tmp_path, env_extra=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr[-3000:]
        built = "4 built from the sweep's plan, 0 composed by Hydra" if fast == "true" else \
            "0 built from the sweep's plan, 4 composed by Hydra"
        assert built in proc.stdout, proc.stdout[-3000:]
        folders[fast] = (tmp_path / "multirun").rename(tmp_path / f"multirun_{fast}") / "same"
    planned, composed = (summaries(folders[f]) for f in ("true", "false"))
    assert sorted(planned) == sorted(composed) and len(planned) == 4
    for rid in planned:
        assert {k: planned[rid].get(k) for k in IDENTITY_FIELDS} == {k: composed[rid].get(k) for k in IDENTITY_FIELDS}
        assert planned[rid]["status"] == "completed"
        pd.testing.assert_frame_equal(metrics(folders["true"] / rid)[STEP_COLUMNS],
                                      metrics(folders["false"] / rid)[STEP_COLUMNS])
        names = sorted(p.name for p in (folders["false"] / rid / ".hydra").glob("*.yaml"))
        assert names == ["config.yaml", "hydra.yaml", "overrides.yaml"]
        for name in names:  # the switch itself is in hydra.yaml (the sweeper's options, the hydra overrides)
            planned_bytes = (folders["true"] / rid / ".hydra" / name).read_bytes()
            if name == "hydra.yaml":
                assert planned_bytes.count(b"fast_plan: true\n") == 1
                assert planned_bytes.count(b"- hydra.sweeper.fast_plan=true\n") == 1
                planned_bytes = planned_bytes.replace(b"fast_plan: true\n", b"fast_plan: false\n").replace(
                    b"- hydra.sweeper.fast_plan=true\n", b"- hydra.sweeper.fast_plan=false\n")
            assert planned_bytes == (folders["false"] / rid / ".hydra" / name).read_bytes(), (rid, name)


def test_local_workers_keep_the_plugin_registry_they_scanned():
    """A worker restores Hydra's state for each job without scanning the plugins again: the registry
    of its first job stays, and it still lists the launchers."""
    from hydra.core.plugins import Plugins
    from hydra.core.singleton import Singleton
    from hydra.plugins.launcher import Launcher
    from hydra_plugins.resnorm_launcher import local_jobs

    local_jobs.restore_singletons(Singleton.get_state())  # a job (the state Hydra sends leaves the registry out)
    first = Plugins.instance()
    local_jobs.restore_singletons(Singleton.get_state())  # the next job in the same worker
    assert Plugins.instance() is first
    assert {"ParallelLauncher", "BasicLauncher"} <= {c.__name__ for c in first.discover(Launcher)}
