"""Studies of thousands of runs: planning, per-job overhead, analysis, peak memory (on demand).

    python -m benchmarks.bench_scale                      # N = 100, 1000, 10000
    python -m benchmarks.bench_scale --sizes 100,1000 --sweep-sizes 100 --baseline plan,analysis

For each N it prints:

- **plan**: ``run.py --dry-run`` of N jobs (``seed x model.norm x depth``, data=synthetic), wall
  seconds and seconds a job; then the same sweep as a real command over a sweep folder whose N runs
  are all finished (generated folders and run index): the skip-if-done re-run, which launches nothing;
- **analysis**: ``python -m analysis`` over N generated run folders (copies of one real tiny run
  with their identities, seeds, variants and depths changed), seconds a run and peak memory (RSS);
- **sweep** (the sizes of ``--sweep-sizes``): a sweep of N tiny jobs (2 steps, depth 1, d_model 16,
  W&B offline) with the ``local`` launcher, against the floor: the same ``fit`` calls back to back
  in one process. Printed: the sweep's wall time, the floor, the jobs' own training (the summaries'
  ``wall_s`` over the workers), the share of the wall time outside it, and the ratio sweep x
  workers / floor.

``--baseline plan,analysis`` also times each planning and analysis row the way it ran before (every job composed
by Hydra, ``hydra.sweeper.fast_plan=false``; the per-run reader, ``analysis.load.load_sweep_per_run``),
alternated with the new one. The targets are printed as met or not met with the measured figure.
Every row says the machine's load (``/proc/loadavg``) before and after. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from . import common

NORMS = ("post", "pre", "rmsnorm", "deepnorm", "sandwich", "peri", "rezero", "dyt", "scalenorm", "lns")
TINY_JOB = ("data=synthetic", "train.steps=2", "depth=1", "model.d_model=16")
#: (what, limit, unit): the targets, checked against the largest N measured
TARGETS = {"dry_run_10000_s": 30.0, "skip_10000_s": 10.0, "outside_share": 0.10, "analysis_10000_s": 60.0,
           "analysis_peak_gib": 4.0}


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def env() -> Dict[str, str]:
    return {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(common.ROOT), "OMP_NUM_THREADS": "1"}


def grid(n: int) -> List[str]:
    """``seed x model.norm x depth`` with N jobs (N a multiple of 100: 10 norms x 10 depths x N/100 seeds)."""
    seeds = max(1, n // 100)
    return [f"seed=range({seeds})", f"model.norm={','.join(NORMS)}", "depth=range(1,11)", "data=synthetic"]


LAST_CPU = {"s": 0.0}  # CPU seconds (user + system) of the last subprocess and its children


def timed(args: Sequence[str], cwd: Path) -> Tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of a subprocess (its CPU seconds in :data:`LAST_CPU`)."""
    import resource

    def cpu() -> float:
        u = resource.getrusage(resource.RUSAGE_CHILDREN)
        return u.ru_utime + u.ru_stime

    c0, t0 = cpu(), time.perf_counter()
    proc = subprocess.run([common.PYTHON, *args], cwd=cwd, env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    LAST_CPU["s"] = cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)[:200]} failed:\n{proc.stderr[-2000:]}")
    return wall, proc


def run_py(*args: str) -> List[str]:
    return [str(common.ROOT / "run.py"), *args]


def dry_run(n: int, cwd: Path, fast: bool) -> Tuple[float, List[str]]:
    """Seconds of the dry run of N jobs, and the run ids of its table."""
    wall, proc = timed(run_py("--dry-run", *grid(n), f"name=plan{n}", f"hydra.sweeper.fast_plan={str(fast).lower()}"),
                       cwd)
    ids = [line.split()[1] for line in proc.stdout.splitlines() if line[:1].isdigit() and len(line.split()) > 2]
    assert len(ids) == n, (n, len(ids), proc.stdout[-1000:])
    return wall, ids


def finish(sweep: Path, ids: Sequence[str]) -> None:
    """Make every run of the sweep finished: a summary in its folder and its line in the run index."""
    from resnorm.runs.index import INDEX

    lines = []
    for rid in ids:
        (sweep / rid).mkdir(parents=True, exist_ok=True)
        (sweep / rid / "summary.json").write_text(json.dumps({"run_id": rid, "status": "completed"}))
        lines.append(json.dumps({"run_id": rid, "dir": rid, "status": "completed", "outcome": "trained"}))
    (sweep / INDEX).write_text("\n".join(lines) + "\n")


