"""The training recipe: gradient accumulation, fp16 with a gradient scaler, the optimizer
registry (adamw, sgd, muon) and TensorBoard, each trained through the one loop, offline, on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import TINY, compose, run_cli
from resnorm.train.callbacks import Callback, default_callbacks
from resnorm.train.preflight import validate
from resnorm.train.job import JobInfo, train
from resnorm.errors import ConfigError

SMALL = (*TINY, "depth=2", "train.threads=1")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: torch on one thread, restored after


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run_dir) / "metrics.parquet")


def fit_with(tmp_path: Path, name: str, *overrides: str, extra=()):
    """Train ``SMALL + overrides`` into ``tmp_path/name`` with ``extra`` callbacks; the summary."""
    cfg = compose(*SMALL, *overrides)
    return train(cfg, JobInfo(tmp_path / name, name, "g", []), callbacks=lambda run: default_callbacks(run, extra))


class Gradients(Callback):
    """Every step's raw gradients (all parameters, flattened), as the probes and the guard see them."""

    def __init__(self):
        self.steps = []

    def before_update(self, run, rec, x):
        self.steps.append(torch.cat([p.grad.detach().flatten().clone() for p in run.model.parameters()]))


class PoisonGradient(Callback):
    """Multiplies one weight's gradient by inf on the steps in ``steps`` (a stand-in for an fp16
    overflow in the backward: the hook sees the scaled gradient)."""

    def __init__(self, steps):
        self.steps = steps

    def on_fit_start(self, run):
        w = run.model.blocks[0].mlp.branch.fc2.weight
        w.register_hook(lambda g: g * math.inf if run.state.step in self.steps else g)


# --- the config -------------------------------------------------------------------------------------

def test_choices_are_the_registries():
    from resnorm.config import schema as config
    from resnorm.train import optimizers, precision

    assert config.OPTIMIZERS == tuple(optimizers.OPTIMIZERS)
    assert config.PRECISIONS == tuple(precision.AUTOCAST_DTYPES)
    assert tuple(p.stem for p in sorted((config.CONF_DIR / "optim").glob("*.yaml"))) == tuple(sorted(config.OPTIMIZERS))
    for name in config.OPTIMIZERS:
        assert compose(f"optim={name}").optim.name == name


@pytest.mark.parametrize("override, message", [
    ("optim.name=adam", "optim.name='adam' is invalid: choose one of adamw, sgd, muon"),
    ("train.precision=fp8", "train.precision='fp8' is invalid: choose one of fp32, bf16, fp16"),
    ("train.grad_accum=0", "train.grad_accum=0 is invalid: must be a positive integer"),
    ("optim.muon_ns_steps=0", "optim.muon_ns_steps=0 is invalid: must be an integer in [1, 99]"),
    ("optim.muon_ns_steps=100", "optim.muon_ns_steps=100 is invalid: must be an integer in [1, 99]"),  # torch's limit
    ("optim.muon_adjust_lr=spectral", "optim.muon_adjust_lr='spectral' is invalid: choose one of original, "
                                      "match_rms_adamw"),
    ("optim.sgd_momentum=1.0", "optim.sgd_momentum=1.0 is invalid: must lie in [0, 1)"),
    ("optim.muon_lr=-1", "optim.muon_lr=-1.0 is invalid: must be a positive number"),
])
def test_bad_recipe_values_get_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(override))
    assert str(err.value) == message


def test_grad_accum_must_split_each_process_share():
    validate(compose("train.batch_size=16", "train.devices=2", "train.grad_accum=8"))
    validate(compose("train.batch_size=12", "train.devices=2", "train.grad_accum=3"))
    with pytest.raises(ConfigError, match=r"^train.grad_accum=4 is invalid: must divide train.batch_size=12 / "
                                          r"train.devices=2 = 6 sequences into equal micro-batches$"):
        validate(compose("train.batch_size=12", "train.devices=2", "train.grad_accum=4"))


def test_bad_input_from_the_command_line_is_one_line(tmp_path):
    proc = run_cli("train.grad_accum=3", "optim=muon", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: train.grad_accum=3 is invalid: must divide train.batch_size=16 = 16 sequences into equal "
        "micro-batches"]
    assert not (tmp_path / "outputs").exists()


