"""The training loop for one job: data, model, optimizer, probes, divergence guard, run store, W&B.

Read top to bottom: :func:`run_job` is what ``run.py`` calls for each Hydra job; it validates the
config, trains with :func:`train` and always leaves a ``summary.json`` behind, whatever happens
(a training failure is recorded as ``failed`` and the sweep goes on with the next job).

Never losing a run: a job is known by its identity (:mod:`resnorm.identity`, the hash of its
config). :func:`run_job` skips a job whose folder says ``completed`` or ``diverged``, and
:func:`train` resumes an interrupted one from its checkpoint (:mod:`resnorm.checkpoint`) bit for
bit. ``train.devices=N`` runs the job on N data-parallel processes (:mod:`resnorm.devices`).
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import checkpoint, devices
from .config import validate
from .data import BatchSampler, fixed_batches, load_data
from .diagnose import first_nonfinite
from .identity import run_id
from .model import Transformer, build_model
from .probes import GradNormProbe
from .measure import ActivationProbe
from .provenance import git_commit
from .runfolder import DONE, RunStore, checkpoint_path, job_lock, job_state, read_summary
from .tracking import WandbTracker

log = logging.getLogger(__name__)
FINAL_LOSS_WINDOW = 10  # final_train_loss is the mean of the last 10 steps' losses


@dataclass
class JobInfo:
    """Where a job writes and how it is named; taken from Hydra when Hydra runs the job.

    ``run_id`` is the job's identity (:func:`resnorm.identity.run_id` of its config when not given).
    """

    run_dir: Path
    run_name: str
    group: str
    overrides: List[str]
    run_id: Optional[str] = None

    @classmethod
    def from_hydra(cls, cfg) -> "JobInfo":
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return cls(Path.cwd(), "default", cfg.name, [], run_id(cfg))
        hc = HydraConfig.get()
        return cls(Path(hc.runtime.output_dir), hc.job.override_dirname or "default", cfg.name,
                   list(hc.overrides.task), run_id(cfg))


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


def _progress_off():
    from tqdm.auto import tqdm

    return tqdm(disable=True)


def train(cfg, job: JobInfo, rank: int = 0, world: int = 1,
          slots: Optional[Sequence[devices.Slot]] = None) -> Dict[str, Any]:
    """Train one model as ``cfg`` says (resuming from the job folder's checkpoint if there is one);
    write the run folder; return the summary.

    With ``world > 1`` this is process ``rank`` of a DDP run (see :func:`resnorm.devices.spawn`);
    rank 0 alone writes the run folder and logs to W&B.
    """
    from omegaconf import OmegaConf

    wall0 = time.perf_counter()
    is_main = rank == 0
    rid = job.run_id or run_id(cfg)
    threads = devices.job_threads(cfg.train.threads, world)
    torch.set_num_threads(threads)
    device = devices.job_device(cfg.train.device, rank, slots)
    if world > 1:
        devices.init_process_group(rank, world, device)
    torch.manual_seed(cfg.seed)

    data = load_data(cfg.data, cfg.train.seq_len, cfg.seed)
    model = build_model(cfg).to(device)
    optimizer = make_optimizer(model, cfg.optim)
    # every process draws the same global batch and trains on its slice of it
    sampler = BatchSampler(data.train, cfg.train.batch_size, cfg.train.seq_len, seed=cfg.seed)
    share = cfg.train.batch_size // world
    mine = slice(rank * share, (rank + 1) * share)
    val_batches = fixed_batches(data.val, cfg.train.eval_batches, cfg.train.batch_size, cfg.train.seq_len)
    probe = GradNormProbe(model, per_layer=cfg.train.probes)
    act_probe = ActivationProbe(model) if cfg.train.probes and cfg.train.probe_every else None  # [experiments]
    bf16 = cfg.train.precision == "bf16"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    store = RunStore(job.run_dir if is_main else None)
    prior = store.read_summary() or {}
    if prior.get("run_id") != rid:
        prior = {}
    resolved = OmegaConf.to_container(cfg, resolve=True)
    summary: Dict[str, Any] = dict(
        status="running", diverged_step=None, diverge_reason=None, error=None,
        initial_loss=None, final_train_loss=None, final_val_loss=None, best_val_loss=None,
        tokens_per_s=None, wall_s=None, steps_done=0, n_params=model.n_params(),
        variant=cfg.model.norm, depth=int(cfg.depth), seed=int(cfg.seed), data_source=data.source,
        device=str(device), torch_version=torch.__version__, git_commit=git_commit(),
        run_name=job.run_name, group=job.group, overrides=job.overrides, config=resolved,
        run_id=rid, attempts=prior.get("attempts", 0) + 1, resumed_from_step=None, checkpoint_step=None,
        threads=threads, world_size=world, device_slots=[s.name for s in slots] if slots else None,
        started_at=time.time(), finished_at=None,
    )

    best_val, val_loss = math.inf, None
    train_time, wall_before = 0.0, 0.0
    start = 0
    state = checkpoint.load(checkpoint_path(job.run_dir), rid)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.generator.set_state(state["sampler"])
        checkpoint.set_rng_state(state["rng"], device)
        if state.get("probe") is not None and hasattr(probe, "load_state_dict"):
            probe.load_state_dict(state["probe"])
        store.load_state_dict(state["store"])
        loop = state["loop"]
        start, best_val, val_loss = state["step"], loop["best_val"], loop["val_loss"]
        train_time, wall_before = loop["train_time"], loop["wall_s"]
        summary.update(initial_loss=loop["initial_loss"], steps_done=start, resumed_from_step=start,
                       checkpoint_step=start)
        log.info("run %s resumes from its checkpoint at step %d", rid, start)
    store.write_summary(summary)

    def save_checkpoint(next_step: int) -> None:
        checkpoint.save(checkpoint_path(job.run_dir), dict(
            run_id=rid, step=next_step, model=model.state_dict(), optimizer=optimizer.state_dict(),
            sampler=sampler.generator.get_state(), rng=checkpoint.rng_state(device),
            probe=probe.state_dict() if hasattr(probe, "state_dict") else None,
            store=store.state_dict(),
            loop=dict(best_val=best_val, val_loss=val_loss, train_time=train_time,
                      wall_s=wall_before + time.perf_counter() - wall0, initial_loss=summary["initial_loss"]),
        ))
        summary["checkpoint_step"] = next_step

    step_model = devices.data_parallel(model, device) if world > 1 else model.loss
    loss_fn = torch.compile(step_model) if cfg.train.compile else step_model
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    bar = _progress(cfg) if is_main else _progress_off()
    bar.update(start)
    tags = [cfg.model.norm, f"depth={cfg.depth}"]
    with WandbTracker(cfg.logger, job.run_dir, job.group, job.run_name, resolved, run_id=rid, tags=tags,
                      job_type=cfg.model.norm, enabled=is_main) as tracker:
        for step in range(start, cfg.train.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim, cfg.train.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = sampler.sample()
            if world > 1:
                x, y = x[mine], y[mine]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                loss = loss_fn(x, y)
            loss.backward()
            grad_stats = probe.compute()  # DDP has averaged the gradients: the same on every process
            loss_t = loss.detach().float().view(1)
            if world > 1:
                devices.all_mean(loss_t, world)  # the global batch's loss
            host = torch.cat([loss_t, grad_stats]).tolist()  # one host transfer
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
            last = step + 1 == cfg.train.steps
            if is_main and ((step + 1) % cfg.train.eval_every == 0 or last):
                val_loss = evaluate(model, val_batches, device, autocast)
                best_val = min(best_val, val_loss)
                store.set_val_loss(step, val_loss)
                record["val/loss"] = val_loss
                store.flush_tables()
            tracker.log(record, step=step)
            if is_main and not last and cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
                save_checkpoint(step + 1)
                store.flush_tables()
                store.write_summary(summary)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}", val=f"{val_loss:.3f}" if val_loss else "-",
                            tok_s=f"{tok_s:,.0f}", refresh=False)
        bar.close()

        if summary["status"] == "running":
            summary["status"] = "completed"
            summary["final_val_loss"] = val_loss
        tail = [v for v in store.steps["train_loss"][-FINAL_LOSS_WINDOW:] if math.isfinite(v)]
        summary.update(
            final_train_loss=sum(tail) / len(tail) if tail else None,
            best_val_loss=best_val if math.isfinite(best_val) else None,
            tokens_per_s=tokens_per_step * summary["steps_done"] / train_time if train_time else None,
            wall_s=wall_before + time.perf_counter() - wall0,
            finished_at=time.time(),
        )
        tracker.summary({k: summary[k] for k in ("status", "diverged_step", "final_train_loss",
                                                  "final_val_loss", "best_val_loss", "tokens_per_s")})
        summary["wandb_error"] = tracker.error
        summary["wandb_run_id"] = tracker.run_id
    if is_main:
        if cfg.train.keep_checkpoint:
            save_checkpoint(summary["steps_done"])
        else:
            checkpoint_path(job.run_dir).unlink(missing_ok=True)
            summary["checkpoint_step"] = None
    store.flush_tables()
    store.write_summary(summary)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return summary


def _ddp_process(rank: int, world: int, cfg, job: JobInfo, slots) -> None:
    train(cfg, job, rank=rank, world=world, slots=slots)


def _result(summary: Dict[str, Any], **extra) -> Dict[str, Any]:
    """What a job returns to Hydra (and so to the sweeper, which counts the statuses)."""
    keys = ("status", "run_name", "run_id", "final_val_loss", "diverged_step", "error")
    return {**{k: summary.get(k) for k in keys}, **extra}


def run_job(cfg) -> Dict[str, Any]:
    """Hydra's task function: validate (raises ConfigError), then skip, resume or train the job.

    A crash becomes ``failed``; a job whose folder is locked by another process (the same sweep
    started twice) is left to it and returned as ``running``.
    """
    validate(cfg)
    job = JobInfo.from_hydra(cfg)
    with job_lock(job.run_dir) as ours:
        if not ours:
            log.warning("run %s (%s) is running in another process: left to it", job.run_id, job.run_name)
            return _result({"status": "running", "run_name": job.run_name, "run_id": job.run_id},
                           note="running in another process")
        state = job_state(job.run_dir, job.run_id)
        if state == "foreign":
            other = read_summary(job.run_dir).get("run_id")
            error = f"{job.run_dir} holds another run ({other}): left untouched; give this job another folder"
            log.error(error)
            return _result({"status": "failed", "run_name": job.run_name, "run_id": job.run_id, "error": error})
        if state in DONE:
            log.info("run %s (%s) is already %s: skipped", job.run_id, job.run_name, state)
            return _result(read_summary(job.run_dir), skipped=True)
        try:
            with devices.claim(cfg.train.device, cfg.train.devices) as slots:
                if cfg.train.devices > 1:
                    devices.spawn(_ddp_process, cfg.train.devices, (cfg, job, slots))
                    summary = read_summary(job.run_dir)
                else:
                    summary = train(cfg, job, slots=slots)
        except Exception as exc:
            store = RunStore(job.run_dir)
            summary = store.read_summary() or {"run_name": job.run_name, "group": job.group,
                                               "overrides": job.overrides, "run_id": job.run_id}
            summary.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc())
            store.write_summary(summary)
            log.error("run %s failed: %s", job.run_name, summary["error"])
    log.info("run %s: %s (final val loss %s)", job.run_name, summary["status"], summary.get("final_val_loss"))
    return _result(summary)
