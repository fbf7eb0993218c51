"""Record tests/data/loop_reference.json's entry for this machine's numerics.

Float sums depend on the CPU kernels torch picks (AVX2 and AVX-512 matrix products round differently),
so the bit-for-bit reference of tests/test_loop.py is kept per numerics fingerprint
(:func:`fingerprint`). A new machine's entry must be recorded from a commit whose loop was already
checked bit for bit on another machine, never from the code under test:

    git worktree add /tmp/ref 3a374e0      # the last commit checked on the first machine
    cd /tmp/ref && PYTHONPATH=$PWD python /path/to/this/file /path/to/tests/data/loop_reference.json

It reads the case list (names and overrides) from the file, runs each case with that checkout's code
through its ``compose`` and ``train`` (as tests/test_loop.py does), and adds this machine's entry.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from pathlib import Path


def fingerprint() -> str:
    """torch's version, its CPU kernel level and the bits of a small fixed computation (matrix products,
    layer norm, softmax, GELU on one thread): equal fingerprints give equal training losses."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(4, 16, 64, generator=g), torch.randn(64, 64, generator=g) / 8
        y = torch.nn.functional.layer_norm(x @ w, (64,))
        z = torch.nn.functional.gelu(torch.softmax(y @ y.transpose(1, 2) / 8, -1) @ y).sum()
    finally:
        torch.set_num_threads(threads)
    return f"torch {torch.__version__} | {torch.backends.cpu.get_cpu_capability()} | {z.item().hex()}"


def record_case(ref: dict, compose, train, job_info) -> dict:
    import pandas as pd

    tiny = ("model.d_model=16", "model.n_heads=2", "train.seq_len=16", "train.batch_size=4",
            "train.steps=6", "train.eval_every=3", "train.eval_batches=2", "train.progress=false",
            "data=synthetic", "data.synthetic_tokens=4000", "logger.mode=disabled")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(list(tiny) + ref["overrides"] + ["train.steps=8", "train.eval_every=4",
                                                       "train.probe_every=3", "train.threads=1"])
        summary = train(cfg, job_info(Path(tmp), "ref", "ref", []))
        steps = pd.read_parquet(Path(tmp) / "metrics.parquet")
        t = pd.read_parquet(Path(tmp) / "layers.parquet")
        layers = {f"{s}|{l}|{sub}|{q}": float(v).hex()
                  for s, l, sub, q, v in zip(t.step, t.layer, t.sublayer, t.quantity, t.value)}
    return {"overrides": ref["overrides"], "train_loss": [v.hex() for v in steps.train_loss],
            "grad_norm": [v.hex() for v in steps.grad_norm], "val_loss": [v.hex() for v in steps.val_loss],
            "final_val_loss": summary["final_val_loss"].hex(), "status": summary["status"],
            "layers": {k: layers.get(k) for k in ref["layers"]}}


def main(path: str) -> None:
    import torch

    torch.set_num_threads(1)
    config = importlib.import_module("resnorm.config")
    compose = getattr(config, "compose", None) or importlib.import_module("resnorm.config.compose").compose
    job = importlib.import_module("resnorm.train")
    train = getattr(job, "train", None) or importlib.import_module("resnorm.train.job").train
    job_info = getattr(job, "JobInfo", None) or importlib.import_module("resnorm.train.job").JobInfo
    store = json.loads(Path(path).read_text())
    cases = next(iter(store["machines"].values()))
    entry = {name: record_case(ref, compose, train, job_info) for name, ref in sorted(cases.items())}
    store["machines"][fingerprint()] = entry
    Path(path).write_text(json.dumps(store, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(entry)} cases for {fingerprint()}")


if __name__ == "__main__":
    main(sys.argv[1])
