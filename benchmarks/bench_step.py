"""(1) Train step time of ours vs HF GPT2LMHeadModel vs x-transformers at identical dimensions, and
achieved FLOP/s as a fraction of this machine's fp32 matmul peak (measured in the same process)."""

from __future__ import annotations

from typing import List

import torch

from . import common, peers

TARGET_VS_HF = 0.85
TARGET_VS_X = 0.95
TARGET_MFU = 0.60
MFU_DEPTH = 24


def build_all(depth: int, ref: dict, device: str = "cpu", autocast_dtype=None, with_probes_off: bool = True):
    batches = peers.make_batches(4, ref["batch"], ref["seq"], ref["vocab"], device)
    impls = [peers.ours(depth, ref, device=device, batches=batches, autocast_dtype=autocast_dtype)]
    if with_probes_off:
        impls.append(peers.ours(depth, ref, device=device, probes=False, batches=batches,
                                autocast_dtype=autocast_dtype))
    missing = {}
    for name, reason in peers.available_peers().items():
        if reason:
            missing[name] = reason
            continue
        build = getattr(peers, name)
        impls.append(build(depth, ref, device=device, batches=batches, autocast_dtype=autocast_dtype))
    return impls, missing


def measure(depths: List[int], ref: dict, steps: int, warmup: int, device: str = "cpu", autocast_dtype=None,
            peak_dtype=None, mfu_depth: int = MFU_DEPTH) -> dict:
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    peak_size = 8192 if device.startswith("cuda") else 2048
    peaks = [common.matmul_peak_flops(peak_size, device=device, dtype=peak_dtype)]
    rows, checks = [], []
    for depth in depths:
        impls, missing = build_all(depth, ref, device, autocast_dtype)
        first_loss = {i.name: i.step()[0] for i in impls}  # same batches: sane losses ~ ln(vocab)
        timed = common.interleave({i.name: i.step for i in impls}, steps=steps, warmup=warmup, sync=sync)
        flops = common.train_flops_per_step(depth, ref["d_model"], ref["d_ff"], ref["vocab"], ref["seq"], ref["batch"])
        peaks.append(common.matmul_peak_flops(peak_size, device=device, dtype=peak_dtype))
        names = [i.name for i in impls]
        for impl in impls:
            med = timed.median(impl.name)
            rows.append(dict(
                depth=depth, impl=impl.name, params=impl.n_params, step_ms=med * 1e3,
                iqr_over_median=timed.spread(impl.name),
                vs_hf=timed.ratio(impl.name, "hf_gpt2") if "hf_gpt2" in names else None,
                vs_x=timed.ratio(impl.name, "x_transformers") if "x_transformers" in names else None,
                tokens_per_s=ref["batch"] * ref["seq"] / med, gflops=flops / med / 1e9,
                first_loss=first_loss[impl.name], note=impl.note,
            ))
        for name, reason in missing.items():
            rows.append(dict(depth=depth, impl=name, note=f"not available: {reason}"))
        del impls
    peak = max(peaks)  # the best the machine gave in this process (noise only ever slows it)
    for r in rows:
        if r.get("gflops") is not None:
            r["mfu"] = r["gflops"] * 1e9 / peak
    by = {(r["depth"], r["impl"]): r for r in rows}
    for depth in depths:
        ours = by.get((depth, "ours"), {})
        if ours.get("vs_hf") is not None:
            checks.append(dict(target=f"ours/hf <= {TARGET_VS_HF} at depth {depth}", value=ours["vs_hf"],
                               ok=ours["vs_hf"] <= TARGET_VS_HF))
        if ours.get("vs_x") is not None:
            checks.append(dict(target=f"ours/x-transformers <= {TARGET_VS_X} at depth {depth}", value=ours["vs_x"],
                               ok=ours["vs_x"] <= TARGET_VS_X))
        if depth == mfu_depth and ours.get("mfu") is not None:
            checks.append(dict(target=f"MFU >= {TARGET_MFU:.0%} at depth {depth}", value=ours["mfu"],
                               ok=ours["mfu"] >= TARGET_MFU))
    return dict(
        rows=rows, checks=checks, peak_gflops=peak / 1e9, peak_samples_gflops=[p / 1e9 for p in peaks],
        flops_formula="6*N*tokens + 12*L*T*d*tokens, N = L*(4d^2 + 2*d*d_ff) + d*vocab (matmul weights)",
        config=dict(ref, depths=depths, steps=steps, warmup=warmup, device=device,
                    autocast=str(autocast_dtype) if autocast_dtype else "fp32"),
    )


COLUMNS = ["depth", "impl", "params", "step_ms", "iqr_over_median", "vs_hf", "vs_x", "gflops", "mfu"]
