"""Config validation: bad values stop before training, with one line naming key, value and choices."""

from __future__ import annotations

import pytest

from conftest import compose, run_cli
from resnorm.config import validate
from resnorm.errors import ConfigError
from resnorm.variants import VARIANTS

NO_ANALYSIS = "~hydra.callbacks.analysis"


@pytest.mark.parametrize("override,key,hint", [
    ("depth=0", "depth", "positive integer"),
    ("model.norm=postln", "model.norm", ", ".join(VARIANTS)),
    ("optim.lr=-0.001", "optim.lr", "positive number"),
    ("model.n_heads=3", "model.n_heads", "must divide model.d_model=64"),
    ("model.norm_layer=batchnorm", "model.norm_layer", "layernorm, rmsnorm"),
    ("model.init=kaiming", "model.init", "xavier, gpt2"),
    ("optim.schedule=linear", "optim.schedule", "cosine, constant"),
    ("train.diverge_factor=0.5", "train.diverge_factor", "must be > 1"),
    ("logger.mode=cloud", "logger.mode", "offline, online, disabled"),
    ("train.device=tpu", "train.device", "auto, cpu, cuda or cuda:N"),
])
def test_bad_values_name_key_value_and_choices(override, key, hint):
    with pytest.raises(ConfigError) as err:
        validate(compose(override))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{key}=") and hint in message
    assert override.split("=", 1)[1] in message


def test_default_config_is_valid():
    validate(compose())
    for name in VARIANTS:
        validate(compose(f"model.norm={name}"))


def test_text_data_needs_an_existing_nonempty_file(tmp_path):
    with pytest.raises(ConfigError, match="data.path=.*no such file"):
        validate(compose("data=text", f"data.path={tmp_path / 'missing.txt'}"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        validate(compose("data=text", f"data.path={empty}"))


def test_cli_single_run_bad_value_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("depth=0", NO_ANALYSIS, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["config error: depth=0 is invalid: must be a positive integer"]
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("summary.json"))


def test_cli_multirun_validates_every_job_before_any_runs(tmp_path):
    proc = run_cli("-m", "depth=1,2", "model.norm=pre,nope", "name=bad", NO_ANALYSIS, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: model.norm='nope' is invalid: choose one of")
    assert "(job: " in lines[0]
    assert not list(tmp_path.rglob("summary.json")), "a job trained although the sweep was invalid"


def test_cli_typo_in_a_key_is_rejected_by_the_schema(tmp_path):
    proc = run_cli("model.nrom=pre", NO_ANALYSIS, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "model.nrom" in proc.stderr and "not in 'ModelConfig'" in proc.stderr
