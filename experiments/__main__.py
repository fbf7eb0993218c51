"""``python -m experiments list | run NAME...|--all | check NAME...|--all | report | plot NAME...``.

- ``run``: computes the data (init-time experiments in-process, seconds to a few minutes; training-time
  ones train in-process, each run cached under ``multirun/papers/<size>/<name>/`` so a killed run resumes),
  writes ``results/papers/NAME.{csv,png,claims.json}`` and prints each claim's statistic over seeds, its
  95% interval and verdict (holds / does not hold / inconclusive). ``--setting S`` runs one of the
  experiment's declared robustness settings (other seeds, another text) into ``results/papers/robustness/S/``;
  ``--robustness`` runs the default and every declared setting. ``--only KEY=V1,V2`` runs a subset of the
  grid; with ``--merge`` its rows replace those rows of the recorded CSV and the record lists the re-run.
- ``check``: re-judges the claims from the saved CSVs (``--rerun``: from a fresh run into a scratch folder)
  and compares each verdict with the recorded one. Exit status 1 only when a verdict changed (or the
  default setting has no record); claims recorded as not holding pass while they keep not holding, and
  are listed. ``--update`` re-records the verdicts instead of comparing.
- ``report``: writes docs/reproductions.md from the recorded claims files (``--check``: exit 1 if the
  committed page differs).
- ``--size ci`` uses the reduced grids the test suite runs; ``--out DIR`` writes elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import REGISTRY, run_experiment
from .core import DEFAULT, RESULTS, RUNS


def _names(args) -> list:
    if args.all:
        return list(REGISTRY)
    if not args.names:
        raise SystemExit("name an experiment or pass --all (see `python -m experiments list`)")
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown experiment {', '.join(unknown)}; choose from {', '.join(REGISTRY)}")
    return args.names


def _print(name, setting, results) -> None:
    exp = REGISTRY[name]
    where = "" if setting == DEFAULT else f" [{setting}]"
    print(f"\n{name}{where} — {exp.reference.cite()}")
    for r in results:
        print("  " + r.line())


def _settings(args, exp) -> list:
    if getattr(args, "robustness", False):
        return [s.name for s in exp.settings()]
    return [args.setting or DEFAULT]


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _only(items) -> dict:
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--only {item!r}: expected KEY=V1,V2 (a list of the grid and the values kept)")
        out[key] = [_value(v) for v in values.split(",")]
    return out


def _run(args, names) -> int:
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    for name in names:
        for setting in _settings(args, REGISTRY[name]):
            _, results = run_experiment(name, size=args.size, out=args.out, runs_dir=RUNS, verbose=not args.quiet,
                                        seeds=seeds, text=args.text, workers=args.workers,
                                        setting=setting, only=_only(args.only), merge=args.merge)
            _print(name, setting, results)
    return 0


def _check(args, names) -> int:
    from .gate import check_setting, known

    checked = []
    for name in names:
        exp = REGISTRY[name]
        for setting in [s.name for s in exp.settings()] if not args.setting else [args.setting]:
            c = check_setting(name, setting, out=args.out, rerun=args.rerun, update=args.update,
                              workers=args.workers)
            checked.append(c)
            if c.missing:
                print(f"\n{name}" + ("" if setting == DEFAULT else f" [{setting}]") + f": {c.missing}")
                continue
            if c.results:
                _print(name, setting, c.results)
            for line in c.changed:
                print(f"  VERDICT CHANGED {line}")
    notable = known(checked)
    if notable and not args.quiet:
        print("\nRecorded as not holding or inconclusive (these do not fail the check while they stay so):")
        print("\n".join("  " + line for line in notable))
    failed = [f"{c.name}" + ("" if c.setting == DEFAULT else f" [{c.setting}]") for c in checked if c.failed]
    if failed and not args.update:
        print(f"\ncheck failed: {', '.join(failed)} (a verdict changed, or no record: see above; after a "
              "deliberate change re-run the experiment, which re-records)")
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the registered experiments and their settings")
    rp = sub.add_parser("report", help="write docs/reproductions.md from the recorded claims files")
    rp.add_argument("--out", type=Path, default=RESULTS, help="the results folder read")
    rp.add_argument("--page", type=Path, default=None, help="the page written (default docs/reproductions.md)")
    rp.add_argument("--check", action="store_true", help="exit 1 if the page on disk differs from the records")
    pl = sub.add_parser("plot", help="re-draw NAME.png from the saved NAME.csv (no re-run)")
    pl.add_argument("names", nargs="*")
    pl.add_argument("--all", action="store_true")
    pl.add_argument("--out", type=Path, default=RESULTS)
    for cmd in ("run", "check"):
        p = sub.add_parser(cmd)
        p.add_argument("names", nargs="*")
        p.add_argument("--all", action="store_true")
        p.add_argument("--out", type=Path, default=RESULTS)
        p.add_argument("--kind", choices=("init", "train"), help="with --all: only this kind")
        p.add_argument("--quiet", action="store_true")
        p.add_argument("--setting", help="one declared setting (default, or a robustness one: see `list`)")
        p.add_argument("--workers", type=int, default=0, help="training-time experiments: parallel processes, "
                       "one thread each (default: one per core)")
        if cmd == "run":
            p.add_argument("--size", default="full", help="the grid: full (default), ci (reduced), or one an "
                           "experiment declares (wortsman_lr: seed0)")
            p.add_argument("--robustness", action="store_true", help="the default and every declared setting")
            p.add_argument("--seeds", help="comma list replacing the grid's seeds, e.g. 5,6,7 (exploration; "
                           "a declared setting records them as part of the experiment)")
            p.add_argument("--text", type=Path, help="training-time experiments: train on this text file (bytes)")
            p.add_argument("--only", action="append", default=[], metavar="KEY=V1,V2",
                           help="keep a subset of one of the grid's lists (e.g. depths=4,24); repeatable")
            p.add_argument("--merge", action="store_true", help="with --only: the subset's rows replace the same "
                           "rows of the recorded CSV (a re-run after a fix that touches some variants); the "
                           "record keeps its first run's timing and lists the re-run")
        else:
            p.add_argument("--rerun", action="store_true", help="re-run each experiment into a scratch folder "
                           "and compare its verdicts with the record")
            p.add_argument("--update", action="store_true", help="re-record the verdicts from the saved CSVs")
    args = ap.parse_args(argv)

    if args.cmd == "list":
        for name, exp in REGISTRY.items():
            settings = ", ".join(s.name for s in exp.settings())
            print(f"{name:22s} [{exp.kind}] {exp.reference.cite()}\n{'':22s} {exp.summary}\n{'':22s} seeds "
                  f"{exp.seeds()}; settings: {settings}")
        return 0
    if args.cmd == "report":
        from .report import PAGE, page, write

        target = args.page or PAGE
        if args.check:
            same = target.is_file() and target.read_text() == page(args.out)
            print(f"{target}: " + ("matches the records" if same else "differs from the records: "
                                   "python -m experiments report"))
            return 0 if same else 1
        print(write(target, args.out))
        return 0
    if args.cmd == "plot":
        import pandas as pd

        for name in _names(args):
            csv = args.out / f"{name}.csv"
            if csv.is_file():
                REGISTRY[name].plot(pd.read_csv(csv), args.out / f"{name}.png")
                print(args.out / f"{name}.png")
        return 0
    names = [n for n in _names(args) if not args.kind or REGISTRY[n].kind == args.kind]
    if args.setting:
        for n in names:
            REGISTRY[n].setting(args.setting)  # an undeclared setting: one line naming the choices
    return _run(args, names) if args.cmd == "run" else _check(args, names)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyError as exc:
        sys.exit(str(exc.args[0]) if exc.args else str(exc))
