"""The claims as regression gates: a claim fails the check only when its verdict differs from the recorded one.

Each setting of an experiment (its default seeds, each declared robustness run) has a committed record,
``results/papers[/robustness/<setting>]/NAME.claims.json``, with every claim's statistic, interval, seeds
and verdict (:func:`experiments.core.save_claims`). ``python -m experiments check`` re-judges the claims
(from the saved CSV, or from a fresh run with ``--rerun``) and compares verdicts: a claim recorded as not
holding that still does not hold passes; one whose verdict moved (either way, or to or from
inconclusive) fails, and so does a claim the record lacks. A robustness setting that has no record with
verdicts yet is reported as not measured and does not fail.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from .core import DEFAULT, RESULTS, RUNS, ClaimResult, csv_seeds, evaluate_saved, get, load_record, paths, run_experiment
from .verdict import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, SKIPPED


def changes(recorded: List[ClaimResult], now: List[ClaimResult]) -> List[str]:
    """One line per claim whose verdict is not the recorded one (a new claim, a dropped claim, a record
    written before verdicts, or a verdict that moved); empty when every verdict is as recorded."""
    rec = {r.name: r for r in recorded}
    out = []
    for r in now:
        old = rec.get(r.name)
        if old is None:
            out.append(f"{r.name}: not in the record; now {r.verdict}")
        elif old.verdict is None:
            out.append(f"{r.name}: the record has no verdict (one value, {old.reason}); now {r.verdict}")
        elif old.verdict != r.verdict:
            out.append(f"{r.name}: recorded {old.verdict} {old.interval()}, now {r.verdict} {r.interval()}")
    out += [f"{name}: recorded but no longer declared" for name in rec.keys() - {r.name for r in now}]
    return out


@dataclass
class Checked:
    """The outcome of checking one (experiment, setting)."""

    name: str
    setting: str
    results: List[ClaimResult] = field(default_factory=list)
    changed: List[str] = field(default_factory=list)
    missing: str = ""  # why there is nothing to compare (no CSV, no record)

    @property
    def failed(self) -> bool:
        return bool(self.changed) or (bool(self.missing) and self.setting == DEFAULT)


def check_setting(name: str, setting: str = DEFAULT, out: Path = RESULTS, rerun: bool = False,
                  runs_dir: Path = RUNS, update: bool = False, workers: int = 0) -> Checked:
    """Re-judge one setting's claims and compare with its record; ``update`` rewrites the record instead."""
    exp = get(name)
    where = exp.setting(setting).out(out)
    record = load_record(paths(name, where)["claims"])
    c = Checked(name, setting)
    if not exp.claims:
        return c
    cmd = f"python -m experiments run {name}" + (f" --setting {setting}" if setting != DEFAULT else "")
    if record is None and not update:
        c.missing = f"no record in {where}: `{cmd}`"
        return c
    if record is not None and setting != DEFAULT and all(r.verdict is None for r in record["claims"]) and not update:
        c.missing = f"recorded before verdicts (one value per claim) in {where}: `{cmd}`"
        return c
    if rerun:
        with tempfile.TemporaryDirectory() as tmp:
            only = ((record or {}).get("machine") or {}).get("only")  # the recorded run's grid subset, if any
            _, c.results = run_experiment(name, size=(record or {}).get("size") or "full", out=Path(tmp),
                                          runs_dir=runs_dir, verbose=False,
                                          setting=None if setting == DEFAULT else setting, record=False,
                                          workers=workers, only=only)
    else:
        try:
            c.results = evaluate_saved(name, where)
        except FileNotFoundError as exc:
            c.missing = str(exc)
            return c
    if update:
        from .core import save_claims

        record = record or {}
        save_claims(exp, c.results, paths(name, where)["claims"], record.get("size") or "full", record.get("wall_s"),
                    record.get("machine"), setting, record.get("data") or "",
                    record.get("seeds") or csv_seeds(paths(name, where)["csv"]),
                    source=record.get("source") or "re-judged from the saved CSV by `check --update` (the run's "
                    "wall time and machine are the measuring run's)")
        return c
    c.changed = changes(record["claims"], c.results)
    return c


def known(checked: List[Checked]) -> List[str]:
    """The recorded verdicts a reader must know: every claim recorded as not holding or inconclusive that
    the check found unchanged (a changed one is reported as a change instead)."""
    lines = []
    for c in checked:
        moved = {line.split(":")[0] for line in c.changed}
        for r in c.results:
            if r.verdict in (DOES_NOT_HOLD, INCONCLUSIVE, SKIPPED) and r.name not in moved:
                where = "" if c.setting == DEFAULT else f" [{c.setting}]"
                lines.append(f"{r.verdict:13s} {c.name}.{r.name}{where}: {r.interval()} over {r.n} "
                             f"seed{'s' * (r.n != 1)} {r.op} {r.threshold:g}")
    return lines


def holds_everywhere(checked: List[Checked], name: str) -> Optional[bool]:
    """Whether every claim of ``name`` holds in every setting measured (None: nothing measured)."""
    mine = [r for c in checked if c.name == name for r in c.results]
    return None if not mine else all(r.verdict == HOLDS for r in mine)
