"""The training loop, once: :func:`fit` trains one model as a config says, for every caller.

``run.py`` (through :func:`resnorm.train.task.run_job`), the training-time paper reproductions
(:mod:`experiments.training`), the tests and the benchmarks all train through :func:`fit`. What a
caller adds (the run store, W&B, the progress bar, checkpoints, probes, extra read-outs) is a
:class:`resnorm.train.callbacks.Callback`; what the loop itself does is named step by step in :func:`fit`,
and its order is part of the study:

1. set the learning rate (:func:`lr_at`: linear warm-up, then cosine or constant);
2. forward and backward on the step's batch (this process's slice of the global batch under DDP),
   in ``train.grad_accum`` micro-batches; under fp16 the gradients are unscaled right after
   (:mod:`resnorm.train.precision`);
3. the probes read the raw gradients and the pre-update weights (``before_update``);
4. **one host transfer**: the loss, the gradient norms and every probe's before-update values;
5. the divergence guard (:func:`resnorm.train.guard.divergence`) on those numbers, *before* clipping
   (under fp16 an overflow the gradient scaler handles is no divergence: :func:`guard`);
6. unless diverged: clip (``optim.grad_clip``, off by default) and the optimizer step (under fp16
   skipped on an overflow), then, if it was taken, the probes' after-update reads
   (``after_update``, e.g. the update ratio);
7. evaluation every ``train.eval_every`` steps and at the last (rank 0);
8. the step's record goes to the callbacks (``on_step_end``); a checkpoint every
   ``train.checkpoint_every`` steps (``on_checkpoint``).

A step is two named halves around its forward and backward, :func:`start_step` (1) and
:func:`end_step` (3-8), so that a stack of runs (:mod:`resnorm.train.stack`) takes the same steps with one
forward and backward for all its members in between.

Everything a resumed run needs is in :class:`LoopState` (checkpointed as one object) plus the
model, optimizer (:mod:`resnorm.train.optimizers`), fp16 scaler, sampler, random states and the callbacks'
``state_dict``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from resnorm.train import devices
from resnorm.train.guard import describe, divergence
from resnorm.train.optimizers import make_optimizer  # noqa: F401  # resnorm.train.loop.make_optimizer: the registry's
from resnorm.train.precision import autocast as precision_autocast, make_scaler, scale_tensor, scaler_overflow
from resnorm.runs.folder import classify_outcome
from resnorm.train.spikes import SpikeTracker
from resnorm.train.state import LoopState
from resnorm.data.tokenizer import bits_per_byte



@dataclass
class StepRecord:
    """One step as the callbacks see it (host numbers only)."""

    step: int
    lr: float
    last: bool
    loss: float = math.nan
    grad_norm: float = math.nan
    grad_layers: List[float] = field(default_factory=list)  # per-sublayer gradient norms
    values: Dict[int, List[float]] = field(default_factory=dict)  # a callback's before-update values, by id
    updated: bool = False  # the optimizer step was taken
    diverged: Optional[str] = None  # the guard's verdict (resnorm.train.guard.divergence)
    spike: bool = False  # the loss or the gradient norm was a spike (resnorm.train.spikes)
    skipped: bool = False  # a spike whose update was skipped (optim.skip_spikes)
    scaler_skipped: bool = False  # fp16: the gradient scaler skipped the update (resnorm.train.precision)
    loss_scale: float = math.nan  # fp16: the loss scale of the step's backward
    val_loss: Optional[float] = None  # set on evaluation steps
    val_log_z: Optional[float] = None  # mean log-sum-exp of the validation logits
    val_logit_rms: Optional[float] = None
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    layer_rows: List[tuple] = field(default_factory=list)  # (quantity, labels, values) for layers.parquet
    started: float = 0.0  # perf_counter at the step's start


@dataclass
class Run:
    """What :func:`setup` builds for one run and every callback may read."""

    cfg: Any
    job: Any  # resnorm.train.job.JobInfo
    rank: int
    world: int
    device: torch.device
    threads: int
    slots: Optional[Sequence[Any]]
    data: Any  # resnorm.data.corpora.TokenData
    model: Any  # resnorm.model.transformer.Transformer
    optimizer: Any  # a torch.optim.Optimizer, or resnorm.train.optimizers.OptimizerChain (optim=muon)
    sampler: Any  # resnorm.data.corpora.BatchSampler
    val_batches: list
    grad_probe: Any  # resnorm.monitors.probes.GradNormProbe
    loss_fn: Callable
    scaler: Optional[torch.amp.GradScaler] = None  # train.precision=fp16 (resnorm.train.precision)
    state: LoopState = field(default_factory=LoopState)
    callbacks: Any = None  # the resnorm.train.callbacks.CallbackList fit runs (a checkpoint keeps their state)
    summary: Dict[str, Any] = field(default_factory=dict)
    wall0: float = field(default_factory=time.perf_counter)
    objective: Any = None  # the resnorm.train.objectives.Objective that setup built the run with

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.seq_len

    def autocast(self):
        return precision_autocast(self.device, self.cfg.train.precision)

    def wall_s(self) -> float:
        return self.state.wall_s + time.perf_counter() - self.wall0


def fit(cfg, job, callbacks: Optional[Callable] = None, rank: int = 0, world: int = 1,
        slots=None) -> Dict[str, Any]:
    """Train one model as ``cfg`` says, resuming from the job folder's checkpoint if there is one;
    return the run's summary. ``callbacks(run)`` gives the callbacks that see every step
    (default: :func:`resnorm.train.callbacks.default_callbacks`, what ``run.py`` trains with)."""
    from resnorm.train.callbacks import CallbackList, default_callbacks

    run = setup(cfg, job, rank, world, slots)
    cbs = run.callbacks = CallbackList((callbacks or default_callbacks)(run))
    try:
        start(run)
        for step in range(run.state.step, cfg.train.steps):
            rec, x, y = start_step(run, step)
            loss = forward_backward(run, x, y)
            if end_step(run, rec, x, loss):
                break
        end(run)
    finally:
        cbs.teardown(run)
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return run.summary


# --- the steps fit names ----------------------------------------------------------------------------


def setup(cfg, job, rank: int, world: int, slots) -> Run:
    """Threads, device (and the DDP process group), seed, data, model, optimizer, sampler, probes.
    Data, model, sampler and validation batches are the objective's (:mod:`resnorm.train.objectives`)."""
    from resnorm.train.objectives import for_config
    from resnorm.data.corpora import tokens_per_byte
    from resnorm.data.hf import model_config
    from resnorm.monitors.probes import GradNormProbe
    from resnorm.data.tokenizer import write_run_tokenizer
    from resnorm.train.variant_optim import apply_preset

    cfg = apply_preset(cfg)  # a variant's optimizer preset (nGPT: no warm-up, no weight decay)
    wall0 = time.perf_counter()
    threads = devices.job_threads(cfg.train.threads, world)
    torch.set_num_threads(threads)
    device = devices.job_device(cfg.train.device, rank, slots)
    if world > 1:
        devices.init_process_group(rank, world, device)
    torch.manual_seed(cfg.seed)
    objective = for_config(cfg)  # clm, mlm, or a fine-tuning task's classify / tag
    data = objective.load(cfg)
    if objective.pretraining:  # model.vocab_size follows a trained or loaded tokenizer (data=hf)
        cfg = model_config(cfg, data, job)
    model = objective.build(cfg, data).to(device)
    optimizer = objective.optimizer(model, cfg) if objective.optimizer else make_optimizer(model, cfg.optim)
    # every process draws the same global batch and trains on its slice of it
    sampler = objective.sampler(cfg, data)
    val = objective.val_batches(cfg, data)
    if objective.pretraining:
        data.val_tokens_per_byte = tokens_per_byte(val, data)  # bits per byte (finish)
        if rank == 0 and data.tokenizer is not None:
            write_run_tokenizer(job.run_dir, data.tokenizer)  # <run folder>/tokenizer.json (fine-tuning reads it)
    grad_probe = GradNormProbe(model, per_layer=cfg.train.probes, log_every=cfg.train.log_every)
    step_model = devices.data_parallel(model, device) if world > 1 else model.loss
    loss_fn = torch.compile(step_model) if cfg.train.compile else step_model
    state = LoopState(spikes=SpikeTracker(window=cfg.train.spike_window, sigma=cfg.train.spike_sigma))
    return Run(cfg, job, rank, world, device, threads, slots, data, model, optimizer, sampler, val,
               grad_probe, loss_fn, scaler=make_scaler(cfg.train.precision, device), state=state, wall0=wall0,
               objective=objective)


