"""Shared fixtures: composed configs (the real conf/ tree), tiny sizes, the repo's paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def compose(*overrides: str):
    """:func:`resnorm.config.compose.compose` with the overrides as arguments (the config a user's command
    line would give)."""
    from resnorm.config.compose import compose as config_compose

    return config_compose(overrides)


TINY = ("model.d_model=16", "model.n_heads=2", "train.seq_len=16", "train.batch_size=4",
        "train.steps=6", "train.eval_every=3", "train.eval_batches=2", "train.progress=false",
        "data=synthetic", "data.synthetic_tokens=4000", "logger.mode=disabled")


def run_cli(*args: str, cwd: Path, timeout: int = 600, env_extra=None) -> subprocess.CompletedProcess:
    """Run ``python run.py ARGS`` the way a user does, from ``cwd``; outputs land under ``cwd``."""
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run([PYTHON, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


class Interrupt(BaseException):
    """Stands for a kill in the middle of a step (not an Exception: run_job must not record it)."""


def interrupt_at(monkeypatch, step: int) -> None:
    """Make the training loop raise :class:`Interrupt` when it reaches ``step`` (undo with monkeypatch.undo())."""
    import resnorm.train.loop as rt

    original = rt.lr_at

    def lr_at(s, *args):
        if s == step:
            raise Interrupt(f"interrupted at step {s}")
        return original(s, *args)

    monkeypatch.setattr(rt, "lr_at", lr_at)


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after (use with pytest.mark.usefixtures)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    return TINY
