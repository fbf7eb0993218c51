"""Training loop, probes, divergence guard, run store, data and W&B, on tiny sizes."""

from __future__ import annotations

import json
import os
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import TINY, compose
from resnorm.data.corpora import fixed_batches, load_data, shakespeare_files
from resnorm.train.guard import first_nonfinite
from resnorm.errors import DataError
from resnorm.model.transformer import build_model
from resnorm.monitors.probes import GradNormProbe
from resnorm.train.loop import lr_at
from resnorm.train.job import JobInfo, train


def job(tmp_path: Path, name: str = "run") -> JobInfo:
    return JobInfo(run_dir=tmp_path / name, run_name=name, group="test", overrides=[])


def test_same_seed_same_losses_twice(tmp_path):
    cfg = compose(*TINY, "model.norm=post", "depth=3")
    a = train(cfg, job(tmp_path, "a"))
    b = train(cfg, job(tmp_path, "b"))
    la = pd.read_parquet(tmp_path / "a" / "metrics.parquet")
    lb = pd.read_parquet(tmp_path / "b" / "metrics.parquet")
    assert la["train_loss"].tolist() == lb["train_loss"].tolist()
    assert la["val_loss"].dropna().tolist() == lb["val_loss"].dropna().tolist()
    assert a["final_val_loss"] == b["final_val_loss"]
    c = train(compose(*TINY, "model.norm=post", "depth=3", "seed=1"), job(tmp_path, "c"))
    assert c["initial_loss"] != a["initial_loss"]


def test_run_folder_contents(tmp_path):
    cfg = compose(*TINY, "depth=2")
    summary = train(cfg, job(tmp_path))
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("status", "diverged_step", "final_train_loss", "final_val_loss", "best_val_loss",
                "tokens_per_s", "wall_s", "torch_version", "git_commit", "config", "n_params"):
        assert key in on_disk, key
    assert on_disk["status"] == "completed" and summary["steps_done"] == 6
    assert on_disk["config"]["model"]["norm"] == "pre" and on_disk["config"]["depth"] == 2
    assert on_disk["best_val_loss"] <= on_disk["final_val_loss"]
    steps = pd.read_parquet(run / "metrics.parquet")
    assert steps["step"].tolist() == list(range(6))
    assert steps["val_loss"].notna().tolist() == [False, False, True, False, False, True]
    layers = pd.read_parquet(run / "layers.parquet")
    assert set(layers.columns) == {"step", "layer", "sublayer", "quantity", "value"}
    layers = layers[layers["quantity"] == "grad_norm"]  # the activation probes are tested in test_measure.py
    assert len(layers) == 6 * 2 * 2  # steps x layers x sublayers
    assert set(layers["sublayer"]) == {"attn", "mlp"} and (layers["value"] > 0).all()
    assert not list(run.glob(".*.tmp*")), "temporary files left behind"


def test_loss_goes_down_on_synthetic_data(tmp_path):
    cfg = compose(*TINY, "depth=2", "train.steps=60", "train.eval_every=30", "optim.lr=1e-2")
    summary = train(cfg, job(tmp_path))
    assert summary["status"] == "completed"
    assert summary["final_train_loss"] < summary["initial_loss"] - 1.0


def test_huge_learning_rate_is_diverged_with_step_and_reason(tmp_path):
    cfg = compose(*TINY, "model.norm=post", "depth=2", "optim.lr=1e4", "optim.warmup_steps=0",
                  "train.steps=20")
    summary = train(cfg, job(tmp_path))
    assert summary["status"] == "diverged"
    assert 0 < summary["diverged_step"] < 20
    assert summary["diverge_reason"]
    steps = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert steps["step"].max() == summary["diverged_step"]


def test_grad_norm_probe_matches_per_parameter_norms():
    cfg = compose(*TINY, "depth=3")
    model = build_model(cfg)
    x = torch.randint(256, (2, 16))
    model.loss(x, x).backward()
    stats = GradNormProbe(model).before_update()
    total = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
    assert stats[0].item() == pytest.approx(total, rel=1e-5)
    for i, (layer, sub) in enumerate(GradNormProbe(model).labels):
        module = getattr(model.blocks[layer], sub)
        want = math.sqrt(sum(p.grad.pow(2).sum().item() for p in module.parameters()))
        assert stats[1 + i].item() == pytest.approx(want, rel=1e-5), (layer, sub)


def test_first_nonfinite_names_the_module():
    cfg = compose(*TINY, "depth=3")
    model = build_model(cfg)
    with torch.no_grad():
        model.blocks[1].mlp.branch.fc1.weight[0, 0] = float("inf")
    x = torch.randint(256, (2, 16))
    assert "blocks.1.mlp.branch.fc1" in first_nonfinite(model, x)


