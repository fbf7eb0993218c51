"""Never losing a run: identity, checkpoint and resume, skip of finished runs, failures, dry run,
the device pool, W&B run ids and the W&B sweep specs (docs/scaling.md)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from analysis.load import find_run_dirs as find_runs  # job folders as the analysis finds them
from conftest import PYTHON, ROOT, TINY, Interrupt, compose, interrupt_at, run_cli
from resnorm.train import devices
from resnorm.runs.identity import OPERATIONAL_KEYS, run_id
from resnorm.model.transformer import build_model
from resnorm.runs.folder import job_lock
from resnorm.train.job import JobInfo, train
from resnorm.train.task import run_job

NO_ANALYSIS = "~hydra.callbacks.analysis"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "RESNORM_THREADS": "1"}
STEP_COLUMNS = ["step", "train_loss", "lr", "grad_norm", "val_loss"]  # all but the timing


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run_dir) / "metrics.parquet")


def summary_of(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


# --- identity -----------------------------------------------------------------------------------

def test_identity_is_the_config_minus_operational_keys():
    base = run_id(compose(*TINY))
    assert len(base) == 12 and int(base, 16) >= 0
    assert run_id(compose(*TINY)) == base
    same = ["logger.mode=offline", "train.progress=true", "train.threads=3", "train.device=cpu",
            "train.devices=2", "train.compile=true", "train.checkpoint_every=7", "train.keep_checkpoint=true",
            "train.grad_accum=2", "data.cache_dir=/tmp/elsewhere"]
    covered = {"logger" if k.startswith("logger.") else k for k in (o.split("=")[0] for o in same)}
    assert covered == set(OPERATIONAL_KEYS)
    for override in same:
        assert run_id(compose(*TINY, override)) == base, override
    for override in ("seed=1", "depth=7", "optim.lr=0.002", "model.norm=post", "train.steps=7", "name=other",
                     "train.precision=bf16", "train.precision=fp16", "optim=muon"):
        assert run_id(compose(*TINY, override)) != base, override
    # the job folder of a sweep is the identity (hydra.sweep.subdir: ${run_id:})
    from hydra import compose as hydra_compose, initialize_config_dir

    import resnorm.cli  # noqa: F401  (registers the resolver, as run.py does)

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = hydra_compose(config_name="config", overrides=list(TINY), return_hydra_config=True)
        assert str(cfg.hydra.sweep.subdir) == base
        assert str(cfg.hydra.sweep.dir) == "multirun/main"


# --- checkpoint and resume ----------------------------------------------------------------------

def test_resume_continues_bit_for_bit_and_the_same_wandb_run(tmp_path, monkeypatch):
    from wandb_records import read_run

    over = (*TINY, "depth=2", "train.steps=12", "train.checkpoint_every=4", "train.eval_every=5")
    ref = train(compose(*over), JobInfo(tmp_path / "ref", "ref", "g", []))
    cfg = compose(*over, "logger.mode=offline", "name=resume")
    rid = run_id(cfg)
    job = JobInfo(tmp_path / rid, "depth=2", "resume", ["depth=2"], rid)

    interrupt_at(monkeypatch, 10)
    with pytest.raises(Interrupt):
        train(cfg, job)
    monkeypatch.undo()
    half = summary_of(job.run_dir)
    assert half["status"] == "running" and half["checkpoint_step"] == 8 and half["run_id"] == rid
    assert metrics(job.run_dir)["step"].max() == 9  # flushed at the evaluation of step 9, past the checkpoint

    done = train(cfg, job)
    assert done["status"] == "completed" and done["attempts"] == 2 and done["resumed_from_step"] == 8
    a, b = metrics(tmp_path / "ref"), metrics(job.run_dir)
    assert b["step"].tolist() == list(range(12))  # no step twice
    pd.testing.assert_frame_equal(a[STEP_COLUMNS], b[STEP_COLUMNS])  # bit for bit
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ref" / "layers.parquet"),
                                  pd.read_parquet(job.run_dir / "layers.parquet"))
    for key in ("initial_loss", "final_train_loss", "final_val_loss", "best_val_loss", "steps_done"):
        assert done[key] == ref[key], key
    assert not (job.run_dir / "checkpoint.pt").exists()  # removed once the run is over
    # both attempts logged to the one W&B run named by the identity, resumed the second time
    logs = sorted(job.run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2
    runs = [read_run(f) for f in logs]
    assert {r["run"].run_id for r in runs} == {rid} and done["wandb_run_id"] == rid
    assert {r["run"].run_group for r in runs} == {"resume"} and runs[0]["run"].job_type == "pre"
    assert set(runs[1]["run"].tags) == {"pre", "depth=2"}
    first, second = ([h["_step"] for h in r["history"]] for r in runs)
    assert first == list(range(10)) and second == list(range(8, 12))  # W&B keeps each step once


def test_keep_checkpoint_and_a_foreign_checkpoint(tmp_path):
    cfg = compose(*TINY, "depth=1", "train.keep_checkpoint=true")
    rid = run_id(cfg)
    summary = train(cfg, JobInfo(tmp_path / "a", "a", "g", [], rid))
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert state["step"] == summary["steps_done"] == 6 and state["run_id"] == rid
    assert summary["checkpoint_step"] == 6
    # a checkpoint left by another run is not resumed from
    other = compose(*TINY, "depth=1", "seed=3")
    fresh = train(other, JobInfo(tmp_path / "a", "a", "g", []))
    assert fresh["resumed_from_step"] is None and fresh["attempts"] == 1


def test_wandb_failing_mid_run_leaves_training_and_the_run_store_complete(tmp_path, monkeypatch):
    import wandb

    class FlakyRun:
        id, summary = "flaky", {}

        def __init__(self):
            self.calls = 0

        def log(self, data, step):
            self.calls += 1
            if self.calls == 3:
                raise ConnectionError("W&B went away")

        def finish(self, exit_code=0):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FlakyRun())
    summary = train(compose(*TINY, "depth=1", "logger.mode=online"), JobInfo(tmp_path, "r", "g", []))
    assert summary["status"] == "completed" and "log failed" in summary["wandb_error"]
    assert metrics(tmp_path)["step"].tolist() == list(range(6))


# --- run_job: skip, failure, lock ---------------------------------------------------------------

def test_run_job_skips_done_runs_records_failures_and_respects_the_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside Hydra, run_job writes into the working directory
    cfg = compose(*TINY, "depth=1")
    first = run_job(cfg)
    assert first["status"] == "completed" and first["run_id"] == run_id(cfg) and "skipped" not in first
    wall = summary_of(tmp_path)["finished_at"]
    again = run_job(cfg)
    assert again["skipped"] and again["status"] == "completed" and summary_of(tmp_path)["finished_at"] == wall

    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    with job_lock(other) as ours:
        assert ours
        busy = run_job(cfg)
    assert busy["status"] == "running" and not (other / "summary.json").exists()

    def broken_model(cfg):
        raise MemoryError("CUDA out of memory (simulated)")

    import resnorm.model.transformer

    monkeypatch.setattr(resnorm.model.transformer, "build_model", broken_model)
    failed = run_job(cfg)
    on_disk = summary_of(other)
    assert failed["status"] == on_disk["status"] == "failed"
    assert "MemoryError: CUDA out of memory" in on_disk["error"] and "Traceback" in on_disk["traceback"]

    # a folder holding another run is left alone
    foreign = compose(*TINY, "depth=2")
    refused = run_job(foreign)
    assert refused["status"] == "failed" and "another run" in refused["error"]
    assert summary_of(other)["run_id"] == run_id(cfg)


# --- the device pool ----------------------------------------------------------------------------

def test_device_pool_is_exclusive_with_jobs_of_unequal_length(tmp_path):
    pool = devices.DevicePool([devices.Slot(0, fake=True), devices.Slot(1, fake=True)], tmp_path, poll_s=0.01)
    held, errors = [], []

    def job(seconds):
        try:
            with pool.acquire(1) as (slot,):
                start = time.monotonic()
                time.sleep(seconds)
                held.append((slot.name, start, time.monotonic()))
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(s,)) for s in (0.3, 0.05, 0.05, 0.2, 0.1, 0.02)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(held) == 6
    for name in ("fake:0", "fake:1"):
        spans = sorted((a, b) for n, a, b in held if n == name)
        assert spans, name
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:])), f"{name} shared: {spans}"
    with pytest.raises(RuntimeError, match="needs 3 devices but the pool has 2"):
        with pool.acquire(3):
            pass


def test_claim_follows_the_pool_and_the_configured_device(monkeypatch, tmp_path):
    monkeypatch.setenv(devices.LOCK_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(devices.POOL_ENV, raising=False)
    with devices.claim("auto") as slots:
        assert slots is None
    monkeypatch.setenv(devices.POOL_ENV, "fake:0,fake:1")
    with devices.claim("auto", 2) as slots:
        assert [s.name for s in slots] == ["fake:0", "fake:1"]
        assert [str(devices.job_device("auto", r, slots)) for r in (0, 1)] == ["cpu", "cpu"]
    with devices.claim("cpu") as slots:
        assert slots is None  # a job that names its device keeps it
    assert devices.Slot.parse("3").device == "cuda:3"  # the one GPU-only branch: which device


def test_local_launcher_plans_jobs_and_threads(monkeypatch):
    from omegaconf import OmegaConf

    from hydra_plugins.resnorm_launcher import ParallelLauncher

    monkeypatch.setattr(devices, "cpu_count", lambda: 8)
    launcher = ParallelLauncher()
    launcher.config = OmegaConf.create({"train": {"devices": 1}})
    monkeypatch.setattr(launcher, "pool", lambda: [])
    plan = launcher.plan(n_todo=20)
    assert plan["n_jobs"] == 8 and plan["threads"] == 1 and devices.POOL_ENV not in plan["env"]
    assert plan["env"]["OMP_NUM_THREADS"] == "1" and plan["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    # fewer jobs than cores: each still trains with train.threads (null: 1), its numbers the launcher's choice never
    assert (launcher.plan(n_todo=2)["n_jobs"], launcher.plan(n_todo=2)["threads"]) == (2, 1)
    assert (launcher.plan(n_todo=1)["n_jobs"], launcher.plan(n_todo=1)["threads"]) == (1, 1)
    launcher.config = OmegaConf.create({"train": {"devices": 1, "threads": 2}})
    assert (launcher.plan(n_todo=20)["n_jobs"], launcher.plan(n_todo=20)["threads"]) == (4, 2)
    gpus = ParallelLauncher(fake_gpus=4)
    gpus.config = OmegaConf.create({"train": {"devices": 2}})
    plan = gpus.plan(n_todo=20)
    assert plan["n_jobs"] == 2 and plan["threads"] == 1  # two DDP runs of two processes, 1 thread each
    assert plan["env"][devices.POOL_ENV] == "fake:0,fake:1,fake:2,fake:3"


def test_packed_pool_gives_each_job_its_own_gpu_slot(monkeypatch, tmp_path):
    """jobs_per_device=3 on 2 (fake) GPUs: 6 jobs at once hold distinct (GPU, slot) locks, a 7th waits
    for one of them; a DDP job takes its slots on distinct GPUs."""
    from hydra_plugins.resnorm_launcher import ParallelLauncher

    launcher = ParallelLauncher(fake_gpus=2, jobs_per_device=3)
    launcher.config = OmegaConf.create({"train": {"devices": 1}})
    plan = launcher.plan(n_todo=20)
    assert plan["n_jobs"] == 6 and plan["packing"] == "3 job(s) per device (jobs_per_device=3)"
    assert plan["env"][devices.POOL_ENV] == "fake:0,fake:1,fake:0/1,fake:1/1,fake:0/2,fake:1/2"
    monkeypatch.setenv(devices.POOL_ENV, plan["env"][devices.POOL_ENV])
    monkeypatch.setenv(devices.LOCK_DIR_ENV, str(tmp_path))
    with contextlib.ExitStack() as six:
        held = [six.enter_context(devices.claim("auto"))[0] for _ in range(6)]
        assert sorted((s.index, s.slot) for s in held) == [(g, k) for g in (0, 1) for k in (0, 1, 2)]
        assert {s.device for s in held} == {"cpu"}
        got = []

        def seventh_job():
            with devices.DevicePool(devices.pool_from_env(), poll_s=0.01).acquire(1) as (slot,):
                got.append(slot)

        seventh = threading.Thread(target=seventh_job)
        seventh.start()
        time.sleep(0.3)
        assert not got, "a 7th job got a slot while all 6 were held"
        six.close()  # the six jobs end
        seventh.join(5)
        assert got and got[0].name in plan["pool"].split(",")
    pool = devices.DevicePool([devices.Slot(0, True, k) for k in range(3)] + [devices.Slot(1, True)], tmp_path)
    with pool.acquire(2) as pair:
        assert {s.index for s in pair} == {0, 1}  # never two slots of one GPU for one DDP job
    with pytest.raises(RuntimeError, match="needs 3 devices but the pool has 2"):
        with pool.acquire(3):
            pass
    assert devices.Slot.parse("fake:1/2") == devices.Slot(1, True, 2) and devices.Slot.parse("3/1").device == "cuda:3"
    # the dry run shows the slots the sweep's launcher would use, and each job's memory estimate
    from resnorm.sweep import packing
    from resnorm.sweep.plan import job_table, plan_job

    monkeypatch.setattr(packing, "LATEST_LAUNCHER", launcher)
    table = job_table([plan_job(["depth=1"], compose(*TINY, "depth=1"), None)], 1e10, "d", "ParallelLauncher")
    assert "slots: fake:0,fake:1,fake:0/1,fake:1/1,fake:0/2,fake:1/2 (3 job(s) per device" in table
    assert "mem/job" in table.splitlines()[1]
    assert "slots:" not in job_table([plan_job([], compose(*TINY), None)], 1e10, "d", "BasicLauncher")


def test_auto_packing_divides_free_memory_by_the_job_estimate(monkeypatch):
    from hydra_plugins.resnorm_launcher import ParallelLauncher
    from resnorm.sweep import packing

    # floor(free * 0.8 / job), in [1, 8]
    assert packing.auto_jobs_per_device(80e9, 10e9) == 6
    assert packing.auto_jobs_per_device(5e9, 10e9) == 1 and packing.auto_jobs_per_device(1e12, 1e9) == 8
    assert packing.slots_per_device("auto", 2, lambda: [80e9, 25e9], lambda: 10e9) == [6, 2]
    assert packing.slots_per_device(2, 3, None, None) == [2, 2, 2]  # neither is asked for a number
    assert [s.name for s in devices.packed([devices.Slot(0), devices.Slot(1)], [3, 1])] == ["0", "1", "0/1", "0/2"]
    # the estimate: 16 bytes a parameter, (9 d + 2 d_ff) fp32 values a token and layer, 3 x vocab logits
    cfg = compose("depth=2")  # d 64, d_ff 256, batch 16 x 64 tokens, vocab 256
    n = 100_000
    tokens = 16 * 64
    assert packing.job_memory_bytes(cfg, n) == 16 * n + 2 * tokens * (9 * 64 + 2 * 256) * 4 + 3 * tokens * 256 * 4 \
        + packing.CUDA_CONTEXT_BYTES
    ddp = packing.job_memory_bytes(compose("depth=2", "train.devices=2"), n)
    assert ddp < packing.job_memory_bytes(cfg, n)  # each process holds half the batch
    # the launcher: fake GPUs with 3.5 jobs' worth of the usable memory each hold 3
    launcher = ParallelLauncher(fake_gpus=2, jobs_per_device="auto", fake_gpu_free_gb=1.0)
    launcher.config = compose(*TINY)
    need = launcher.job_bytes(None)
    launcher.fake_gpu_free_gb = 3.5 * need / packing.PACK_SAFETY / 1e9
    plan = launcher.plan(n_todo=20)
    assert plan["n_jobs"] == 6 and plan["packing"].startswith("3 job(s) per device (jobs_per_device=auto: ")
    # a CPU machine is not packed: one core per job
    monkeypatch.setattr(devices, "cpu_count", lambda: 8)
    cpu = ParallelLauncher(jobs_per_device=3)
    cpu.config = OmegaConf.create({"train": {"devices": 1}})
    monkeypatch.setattr(cpu, "pool", lambda: [])
    assert cpu.plan(n_todo=20)["n_jobs"] == 8 and devices.POOL_ENV not in cpu.plan(n_todo=20)["env"]


@pytest.mark.parametrize("bad", [0, -1, 2.5, "x", True, None])
def test_jobs_per_device_must_be_a_positive_integer_or_auto(bad, capsys):
    from hydra_plugins.resnorm_launcher import ParallelLauncher
    from resnorm.errors import ConfigError
    from resnorm.sweep.packing import parse_jobs_per_device

    with pytest.raises(ConfigError, match=r"^hydra\.launcher\.jobs_per_device=.* must be a positive integer or 'auto'$"):
        parse_jobs_per_device(bad)
    with pytest.raises(SystemExit) as exit_:
        ParallelLauncher(jobs_per_device=bad)
    assert exit_.value.code == 2 and "config error: hydra.launcher.jobs_per_device=" in capsys.readouterr().err
    assert parse_jobs_per_device("auto") == "auto" and parse_jobs_per_device("4") == 4


# --- the command line: failures, dry run, kill -9 and re-run ----------------------------------

PROBE_CALLBACK = '''
from pathlib import Path
from hydra.experimental.callback import Callback

class Probe(Callback):
    def __init__(self, path):
        self.path = path

    def on_multirun_end(self, config, **kwargs):
        Path(self.path).write_text("multirun ended")
'''


def probe_callback(tmp_path: Path):
    """A Hydra callback standing for the analysis: it leaves a file when a multirun ends."""
    (tmp_path / "probe_callback.py").write_text(PROBE_CALLBACK)
    marker = tmp_path / "multirun_ended"
    args = ["+hydra.callbacks.probe._target_=probe_callback.Probe", f"+hydra.callbacks.probe.path={marker}"]
    return marker, args, {"PYTHONPATH": str(tmp_path)}


def test_dry_run_prints_the_job_table_and_launches_nothing(tmp_path):
    done_cfg = compose(*TINY, "depth=1", "name=dry")
    done_dir = tmp_path / "multirun" / "dry" / run_id(done_cfg)
    done_dir.mkdir(parents=True)
    (done_dir / "summary.json").write_text(json.dumps({"status": "completed", "run_id": run_id(done_cfg)}))
    marker, callback, env = probe_callback(tmp_path)
    proc = run_cli(*TINY, "depth=1,2", "name=dry", "--dry-run", NO_ANALYSIS, *callback, cwd=tmp_path,
                   env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "dry run: 2 jobs" in out and "nothing is launched" in out
    rows = {line.split()[1]: line for line in out.splitlines() if line[:1].isdigit()}
    new_id = run_id(compose(*TINY, "depth=2", "name=dry"))
    assert set(rows) == {run_id(done_cfg), new_id}
    assert "done: completed" in rows[run_id(done_cfg)] and "depth=1" in rows[run_id(done_cfg)]
    assert " new " in rows[new_id] and "depth=2" in rows[new_id]
    n_params = build_model(compose(*TINY, "depth=2")).n_params()
    assert f" {n_params / 1e3:.3g}k " in rows[new_id]
    assert "to run: 1 of 2 jobs" in out and "FLOP/s per job" in out
    assert sorted(p.name for p in (tmp_path / "multirun" / "dry").iterdir()) == [run_id(done_cfg)]
    assert not marker.exists(), "the dry run ran the end-of-sweep callbacks"


def test_duplicate_runs_in_one_sweep_are_refused(tmp_path):
    proc = run_cli("-m", *TINY, "depth=1", "train.threads=1,2", "name=dup", NO_ANALYSIS, cwd=tmp_path)
    assert proc.returncode == 2
    assert "are the same run" in proc.stderr and not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_kill_9_mid_sweep_then_the_same_command_finishes_every_run_once(tmp_path):
    """A sweep killed with SIGKILL in its second job; the same command again: the first job is not
    run again, the second resumes from its checkpoint (its curve equals an uninterrupted run's),
    the third starts; no run and no step appears twice."""
    steps = 400
    sweep = ["hydra/launcher=basic", "hydra.sweeper.order=given",  # one job at a time, in the grid's order
             *TINY, f"train.steps={steps}", "train.eval_every=50",
             "train.checkpoint_every=20", "train.threads=1", "depth=1,2,3", "name=killed", NO_ANALYSIS]
    env = {**os.environ, **ONE_THREAD, "WANDB_SILENT": "true"}
    proc = subprocess.Popen([PYTHON, str(ROOT / "run.py"), "-m", *sweep], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    sweep_dir = tmp_path / "multirun" / "killed"
    second = sweep_dir / run_id(compose(*TINY, f"train.steps={steps}", "train.eval_every=50", "depth=2",
                                        "name=killed"))
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            s = summary_of(second) if (second / "summary.json").exists() else {}
            if (s.get("checkpoint_step") or 0) >= 40:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        else:
            pytest.fail("the second job never reached its second checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = summary_of(second)
    assert killed["status"] == "running" and killed["steps_done"] < steps
    firsts = {d.name: summary_of(d) for d in find_runs(sweep_dir)}

    marker, callback, cb_env = probe_callback(tmp_path)
    again = run_cli("-m", *sweep, *callback, cwd=tmp_path, env_extra={**ONE_THREAD, **cb_env})
    assert again.returncode == 0, again.stderr[-3000:]
    assert marker.exists()  # the end-of-sweep callback (the analysis) ran once the sweep was done

    runs = find_runs(sweep_dir)
    assert len(runs) == 3 and len({summary_of(d)["run_id"] for d in runs}) == 3
    summaries = {d.name: summary_of(d) for d in runs}
    assert all(s["status"] == "completed" for s in summaries.values())
    first = [name for name, s in firsts.items() if s["status"] == "completed"]
    assert len(first) == 1 and summaries[first[0]] == firsts[first[0]]  # not run again
    resumed = summaries[second.name]
    assert resumed["attempts"] == 2 and resumed["resumed_from_step"] >= 40
    for name, s in summaries.items():
        steps_seen = metrics(sweep_dir / name)["step"]
        assert steps_seen.tolist() == list(range(steps)), name  # every step once
        assert s["attempts"] == (2 if name == second.name else 1)
    assert not list(sweep_dir.rglob("checkpoint.pt"))

    reference = train(compose(*TINY, f"train.steps={steps}", "train.eval_every=50", "depth=2", "name=killed",
                              "train.threads=1"), JobInfo(tmp_path / "reference", "r", "g", []))
    pd.testing.assert_frame_equal(metrics(tmp_path / "reference")[STEP_COLUMNS], metrics(second)[STEP_COLUMNS])
    assert resumed["final_val_loss"] == reference["final_val_loss"]

    try:  # the analysis package (a sibling branch) where it is installed
        from analysis.load import load_sweep
    except ImportError:
        return
    loaded = load_sweep(sweep_dir)
    assert len(loaded.runs) == 3 and not loaded.steps.duplicated(["run_dir", "step"]).any()


# --- W&B sweeps ---------------------------------------------------------------------------------

def agent_command(spec: dict, args: dict) -> list:
    """The command a W&B agent runs for one grid point (wandb's own argument formats)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in args.items()}})
    macros.update(env=[], interpreter=[PYTHON], program=[str(ROOT / spec["program"])])
    out = []
    for item in spec["command"]:
        out += macros[item[2:-1]] if item.startswith("${") and item.endswith("}") else [item]
    return out


def test_wandb_sweep_specs_match_the_hydra_grids_and_land_in_the_same_folders(tmp_path):
    specs = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert specs
    for path in specs:
        spec = yaml.safe_load(path.read_text())
        hydra_cfg = yaml.safe_load((ROOT / "conf" / "sweep" / path.name).read_text())
        grid = {k: [str(v) for v in p["values"]] for k, p in spec["parameters"].items()}
        hydra_grid = {k: str(v).split(",") for k, v in hydra_cfg["hydra"]["sweeper"]["params"].items()}
        assert grid == hydra_grid, path.name
        assert f"name={hydra_cfg['name']}" in spec["command"] and spec["metric"]["name"] == "val/loss"

    spec = yaml.safe_load((ROOT / "sweeps" / "depth_lr_grid.yaml").read_text())
    point = {"model.norm": "post", "depth": 6, "optim.lr": 0.003}
    command = agent_command(spec, point)
    assert command[1:5] == [str(ROOT / "run.py"), "model.norm=post", "depth=6", "optim.lr=0.003"]
    tiny = [*TINY, "depth=1"]  # the grid's depth is too slow here: the last depth= wins
    env = {**os.environ, **ONE_THREAD, "WANDB_SILENT": "true"}
    proc = subprocess.run([*command, *tiny, NO_ANALYSIS], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = find_runs(tmp_path / "multirun" / "depth_lr_grid")
    assert summary_of(run_dir)["status"] == "completed"
    # the Hydra sweep of the same grid knows that job as done
    dry = run_cli("+sweep=depth_lr_grid", *tiny, "--dry-run", NO_ANALYSIS, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "dry run: 6 jobs" in dry.stdout  # depth is pinned to 1: 2 variants x 3 learning rates
    (row,) = [line for line in dry.stdout.splitlines() if run_dir.name in line]
    assert "done: completed" in row and "model.norm=post" in row and "optim.lr=0.003" in row


def test_jobs_launch_longest_first_unless_the_order_is_given(tmp_path):
    """Parallel workers must not end on one long job: the sweeper launches the largest estimated FLOPs
    first (Hydra numbers jobs in launch order: ``hydra.job.num``); ``order=given`` keeps the grid's order."""
    def launch_order(order):
        name = f"order_{order}"
        proc = run_cli("-m", "hydra/launcher=basic", *TINY, "train.steps=2", "depth=1,3,2", f"name={name}",
                       f"hydra.sweeper.order={order}", NO_ANALYSIS, cwd=tmp_path, env_extra=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr[-2000:]
        nums = {}
        for run_dir in find_runs(tmp_path / "multirun" / name):
            hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
            nums[hydra_cfg["job"]["num"]] = summary_of(run_dir)["config"]["depth"]
        return [nums[i] for i in sorted(nums)]

    assert launch_order("longest_first") == [3, 2, 1]
    assert launch_order("given") == [1, 3, 2]
    bad = run_cli("-m", *TINY, "depth=1,2", "hydra.sweeper.order=shortest", NO_ANALYSIS, cwd=tmp_path)
    assert bad.returncode != 0 and "hydra.sweeper.order='shortest' is invalid" in bad.stderr, bad.stderr[-1000:]
