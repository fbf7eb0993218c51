"""Fast sweep planning: each job's resolved config, identity, folder, run name and validation
without a full Hydra compose per job.

Hydra composes a job in tens of milliseconds; a sweep of ten thousand jobs would spend minutes on
it before anything runs. The jobs of a grid differ only in a few ``key=value`` overrides, so
:class:`FastPlanner` composes with Hydra once per set of group choices (``data=``, ``optim=``, ...)
and builds each job from that base: its resolved config as plain dicts with the job's values set
(each distinct override converted by OmegaConf, and its leaf checked, once), its identity hashed
from that (:func:`resnorm.runs.identity.run_id`), its run name from Hydra's own ``override_dirname``
function, its folder from the sweep folder Hydra gives a representative job. The cross-field rules
(:data:`resnorm.train.preflight.CHECKS`) run through :class:`RuleCache`, which re-runs a rule only for values
of the keys it read that it has not seen.

A job takes the full Hydra compose instead (``None`` from :meth:`FastPlanner.plan`) when anything
is outside what the fast path reproduces: an override other than ``key=value`` on a schema leaf
(``+key``, ``~key``, a list, an interpolation), a base config holding interpolations, a job folder
not named ``${run_id:}``, or a config that does not validate (the full path then reports the error
as before). For each set of group choices the first job is composed both ways and compared; a
difference turns the fast path off for the sweep. tests/test_fastplan.py compares the two on
hundreds of random jobs of every key type.

This module imports no torch.
"""

from __future__ import annotations

import copy
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from resnorm.config.compose import _is_value_override, check_override
from resnorm.config.rules import check_leaf
from resnorm.config.schema import _leaf_index, check_known_keys, leaves, reader
from resnorm.errors import ConfigError
from resnorm.runs.identity import _plain, run_id
from resnorm.train.preflight import CHECKS, HOST_RULES

#: the job folder the fast path reproduces (``hydra.sweep.subdir``)
SUBDIR = "${run_id:}"
_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")
_INELIGIBLE = object()


class Values(dict):
    """A resolved config as nested dicts, read like a DictConfig (``cfg.train.steps``,
    ``cfg.model.get("objective")``): what the dry run's table and the stack planner read."""

    def __getattr__(self, name: str) -> Any:
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return Values(value) if isinstance(value, dict) and not isinstance(value, Values) else value


class RuleCache:
    """Runs the cross-field rules, each once per distinct set of values of the keys it read.

    A rule is a deterministic function of the values it reads through ``get`` (and of files that do
    not change while a sweep is planned): when the keys it read last time hold the same values, it
    would read the same keys again and reach the same result, so the result is reused.
    """

    def __init__(self) -> None:
        self._seen: Dict[Callable, Dict[Tuple[str, ...], Dict[Tuple, Optional[ConfigError]]]] = {}

    @staticmethod
    def _key(values: Sequence[Any]) -> Tuple:
        return tuple((type(v), v) for v in values)  # 1 and True are different values here

    def run(self, rule: Callable, get: Callable[[str], Any]) -> None:
        """Raise the rule's ConfigError (or pass) for the config read by ``get``."""
        tables = self._seen.setdefault(rule, {})
        try:
            for keys, table in tables.items():
                found = table.get(self._key([get(k) for k in keys]), _INELIGIBLE)
                if found is not _INELIGIBLE:
                    if found is not None:
                        raise found
                    return
        except TypeError:  # an unhashable value: run the rule itself
            rule(get)
            return
        reads: List[str] = []

        def recording(dotted: str) -> Any:
            reads.append(dotted)
            return get(dotted)

        error = None
        try:
            rule(recording)
        except ConfigError as exc:
            error = exc
        keys = tuple(dict.fromkeys(reads))
        try:
            tables.setdefault(keys, {})[self._key([get(k) for k in keys])] = error
        except TypeError:
            pass
        if error is not None:
            raise error


