"""The checks of a config: each leaf against the schema (:func:`check_leaf`), then the rules that
involve more than one key and need nothing but the config and the variant registry (:data:`RULES`).

Every check raises :class:`resnorm.errors.ConfigError`: one line naming the key, the bad value and what
is allowed. The checks that read the data (:mod:`resnorm.data.checks`) or this machine
(:mod:`resnorm.train.preflight`) join these in :func:`resnorm.train.preflight.validate`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from resnorm.config.schema import Leaf, check_known_keys, leaf, leaves, reader
from resnorm.config.variants import ADMIN_MODES, NORM_LAYERS, VARIANTS
from resnorm.errors import ConfigError

#: the keys whose choices are a registry's names (read when checked)
REGISTRY_CHOICES: Dict[str, Callable[[], Tuple[str, ...]]] = {
    "model.norm": lambda: tuple(VARIANTS),
    "model.norm_layer": lambda: tuple(NORM_LAYERS),
    "model.admin_mode": lambda: tuple(ADMIN_MODES),
}


def allowed(lf: Leaf) -> Optional[Tuple[Any, ...]]:
    """The values allowed at a leaf: its declared choices or its registry's names; None if any value
    of its type will do."""
    if lf.key in REGISTRY_CHOICES:
        return REGISTRY_CHOICES[lf.key]()
    return lf.choices


def _type_reason(lf: Leaf, value: Any) -> Optional[str]:
    """Why ``value`` is not of the leaf's type (None if it is)."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    rng = lf.meta.get("range")
    if lf.kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if lf.kind is int and not (numeric and isinstance(value, int)):
        return rng.reason(integer=True) if rng else "must be an integer"
    if lf.kind is float and not numeric:
        return rng.reason(integer=False) if rng else "must be a number"
    if lf.kind is str and not isinstance(value, str):
        return "must be a string"
    return None


def _value_reason(lf: Leaf, value: Any) -> Optional[str]:
    """Why ``value`` (of the right type) is not allowed: not finite, out of range, not a choice, no match."""
    rng, note = lf.meta.get("range"), lf.meta.get("note")
    suffix = f" ({note})" if note else ""
    if lf.kind is float and not math.isfinite(value):
        return f"must be a finite number{' ' + rng.relation() if rng else ''}{suffix}"
    if rng is not None and value not in rng:
        return rng.reason(integer=lf.kind is int) + suffix
    choices = allowed(lf)
    if choices is not None and value not in choices:
        return f"choose one of {', '.join(map(str, choices))}"
    if "pattern" in lf.meta:
        regex, reason = lf.meta["pattern"]
        if not re.fullmatch(regex, value):
            return reason
    return None


def check_leaf(lf: Leaf, value: Any) -> None:
    """Raise ConfigError if ``value`` is not allowed at ``lf`` (type, null, finiteness, range, choices, pattern)."""
    if value is None:
        if not lf.nullable:
            raise ConfigError(lf.key, value, "must be set (null is not allowed)")
        return
    reason = _type_reason(lf, value) or _value_reason(lf, value)
    if reason:
        raise ConfigError(lf.key, value, reason)


def heads_divide_width(get: Callable[[str], Any]) -> None:
    """model.n_heads divides model.d_model (each head gets d_model / n_heads channels)."""
    if get("model.d_model") % get("model.n_heads"):
        raise ConfigError("model.n_heads", get("model.n_heads"), f"must divide model.d_model={get('model.d_model')}")


def norm_layer_needs_norms(get: Callable[[str], Any]) -> None:
    """A model.norm_layer override needs a variant with norm slots to put it in."""
    layer, variant = get("model.norm_layer"), VARIANTS[get("model.norm")]
    if layer is not None and not variant.has_norm:
        raise ConfigError("model.norm_layer", layer,
                          f"model.norm={variant.name} has no norm to replace; leave model.norm_layer "
                          f"unset (null), or pick a variant with norms")


def variant_optim_preset(get: Callable[[str], Any]) -> None:
    """A variant's optimizer preset (``Variant.optim_preset``; nGPT: no warm-up, no weight decay) replaces
    the schema default of its keys (resnorm.train.variant_optim.apply_preset); any other explicit value is an error."""
    variant = VARIANTS[get("model.norm")]
    for name, value in variant.optim_preset:
        given = get(f"optim.{name}")
        if given != value and given != leaf(f"optim.{name}").default:
            raise ConfigError(f"optim.{name}", given, f"model.norm={variant.name} trains with optim.{name}={value} "
                                                      f"(its paper's recipe); leave it unset or set {value}")


