"""The issue-11 monitors' cost: every default monitor against the plain step, same process, interleaved.

``python benchmarks/bench_monitors.py [--depth 48] [--rounds 6] [--threads N]`` on the reference config
(``benchmarks.common.REFERENCE``: vocab 256, seq 128, batch 16, d_model 128, 4 heads, Pre-LN).

- ``step``: the training step as :mod:`benchmarks.peers` times it (forward, backward, the gradient-norm
  probe with per-layer norms, one host transfer, AdamW);
- ``every-step monitors``: one call of the monitors due every ``train.log_every`` step
  (``param_norm`` before the update, ``adam_m_norm``/``adam_v_norm`` after it, learned scalars where
  the variant has them) and their host transfer, on the same model after its steps (timing the
  monitors alone: two model copies interleaved measured their cache effects, not the monitors);
- ``step with the periodic monitors``: a probe step: the hooks of the monitors that read the step's
  own backward armed before it (:class:`resnorm.monitors.forward.StreamGradProbe`), the step, then
  every monitor due every ``train.probe_every`` steps (:class:`resnorm.monitors.probes.ActivationProbe`,
  :class:`resnorm.monitors.forward.ForwardStatsProbe` on the activation probe's trace,
  :class:`resnorm.monitors.weights.UpdateProbe`) and their host transfer; its excess over the plain
  step is amortised over ``probe_every``.

Printed: the medians, the every-step ratio, the amortised periodic share and their sum against the
issue's target (all default monitors together <= 3% of the step at depth 48).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET = 0.03


def measure(depth: int, rounds: int, warmup: int) -> dict:
    import torch

    from benchmarks import common, peers
    from resnorm.config.schema import TrainConfig
    from resnorm.monitors.forward import forward_probes
    from resnorm.monitors.weights import weight_probes
    from resnorm.monitors.probes import ActivationProbe

    ref = common.REFERENCE
    batches = peers.make_batches(4, ref["batch"], ref["seq"], ref["vocab"], "cpu")
    impl = peers.ours(depth, ref, batches=batches, probes=True, name="step")
    cfg = impl.extra["cfg"].train
    probes = weight_probes(impl.model, impl.extra["optimizer"], cfg)
    every_step = [p for p in probes if p.due(1, False)]  # due on a step that is not a probe step
    act = ActivationProbe(impl.model, cfg.probe_every, cfg.steps)
    periodic = [act, *forward_probes(impl.model, cfg, share=act), *[p for p in probes if p not in every_step]]
    x = batches[0][0]

    def calls(group):
        def call():  # what fit does around a step for these probes, and their host transfer
            vals = [p.before_update(x) for p in group]
            vals += [p.after_update() for p in group]
            torch.cat([t.reshape(-1) for t in vals if t is not None]).tolist()
        return call

    def periodic_step():  # a probe step: hooks armed before the forward, then every periodic read
        for p in periodic:
            p.before_forward()
        impl.step()
        calls(periodic)()

    timed = common.interleave({"step": impl.step, "every-step monitors": calls(every_step),
                               "step with the periodic monitors": periodic_step}, steps=rounds, warmup=warmup)
    step = timed.median("step")
    every = timed.median("every-step monitors") / step
    probe_every = TrainConfig().probe_every
    periodic_ms = (timed.median("step with the periodic monitors") - step) * 1e3
    amortised = periodic_ms / 1e3 / (probe_every * step)
    return dict(depth=depth, rounds=rounds, threads=torch.get_num_threads(), step_ms=step * 1e3,
                every_step_ms=timed.median("every-step monitors") * 1e3,
                periodic_call_ms=periodic_ms, probe_every=probe_every,
                every_step_overhead=every, periodic_amortised=amortised, total=every + amortised,
                every_step=[type(p).__name__ for p in every_step], periodic=[type(p).__name__ for p in periodic])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.depth, args.rounds, args.warmup)
    print(f"depth {r['depth']}, {r['threads']} threads, {r['rounds']} interleaved rounds (medians)")
    print(f"  step                         {r['step_ms']:9.1f} ms")
    print(f"  every-step monitors, calls   {r['every_step_ms']:9.1f} ms  ({r['every_step_overhead']:+.2%}): "
          f"{', '.join(r['every_step'])}")
    print(f"  periodic monitors, per call  {r['periodic_call_ms']:9.1f} ms  (/{r['probe_every']} steps = "
          f"{r['periodic_amortised']:+.2%}): {', '.join(r['periodic'])}")
    ok = r["total"] <= TARGET
    print(f"  all default monitors         {r['total']:+.2%} of the step  (target <= {TARGET:.0%}: "
          f"{'met' if ok else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
