"""Shared helpers: compose the real config, interleaved timing, FLOP counts, the matmul peak, tables.

Timing rule (a shared 2-core machine drifts): every comparison runs its implementations interleaved
in one process, round by round, the order rotated each round; a ratio is the median over rounds of
the per-round ratio ``t(a) / t(b)``, so a slow patch of the machine hits both sides of a ratio.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "benchmarks" / "out"
PYTHON = sys.executable

# The reference config of the speed benchmarks (the CPU part) and its GPU scale-up.
REFERENCE = dict(vocab=256, seq=128, batch=16, d_model=128, n_heads=4, d_ff=512)
GPU_REFERENCE = dict(vocab=256, seq=512, batch=32, d_model=512, n_heads=8, d_ff=2048)


def ensure_root_on_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def compose(*overrides: str):
    """:func:`resnorm.config.compose.compose` with the overrides as arguments (the config a user's command
    line would give)."""
    ensure_root_on_path()
    from resnorm.config.compose import compose as config_compose

    return config_compose(overrides)


def reference_overrides(depth: int, ref: dict = REFERENCE, norm: str = "pre", extra: Sequence[str] = ()) -> List[str]:
    return [f"depth={depth}", f"model.norm={norm}", f"model.d_model={ref['d_model']}",
            f"model.n_heads={ref['n_heads']}", f"model.d_ff={ref['d_ff']}", f"model.vocab_size={ref['vocab']}",
            f"train.seq_len={ref['seq']}", f"train.batch_size={ref['batch']}", "data=synthetic",
            "logger.mode=disabled", "train.progress=false", *extra]


# --- timing -----------------------------------------------------------------------------------------

@dataclass
class Timed:
    """Per-implementation step times (seconds) of one interleaved comparison."""

    times: Dict[str, List[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of t(a)/t(b) measured in the same round."""
        return statistics.median(x / y for x, y in zip(self.times[a], self.times[b]))

    def spread(self, name: str) -> float:
        """Interquartile range over the median (a noise indicator)."""
        xs = sorted(self.times[name])
        q1, q3 = xs[len(xs) // 4], xs[(3 * len(xs)) // 4]
        return (q3 - q1) / statistics.median(xs)


def interleave(fns: Dict[str, Callable[[], None]], steps: int, warmup: int,
               sync: Optional[Callable[[], None]] = None) -> Timed:
    """Run ``warmup`` then ``steps`` rounds; each round calls every fn once (order rotated)."""
    names = list(fns)
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(steps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    return Timed(times)


def median_wall(cmd: Sequence[str], reps: int, cwd: Optional[Path] = None, env=None) -> float:
    import subprocess

    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, check=True)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


# --- FLOPs and the machine's peak -------------------------------------------------------------------

def train_flops_per_step(depth: int, d: int, d_ff: int, vocab: int, seq: int, batch: int) -> float:
    """Model FLOPs of one forward + backward (no recomputation), the PaLM/nanoGPT count.

    ``6 * N * tokens + 12 * L * T * d * tokens`` where ``N = L * (4 d^2 + 2 d d_ff) + d * vocab`` are
    the weights that take part in a matmul (QKV, attention output, fc1, fc2, the untied head; the
    embedding lookups, biases and norms are left out), ``T`` the sequence length and the second term
    the attention scores and their weighted sum (QK^T and AV, the full T x T as in nanoGPT's MFU).
    """
    n = depth * (4 * d * d + 2 * d * d_ff) + d * vocab
    tokens = seq * batch
    return 6.0 * n * tokens + 12.0 * depth * seq * d * tokens


def matmul_peak_flops(size: int = 2048, reps: int = 10, device: str = "cpu", dtype=None) -> float:
    """Achieved FLOP/s of a large square matmul (median of ``reps``), with the current thread count."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    c = torch.empty(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        torch.mm(a, b, out=c)
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        ts.append(time.perf_counter() - t0)
    return 2.0 * size ** 3 / statistics.median(ts)


# --- output -----------------------------------------------------------------------------------------

def machine_info() -> dict:
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                cuda=torch.cuda.is_available())
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        info["load_avg_at_start"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for pkg in ("transformers", "x_transformers", "hydra", "wandb"):
        try:
            mod = __import__(pkg)
            info[pkg] = getattr(mod, "__version__", None) or _dist_version(pkg)
        except Exception:  # noqa: BLE001 - a missing peer is reported, not fatal
            info[pkg] = None
    return info


def _dist_version(pkg: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg.replace("_", "-"))
    except PackageNotFoundError:
        return None


def fmt_table(rows: List[dict], columns: Sequence[str]) -> str:
    """A plain text table (also valid Markdown)."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def write_json(payload: dict, name: str) -> Path:
    from resnorm.runs.folder import write_text

    return write_text(OUT_DIR / name, json.dumps(payload, indent=2, sort_keys=False, default=str))