def synthetic_vocab_fits_vocab(get: Callable[[str], Any]) -> None:
    """data=synthetic: its symbols are tokens of the model's vocabulary."""
    voc, size = get("data.synthetic_vocab"), get("model.vocab_size")
    if get("data.name") == "synthetic" and voc > size:
        raise ConfigError("data.synthetic_vocab", voc, f"must lie in [2, model.vocab_size={size}]")


def devices_divide_batch(get: Callable[[str], Any]) -> None:
    """train.devices divides train.batch_size (the global batch is split evenly)."""
    if get("train.batch_size") % get("train.devices"):
        raise ConfigError("train.devices", get("train.devices"),
                          f"must divide train.batch_size={get('train.batch_size')} (the global batch)")


#: the data sets whose tokens are bytes (ids 0-255); data=hf too with data.tokenizer=bytes
BYTE_DATASETS = ("shakespeare", "text")


def byte_data_needs_byte_vocab(get: Callable[[str], Any]) -> None:
    """Byte data (shakespeare, text; hf with bytes) has token ids up to 255: the vocabulary must hold them."""
    name, size = get("data.name"), get("model.vocab_size")
    byte_hf = name == "hf" and get("data.tokenizer") == "bytes"
    if (name in BYTE_DATASETS or byte_hf) and size < 256:
        raise ConfigError("model.vocab_size", size, f"data={name} is bytes (token ids 0-255): must be >= 256")


def grad_accum_splits_batch(get: Callable[[str], Any]) -> None:
    """train.grad_accum divides each process's share of the global batch into equal micro-batches."""
    n, share = get("train.grad_accum"), get("train.batch_size") // get("train.devices")
    if share % n:
        per = "" if get("train.devices") == 1 else f" / train.devices={get('train.devices')}"
        raise ConfigError("train.grad_accum", n, f"must divide train.batch_size={get('train.batch_size')}{per} = "
                                                 f"{share} sequences into equal micro-batches")


def sgd_nesterov_needs_momentum(get: Callable[[str], Any]) -> None:
    """Nesterov momentum is a kind of momentum: optim=sgd optim.sgd_nesterov=true needs sgd_momentum > 0."""
    if get("optim.name") == "sgd" and get("optim.sgd_nesterov") and get("optim.sgd_momentum") == 0:
        raise ConfigError("optim.sgd_nesterov", True, "needs optim.sgd_momentum > 0 (it is 0)")
def finetune_needs_a_run(get: Callable[[str], Any]) -> None:
    """finetune.task names a task and finetune.init_from the run folder it fine-tunes (both or neither)."""
    task, source = get("finetune.task"), get("finetune.init_from")
    if task is not None and not source:
        raise ConfigError("finetune.init_from", source, "finetune.task needs the pre-trained run folder it starts "
                                                        "from (python -m resnorm.finetune sets both)")
    if source is not None and task is None:
        raise ConfigError("finetune.task", task, "finetune.init_from needs a task (resnorm.tasks.labelled.BUILTIN_TASKS or a file)")
    if source is not None and not (Path(source).expanduser() / "checkpoint.pt").is_file():
        raise ConfigError("finetune.init_from", source, "has no checkpoint.pt: pre-train it with "
                                                        "train.keep_checkpoint=true")


def check_leaves(cfg: Any) -> Callable[[str], Any]:
    """No key outside the schema, and every leaf of the schema allowed (ConfigError on the first problem);
    returns the config's reader (:func:`resnorm.config.schema.reader`) for the rules."""
    check_known_keys(cfg)
    get = reader(cfg)
    for lf in leaves():
        check_leaf(lf, get(lf.key))
    return get


def validate(cfg: Any) -> None:
    """Check a config's keys and values against the schema and the config-only rules (:data:`RULES`).
    A job's full check, with its data and this machine, is :func:`resnorm.train.preflight.validate`."""
    get = check_leaves(cfg)
    for rule in RULES:
        rule(get)



#: the checks that involve more than one key and read only the config, run after every leaf passed
#: (:func:`resnorm.train.preflight.validate` interleaves them with the data checks in its own order)
RULES: Tuple[Callable[[Callable[[str], Any]], None], ...] = (
    heads_divide_width, norm_layer_needs_norms, variant_optim_preset, synthetic_vocab_fits_vocab,
    byte_data_needs_byte_vocab, devices_divide_batch, grad_accum_splits_batch, sgd_nesterov_needs_momentum,
    finetune_needs_a_run)
