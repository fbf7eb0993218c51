"""A job's full check before it trains: the schema and the config rules (:mod:`resnorm.config.rules`),
the data it names (:mod:`resnorm.data.checks`) and, where the job trains on this machine, the machine
(:data:`HOST_RULES`). Used by the entry point, the sweeper (every job, before anything is launched),
Hydra's task function and the fine-tunes. Imports no torch at module level."""

from __future__ import annotations

from typing import Any, Callable, Tuple

from resnorm.config import rules as config_rules
from resnorm.data import checks as data_checks
from resnorm.errors import ConfigError


def device_is_present(get: Callable[[str], Any]) -> None:
    """train.device=cuda or cuda:N names GPUs this machine has (train.devices of them from N on)."""
    name, n = get("train.device"), get("train.devices")
    if not name.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError("train.device", name, "this machine has no CUDA GPU: use train.device=auto or cpu")
    first = int(name.split(":")[1]) if ":" in name else 0
    if first + n > count:
        raise ConfigError("train.device", name, f"this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
                          + (f" (train.devices={n} from cuda:{first} needs {first + n})" if n > 1 else ""))


def tensorboard_is_installed(get: Callable[[str], Any]) -> None:
    """logger.tensorboard=true writes through torch.utils.tensorboard, which needs the tensorboard package."""
    import importlib.util

    if get("logger.tensorboard") and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logger.tensorboard", True, "needs the package tensorboard==2.21.0 (pip install "
                                                      "tensorboard==2.21.0, scripts/setup.sh), or leave it false")


Rule = Callable[[Callable[[str], Any]], None]

#: every check that involves more than one key, in the order they run (the first problem is reported)
CHECKS: Tuple[Rule, ...] = (
    config_rules.heads_divide_width, config_rules.norm_layer_needs_norms, config_rules.variant_optim_preset,
    data_checks.text_data_needs_a_file, config_rules.synthetic_vocab_fits_vocab,
    config_rules.byte_data_needs_byte_vocab, data_checks.hf_data_is_on_this_machine,
    data_checks.tokenizer_fits_data, data_checks.sequence_fits_corpus, config_rules.devices_divide_batch,
    config_rules.grad_accum_splits_batch, config_rules.sgd_nesterov_needs_momentum, config_rules.finetune_needs_a_run)
#: the checks that hold only on the machine the job trains on (skipped where jobs run elsewhere: SLURM, Ray)
HOST_RULES: Tuple[Rule, ...] = (device_is_present, tensorboard_is_installed)


def validate(cfg: Any, host: bool = True) -> None:
    """Check a job's config (DictConfig, dataclass or nested dict; an absent key takes its schema default):
    no key outside the schema, every leaf, then every check of :data:`CHECKS` and, with ``host`` (the job
    trains on this machine), :data:`HOST_RULES`. Raises ConfigError on the first problem."""
    get = config_rules.check_leaves(cfg)
    for rule in CHECKS + (HOST_RULES if host else ()):
        rule(get)
