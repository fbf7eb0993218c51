"""The training-time reproductions (Wortsman et al. 2023, Xiong et al. 2020 Fig. 2) train through
the shared loop.

Each run spec (the keys of :data:`DEFAULTS`) becomes the command-line overrides of the config
``run.py`` would train with (:func:`overrides`), and the run trains through
:func:`resnorm.train.job.execute`, that is :func:`resnorm.train.loop.fit` with the default callbacks plus
:class:`resnorm.train.callbacks.FinalReadouts` (the final max attention logit and log Z). Each run is an
ordinary run folder ``<runs_dir>/<run_id>/`` named by its identity (:func:`resnorm.runs.identity.run_id`):
re-running an experiment skips finished runs and resumes interrupted ones from their checkpoint.

Recipe (Wortsman et al. 2023, arXiv:2309.14322 §2-3; docs/papers.md): AdamW(beta1, beta2, eps),
global grad-norm clip, linear warm-up then cosine decay to ``min_lr_ratio`` of the peak,
**independent** weight decay ``wd`` on matrices only (``optim.weight_decay_coupling=independent``),
optional z-loss and qk-layernorm; the validation loss (cross-entropy alone, without the z-loss) on
fixed held-out batches at the end. Only a non-finite loss or gradient norm counts as diverged
(``train.diverge_factor=null``); a diverged run's final loss is NaN and LR-sensitivity counts it as
the initial loss.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

DEFAULTS: Dict[str, Any] = dict(
    variant="pre", depth=4, d_model=64, n_heads=2, d_ff=256, vocab=64, activation="gelu", qk_norm=False,
    z_loss=1e-4, lr=1e-3, steps=300, warmup_frac=0.05, min_lr_ratio=0.1, wd=1e-4, clip=1.0, beta1=0.9,
    beta2=0.95, eps=1e-8, seed=0, batch=16, seq_len=64, eval_batches=4, data="synthetic",
    data_path=None, synthetic_tokens=200_000,
    probes=False, probe_every=0, log_every=1,  # monitors on for the experiments that read layers.parquet
)


def data_spec(grid: Dict[str, Any]) -> Dict[str, Any]:
    """The data keys of a run spec: the synthetic stream (vocab 64), or ``grid["text"]`` read as bytes (vocab 256)."""
    if grid.get("text"):
        return dict(data="text", data_path=str(grid["text"]), vocab=256)
    return dict(data="synthetic", data_path=None, vocab=64)


def data_label(df) -> str:
    """What the runs of ``df`` trained on, for a figure title: its ``data`` column (see :func:`run_grid`'s
    callers), "synthetic stream" when absent (CSVs written before the column existed)."""
    if "data" not in getattr(df, "columns", ()) or df["data"].isna().all():
        return "synthetic stream"
    names = sorted(set(df["data"].dropna().astype(str)))
    return ", ".join("synthetic stream" if n == "synthetic" else f"text {n}" for n in names)


def data_name(spec: Dict[str, Any]) -> str:
    """``synthetic``, or the text file's name, of a run spec (the ``data`` column of the experiments)."""
    from pathlib import Path

    return "synthetic" if spec.get("data", "synthetic") == "synthetic" else Path(str(spec["data_path"])).name


