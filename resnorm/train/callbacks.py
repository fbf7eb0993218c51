"""Callbacks: everything :func:`resnorm.train.loop.fit` does besides training, one small class each.

The protocol (:class:`Callback`) has a handful of hooks, called by ``fit`` in this order:

- ``on_fit_start(run)``: after set-up and resume, before the first step;
- ``on_step_start(run, rec)``: before the step's forward (a probe arms hooks on the step's backward);
- ``before_update(run, rec, x) -> tensor | None``: after backward, before the guard, clipping and the
  optimizer step (raw gradients, pre-update weights). A returned device tensor rides the step's one
  host transfer and comes back as ``rec.values[id(callback)]``;
- ``after_update(run, rec)``: after the optimizer step (only when it was taken);
- ``on_step_end(run, rec)``: the step's record, with ``rec.val_loss`` on evaluation steps;
- ``on_checkpoint(run)``: every ``train.checkpoint_every`` steps;
- ``on_fit_end(run, summary)``: the run is over (completed or diverged); the summary is final but
  for what the callbacks add;
- ``teardown(run)``: always, last, also when training raised (close files, finish W&B);
- ``state_dict()`` / ``load_state_dict(state)``: what a checkpoint keeps of the callback (by ``name``).

The callbacks here: :class:`ProbeCallback` (any :class:`resnorm.monitors.probes.Probe`), :class:`Checkpointer`,
:class:`WandbLogger`, :class:`TensorBoardLogger` (the same :func:`step_scalars`), :class:`ProgressBar`,
:class:`RunStoreWriter` and, for the reproductions, :class:`FinalReadouts`. :func:`default_callbacks` is the set ``run.py`` trains with; its order matters
(the writer comes last, so it writes what the others put in the summary).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Dict, List, Optional, Sequence

import torch

from resnorm.runs.quantities import scalar_name

log = logging.getLogger(__name__)


class Callback:
    """The protocol; every hook is optional (a no-op here)."""

    name: Optional[str] = None  # the key of its state in a checkpoint; None: nothing to keep

    def on_fit_start(self, run) -> None: ...

    def on_step_start(self, run, rec) -> None: ...

    def before_update(self, run, rec, x) -> Optional[torch.Tensor]:
        return None

    def after_update(self, run, rec) -> None: ...

    def on_step_end(self, run, rec) -> None: ...

    def on_checkpoint(self, run) -> None: ...

    def on_fit_end(self, run, summary: Dict[str, Any]) -> None: ...

    def teardown(self, run) -> None: ...

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


class CallbackList:
    """Calls each hook on every callback in order; restores their state from a checkpoint."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)

    def state_dict(self) -> Dict[str, Any]:
        return {cb.name: cb.state_dict() for cb in self.callbacks if cb.name}

    def on_fit_start(self, run) -> None:
        for cb in self.callbacks:
            cb.on_fit_start(run)

    def on_step_start(self, run, rec) -> None:
        for cb in self.callbacks:
            cb.on_step_start(run, rec)

    def before_update(self, run, rec, x) -> Dict[int, torch.Tensor]:
        out = {}
        for cb in self.callbacks:
            t = cb.before_update(run, rec, x)
            if t is not None:
                out[id(cb)] = t
        return out

    def after_update(self, run, rec) -> None:
        for cb in self.callbacks:
            cb.after_update(run, rec)

    def on_step_end(self, run, rec) -> None:
        for cb in self.callbacks:
            cb.on_step_end(run, rec)

    def on_checkpoint(self, run) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(run)

    def on_fit_end(self, run, summary) -> None:
        for cb in self.callbacks:
            cb.on_fit_end(run, summary)

    def teardown(self, run) -> None:
        for cb in self.callbacks:
            try:
                cb.teardown(run)
            except Exception as exc:  # a failing teardown must not hide the training error
                log.warning("callback %s teardown failed: %s", type(cb).__name__, exc)