def start(run: Run) -> None:
    """The summary as training starts, the checkpoint's state (if any), then ``on_fit_start``."""
    from resnorm.train.checkpoint import restore
    from resnorm.train.summary import start_summary

    run.summary = start_summary(run)
    restore(run, run.callbacks)
    run.callbacks.on_fit_start(run)


def start_step(run: Run, step: int):
    """The first half of a step, up to its forward: the record, the learning rate, ``on_step_start``
    and the batch. Returns ``(rec, x, y)``; the forward and backward come next (:func:`forward_backward`,
    or one for a whole stack of runs, :mod:`resnorm.train.stack`), then :func:`end_step`."""
    t0 = time.perf_counter()
    rec = StepRecord(step, set_lr(run, step), last=step + 1 == run.cfg.train.steps, started=t0)
    run.callbacks.on_step_start(run, rec)
    x, y = next_batch(run)
    return rec, x, y


def end_step(run: Run, rec: StepRecord, x: torch.Tensor, loss: torch.Tensor) -> bool:
    """The rest of a step after its backward (probes, the one host transfer, the guard, the update,
    evaluation, ``on_step_end``, the checkpoint). True when the run stops here (it diverged)."""
    cfg, cbs, step = run.cfg, run.callbacks, rec.step
    grads = run.grad_probe.before_update(x)
    extra = cbs.before_update(run, rec, x)
    to_host(run, rec, loss, grads, extra)  # the step's one host transfer
    rec.diverged = guard(run, rec)
    rec.spike = run.state.spikes.observe(step, rec.loss, rec.grad_norm)
    if rec.diverged is not None:
        mark_diverged(run, rec, x)  # while the gradients are there to name the first non-finite one
    elif rec.spike and cfg.optim.skip_spikes:
        skip_step(run, rec)
    else:
        optimizer_step(run, rec, grads[0])
        if rec.updated:  # not a step the fp16 scaler skipped
            cbs.after_update(run, rec)
    run.optimizer.zero_grad(set_to_none=True)
    finish_step(run, rec, time.perf_counter() - rec.started)
    if rec.diverged is None and run.is_main and (rec.last or (step + 1) % cfg.train.eval_every == 0):
        run_eval(run, rec)
    cbs.on_step_end(run, rec)
    if rec.diverged is not None:
        return True
    if not rec.last and cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
        cbs.on_checkpoint(run)
    return False