def overrides(spec: Dict[str, Any]) -> List[str]:
    """The command-line overrides of a run spec (keys of :data:`DEFAULTS`): the config ``run.py``
    would train with the same settings. Operational keys (one thread, no W&B, no progress bar)
    leave the run identity unchanged."""
    s = {**DEFAULTS, **spec}
    synthetic = s["data"] == "synthetic"
    out = [f"depth={s['depth']}", f"seed={s['seed']}", "name=papers",
           f"model.norm={s['variant']}", f"model.d_model={s['d_model']}", f"model.n_heads={s['n_heads']}",
           f"model.d_ff={s['d_ff']}", f"model.vocab_size={s['vocab']}", f"model.activation={s['activation']}",
           "model.init=xavier", f"model.qk_norm={str(bool(s['qk_norm'])).lower()}", f"model.z_loss={s['z_loss']!r}",
           f"data={s['data']}", f"data.synthetic_vocab={min(s['vocab'], 64) if synthetic else 64}",
           f"data.synthetic_tokens={s['synthetic_tokens']}",
           f"optim.lr={s['lr']!r}", f"optim.warmup_steps={int(round(s['warmup_frac'] * s['steps']))}",
           f"optim.min_lr_ratio={s['min_lr_ratio']!r}", f"optim.beta1={s['beta1']!r}", f"optim.beta2={s['beta2']!r}",
           f"optim.eps={s['eps']!r}", f"optim.weight_decay={s['wd']!r}", "optim.weight_decay_coupling=independent",
           f"optim.grad_clip={s['clip']!r}" if s["clip"] else "optim.grad_clip=null",
           f"train.steps={s['steps']}", f"train.batch_size={s['batch']}", f"train.seq_len={s['seq_len']}",
           f"train.eval_batches={s['eval_batches']}", f"train.eval_every={s['steps']}",
           "train.diverge_factor=null", f"train.probes={str(bool(s['probes'])).lower()}",
           f"train.probe_every={s['probe_every']}", f"train.log_every={s['log_every']}",
           "train.progress=false", "train.threads=1", "logger.mode=disabled"]
    if not synthetic:
        out.append(f"data.path={s['data_path']}")
    return _without_preset_keys(out, s["variant"])


def _without_preset_keys(out: List[str], variant: str) -> List[str]:
    """A variant with an optimizer preset (nGPT: no warm-up, no weight decay) trains
    with it inside the harness too; the harness's own values for those keys are left out."""
    from resnorm.config.variants import get_variant

    keys = tuple(f"optim.{name}=" for name, _ in get_variant(variant).optim_preset)
    return [o for o in out if not o.startswith(keys)] if keys else out


def record(spec: Dict[str, Any], summary: Dict[str, Any]) -> Dict[str, Any]:
    """The experiment's record of one run, from its ``summary.json``: a diverged run (a non-finite
    loss or gradient, or a non-finite final loss) has ``final_eval_loss`` NaN."""
    if summary.get("status") not in ("completed", "diverged"):
        raise RuntimeError(f"run {summary.get('run_id')} ({spec}) {summary.get('status')}: {summary.get('error')}")
    final = summary.get("final_val_loss")
    diverged = summary["status"] == "diverged" or final is None or not math.isfinite(final)
    nan = float("nan")
    return dict(spec=spec, run_id=summary["run_id"], initial_loss=summary["initial_loss"],
                final_eval_loss=nan if diverged else final, final_train_loss=summary.get("final_train_loss"),
                diverged=diverged, diverged_step=summary.get("diverged_step"),
                max_attn_logit=_number(summary.get("final_max_attn_logit")),
                mean_log_z=_number(summary.get("final_mean_log_z")), steps_done=summary["steps_done"],
                wall_s=summary.get("wall_s"), outcome=summary.get("outcome"))


def run_layers(ctx, rec: Dict[str, Any], quantities) -> "pd.DataFrame":
    """The rows of ``quantities`` in the ``layers.parquet`` of a record's run folder (under
    ``ctx.runs_dir``); empty when the run stored none (monitors off, or it diverged at step 0)."""
    import pandas as pd

    path = ctx.runs_dir / rec["run_id"] / "layers.parquet"
    if not path.is_file():
        return pd.DataFrame(columns=["step", "layer", "sublayer", "quantity", "value"])
    t = pd.read_parquet(path)
    return t[t.quantity.isin(list(quantities))]


