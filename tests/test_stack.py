"""Stacked ensembles: a stack's members equal their solo runs; a diverging member; kill -9
in the middle of a stack; the Hydra multirun with ``hydra.sweeper.stack=on`` against ``off``; the dry
run's stacks; every variant vmaps to its solo forward and backward; the GPU script's CPU smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import PYTHON, ROOT, TINY, compose, run_cli
from resnorm.train.stack import fit_stack
from resnorm.train.job import JobInfo, train

SIZE = ("depth=2", "model.d_model=32", "train.steps=50", "train.eval_every=25", "train.probe_every=10",
        "train.threads=1", "train.keep_checkpoint=true")
NO_ANALYSIS = "~hydra.callbacks.analysis"


def _run(tmp: Path, name: str, overrides):
    cfg = compose(*TINY, *SIZE, *overrides)
    return cfg, JobInfo(tmp / name, name, "stack", list(overrides))


def _curves(run_dir: Path):
    steps = pd.read_parquet(run_dir / "metrics.parquet")
    layers = pd.read_parquet(run_dir / "layers.parquet")
    grads = layers[layers.quantity == "grad_norm"].sort_values(["step", "layer", "sublayer"])
    params = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    return steps, grads, params


def assert_same_curves(a: Path, b: Path) -> None:
    """Loss curve (relative 1e-5), per-layer gradient norms and final parameters (fp32 tolerance)."""
    sa, ga, pa = _curves(a)
    sb, gb, pb = _curves(b)
    assert list(sa.step) == list(sb.step)
    assert torch.allclose(torch.tensor(sa.train_loss.values), torch.tensor(sb.train_loss.values), rtol=1e-5, atol=0)
    assert torch.allclose(torch.tensor(sa.grad_norm.values), torch.tensor(sb.grad_norm.values), rtol=1e-4, atol=1e-7)
    assert len(ga) == len(gb) > 0
    assert torch.allclose(torch.tensor(ga.value.values), torch.tensor(gb.value.values), rtol=1e-4, atol=1e-7)
    assert pa.keys() == pb.keys()
    for k in pa:
        a, b = pa[k], pb[k]
        if k.endswith("attn.branch.qkv.bias"):  # the key bias: see _without_key_bias
            a, b = _without_key_bias(a), _without_key_bias(b)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), k


def _without_key_bias(qkv_bias: torch.Tensor) -> torch.Tensor:
    """The query and value biases. The key bias adds q.b_k to every logit of a query's row, which the
    softmax cancels: its gradient is zero in exact arithmetic, rounding noise in fp32, and AdamW
    normalises that noise to steps of about lr. Two correct computations of the same step (solo,
    stacked) therefore move it differently; nothing downstream sees it."""
    d = qkv_bias.numel() // 3
    return torch.cat([qkv_bias[:d], qkv_bias[2 * d:]])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("variant", ["pre", "post", "rezero"])
def test_members_equal_their_solo_runs(variant, tmp_path):
    """Three members (two seeds, three learning rates, one with weight decay and other betas) of a
    Pre-LN, a Post-LN and a learned-scalar (ReZero) model, trained as one stack over 50 steps."""
    members = [(f"model.norm={variant}", "seed=0", "optim.lr=1e-3"),
               (f"model.norm={variant}", "seed=1", "optim.lr=3e-3"),
               (f"model.norm={variant}", "seed=0", "optim.lr=5e-4", "optim.weight_decay=0.1", "optim.beta2=0.95")]
    runs = [_run(tmp_path, f"stack{i}", o) for i, o in enumerate(members)]
    summaries = fit_stack([c for c, _ in runs], [j for _, j in runs])
    assert [s["status"] for s in summaries] == ["completed"] * 3
    for i, o in enumerate(members):
        cfg, job = _run(tmp_path, f"solo{i}", o)
        solo = train(cfg, job)
        assert summaries[i]["run_id"] == solo["run_id"]  # the member's own identity
        assert_same_curves(tmp_path / f"stack{i}", tmp_path / f"solo{i}")


@pytest.mark.usefixtures("one_thread")
def test_one_member_stack_is_the_solo_run_bit_for_bit(tmp_path):
    cfg, job = _run(tmp_path, "stack", ("train.steps=8",))
    fit_stack([cfg], [job])
    cfg, job = _run(tmp_path, "solo", ("train.steps=8",))
    train(cfg, job)
    a, b = (pd.read_parquet(tmp_path / n / "metrics.parquet") for n in ("stack", "solo"))
    assert [v.hex() for v in a.train_loss] == [v.hex() for v in b.train_loss]


@pytest.mark.usefixtures("one_thread")
def test_a_diverging_member_stops_alone(tmp_path):
    """The member with lr=1 is ``diverged`` at the step its solo run diverges; the others' curves are
    their solo curves."""
    members = [("seed=0", "optim.lr=1e-3"), ("seed=1", "optim.lr=1.0", "optim.warmup_steps=0"),
               ("seed=1", "optim.lr=2e-3")]
    runs = [_run(tmp_path, f"stack{i}", o) for i, o in enumerate(members)]
    summaries = fit_stack([c for c, _ in runs], [j for _, j in runs])
    solos = [train(*_run(tmp_path, f"solo{i}", o)) for i, o in enumerate(members)]
    assert [s["status"] for s in solos] == ["completed", "diverged", "completed"]
    assert [s["status"] for s in summaries] == [s["status"] for s in solos]
    assert summaries[1]["diverged_step"] == solos[1]["diverged_step"] < 49
    assert summaries[1]["outcome"] == solos[1]["outcome"]
    diverged = pd.read_parquet(tmp_path / "stack1" / "metrics.parquet")
    assert len(diverged) == solos[1]["diverged_step"] + 1  # it stopped updating (and recording) there
    for i in (0, 2):
        assert_same_curves(tmp_path / f"stack{i}", tmp_path / f"solo{i}")


def test_each_member_logs_its_own_wandb_run(tmp_path):
    """One W&B run per member, open at the same time (offline), each with its own history."""
    from wandb_records import read_run

    members = [("seed=0", "optim.lr=1e-3"), ("seed=1", "optim.lr=3e-3")]
    runs = [_run(tmp_path, f"m{i}", (*o, "logger.mode=offline", "train.steps=6")) for i, o in enumerate(members)]
    summaries = fit_stack([c for c, _ in runs], [j for _, j in runs])
    for i, s in enumerate(summaries):
        assert s["wandb_error"] is None and s["wandb_run_id"] == s["run_id"]
        (file,) = (tmp_path / f"m{i}" / "wandb").glob("offline-run-*/run-*.wandb")
        logged = read_run(file)
        assert logged["run"].run_id == s["run_id"] and logged["summary"]["status"] == "completed"
        stored = pd.read_parquet(tmp_path / f"m{i}" / "metrics.parquet")["train_loss"].tolist()
        assert [h["train/loss"] for h in logged["history"]] == pytest.approx(stored)


# --- the Hydra multirun --------------------------------------------------------------------------

SWEEP = ("seed=0,1,2,3", "optim.lr=1e-3,3e-3", "data=synthetic", "depth=2", "train.steps=30",
         "model.d_model=16", "train.seq_len=16", "train.batch_size=4", "data.synthetic_tokens=4000",
         "train.progress=false", "logger.mode=disabled", "train.keep_checkpoint=true",
         "train.checkpoint_every=10", NO_ANALYSIS)


def _folders(sweep: Path):
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.fixture(scope="module")
def unstacked(tmp_path_factory) -> Path:
    """The sweep with ``hydra.sweeper.stack=off``: eight ordinary jobs."""
    cwd = tmp_path_factory.mktemp("off")
    proc = run_cli("-m", *SWEEP, "hydra.sweeper.stack=off", "hydra.sweep.dir=sweep", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "sweep"


def _assert_same_sweep(sweep: Path, reference: Path) -> None:
    folders = _folders(sweep)
    assert [f.name for f in folders] == [f.name for f in _folders(reference)] and len(folders) == 8
    for f in folders:
        mine, ref = (json.loads((d / "summary.json").read_text()) for d in (f, reference / f.name))
        assert mine["status"] == ref["status"] == "completed"
        assert set(mine) == set(ref)  # the same summary fields: an ordinary run folder
        assert (mine["run_id"], mine["run_name"], mine["overrides"], mine["config"]) == \
            (ref["run_id"], ref["run_name"], ref["overrides"], ref["config"])
        assert sorted(p.name for p in f.iterdir() if p.name != "run.log") == \
            sorted(p.name for p in (reference / f.name).iterdir() if p.name != "run.log")
        assert (f / ".hydra" / "config.yaml").exists()
        assert_same_curves(f, reference / f.name)


@pytest.mark.slow
def test_multirun_stack_on_equals_stack_off(unstacked, tmp_path):
    proc = run_cli("-m", *SWEEP, "hydra.sweeper.stack=on", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stack of 8 runs" in proc.stdout + proc.stderr
    assert "sweep sweep: 8 completed" in proc.stdout + proc.stderr
    _assert_same_sweep(tmp_path / "sweep", unstacked)
    again = run_cli("-m", *SWEEP, "hydra.sweeper.stack=on", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert again.returncode == 0 and "8 of 8 jobs already done" in again.stdout + again.stderr


@pytest.mark.slow
def test_stack_killed_then_rerun(unstacked, tmp_path):
    """Four members (two seeds of the sweep above, its two learning rates) in one stack, SIGKILL after
    the 6th checkpoint write: two members have a checkpoint at step 20, two at step 10. The same
    command again resumes every member from its own checkpoint and completes it once, its curves
    those of the uninterrupted, unstacked run (the same run ids as two seeds of the sweep above)."""
    env = {**os.environ, "WANDB_SILENT": "true", "RESNORM_FAULT": "kill_after_checkpoint:6"}
    args = ["-m", "seed=0,1", *SWEEP[1:], "hydra.sweeper.stack=on", "hydra.sweep.dir=sweep"]
    killed = subprocess.run([PYTHON, str(ROOT / "tests" / "faultrun.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9
    steps = sorted(torch.load(f / "checkpoint.pt", weights_only=True)["step"] for f in _folders(tmp_path / "sweep"))
    assert steps == [10, 10, 20, 20]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep sweep: 4 completed" in proc.stdout + proc.stderr
    folders = _folders(tmp_path / "sweep")
    assert len(folders) == 4
    for f in folders:
        summary = json.loads((f / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["attempts"] == 2 and summary["resumed_from_step"] in (10, 20)
        assert list(pd.read_parquet(f / "metrics.parquet").step) == list(range(30))  # every step once
        assert_same_curves(f, unstacked / f.name)


def test_dry_run_shows_the_stacks(tmp_path):
    grid = ("seed=0,1", "optim.lr=1e-3,3e-3", "depth=1,2", *TINY, "--dry-run")
    on = run_cli("-m", *grid, "hydra.sweeper.stack=on", cwd=tmp_path)
    assert on.returncode == 0, on.stderr
    assert "stacked: 2 stack(s) of 4, 4 jobs" in on.stdout
    rows = [line for line in on.stdout.splitlines() if line[:1].isdigit()]
    labels = {("depth=1" in r, label) for r in rows for label in ("s1", "s2") if f"  {label}  " in r}
    assert len(rows) == 8 and len(labels) == 2 and {d for d, _ in labels} == {True, False}
    auto = run_cli("-m", *grid, cwd=tmp_path).stdout  # auto, the default: no stacking on a CPU machine
    assert "stacked:" not in auto and "stack" not in auto.splitlines()[2]


def test_bad_stack_mode_is_a_config_error(capsys):
    from hydra_plugins.resnorm_sweeper import ValidatingSweeper

    with pytest.raises(SystemExit) as exit_:
        ValidatingSweeper(max_batch_size=None, stack="sometimes")
    assert exit_.value.code == 2
    assert "hydra.sweeper.stack='sometimes' is invalid: choose one of auto, on, off" in capsys.readouterr().err


def test_grouping_keeps_unstackable_jobs_alone(monkeypatch):
    from resnorm.train import stack_plan
    from resnorm.train.stack_plan import stack_groups, why_not_stackable
    from resnorm.sweep.plan import JobPlan

    def plan(*o):
        return JobPlan(list(o), "id" + "".join(o), None, "new", compose(*TINY, *o))

    plans = [plan("seed=0"), plan("seed=1"), plan("optim.lr=0.01"), plan("depth=2"),
             plan("train.compile=true", "seed=3"), plan("train.compile=true", "seed=4"), plan("train.steps=7")]
    assert why_not_stackable(plans[4].cfg) == "train.compile (the stacked step runs eagerly)"
    for o, reason in (("train.grad_accum=2", "train.grad_accum > 1"), ("train.precision=fp16", "no gradient scaler"),
                      ("model.objective=mlm", "only the causal LM")):
        assert reason in why_not_stackable(compose(*TINY, o)), o
    groups = stack_groups(plans, "on")
    assert [[p.overrides for p in g] for g in groups] == [
        [["seed=0"], ["seed=1"], ["optim.lr=0.01"]], [["depth=2"]], [["train.compile=true", "seed=3"]],
        [["train.compile=true", "seed=4"]], [["train.steps=7"]]]
    assert all(len(g) == 1 for g in stack_groups(plans, "off"))
    monkeypatch.setitem(stack_plan.UNSTACKABLE_VARIANTS, "pre", "declared for the test")
    assert all(len(g) == 1 for g in stack_groups(plans[:3], "on"))


def test_auto_stacks_only_cuda_jobs():
    """``auto``: stacking was not faster on the CPU (docs/scaling.md, "Stacked ensembles"), so only jobs that train on
    a CUDA device are stacked."""
    from resnorm.train.stack_plan import stack_groups
    from resnorm.sweep.plan import JobPlan

    def plans(device):
        return [JobPlan([f"seed={i}"], f"id{i}", None, "new", compose(*TINY, f"seed={i}", f"train.device={device}"))
                for i in range(3)]

    assert [len(g) for g in stack_groups(plans("cpu"), "auto")] == [1, 1, 1]
    assert [len(g) for g in stack_groups(plans("cuda"), "auto")] == [3]
    if not torch.cuda.is_available():
        assert [len(g) for g in stack_groups(plans("auto"), "auto")] == [1, 1, 1]


# --- every variant under vmap -----------------------------------------------------------------------

def _variants():
    from resnorm.train.stack_plan import UNSTACKABLE_VARIANTS
    from resnorm.config.variants import VARIANTS

    return sorted(v for v in VARIANTS if v not in UNSTACKABLE_VARIANTS)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("variant", _variants())
def test_every_stackable_variant_vmaps_to_its_solo_step(variant, tmp_path):
    """The stacked forward and backward of two members (two seeds) of each variant the grouping
    stacks gives each member its solo loss and gradients (fp32 tolerance)."""
    from resnorm.train.loop import forward_backward, setup
    from resnorm.train.stack import stacked_forward_backward

    runs = [setup(compose(*TINY, f"model.norm={variant}", "depth=2", f"seed={s}", "model.d_model=32"),
                  JobInfo(tmp_path, "v", "v", []), 0, 1, None) for s in (0, 1)]
    batches = [r.sampler.sample() for r in runs]
    losses = stacked_forward_backward(runs, [b[0] for b in batches], [b[1] for b in batches])
    stacked = [[p.grad.clone() for p in r.model.parameters()] for r in runs]
    for r, (x, y), loss, grads in zip(runs, batches, losses, stacked):
        r.optimizer.zero_grad(set_to_none=True)
        solo = forward_backward(r, x, y)
        assert torch.allclose(loss, solo, rtol=1e-5)
        scale = max(p.grad.abs().max() for p in r.model.parameters())
        for p, g in zip(r.model.parameters(), grads):
            assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-5 * scale)


def test_gpu_throughput_script_smoke():
    """benchmarks/gpu_throughput.py --smoke: every part of the GPU script, tiny, on the CPU."""
    proc = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"sweep", "single"} <= set(result)
    for row in result["sweep"]:
        assert row["mode"] in ("stacked", "solo", "packed") and row["tokens_per_s"] > 0
    assert result["single"]["tokens_per_s"] > 0 and "mfu" in result["single"]