def end(run: Run) -> Dict[str, Any]:
    """The run is over (completed or diverged): its summary's last fields, then ``on_fit_end``."""
    summary = finish(run)
    run.callbacks.on_fit_end(run, summary)
    return summary


def set_lr(run: Run, step: int) -> float:
    """The schedule's LR at ``step`` into every parameter group, times the group's ``lr_scale`` (a
    Muon group's peak over ``optim.lr``, :mod:`resnorm.train.optimizers`); returns the schedule's LR."""
    lr = lr_at(step, run.cfg.optim, run.cfg.train.steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def next_batch(run: Run):
    x, y = run.sampler.sample()
    if run.world > 1:
        share = run.cfg.train.batch_size // run.world
        x, y = x[run.rank * share:(run.rank + 1) * share], y[run.rank * share:(run.rank + 1) * share]
    return x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)


def forward_backward(run: Run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward and backward of the step's batch in ``train.grad_accum`` equal micro-batches (each
    loss over N, so the gradients are the whole batch's; DDP all-reduces on the last one only);
    under fp16 the scaled losses, then the gradients unscaled. Returns the batch's loss (the
    micro-batches' mean)."""
    n = run.cfg.train.grad_accum
    micro = list(zip(x.chunk(n), y.chunk(n))) if n > 1 else [(x, y)]
    losses = []
    for i, (xs, ys) in enumerate(micro):
        with devices.grad_sync(run.loss_fn, run.world > 1 and i + 1 < n):
            with run.autocast():
                loss = run.loss_fn(xs, ys)
            part = loss / n if n > 1 else loss
            (part if run.scaler is None else run.scaler.scale(part)).backward()
        losses.append(loss.detach())
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)  # the probes, the guard and clipping see the true gradients
    return losses[0] if n == 1 else torch.stack(losses).float().mean()


