"""A sweep's report: one call from a sweep folder to summary.csv, figures and report.md.

Reads the sweep with :func:`analysis.load.load_sweep`; writes into ``out_dir`` (created if needed),
every file atomically (temporary file in the same folder, then ``os.replace``):

- ``summary.csv``: one row per run, :data:`analysis.metrics.RUN_METRIC_COLUMNS`; ``run_dir`` is
  relative to the sweep folder so the file reads the same on any machine.
- ``seed_summary.csv``: one row per (variant, depth, setting): the final validation loss over seeds
  (mean, 95% CI), the count of each outcome and the failure rate (with its 95% CI), see
  :func:`analysis.metrics.seed_summary`.
- one PNG per figure of :data:`analysis.plots.FIGURES` (``depth_vs_val_loss.png``,
  ``failure_rate.png``, ``spike_rate.png``, ``stability_frontier.png``, ``lr_depth_heatmap.png``,
  ``lr_sensitivity_vs_depth.png``, ``loss_curves.png``, ``layer_profiles.png``,
  ``monitor_profiles.png``, ``coord_check.png``; ``downstream.png`` when runs were fine-tuned,
  :mod:`analysis.downstream`); a figure the data cannot support is skipped (report.md says why), and a
  stale file of that name from an earlier report is removed so the folder never shows a figure of
  other data.
- ``lr_sensitivity.csv``: only when the sweep has several learning rates; one row per LR sweep
  (variant, depth, seed and any other swept key), see :func:`analysis.metrics.lr_sensitivity_table`.
- ``verdicts.csv`` and ``verdicts.png`` when the sweep has paired seeds or is a study
  (:mod:`analysis.verdict_report`): every variant against the baseline per depth, with its
  interval, corrected p-value and verdict sentence; the sentences open report.md ("Verdicts").
- ``report.md``: the sweep's path relative to the current directory (absolute, and said so, when
  the sweep is outside it), how the outcomes were decided when older summaries lack them, every
  figure embedded (or why it was not drawn), the run table, the seed table, the LR-sensitivity table
  when there is one, the metric definitions.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from analysis import canvas, downstream, metrics, plots, style
from analysis.load import load_sweep
from analysis.verdict_report import verdict_section
from resnorm.runs.folder import OUTCOMES, atomic_write, write_text

log = logging.getLogger(__name__)

#: figure name (a key of analysis.plots.FIGURES) -> its section title in report.md
FIGURE_TITLES = {
    "depth_vs_val_loss": "Final validation loss vs depth",
    "failure_rate": "Outcome of the runs vs depth (failure rate)",
    "spike_rate": "Loss spikes per 1000 steps vs depth",
    "stability_frontier": "Stability frontier: largest stable learning rate vs depth",
    "lr_depth_heatmap": "Final loss over learning rate x depth",
    "lr_sensitivity_vs_depth": "LR sensitivity vs depth",
    "loss_curves": "Loss curves",
    "layer_profiles": "Per-layer profiles at step 0 and at the last logged step",
    "monitor_profiles": "Per-layer monitor quantities at the first and the last logged step",
    "coord_check": "Depth coord check",
    "downstream": "Downstream score after fine-tuning vs depth",  # python -m resnorm.finetune
}
_MD_COLUMNS = (
    ("short_name", "run"), ("variant", "variant"), ("depth", "depth"), ("seed", "seed"), ("lr", "lr"),
    ("status", "status"), ("outcome", "outcome"), ("diverged_step", "diverged at"), ("final_train_loss", "final train"),
    ("final_val_loss", "final val"), ("best_val_loss", "best val"), ("unigram_loss", "unigram"),
    ("final_val_bpb", "val bits/byte"), ("loss_spikes", "spikes"),
    ("tokens_per_s", "tokens/s"),
)


class _Collect(logging.Handler):
    """Keeps the messages logged while the figures are drawn (the reasons a figure was skipped)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _cell(value) -> str:
    """A markdown table cell: 4 significant digits for floats (whole numbers from 10,000 up), an en
    dash for missing values."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(table: pd.DataFrame, columns) -> str:
    """``table`` as a GitHub markdown table; ``columns`` are ``(column, header)`` pairs."""
    columns = [(c, h) for c, h in columns if c in table.columns]
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(row[c]) for c, _ in columns) + " |")
    return "\n".join(lines)


def short_names(sweep) -> Dict[str, str]:
    """``run_dir -> name`` made of the run's swept overrides only (``depth=6,model.norm=pre``), so
    the markdown table stays readable when every job repeats the same fixed overrides; the run name
    when the run has no swept override."""
    names = {}
    for run_dir, run_name, overrides in zip(sweep.runs["run_dir"], sweep.runs["run_name"],
                                            sweep.runs["overrides"]):
        swept = [o for o in overrides if o.split("=", 1)[0].lstrip("+") in sweep.axes]
        names[run_dir] = ",".join(swept) or str(run_name)
    return names


def _sorted_runs(table: pd.DataFrame) -> pd.DataFrame:
    rank = {v: i for i, v in enumerate(style.order(table["variant"]))}
    key = table["variant"].map(lambda v: rank.get(str(v), len(rank)))
    return (table.assign(_rank=key).sort_values(["_rank", "depth", "lr", "seed", "run_name"], kind="stable")
            .drop(columns="_rank").reset_index(drop=True))


def _lr_table(sweep) -> Optional[pd.DataFrame]:
    """LR sensitivity per LR sweep (variant, depth, seed and every other swept key), None when the
    sweep has fewer than two learning rates or its runs do not form clean LR sweeps (logged)."""
    if sweep.runs["lr"].nunique(dropna=True) < 2:
        return None
    runs, keys = metrics.lr_sweep_runs(sweep)
    try:
        return metrics.lr_sensitivity_table(runs, by=["variant", "depth", "seed"] + keys)
    except ValueError as exc:
        log.warning("no LR sensitivity table: %s", exc)
        return None


def _seed_table(sweep) -> pd.DataFrame:
    """:func:`analysis.metrics.seed_summary` of the runs with a variant and a depth, in figure order
    (variant order, depth, then settings by learning rate)."""
    runs = sweep.runs[sweep.runs["variant"].notna() & sweep.runs["depth"].notna()].copy()
    runs["setting"] = runs["setting"].fillna("")
    table = metrics.seed_summary(runs, by=("variant", "depth", "setting"))
    variant_rank = {v: i for i, v in enumerate(style.order(runs["variant"]))}
    setting_rank = {s: i for i, s in enumerate(canvas.setting_order(runs))}
    return (table.assign(_v=table["variant"].map(variant_rank), _s=table["setting"].map(setting_rank))
            .sort_values(["_v", "depth", "_s"], kind="stable").drop(columns=["_v", "_s"])
            .reset_index(drop=True))


def _seed_markdown(table: pd.DataFrame) -> str:
    """The seed table as markdown: outcome counts, failure rate with its interval, mean +- half-width
    with n."""
    def interval(row) -> str:
        if math.isnan(row["failure_rate"]):
            return "\u2013"
        return f"{row['failure_rate']:.2f} [{row['failure_low']:.2f}, {row['failure_high']:.2f}]"

    def mean(row) -> str:
        if row["n"] == 0:
            return "\u2013"
        half = "" if math.isnan(row["ci95"]) else f" \u00b1 {row['ci95']:.3g}"
        return f"{row['mean']:.4g}{half} (n={row['n']})"

    counts = ["/".join(str(int(row[o])) for o in OUTCOMES) for _, row in table.iterrows()]
    shown = table.assign(outcomes=counts, rate=table.apply(interval, axis=1), loss=table.apply(mean, axis=1))
    columns = [("variant", "variant"), ("depth", "depth")]
    if (table["setting"] != "").any():
        columns.append(("setting", "setting"))
    columns += [("runs", "runs"), ("outcomes", " / ".join(OUTCOMES)),
                ("rate", "failure rate [95% CI]"), ("loss", "final val loss, mean \u00b1 95% CI")]
    return markdown_table(shown, columns)


def sweep_source(path: Path, cwd: Optional[Path] = None) -> str:
    """How report.md names the sweep: its path relative to ``cwd`` (the current directory when the
    report is written), or the absolute path, said to be outside it, when it is not under ``cwd``."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    try:
        return f"`{Path(path).resolve().relative_to(cwd.resolve()).as_posix() or '.'}`"
    except ValueError:
        return f"`{Path(path).resolve()}` (outside the directory the report was made in)"


