"""Prototypes of changes proposed for ``resnorm/``, each measured side by side with the current code.

Nothing here edits ``resnorm/``: each prototype is a subclass, a replacement function or an
environment setting applied in this process (or a subprocess), timed interleaved against the code
as it is. Each row gives ``after_over_before`` (< 1 is faster) and says exactly what to change.

- ``fused_adamw``: ``resnorm.train.job.make_optimizer`` builds ``AdamW(..., foreach=True)``; proposal:
  ``fused=True`` (one fused kernel per step; on CPU since torch 2.4, on CUDA too). Same update.
- ``omp_passive``: ``OMP_WAIT_POLICY=PASSIVE`` set before torch loads (in ``run.py``:
  ``os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")`` before anything imports torch, or by the
  launcher per job). OpenMP's default spin-waiting burns the cores other jobs need: on a shared or
  oversubscribed machine a 2-thread step gets several times slower. Measured in subprocesses,
  alternating, since the policy is read once when the OpenMP runtime loads.
- ``threads_1_vs_2``: the same step with 1 and with 2 torch threads (toggled per round): tells
  whether two 1-thread jobs in parallel beat two 2-thread jobs in sequence on 2 cores (the
  ``local`` launcher's threads-per-job choice).
- ``attention_split``: ``Attention.forward`` views the fused QKV output as ``(b, t, 3, h, hd)`` and
  permutes it; the gradients SDPA returns for those strided q, k, v come back contiguous, so the
  backward of the view needs a full copy (``clone`` in ``ViewBackward0``, ~1% of a step in the
  profile, absent in HF's GPT2). Proposal: ``q, k, v = (z.view(b, t, h, hd).transpose(1, 2) for z in
  self.qkv(x).split(d, dim=2))`` (nanoGPT/HF layout); identical outputs and gradients. Timed on the
  attention sublayer alone (forward + backward), which is less noisy than a whole step.
- ``sdpa_vs_manual`` (an account, not a proposal: the current code already does it): the attention
  sublayer with ``F.scaled_dot_product_attention`` against the textbook masked-softmax attention.
- ``layer_bookkeeping``: the per-step Python work the trainer does for per-layer probes
  (``RunStore.add_layers`` appending five lists per value, a dict comprehension building
  ``f"grad_norm/{sub}/{layer:03d}"`` keys every step) against a prototype that builds the keys and
  the (layer, sublayer) columns once and ``extend``s the lists; and, for scale, W&B's own
  ``run.log`` of that record (offline), which is most of the cost and is not changed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import torch

from . import common, peers


# --- fused AdamW ----------------------------------------------------------------------------------

def fused_make_optimizer(model, optim_cfg) -> torch.optim.Optimizer:
    """``resnorm.train.job.make_optimizer`` with ``fused=True`` instead of ``foreach=True`` (the proposal)."""
    from resnorm.train.loop import make_optimizer

    base = make_optimizer(model, optim_cfg)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in base.param_groups]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                             eps=optim_cfg.eps, fused=True)


def _recording(step, sink: list):
    def wrapped():
        host = step()
        sink.append(host[0])
        return host
    return wrapped


def fused_adamw(depth: int, ref: dict, steps: int, warmup: int) -> dict:
    batches = peers.make_batches(4, ref["batch"], ref["seq"], ref["vocab"], "cpu")
    before = peers.ours(depth, ref, batches=batches)
    after = peers.ours(depth, ref, batches=batches, optimizer_fn=fused_make_optimizer)
    after.model.load_state_dict(before.model.state_dict())
    lb, la = [], []
    timed = common.interleave({"before": _recording(before.step, lb), "after": _recording(after.step, la)},
                              steps=steps, warmup=warmup)
    drift = max(abs(a - b) / abs(b) for a, b in zip(la, lb))
    return dict(change="fused_adamw", where="resnorm/train/optimizers.py make_optimizer: foreach=True -> fused=True",
                depth=depth, before_ms=timed.median("before") * 1e3, after_ms=timed.median("after") * 1e3,
                after_over_before=timed.ratio("after", "before"), max_rel_loss_diff=drift,
                detail=f"losses over {len(lb)} steps agree to {drift:.1e} (relative)")


# --- threads --------------------------------------------------------------------------------------

def threads_1_vs_2(depth: int, ref: dict, steps: int, warmup: int, threads: int) -> dict:
    batches = peers.make_batches(4, ref["batch"], ref["seq"], ref["vocab"], "cpu")
    a = peers.ours(depth, ref, batches=batches)
    b = peers.ours(depth, ref, batches=batches)

    def with_threads(n, step):
        def run():
            torch.set_num_threads(n)
            return step()
        return run

    try:
        timed = common.interleave({"2": with_threads(2, a.step), "1": with_threads(1, b.step)},
                                  steps=steps, warmup=warmup)
    finally:
        torch.set_num_threads(threads)
    r = timed.ratio("1", "2")
    return dict(change="threads_1_vs_2", where="threads per job (train.threads; the local launcher)",
                depth=depth, before_ms=timed.median("2") * 1e3, after_ms=timed.median("1") * 1e3,
                after_over_before=r,
                detail=f"1 thread is {r:.2f}x the 2-thread step: two 1-thread jobs side by side give "
                       f"~{2 / r:.2f}x the throughput of one 2-thread job at a time (if both cores are free)")


# --- OMP_WAIT_POLICY ------------------------------------------------------------------------------

def _worker(depth: int, steps: int, threads: int) -> None:
    """Subprocess body: median step time of ours at ``depth``, printed as JSON."""
    torch.set_num_threads(threads)
    ref = common.REFERENCE
    impl = peers.ours(depth, ref)
    impl.step()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        impl.step()
        ts.append(time.perf_counter() - t0)
    print(json.dumps(dict(median_s=statistics.median(ts), policy=os.environ.get("OMP_WAIT_POLICY"))))


def omp_passive(depth: int, steps: int, reps: int, threads: int) -> dict:
    runs = {"default": [], "PASSIVE": []}
    for _ in range(reps):
        for policy in ("default", "PASSIVE"):
            env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
            env.pop("OMP_WAIT_POLICY", None)
            if policy == "PASSIVE":
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            out = subprocess.run([common.PYTHON, "-m", "benchmarks.speedups", "--worker", str(depth), str(steps),
                                  str(threads)], cwd=common.ROOT, env=env, capture_output=True, text=True, check=True)
            runs[policy].append(json.loads(out.stdout.strip().splitlines()[-1])["median_s"])
    before, after = statistics.median(runs["default"]), statistics.median(runs["PASSIVE"])
    return dict(change="omp_passive", where="run.py (before torch loads) or the launcher's job env: "
                                            "OMP_WAIT_POLICY=PASSIVE",
                depth=depth, before_ms=before * 1e3, after_ms=after * 1e3, after_over_before=after / before,
                detail=f"{threads} threads, alternating subprocesses, {reps} each, load average "
                       f"{os.getloadavg()[0]:.1f} at the end; medians {[round(x, 3) for x in runs['default']]} s vs "
                       f"{[round(x, 3) for x in runs['PASSIVE']]} s")


# --- attention layout ------------------------------------------------------------------------------

def _attention_variants():
    import torch.nn.functional as F

    from resnorm.model.blocks import Attention

    class SplitAttention(Attention):
        """Prototype: split the fused QKV output, then view + transpose each (HF / nanoGPT layout)."""

        def forward(self, x):
            b, t, d = x.shape
            h = self.n_heads
            q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(y.transpose(1, 2).reshape(b, t, d))

    class ManualAttention(Attention):
        """The textbook attention (what SDPA replaces): scores, causal mask, softmax, weighted sum."""

        def forward(self, x):
            b, t, d = x.shape
            hd = d // self.n_heads
            q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, hd).permute(2, 0, 3, 1, 4)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            att = (q @ k.transpose(-1, -2)) * hd ** -0.5
            y = att.masked_fill(~mask, float("-inf")).softmax(-1) @ v
            return self.out(y.transpose(1, 2).reshape(b, t, d))

    return Attention, SplitAttention, ManualAttention


def attention_step(depth: int, ref: dict, steps: int, warmup: int) -> dict:
    """The whole training step with the prototype attention swapped into every block (same weights)."""
    _, SplitAttention, _ = _attention_variants()
    batches = peers.make_batches(4, ref["batch"], ref["seq"], ref["vocab"], "cpu")
    before = peers.ours(depth, ref, batches=batches)
    after = peers.ours(depth, ref, batches=batches)
    after.model.load_state_dict(before.model.state_dict())
    for block in after.model.blocks:
        block.attn.branch.__class__ = SplitAttention
    lb, la = [], []
    timed = common.interleave({"before": _recording(before.step, lb), "after": _recording(after.step, la)},
                              steps=steps, warmup=warmup)
    drift = max(abs(a - b) / abs(b) for a, b in zip(la, lb))
    return dict(change="attention_split (whole step)", where="as attention_split", depth=depth,
                before_ms=timed.median("before") * 1e3, after_ms=timed.median("after") * 1e3,
                after_over_before=timed.ratio("after", "before"),
                detail=f"losses over {len(lb)} steps agree to {drift:.1e} (relative)")


def attention(ref: dict, rounds: int) -> List[dict]:
    Attention, SplitAttention, ManualAttention = _attention_variants()
    torch.manual_seed(0)
    mods = {"current": Attention(ref["d_model"], ref["n_heads"], True)}
    for name, cls in (("split", SplitAttention), ("manual", ManualAttention)):
        mods[name] = cls(ref["d_model"], ref["n_heads"], True)
        mods[name].load_state_dict(mods["current"].state_dict())
    x = torch.randn(ref["batch"], ref["seq"], ref["d_model"], requires_grad=True)
    ref_out = mods["current"](x)
    ref_grad = torch.autograd.grad(ref_out.sum(), x)[0]
    diffs = {}
    for name in ("split", "manual"):
        out = mods[name](x)
        grad = torch.autograd.grad(out.sum(), x)[0]
        diffs[name] = max((out - ref_out).abs().max().item(), (grad - ref_grad).abs().max().item())

    def fwd_bwd(m):
        def run():
            m(x).sum().backward()
        return run

    timed = common.interleave({n: fwd_bwd(m) for n, m in mods.items()}, steps=rounds, warmup=5)
    cur = timed.median("current") * 1e3
    return [
        dict(change="attention_split", where="resnorm/model/transformer.py Attention.forward: split + view + transpose "
                                              "instead of view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)",
             depth="1 sublayer", before_ms=cur, after_ms=timed.median("split") * 1e3,
             after_over_before=timed.ratio("split", "current"),
             detail=f"attention sublayer fwd+bwd at the reference shape, {rounds} rounds; max |diff| of "
                    f"output and input grad {diffs['split']:.1e}"),
        dict(change="(account) sdpa_vs_manual", where="resnorm/model/transformer.py (already uses SDPA; unchanged)",
             depth="1 sublayer", before_ms=timed.median("manual") * 1e3, after_ms=cur,
             after_over_before=timed.ratio("current", "manual"),
             detail=f"before = textbook masked-softmax attention, after = F.scaled_dot_product_attention "
                    f"(current); max |diff| {diffs['manual']:.1e}"),
    ]


# --- per-layer bookkeeping ------------------------------------------------------------------------

def _fast_store_cls():
    from resnorm.runs.folder import RunStore

    class FastLayerStore(RunStore):
        """Prototype: per-layer rows appended with ``extend`` on columns built once per label list."""

        _cache = None

        def add_layers(self, step, labels, quantity, values):
            if self._cache is None or self._cache[0] is not labels:
                self._cache = (labels, [l for l, _ in labels], [s for _, s in labels])
            _, layers, subs = self._cache
            n = len(layers)
            self.layers["step"].extend([step] * n)
            self.layers["layer"].extend(layers)
            self.layers["sublayer"].extend(subs)
            self.layers["quantity"].extend([quantity] * n)
            self.layers["value"].extend(map(float, values))

    return FastLayerStore


def layer_bookkeeping(depth: int, rounds: int) -> dict:
    from resnorm.runs.folder import RunStore

    labels = [(i, s) for i in range(depth) for s in ("attn", "mlp")]
    host = [float(i) for i in range(2 + len(labels))]
    keys = [f"grad_norm/{sub}/{layer:03d}" for layer, sub in labels]
    with tempfile.TemporaryDirectory(prefix="resnorm_bench_store_") as tmp:
        cur, fast = RunStore(Path(tmp) / "a"), _fast_store_cls()(Path(tmp) / "b")
        step = [0]

        def current():  # resnorm/train/job.py, the per-step lines for per-layer probes
            s = step[0] = step[0] + 1
            cur.add_step(s, host[0], 1e-3, host[1], 1.0)
            cur.add_layers(s, labels, "grad_norm", host[2:])
            record = {"train/loss": host[0], "train/lr": 1e-3, "train/grad_norm": host[1], "train/tokens_per_s": 1.0}
            record.update({f"grad_norm/{sub}/{layer:03d}": v for (layer, sub), v in zip(labels, host[2:])})
            return record

        def proposed():
            s = step[0] = step[0] + 1
            fast.add_step(s, host[0], 1e-3, host[1], 1.0)
            fast.add_layers(s, labels, "grad_norm", host[2:])
            record = {"train/loss": host[0], "train/lr": 1e-3, "train/grad_norm": host[1], "train/tokens_per_s": 1.0}
            record.update(zip(keys, host[2:]))
            return record

        assert current() == proposed()
        timed = common.interleave({"before": current, "after": proposed}, steps=rounds, warmup=10)
        wandb_ms = _wandb_log_ms(current(), Path(tmp), min(rounds, 200))
    before, after = timed.median("before") * 1e3, timed.median("after") * 1e3
    return dict(change="layer_bookkeeping", where="resnorm/runs/folder.py add_layers (extend) + resnorm/train/job.py "
                                                  "(per-layer W&B keys built once before the loop)",
                depth=depth, before_ms=before, after_ms=after, after_over_before=timed.ratio("after", "before"),
                wandb_log_ms=wandb_ms,
                detail=f"per step, {len(labels)} per-layer values; for scale: W&B offline run.log of the same "
                       f"record takes {wandb_ms:.2f} ms per step (unchanged)")


def _wandb_log_ms(record: dict, tmp: Path, n: int) -> float:
    try:
        import wandb
    except ImportError:
        return float("nan")
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project="resnorm-bench", dir=str(tmp), mode="offline", reinit="finish_previous",
                     settings=wandb.Settings(console="off", x_disable_stats=True, x_disable_machine_info=True))
    try:
        for i in range(10):
            run.log(record, step=i)
        ts = []
        for i in range(10, 10 + n):
            t0 = time.perf_counter()
            run.log(record, step=i)
            ts.append(time.perf_counter() - t0)
    finally:
        run.finish()
    return statistics.median(ts) * 1e3


def wandb_init_finish_s(reps: int) -> float:
    """Per-job W&B start-up as resnorm.runs.tracking does it (offline): init + finish, median."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    ts = []
    with tempfile.TemporaryDirectory(prefix="resnorm_bench_wandb_") as tmp:
        for i in range(reps):
            t0 = time.perf_counter()
            run = wandb.init(project="resnorm-bench", dir=tmp, mode="offline", reinit="finish_previous",
                             config={"i": i}, settings=wandb.Settings(console="off", x_disable_stats=True,
                                                                      x_disable_machine_info=True))
            run.finish()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