class ProbeCallback(Callback):
    """Runs a :class:`resnorm.monitors.probes.Probe` on its due steps and hands its rows to the writer.

    The gradient-norm probe is measured by the loop itself every step (the guard needs the total);
    for it (``measured_by_loop``) this callback only turns the step's per-sublayer norms into rows.
    Rows are kept only for steps whose update was taken (a diverged step has no update ratio).
    """

    def __init__(self, probe, measured_by_loop: bool = False):
        self.probe, self.measured_by_loop = probe, measured_by_loop
        self._after: Optional[torch.Tensor] = None

    def on_step_start(self, run, rec) -> None:
        if not self.measured_by_loop and self.probe.due(rec.step, rec.last):
            self.probe.before_forward()

    def before_update(self, run, rec, x):
        if self.measured_by_loop or not self.probe.due(rec.step, rec.last):
            return None
        return self.probe.before_update(x)

    def after_update(self, run, rec) -> None:
        if not self.measured_by_loop and id(self) in rec.values:
            self._after = self.probe.after_update()

    def on_step_end(self, run, rec) -> None:
        p = self.probe
        if self.measured_by_loop:
            if p.due(rec.step, rec.last):
                rec.layer_rows += list(p.rows(p.quantities_before, [rec.grad_layers]))
            return
        if id(self) not in rec.values or not rec.updated:
            return
        n = len(p.labels)
        flat = rec.values[id(self)]
        before = [flat[i * n:(i + 1) * n] for i in range(len(p.quantities_before))]
        rec.layer_rows += list(p.rows(p.quantities_before, before))
        if self._after is not None:
            rec.layer_rows += list(p.rows(p.quantities_after, self._after.tolist()))
        self._after = None


class Checkpointer(Callback):
    """Writes ``checkpoint.pt`` (see :mod:`resnorm.train.checkpoint`) on ``on_checkpoint``; at the end keeps
    the final state (``train.keep_checkpoint``) or removes the file."""

    def on_checkpoint(self, run) -> None:
        from resnorm.train.checkpoint import save_run

        save_run(run)
        run.summary["checkpoint_step"] = run.state.step

    def on_fit_end(self, run, summary) -> None:
        from resnorm.train.checkpoint import save_run
        from resnorm.runs.folder import checkpoint_path

        if run.cfg.train.keep_checkpoint:
            save_run(run)
            summary["checkpoint_step"] = run.state.step
        else:
            checkpoint_path(run.job.run_dir).unlink(missing_ok=True)
            summary["checkpoint_step"] = None


def step_scalars(rec) -> Dict[str, float]:
    """What a step logs (W&B and TensorBoard alike): ``train/*``, every probe row as
    ``<quantity>/<sublayer>/<layer>`` (:func:`resnorm.runs.quantities.scalar_name`; the quantities are
    listed in docs/monitors.md), ``val/*`` on evaluation steps, and under fp16
    ``train/loss_scale`` and ``train/scaler_skipped``."""
    record = {"train/loss": rec.loss, "train/lr": rec.lr, "train/grad_norm": rec.grad_norm,
              "train/tokens_per_s": rec.tokens_per_s, "train/spike": int(rec.spike),
              "train/skipped": int(rec.skipped)}
    if rec.loss_scale == rec.loss_scale:  # fp16: the scaler's scale and its skip (NaN otherwise)
        record.update({"train/loss_scale": rec.loss_scale, "train/scaler_skipped": int(rec.scaler_skipped)})
    for quantity, labels, values in rec.layer_rows:  # every probe's rows (resnorm.runs.quantities.scalar_name)
        record.update({scalar_name(quantity, sub, layer): v for (layer, sub), v in zip(labels, values)})
    if rec.val_loss is not None:
        record.update({"val/loss": rec.val_loss, "val/log_z": rec.val_log_z, "val/logit_rms": rec.val_logit_rms})
    return record


class WandbLogger(Callback):
    """Logs every step to Weights & Biases (see :mod:`resnorm.runs.tracking`); never takes a run down."""

    reinit = "finish_previous"  # a stack's members (resnorm.train.stack) keep their runs open at once: create_new

    def __init__(self):
        self.tracker = None

    def on_fit_start(self, run) -> None:
        from omegaconf import OmegaConf

        from resnorm.runs.tracking import WandbTracker

        cfg, job = run.cfg, run.job
        self.tracker = WandbTracker(cfg.logger, job.run_dir, job.group, job.run_name,
                                    OmegaConf.to_container(cfg, resolve=True), run_id=run.summary["run_id"],
                                    tags=[cfg.model.norm, f"depth={cfg.depth}"], job_type=cfg.model.norm,
                                    reinit=self.reinit)
        self.tracker.__enter__()

    def on_step_end(self, run, rec) -> None:
        self.tracker.log(step_scalars(rec), step=rec.step)

    def on_fit_end(self, run, summary) -> None:
        self.tracker.summary({k: summary[k] for k in ("status", "diverged_step", "final_train_loss",
                                                      "final_val_loss", "best_val_loss", "tokens_per_s")})
        self.tracker.__exit__(None, None, None)
        summary["wandb_error"] = self.tracker.error
        summary["wandb_run_id"] = self.tracker.run_id

    def teardown(self, run) -> None:
        if self.tracker is not None and self.tracker.run is not None:  # training raised: finish as failed
            self.tracker.__exit__(RuntimeError, None, None)