def _outcome_note(sweep) -> List[str]:
    """A line saying how the outcomes were decided when some were derived (older summaries)."""
    runs = sweep.runs
    derived = runs["outcome_derived"].fillna(False).astype(bool) & runs["outcome"].notna()
    if not derived.any():
        return []
    no_baseline = derived & runs["unigram_loss"].isna() & (runs["status"] == "completed")
    text = (f"Outcomes: {int(derived.sum())} of {len(runs)} runs predate the recorded `outcome`; theirs "
            "is derived from the status, the divergence reason and the final validation loss")
    if no_baseline.any():
        text += (f". {int(no_baseline.sum())} completed run(s) recorded no `unigram_loss`: without a "
                 "baseline a stalled run cannot be told apart, so they count as trained")
    else:
        text += " against the recorded `unigram_loss`"
    return [text + ".", ""]


def _markdown(sweep, table: pd.DataFrame, figures: Dict[str, Optional[Path]], skipped: Dict[str, str],
              seed_table: pd.DataFrame, lr_table: Optional[pd.DataFrame], spike_params: Dict[str, float],
              verdict_lines: Optional[List[str]] = None) -> str:
    counts = Counter(table["status"])
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    commits = sorted({str(c)[:10] for c in sweep.runs["git_commit"].dropna()})
    torches = sorted({str(t) for t in sweep.runs["torch_version"].dropna()})
    outcomes = Counter(o for o in table["outcome"] if isinstance(o, str))
    outcome_text = ", ".join(f"{outcomes[o]} {o}" for o in OUTCOMES if outcomes[o])
    lines = [f"# Sweep `{sweep.name}`", "",
             f"Source: {sweep_source(sweep.path)}: {len(table)} runs ({status}"
             + (f"; outcomes: {outcome_text}" if outcome_text else "") + ").",
             f"Code: git {', '.join(commits) or 'unknown'}; torch {', '.join(torches) or 'unknown'}.", ""]
    lines += list(verdict_lines or [])  # the "Verdicts" section opens the report
    if getattr(sweep, "versions", None):
        lines += [f"**Mixed code versions:** {sweep.versions}. Runs of different commits (or of a tree with "
                  "local changes) are comparable only if the changes between them cannot move the numbers.", ""]
    lines += _outcome_note(sweep)
    if sweep.axes:
        lines += [f"Swept keys: {', '.join(f'`{a}`' for a in sweep.axes)}.", ""]
    for name in figures:
        title = FIGURE_TITLES.get(name, name.replace("_", " "))
        lines += [f"## {title}", ""]
        if figures.get(name) is not None:
            lines += [f"![{title}]({figures[name].name})", ""]
        else:
            lines += [f"_Not drawn: {skipped.get(name, 'see the log')}._", ""]
    lines += ["## Runs", "", markdown_table(table, _MD_COLUMNS), ""]
    if sweep.skipped:
        lines += ["## Runs left out or incomplete", ""] + [f"- `{where}`: {why}" for where, why in sweep.skipped] + [""]
    lines += ["## Over seeds: final loss and outcomes per variant and depth", "",
              _seed_markdown(seed_table), ""]
    if lr_table is not None:
        columns = [(c, c) for c in lr_table.columns[:-5]] + [
            ("n_lr", "LRs"), ("lr_sensitivity", "LR sensitivity"), ("best_loss", "best loss l*"),
            ("best_lr", "best lr"), ("largest_stable_lr", "largest stable lr")]
        lines += ["## LR sensitivity", "", markdown_table(lr_table, columns), ""]
    lines += [
        "## Definitions", "",
        f"- **spikes**: excursions of the train loss above {spike_params['factor']:g}x the median of "
        f"the previous {spike_params['window']} steps' finite losses (at least "
        f"{spike_params['min_history']} of them); consecutive spike steps count once.",
        "- **final train**: as the run's summary reports it; **final val**: the last evaluation of a "
        "completed run (none for a diverged run); **best val**: the lowest evaluation.",
        "- **outcome**: trained; stalled (completed with a final val loss above the unigram loss "
        "minus `train.stall_margin`: it learned nothing beyond byte frequencies); diverged (the loss "
        "blew up past `train.diverge_factor` x the initial loss); nonfinite (a loss or gradient went "
        "NaN/inf). **unigram**: the training split's unigram entropy (nats per token).",
        "- **over seeds**: the mean of the completed runs' final val loss with a 95% Student-t "
        "confidence interval (none for one run); **failure rate**: the runs whose outcome is not "
        "trained over the runs that completed or diverged, with a 95% Wilson score interval. Failed "
        "and running runs are left out.",
        f"- **largest stable lr** (frontier figure, LR table): the largest rate all of whose runs "
        f"trained (completed, not stalled) with a finite final val loss at least "
        f"{metrics.STABLE_MARGIN:g} nat below the initial loss.",
        "- **spike rate**: the training's own loss spikes (`spike_count` in the summary, or the "
        "`spike` column of metrics.parquet) per 1000 steps done.",
    ]
    if lr_table is not None:
        lines.append("- **LR sensitivity** (Wortsman et al. 2023, arXiv:2309.14322): mean over the LR "
                     "grid of min(final val loss, initial loss) minus the best such loss l*; a diverged "
                     "run counts as the initial loss, a stalled one as its own final loss (near the "
                     "unigram loss). Failed and running runs are left out.")
    return "\n".join(lines) + "\n"


