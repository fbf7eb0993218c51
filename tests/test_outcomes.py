"""Run outcomes (trained / stalled / diverged / nonfinite), the data's trivial baseline, and online
spike detection with its opt-in skip-step mode."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY, compose
from resnorm.train.callbacks import Callback, default_callbacks
from resnorm.runs.folder import OUTCOMES, classify_outcome, diverge_kind_of
from resnorm.train.spikes import SpikeTracker, is_spike
from resnorm.train.job import JobInfo, train


def job(tmp_path, name="run"):
    return JobInfo(tmp_path / name, name, "test", [])


@pytest.mark.parametrize("status, kind, final, unigram, want", [
    ("completed", None, 2.5, 3.34, "trained"),
    ("completed", None, 3.30, 3.34, "stalled"),  # within the 0.1 margin below the baseline
    ("completed", None, 3.35, 3.34, "stalled"),  # above it
    ("completed", None, 3.2399, 3.34, "trained"),  # just past the margin
    ("completed", None, 3.30, None, "trained"),  # no baseline known: counted as trained
    ("completed", None, None, 3.34, "nonfinite"),  # the final validation loss was not finite
    ("diverged", "loss_factor", None, 3.34, "diverged"),
    ("diverged", "nonfinite_loss", None, 3.34, "nonfinite"),
    ("diverged", "nonfinite_grad", None, 3.34, "nonfinite"),
    ("failed", None, None, 3.34, None),
    ("running", None, None, 3.34, None),
])
def test_classify_outcome(status, kind, final, unigram, want):
    assert classify_outcome(status, kind, final, unigram, 0.1) == want
    assert want is None or want in OUTCOMES


def test_diverge_kind_from_an_old_reason():
    assert diverge_kind_of("non-finite loss (nan); first non-finite output in module 'x'") == "nonfinite_loss"
    assert diverge_kind_of("non-finite gradient norm; ...") == "nonfinite_grad"
    assert diverge_kind_of("loss 12 exceeds train.diverge_factor=2.0 x initial loss 5.5") == "loss_factor"
    assert diverge_kind_of(None) is None


def test_unigram_loss_is_the_training_split_entropy():
    from resnorm.data.corpora import load_data, unigram_entropy

    stream = torch.tensor([0, 0, 1, 2], dtype=torch.uint8)
    assert unigram_entropy(stream) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    data = load_data(compose("data=synthetic", "data.synthetic_tokens=4000").data, 16, 0)
    counts = np.bincount(data.train.numpy())
    p = counts[counts > 0] / counts.sum()
    assert data.unigram_loss == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    assert 0 < data.entropy_rate < data.unigram_loss <= math.log(64)


def test_synthetic_entropy_rate_by_hand_for_a_two_token_segment():
    """segment 2 (half 1): a uniform token, then its copy: ln V / 2 per token."""
    from resnorm.data.corpora import synthetic_entropy_rate

    assert synthetic_entropy_rate(8, 2, seed=3) == pytest.approx(math.log(8) / 2)


def test_a_learning_run_is_trained_and_one_that_stays_at_the_baseline_is_stalled(tmp_path):
    learn = compose(*TINY, "depth=1", "train.steps=80", "train.eval_every=80", "optim.lr=1e-2",
                    "data.synthetic_tokens=20000")
    summary = train(learn, job(tmp_path, "learn"))
    assert summary["status"] == "completed" and summary["outcome"] == "trained"
    assert summary["final_val_loss"] < summary["unigram_loss"] - summary["stall_margin"]
    stuck = compose(*TINY, "depth=1", "train.steps=80", "train.eval_every=80", "optim.lr=1e-2",
                    "optim.beta1=0.0", "optim.lr=1e-7")
    summary = train(stuck, job(tmp_path, "stuck"))
    assert summary["status"] == "completed" and summary["outcome"] == "stalled"
    on_disk = json.loads((tmp_path / "stuck" / "summary.json").read_text())
    assert on_disk["outcome"] == "stalled" and on_disk["unigram_loss"] == pytest.approx(summary["unigram_loss"])


def test_a_blow_up_is_diverged_and_a_nan_is_nonfinite(tmp_path):
    blow = compose(*TINY, "model.norm=post", "depth=2", "optim.lr=1e4", "optim.warmup_steps=0", "train.steps=20")
    summary = train(blow, job(tmp_path, "blow"))
    assert summary["status"] == "diverged" and summary["outcome"] in ("diverged", "nonfinite")
    assert summary["outcome"] == ("diverged" if summary["diverge_kind"] == "loss_factor" else "nonfinite")

    class NaN(Callback):
        def on_fit_start(self, run):
            w = run.model.blocks[0].mlp.branch.fc2.weight
            w.register_hook(lambda g: g * float("nan") if run.state.step == 1 else g)

    summary = train(compose(*TINY, "depth=1"), job(tmp_path, "nan"),
                    callbacks=lambda run: default_callbacks(run, [NaN()]))
    assert summary["outcome"] == "nonfinite" and summary["diverge_kind"] == "nonfinite_grad"


def test_spike_rule_on_a_hand_made_series():
    flat = [1.0, 3.0] * 64  # 128 values: mean 2, sd 1 (population), so the threshold is 2 + 6 = 8
    assert not is_spike(8.0, flat, sigma=6.0, window=128)  # at the threshold: not above it
    assert is_spike(8.000001, flat, sigma=6.0, window=128)
    assert is_spike(8.000001, [0.0] * 50 + flat, sigma=6.0, window=128)  # only the last window counts
    assert not is_spike(100.0, flat[:-1], sigma=6.0, window=128)  # fewer than a window: never
    assert not is_spike(math.inf, flat, 6.0, 128) and not is_spike(math.nan, flat, 6.0, 128)
    tracker = SpikeTracker(window=4, sigma=2.0)
    losses = [1.0, 1.1, 0.9, 1.0, 5.0, 1.0, math.nan, 1.0]
    flags = [tracker.observe(i, v, 1.0) for i, v in enumerate(losses)]
    assert flags == [False, False, False, False, True, False, False, False]
    assert tracker.spike_steps == [4] and len(tracker.losses) == 4 and math.nan not in tracker.losses


def test_gradient_norm_spikes_count_too():
    tracker = SpikeTracker(window=3, sigma=1.0)
    for i, g in enumerate([1.0, 1.0, 1.0]):
        tracker.observe(i, 2.0, g)
    assert tracker.observe(3, 2.0, 50.0) and tracker.spike_steps == [3]


SPIKY = (*TINY, "depth=1", "train.steps=12", "train.spike_window=4", "train.spike_sigma=6")


class GradientSpike(Callback):
    """Multiplies one weight's gradient by 1000 at step 8: a gradient-norm spike (loss unchanged)."""

    def on_fit_start(self, run):
        w = run.model.blocks[0].mlp.branch.fc2.weight
        w.register_hook(lambda g: g * 1000.0 if run.state.step == 8 else g)


