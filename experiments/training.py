"""In-process training for the training-time reproductions (Wortsman et al. 2023, Xiong et al. Fig. 2).

Why not ``run.py -m``: these runs need things the sweep's training loop does not do (independent weight
decay, the max attention logit at the end, log Z) and their grid is a few dozen tiny runs, so they
train here with the library's pieces (``build_model``, ``load_data``, ``BatchSampler``, ``lr_at``).
Each run's result is a JSON file named by its spec's hash under the context's ``runs_dir``, written
atomically when the run ends: re-running an experiment skips finished runs (resumable).

Recipe (PAPERS.md §10/§13.5): AdamW(beta1, beta2, eps), global grad-norm clip, linear warm-up then
cosine decay to ``min_lr_ratio`` of the peak, **independent** weight decay ``wd`` (PyTorch's AdamW
multiplies by lr, so it is passed as ``wd / lr``) on matrices only, optional z-loss and qk-layernorm.
A non-finite loss stops the run (``diverged``); its final loss is then NaN and LR-sensitivity counts
it as the initial loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any, Dict, List

import torch

DEFAULTS: Dict[str, Any] = dict(
    variant="pre", depth=4, d_model=64, n_heads=2, d_ff=256, vocab=64, activation="gelu", qk_norm=False,
    z_loss=1e-4, lr=1e-3, steps=300, warmup_frac=0.05, min_lr_ratio=0.1, wd=1e-4, clip=1.0, beta1=0.9,
    beta2=0.95, eps=1e-8, seed=0, batch=16, seq_len=64, eval_batches=4, data="synthetic",
    data_path=None, synthetic_tokens=200_000,
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


def spec_key(spec: Dict[str, Any]) -> str:
    text = json.dumps({k: spec[k] for k in sorted(spec)}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _config(spec):
    from omegaconf import OmegaConf

    from resnorm.config import Config, validate

    cfg = OmegaConf.structured(Config)
    cfg.depth, cfg.seed = spec["depth"], spec["seed"]
    m = cfg.model
    m.norm, m.d_model, m.n_heads, m.d_ff = spec["variant"], spec["d_model"], spec["n_heads"], spec["d_ff"]
    m.vocab_size, m.activation, m.init = spec["vocab"], spec["activation"], "xavier"
    m.qk_norm, m.z_loss = bool(spec["qk_norm"]), float(spec["z_loss"])
    cfg.data.name = spec["data"]
    cfg.data.path = spec["data_path"]
    cfg.data.synthetic_vocab = min(spec["vocab"], 64) if spec["data"] == "synthetic" else 64
    cfg.data.synthetic_tokens = spec["synthetic_tokens"]
    o = cfg.optim
    o.lr, o.warmup_steps = spec["lr"], int(round(spec["warmup_frac"] * spec["steps"]))
    o.min_lr_ratio, o.beta1, o.beta2, o.eps = spec["min_lr_ratio"], spec["beta1"], spec["beta2"], spec["eps"]
    o.weight_decay = spec["wd"] / spec["lr"]  # independent weight decay
    o.grad_clip = spec["clip"]
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = spec["steps"], spec["batch"], spec["seq_len"]
    cfg.train.eval_batches = spec["eval_batches"]
    validate(cfg)
    return cfg


def train_once(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Train one model as ``spec`` (keys of :data:`DEFAULTS`) says; return its result record."""
    from resnorm.data import BatchSampler, fixed_batches, load_data
    from resnorm.model import build_model
    from resnorm.train import lr_at, make_optimizer

    spec = {**DEFAULTS, **spec}
    cfg = _config(spec)
    t0 = time.perf_counter()
    torch.manual_seed(spec["seed"])
    data = load_data(cfg.data, spec["seq_len"], spec["seed"])
    model = build_model(cfg)
    opt = make_optimizer(model, cfg.optim)
    sampler = BatchSampler(data.train, spec["batch"], spec["seq_len"], seed=spec["seed"])
    val = fixed_batches(data.val, spec["eval_batches"], spec["batch"], spec["seq_len"])
    losses: List[float] = []
    diverged_step = None
    for step in range(spec["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.optim, spec["steps"])
        x, y = sampler.sample()
        loss = model.loss(x, y)
        loss.backward()
        if spec["clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
        lv = loss.item()
        losses.append(lv)
        if not math.isfinite(lv):
            diverged_step = step
            break
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        evals, logits, logz = [], [], []
        for x, y in val:
            tr = model.trace(x)
            out = model.head(tr["hidden"]).float()
            evals.append(torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)))
            logits.append(tr["max_logit"].max())
            logz.append(torch.logsumexp(out, -1).mean())
        final, max_logit, mean_logz = (torch.stack(t).mean().item() if i != 1 else torch.stack(t).max().item()
                                       for i, t in enumerate((evals, logits, logz)))
    if diverged_step is not None or not math.isfinite(final):
        final = float("nan")
    return dict(spec=spec, initial_loss=losses[0], final_eval_loss=final, final_train_loss=losses[-1],
                diverged=diverged_step is not None or not math.isfinite(final), diverged_step=diverged_step,
                max_attn_logit=max_logit, mean_log_z=mean_logz, steps_done=len(losses),
                wall_s=time.perf_counter() - t0)


def _worker_init() -> None:
    """Each worker process: one torch thread (parallel jobs on few cores must not oversubscribe them)."""
    torch.set_num_threads(1)


def _train_and_store(spec: Dict[str, Any], path: str) -> Dict[str, Any]:
    from pathlib import Path

    from resnorm.runfolder import atomic_write

    rec = train_once(spec)
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(rec, default=float)))
    return rec


def _cached(path) -> Any:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:  # a torn file from an old version: train again
            return None
    return None


def run_grid(specs: List[Dict[str, Any]], ctx) -> List[Dict[str, Any]]:
    """Train every spec not already cached under ``ctx.runs_dir``; return all records (cached ones included).

    The missing runs go to ``ctx.workers`` processes (:func:`experiments.core.run_experiment` makes it
    one per core this process may use), one torch thread each; with one worker they train in this process. Each record is written (atomically)
    as soon as its run ends, so an interrupted grid resumes where it stopped. The workers are started
    with ``spawn`` (a fork of a process that already ran torch's thread pool can hang), so a script
    that calls this must guard its entry point with ``if __name__ == "__main__":``.
    """
    from resnorm.devices import environ

    ctx.runs_dir.mkdir(parents=True, exist_ok=True)
    full = [{**DEFAULTS, **s} for s in specs]
    paths = [ctx.runs_dir / f"{spec_key(f)}.json" for f in full]
    out: List[Any] = [_cached(p) for p in paths]
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
            out[i] = _train_and_store(full[i], str(paths[i]))
            report(i, out[i])
        return out

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # the workers' OpenMP threads sleep instead of spinning when idle (a spinning one slowed a busy
    # neighbour ~2x); spawned workers inherit the environment as it is when they start
    import os

    with environ({"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}), \
            ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        futures = {pool.submit(_train_and_store, full[i], str(paths[i])): i for i in todo}
        for fut in as_completed(futures):
            i = futures[fut]
            out[i] = fut.result()
            report(i, out[i])
    return out
