"""(2) Probe overhead: every probe the default config turns on vs probes off.

Two views, both at depth 48 (the reference config otherwise):

- ``step``: the training step alone (as :mod:`benchmarks.peers` times it), with
  ``GradNormProbe(per_layer=True)`` (the default: per-layer gradient norms every step) against
  ``GradNormProbe(per_layer=False)`` (the total norm only), interleaved in one process.
- ``loop``: the real ``resnorm.train.job.train`` (``train.probes=true`` vs ``false``, W&B offline), so the
  per-step bookkeeping the probes cause (the run store's per-layer rows, the per-layer W&B keys) is
  counted too. Each loop iteration is timed through the progress bar's ``update`` (patched in this
  process only), and the trainer's own step time (``tokens_per_s`` in ``metrics.parquet``) is
  subtracted to give the bookkeeping per step. Runs alternate on, off, on, off.
- ``activation``: the periodic probes (``resnorm.monitors.probes.ActivationProbe``: activation RMS, branch ratio,
  update ratio, max attention logit per sublayer, every ``train.probe_every`` steps): one probe call
  (``before_step`` + ``after_step`` + its host transfer) timed against the plain step, interleaved, and
  amortised over ``probe_every`` steps.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import List

import torch

from . import common, peers

TARGET = 0.05


def step_overhead(depth: int, ref: dict, steps: int, warmup: int) -> dict:
    batches = peers.make_batches(4, ref["batch"], ref["seq"], ref["vocab"], "cpu")
    on = peers.ours(depth, ref, batches=batches, probes=True)
    off = peers.ours(depth, ref, batches=batches, probes=False)
    off.model.load_state_dict(on.model.state_dict())
    n_groups = len(on.extra["probe"].labels)
    # the probe's own cost, interleaved as well (after a backward, grads present)
    on.step()
    off.step()
    timed = common.interleave({"probes on": on.step, "probes off": off.step}, steps=steps, warmup=warmup)
    for impl in (on, off):
        impl.model.loss(*batches[0]).backward()
    probes = {"per-layer": on.extra["probe"].before_update, "total only": off.extra["probe"].before_update}
    probe_t = common.interleave(probes, steps=max(steps, 50), warmup=5)
    for impl in (on, off):
        impl.extra["optimizer"].zero_grad(set_to_none=True)
    extra_ms = (probe_t.median("per-layer") - probe_t.median("total only")) * 1e3
    return dict(
        depth=depth, groups=n_groups, direct_overhead=extra_ms / (timed.median("probes off") * 1e3),
        on_ms=timed.median("probes on") * 1e3, off_ms=timed.median("probes off") * 1e3,
        overhead=timed.ratio("probes on", "probes off") - 1.0,
        compute_per_layer_ms=probe_t.median("per-layer") * 1e3, compute_total_only_ms=probe_t.median("total only") * 1e3,
    )


class _IterClock:
    """The end of each loop iteration (bookkeeping included), marked by a callback in :func:`_one_loop`."""

    marks: List[float] = []


def _one_loop(depth: int, ref, steps: int, probes: bool, workdir: Path, threads: int) -> dict:
    """One real ``train()``; ``ref=None``: the shipped defaults (conf/: d_model 64, seq 64, batch 16)."""
    import pandas as pd

    import resnorm.train.job as rt

    run_dir = workdir / f"probes_{probes}_{time.time_ns()}"
    extra = [f"train.probes={str(probes).lower()}", f"train.steps={steps}", f"train.eval_every={steps}",
             "train.eval_batches=1", "logger.mode=offline", f"train.threads={threads}", "optim.warmup_steps=0",
             "train.diverge_factor=1000"]
    if ref is None:
        cfg = common.compose(f"depth={depth}", "data=synthetic", "train.progress=false", *extra)
    else:
        cfg = common.compose(*common.reference_overrides(depth, ref, extra=extra))
    from resnorm.train.callbacks import Callback, default_callbacks

    class Clock(Callback):  # marks the end of every iteration, bookkeeping included
        def on_step_end(self, run, rec):
            _IterClock.marks.append(time.perf_counter())

    _IterClock.marks = [time.perf_counter()]
    summary = rt.train(cfg, rt.JobInfo(run_dir, "bench", "bench", []),
                       callbacks=lambda run: default_callbacks(run) + [Clock()])
    iters = [b - a for a, b in zip(_IterClock.marks, _IterClock.marks[1:])]
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    step_s = (cfg.train.batch_size * cfg.train.seq_len / metrics["tokens_per_s"]).tolist()
    n = min(len(iters), len(step_s)) - 1  # the last iteration also evaluates
    skip = min(2, n // 2)
    iters, step_s = iters[skip:n], step_s[skip:n]
    return dict(status=summary["status"], iter_s=iters, step_s=step_s,
                bookkeeping_s=[i - s for i, s in zip(iters, step_s)], wall_s=summary["wall_s"])


def loop_overhead(depth: int, ref, steps: int, reps: int, threads: int) -> dict:
    os.environ.setdefault("WANDB_SILENT", "true")
    pooled = {True: [], False: []}
    book = {True: [], False: []}
    statuses = []
    with tempfile.TemporaryDirectory(prefix="resnorm_bench_probes_") as tmp:
        for _ in range(reps):
            for probes in (True, False):
                r = _one_loop(depth, ref, steps, probes, Path(tmp), threads)
                pooled[probes] += r["iter_s"]
                book[probes] += r["bookkeeping_s"]
                statuses.append(r["status"])
    on, off = statistics.median(pooled[True]), statistics.median(pooled[False])
    return dict(depth=depth, config="reference" if ref is not None else "shipped defaults (d_model 64, seq 64)",
                steps_per_run=steps, runs_each=reps, statuses=statuses,
                iter_on_ms=on * 1e3, iter_off_ms=off * 1e3, overhead=on / off - 1.0,
                bookkeeping_on_ms=statistics.median(book[True]) * 1e3,
                bookkeeping_off_ms=statistics.median(book[False]) * 1e3)


def activation_overhead(depth: int, ref: dict, steps: int, warmup: int, probe_every: int) -> dict:
    """The periodic activation/update probe's cost per call, and amortised over ``probe_every`` steps."""
    from resnorm.monitors.probes import ActivationProbe

    batches = peers.make_batches(4, ref["batch"], ref["seq"], ref["vocab"], "cpu")
    impl = peers.ours(depth, ref, batches=batches, probes=True)
    probe = ActivationProbe(impl.model, every=probe_every, total_steps=steps)
    x = batches[0][0]

    def call():
        torch.cat([probe.before_update(x).view(-1), probe.after_update().view(-1)]).tolist()

    timed = common.interleave({"step": impl.step, "activation probe": call}, steps=steps, warmup=warmup)
    step_ms, probe_ms = timed.median("step") * 1e3, timed.median("activation probe") * 1e3
    return dict(depth=depth, probe_every=probe_every, step_ms=step_ms, probe_call_ms=probe_ms,
                per_call_ratio=probe_ms / step_ms, amortised_overhead=probe_ms / (probe_every * step_ms))


