"""The prepared GPU benchmark of stacked ensembles and packed jobs, one command: ``python benchmarks/gpu_throughput.py``.

(a) Sweep throughput on one GPU, the default config (``data=synthetic``, ``train.steps``
``--steps``), 16 and 64 members (seeds), three ways, each timed from the first run's set-up to the
last run's summary (the imports and, for ``packed``, the worker processes' start excluded):

- ``stacked``: the members as one stack (:func:`resnorm.train.stack.fit_stack`), one process;
- ``solo``: one job at a time on the GPU (what ``jobs_per_device=1`` gives): ``--solo-runs`` solo runs
  one after the other, their throughput taken as the sweep's (every run costs the same);
- ``packed``: ``--pack`` processes on the one GPU at once, each training its share of
  ``--solo-runs`` solo runs one after the other (what packed jobs on one device give).

Throughput is training tokens per second over the whole sweep (members x steps x batch x seq_len /
wall time); the target is ``stacked`` >= 10 x ``solo`` at 16 members.

(b) One run at nanoGPT's character-level shape (6 layers, width 384, 6 heads, context 256, batch
64), bf16 autocast, probes on (the defaults: per-layer gradient norms every step, the activation,
forward and weight monitors every ``train.probe_every`` steps), trained through the loop's own step
(:func:`resnorm.train.loop.start_step` / ``forward_backward`` / ``end_step``, the probe callbacks attached)
with ``torch.compile`` in each mode of ``--compile-modes`` (``reduce-overhead`` uses CUDA graphs);
tokens/s over the timed steps and MFU against the device's bf16 peak
(:func:`resnorm.monitors.cost.device_peak_flops`). Target: 1M tokens/s on an H100-class GPU.

``--smoke``: every part, tiny (depth 2, width 32, a few steps, 3 members, 2 packed processes, eager only), on
the CPU when there is no GPU; the tests run it. The last line of stdout is the result as JSON;
``benchmarks/out/gpu_throughput.json`` keeps it. Not run on a GPU by us (none was available).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMOKE = ("depth=2", "model.d_model=32", "model.n_heads=2", "train.seq_len=16", "train.batch_size=4",
         "data.synthetic_tokens=4000", "train.eval_every=5", "train.eval_batches=1")
NANOGPT = ("depth=6", "model.d_model=384", "model.n_heads=6", "train.seq_len=256", "train.batch_size=64",
           "train.precision=bf16")
COMMON = ("data=synthetic", "logger.mode=disabled", "train.progress=false")


def _configs(members: int, steps: int, device: str, extra: Sequence[str]) -> list:
    from resnorm.config.compose import compose

    return [compose((*COMMON, *extra, f"train.steps={steps}", f"train.device={device}", f"seed={i}"))
            for i in range(members)]


def _jobs(folder: Path, cfgs) -> list:
    from resnorm.runs.identity import run_id
    from resnorm.train.job import JobInfo

    return [JobInfo(folder / run_id(c), f"seed={c.seed}", "bench", [], run_id(c)) for c in cfgs]


def _tokens(cfgs) -> int:
    return sum(c.train.steps * c.train.batch_size * c.train.seq_len for c in cfgs)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stacked(members: int, steps: int, device: str, extra) -> dict:
    from resnorm.train.stack import fit_stack

    cfgs = _configs(members, steps, device, extra)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summaries = fit_stack(cfgs, _jobs(Path(tmp), cfgs))
        _sync(device)
        wall = time.perf_counter() - t0
    assert all(s["status"] in ("completed", "diverged") for s in summaries)
    return dict(members=members, mode="stacked", runs_timed=members, wall_s=wall, tokens_per_s=_tokens(cfgs) / wall)


def _warm(device: str, extra) -> None:
    """One solo run of 2 steps: the lazy imports and the device's first kernels, before any timing."""
    with tempfile.TemporaryDirectory() as tmp:
        _solo_runs(_configs(1, 2, device, extra), tmp, device)


def _solo_runs(cfgs, folder: str, device: str) -> None:
    from resnorm.train.job import train

    for cfg, job in zip(cfgs, _jobs(Path(folder), cfgs)):
        train(cfg, job)
    _sync(device)


def solo(members: int, runs: int, steps: int, device: str, extra) -> dict:
    cfgs = _configs(min(runs, members), steps, device, extra)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _solo_runs(cfgs, tmp, device)
        wall = time.perf_counter() - t0
    return dict(members=members, mode="solo", runs_timed=len(cfgs), wall_s=wall, tokens_per_s=_tokens(cfgs) / wall)


def _packed_worker(share: List[int], steps: int, device: str, extra, folder: str, barrier) -> None:
    import torch

    torch.set_num_threads(1)
    cfgs = [c for i, c in enumerate(_configs(max(share) + 1, steps, device, extra)) if i in share]
    _warm(device, extra)
    barrier.wait()
    _solo_runs(cfgs, folder, device)


