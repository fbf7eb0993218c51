"""The shared training loop: bit-for-bit the loop it replaced, the guard alone, the callback
protocol, LoopState in the checkpoint, and the experiments training through it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY, compose
from resnorm.train.guard import divergence
from resnorm.train.job import JobInfo, train

REFERENCE = Path(__file__).parent / "data" / "loop_reference.json"
CASES = sorted(next(iter(json.loads(REFERENCE.read_text())["machines"].values())))


def _reference(name: str) -> dict:
    """This machine's recorded reference for case ``name``: float sums depend on the CPU kernels torch
    picks, so references are kept per numerics fingerprint (tests/data/record_loop_reference.py)."""
    import runpy

    fingerprint = runpy.run_path(str(REFERENCE.parent / "record_loop_reference.py"))["fingerprint"]
    machines = json.loads(REFERENCE.read_text())["machines"]
    if fingerprint() not in machines:
        pytest.skip(f"no bit-for-bit reference for this machine's numerics ({fingerprint()}): record one with "
                    "tests/data/record_loop_reference.py from a checkout of commit 3a374e0")
    return machines[fingerprint()][name]


def _exists(key: str) -> bool:
    """Whether the quantity of a reference key ``step|layer|sublayer|quantity`` is written on its sublayer."""
    from resnorm.runs.quantities import QUANTITIES

    *_, sublayer, quantity = key.split("|")
    return quantity not in QUANTITIES or sublayer in QUANTITIES[quantity].sublayers


def _layers(run_dir: Path) -> dict:
    t = pd.read_parquet(run_dir / "layers.parquet")
    return {f"{s}|{l}|{sub}|{q}": float(v).hex()
            for s, l, sub, q, v in zip(t.step, t.layer, t.sublayer, t.quantity, t.value)}


@pytest.mark.parametrize("name", CASES)
def test_fit_is_bit_for_bit_the_loop_it_replaced(name, tmp_path):
    """tests/data/loop_reference.json was recorded with the pre-``fit`` loop (commit 2f7e2b5, one
    thread, CPU; per machine, see :func:`_reference`): per-step train loss and gradient norm, every per-layer probe value, and the
    validation losses (those of the z-loss case differ by design: the validation loss is now the
    cross-entropy alone). The resi_dual case runs with ``model.resi_dual_eps=1e-5``: the dual-stream norm
    took ``model.norm_eps`` (1e-5) when it was recorded; its default is now the authors' 1e-7."""
    ref = _reference(name)
    cfg = compose(*TINY, *ref["overrides"], "train.steps=8", "train.eval_every=4", "train.probe_every=3",
                  "train.threads=1")
    summary = train(cfg, JobInfo(tmp_path, name, "ref", []))
    steps = pd.read_parquet(tmp_path / "metrics.parquet")
    assert [v.hex() for v in steps.train_loss] == ref["train_loss"]
    assert [v.hex() for v in steps.grad_norm] == ref["grad_norm"]
    layers = _layers(tmp_path)  # the quantities recorded then, value for value (monitors added since add rows)
    # a quantity is now written only on the sublayers it exists for (resnorm.runs.quantities): the
    # reference's NaN rows of an attention quantity on an MLP sublayer are no longer written
    want = {k: v for k, v in ref["layers"].items() if _exists(k)}
    assert {k: layers.get(k) for k in want} == want
    if not any(o.startswith("model.z_loss") for o in ref["overrides"]):
        assert [v.hex() for v in steps.val_loss] == ref["val_loss"]
        assert summary["final_val_loss"].hex() == ref["final_val_loss"]
    assert summary["status"] == ref["status"]


@pytest.mark.parametrize("loss, grad, initial, factor, want", [
    (1.0, 1.0, 1.0, 2.0, None),
    (2.0, 1.0, 1.0, 2.0, None),  # exactly the factor: not above it
    (2.01, 1.0, 1.0, 2.0, "loss_factor"),
    (math.nan, 1.0, 1.0, 2.0, "nonfinite_loss"),
    (math.inf, math.nan, 1.0, 2.0, "nonfinite_loss"),  # the loss is checked first
    (1.0, math.inf, 1.0, 2.0, "nonfinite_grad"),
    (100.0, 1.0, 1.0, None, None),  # diverge_factor=null: only non-finite values count
    (math.nan, 1.0, 1.0, None, "nonfinite_loss"),
    (5.0, 1.0, None, 2.0, None),  # the first step has no reference yet
])
def test_divergence_guard(loss, grad, initial, factor, want):
    assert divergence(loss, grad, initial, factor) == want


