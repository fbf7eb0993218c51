"""Composing: the config a user's command line gives (Hydra over the repository's ``conf/``, the schema
applied), fast enough to compose every job of a sweep, and Hydra's composition errors in one line."""

from __future__ import annotations

import copy
import functools
import re
from typing import Any, Sequence, Tuple

from resnorm.config.rules import check_leaf
from resnorm.config.schema import CONF_DIR, _leaf_index, leaf, register_schemas, unknown_key_error
from resnorm.errors import ConfigError


def override(dotted: str, value: Any) -> str:
    """The command-line override that sets ``dotted`` to ``value`` (``null``, ``true``, quoted strings)."""
    if value is None:
        return f"{dotted}=null"
    if isinstance(value, bool):
        return f"{dotted}={str(value).lower()}"
    if isinstance(value, str):
        # Hydra's quoted strings: a run of backslashes before a quote or the end is doubled
        escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
        return f"{dotted}='{escaped}'"
    return f"{dotted}={value!r}"


def _hydra_compose(overrides: Tuple[str, ...]):
    """Hydra's compose API over :data:`CONF_DIR` (inside a running Hydra app too: its GlobalHydra is
    put aside and back)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    outer = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return hydra_compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().hydra = outer


@functools.lru_cache(maxsize=32)
def _base(group_overrides: Tuple[str, ...]):
    """Hydra's composition for these group overrides, kept (callers get a deep copy)."""
    return _hydra_compose(group_overrides)


def _is_value_override(o) -> bool:
    """Whether Hydra applies this parsed override to the composed config (``key=value``, ``+key=``,
    ``~key``) rather than to the defaults list (a group choice, ``hydra.*``, a sweep)."""
    name = o.key_or_group
    if o.is_sweep_override() or o.package is not None or name.split(".")[0] == "hydra" or "/" in name:
        return False
    return "." in name or not (CONF_DIR / name).is_dir()


def compose(overrides: Sequence[str] = ()):
    """The DictConfig a user's command line ``python run.py OVERRIDES`` gives (``conf/`` composed by
    Hydra, the schema applied), without the ``hydra`` node; unchecked (a job's check:
    :func:`resnorm.train.preflight.validate`). Works from any current directory (:data:`CONF_DIR`).

    Fast: Hydra composes once per set of group choices (kept), and the value overrides are applied
    to a copy the way Hydra applies them (its own parser and ``_apply_overrides_to_config``), so the
    result and the errors are Hydra's; tests/test_config.py checks it against a plain Hydra compose.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    values = [o for o in parsed if _is_value_override(o)]
    groups = tuple(o.input_line for o in parsed if not _is_value_override(o))
    cfg = copy.deepcopy(_base(groups))
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    return cfg


def group_options(group: str) -> Tuple[str, ...]:
    """The options of a config group of :data:`CONF_DIR` (``data`` -> shakespeare, synthetic, text)."""
    return tuple(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


def explain_override(o, exc: BaseException) -> ConfigError:
    """The one-line ConfigError for Hydra's error ``exc`` on the parsed override ``o``."""
    name = o.key_or_group
    value = o.get_value_element_as_str() if not o.is_sweep_override() else o.input_line.split("=", 1)[-1]
    if _is_value_override(o) and name not in _leaf_index():
        return unknown_key_error(name, value)
    if name in _leaf_index():
        parsed = value if o.is_sweep_override() else o.value()
        try:
            check_leaf(leaf(name), parsed)
        except ConfigError as err:
            return err
        return ConfigError(name, value, str(exc).strip().splitlines()[0])
    if (CONF_DIR / name).is_dir():
        return ConfigError(name, value, f"choose one of {', '.join(group_options(name))}")
    return ConfigError(name, value, str(exc).strip().splitlines()[0])


def check_override(o) -> None:
    """What Hydra converts silently: a bool key given a number (``model.bias=3`` would be true)."""
    name = o.key_or_group
    if o.is_sweep_override() or name not in _leaf_index() or leaf(name).kind is not bool:
        return
    value = o.value()
    if value is not None and not isinstance(value, bool):
        raise ConfigError(name, value, "must be true or false")


def composition_error(overrides: Sequence[str], exc: BaseException) -> ConfigError:
    """Hydra could not compose ``overrides`` (``exc``): the one-line ConfigError naming the override
    that fails alone (its key, its value, what is allowed), else Hydra's first line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for line in overrides:
        try:
            (o,) = parser.parse_overrides([line])
        except Exception as err:  # noqa: BLE001  # Hydra's grammar: the line does not parse
            return ConfigError(line.split("=", 1)[0], line.split("=", 1)[-1],
                               f"cannot be parsed ({str(err).strip().splitlines()[0]})")
        if o.is_sweep_override():
            continue
        try:
            compose([line])
        except Exception as err:  # noqa: BLE001  # any of Hydra's composition errors
            return explain_override(o, err)
    return ConfigError("overrides", " ".join(overrides), str(exc).strip().splitlines()[0])