def test_grad_accum_and_tensorboard_are_operational_the_rest_is_identity():
    from resnorm.runs.identity import run_id

    base = run_id(compose(*SMALL))
    assert run_id(compose(*SMALL, "train.grad_accum=2")) == base
    assert run_id(compose(*SMALL, "logger.tensorboard=true")) == base
    for other in ("train.precision=fp16", "optim=muon", "optim=sgd", "optim.muon_lr=0.01"):
        assert run_id(compose(*SMALL, other)) != base, other


# --- gradient accumulation ---------------------------------------------------------------------------

def test_grad_accum_gives_the_single_batch_losses_and_gradients(tmp_path):
    """The same global batches, the same gradients (to float rounding), so the same run: losses,
    gradient norms, every per-layer probe (stream_grad_rms read from the micro-batches' backwards
    included) and the validation losses."""
    over = ("train.steps=5", "train.probe_every=2", "train.eval_every=5")
    one, two = Gradients(), Gradients()
    s1 = fit_with(tmp_path, "one", *over, extra=[one])
    s2 = fit_with(tmp_path, "two", *over, "train.grad_accum=2", extra=[two])
    assert s1["status"] == s2["status"] == "completed"
    for g1, g2 in zip(one.steps, two.steps, strict=True):
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for column in ("train_loss", "grad_norm", "val_loss"):
        pd.testing.assert_series_equal(a[column], b[column], rtol=1e-5, atol=1e-6)
    la, lb = (pd.read_parquet(tmp_path / n / "layers.parquet") for n in ("one", "two"))
    assert la[["step", "layer", "sublayer", "quantity"]].equals(lb[["step", "layer", "sublayer", "quantity"]])
    assert "stream_grad_rms" in set(la.quantity)
    pd.testing.assert_series_equal(la.value, lb.value, rtol=1e-4, atol=1e-6)
    assert s2["tokens_per_s"] > 0 and len(a) == len(b) == 5


@pytest.mark.slow  # two spawned processes: ~20 s on a busy 2-core machine
def test_grad_accum_under_ddp_follows_the_single_process_run(tmp_path, monkeypatch):
    """train.devices=2 train.grad_accum=2 (gloo, no_sync on the first micro-batch) trains the run
    one process trains with the whole batch at once."""
    from resnorm.train.task import run_job

    over = (*SMALL, "train.steps=4", "train.batch_size=8")
    single = train(compose(*over), JobInfo(tmp_path / "single", "single", "g", []))
    monkeypatch.chdir(tmp_path)  # outside Hydra, run_job writes into the working directory
    result = run_job(compose(*over, "train.devices=2", "train.grad_accum=2"))
    assert result["status"] == "completed", result
    ddp = json.loads((tmp_path / "summary.json").read_text())
    assert ddp["world_size"] == 2
    one, two = metrics(tmp_path / "single"), metrics(tmp_path)
    for column in ("train_loss", "grad_norm", "val_loss"):
        pd.testing.assert_series_equal(one[column], two[column], rtol=1e-5, atol=1e-6)
    assert ddp["final_val_loss"] == pytest.approx(single["final_val_loss"], rel=1e-5)


# --- fp16 and the gradient scaler --------------------------------------------------------------------

def test_fp16_trains_on_the_cpu_with_a_scaler_and_records_its_scale(tmp_path):
    fp32_run = fit_with(tmp_path, "fp32", "train.steps=4")
    fp16_run = fit_with(tmp_path, "fp16", "train.steps=4", "train.precision=fp16")
    assert fp16_run["status"] == "completed" and fp16_run["scaler_skipped_count"] == 0 and fp16_run["scaler_skipped_steps"] == []
    assert fp16_run["loss_scale"] == 2.0 ** 16 and "loss_scale" not in fp32_run
    m16, m32 = metrics(tmp_path / "fp16"), metrics(tmp_path / "fp32")
    assert m16.loss_scale.tolist() == [2.0 ** 16] * 4 and not m16.scaler_skipped.any()
    assert m32.loss_scale.isna().all() and not m32.scaler_skipped.any()
    # the probes and the guard see unscaled gradients: fp16 rounding (eps ~1e-3) apart from fp32
    assert m16.grad_norm.iloc[0] == pytest.approx(m32.grad_norm.iloc[0], rel=1e-2)
    assert m16.train_loss.iloc[0] == pytest.approx(m32.train_loss.iloc[0], rel=1e-2)
    assert m16.train_loss.iloc[0] != m32.train_loss.iloc[0]  # autocast did run in fp16