def test_lr_schedule_warmup_then_cosine_or_constant():
    cfg = compose("optim.lr=1.0", "optim.warmup_steps=4", "optim.min_lr_ratio=0.1")
    assert [lr_at(s, cfg.optim, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg.optim, 104) == pytest.approx(1.0)
    assert lr_at(103, cfg.optim, 104) == pytest.approx(0.1)
    assert lr_at(54, cfg.optim, 105) == pytest.approx(0.55)
    const = compose("optim.lr=1.0", "optim.warmup_steps=0", "optim.schedule=constant")
    assert {lr_at(s, const.optim, 50) for s in range(50)} == {1.0}


def test_text_data_is_read_as_bytes_and_split(tmp_path):
    text = "To be, or not to be: that is the question. " * 40
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    cfg = compose("data=text", f"data.path={path}", "data.val_fraction=0.25")
    data = load_data(cfg.data, seq_len=16)
    raw = torch.tensor(list(text.encode()), dtype=torch.uint8)
    assert torch.equal(torch.cat([data.train, data.val]), raw)
    assert len(data.val) == int(len(raw) * 0.25)
    (x, y), = fixed_batches(data.val, 1, 2, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_empty_or_tiny_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = compose("data=text", f"data.path={empty}")
    with pytest.raises(DataError, match="empty"):
        load_data(cfg.data, seq_len=16)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc")
    with pytest.raises(DataError, match="fewer than one sequence"):
        load_data(compose("data=text", f"data.path={tiny}").data, seq_len=16)


def test_shakespeare_comes_from_the_installed_package():
    files = shakespeare_files()
    assert len(files) >= 30 and all(f.name.endswith("_gut.txt") for f in files)
    data = load_data(compose().data, seq_len=64)
    assert len(data.train) > 4_000_000 and len(data.val) > 400_000
    assert b"Hamlet" in bytes(data.train[:5_000_000].tolist()) or b"HAMLET" in bytes(data.train.tolist())


def test_synthetic_stream_is_seeded_and_copies():
    cfg = compose("data=synthetic", "data.synthetic_tokens=2000")
    a, b = load_data(cfg.data, 32, seed=0), load_data(cfg.data, 32, seed=0)
    assert torch.equal(a.train, b.train)
    assert not torch.equal(a.train, load_data(cfg.data, 32, seed=1).train)
    seg = a.train[:32]
    assert torch.equal(seg[:16], seg[16:]) and int(a.train.max()) < 64


def test_wandb_offline_round_trip(tmp_path):
    from wandb_records import read_run

    cfg = compose(*TINY, "depth=2", "logger.mode=offline", "name=wbtest")
    summary = train(cfg, JobInfo(tmp_path / "run", "depth=2,model.norm=pre", "wbtest", ["depth=2"]))
    assert summary["wandb_error"] is None
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    logged = read_run(files[0])
    assert logged["run"].run_group == "wbtest"
    assert logged["run"].display_name == "depth=2,model.norm=pre"
    assert set(logged["run"].tags) == {"pre", "depth=2"}
    assert logged["config"]["model"]["norm"] == "pre" and logged["config"]["depth"] == 2
    losses = [h["train/loss"] for h in logged["history"]]
    stored = pd.read_parquet(tmp_path / "run" / "metrics.parquet")["train_loss"].tolist()
    assert losses == pytest.approx(stored)
    assert "grad_norm/attn/000" in logged["history"][0] and "grad_norm/mlp/001" in logged["history"][0]
    assert [h["val/loss"] for h in logged["history"] if "val/loss" in h] == pytest.approx(
        pd.read_parquet(tmp_path / "run" / "metrics.parquet")["val_loss"].dropna().tolist())
    assert logged["summary"]["status"] == "completed"


def test_empty_wandb_env_variable_is_treated_as_unset(tmp_path, monkeypatch):
    """WANDB_MODE= (set but empty, as job scripts often leave it) made W&B refuse to start."""
    monkeypatch.setenv("WANDB_MODE", "")
    cfg = compose(*TINY, "depth=1", "train.steps=2", "logger.mode=offline")
    summary = train(cfg, job(tmp_path))
    assert summary["wandb_error"] is None
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "WANDB_MODE" not in os.environ


def test_wandb_failure_does_not_stop_training(tmp_path, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise ConnectionError("W&B unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    summary = train(compose(*TINY, "depth=2", "logger.mode=online"), job(tmp_path))
    assert summary["status"] == "completed"
    assert "unreachable" in summary["wandb_error"]
    assert (tmp_path / "run" / "metrics.parquet").exists()