def plan_rows(n: int, baseline: bool) -> List[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="resnorm_bench_plan_") as tmp:
        modes = ([True, False] if baseline else [True])
        ids: List[str] = []
        for fast in modes:
            before = load()
            wall, ids = dry_run(n, Path(tmp), fast)
            rows.append(dict(what="dry run", n=n, plan="fast" if fast else "full compose", wall_s=wall,
                             cpu_s=LAST_CPU["s"], per_job_s=wall / n, load=f"{before}->{load()}"))
        finish(Path(tmp) / "multirun" / f"plan{n}", ids)
        before = load()
        wall, proc = timed(run_py("-m", *grid(n), f"name=plan{n}", "~hydra.callbacks.analysis"), Path(tmp))
        assert f"{n} of {n} jobs already done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
        rows.append(dict(what="skip-if-done re-run", n=n, plan="fast", wall_s=wall, cpu_s=LAST_CPU["s"],
                         per_job_s=wall / n, load=f"{before}->{load()}"))
    return rows


# --- analysis over generated run folders -----------------------------------------------------------

def template_run(tmp: Path) -> Path:
    """One real tiny run (trained by the CLI) to copy."""
    wall, proc = timed(run_py(*TINY_JOB, "name=template", "logger.mode=disabled", "train.progress=false",
                              "hydra.run.dir=template"), tmp)
    return tmp / "template"


