"""Config validation: bad values stop before training, with one line naming key, value and choices."""

from __future__ import annotations

import sys
from dataclasses import fields

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose, run_cli
from resnorm.config.compose import override
from resnorm.config.rules import allowed, check_leaf
from resnorm.config.schema import METADATA_KEYS, Config, ModelConfig, leaf, leaves
from resnorm.train.preflight import CHECKS, HOST_RULES, validate
from resnorm.config.compose import compose as config_compose
from resnorm.errors import ConfigError
from resnorm.config.variants import VARIANTS
from resnorm.config.variants import VariantOptions

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
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["config error: model.nrom='pre' is invalid: no such key: nothing in "
                                                "resnorm reads it; did you mean model.norm? (keys: docs/configuration.md)"]


# --- the schema is the one source: the leaf loop, the rules, the copies that must agree -------------

FLOAT_KEYS = [lf.key for lf in leaves() if lf.kind is float]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_rejects_non_finite_numbers(key, value):
    with pytest.raises(ConfigError) as err:
        validate(compose(f"{key}={value}"))
    assert str(err.value).startswith(f"{key}={value} is invalid: must be a finite number")


def test_schema_has_float_keys_and_optional_ones():
    # the parametrization above is found from the schema: make sure it found what it should
    assert {"optim.lr", "optim.grad_clip", "train.diverge_factor", "model.z_loss"} <= set(FLOAT_KEYS)


def test_nan_learning_rate_message():
    with pytest.raises(ConfigError, match=r"^optim\.lr=nan is invalid: must be a finite number > 0$"):
        validate(compose("optim.lr=nan"))


def test_every_leaf_has_help_and_known_metadata():
    for lf in leaves():
        assert lf.meta.get("help"), f"{lf.key}: no help"
        assert set(lf.meta) <= set(METADATA_KEYS), lf.key
        check_leaf(lf, lf.default)  # every default passes its own checks


def test_yaml_adds_no_defaults_of_its_own():
    composed, schema = compose(), OmegaConf.structured(Config)
    assert OmegaConf.to_container(composed) == OmegaConf.to_container(schema)
    for lf in leaves():  # leaf by leaf, for a readable failure
        assert OmegaConf.select(composed, lf.key) == lf.default, lf.key


@pytest.mark.parametrize("group", ["model", "data", "optim", "train", "logger"])
def test_group_options_set_only_their_choice(group):
    """Each option file of a group changes nothing but what it chooses (data.name for the data group,
    optim.name for the optim group)."""
    schema = OmegaConf.structured(Config)
    for option in sorted((ROOT / "conf" / group).glob("*.yaml")):
        cfg = compose(f"{group}={option.stem}")
        changed = {lf.key for lf in leaves() if OmegaConf.select(cfg, lf.key) != OmegaConf.select(schema, lf.key)}
        assert changed <= {"data.name", "optim.name"}, (option.name, changed)


def test_choices_equal_their_registries():
    import resnorm.data.corpora
    import resnorm.model.initialization
    import resnorm.model.transformer
    import resnorm.model.norms

    assert allowed(leaf("model.norm")) == tuple(VARIANTS)
    assert allowed(leaf("model.norm_layer")) == tuple(resnorm.model.norms.NORM_FACTORIES)
    assert leaf("model.init").choices == tuple(resnorm.model.initialization.INIT_SCHEMES)
    assert leaf("model.activation").choices == tuple(resnorm.model.blocks.ACTIVATIONS)
    assert leaf("data.name").choices == tuple(resnorm.data.corpora.DATASETS)


def test_variant_options_are_the_model_fields_marked_variant_option():
    marked = [f for f in fields(ModelConfig) if f.metadata.get("variant_option")]
    options = fields(VariantOptions)
    assert [f.name for f in options] == [f.name for f in marked]
    assert [(f.default, f.type) for f in options] == [(f.default, f.type) for f in marked]
    assert VariantOptions() == VariantOptions.from_config(ModelConfig())
    assert VariantOptions.from_config({}) == VariantOptions()