def make_report(sweep_dir, out_dir, spike_window: int = metrics.SPIKE_WINDOW,
                spike_factor: float = metrics.SPIKE_FACTOR,
                spike_min_history: int = metrics.SPIKE_MIN_HISTORY, baseline: str = "pre",
                correction: str = "holm") -> List[Path]:
    """Load the sweep at ``sweep_dir`` and write its report into ``out_dir``; return the files written.

    Raises FileNotFoundError/ValueError (from :func:`analysis.load.load_sweep`) for a missing folder
    or one without runs. A figure that raises is logged with its traceback and left out; the rest of
    the report is still written.
    """
    sweep = load_sweep(sweep_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []

    table = _sorted_runs(metrics.run_metrics(sweep, spike_window, spike_factor, spike_min_history))
    table["short_name"] = table["run_dir"].map(short_names(sweep))
    csv = table[list(metrics.RUN_METRIC_COLUMNS)].copy()
    csv["run_dir"] = [_relative(d, sweep.path) for d in csv["run_dir"]]
    written.append(atomic_write(out / "summary.csv", lambda tmp: csv.to_csv(tmp, index=False)))

    figures: Dict[str, Optional[Path]] = {}
    skipped: Dict[str, str] = {}
    collect = _Collect()
    canvas.log.addHandler(collect)
    try:
        for name, draw in {**plots.FIGURES, **downstream.figures(sweep)}.items():  # + downstream
            target = out / f"{name}.png"
            collect.messages.clear()
            try:
                figures[name] = draw(sweep, target)
            except Exception as exc:  # noqa: BLE001  # one bad figure must not lose the report
                log.exception("figure %s failed", name)
                figures[name] = None
                skipped[name] = f"drawing failed ({type(exc).__name__}: {exc})"
            if figures[name] is None:
                skipped.setdefault(name, "; ".join(collect.messages) or "see the log")
                target.unlink(missing_ok=True)
            else:
                written.append(figures[name])
    finally:
        canvas.log.removeHandler(collect)

    seed_table = _seed_table(sweep)
    written.append(atomic_write(out / "seed_summary.csv", lambda tmp: seed_table.to_csv(tmp, index=False)))

    if downstream.figures(sweep):  # fine-tuned: per-seed scores, t intervals and the floors; paired verdicts
        fine_tunes = downstream.downstream_table(sweep)
        scores = downstream.score_intervals(fine_tunes)
        written.append(atomic_write(out / "downstream.csv", lambda tmp: scores.to_csv(tmp, index=False)))
        paired = downstream.downstream_verdicts(fine_tunes, baseline, correction)
        written.append(atomic_write(out / "downstream_verdicts.csv", lambda tmp: paired.to_csv(tmp, index=False)))

    lr_table = _lr_table(sweep)
    lr_csv = out / "lr_sensitivity.csv"
    if lr_table is not None:
        written.append(atomic_write(lr_csv, lambda tmp: lr_table.to_csv(tmp, index=False)))
    else:
        lr_csv.unlink(missing_ok=True)

    verdict_lines, verdict_files = verdict_section(sweep, out, baseline, correction)
    written += verdict_files
    spike_params = dict(window=spike_window, factor=spike_factor, min_history=spike_min_history)
    text = _markdown(sweep, table, figures, skipped, seed_table, lr_table, spike_params, verdict_lines)
    written.append(write_text(out / "report.md", text))
    return written


def _relative(run_dir: str, root: Path) -> str:
    try:
        return Path(run_dir).relative_to(root).as_posix() or "."
    except ValueError:
        return str(run_dir)