def generate(template: Path, sweep: Path, n: int) -> None:
    """N run folders: the template's files, with identity, seed, variant and depth changed in the summary."""
    summary = json.loads((template / "summary.json").read_text())
    for i in range(n):
        rid = f"{i:012x}"
        folder = sweep / rid
        folder.mkdir(parents=True)
        norm, depth, seed = NORMS[i % len(NORMS)], 1 + (i // len(NORMS)) % 10, i // 100
        s = dict(summary, run_id=rid, seed=seed, run_name=f"depth={depth},model.norm={norm},seed={seed}",
                 overrides=[f"seed={seed}", f"model.norm={norm}", f"depth={depth}"])
        s["config"] = dict(summary["config"], seed=seed, depth=depth, model=dict(summary["config"]["model"], norm=norm))
        (folder / "summary.json").write_text(json.dumps(s))
        for name in ("metrics.parquet", "layers.parquet"):
            if (template / name).is_file():
                os.link(template / name, folder / name)


ANALYSE = ("import sys, resource, time\n"
           "import analysis.report as r\n"
           "from analysis.load import load_sweep_per_run\n"
           "if sys.argv[3] == 'per_run': r.load_sweep = load_sweep_per_run\n"
           "t = time.perf_counter(); r.make_report(sys.argv[1], sys.argv[2])\n"
           "u = resource.getrusage(resource.RUSAGE_SELF)\n"
           "print('cpu', u.ru_utime + u.ru_stime, 'wall', time.perf_counter() - t, 'peak_kib', u.ru_maxrss)\n")


def analysis_rows(n: int, template: Path, baseline: bool) -> List[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="resnorm_bench_analysis_") as tmp:
        sweep = Path(tmp) / "multirun" / f"analysis{n}"
        generate(template, sweep, n)
        for reader in (["bulk", "per_run"] if baseline else ["bulk"]):
            before = load()
            wall, proc = timed(["-W", "ignore", "-c", ANALYSE, str(sweep), str(Path(tmp) / reader), reader], Path(tmp))
            words = proc.stdout.split()
            cpu, inner, peak = float(words[-5]), float(words[-3]), int(words[-1])
            rows.append(dict(what="analysis", n=n, reader=reader, wall_s=wall, report_s=inner, cpu_s=cpu,
                             per_run_s=wall / n, peak_gib=peak / 2 ** 20, load=f"{before}->{load()}"))
    return rows


# --- a sweep of tiny jobs against the floor -------------------------------------------------------------

FLOOR = ("import sys, time, tempfile\n"
         "from pathlib import Path\n"
         "from resnorm.config.compose import compose\n"
         "from resnorm.train.job import JobInfo, train\n"
         "n, extra = int(sys.argv[1]), sys.argv[2:]\n"
         "cfgs = [compose([*extra, f'seed={i}']) for i in range(n)]\n"
         "with tempfile.TemporaryDirectory() as tmp:\n"
         "    t = time.perf_counter()\n"
         "    for i, cfg in enumerate(cfgs):\n"
         "        train(cfg, JobInfo(Path(tmp) / str(i), f'seed={i}', 'floor', [f'seed={i}']))\n"
         "    print('floor', time.perf_counter() - t)\n")


def sweep_rows(n: int) -> List[dict]:
    """The local launcher's sweep of N tiny jobs, its no-op re-run, and the floor of the same fits."""
    with tempfile.TemporaryDirectory(prefix="resnorm_bench_sweep_") as tmp:
        before = load()
        _, floor = timed(["-c", FLOOR, str(n), *TINY_JOB, "name=floor"], Path(tmp))
        floor_s = float(floor.stdout.split()[-1])
        wall, proc = timed(run_py("-m", *TINY_JOB, f"seed=range({n})", f"name=tiny{n}"), Path(tmp))
        sweep = Path(tmp) / "multirun" / f"tiny{n}"
        own = sum(json.loads(p.read_text()).get("wall_s") or 0.0 for p in sweep.glob("*/summary.json"))
        workers = local_workers()
        rerun, _ = timed(run_py("-m", *TINY_JOB, f"seed=range({n})", f"name=tiny{n}", "~hydra.callbacks.analysis"),
                         Path(tmp))
        return [dict(what="tiny sweep", n=n, wall_s=wall, floor_s=floor_s, own_s=own, workers=workers,
                     outside_share=1 - own / workers / wall, ratio=wall * workers / floor_s,
                     overhead_per_job_s=(wall * workers - floor_s) / n, rerun_s=rerun, load=f"{before}->{load()}")]


def local_workers() -> int:
    from resnorm.train.devices import cpu_count

    return max(1, cpu_count())


# --- the report ---------------------------------------------------------------------------------------

def verdicts(rows: List[dict]) -> List[str]:
    """The targets, met or not met, with the measured figure (the largest N measured of each kind)."""
    def last(what: str, key: str, **match):
        found = [r for r in rows if r["what"] == what and all(r.get(k) == v for k, v in match.items())]
        return (found[-1][key], found[-1]["n"]) if found else (None, None)

    checks = [("dry run of 10,000 jobs <= 30 s", last("dry run", "wall_s", plan="fast"), TARGETS["dry_run_10000_s"]),
              ("skip-if-done over 10,000 finished runs <= 10 s", last("skip-if-done re-run", "wall_s"),
               TARGETS["skip_10000_s"]),
              ("tiny sweep: <= 10% of the wall time outside training", last("tiny sweep", "outside_share"),
               TARGETS["outside_share"]),
              ("python -m analysis over 10,000 runs <= 60 s", last("analysis", "wall_s", reader="bulk"),
               TARGETS["analysis_10000_s"]),
              ("analysis peak memory <= 4 GiB", last("analysis", "peak_gib", reader="bulk"), TARGETS["analysis_peak_gib"])]
    out = []
    for label, (value, n), limit in checks:
        if value is None:
            out.append(f"{label}: not measured")
            continue
        out.append(f"{label}: {'met' if value <= limit else 'NOT met'} ({value:.3g} at N={n})")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000", help="N for planning and analysis")
    parser.add_argument("--sweep-sizes", default="100,1000", help="N for the tiny sweep against its floor")
    parser.add_argument("--baseline", default="", help="also time the old way of these sections, alternated with the "
                        "new: plan (every job composed by Hydra), analysis (the per-run reader); e.g. plan,analysis")
    parser.add_argument("--only", default="plan,analysis,sweep", help="sections: plan, analysis, sweep")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    only = set(args.only.split(","))
    rows: List[dict] = []
    print(f"bench_scale: load {Path('/proc/loadavg').read_text().strip()}, {os.cpu_count()} cores", flush=True)
    if "analysis" in only:
        tmp = Path(tempfile.mkdtemp(prefix="resnorm_bench_template_"))
        template = template_run(tmp)
    for n in sizes:
        if "plan" in only:
            rows += plan_rows(n, "plan" in args.baseline)
            print(*(json.dumps(r) for r in rows[-(3 if "plan" in args.baseline else 2):]), sep="\n", flush=True)
        if "analysis" in only:
            rows += analysis_rows(n, template, "analysis" in args.baseline)
            print(*(json.dumps(r) for r in rows[-(2 if "analysis" in args.baseline else 1):]), sep="\n", flush=True)
    if "sweep" in only:
        for n in [int(s) for s in args.sweep_sizes.split(",") if s]:
            rows += sweep_rows(n)
            print(json.dumps(rows[-1]), flush=True)
    if "analysis" in only:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(verdicts(rows)))
    print(f"bench_scale: load {Path('/proc/loadavg').read_text().strip()} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