def to_host(run: Run, rec: StepRecord, loss: torch.Tensor, grads: torch.Tensor,
            extra: Dict[int, torch.Tensor]) -> None:
    """Move the loss (the global batch's, under DDP), the gradient norms and the probes' values to
    the host in one transfer, into ``rec``. DDP has averaged the gradients: they agree on every process."""
    loss_t = loss.detach().float().view(1)
    if run.world > 1:
        devices.all_mean(loss_t, run.world)
    keys = list(extra)
    scale = [] if run.scaler is None else [scale_tensor(run.scaler)]  # fp16: the loss scale rides along
    parts = [loss_t, grads.float().view(-1)] + [extra[k].float().reshape(-1) for k in keys] + scale
    host = torch.cat(parts).tolist()
    if scale:
        rec.loss_scale = host.pop()
    rec.loss, rec.grad_norm = host[0], host[1]
    rec.grad_layers = host[2:len(grads) + 1]
    at = len(grads) + 1
    for k in keys:
        n = extra[k].numel()
        rec.values[k] = host[at:at + n]
        at += n
    if run.state.initial_loss is None:
        run.state.initial_loss = rec.loss


def guard(run: Run, rec: StepRecord) -> Optional[str]:
    """The divergence guard (:func:`resnorm.train.guard.divergence`) on the step's numbers; under fp16 a
    non-finite gradient the scaler handles is no divergence (:func:`resnorm.train.precision.scaler_overflow`)."""
    kind = divergence(rec.loss, rec.grad_norm, run.state.initial_loss, run.cfg.train.diverge_factor)
    return None if run.scaler is not None and scaler_overflow(kind, rec.loss_scale) else kind


def optimizer_step(run: Run, rec: StepRecord, grad_norm: torch.Tensor) -> None:
    """Clip to ``optim.grad_clip`` (with the norm already measured) if set, then step. Under fp16
    (gradients unscaled in :func:`forward_backward`) a step whose gradient norm is not finite is
    skipped (``scaler_skipped``), then the scaler updates its scale (:mod:`resnorm.train.precision`)."""
    clip, finite = run.cfg.optim.grad_clip, math.isfinite(rec.grad_norm)
    if clip and finite:
        torch.nn.utils.clip_grads_with_norm_(run.model.parameters(), clip, grad_norm)
    if finite or run.scaler is None:
        run.optimizer.step()
        rec.updated = True
    else:
        rec.scaler_skipped = True
        run.state.scaler_skipped_steps.append(rec.step)
    if run.scaler is not None:
        run.scaler.update()  # halve after an overflow, grow after enough clean steps


def skip_step(run: Run, rec: StepRecord) -> None:
    """A spike under ``optim.skip_spikes``: no update, the optimizer state untouched."""
    rec.skipped = True
    run.state.spikes.skipped_steps.append(rec.step)
    if run.scaler is not None:
        run.scaler.update()  # the scaler's step ends here too (its next unscale_ needs it)


def finish_step(run: Run, rec: StepRecord, seconds: float) -> None:
    rec.seconds = seconds
    rec.tokens_per_s = run.tokens_per_step / seconds
    run.state.train_time += seconds
    run.state.step = rec.step + 1
    run.state.record_loss(rec.loss)