class TensorBoardLogger(Callback):
    """``logger.tensorboard=true``: every step's :func:`step_scalars` (what W&B gets) as TensorBoard
    scalars in ``<run folder>/tensorboard/`` (``tensorboard --logdir multirun/<name>``). A resumed
    run appends: events at or after the resumed step are purged (``purge_step``), so no step shows
    twice. Closed at teardown, also when training raised."""

    def __init__(self):
        self.writer = None

    def on_fit_start(self, run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from resnorm.runs.folder import tensorboard_dir, writable_folder_problem

        folder = tensorboard_dir(run.job.run_dir)
        problem = writable_folder_problem(folder)  # else the writer thread dies with a traceback per event
        if problem:
            run.summary["tensorboard_error"] = f"cannot write {folder} ({problem}): no TensorBoard events"
            log.warning("%s; training goes on, the run store stays complete", run.summary["tensorboard_error"])
            return
        self.writer = SummaryWriter(str(folder), purge_step=run.state.step or None)

    def on_step_end(self, run, rec) -> None:
        if self.writer is None:
            return
        for name, value in step_scalars(rec).items():
            self.writer.add_scalar(name, value, rec.step)

    def teardown(self, run) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ProgressBar(Callback):
    """The tqdm bar (loss, validation loss, tokens/s); ``train.progress=false`` turns it off."""

    def __init__(self):
        self.bar = None
        self.val: Optional[float] = None

    def on_fit_start(self, run) -> None:
        from tqdm.auto import tqdm

        cfg = run.cfg
        self.bar = tqdm(total=cfg.train.steps, disable=not cfg.train.progress, mininterval=1.0,
                        desc=f"{cfg.model.norm} L={cfg.depth}", leave=False, dynamic_ncols=True)
        self.bar.update(run.state.step)
        self.val = run.state.val_loss

    def on_step_end(self, run, rec) -> None:
        self.val = rec.val_loss if rec.val_loss is not None else self.val
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{rec.loss:.3f}", val=f"{self.val:.3f}" if self.val else "-",
                             tok_s=f"{rec.tokens_per_s:,.0f}", refresh=False)

    def teardown(self, run) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunStoreWriter(Callback):
    """The run folder's tables and summary (:class:`resnorm.runs.folder.RunStore`): rows every step,
    tables flushed on evaluation and checkpoint steps, the summary at the start, at every
    checkpoint and at the end. Its rows are part of the checkpoint, so a resumed run never stores a
    step twice."""

    name = "store"

    def __init__(self, run_dir):
        from resnorm.runs.folder import RunStore

        self.store = RunStore(run_dir)

    def state_dict(self) -> Dict[str, Any]:
        return self.store.state_dict()

    def load_state_dict(self, state) -> None:
        self.store.load_state_dict(state)

    def on_fit_start(self, run) -> None:
        self.store.write_summary(run.summary)

    def on_step_end(self, run, rec) -> None:
        self.store.add_step(rec.step, rec.loss, rec.lr, rec.grad_norm, rec.tokens_per_s, rec.val_loss,
                            rec.val_log_z, rec.val_logit_rms, rec.spike, rec.skipped, rec.scaler_skipped,
                            rec.loss_scale)
        for quantity, labels, values in rec.layer_rows:
            self.store.add_layers(rec.step, labels, quantity, values)
        run.summary["steps_done"] = rec.step + 1
        if rec.val_loss is not None:
            self.store.flush_tables()

    def on_checkpoint(self, run) -> None:
        self.store.flush_tables()
        self.store.write_summary(run.summary)

    def on_fit_end(self, run, summary) -> None:
        self.store.flush_tables()
        self.store.write_summary(summary)