class _Base:
    """One set of group choices composed by Hydra: its resolved config (plain dicts, no ``hydra``
    node), its DictConfig (for converting values), its hydra node, and the sweep folder per value
    of the keys that folder's name reads."""

    def __init__(self, cfg: Any) -> None:
        from omegaconf import OmegaConf, open_dict

        self.cfg = cfg  # Hydra's composition, hydra node included (what a launcher's worker starts from)
        self.hydra = cfg.hydra
        self.dir_raw = str(OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["dir"])
        self.dir_keys = tuple(_REFERENCE.findall(self.dir_raw))
        body = copy.deepcopy(cfg)
        with open_dict(body):
            del body["hydra"]
        self.body = body
        self.nodes: Dict[str, Any] = {}  # key -> its value node in body (FastPlanner._leaf_node)
        self.plain = OmegaConf.to_container(body, resolve=True)
        self.interpolated = _has_interpolation(body)
        self.sweep_dirs: Dict[Tuple, Path] = {}
        self.values: Dict[str, Any] = {}  # override line -> converted value (or _INELIGIBLE)
        self.checked = False
        self._blob: Optional[bytes] = None
        # hydra.job.env_copy records the composing process's environment: a worker's may differ
        self.portable = not cfg.hydra.job.env_copy

    def blob(self) -> bytes:
        """The composed config pickled, once (a launcher sends it to its workers with each job)."""
        if self._blob is None:
            self._blob = pickle.dumps(self.cfg)
        return self._blob


@dataclass(frozen=True)
class Prepared:
    """A fast-planned job as a launcher's worker builds its composed config without Hydra: the
    base's composition with the job's values set, its task overrides and its ``override_dirname``
    (:func:`job_config`), as :meth:`FastPlanner._agrees` checked against Hydra's compose."""

    base: _Base
    updates: Tuple[Tuple[str, Any], ...]  # (dotted key, the value OmegaConf stores), in override order
    task: Tuple[str, ...]
    dirname: str

    def payload(self) -> Tuple[bytes, Tuple[Tuple[str, Any], ...], Tuple[str, ...], str]:
        """What a worker needs (picklable, small but for the base's bytes, made once per base)."""
        return self.base.blob(), self.updates, self.task, self.dirname


def job_config(blob: bytes, updates: Sequence[Tuple[str, Any]], task: Sequence[str], dirname: str) -> Any:
    """The job's composed config (hydra node included) from a :meth:`Prepared.payload`: what
    Hydra's ``load_sweep_config`` gives for the job's overrides, without composing."""
    from omegaconf import OmegaConf

    cfg = pickle.loads(blob)  # a private copy, struct flag and resolver cache as composed
    for key, value in updates:
        OmegaConf.update(cfg, key, value, merge=True)  # as Hydra applies a ``key=value`` override
    cfg.hydra.overrides.task = list(task)
    cfg.hydra.job.override_dirname = dirname
    return cfg


def _has_interpolation(node: Any) -> bool:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        return any(OmegaConf.is_interpolation(node, k) or _has_interpolation(node._get_node(k)) for k in node.keys())
    if isinstance(node, ListConfig):
        return any(OmegaConf.is_interpolation(node, i) or _has_interpolation(node._get_node(i))
                   for i in range(len(node)))
    return False


def _set(plain: Dict[str, Any], dotted: str, value: Any) -> Dict[str, Any]:
    """``plain`` with ``dotted`` set to ``value``: the dicts on the path are copied, the rest shared."""
    head, _, rest = dotted.partition(".")
    out = dict(plain)
    out[head] = _set(plain[head], rest, value) if rest else value
    return out


