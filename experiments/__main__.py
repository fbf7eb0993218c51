"""``python -m experiments list | run NAME...|--all | check NAME...|--all``.

- ``run``: computes the data (init-time experiments in-process, seconds to a few minutes; training-time
  ones train in-process, each run cached under ``multirun/papers/<size>/<name>/`` so a killed run resumes),
  writes ``results/papers/NAME.{csv,png,claims.json}`` and prints the claims.
- ``check``: re-evaluates the claims from ``NAME.csv`` and prints each with its measured value and
  PASS / FAIL / SKIPPED; ``--run-missing`` runs an experiment that has no CSV yet. Exit status 1 if any
  claim FAILs (SKIPPED does not fail).
- ``--size ci`` uses the reduced grids the test suite runs; ``--out DIR`` writes elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import REGISTRY, check_experiment, run_experiment
from .core import FAIL, RESULTS, RUNS


def _names(args) -> list:
    if args.all:
        return list(REGISTRY)
    if not args.names:
        raise SystemExit("name an experiment or pass --all (see `python -m experiments list`)")
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown experiment {', '.join(unknown)}; choose from {', '.join(REGISTRY)}")
    return args.names


def _print(name, results) -> bool:
    exp = REGISTRY[name]
    print(f"\n{name} — {exp.reference.cite()}")
    for r in results:
        print("  " + r.line())
    return not any(r.status == FAIL for r in results)


def _timing(saved: dict) -> str:
    """", 312 s on 2 cores (load average 1.2 -> 2.0)" from a claims.json, as much as it records."""
    wall, m = saved.get("wall_s"), saved.get("machine") or {}
    if not wall:
        return ""
    text = f", {wall:.0f} s"
    if m.get("cores"):
        text += f" on {m['cores']} cores"
        if m.get("load_avg_start") is not None:
            text += f" (1-min load average {m['load_avg_start']:g} at the start, {m['load_avg_end']:g} at the end)"
    else:
        text += " on the shared 2-core machine"
    if m.get("runs_cached") and not m.get("runs_trained"):
        text += f"; all {m['runs_cached']} runs read from the cache of an earlier call"
    elif m.get("runs_cached"):
        text += f"; {m['runs_trained']} runs trained, {m['runs_cached']} read from the cache"
    return text


def markdown(out: Path) -> str:
    """One block of docs/reproductions.md per experiment that has a claims.json: command, paper, figure,
    claim table (the figure linked relative to docs/)."""
    import json

    from .core import ClaimResult, claim_table

    blocks = []
    for name, exp in REGISTRY.items():
        f = out / f"{name}.claims.json"
        if not f.is_file():
            continue
        saved = json.loads(f.read_text())
        results = [ClaimResult(**c) for c in saved["claims"]]
        refs = "; ".join(r.cite() for r in [exp.reference, *exp.extra_refs])
        blocks.append(
            f"### `{name}`: {exp.summary}\n\n{refs}\n\n`python -m experiments run {name}` "
            f"(grid `{saved.get('size')}`{_timing(saved)})\n\n"
            f"![{name}](../results/papers/{name}.png)\n\n{claim_table(exp, results)}\n")
    return "\n".join(blocks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the registered experiments")
    md = sub.add_parser("markdown", help="docs/reproductions.md's claim tables, from the saved claims.json files")
    md.add_argument("--out", type=Path, default=RESULTS)
    pl = sub.add_parser("plot", help="re-draw NAME.png from the saved NAME.csv (no re-run)")
    pl.add_argument("names", nargs="*")
    pl.add_argument("--all", action="store_true")
    pl.add_argument("--out", type=Path, default=RESULTS)
    for cmd in ("run", "check"):
        p = sub.add_parser(cmd)
        p.add_argument("names", nargs="*")
        p.add_argument("--all", action="store_true")
        p.add_argument("--out", type=Path, default=RESULTS)
        p.add_argument("--size", default="full", help="the grid: full (default), ci (reduced), or one an "
                       "experiment declares (wortsman_lr: seed0)")
        p.add_argument("--kind", choices=("init", "train"), help="with --all: only this kind")
        p.add_argument("--quiet", action="store_true")
        p.add_argument("--seeds", help="comma list replacing the grid's seeds, e.g. 5,6,7 (robustness check)")
        p.add_argument("--workers", type=int, default=0, help="training-time experiments: parallel processes, "
                       "one thread each (default: one per core)")
        p.add_argument("--text", type=Path, help="training-time experiments: train on this text file (bytes)")
        if cmd == "check":
            p.add_argument("--run-missing", action="store_true", help="run experiments that have no CSV yet")
    args = ap.parse_args(argv)

    if args.cmd == "list":
        for name, exp in REGISTRY.items():
            print(f"{name:22s} [{exp.kind}] {exp.reference.cite()}\n{'':22s} {exp.summary}")
        return 0
    if args.cmd == "markdown":
        print(markdown(args.out))
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
    ok = True
    for name in names:
        if args.cmd == "run" or (args.run_missing and not (args.out / f"{name}.csv").is_file()):
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
            _, results = run_experiment(name, size=args.size, out=args.out, runs_dir=RUNS, verbose=not args.quiet,
                                        seeds=seeds, text=args.text, workers=args.workers)
        elif not REGISTRY[name].claims and not (args.out / f"{name}.csv").is_file():
            print(f"\n{name}: report-only (no claims), not run yet: python -m experiments run {name}")
            continue
        else:
            try:
                results = check_experiment(name, out=args.out)
            except FileNotFoundError as exc:
                print(f"\n{name}: {exc}")
                ok = False
                continue
        ok &= _print(name, results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
