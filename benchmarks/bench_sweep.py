"""(3) Sweep throughput: the real CLI, a 6-run sweep, per launcher; and process start-up alone.

``python run.py -m model.norm=pre,post depth=6,24,48 train.steps=200 name=bench_sweep_<launcher>
logger.mode=offline '~hydra.callbacks.analysis'`` in a fresh temporary folder, once per launcher.
Each runs with ``hydra/launcher=<name>`` (``basic`` is Hydra's own; any other is reported "not
available" when ``conf/hydra/launcher/<name>.yaml`` does not exist in this checkout).
The account splits the wall time into the jobs' own ``wall_s`` (from their ``summary.json``) and the
rest (interpreter, imports, Hydra composition, validation of every job, launcher start-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from . import common

STARTUP_COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "import torch": ["-c", "import torch"],
    "import hydra": ["-c", "import hydra"],
    "import wandb": ["-c", "import wandb"],
    "import torch, hydra, wandb": ["-c", "import torch, hydra, wandb"],
    "run.py --help": [str(common.ROOT / "run.py"), "--help"],
    "run.py --cfg job (dry run)": [str(common.ROOT / "run.py"), "--cfg", "job"],
}


def _env(extra: Optional[dict] = None) -> dict:
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(common.ROOT), **(extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def startup(reps: int) -> List[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="resnorm_bench_startup_") as tmp:
        for label, args in STARTUP_COMMANDS.items():
            try:
                t = common.median_wall([common.PYTHON, *args], reps, cwd=Path(tmp), env=_env())
                rows.append(dict(command=label, median_s=t))
            except subprocess.CalledProcessError as err:
                rows.append(dict(command=label, median_s=None, error=(err.stderr or b"")[-300:].decode(errors="replace")))
    return rows


def default_launcher() -> str:
    """The launcher ``conf/config.yaml`` selects (``override hydra/launcher: NAME``), else Hydra's basic."""
    import yaml

    defaults = yaml.safe_load((common.ROOT / "conf" / "config.yaml").read_text()).get("defaults", [])
    for entry in defaults:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.replace("override ", "").strip() == "hydra/launcher":
                    return str(value)
    return "basic"


def launcher_available(name: str) -> Optional[str]:
    """None when the launcher can be used, else why not."""
    if name == "basic":
        return None
    if (common.ROOT / "conf" / "hydra" / "launcher" / f"{name}.yaml").is_file():
        return None
    return f"not available: no conf/hydra/launcher/{name}.yaml in this checkout"


def sweep_args(launcher: str, norms: str, depths: str, steps: int, extra: List[str]) -> List[str]:
    args = ["-m", f"model.norm={norms}", f"depth={depths}", f"train.steps={steps}",
            f"name=bench_sweep_{launcher}", "logger.mode=offline", "~hydra.callbacks.analysis", *extra]
    # always named: the project's default launcher is not Hydra's (conf/config.yaml picks it)
    return args + [f"hydra/launcher={launcher}"]


def one_sweep(launcher: str, norms: str, depths: str, steps: int, extra: List[str], timeout: int) -> dict:
    reason = launcher_available(launcher)
    if reason:
        return dict(launcher=launcher, status=reason)
    args = sweep_args(launcher, norms, depths, steps, extra)
    with tempfile.TemporaryDirectory(prefix=f"resnorm_bench_sweep_{launcher}_") as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([common.PYTHON, str(common.ROOT / "run.py"), *args], cwd=tmp, env=_env(),
                              capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        summaries = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("multirun/*/*/summary.json"))]
    jobs = [dict(run=s.get("run_name"), status=s.get("status"), wall_s=s.get("wall_s"),
                 tokens_per_s=s.get("tokens_per_s")) for s in summaries]
    job_wall = sum(j["wall_s"] or 0.0 for j in jobs)
    out = dict(launcher=launcher, command="python run.py " + " ".join(args), returncode=proc.returncode,
               wall_s=wall, jobs=jobs, n_jobs=len(jobs), sum_job_wall_s=job_wall,
               outside_jobs_s=wall - job_wall if launcher == "basic" else None,
               statuses=sorted({j["status"] for j in jobs}))
    if proc.returncode != 0:
        out["stderr_tail"] = proc.stderr[-2000:]
    return out


def measure(launchers: List[str], norms: str, depths: str, steps: int, extra: List[str], startup_reps: int,
            timeout: int) -> dict:
    start = startup(startup_reps)
    sweeps = [one_sweep(name, norms, depths, steps, extra, timeout) for name in launchers]
    ran = [s for s in sweeps if s.get("wall_s") is not None and s.get("returncode") == 0]
    checks = []
    default = default_launcher()
    if len(ran) >= 2:
        fastest = min(ran, key=lambda s: s["wall_s"])["launcher"]
        checks.append(dict(target=f"the default launcher ({default}) is the faster one", value=fastest,
                           ok=fastest == default))
    return dict(startup=start, sweeps=sweeps, checks=checks, default_launcher=default,
                grid=dict(norms=norms, depths=depths, steps=steps, extra=extra))