ITEMS = ("fused_adamw", "threads", "omp", "attention", "bookkeeping", "wandb_init")


def measure(ref: dict, depths: List[int], probe_depth: int, steps: int, warmup: int, threads: int,
            quick: bool, items=ITEMS) -> dict:
    rows = []
    if "fused_adamw" in items:
        rows += [fused_adamw(d, ref, steps, warmup) for d in depths]
    if "threads" in items:
        rows.append(threads_1_vs_2(depths[0], ref, steps, warmup, threads))
    if "omp" in items:
        rows.append(omp_passive(depths[0], steps=3 if quick else 8, reps=1 if quick else 2, threads=threads))
    if "attention" in items:
        rows += attention(ref, rounds=10 if quick else 60)
        rows.append(attention_step(depths[0], ref, steps, warmup))
    if "bookkeeping" in items:
        rows.append(layer_bookkeeping(probe_depth, rounds=200 if quick else 2000))
        rows.append(layer_bookkeeping(6, rounds=200 if quick else 2000))
    if "wandb_init" in items:
        init_s = wandb_init_finish_s(1 if quick else 3)
        rows.append(dict(change="(account) W&B offline init + finish per job",
                         where="resnorm/runs/tracking.py (unchanged)", after_ms=init_s * 1e3,
                         detail="paid once per run: 200 runs x this"))
    return dict(rows=rows, items=list(items))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        print("internal: python -m benchmarks.speedups --worker DEPTH STEPS THREADS", file=sys.stderr)
        sys.exit(2)