def spiky(extra=()):
    return lambda run: default_callbacks(run, [GradientSpike(), *extra])


def test_spikes_are_recorded_in_the_summary_and_the_step_table(tmp_path):
    summary = train(compose(*SPIKY), job(tmp_path), callbacks=spiky())
    steps = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert summary["spike_steps"] == [8]
    assert summary["spike_count"] == len(summary["spike_steps"]) == int(steps["spike"].sum()) == 1
    assert steps.loc[steps["spike"], "step"].tolist() == summary["spike_steps"]
    assert not steps["skipped"].any() and summary["skipped_steps"] == []
    assert steps["val_log_z"].notna().sum() == steps["val_loss"].notna().sum() > 0


def test_skip_step_leaves_the_weights_and_optimizer_state_unchanged(tmp_path):
    seen = []

    class Watch(Callback):
        def before_update(self, run, rec, x):
            self.params = [p.detach().clone() for p in run.model.parameters()]
            self.state = {k: v.clone() for p in run.model.parameters()
                          for k, v in run.optimizer.state.get(p, {}).items() if torch.is_tensor(v)}

        def on_step_end(self, run, rec):
            if rec.skipped:
                after = {k: v for p in run.model.parameters()
                         for k, v in run.optimizer.state.get(p, {}).items() if torch.is_tensor(v)}
                same = all(torch.equal(a, b) for a, b in zip(self.params, run.model.parameters()))
                seen.append(same and all(torch.equal(self.state[k], after[k]) for k in after))

    summary = train(compose(*SPIKY, "optim.skip_spikes=true"), job(tmp_path), callbacks=spiky([Watch()]))
    assert summary["skipped_steps"] == summary["spike_steps"] == [8]
    assert seen and all(seen)
    steps = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert steps.loc[steps["skipped"], "step"].tolist() == summary["skipped_steps"]


def test_resume_keeps_the_spike_state(tmp_path, monkeypatch):
    import resnorm.train.loop as loop

    over = (*SPIKY, "train.checkpoint_every=5", "train.eval_every=4")
    ref = train(compose(*over), job(tmp_path, "ref"), callbacks=spiky())
    original = loop.lr_at

    def interrupt(s, *args):
        if s == 8:
            raise KeyboardInterrupt
        return original(s, *args)

    monkeypatch.setattr(loop, "lr_at", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(compose(*over), job(tmp_path, "cut"), callbacks=spiky())
    monkeypatch.undo()
    done = train(compose(*over), job(tmp_path, "cut"), callbacks=spiky())
    assert done["resumed_from_step"] == 5
    assert done["spike_steps"] == ref["spike_steps"] == [8]  # the window before step 8 straddles the cut
    assert pd.read_parquet(tmp_path / "cut" / "metrics.parquet")["grad_norm"].tolist() == \
        pd.read_parquet(tmp_path / "ref" / "metrics.parquet")["grad_norm"].tolist()


def test_sweep_progress_line_counts_outcomes_and_extrapolates_time(tmp_path):
    import time

    from resnorm.runs.folder import write_summary
    from resnorm.runs.progress import PLAN_FILE, progress_line

    sweep = tmp_path / "grid"
    sweep.mkdir()
    (sweep / PLAN_FILE).write_text(json.dumps(dict(started_at=time.time() - 60, jobs=[
        dict(run_id="a", flops=1.0), dict(run_id="b", flops=1.0), dict(run_id="c", flops=2.0)])))
    assert progress_line(sweep) == "sweep grid: 0/3 finished"
    write_summary(sweep / "a", dict(status="completed", outcome="trained"))
    write_summary(sweep / "b", dict(status="completed", outcome="stalled"))
    write_summary(sweep / "c", dict(status="running"))
    line = progress_line(sweep)
    assert line.startswith("sweep grid: 2/3 finished (1 stalled, 1 trained), about ")
    assert line.endswith("min left") or line.endswith("s left")  # 60 s for 2 FLOPs: ~120 s for the last 2
    assert progress_line(tmp_path / "nowhere") is None
