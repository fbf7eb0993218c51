"""Where a training step's time goes, by kernel family: ``python benchmarks/profile_step.py [--depth 6]``.

Profiles ours and the peers (torch.profiler, CPU) over a few steps of the reference config and
prints the share of self CPU time per family (matmul, attention, GELU, norms, optimizer, copies,
other), so a claim like "the step is matmul-bound and the peers run the same kernels" can be checked.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

FAMILIES = (
    ("matmul (mm/addmm/bmm)", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("attention (SDPA kernels)", ("scaled_dot_product", "flash_attention")),
    ("GELU fwd+bwd", ("aten::gelu",)),
    ("layer norm fwd+bwd", ("layer_norm",)),
    ("optimizer (AdamW foreach ops)", ("_foreach", "aten::lerp_", "aten::addcdiv_", "aten::addcmul_")),
    ("copies / fills", ("aten::copy_", "aten::fill_", "aten::zero_")),
    ("cross-entropy", ("log_softmax", "nll_loss")),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impls", default="ours,hf_gpt2,x_transformers")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import common, peers

    torch.set_num_threads(args.threads)
    ref = common.REFERENCE
    batches = peers.make_batches(4, ref["batch"], ref["seq"], ref["vocab"], "cpu")
    rows = []
    for name in args.impls.split(","):
        impl = getattr(peers, name)(args.depth, ref, batches=batches)
        for _ in range(2):
            impl.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                impl.step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        row = {"impl": name, "step_ms (profiled)": total / args.steps / 1e3}
        seen = 0.0
        for label, keys in FAMILIES:
            t = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys))
            row[label] = f"{100 * t / total:.1f}%"
            seen += t
        row["other"] = f"{100 * (total - seen) / total:.1f}%"
        rows.append(row)
        del impl
    print(f"self CPU time by kernel family, depth {args.depth}, {args.threads} threads, {args.steps} steps")
    print(common.fmt_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
