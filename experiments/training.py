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


def run_grid(specs: List[Dict[str, Any]], ctx) -> List[Dict[str, Any]]:
    """Train every spec not already cached under ``ctx.runs_dir``; return all records (cached ones included)."""
    from resnorm.store import atomic_write

    ctx.runs_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i, spec in enumerate(specs):
        full = {**DEFAULTS, **spec}
        path = ctx.runs_dir / f"{spec_key(full)}.json"
        if path.is_file():
            try:
                out.append(json.loads(path.read_text()))
                continue
            except json.JSONDecodeError:
                pass
        rec = train_once(full)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(rec, default=float)))
        out.append(rec)
        ctx.log(f"{i + 1}/{len(specs)} {full['variant']} L={full['depth']} lr={full['lr']:g} qk={full['qk_norm']} "
                f"seed={full['seed']}: loss {rec['final_eval_loss']:.3f} max logit {rec['max_attn_logit']:.3g} "
                f"({rec['wall_s']:.0f} s)")
    return out