#: one failing case per cross-field rule: overrides ({tmp} is a fresh folder), key, hint[, packages the
#: case runs without (import blocked as for an absent package)]
RULE_CASES = {
    "heads_divide_width": (["model.n_heads=3"], "model.n_heads", "must divide model.d_model=64"),
    "norm_layer_needs_norms": (["model.norm=rezero", "model.norm_layer=rmsnorm"], "model.norm_layer",
                               "has no norm to replace"),
    "text_data_needs_a_file": (["data=text", "data.path={tmp}"], "data.path", "a directory, not a file"),
    "synthetic_vocab_fits_vocab": (["data=synthetic", "data.synthetic_vocab=100", "model.vocab_size=64"],
                                   "data.synthetic_vocab", "must lie in [2, model.vocab_size=64]"),
    "devices_divide_batch": (["train.devices=3"], "train.devices", "must divide train.batch_size=16"),
    "byte_data_needs_byte_vocab": (["model.vocab_size=64"], "model.vocab_size",
                                   "data=shakespeare is bytes (token ids 0-255): must be >= 256"),
    "sequence_fits_corpus": (["data=synthetic", "data.synthetic_tokens=100", "train.seq_len=64"], "train.seq_len",
                             "fewer than one sequence of seq_len + 1 = 65; lower train.seq_len or use a larger corpus"),
    "device_is_present": (["train.device=cuda:7"], "train.device", "GPU"),
    "variant_optim_preset": (["model.norm=ngpt", "optim.warmup_steps=50"], "optim.warmup_steps",
                             "model.norm=ngpt trains with optim.warmup_steps=0"),  # a variant's optimizer preset
    # --- the training recipe ---
    "grad_accum_splits_batch": (["train.grad_accum=3"], "train.grad_accum",
                                "must divide train.batch_size=16 = 16 sequences into equal micro-batches"),
    "sgd_nesterov_needs_momentum": (["optim=sgd", "optim.sgd_nesterov=true", "optim.sgd_momentum=0"],
                                    "optim.sgd_nesterov", "needs optim.sgd_momentum > 0"),
    "tensorboard_is_installed": (["logger.tensorboard=true"], "logger.tensorboard", "needs the package tensorboard",
                                 ("tensorboard",)),
    "hf_data_is_on_this_machine": (["data=hf", "data.path={tmp}/missing"], "data.path", "no such file or folder"),
    "tokenizer_fits_data": (["data.tokenizer=bpe"], "data.tokenizer", "needs data=hf"),
    "finetune_needs_a_run": (["finetune.task=play_genre", "finetune.init_from={tmp}"], "finetune.init_from",
                             "has no checkpoint.pt: pre-train it with train.keep_checkpoint=true"),  # fine-tuning
}


def test_every_rule_has_a_case():
    assert set(RULE_CASES) == {rule.__name__ for rule in CHECKS + HOST_RULES}


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_cross_field_rule(name, tmp_path, monkeypatch):
    overrides, key, hint, *hidden = RULE_CASES[name]
    for package in hidden[0] if hidden else ():
        monkeypatch.setitem(sys.modules, package, None)  # importlib.util.find_spec then finds nothing
    with pytest.raises(ConfigError) as err:
        validate(compose(*(o.format(tmp=tmp_path) for o in overrides)))
    assert str(err.value).startswith(f"{key}=") and hint in str(err.value)


def test_rules_apply_only_where_they_matter(tmp_path):
    validate(compose("data.synthetic_vocab=300", "model.vocab_size=256"))  # not data=synthetic
    validate(compose("model.norm=rezero"))
    with pytest.raises(ConfigError, match="data=text needs data.path=FILE"):
        validate(compose("data=text"))


def test_new_keys():
    validate(compose("optim.weight_decay_coupling=independent", "train.diverge_factor=null"))
    with pytest.raises(ConfigError, match=r"optim.weight_decay_coupling='decoupled' .*choose one of lr, independent"):
        validate(compose("optim.weight_decay_coupling=decoupled"))
    with pytest.raises(ConfigError, match=r"train.diverge_factor=1.0 is invalid: must be > 1"):
        validate(compose("train.diverge_factor=1"))


