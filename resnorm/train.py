"""The training loop for one job: data, model, optimizer, probes, divergence guard, run store, W&B.

Read top to bottom: :func:`run_job` is what ``run.py`` calls for each Hydra job; it validates the
config, trains with :func:`train` and always leaves a ``summary.json`` behind, whatever happens
(a training failure is recorded as ``failed`` and the sweep goes on with the next job).
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch

from .config import validate
from .data import BatchSampler, fixed_batches, load_data
from .diagnose import first_nonfinite
from .model import Transformer, build_model
from .probes import GradNormProbe
from .measure import ActivationProbe
from .provenance import git_commit
from .store import RunStore
from .tracking import WandbTracker

log = logging.getLogger(__name__)
FINAL_LOSS_WINDOW = 10  # final_train_loss is the mean of the last 10 steps' losses


@dataclass
class JobInfo:
    """Where a job writes and how it is named; taken from Hydra when Hydra runs the job."""

    run_dir: Path
    run_name: str
    group: str
    overrides: List[str]

    @classmethod
    def from_hydra(cls, cfg) -> "JobInfo":
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return cls(Path.cwd(), "default", cfg.name, [])
        hc = HydraConfig.get()
        return cls(Path(hc.runtime.output_dir), hc.job.override_dirname or "default", cfg.name,
                   list(hc.overrides.task))


def lr_at(step: int, optim_cfg, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` or constant."""
    peak, warmup = optim_cfg.lr, optim_cfg.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if optim_cfg.schedule == "constant":
        return peak
    progress = (step - warmup) / max(total_steps - warmup - 1, 1)
    floor = optim_cfg.min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: Transformer, optim_cfg) -> torch.optim.Optimizer:
    """AdamW; weight decay (if any) on matrices only, never on norms, biases or embeddings."""
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or id(p) in embeddings]
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                             eps=optim_cfg.eps, foreach=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
    return device


@torch.no_grad()
def evaluate(model: Transformer, batches, device: torch.device, autocast) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast():
            total += model.loss(x.to(device), y.to(device)).item()
    model.train(was_training)
    return total / len(batches)


def _progress(cfg):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.steps, disable=not cfg.train.progress, mininterval=1.0,
                desc=f"{cfg.model.norm} L={cfg.depth}", leave=False, dynamic_ncols=True)