def test_an_fp16_overflow_is_skipped_and_recorded_not_a_divergence(tmp_path):
    """One overflowing backward at step 2: the scaler skips it (weights and optimizer state
    untouched), halves its scale, and training goes on; fp32 calls the same gradient a divergence."""
    weights = {}

    class Snapshot(Callback):
        def on_step_end(self, run, rec):
            weights[rec.step] = torch.cat([p.detach().flatten().clone() for p in run.model.parameters()])

    s = fit_with(tmp_path, "fp16", "train.precision=fp16", extra=[PoisonGradient({2}), Snapshot()])
    assert s["status"] == "completed" and s["scaler_skipped_steps"] == [2] and s["scaler_skipped_count"] == 1
    m = metrics(tmp_path / "fp16")
    assert m.scaler_skipped.tolist() == [False, False, True, False, False, False]
    assert m.loss_scale.tolist() == [2.0 ** 16] * 3 + [2.0 ** 15] * 3  # halved after the overflow
    assert not math.isfinite(m.grad_norm[2]) and math.isfinite(m.train_loss[2])
    assert torch.equal(weights[1], weights[2]) and not torch.equal(weights[2], weights[3])
    layers = pd.read_parquet(tmp_path / "fp16" / "layers.parquet")
    assert 2 not in set(layers[layers.quantity == "update_ratio"].step)  # no update, no update rows
    fp32_run = fit_with(tmp_path, "fp32", extra=[PoisonGradient({2})])
    assert fp32_run["status"] == "diverged" and fp32_run["diverge_kind"] == "nonfinite_grad" and fp32_run["diverged_step"] == 2


def test_an_overflow_at_a_loss_scale_of_one_is_a_divergence(tmp_path):
    """Gradients that overflow at every scale: skipped while the scale is above 1 (2^16 halved 16
    times), a divergence once the backward overflows without amplification (resnorm.train.precision)."""
    s = fit_with(tmp_path, "r", "train.precision=fp16", "train.steps=30", extra=[PoisonGradient(set(range(2, 30)))])
    assert s["status"] == "diverged" and s["diverge_kind"] == "nonfinite_grad" and s["diverged_step"] == 18
    assert s["scaler_skipped_steps"] == list(range(2, 18))
    assert metrics(tmp_path / "r").loss_scale.iloc[-1] == 1.0


@pytest.mark.parametrize("kind, scale, handled", [
    ("nonfinite_grad", 2.0 ** 16, True), ("nonfinite_grad", 2.0, True), ("nonfinite_grad", 1.0, False),
    ("nonfinite_grad", 0.5, False), ("nonfinite_loss", 2.0 ** 16, False), ("loss_factor", 2.0 ** 16, False),
    (None, 2.0 ** 16, False),
])
def test_the_guard_rule_under_fp16(kind, scale, handled):
    from resnorm.train.precision import scaler_overflow

    assert scaler_overflow(kind, scale) is handled


def test_the_scale_tensor_is_the_scalers_scale():
    from resnorm.train.precision import make_scaler, scale_tensor

    scaler = make_scaler("fp16", torch.device("cpu"))
    scaler.scale(torch.ones(()))
    assert scale_tensor(scaler).item() == scaler.get_scale() == 2.0 ** 16
    assert make_scaler("bf16", torch.device("cpu")) is None and make_scaler("fp32", torch.device("cpu")) is None


# --- optimizers ---------------------------------------------------------------------------------------