def test_callbacks_see_every_hook_in_order_and_rows_ride_one_transfer(tmp_path):
    from resnorm.train.callbacks import Callback, default_callbacks

    seen = []

    class Spy(Callback):
        def on_fit_start(self, run):
            seen.append(("start", run.state.step))

        def before_update(self, run, rec, x):
            seen.append(("before", rec.step))
            return run.model.tok_emb.weight.grad.norm().view(1)  # rides the host transfer

        def after_update(self, run, rec):
            seen.append(("after", rec.step))

        def on_step_end(self, run, rec):
            assert len(rec.values[id(self)]) == 1 and math.isfinite(rec.values[id(self)][0])
            seen.append(("end", rec.step, rec.val_loss is not None))

        def on_checkpoint(self, run):
            seen.append(("checkpoint", run.state.step))

        def on_fit_end(self, run, summary):
            seen.append(("fit_end", summary["status"]))

        def teardown(self, run):
            seen.append(("teardown",))

    cfg = compose(*TINY, "depth=1", "train.steps=4", "train.eval_every=2", "train.checkpoint_every=3")
    train(cfg, JobInfo(tmp_path, "r", "g", []), callbacks=lambda run: default_callbacks(run, [Spy()]))
    assert seen[0] == ("start", 0) and seen[-2:] == [("fit_end", "completed"), ("teardown",)]
    assert seen[1:4] == [("before", 0), ("after", 0), ("end", 0, False)]
    assert ("end", 1, True) in seen and ("end", 3, True) in seen and ("checkpoint", 3) in seen


def test_loop_state_is_checkpointed_as_one_record(tmp_path):
    import torch

    from resnorm.train.loop import LoopState

    cfg = compose(*TINY, "depth=1", "train.keep_checkpoint=true")
    summary = train(cfg, JobInfo(tmp_path, "r", "g", []))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    loop = LoopState.from_state_dict(state["loop"])
    assert loop.step == summary["steps_done"] == 6 and loop.status == "completed"
    assert loop.initial_loss == summary["initial_loss"] and len(loop.recent_losses) == 6
    assert set(state["callbacks"]) == {"store"} and len(state["callbacks"]["store"]["steps"]["step"]) == 6


def test_independent_weight_decay_is_decay_over_the_peak_lr():
    from resnorm.train.loop import make_optimizer
    from resnorm.model.transformer import build_model

    cfg = compose(*TINY, "optim.lr=0.01", "optim.weight_decay=1e-4", "optim.weight_decay_coupling=independent")
    opt = make_optimizer(build_model(cfg), cfg.optim)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1e-4 / 0.01)
    coupled = compose(*TINY, "optim.lr=0.01", "optim.weight_decay=1e-4")
    assert make_optimizer(build_model(coupled), coupled.optim).param_groups[0]["weight_decay"] == 1e-4


def test_streams_registry_matches_the_variants():
    from resnorm.model.transformer import STREAMS
    from resnorm.config.variants import STREAMS as NAMES, VARIANTS

    assert tuple(STREAMS) == NAMES
    assert {v.stream for v in VARIANTS.values()} <= set(STREAMS)


def test_experiment_runs_are_ordinary_run_folders_of_the_shared_loop(tmp_path):
    """A reproduction's run trains through fit: its folder is a run folder named by the run
    identity of the config run.py would use, with the final read-outs in its summary."""
    from experiments.training import DEFAULTS, _train, overrides
    from resnorm.runs.identity import run_id

    spec = {**DEFAULTS, "depth": 1, "steps": 5, "d_model": 16, "d_ff": 32, "batch": 4, "seq_len": 16,
            "synthetic_tokens": 4000, "lr": 3e-3}
    rec = _train(spec, str(tmp_path))
    cfg = compose(*overrides(spec))
    folder = tmp_path / run_id(cfg)
    summary = json.loads((folder / "summary.json").read_text())
    assert rec["run_id"] == summary["run_id"] == run_id(cfg) and summary["status"] == "completed"
    assert rec["final_eval_loss"] == summary["final_val_loss"] and summary["steps_done"] == 5
    assert summary["config"]["optim"]["weight_decay_coupling"] == "independent"
    assert summary["config"]["train"]["diverge_factor"] is None
    assert math.isfinite(summary["final_max_attn_logit"]) and math.isfinite(summary["final_mean_log_z"])
    assert _train(spec, str(tmp_path)) == rec  # finished: read back, not trained again


def test_a_nonfinite_gradient_is_named_while_the_gradients_are_there(tmp_path):
    """The guard fires on the gradient norm before clipping and the optimizer step; the reason names
    the first parameter whose gradient is non-finite (read before the gradients are zeroed)."""
    from resnorm.train.callbacks import Callback, default_callbacks

    class PoisonGradient(Callback):
        def on_fit_start(self, run):
            w = run.model.blocks[0].mlp.branch.fc2.weight
            w.register_hook(lambda g: g * float("inf") if run.state.step == 2 else g)

    cfg = compose(*TINY, "depth=1")
    summary = train(cfg, JobInfo(tmp_path, "r", "g", []),
                    callbacks=lambda run: default_callbacks(run, [PoisonGradient()]))
    assert summary["status"] == "diverged" and summary["diverged_step"] == 2
    assert "non-finite gradient norm" in summary["diverge_reason"]
    assert "blocks.0.mlp.branch.fc2.weight" in summary["diverge_reason"], summary["diverge_reason"]
