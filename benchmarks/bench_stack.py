"""Stacked ensembles on the CPU: a stack of 8 members against 8 solo runs.

``python -m benchmarks.bench_stack [--members 8] [--steps 100] [--reps 2]``

(1) Sweep wall time through the real CLI: ``python run.py -m seed=0,...,7 data=synthetic
train.steps=S logger.mode=disabled '~hydra.callbacks.analysis'`` (the default model otherwise), once
with ``hydra.sweeper.stack=on`` (one launcher job trains the 8 as one stack) and once with
``hydra.sweeper.stack=off`` (8 jobs through the ``local`` launcher, as many at a time as it runs on
this machine), each in a fresh folder, alternated ``--reps`` times; the figure is the median of the
per-round ratios ``wall(on) / wall(off)`` (below 1: stacking is faster).

(2) The step alone, in one process: one stacked forward and backward of the members
(:func:`resnorm.train.stack.stacked_forward_backward`) against the members' solo forward and backward one
after the other, interleaved (:func:`benchmarks.common.interleave`).

Writes ``benchmarks/out/bench_stack.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from . import common


def sweep_wall(mode: str, members: int, steps: int) -> float:
    seeds = ",".join(str(i) for i in range(members))
    args = ["-m", f"seed={seeds}", "data=synthetic", f"train.steps={steps}", "logger.mode=disabled",
            "train.progress=false", "~hydra.callbacks.analysis", f"hydra.sweeper.stack={mode}",
            "hydra.sweep.dir=sweep"]
    env = {**__import__("os").environ, "WANDB_SILENT": "true", "PYTHONPATH": str(common.ROOT)}
    with tempfile.TemporaryDirectory(prefix=f"resnorm_bench_stack_{mode}_") as tmp:
        t0 = time.perf_counter()
        subprocess.run([common.PYTHON, str(common.ROOT / "run.py"), *args], cwd=tmp, env=env, check=True,
                       capture_output=True)
        wall = time.perf_counter() - t0
        done = [json.loads(p.read_text())["status"] for p in Path(tmp, "sweep").glob("*/summary.json")]
        assert len(done) == members and set(done) == {"completed"}, done
    return wall


def step_ratio(members: int, steps: int, warmup: int) -> dict:
    import torch

    from resnorm.train.loop import forward_backward, setup
    from resnorm.train.stack import stacked_forward_backward
    from resnorm.train.job import JobInfo

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [setup(common.compose("data=synthetic", f"seed={i}", "train.threads=1"),
                      JobInfo(Path(tmp), "b", "b", []), 0, 1, None) for i in range(members)]
    batches = [r.sampler.sample() for r in runs]
    xs, ys = [b[0] for b in batches], [b[1] for b in batches]

    def stacked():
        stacked_forward_backward(runs, xs, ys)
        for r in runs:
            r.optimizer.zero_grad(set_to_none=True)

    def solo():
        for r, x, y in zip(runs, xs, ys):
            forward_backward(r, x, y)
            r.optimizer.zero_grad(set_to_none=True)

    timed = common.interleave({"stacked": stacked, "solo": solo}, steps=steps, warmup=warmup)
    return dict(stacked_s=statistics.median(timed.times["stacked"]), solo_s=statistics.median(timed.times["solo"]),
                ratio_stacked_over_solo=timed.ratio("stacked", "solo"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    rounds = []
    for r in range(args.reps):
        order = ("on", "off") if r % 2 == 0 else ("off", "on")
        walls = {mode: sweep_wall(mode, args.members, args.steps) for mode in order}
        rounds.append(walls)
        print(f"round {r}: stack=on {walls['on']:.1f} s, stack=off {walls['off']:.1f} s", flush=True)
    ratio = statistics.median(w["on"] / w["off"] for w in rounds)
    step = step_ratio(args.members, steps=10, warmup=2)
    payload = dict(members=args.members, steps=args.steps, rounds=rounds, wall_ratio_on_over_off=ratio,
                   step=step, machine=common.machine_info())
    path = common.write_json(payload, "bench_stack.json")
    print(json.dumps(dict(wall_ratio_on_over_off=ratio, step=step), default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
