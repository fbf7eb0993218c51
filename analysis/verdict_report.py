"""The "Verdicts" of a sweep's report: verdicts.csv, verdicts.png and the section's markdown.

A study (``+study=verdict``, its ``study.json`` in the sweep folder) is judged on its evaluation
runs, each cell at its tuned rate, with the cells that failed at every rate kept as failures; the
largest stable rate's scaling with depth comes from its tuning runs. Any other sweep with seeds is
judged run for run within each (depth, setting), and the section says the rates were not tuned.
The statistics: :mod:`analysis.verdicts`. Torch-free.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from analysis import metrics, style, verdicts
from resnorm.runs.folder import atomic_write

log = logging.getLogger(__name__)

#: the study's record in the sweep folder (written by the sweeper's study mode)
STUDY_FILE = "study.json"
UNITS = {"final_val_loss": "nats/token", "final_val_bpb": "bits/byte"}


def read_study(sweep_dir) -> Optional[Dict]:
    try:
        return json.loads((Path(sweep_dir) / STUDY_FILE).read_text())
    except (OSError, ValueError):
        return None


def _ids(runs: pd.DataFrame) -> pd.Series:
    return runs["run_dir"].map(lambda d: Path(str(d)).name)


def study_runs(sweep, study: Dict) -> Tuple[pd.DataFrame, pd.DataFrame, Dict]:
    """(evaluation runs, tuning runs, cells) of a study: the cells keyed by (variant, depth)."""
    eval_ids = {i for c in study["cells"] for i in c.get("eval_ids", [])}
    tune_ids = {i for c in study["cells"] for i in c.get("tune_ids", [])}
    ids = _ids(sweep.runs)
    cells = {(c["variant"], int(c["depth"])): dict(lr=c["lr"] if c["lr"] is not None else math.nan,
                                                    failing=bool(c["failing"]), outcomes=c["outcomes"])
             for c in study["cells"] if c.get("ready")}
    return sweep.runs[ids.isin(eval_ids)].copy(), sweep.runs[ids.isin(tune_ids)].copy(), cells


def _figure(table: pd.DataFrame, target: Path, unit: str) -> Path:
    """Differences with their intervals per variant (colour) and depth (x); filled markers and a star
    where the corrected test rejects, an x at the top for a cell that failed at every rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted(table["depth"].unique())
    variants = style.order(table["variant"].unique())
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(depths), 3.6))
    width = 0.7 / max(1, len(variants))
    top = np.nanmax(table[["high", "diff"]].to_numpy(dtype=float)) if table["diff"].notna().any() else 1.0
    for j, variant in enumerate(variants):
        rows = table[table["variant"] == variant]
        for _, row in rows.iterrows():
            x = depths.index(row["depth"]) + (j - (len(variants) - 1) / 2) * width
            colour = style.colour(variant)
            if row["verdict"] in (verdicts.FAILING, verdicts.BASELINE_FAILING):
                ax.plot(x, top, marker="x", color=colour, markersize=9, ls="none")
                continue
            if not math.isfinite(row["diff"]):
                continue
            significant = row["verdict"] in ("worse", "better")
            err = [[row["diff"] - row["low"]], [row["high"] - row["diff"]]] if math.isfinite(row["low"]) else None
            ax.errorbar(x, row["diff"], yerr=err, fmt="o", color=colour, capsize=3,
                        markerfacecolor=colour if significant else "white")
            if significant:
                ax.annotate("*", (x, row["high"] if math.isfinite(row["high"]) else row["diff"]),
                            ha="center", va="bottom", fontsize=12)
        ax.plot([], [], "o", color=style.colour(variant), label=style.label(variant))
    ax.axhline(0.0, color="0.4", lw=0.8)
    ax.set_xticks(range(len(depths)), [str(int(d)) for d in depths])
    ax.set_xlabel("depth (blocks)")
    baseline = style.label(table["baseline"].iloc[0])
    ax.set_ylabel(f"final val loss - {baseline} ({unit})")
    ax.set_title("Paired difference, 95% t interval (filled, *: corrected p < 0.05; x: failed at every rate)",
                 fontsize=8)
    ax.legend(fontsize=7, frameon=False, loc="best")
    fig.tight_layout()
    try:
        return atomic_write(target, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def _noise_lines(table: pd.DataFrame, unit: str) -> List[str]:
    floors = table.dropna(subset=["noise_floor"]).groupby("depth")["noise_floor"].first()
    if floors.empty:
        return []
    return ["Noise floor (the baseline's seed-to-seed standard deviation of the final loss): "
            + ", ".join(f"depth {int(d)}: {verdicts.fmt(v, 2)} {unit}" for d, v in floors.items()) + "."]


def edge_lines(cells: Optional[Dict], lrs) -> List[str]:
    """A line naming the cells whose tuned rate is the grid's lowest or highest: the best rate may lie
    beyond the grid, so their comparison is at a rate the tuning did not bracket."""
    if not cells or not lrs:
        return []
    low, high = min(lrs), max(lrs)
    edge = [f"{style.label(v)} at depth {d} ({verdicts.fmt_lr(c['lr'])}, the {'highest' if c['lr'] == high else 'lowest'})"
            for (v, d), c in sorted(cells.items()) if not c["failing"] and c["lr"] in (low, high)]
    if not edge:
        return []
    return ["", "Tuned at the edge of the rate grid (the best rate may lie beyond it; widen "
            "`hydra.sweeper.study.lrs` to bracket it): " + "; ".join(edge) + "."]


def _slope_lines(tune: pd.DataFrame) -> List[str]:
    if tune.empty or tune["depth"].nunique() < 2 or tune["lr"].nunique() < 2:
        return []
    runs = tune.copy()
    table = metrics.lr_sensitivity_table(runs, by=["variant", "depth", "seed"])
    top = float(runs["lr"].max())
    fits = verdicts.lr_scaling(table, top=top)
    lines = []
    for _, f in fits.iterrows():
        if f["censored"] and len(f["censored"]) >= f["depths"]:
            lines.append(f"- {style.label(f['variant'])}: stable at the grid's highest rate "
                         f"({verdicts.fmt_lr(top)}) at every depth: the grid does not bound it, no slope")
        elif math.isfinite(f["slope"]):
            interval = (f" [{f['low']:.2f}, {f['high']:.2f}]" if math.isfinite(f["low"]) else " (2 depths: no interval)")
            edge = (f"; at the grid's highest rate at depth {', '.join(map(str, f['censored']))}, so a bound there"
                    if f["censored"] else "")
            lines.append(f"- {style.label(f['variant'])}: largest stable LR ~ depth^{f['slope']:.2f}"
                         f"{interval} over {int(f['depths'])} depths{edge}")
        else:
            lines.append(f"- {style.label(f['variant'])}: no slope (a stable rate at fewer than 2 depths)")
    return ["", "Largest stable learning rate against depth (log-log least squares over the tuning grid, "
            "95% t interval on the slope):", ""] + lines


def verdict_section(sweep, out: Path, baseline: str = "pre", correction: str = "holm") -> Tuple[List[str], List[Path]]:
    """The markdown lines of the "Verdicts" section and the files written (verdicts.csv and
    verdicts.png, removed when there is nothing to judge)."""
    study = read_study(sweep.path)
    runs = metrics.with_bits_per_byte(sweep.runs)
    sweep_runs = sweep.runs
    sweep.runs = runs
    try:
        if study is not None:
            evals, tune, cells = study_runs(sweep, study)
            baseline = study["spec"].get("baseline", baseline)
            correction = study["spec"].get("correction", correction)
            evals["setting"] = ""
            head = (f"A study: each (variant, depth) at its own learning rate, picked from "
                    f"{len(study['spec']['lrs'])} rates on tuning seed(s) {study['spec']['tuning_seeds']}, then "
                    f"evaluated on fresh seeds {study['spec']['eval_seeds']} paired across variants.")
        else:
            evals, tune, cells = runs.copy(), runs.iloc[0:0], None
            head = ("The learning rates were not tuned: each comparison pairs the runs of one setting by "
                    "seed, at the rate they were given.")
    finally:
        sweep.runs = sweep_runs
    for path in (out / "verdicts.csv", out / "verdicts.png"):
        path.unlink(missing_ok=True)
    if baseline not in set(evals["variant"]) and not cells:
        return [], []
    loss = metrics.loss_column(evals)
    unit = UNITS.get(loss, loss)
    table = verdicts.verdict_table(evals, baseline, loss, correction, cells=cells, curves=sweep.steps, unit=unit)
    if table.empty or (cells is None and not (table["n_pairs"].fillna(0) >= 2).any()):
        return [], []  # no seeds to pair
    written = [atomic_write(out / "verdicts.csv", lambda tmp: table.to_csv(tmp, index=False))]
    figure = _figure(table, out / "verdicts.png", unit)
    written.append(figure)
    lines = ["## Verdicts", "", head + f" Baseline: {style.label(baseline)}; loss: `{loss}`; family: "
             f"{int(np.isfinite(table['p']).sum())} loss comparisons ({correction}).", ""]
    lines += [f"- {s}." for s in table["sentence"]]
    lines += [""] + _noise_lines(table, unit) + edge_lines(cells, study["spec"]["lrs"] if study else None)
    lines += _slope_lines(tune)
    lines += ["", f"![Verdicts]({figure.name})", "",
              "_How to read them: docs/verdicts.md (paired t interval, Holm correction, minimal detectable "
              "difference at power 0.8, Fisher's exact test on the failure counts)._", ""]
    return lines, written
