"""``python -m analysis SWEEP_DIR [--out OUT_DIR]``: write the report of a finished sweep.

Reads the sweep folder SWEEP_DIR; writes summary.csv, the figures and report.md into OUT_DIR
(default ``results/<basename of SWEEP_DIR>``, relative to the current directory) and prints the
path of every file written, one per line. A missing folder or one without runs is a one-line
``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import List, Optional


def default_out_dir(sweep_dir) -> Path:
    """``results/<sweep name>`` relative to the current directory (the name: SWEEP_DIR's basename)."""
    return Path("results") / Path(sweep_dir).resolve().name


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis",
                                     description="Figures and a report for a finished resnorm sweep.")
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep folder (e.g. multirun/<name>)")
    parser.add_argument("--out", metavar="OUT_DIR", default=None,
                        help="where to write (default: results/<basename of SWEEP_DIR>)")
    parser.add_argument("--baseline", default="pre", help="the variant every verdict compares with (default: pre; "
                        "a study's own baseline wins)")
    parser.add_argument("--correction", default="holm", choices=("holm", "bh", "bonferroni", "none"),
                        help="multiple-comparison correction of the verdicts (default: holm)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="analysis: %(message)s")
    warnings.formatwarning = lambda message, *rest, **kw: f"analysis: warning: {message}\n"
    if not Path(args.sweep_dir).is_dir():  # answer a typo before importing pandas and matplotlib
        what = "is not a folder" if Path(args.sweep_dir).exists() else "not found"
        print(f"error: sweep folder {what}: {args.sweep_dir}", file=sys.stderr)
        return 2

    from analysis.report import make_report

    out_dir = Path(args.out) if args.out else default_out_dir(args.sweep_dir)
    try:
        written = make_report(args.sweep_dir, out_dir, baseline=args.baseline, correction=args.correction)
    except (FileNotFoundError, ValueError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
