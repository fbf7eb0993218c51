"""(4) ``torch.compile`` on and off, probes on: compile time, steady-state step, same losses, probes report.

The compiled side compiles exactly what ``resnorm.train.job`` compiles with ``train.compile=true``:
``torch.compile(model.loss)``. Both sides start from the same weights and see the same batches.
"""

from __future__ import annotations

import math
import time

import torch

from . import common, peers

LOSS_RTOL = 1e-4  # relative; fp32 kernels fused differently round differently


def _cold_caches() -> None:
    """Compile time is measured cold: inductor's on-disk FX-graph / AOT-autograd caches off (a second
    run with the same shapes would hit them and compile faster)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = False


def measure_depth(depth: int, ref: dict, steps: int, warmup: int, check_steps: int) -> dict:
    _cold_caches()
    batches = peers.make_batches(4, ref["batch"], ref["seq"], ref["vocab"], "cpu")
    eager = peers.ours(depth, ref, batches=batches, name="eager")
    compiled = peers.ours(depth, ref, batches=batches, compile_loss=True, name="compiled")
    compiled.model.load_state_dict(eager.model.state_dict())
    torch._dynamo.reset()

    t0 = time.perf_counter()
    first_c = compiled.step()
    first_compiled_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    first_e = eager.step()
    first_eager_s = time.perf_counter() - t0
    hosts_e, hosts_c = [first_e], [first_c]
    for _ in range(check_steps - 1):
        hosts_e.append(eager.step())
        hosts_c.append(compiled.step())
    losses_e = [h[0] for h in hosts_e]
    losses_c = [h[0] for h in hosts_c]
    max_rel = max(abs(a - b) / abs(a) for a, b in zip(losses_e, losses_c))
    n_groups = len(compiled.extra["probe"].labels)
    last = hosts_c[-1]
    probes_ok = len(last) == 2 + n_groups and all(math.isfinite(v) for v in last[1:]) and n_groups == 2 * depth
    probe_rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(hosts_e[0][1:], hosts_c[0][1:]))

    timed = common.interleave({"eager": eager.step, "compiled": compiled.step}, steps=steps, warmup=warmup)
    steady_c = timed.median("compiled")
    return dict(
        depth=depth, compile_s=first_compiled_s - steady_c, first_step_compiled_s=first_compiled_s,
        first_step_eager_s=first_eager_s, eager_ms=timed.median("eager") * 1e3, compiled_ms=steady_c * 1e3,
        compiled_over_eager=timed.ratio("compiled", "eager"), check_steps=check_steps,
        losses_eager=losses_e, losses_compiled=losses_c, max_rel_loss_diff=max_rel,
        losses_match=max_rel <= LOSS_RTOL, probe_groups=n_groups, probes_report=probes_ok,
        max_rel_probe_diff_step0=probe_rel,
    )


def measure(depths, ref: dict, steps: int, warmup: int, check_steps: int) -> dict:
    rows = [measure_depth(d, ref, steps, warmup, check_steps) for d in depths]
    checks = []
    for r in rows:
        checks.append(dict(target=f"compiled losses match eager (rtol {LOSS_RTOL:g}, {r['check_steps']} steps) "
                                  f"at depth {r['depth']}", value=r["max_rel_loss_diff"], ok=r["losses_match"]))
        checks.append(dict(target=f"probes report under compile at depth {r['depth']}",
                           value=r["probe_groups"], ok=r["probes_report"]))
    return dict(rows=rows, checks=checks)