def _built(*overrides):
    from resnorm.model.transformer import build_model
    from resnorm.train.optimizers import make_optimizer

    cfg = compose(*SMALL, *overrides)
    model = build_model(cfg)
    return cfg, model, make_optimizer(model, cfg.optim)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    cfg, model, opt = _built("optim=muon", "model.attn_gate=true", "optim.weight_decay=0.1")
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    assert in_muon == {n for n, m in model.blocks.named_modules(prefix="blocks") if isinstance(m, torch.nn.Linear)
                       for n in [f"{n}.weight"]}
    assert {"tok_emb.weight", "pos_emb.weight", "head.weight"} <= in_adamw
    assert any(n.endswith("gate.weight") for n in in_muon)
    g = muon.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["ns_steps"], g["adjust_lr_fn"], g["weight_decay"]) == \
           (0.02, 0.95, True, 5, "original", 0.1)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]  # the head decays, vectors do not


def test_set_lr_keeps_each_optimizers_peak(tmp_path):
    from resnorm.train.loop import lr_at

    seen = []

    class Lrs(Callback):
        def on_step_start(self, run, rec):
            seen.append((rec.lr, [g["lr"] for g in run.optimizer.param_groups]))

    fit_with(tmp_path, "r", "optim=muon", "optim.lr=0.002", "optim.muon_lr=0.05", "train.steps=3",
             "optim.warmup_steps=2", extra=[Lrs()])
    cfg = compose(*SMALL, "optim=muon", "optim.lr=0.002", "optim.warmup_steps=2", "train.steps=3")
    for step, (lr, groups) in enumerate(seen):
        assert lr == lr_at(step, cfg.optim, 3)
        assert groups[0] == pytest.approx(lr * 0.05 / 0.002, rel=1e-12) and groups[1:] == [lr, lr]


def test_plain_sgd_steps_by_minus_lr_times_the_gradient():
    cfg, model, opt = _built("optim=sgd", "optim.sgd_momentum=0", "optim.warmup_steps=0", "optim.lr=0.1")
    assert isinstance(opt, torch.optim.SGD)
    x = torch.randint(0, 64, (4, 16))
    model.loss(x, x).backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    for g in opt.param_groups:
        g["lr"] = 0.1
    opt.step()
    for p, (w, grad) in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), w - 0.1 * grad, rtol=0, atol=1e-7)
    _, _, nesterov = _built("optim=sgd", "optim.sgd_nesterov=true", "optim.weight_decay=0.01")
    assert [(g["momentum"], g["nesterov"], g["weight_decay"]) for g in nesterov.param_groups] == \
           [(0.9, True, 0.01), (0.9, True, 0.0)]


@pytest.mark.parametrize("name", ["sgd", "muon"])
def test_every_optimizer_trains_and_the_monitors_follow(tmp_path, name):
    """Both train (the loss goes down on the learnable synthetic stream); the update probes run;
    the Adam-moment probe is left out (no Adam moments to read, resnorm.monitors.weights)."""
    lr = {"sgd": ("optim.lr=0.3",), "muon": ()}[name]
    s = fit_with(tmp_path, name, f"optim={name}", "train.steps=12", "train.probe_every=4", *lr)
    assert s["status"] == "completed"
    m = metrics(tmp_path / name)
    assert m.train_loss.iloc[-3:].mean() < m.train_loss.iloc[:3].mean()
    from resnorm.runs.quantities import QUANTITIES, by_probe

    q = set(pd.read_parquet(tmp_path / name / "layers.parquet").quantity)
    assert {n for n, quantity in QUANTITIES.items() if quantity.where == "every variant"} <= q
    assert not set(by_probe("OptimizerStateProbe")) & q


# --- resume: the optimizers' and the scaler's state ----------------------------------------------------

class Interrupt(BaseException):
    """Stands for a kill in the middle of a step."""


class InterruptAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_start(self, run, rec):
        if rec.step == self.step:
            raise Interrupt(rec.step)