def measure(depth: int, ref: dict, steps: int, warmup: int, loop_steps: int, loop_reps: int, threads: int) -> dict:
    from resnorm.config.schema import TrainConfig

    probe_every = TrainConfig().probe_every
    step = step_overhead(depth, ref, steps, warmup)
    act = activation_overhead(depth, ref, steps, warmup, probe_every)
    loop = loop_overhead(depth, ref, loop_steps, loop_reps, threads)
    loop_small = loop_overhead(depth, None, max(loop_steps, 20), loop_reps, threads)
    checks = [dict(target=f"probe overhead (step) <= {TARGET:.0%} at depth {depth}", value=step["overhead"],
                   ok=step["overhead"] <= TARGET),
              dict(target=f"probe overhead (real loop, W&B offline) <= {TARGET:.0%} at depth {depth}",
                   value=loop["overhead"], ok=loop["overhead"] <= TARGET),
              dict(target=f"(extra) probe overhead, real loop, shipped default sizes, depth {depth} <= {TARGET:.0%}",
                   value=loop_small["overhead"], ok=loop_small["overhead"] <= TARGET),
              dict(target=f"activation/update probes every {probe_every} steps, amortised, + per-layer grad norms "
                          f"(step) <= {TARGET:.0%} at depth {depth}",
                   value=step["overhead"] + act["amortised_overhead"],
                   ok=step["overhead"] + act["amortised_overhead"] <= TARGET)]
    return dict(step=step, loop=loop, loop_default_sizes=loop_small, activation=act, checks=checks)
