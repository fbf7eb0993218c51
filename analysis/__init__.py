"""resnorm analysis: read what runs wrote, compute stability metrics, draw figures, write a report.

The package never imports ``torch``: it reads run folders (``summary.json``, ``metrics.parquet``,
``layers.parquet``) so it works on runs copied from any machine. The folder's format (file names,
statuses, :func:`~resnorm.runs.folder.read_summary`, :func:`~resnorm.runs.folder.atomic_write`) comes
from the torch-free :mod:`resnorm.runs.folder`, the module the training writes with.

Modules, one job each:

- :mod:`analysis.load`: run folders -> tidy pandas DataFrames (:class:`~analysis.load.Sweep`).
- :mod:`analysis.style`: fixed colours and display labels per variant.
- :mod:`analysis.metrics`: per-run stability metrics, loss spikes, LR sensitivity, largest stable LR,
  outcomes, spike rates, seed statistics (mean with a 95% CI, failure rate per outcome); the one
  implementation of each definition, also used by :mod:`experiments`.
- :mod:`analysis.verdicts`: the statistics of a comparison (paired t difference, Holm/BH, exact test
  of failure rates, noise floor, minimal detectable difference, LR-depth slope), all from
  scipy/statsmodels; :mod:`analysis.verdict_report`: a sweep's verdicts.csv, verdicts.png and the
  "Verdicts" section of report.md (a study's tuned cells, or any sweep's seeds).
- :mod:`analysis.plots`: the figures (seaborn/matplotlib, Agg), registered in ``plots.FIGURES``.
- :mod:`analysis.report`: ``make_report(sweep_dir, out_dir)`` writes summary.csv, seed_summary.csv,
  lr_sensitivity.csv (LR sweeps), every figure and report.md.
- :mod:`analysis.callback`: the Hydra callback that makes the report at the end of a multirun.

``python -m analysis SWEEP_DIR [--out OUT_DIR]`` runs the report from the command line.

Importing this package is cheap: pandas and matplotlib are only imported when a name below is used.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Sweep": "analysis.load",
    "Run": "analysis.load",
    "load_sweep": "analysis.load",
    "load_run": "analysis.load",
    "make_report": "analysis.report",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