def mark_diverged(run: Run, rec: StepRecord, x: torch.Tensor) -> None:
    s, f = run.state, run.cfg.train.diverge_factor
    s.status, s.diverged_step, s.diverge_kind = "diverged", rec.step, rec.diverged
    s.diverge_reason = describe(rec.diverged, rec.loss, s.initial_loss, f, run.model, x)


def run_eval(run: Run, rec: StepRecord) -> None:
    rec.val_loss, rec.val_log_z, rec.val_logit_rms = evaluate(run.model, run.val_batches, run.device,
                                                              run.autocast, logit_stats=True)
    run.state.val_loss, run.state.best_val = rec.val_loss, min(run.state.best_val, rec.val_loss)


def finish(run: Run) -> Dict[str, Any]:
    """The summary's end-of-run fields (status, final and best losses, throughput, wall time)."""
    s = run.state
    if s.status == "running":
        s.status = "completed"
    tail = [v for v in s.recent_losses if math.isfinite(v)]
    run.summary.update(
        status=s.status, diverged_step=s.diverged_step, diverge_reason=s.diverge_reason,
        initial_loss=s.initial_loss, steps_done=s.step,
        final_val_loss=s.val_loss if s.status == "completed" else None,
        final_train_loss=sum(tail) / len(tail) if tail else None,
        best_val_loss=s.best_val if math.isfinite(s.best_val) else None,
        tokens_per_s=run.tokens_per_step * s.step / s.train_time if s.train_time else None,
        wall_s=run.wall_s(), finished_at=time.time(), diverge_kind=s.diverge_kind,
        spike_count=len(s.spikes.spike_steps), spike_steps=list(s.spikes.spike_steps),
        skipped_steps=list(s.spikes.skipped_steps),
    )
    if run.scaler is not None:  # fp16 (resnorm.train.precision)
        run.summary.update(scaler_skipped_count=len(s.scaler_skipped_steps),
                           scaler_skipped_steps=list(s.scaler_skipped_steps), loss_scale=run.scaler.get_scale())
    if run.is_main:  # model FLOPs utilisation against the device's peak, and peak memory
        from resnorm.monitors.cost import cost_summary

        run.summary.update(cost_summary(run.model.shape, run.summary["tokens_per_s"], run.device,
                                        run.cfg.train.precision, run.world))
    tpb = run.data.val_tokens_per_byte
    run.summary.update(final_val_bpb=bits_per_byte(run.summary["final_val_loss"], tpb),
                       best_val_bpb=bits_per_byte(run.summary["best_val_loss"], tpb))
    run.summary["outcome"] = classify_outcome(s.status, s.diverge_kind, run.summary["final_val_loss"],
                                              run.data.unigram_loss, run.cfg.train.stall_margin)
    return run.summary


# --- the pieces -------------------------------------------------------------------------------------


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


@torch.no_grad()
def evaluate(model, batches, device: torch.device, autocast, logit_stats: bool = False):
    """Mean validation cross-entropy (without the z-loss term) over fixed batches, in eval mode.

    With ``logit_stats``: ``(loss, log Z, logit RMS)``, where log Z is the mean over tokens of the
    log-sum-exp of the output logits (Wortsman et al. 2023's output-logit divergence) and the RMS is
    over all logit values, from the same forward pass.
    """
    from resnorm.monitors.measure import log_partition
    from resnorm.model.blocks import eval_mode

    total, log_z, sq = 0.0, 0.0, 0.0
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast():
                logits = model(x).float()
            flat = logits.reshape(-1, logits.shape[-1])
            total += torch.nn.functional.cross_entropy(flat, y.reshape(-1)).item()
            if logit_stats:
                log_z += log_partition(flat).mean().item()
                sq += flat.pow(2).mean().item()
    n = len(batches)
    return (total / n, log_z / n, math.sqrt(sq / n)) if logit_stats else total / n