def test_validate_takes_a_dataclass_or_a_nested_dict_with_absent_keys():
    validate(Config())
    validate({})  # every key absent: the schema's defaults
    validate({"model": {"norm": "post"}, "optim": {"lr": 3e-3}})
    # a DictConfig is read leaf by leaf: Hydra's node (resolvers unknown here) is never resolved
    validate(OmegaConf.create({"hydra": {"dir": "${now:%Y}", "id": "${run_id:}"}, "depth": 2}))
    for bad, message in [({"depth": "6"}, "depth='6' is invalid: must be a positive integer"),
                         ({"model": {"qk_norm": 1}}, "model.qk_norm=1 is invalid: must be true or false"),
                         ({"train": {"threads": 1.5}}, "train.threads=1.5 is invalid: must be a positive integer"),
                         ({"optim": {"lr": float("nan")}}, "optim.lr=nan is invalid: must be a finite number > 0"),
                         ({"name": None}, "name=None is invalid: must be set (null is not allowed)")]:
        with pytest.raises(ConfigError) as err:
            validate(bad)
        assert str(err.value) == message


# --- compose: the one config builder ----------------------------------------------------------------

EQUIVALENCE = [
    (),
    ("model.norm=b2t", "depth=3", "model.d_model=16", "model.norm_layer=dyt", "data=synthetic",
     "model.b2t_rescale_init=true", "model.mixln_fraction=0.5", "train.seq_len=8"),
    ("data=text", "data.path='/tmp/a b.txt'", "optim.lr=nan", "model.d_ff=null", "name=x"),
    ("~hydra.callbacks.analysis", "train.threads=1", "logger=wandb", "+sweep=depth_lr_grid"),
]


@pytest.mark.parametrize("overrides", EQUIVALENCE)
def test_compose_is_hydras_compose(overrides):
    from resnorm.config.compose import _hydra_compose

    ours, hydras = config_compose(overrides), _hydra_compose(tuple(overrides))
    assert OmegaConf.to_yaml(ours) == OmegaConf.to_yaml(hydras)  # as text: nan == nan, key order counts
    assert OmegaConf.is_struct(ours) and OmegaConf.is_struct(hydras)


@pytest.mark.parametrize("overrides", [("model.nrom=pre",), ("model.mixln_fraction=quarter",), ("data=nope",),
                                       ("depth=1,2",), ("+depth=3",)])
def test_compose_fails_as_hydra_does(overrides):
    from resnorm.config.compose import _hydra_compose

    with pytest.raises(Exception) as ours:
        config_compose(overrides)
    with pytest.raises(Exception) as hydras:
        _hydra_compose(tuple(overrides))
    assert type(ours.value) is type(hydras.value) and str(ours.value) == str(hydras.value)


def test_compose_works_from_any_directory_and_leaves_hydra_as_it_was(tmp_path, monkeypatch):
    from hydra.core.global_hydra import GlobalHydra

    from resnorm.config.compose import _base

    monkeypatch.chdir(tmp_path)
    _base.cache_clear()
    cfg = config_compose(["data=synthetic", "depth=2"])
    validate(cfg)
    assert cfg.data.name == "synthetic" and cfg.depth == 2
    assert not GlobalHydra.instance().is_initialized()
    cfg.depth = 5  # every call gets its own copy
    assert config_compose(["data=synthetic"]).depth == 6
    with pytest.raises(ConfigError, match="depth=0"):
        validate(config_compose(["depth=0"]))


def test_override_round_trips_values():
    values = {"model.norm": "post", "data.path": "/tmp/it's a\\file\\", "model.d_ff": None,
              "model.b2t_rescale_init": True, "optim.lr": 1e-05, "depth": 3, "name": "1"}
    cfg = config_compose([override(k, v) for k, v in values.items()])
    assert {k: OmegaConf.select(cfg, k) for k in values} == values


def test_cli_sweep_with_a_nan_job_fails_before_any_job_runs(tmp_path):
    proc = run_cli("-m", "optim.lr=1e-3,nan", "name=nan", "hydra.sweeper.order=given", NO_ANALYSIS,
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == ["config error: optim.lr=nan is invalid: must be a finite number > 0 (job: optim.lr=nan name=nan)"]
    assert not list(tmp_path.rglob("summary.json")), "a job trained although the sweep was invalid"
