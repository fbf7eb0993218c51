"""resnorm benchmarks (speed and overhead): ``python benchmarks/run.py [--quick] [--only SECTIONS]``.

Sections (all by default, in this order):

  step      train step time: ours vs HF GPT2LMHeadModel vs x-transformers, ratios, FLOP/s vs peak
  probes    probe overhead (per-layer gradient norms every step) on vs off, step and real loop
  compile   torch.compile on/off with probes on: compile time, steady step, same losses
  speedups  prototypes of proposed changes to resnorm/, measured side by side with the current code
  sweep     a 6-run sweep through the real CLI per launcher, and process start-up alone
  gpu       bf16 autocast at d_model 512, seq 512, batch 32, depth 24 (skipped without CUDA)

Every comparison interleaves its implementations in one process and reports medians and per-round
ratios (absolute times drift on a shared machine). Results: a table on stdout and
``benchmarks/out/bench_<time>.json`` (plus ``benchmarks/out/latest.json``).
Imports are lazy so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SECTIONS = ("step", "probes", "compile", "speedups", "sweep", "gpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny depths and few steps (about a minute)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections ({','.join(SECTIONS)})")
    p.add_argument("--threads", type=int, default=2, help="torch threads in this process (the reference: 2)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds per comparison (default 20; quick 4)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; quick 1)")
    p.add_argument("--depths", default=None, help="depths for the step comparison (default 6,24)")
    p.add_argument("--probe-depth", type=int, default=None, help="depth for the probe overhead (default 48)")
    p.add_argument("--compile-depths", default=None, help="depths for torch.compile (default 6,24)")
    p.add_argument("--launchers", default="basic,local", help="launchers to compare in the sweep (default basic,local)")
    p.add_argument("--sweep-steps", type=int, default=None, help="train.steps per sweep job (default 200)")
    p.add_argument("--sweep-depths", default=None, help="depths of the sweep grid (default 6,24,48)")
    p.add_argument("--sweep-extra", default="", help="extra overrides for every sweep job, space-separated")
    p.add_argument("--speedups", default=None,
                   help="which speed-up prototypes to time (default all: fused_adamw,threads,omp,attention,"
                        "bookkeeping,wandb_init)")
    p.add_argument("--gpu-depths", default="24", help="depths for the GPU part (default 24)")
    p.add_argument("--omp-wait-policy", default="passive", choices=("passive", "active", "inherit"),
                   help="OMP_WAIT_POLICY for this process and its subprocesses, set before torch loads "
                        "(default passive: on a shared machine OpenMP's spin-waiting makes 2-thread timings "
                        "several times slower and far noisier; 'inherit' leaves the environment as it is)")
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/out/ (default bench_<time>.json)")
    return p.parse_args(argv)


def ints(text: str):
    return [int(x) for x in str(text).split(",") if x.strip()]


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import common
    from benchmarks.report import render

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        print(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2

    q = args.quick
    steps = args.steps or (4 if q else 20)
    warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    depths = ints(args.depths or ("2" if q else "6,24"))
    probe_depth = args.probe_depth or (4 if q else 48)
    compile_depths = ints(args.compile_depths or ("2" if q else "6,24"))
    sweep_steps = args.sweep_steps or (5 if q else 200)
    sweep_depths = args.sweep_depths or ("1,2,3" if q else "6,24,48")

    import os

    if args.omp_wait_policy != "inherit":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # read once, when torch loads OpenMP
    import torch

    torch.set_num_threads(args.threads)
    ref = common.REFERENCE
    results = dict(
        issue="#2, #6", date=time.strftime("%Y-%m-%d %H:%M:%S"), quick=q, argv=sys.argv[1:],
        machine=common.machine_info(), threads=args.threads,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(unset: OpenMP's default)"), reference=ref, sections={},
    )
    stamp = time.strftime("%Y%m%d_%H%M%S")
    out_name = args.out or f"bench_{stamp}{'_quick' if q else ''}.json"

    def save():
        path = common.write_json(results, out_name)
        common.write_json(results, "latest.json")
        return path

    for section in SECTIONS:
        if section not in only:
            continue
        t0 = time.perf_counter()
        print(f"== {section} ...", flush=True)
        if section == "step":
            from benchmarks import bench_step
            res = bench_step.measure(depths, ref, steps=steps, warmup=warmup)
        elif section == "probes":
            from benchmarks import bench_probes
            res = bench_probes.measure(probe_depth, ref, steps=steps, warmup=warmup,
                                       loop_steps=8 if q else 10, loop_reps=1 if q else 2, threads=args.threads)
        elif section == "compile":
            from benchmarks import bench_compile
            res = bench_compile.measure(compile_depths, ref, steps=steps, warmup=warmup, check_steps=3 if q else 5)
        elif section == "speedups":
            from benchmarks import speedups
            res = speedups.measure(ref, depths=depths, probe_depth=probe_depth, steps=steps, warmup=warmup,
                                   threads=args.threads, quick=q,
                                   **({"items": args.speedups.split(",")} if args.speedups else {}))
        elif section == "sweep":
            from benchmarks import bench_sweep
            res = bench_sweep.measure([s for s in args.launchers.split(",") if s], norms="pre,post",
                                      depths=sweep_depths, steps=sweep_steps, extra=args.sweep_extra.split(),
                                      startup_reps=2 if q else 5, timeout=3000)
            torch.set_num_threads(args.threads)
        elif section == "gpu":
            from benchmarks import bench_gpu
            res = bench_gpu.measure(ints(args.gpu_depths), steps=steps, warmup=warmup)
        res["section_wall_s"] = time.perf_counter() - t0
        results["sections"][section] = res
        torch.set_num_threads(args.threads)
        print(render({**results, "sections": {section: res}}, header=False), flush=True)
        save()

    path = save()
    print()
    print(render(results, only_checks=True))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