class FinalReadouts(Callback):
    """At the end of a run, on the validation batches in eval mode: the largest attention logit
    max |q.k|/sqrt(d_head) over every layer (``final_max_attn_logit``) and the mean log partition
    function log Z of the output logits (``final_mean_log_z``), as Wortsman et al. 2023
    (arXiv:2309.14322, Fig. 1 and §3.2) read them. Written into the summary before the writer
    writes it, so list it before :class:`RunStoreWriter`."""

    @torch.no_grad()
    def on_fit_end(self, run, summary) -> None:
        from resnorm.monitors.measure import log_partition
        from resnorm.model.blocks import eval_mode

        logits, logz = [], []
        with eval_mode(run.model) as model:
            for x, _ in run.val_batches:
                tr = model.trace(x.to(run.device))
                out = model.head(tr["hidden"]).float()
                logits.append(tr["max_logit"].max())
                logz.append(log_partition(out).mean())
        summary["final_max_attn_logit"] = torch.stack(logits).max().item()
        summary["final_mean_log_z"] = torch.stack(logz).mean().item()


def probe_callbacks(run) -> List[Callback]:
    """The gradient-norm rows (``train.probes``), the periodic activation/update probe and the
    forward/backward monitors (:mod:`resnorm.monitors`, ``train.probe_every``)."""
    from resnorm.train.precision import scale_tensor
    from resnorm.monitors.forward import forward_probes
    from resnorm.monitors.schemes import scheme_probes
    from resnorm.monitors.weights import weight_probes
    from resnorm.monitors.probes import ActivationProbe

    cfg = run.cfg.train
    cbs: List[Callback] = [ProbeCallback(run.grad_probe, measured_by_loop=True)]
    if cfg.probes and cfg.probe_every:
        cbs.append(ProbeCallback(ActivationProbe(run.model, cfg.probe_every, cfg.steps)))
    share = cbs[-1].probe if len(cbs) > 1 else None  # the activation probe: one trace for both
    loss_scale = None if run.scaler is None else functools.partial(scale_tensor, run.scaler)  # fp16
    cbs += [ProbeCallback(p) for p in forward_probes(run.model, cfg, share=share, loss_scale=loss_scale)]
    cbs += [ProbeCallback(p) for p in weight_probes(run.model, run.optimizer, cfg)]
    cbs += [ProbeCallback(p) for p in scheme_probes(run.model, cfg)]  # HC gains, depth weights
    return cbs


def default_callbacks(run, extra: Sequence[Callback] = ()) -> List[Callback]:
    """What ``run.py`` trains with: probes; on rank 0 also the checkpointer, W&B, the progress bar,
    ``extra`` and, last, the run-store writer."""
    cbs = probe_callbacks(run)
    if run.is_main:
        loggers = [WandbLogger()] + ([TensorBoardLogger()] if run.cfg.logger.tensorboard else [])
        cbs += [Checkpointer(), *loggers, ProgressBar(), *extra, RunStoreWriter(run.job.run_dir)]
    return cbs


class TaskScore(Callback):
    """At the end of a completed fine-tune, the task metric (:func:`resnorm.tasks.heads.score`) into the summary, and
    the outcome judged by it (:func:`resnorm.tasks.heads.task_outcome`; the loss's verdict kept as
    ``loss_outcome``), before the run store writes it (list it before :class:`RunStoreWriter`)."""

    def __init__(self, pretrained_run_id: Any = None, recipe: Optional[Dict[str, Any]] = None):
        self.pretrained_run_id = pretrained_run_id
        self.recipe = recipe or {}  # the recipe's choice and the floors (resnorm.finetune.choose)

    def on_fit_end(self, run, summary) -> None:
        summary["pretrained_run_id"] = self.pretrained_run_id
        summary.update(self.recipe)
        summary["pretrained_objective"] = run.cfg.model.get("objective", "clm")
        if summary["status"] == "completed":
            from resnorm.tasks.heads import score, task_outcome

            summary.update(score(run))
            summary["loss_outcome"] = summary.get("outcome")  # the pre-training rule's verdict, kept
            summary["outcome"] = task_outcome(summary["loss_outcome"], summary["task_p_above_floor"])

