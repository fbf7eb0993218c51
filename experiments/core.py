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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "papers"
RUNS = ROOT / "multirun" / "papers"  # per-run caches of the training-time experiments (resumable)

PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"
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
    name: str
    text: str
    value: Optional[float]
    op: str
    threshold: float
    status: str
    reason: str = ""

    def line(self) -> str:
        v = "-" if self.value is None else f"{self.value:.4g}"
        extra = f" ({self.reason})" if self.reason else ""
        return f"{self.status:7s} {self.name}: {v} {self.op} {self.threshold:g}{extra}"


@dataclass(frozen=True)
class Claim:
    """A robust statement about the data: ``measure(df) OP threshold``.

    ``needs``: variant names the claim depends on; when one is not registered in
    :data:`resnorm.config.variants.VARIANTS` the claim is SKIPPED. ``measure`` may raise :class:`Skip`.
    """

    name: str
    text: str
    measure: Callable[[pd.DataFrame], float]
    op: str
    threshold: float
    needs: Sequence[str] = ()

    def evaluate(self, df: pd.DataFrame) -> ClaimResult:
        from resnorm.config.variants import VARIANTS

        missing = [v for v in self.needs if v not in VARIANTS]
        if missing:
            return ClaimResult(self.name, self.text, None, self.op, self.threshold, SKIPPED,
                               f"variant {', '.join(missing)} not registered")
        try:
            value = float(self.measure(df))
        except Skip as exc:
            return ClaimResult(self.name, self.text, None, self.op, self.threshold, SKIPPED, str(exc))
        ok = math.isfinite(value) and OPS[self.op](value, self.threshold)
        return ClaimResult(self.name, self.text, value, self.op, self.threshold, PASS if ok else FAIL,
                           "" if math.isfinite(value) else "non-finite value")


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

    def evaluate(self, df: pd.DataFrame) -> List[ClaimResult]:
        return [c.evaluate(df) for c in self.claims]


REGISTRY: Dict[str, Experiment] = {}


def register(exp: Experiment) -> Experiment:
    if exp.name in REGISTRY:
        raise ValueError(f"experiment {exp.name!r} registered twice")
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


def save_claims(exp: Experiment, results: List[ClaimResult], path: Path, size: str, wall_s: Optional[float],
                machine: Optional[Dict[str, Any]] = None) -> None:
    payload = dict(experiment=exp.name, reference=exp.reference.__dict__, size=size, wall_s=wall_s,
                   machine=machine, claims=[r.__dict__ for r in results])
    write_text(path, json.dumps(payload, indent=2))


def run_experiment(name: str, size: str = "full", out: Path = RESULTS, runs_dir: Path = RUNS,
                   verbose: bool = True, threads: int = 1, seeds: Optional[Sequence[int]] = None,
                   text: Optional[str] = None, workers: int = 0):
    """Run one experiment at ``size``, write its CSV, figure and claims; return (df, claim results).

    ``seeds`` replaces every seed list of the grid (to check that the claims hold for other seeds);
    ``text`` trains the training-time experiments on that text file (bytes, vocab 256) instead of the
    synthetic stream (init-time experiments probe with random tokens and ignore it). ``workers``: processes
    that train the training-time grids in parallel, one thread each (0: one per core).
    """
    import torch

    torch.set_num_threads(threads)
    exp = get(name)
    if size not in exp.grids:
        raise KeyError(f"experiment {name!r} has no grid {size!r}; choose one of {', '.join(exp.grids)}")
    grid = dict(exp.grids[size])
    if seeds is not None:
        grid.update({k: list(seeds) for k in grid if k.startswith("seeds")})
    if text is not None:
        grid["text"] = str(text)
    from resnorm.train.devices import cpu_count

    ctx = Context(name=name, size=size, runs_dir=Path(runs_dir) / size / name, verbose=verbose,
                  workers=workers or cpu_count())
    load_start = _load_average()
    t0 = time.perf_counter()
    df = exp.run(grid, ctx)
    wall = time.perf_counter() - t0
    machine = dict(cores=cpu_count(), load_avg_start=load_start, load_avg_end=_load_average(),
                   workers=ctx.workers, seeds=list(seeds) if seeds is not None else None,
                   text=str(text) if text is not None else None, runs_trained=ctx.runs_trained,
                   runs_cached=ctx.runs_cached)
    p = paths(name, out)
    p["csv"].parent.mkdir(parents=True, exist_ok=True)
    write_text(p["csv"], df.to_csv(index=False))
    exp.plot(df, p["png"])
    results = exp.evaluate(df)
    save_claims(exp, results, p["claims"], size, wall, machine)
    ctx.log(f"done in {wall:.0f} s -> {p['png']}")
    return df, results


def check_experiment(name: str, out: Path = RESULTS) -> List[ClaimResult]:
    """Evaluate the claims of ``name`` from its saved CSV (raises FileNotFoundError if never run)."""
    exp = get(name)
    p = paths(name, out)
    if not p["csv"].is_file():
        raise FileNotFoundError(f"{p['csv']} not found: run `python -m experiments run {name}` first")
    df = pd.read_csv(p["csv"])
    results = exp.evaluate(df)
    size, wall, machine = None, None, None
    if p["claims"].is_file():
        try:
            prev = json.loads(p["claims"].read_text())
            size, wall, machine = prev.get("size"), prev.get("wall_s"), prev.get("machine")
        except json.JSONDecodeError:
            pass
    save_claims(exp, results, p["claims"], size or "?", wall, machine)
    return results


def claim_table(exp: Experiment, results: List[ClaimResult]) -> str:
    """A markdown table of the claims (for docs/reproductions.md)."""
    if not results:
        return "Report-only: no calibrated claim yet."
    rows = ["| claim | measured | threshold | result |", "|---|---|---|---|"]
    for r in results:
        v = "-" if r.value is None else f"{r.value:.3g}"
        res = r.status + (f" ({r.reason})" if r.reason else "")
        text = r.text.replace("|", "\\|")  # a norm's bars would end the cell
        rows.append(f"| {text} | {v} | {r.op} {r.threshold:g} | {res} |")
    return "\n".join(rows)