class FastPlanner:
    """Plans the jobs of one sweep (``master``: the sweep's config, ``loader``: Hydra's config
    loader; ``host``: the jobs train on this machine, so the host rules apply)."""

    def __init__(self, master: Any, loader: Any, host: bool) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from omegaconf import OmegaConf

        self.master, self.loader, self.host = master, loader, host
        self.parser = OverridesParser.create()
        self.rules = RuleCache()
        self.enabled = str(OmegaConf.to_container(master.hydra.sweep, resolve=False).get("subdir")) == SUBDIR
        self._parsed: Dict[str, Any] = {}
        self._bases: Dict[Tuple[str, ...], _Base] = {}
        self._leaf_ok: Dict[Tuple, bool] = {}
        self.fast = self.full = 0  # jobs planned each way

    def compose(self, overrides: Sequence[str]) -> Any:
        """Hydra's full composition of one job (with its ``hydra`` node)."""
        return self.loader.load_sweep_config(master_config=self.master, sweep_overrides=list(overrides))

    def _parse(self, line: str) -> Any:
        if line not in self._parsed:
            try:
                (self._parsed[line],) = self.parser.parse_overrides([line])
            except Exception:  # noqa: BLE001  # the full path reports Hydra's grammar error
                self._parsed[line] = None
        return self._parsed[line]

    def _base(self, groups: Tuple[str, ...]) -> _Base:
        if groups not in self._bases:
            self._bases[groups] = _Base(self.compose(groups))
        return self._bases[groups]

    def _value(self, base: _Base, o: Any) -> Any:
        """The value OmegaConf stores for override ``o`` (the schema's type), or _INELIGIBLE."""
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from omegaconf import OmegaConf

        line = o.input_line
        if line not in base.values:
            base.values[line] = _INELIGIBLE
            try:
                check_override(o)
                node = self._leaf_node(base, o.key_or_group)
                if node is not None:  # assigning to a copy of the leaf converts as assigning in the config does
                    fresh = copy.deepcopy(node)  # copies the node only (its parent is kept, not copied)
                    fresh._set_value(o.value())
                    base.values[line] = fresh._value()
                else:
                    body = copy.deepcopy(base.body)
                    ConfigLoaderImpl._apply_overrides_to_config([o], body)
                    value = OmegaConf.select(body, o.key_or_group)
                    if not OmegaConf.is_config(value):
                        base.values[line] = value
            except Exception:  # noqa: BLE001  # the full compose reports it
                pass
        return base.values[line]

    @staticmethod
    def _leaf_node(base: _Base, key: str) -> Any:
        """The base config's value node at ``key`` (None: not a plain value node; the override then
        goes through a copy of the whole config, ~10 ms, which a sweep over thousands of distinct
        values, e.g. ``seed=range(N)``, cannot pay per value)."""
        from omegaconf import OmegaConf
        from omegaconf.nodes import AnyNode, ValueNode

        if key not in base.nodes:
            parent_key, _, last = key.rpartition(".")
            parent = OmegaConf.select(base.body, parent_key) if parent_key else base.body
            node = parent._get_node(last) if OmegaConf.is_dict(parent) else None
            plain = isinstance(node, ValueNode) and not node._is_interpolation()
            base.nodes[key] = node if plain and not isinstance(node, AnyNode) else None
        return base.nodes[key]

    def _eligible(self, o: Any) -> bool:
        from hydra.core.override_parser.types import OverrideType

        if o is None or o.is_sweep_override() or o.is_hydra_override():
            return False
        if not _is_value_override(o):
            return o.package is None and o.type == OverrideType.CHANGE  # a group choice
        value = o.value()
        return (o.type == OverrideType.CHANGE and o.package is None and o.key_or_group in _leaf_index()
                and (value is None or isinstance(value, (bool, int, float, str)))
                and not (isinstance(value, str) and "${" in value))

    def _valid(self, plain: Dict[str, Any]) -> bool:
        get = reader(plain)
        for lf in leaves():
            value = get(lf.key)
            key = (lf.key, type(value), value)
            if key not in self._leaf_ok:
                try:
                    check_leaf(lf, value)
                    self._leaf_ok[key] = True
                except ConfigError:
                    self._leaf_ok[key] = False
            if not self._leaf_ok[key]:
                return False
        try:
            for rule in CHECKS + (HOST_RULES if self.host else ()):
                self.rules.run(rule, get)
        except ConfigError:
            return False
        return True

    def plan(self, overrides: Sequence[str]) -> Optional[Tuple[Values, str, Path, str, Callable[[], str], Prepared]]:
        """``(config, run_id, run_dir, run_name, hydra_yaml, prepared)`` of the job, or None: compose it in full."""
        if not self.enabled:
            return None
        parsed = [self._parse(line) for line in overrides]
        if not all(self._eligible(o) for o in parsed):
            return None
        groups = tuple(o.input_line for o in parsed if not _is_value_override(o))
        base = self._base(groups)
        if base.interpolated:
            return None
        if not base.checked:
            base.checked = True
            try:
                check_known_keys(base.body)
            except ConfigError:
                base.interpolated = True  # never fast: the full path reports it
                return None
        plain, updates = base.plain, []
        for o in parsed:
            if _is_value_override(o):
                value = self._value(base, o)
                if value is _INELIGIBLE:
                    return None
                plain = _set(plain, o.key_or_group, value)
                updates.append((o.key_or_group, value))
        if not self._valid(plain):
            return None
        rid = run_id(plain)
        dir_key = tuple((type(v), v) for v in (reader(plain)(k) if k in _leaf_index() else _INELIGIBLE
                                                 for k in base.dir_keys))
        if any(v is _INELIGIBLE for _, v in dir_key):
            return None
        if dir_key not in base.sweep_dirs:
            if not self._agrees(base, overrides, plain, rid, dir_key):
                self.enabled = False
                return None
        task = [o.input_line for o in parsed if not o.is_hydra_override()]
        dirname = self._dirname(base, [o for o in parsed if not o.is_hydra_override()])
        self.fast += 1
        prepared = Prepared(base, tuple(updates), tuple(task), dirname) if base.portable else None
        return (Values(plain), rid, base.sweep_dirs[dir_key] / rid, dirname or "default",
                lambda: self._hydra_yaml(base, task, dirname), prepared)

    def _agrees(self, base: _Base, overrides: Sequence[str], plain: Dict[str, Any], rid: str, dir_key: Tuple) -> bool:
        """Compose this job in full: the same config, identity and hydra node as the fast path? Keep
        its sweep folder."""
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        cfg = self.compose(overrides)
        previous = HydraConfig.instance().cfg
        try:
            HydraConfig.instance().set_config(cfg)
            sweep_dir = Path(str(cfg.hydra.sweep.dir))
        except Exception:  # noqa: BLE001  # a folder only the launch knows
            return False
        finally:
            HydraConfig.instance().cfg = previous
        app = [o for o in (self._parse(line) for line in overrides) if not o.is_hydra_override()]
        fast_yaml = self._hydra_yaml(base, [o.input_line for o in app], self._dirname(base, app))
        base.sweep_dirs[dir_key] = sweep_dir
        return (_plain(cfg) == plain and run_id(cfg) == rid
                and OmegaConf.to_yaml(OmegaConf.create({"hydra": cfg.hydra})) == fast_yaml)

    @staticmethod
    def _dirname(base: _Base, app: Sequence[Any]) -> str:
        """Hydra's ``override_dirname`` of the job (the summary's ``run_name``; empty: ``default``)."""
        from hydra._internal.config_loader_impl import get_overrides_dirname

        c = base.hydra.job.config.override_dirname
        return get_overrides_dirname(overrides=list(app), kv_sep=c.kv_sep, item_sep=c.item_sep,
                                     exclude_keys=list(c.exclude_keys))

    @staticmethod
    def _hydra_yaml(base: _Base, task: List[str], dirname: str) -> str:
        """The job's hydra node as Hydra saves it: the base's with the job's task overrides and name."""
        from omegaconf import OmegaConf

        node = copy.deepcopy(base.hydra)
        node.overrides.task = list(task)
        node.job.override_dirname = dirname
        return OmegaConf.to_yaml(OmegaConf.create({"hydra": node}))
