"""Run folders -> tidy pandas DataFrames.

Reads, per job folder (any folder under the sweep that holds a ``summary.json``; the format is
:mod:`resnorm.runs.folder`'s, the one the training writes, and ``docs/run-folder.md`` describes it):

- ``summary.json``: status, losses, throughput, versions, run name, overrides and the resolved
  ``config`` (a nested dict). A file that cannot be read or is not valid JSON (corrupt, or not
  readable by this user), or whose fields have the wrong types (:func:`resnorm.runs.folder.summary_problem`),
  is skipped by :func:`load_sweep` with a warning naming it, and listed in ``Sweep.skipped``.
- ``metrics.parquet``: one row per step (``step``, ``train_loss``, ``lr``, ``grad_norm``,
  ``tokens_per_s``, ``val_loss``, and any columns added later). May be missing: a warning says so
  and ``Sweep.skipped`` lists the run.
- ``layers.parquet``: tidy per-layer rows (``step``, ``layer``, ``sublayer``, ``quantity``,
  ``value``). May be missing.
- ``.hydra/config.yaml``: only when the summary has no ``config`` (a job that failed before it wrote
  one), to recover the variant, depth, seed and learning rate.

Writes nothing.

The ``runs`` table has one row per job: ``run_dir`` (absolute path, the key that joins the three
tables), ``run_name``, the summary fields (:data:`SUMMARY_FIELDS`, missing ones as NaN/None, plus any
other scalar the summary holds), the config flattened to dotted columns (``model.norm``,
``optim.lr``, ``depth``, ...; a config key that collides with a summary field is stored as
``config.<key>``), the first-class columns ``variant`` (= ``model.norm``), ``depth``, ``seed``, ``lr``
(= ``optim.lr``, the configured peak rate), ``setting``: a label of the other swept keys (see
:func:`sweep_axes`), empty when the sweep varies only variant, depth and seed, and ``outcome`` (one
of :data:`resnorm.runs.folder.OUTCOMES`, None for a failed or running run) with ``outcome_derived``:
the summary's own ``outcome`` when it records one (False), else derived from its status, divergence
reason, final validation loss and ``unigram_loss`` (True; see :func:`outcome_of`). Summaries from
before ``unigram_loss`` was recorded have no baseline: their completed runs count as trained.

The ``steps`` and ``layers`` tables are the parquet rows of all jobs, each prefixed with
:data:`KEY_COLUMNS` (``run_dir``, ``run_name``, ``variant``, ``depth``, ``seed``, ``lr``). Because
``lr`` there is the run's configured rate (the same value as in ``runs``), the per-step learning
rate that ``metrics.parquet`` stores as ``lr`` is renamed ``step_lr``.

The first-class columns come from the config; when it is missing, from the summary's own top-level
keys of the same name, then from the job's Hydra overrides (``model.norm=pre``, ``depth=6``, ...).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from resnorm.runs.provenance import mixed_versions
from resnorm.runs.folder import (LAYERS, METRICS, OUTCOMES, SUMMARY, classify_outcome, diverge_kind_of,
                                find_run_dirs, read_summary, summary_problem)

#: summary fields every row of the runs table has (NaN/None where the summary lacks them)
SUMMARY_FIELDS = (
    "status", "diverged_step", "diverge_reason", "diverge_kind", "initial_loss", "final_train_loss",
    "final_val_loss", "best_val_loss", "unigram_loss", "entropy_rate", "stall_margin", "spike_count",
    "tokens_per_s", "wall_s", "steps_done", "n_params", "mfu", "peak_memory_bytes", "torch_version",
    "git_commit", "run_name", "overrides", "tokenizer", "val_tokens_per_byte", "final_val_bpb", "best_val_bpb",
)
FLOAT_COLUMNS = ("initial_loss", "final_train_loss", "final_val_loss", "best_val_loss", "unigram_loss",
                 "entropy_rate", "stall_margin", "tokens_per_s", "wall_s", "mfu", "lr", "val_tokens_per_byte",
                 "final_val_bpb", "best_val_bpb")
INT_COLUMNS = ("diverged_step", "steps_done", "n_params", "spike_count", "peak_memory_bytes", "depth", "seed")
#: ``train.stall_margin``'s default, for summaries and configs that do not record it
DEFAULT_STALL_MARGIN = 0.1
#: first-class column -> the dotted config key it comes from
FIRST_CLASS = {"variant": "model.norm", "depth": "depth", "seed": "seed", "lr": "optim.lr"}
#: columns added to every row of the steps and layers tables
KEY_COLUMNS = ("run_dir", "run_name", "variant", "depth", "seed", "lr")
#: swept keys that are figure axes of their own, so not part of ``setting``
PLOT_AXES = ("model.norm", "depth", "seed")


@dataclass
class Run:
    """One job: ``info`` is its row of the runs table; ``steps``/``layers`` are None when missing."""

    run_dir: Path
    info: Dict[str, Any]
    steps: Optional[pd.DataFrame]
    layers: Optional[pd.DataFrame]


@dataclass
class Sweep:
    """A sweep's runs, step metrics and per-layer metrics as three tidy DataFrames.

    ``axes`` lists the keys the sweep varies (from the jobs' overrides, see :func:`sweep_axes`).
    """

    path: Path
    runs: pd.DataFrame
    steps: pd.DataFrame
    layers: pd.DataFrame
    axes: List[str] = field(default_factory=list)
    #: (run folder relative to the sweep, why): runs left out, and runs loaded without their metrics
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    #: ``3 runs at <commit>, 1 at <commit>+dirty`` when the runs come from several code versions, else None
    versions: Optional[str] = None

    @property
    def name(self) -> str:
        """The sweep's name: the basename of its folder."""
        return self.path.name


def flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Flatten a nested dict to dotted keys: ``{"model": {"norm": "pre"}}`` -> ``{"model.norm": "pre"}``.

    Lists become tuples (hashable, so they can be grouped on).
    """
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, list):
            flat[name] = tuple(value)
        else:
            flat[name] = value
    return flat


def parse_overrides(overrides: Sequence[str]) -> Dict[str, str]:
    """Hydra override strings -> ``{key: value}`` (``+depth=6``, ``++depth=6``, ``depth=6`` all give
    ``{"depth": "6"}``); deletions (``~key``) and strings without ``=`` are ignored."""
    parsed: Dict[str, str] = {}
    for item in overrides or ():
        item = str(item)
        if item.startswith("~") or "=" not in item:
            continue
        key, value = item.split("=", 1)
        parsed[key.lstrip("+")] = value
    return parsed


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _convert(column: str, value: Any) -> Any:
    """Override strings and stray types -> the first-class column's type (None if it does not parse)."""
    if _missing(value):
        return None
    try:
        if column in ("depth", "seed"):
            return int(float(value))
        if column == "lr":
            return float(value)
    except (TypeError, ValueError):
        return None
    return str(value)


def _hydra_config(run_dir: Path) -> Dict[str, Any]:
    """The job's ``.hydra/config.yaml`` as a dict (interpolations left unresolved), or {} if unreadable."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    try:
        import yaml

        loaded = yaml.safe_load(path.read_text())
    except Exception:  # noqa: BLE001  # a fallback source only: any failure means "no config"
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _float_or_none(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def outcome_of(summary: Dict[str, Any], flat_config: Dict[str, Any]) -> Tuple[Optional[str], bool]:
    """``(outcome, derived)``: the summary's ``outcome`` when it has the key (None for a failed or
    running run), else :func:`resnorm.runs.folder.classify_outcome` of its status, ``diverge_kind``
    (or the kind recovered from ``diverge_reason``), final validation loss, ``unigram_loss`` (None
    when not recorded: a completed run then counts as trained) and ``stall_margin`` (the summary's,
    the config's ``train.stall_margin``, else :data:`DEFAULT_STALL_MARGIN`); ``derived`` says which."""
    if "outcome" in summary:
        given = summary["outcome"]
        return (given if given in OUTCOMES else None), False
    kind = summary.get("diverge_kind") or diverge_kind_of(summary.get("diverge_reason"))
    margin = _float_or_none(summary.get("stall_margin"))
    if margin is None:
        margin = _float_or_none(flat_config.get("train.stall_margin"))
    outcome = classify_outcome(summary.get("status"), kind, _float_or_none(summary.get("final_val_loss")),
                               _float_or_none(summary.get("unigram_loss")),
                               DEFAULT_STALL_MARGIN if margin is None else margin)
    return outcome, True


def run_info(run_dir: Path, summary: Dict[str, Any]) -> Dict[str, Any]:
    """One row of the runs table from a job folder and its parsed summary (see the module docstring)."""
    run_dir = Path(run_dir)
    info: Dict[str, Any] = {"run_dir": str(run_dir)}
    for key in SUMMARY_FIELDS:
        info[key] = summary.get(key)
    info["run_name"] = summary.get("run_name") or run_dir.name
    info["status"] = summary.get("status") or "unknown"
    overrides = summary.get("overrides") or ()
    info["overrides"] = (str(overrides),) if isinstance(overrides, str) else tuple(str(o) for o in overrides)

    config = summary.get("config")
    if not isinstance(config, dict):
        config = _hydra_config(run_dir)
    flat = flatten(config)
    for key, value in flat.items():
        info[f"config.{key}" if key in info else key] = value
    for key, value in summary.items():  # other scalars (error, group, device, ...); config wins
        if key == "config" or key in info:
            continue
        if isinstance(value, list):
            value = tuple(value)
        if value is None or isinstance(value, (str, int, float, bool, tuple)):
            info[key] = value

    overrides = parse_overrides(info["overrides"])
    for column, key in FIRST_CLASS.items():
        for source in (flat.get(key), summary.get(column), overrides.get(key)):
            value = _convert(column, source)
            if value is not None:
                break
        info[column] = value
    info["outcome"], info["outcome_derived"] = outcome_of(summary, flat)
    return info


def _read_table(path: Path) -> Optional[pd.DataFrame]:
    """A parquet file as a DataFrame; None if it is absent or unreadable (the latter with a warning)."""
    from .bulk import read_table

    table = read_table(path)
    return None if table is None else table.to_pandas()


def _with_keys(table: Optional[pd.DataFrame], info: Dict[str, Any]) -> Optional[pd.DataFrame]:
    """Prefix ``table`` with the run's key columns; a per-step ``lr`` column becomes ``step_lr``."""
    if table is None:
        return None
    if "lr" in table.columns:
        table = table.rename(columns={"lr": "step_lr"})
    keys = pd.DataFrame({k: [info[k]] * len(table) for k in KEY_COLUMNS}, index=table.index)
    return pd.concat([keys, table.drop(columns=[c for c in KEY_COLUMNS if c in table.columns])], axis=1)


def load_run(run_dir) -> Run:
    """Load one job folder: its runs-table row and its step/layer tables (with key columns added).

    Raises FileNotFoundError if ``run_dir`` has no ``summary.json`` and ValueError (naming the file)
    if the summary cannot be read or is not a JSON object (:func:`resnorm.runs.folder.read_summary`
    with ``strict=True``). Missing or unreadable parquet files give ``None`` tables.
    """
    run_dir = Path(run_dir).resolve()
    summary = read_summary(run_dir, strict=True)
    problem = summary_problem(summary)
    if problem:
        raise ValueError(f"{run_dir / SUMMARY}: malformed: {problem}")
    info = run_info(run_dir, summary)
    steps = _with_keys(_read_table(run_dir / METRICS), info)
    layers = _with_keys(_read_table(run_dir / LAYERS), info)
    return Run(run_dir, info, steps, layers)


def sweep_axes(override_lists: Sequence[Sequence[str]]) -> List[str]:
    """The keys a sweep varies: override keys whose value (or absence) differs between jobs.

    Keys are returned in the order they first appear; constant overrides (``name=...``) are not axes.
    """
    maps = [parse_overrides(o) for o in override_lists]
    keys: List[str] = []
    for m in maps:
        keys.extend(k for k in m if k not in keys)
    return [k for k in keys if len({m.get(k) for m in maps}) > 1]


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _settings(runs: pd.DataFrame, axes: List[str]) -> List[str]:
    """Per run, ``"key=value, ..."`` over the swept keys other than variant, depth and seed."""
    extra = [k for k in axes if k not in PLOT_AXES]
    if "optim.lr" not in extra and runs["lr"].nunique(dropna=True) > 1:
        extra.append("optim.lr")  # runs without overrides (copied, hand-made) still split by LR
    labels = []
    for _, row in runs.iterrows():
        overrides = parse_overrides(row["overrides"])
        parts = []
        for key in extra:
            value = row[key] if key in runs.columns and not _missing(row[key]) else overrides.get(key)
            parts.append(f"{key}={_format_value(value)}")
        labels.append(", ".join(parts))
    return labels


def _coerce(runs: pd.DataFrame) -> pd.DataFrame:
    for column in FLOAT_COLUMNS:
        runs[column] = pd.to_numeric(runs[column], errors="coerce").astype(float)
    for column in INT_COLUMNS:
        values = pd.to_numeric(runs[column], errors="coerce")
        try:
            runs[column] = values.astype("Int64")
        except (TypeError, ValueError):  # a non-integer value: keep the floats rather than fail
            runs[column] = values
    return runs


def _concat(tables: List[pd.DataFrame]) -> pd.DataFrame:
    tables = [t for t in tables if t is not None and len(t)]
    if not tables:
        return pd.DataFrame({k: pd.Series(dtype=object) for k in KEY_COLUMNS})
    return pd.concat(tables, ignore_index=True)


def with_bits_per_byte(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with ``tokenizer``, ``val_tokens_per_byte``, ``final_val_bpb`` and ``best_val_bpb`` for
    every run: a summary from before tokenizers were recorded trained on bytes (tokenizer ``bytes``, one token per
    byte: its bits per byte are its nats per token / ln 2) or, with ``data.name=synthetic``, on
    symbols that are not text (tokenizer ``synthetic``, no bits per byte)."""
    runs = runs.copy()
    for column in ("tokenizer", "val_tokens_per_byte", "final_val_bpb", "best_val_bpb"):
        if column not in runs.columns:
            runs[column] = None
    fallback = "bytes"  # an older summary: bytes, or synthetic symbols (no bits per byte)
    if "data.name" in runs.columns:
        fallback = runs["data.name"].map(lambda name: "synthetic" if name == "synthetic" else "bytes")
    runs["tokenizer"] = runs["tokenizer"].where(runs["tokenizer"].notna(), fallback)
    tpb = pd.to_numeric(runs["val_tokens_per_byte"], errors="coerce").astype(float)
    runs["val_tokens_per_byte"] = tpb.where(tpb.notna() | (runs["tokenizer"] != "bytes"), 1.0)
    for loss in ("final_val", "best_val"):
        bpb = pd.to_numeric(runs[f"{loss}_bpb"], errors="coerce").astype(float)
        derived = pd.to_numeric(runs[f"{loss}_loss"], errors="coerce") / math.log(2) * runs["val_tokens_per_byte"]
        runs[f"{loss}_bpb"] = bpb.where(bpb.notna(), derived)
    return runs


def _root(path) -> Path:
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"sweep folder not found: {root}")
    if not root.is_dir():
        raise ValueError(f"not a sweep folder: {root} is a file")
    return root.resolve()


def _sweep(root: Path, infos: List[Dict[str, Any]], steps: pd.DataFrame, layers: pd.DataFrame,
           skipped: List[Tuple[str, str]]) -> Sweep:
    """The Sweep of the loaded runs' rows and their stacked step and layer tables."""
    if not infos:
        raise ValueError(f"no run in {root}: no folder under it holds a readable summary.json")
    versions = mixed_versions(info.get("git_commit") for info in infos)
    if versions:
        warnings.warn(f"{root}: the sweep mixes code versions ({versions}): its runs may not be comparable",
                      stacklevel=3)
    runs = with_bits_per_byte(_coerce(pd.DataFrame(infos)))
    axes = sweep_axes(runs["overrides"])
    runs["setting"] = _settings(runs, axes)
    for table in (steps, layers):
        for column in ("depth", "seed"):
            table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
        table["lr"] = pd.to_numeric(table["lr"], errors="coerce").astype(float)
    return Sweep(path=root, runs=runs, steps=steps, layers=layers, axes=axes, skipped=skipped, versions=versions)


def load_sweep(path) -> Sweep:
    """Load every job under ``path`` (a Hydra multirun folder, or a single run folder), in bulk
    (:mod:`analysis.bulk`: threads read the files, one concatenation per table).

    Raises FileNotFoundError if ``path`` does not exist, ValueError if it is not a folder or holds
    no readable run. A job whose ``summary.json`` cannot be read or parsed is skipped with a warning.
    """
    from .bulk import keyed_frame, read_runs, read_tables

    root = _root(path)
    infos: List[Dict[str, Any]] = []
    dirs: List[Path] = []
    skipped: List[Tuple[int, str, str]] = []  # (position in the sweep, run, why): the per-run reader's order
    for i, (run_dir, summary, why) in enumerate(read_runs([d.resolve() for d in find_run_dirs(root)])):
        if summary is None:
            warnings.warn(f"skipping a run: {why}", stacklevel=2)  # the message names the file
            skipped.append((i, run_dir.relative_to(root).as_posix() or ".",
                            f"skipped: {why.replace(str(run_dir) + '/', '')}"))
            continue
        infos.append(dict(run_info(run_dir, summary), _position=i))
        dirs.append(run_dir)
    metrics, layers = read_tables(dirs, METRICS), read_tables(dirs, LAYERS)
    for run_dir, info, table in zip(dirs, infos, metrics):
        if table is None:
            why = f"no readable {METRICS} (status {info['status']}): no curves"
            warnings.warn(f"{run_dir}: {why}", stacklevel=2)
            skipped.append((info["_position"], run_dir.relative_to(root).as_posix() or ".", why))
    for info in infos:
        del info["_position"]
    return _sweep(root, infos, keyed_frame(metrics, infos, KEY_COLUMNS), keyed_frame(layers, infos, KEY_COLUMNS),
                  [(where, why) for _, where, why in sorted(skipped, key=lambda s: s[0])])


def load_sweep_per_run(path) -> Sweep:
    """:func:`load_sweep` one run at a time (:func:`load_run` each, then one concatenation): the
    reference the bulk reader is checked against."""
    root = _root(path)
    loaded: List[Run] = []
    skipped: List[Tuple[str, str]] = []
    for run_dir in find_run_dirs(root):
        where = run_dir.relative_to(root).as_posix() or "."
        try:
            run = load_run(run_dir)
        except (ValueError, FileNotFoundError) as exc:
            warnings.warn(f"skipping a run: {exc}", stacklevel=2)  # the message names the file
            skipped.append((where, f"skipped: {str(exc).replace(str(run_dir) + '/', '')}"))  # the report names the run
            continue
        loaded.append(run)
        if run.steps is None:
            why = f"no readable {METRICS} (status {run.info['status']}): no curves"
            warnings.warn(f"{run_dir}: {why}", stacklevel=2)
            skipped.append((where, why))
    return _sweep(root, [r.info for r in loaded], _concat([r.steps for r in loaded]),
                  _concat([r.layers for r in loaded]), skipped)