def train(cfg, job: JobInfo) -> Dict[str, Any]:
    """Train one model as ``cfg`` says; write the run folder; return the summary."""
    from omegaconf import OmegaConf

    wall0 = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.seed)

    data = load_data(cfg.data, cfg.train.seq_len, cfg.seed)
    model = build_model(cfg).to(device)
    optimizer = make_optimizer(model, cfg.optim)
    sampler = BatchSampler(data.train, cfg.train.batch_size, cfg.train.seq_len, seed=cfg.seed)
    val_batches = fixed_batches(data.val, cfg.train.eval_batches, cfg.train.batch_size, cfg.train.seq_len)
    probe = GradNormProbe(model, per_layer=cfg.train.probes)
    act_probe = ActivationProbe(model) if cfg.train.probes and cfg.train.probe_every else None  # [experiments]
    loss_fn = torch.compile(model.loss) if cfg.train.compile else model.loss
    bf16 = cfg.train.precision == "bf16"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    store = RunStore(job.run_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    summary: Dict[str, Any] = dict(
        status="running", diverged_step=None, diverge_reason=None, error=None,
        initial_loss=None, final_train_loss=None, final_val_loss=None, best_val_loss=None,
        tokens_per_s=None, wall_s=None, steps_done=0, n_params=model.n_params(),
        variant=cfg.model.norm, depth=int(cfg.depth), seed=int(cfg.seed), data_source=data.source,
        device=str(device), torch_version=torch.__version__, git_commit=git_commit(),
        run_name=job.run_name, group=job.group, overrides=job.overrides, config=resolved,
    )
    store.write_summary(summary)

    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    losses: List[float] = []
    best_val, val_loss = math.inf, None
    train_time = 0.0
    bar = _progress(cfg)
    tags = [cfg.model.norm, f"depth={cfg.depth}"]
    with WandbTracker(cfg.logger, job.run_dir, job.group, job.run_name, resolved, tags=tags) as tracker:
        for step in range(cfg.train.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim, cfg.train.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = (t.to(device, non_blocking=True) for t in sampler.sample())
            with autocast():
                loss = loss_fn(x, y)
            loss.backward()
            grad_stats = probe.compute()
            host = torch.cat([loss.detach().float().view(1), grad_stats]).tolist()  # one host transfer
            loss_v, grad_norm = host[0], host[1]
            if step == 0:
                summary["initial_loss"] = loss_v

            reason = None
            if not math.isfinite(loss_v):
                reason = f"non-finite loss ({loss_v}); {first_nonfinite(model, x, y)}"
            elif not math.isfinite(grad_norm):
                reason = f"non-finite gradient norm; {first_nonfinite(model, x, y)}"
            elif loss_v > cfg.train.diverge_factor * summary["initial_loss"]:
                reason = (f"loss {loss_v:.4g} exceeds train.diverge_factor={cfg.train.diverge_factor} "
                          f"x initial loss {summary['initial_loss']:.4g}")
            # [experiments] periodic activation / update probes (resnorm.measure.ActivationProbe)
            probing = (act_probe is not None and reason is None
                       and (step % cfg.train.probe_every == 0 or step + 1 == cfg.train.steps))
            if probing:
                act_probe.before_step(x)
            if reason is None:
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grads_with_norm_(model.parameters(), cfg.optim.grad_clip,
                                                         grad_stats[0])
                optimizer.step()
            if probing:
                for quantity, labels, values in act_probe.rows(act_probe.after_step().tolist()):  # one transfer
                    store.add_layers(step, labels, quantity, values)
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            train_time += dt
            tok_s = tokens_per_step / dt

            store.add_step(step, loss_v, lr, grad_norm, tok_s)
            losses.append(loss_v)
            summary["steps_done"] = step + 1
            log_layers = cfg.train.probes and step % cfg.train.log_every == 0
            if log_layers:
                store.add_layers(step, probe.labels, "grad_norm", host[2:])
            record = {"train/loss": loss_v, "train/lr": lr, "train/grad_norm": grad_norm, "train/tokens_per_s": tok_s}
            if log_layers:
                record.update({f"grad_norm/{sub}/{layer:03d}": v for (layer, sub), v in zip(probe.labels, host[2:])})

            if reason is not None:
                summary.update(status="diverged", diverged_step=step, diverge_reason=reason)
                tracker.log(record, step=step)
                log.warning("diverged at step %d: %s", step, reason)
                break
            if (step + 1) % cfg.train.eval_every == 0 or step + 1 == cfg.train.steps:
                val_loss = evaluate(model, val_batches, device, autocast)
                best_val = min(best_val, val_loss)
                store.set_val_loss(step, val_loss)
                record["val/loss"] = val_loss
                store.flush_tables()
            tracker.log(record, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}", val=f"{val_loss:.3f}" if val_loss else "-",
                            tok_s=f"{tok_s:,.0f}", refresh=False)
        bar.close()

        if summary["status"] == "running":
            summary["status"] = "completed"
            summary["final_val_loss"] = val_loss
        tail = [v for v in losses[-FINAL_LOSS_WINDOW:] if math.isfinite(v)]
        summary.update(
            final_train_loss=sum(tail) / len(tail) if tail else None,
            best_val_loss=best_val if math.isfinite(best_val) else None,
            tokens_per_s=tokens_per_step * summary["steps_done"] / train_time if train_time else None,
            wall_s=time.perf_counter() - wall0,
        )
        tracker.summary({k: summary[k] for k in ("status", "diverged_step", "final_train_loss",
                                                  "final_val_loss", "best_val_loss", "tokens_per_s")})
        summary["wandb_error"] = tracker.error
    store.flush_tables()
    store.write_summary(summary)
    return summary


def run_job(cfg) -> Dict[str, Any]:
    """Hydra's task function: validate (raises ConfigError), then train; a crash becomes ``failed``."""
    validate(cfg)
    job = JobInfo.from_hydra(cfg)
    try:
        summary = train(cfg, job)
    except Exception as exc:
        store = RunStore(job.run_dir)
        summary = store.read_summary() or {"run_name": job.run_name, "group": job.group,
                                           "overrides": job.overrides}
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc())
        store.write_summary(summary)
        log.error("run %s failed: %s", job.run_name, summary["error"])
    log.info("run %s: %s (final val loss %s)", job.run_name, summary["status"], summary.get("final_val_loss"))
    return {k: summary.get(k) for k in ("status", "run_name", "final_val_loss", "diverged_step", "error")}