def packed(members: int, runs: int, pack: int, steps: int, device: str, extra) -> dict:
    n = min(runs, members)
    # CUDA needs fresh processes; on the CPU (--smoke) a fork skips the workers' imports
    ctx = mp.get_context("spawn" if device.startswith("cuda") else "fork")
    barrier = ctx.Barrier(pack + 1)
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_packed_worker, args=(list(range(k, n, pack)), steps, device, extra, tmp, barrier))
                 for k in range(pack)]
        for p in procs:
            p.start()
        barrier.wait()
        t0 = time.perf_counter()
        for p in procs:
            p.join()
        wall = time.perf_counter() - t0
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    cfgs = _configs(n, steps, device, extra)
    return dict(members=members, mode="packed", processes=pack, runs_timed=n, wall_s=wall,
                tokens_per_s=_tokens(cfgs) / wall)


def _time_mode(mode: str, steps: int, warmup: int, device: str, extra) -> dict:
    """Tokens/s and MFU of the loop's own step (probe callbacks attached) with ``torch.compile``
    in ``mode`` (``eager``: none)."""
    import torch

    from resnorm.train.callbacks import CallbackList, probe_callbacks
    from resnorm.train.loop import end_step, forward_backward, setup, start, start_step
    from resnorm.monitors.cost import device_peak_flops, flops_per_token, mfu

    (cfg,) = _configs(1, warmup + steps, device, extra)
    with tempfile.TemporaryDirectory() as tmp:
        (job,) = _jobs(Path(tmp), [cfg])
        run = setup(cfg, job, 0, 1, None)
        if mode != "eager":
            run.loss_fn = torch.compile(run.model.loss, mode=None if mode == "default" else mode)
        run.callbacks = CallbackList(probe_callbacks(run))
        start(run)
        for step in range(warmup + steps):
            if step == warmup:
                _sync(device)
                t0 = time.perf_counter()
            if mode == "reduce-overhead":  # CUDA graphs: a new iteration (its outputs may be reused)
                torch.compiler.cudagraph_mark_step_begin()
            rec, x, y = start_step(run, step)
            end_step(run, rec, x, forward_backward(run, x, y))
        _sync(device)
        wall = time.perf_counter() - t0
    tps = steps * cfg.train.batch_size * cfg.train.seq_len / wall
    peak, source = device_peak_flops(run.device, "bf16")
    return dict(tokens_per_s=tps, mfu=mfu(tps, flops_per_token(run.model.shape), peak), peak_flops=peak,
                peak_source=source, device=str(run.device))


def single(steps: int, warmup: int, device: str, extra, modes: Sequence[str]) -> dict:
    """(b): one run per compile mode; the fastest mode is the result. A mode that fails is recorded
    with its error (the others still run)."""
    out: Dict[str, dict] = {}
    for mode in modes:
        try:
            out[mode] = _time_mode(mode, steps, warmup, device, extra)
            print(f"single run, compile={mode}: {out[mode]['tokens_per_s']:,.0f} tokens/s, "
                  f"MFU {out[mode]['mfu']:.3f}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001  # e.g. a compile mode this GPU or torch cannot do
            out[mode] = dict(error=f"{type(exc).__name__}: {exc}"[:500], tokens_per_s=0.0)
            print(f"single run, compile={mode}: failed: {out[mode]['error']}", file=sys.stderr)
    best = max(out, key=lambda m: out[m]["tokens_per_s"])
    return dict(out[best], best_mode=best, modes=out)


def main(argv=None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device (CPU without a GPU)")
    parser.add_argument("--members", default="16,64")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--solo-runs", type=int, default=4)
    parser.add_argument("--pack", type=int, default=4)
    parser.add_argument("--single-steps", type=int, default=100)
    parser.add_argument("--compile-modes", default="default,reduce-overhead,max-autotune-no-cudagraphs")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.smoke and device == "cpu":
        parser.error("no CUDA device here: this is the GPU benchmark (use --smoke for its tiny CPU check)")
    extra, single_extra = (SMOKE, (*NANOGPT, *SMOKE)) if args.smoke else ((), NANOGPT)
    members = [3] if args.smoke else [int(m) for m in args.members.split(",")]
    steps = 4 if args.smoke else args.steps
    runs, pack = (2, 2) if args.smoke else (args.solo_runs, args.pack)
    _warm(device, extra)
    rows = []
    for n in members:
        rows += [stacked(n, steps, device, extra), solo(n, runs, steps, device, extra),
                 packed(n, runs, pack, steps, device, extra)]
        print(json.dumps(rows[-3:]), file=sys.stderr)
    modes = ["eager"] if args.smoke else args.compile_modes.split(",")
    result = dict(device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", smoke=args.smoke,
                  sweep=rows, single=single(4 if args.smoke else args.single_steps, 2 if args.smoke else 20,
                                            device, single_extra, modes))
    by = {(r["members"], r["mode"]): r["tokens_per_s"] for r in rows}
    result["stacked_over_solo"] = {n: by[(n, "stacked")] / by[(n, "solo")] for n in members}
    result["targets"] = dict(stacked_16_at_least_10x_solo=result["stacked_over_solo"][16] >= 10 if 16 in members else None,
                             single_at_least_1M_tokens_per_s=None if args.smoke else result["single"]["tokens_per_s"] >= 1e6)
    if not args.smoke:
        from resnorm.runs.folder import write_text

        write_text(ROOT / "benchmarks" / "out" / "gpu_throughput.json", json.dumps(result, indent=2, default=str))
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()