def test_fp16_muon_resumes_bit_for_bit_with_tensorboard_appending(tmp_path):
    """Muon's and AdamW's state and the gradient scaler's (its scale after an overflow) are in the
    checkpoint: an interrupted run resumes to the uninterrupted one's numbers, bit for bit, and its
    TensorBoard events hold every step once."""
    over = ("optim=muon", "train.precision=fp16", "train.steps=8", "train.checkpoint_every=4",
            "train.eval_every=4", "logger.tensorboard=true")
    fit_with(tmp_path, "ref", *over, extra=[PoisonGradient({1})])
    with pytest.raises(Interrupt):
        fit_with(tmp_path, "run", *over, extra=[PoisonGradient({1}), InterruptAt(6)])
    done = fit_with(tmp_path, "run", *over, extra=[PoisonGradient({1})])
    assert done["resumed_from_step"] == 4 and done["scaler_skipped_steps"] == [1]
    columns = ["step", "train_loss", "lr", "grad_norm", "val_loss", "scaler_skipped", "loss_scale"]
    pd.testing.assert_frame_equal(metrics(tmp_path / "ref")[columns], metrics(tmp_path / "run")[columns])
    events = tensorboard_scalars(tmp_path / "run")
    assert [s for s, _ in events["train/loss"]] == list(range(8))
    ref = tensorboard_scalars(tmp_path / "ref")
    assert events["train/loss"] == ref["train/loss"] and events["train/loss_scale"] == ref["train/loss_scale"]


# --- TensorBoard -----------------------------------------------------------------------------------------

def tensorboard_scalars(run_dir: Path) -> dict:
    """{tag: [(step, value), ...]} of the run folder's TensorBoard events, as TensorBoard reads them."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_what_wandb_logs(tmp_path):
    """The same scalar names and values (to float32, TensorBoard's type) at the same steps as the
    W&B history of the same run."""
    import numpy as np

    from wandb_records import read_run

    s = fit_with(tmp_path, "r", "logger.tensorboard=true", "logger.mode=offline", "train.precision=fp16",
                 "train.probe_every=3")
    assert s["status"] == "completed"
    (log,) = (tmp_path / "r").glob("wandb/offline-run-*/run-*.wandb")
    history = read_run(log)["history"]
    wandb = {}
    for row in history:
        for k, v in row.items():
            if not k.startswith("_"):
                wandb.setdefault(k, []).append((row["_step"], v))
    tb = tensorboard_scalars(tmp_path / "r")
    assert set(tb) == set(wandb) and {"train/loss", "train/loss_scale", "val/loss", "act_rms/attn/000"} <= set(tb)
    for tag, points in wandb.items():
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag
        got = np.array([v for _, v in tb[tag]], dtype=np.float32)
        want = np.array([v for _, v in points], dtype=np.float64).astype(np.float32)
        np.testing.assert_array_equal(got, want, err_msg=tag)


# --- as a user runs it --------------------------------------------------------------------------------

def test_the_recipe_runs_from_the_command_line(tmp_path):
    proc = run_cli(*TINY, "depth=2", "train.grad_accum=2", "train.precision=fp16", "optim=muon",
                   "logger.tensorboard=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (folder,) = (tmp_path / "outputs" / "main").iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["scaler_skipped_count"] == 0
    cfg = summary["config"]
    assert (cfg["optim"]["name"], cfg["train"]["precision"], cfg["train"]["grad_accum"]) == ("muon", "fp16", 2)
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))


def test_every_variant_trains_under_fp16(tmp_path):
    """No variant needs a rule against fp16: each takes two fp16 steps (autocast and the scaler)
    with finite losses and no skipped step. A variant that cannot work in fp16 gets a rule in
    resnorm.config.schema and leaves this list."""
    from resnorm.config.variants import VARIANTS

    for name in VARIANTS:
        s = fit_with(tmp_path, name, f"model.norm={name}", "train.precision=fp16", "train.steps=2",
                     "train.probes=false", "train.eval_every=2", "depth=1")
        assert s["status"] == "completed" and s["scaler_skipped_count"] == 0, (name, s.get("diverge_reason"))
        assert math.isfinite(s["final_val_loss"]), name


def test_fp16_with_skipped_spikes_keeps_the_scaler_in_step(tmp_path):
    """optim.skip_spikes under fp16: a spike's update is skipped by the spike rule, and the scaler
    still ends its step (the next step's unscale_ would refuse otherwise)."""
    s = fit_with(tmp_path, "r", "train.precision=fp16", "optim.skip_spikes=true", "train.spike_window=2",
                 "train.spike_sigma=0.01", "train.steps=8")
    assert s["status"] == "completed" and s["skipped_steps"] and s["scaler_skipped_steps"] == []