def loss_row(r: Dict[str, Any], *keys: str) -> Dict[str, Any]:
    """One experiment row of a run record: ``data``, the spec's ``keys``, the final and initial losses,
    ``diverged``, and ``loss``: the final loss clipped at the initial one (a diverged run counts as
    its initial loss)."""
    sp, final, initial = r["spec"], r["final_eval_loss"], r["initial_loss"]
    return dict(data=data_name(sp), **{k: sp[k] for k in keys}, final_eval_loss=final, initial_loss=initial,
                diverged=r["diverged"], loss=initial if math.isnan(final) else min(final, initial))


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def _train(spec: Dict[str, Any], runs_dir: str) -> Dict[str, Any]:
    """Train (or find finished) one spec in ``runs_dir/<run_id>/`` through the shared loop."""
    from pathlib import Path

    from resnorm.train.callbacks import FinalReadouts, default_callbacks
    from resnorm.config.compose import compose
    from resnorm.runs.identity import run_id
    from resnorm.train.job import JobInfo, execute
    from resnorm.train.preflight import validate

    over = overrides(spec)
    cfg = compose(over)
    validate(cfg)
    rid = run_id(cfg)
    job = JobInfo(Path(runs_dir) / rid, ",".join(over[:4]), "papers", over, rid)
    return record(spec, execute(cfg, job, callbacks=lambda run: default_callbacks(run, [FinalReadouts()])))


def _finished(spec: Dict[str, Any], runs_dir) -> Optional[Dict[str, Any]]:
    """The summary of the spec's run folder if that run is over (completed or diverged), else None."""
    from resnorm.config.compose import compose
    from resnorm.runs.identity import run_id
    from resnorm.runs.folder import DONE, read_summary

    summary = read_summary(runs_dir / run_id(compose(overrides(spec))))
    return summary if summary and summary.get("status") in DONE else None


def _worker_init() -> None:
    """Each worker process: one torch thread (parallel jobs on few cores must not oversubscribe them)."""
    import torch

    torch.set_num_threads(1)


def run_grid(specs: List[Dict[str, Any]], ctx) -> List[Dict[str, Any]]:
    """Train every spec not already cached under ``ctx.runs_dir``; return all records (cached ones included).

    The missing runs go to ``ctx.workers`` processes (:func:`experiments.core.run_experiment` makes it
    one per core this process may use), one torch thread each; with one worker they train in this
    process. Each run is a run folder, checkpointed as it trains and finished by its summary, so an
    interrupted grid resumes where it stopped. The workers are started
    with ``spawn`` (a fork of a process that already ran torch's thread pool can hang), so a script
    that calls this must guard its entry point with ``if __name__ == "__main__":``.
    """
    from resnorm.train.devices import environ

    ctx.runs_dir.mkdir(parents=True, exist_ok=True)
    full = [{**DEFAULTS, **s} for s in specs]
    finished = [_finished(f, ctx.runs_dir) for f in full]  # each run folder read once
    out: List[Any] = [None if s is None else record(f, s) for f, s in zip(full, finished)]
    todo = [i for i, rec in enumerate(out) if rec is None]
    ctx.runs_trained += len(todo)
    ctx.runs_cached += len(specs) - len(todo)
    workers = max(1, min(ctx.workers, len(todo)))
    if todo:
        ctx.log(f"{len(specs) - len(todo)} of {len(specs)} runs cached; training {len(todo)} "
                f"on {workers} worker{'s' * (workers > 1)}, 1 thread each")

    def report(i, rec):
        f = full[i]
        ctx.log(f"{i + 1}/{len(specs)} {f['variant']} L={f['depth']} lr={f['lr']:g} qk={f['qk_norm']} "
                f"seed={f['seed']}: loss {rec['final_eval_loss']:.3f} max logit {rec['max_attn_logit']:.3g} "
                f"({rec['wall_s']:.0f} s)")

    if workers == 1:
        for i in todo:
            out[i] = _train(full[i], str(ctx.runs_dir))
            report(i, out[i])
        return out

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # the workers' OpenMP threads sleep instead of spinning when idle (a spinning one slowed a busy
    # neighbour ~2x); spawned workers inherit the environment as it is when they start
    import os

    with environ({"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}), \
            ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        futures = {pool.submit(_train, full[i], str(ctx.runs_dir)): i for i in todo}
        for fut in as_completed(futures):
            i = futures[fut]
            out[i] = fut.result()
            report(i, out[i])
    return out
