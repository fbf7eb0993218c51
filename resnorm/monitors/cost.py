"""Cost monitors: model FLOPs utilisation (MFU) and peak memory, summary fields (not per layer).

- :func:`flops_per_token`: training FLOPs per token, ``6 N + 12 L d T`` (forward + backward; N the
  parameters outside the embedding tables, L the depth, d ``d_model``, T the sequence length).
  Source: Chowdhery et al. 2022, PaLM (arXiv:2204.02311), appendix B; the 6N term is Kaplan et al.
  2020 (arXiv:2001.08361), §2.1 (2N per token forward, twice that backward). The attention term
  counts the full T x T score and value products (causal masking is not discounted), as PaLM does.
  Same formula as :func:`resnorm.sweep.plan.train_flops`, except that the LM head's matrix counts in N
  also when it is tied to the token embedding (the head is a matmul of every token either way).
- :func:`device_peak_flops`: ``(peak FLOP/s, source)`` of one device at a precision: a table of
  NVIDIA datasheet dense peaks (:data:`GPU_PEAKS`) matched on ``torch.cuda.get_device_name``; for
  the CPU, a measured fp32 ``torch.mm`` rate (512 x 512, about 0.2 s, in the current thread count),
  cached per process and thread count. Unknown GPU: NaN, with the reason as the source.
- :func:`mfu`: achieved FLOP/s (tokens/s x FLOPs per token) over the peak of the devices used.
- :func:`peak_memory_bytes`: CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, since start or
  the last ``reset_peak_memory_stats``); CPU: the process's max resident set size from
  ``resource.getrusage`` (the whole process: Python, libraries, data; it never decreases).
- :func:`cost_summary`: the summary fields ``flops_per_token`` (FLOP), ``peak_flops`` (FLOP/s),
  ``peak_flops_source`` (str), ``mfu`` (fraction, 0..1) and ``peak_memory_bytes`` (bytes).
"""

from __future__ import annotations

import math
import re
import sys
import time
from typing import Dict, Optional, Tuple

import torch

TF = 1e12

# (regex on torch.cuda.get_device_name, {precision: dense peak TFLOP/s}, source). Dense peaks (no
# 2:4 sparsity). "fp32": CUDA-core FP32; "tf32" and "bf16": tensor cores (bf16 with fp32 accumulate).
# More specific patterns first. "?" in a source marks a value read off a datasheet with a caveat.
# "fp16" (train.precision=fp16, tensor cores with fp32 accumulate) is the bf16 rate on every GPU here
# but the V100, which has fp16 tensor cores and no bf16 ones (its own "fp16" entry).
GPU_PEAKS = [
    (r"H200.*NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
     "NVIDIA H200 NVL datasheet (sparse TF32 835 / BF16 1671 halved)"),
    (r"H200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
     "NVIDIA H200 SXM datasheet (FP32 67, sparse TF32 989 / BF16 1979); dense values of the same "
     "GH100 SXM5 in the Hopper whitepaper"),
    (r"H100.*NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
     "NVIDIA H100 NVL datasheet, per GPU (sparse TF32 835 / BF16 1671 halved)?"),
    (r"H100.*PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.5},
     "NVIDIA H100 PCIe: Hopper whitepaper table (datasheet: sparse TF32 756 / BF16 1513)"),
    (r"H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
     "NVIDIA H100 SXM5: Hopper whitepaper table (datasheet: sparse TF32 989 / BF16 1979)"),
    (r"A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
     "NVIDIA A100 datasheet (SXM and PCIe alike)"),
    (r"\bA10\b", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0},
     "NVIDIA A10 datasheet (sparse TF32 125 / BF16 250 halved)"),
    (r"\bL4\b", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0},
     "NVIDIA L4 datasheet (sparse TF32 120 / BF16 242 halved)"),
    (r"V100.*PCIe", {"fp32": 14.0, "tf32": 14.0, "bf16": 14.0, "fp16": 112.0},
     "NVIDIA V100 PCIe datasheet (tensor 112); no TF32/BF16 tensor cores, the FP32 rate stands in?"),
    (r"V100", {"fp32": 15.7, "tf32": 15.7, "bf16": 15.7, "fp16": 125.0},
     "NVIDIA V100 SXM2 datasheet (tensor 125); no TF32/BF16 tensor cores, the FP32 rate stands in?"),
    (r"RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2},
     "NVIDIA Ada (AD102) whitepaper, RTX 4090 (GeForce: BF16 with FP32 accumulate at half rate)?"),
]


def matmul_params(shape) -> int:
    """N of :func:`flops_per_token`: the parameters of a model of ``shape`` outside the embedding
    tables, the LM head's matrix counted also when tied. Counted on the meta device."""
    from resnorm.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(shape)
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    n = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    return n + (model.head.weight.numel() if shape.tie_weights else 0)


def flops_per_token(shape, n_params: Optional[int] = None) -> float:
    """Training FLOPs per token, 6 N + 12 L d T (PaLM, arXiv:2204.02311, appendix B); ``shape`` a
    :class:`resnorm.model.blocks.ModelShape`; ``n_params`` N if known (default :func:`matmul_params`)."""
    from resnorm.model.flops import train_flops_per_token

    n = matmul_params(shape) if n_params is None else n_params
    return train_flops_per_token(n, shape.depth, shape.d_model, shape.context)


def gpu_peak_flops(name: str, precision: str) -> Tuple[float, str]:
    """(dense peak FLOP/s, source) of the GPU called ``name`` at ``precision`` (fp32, tf32, bf16, fp16)."""
    for pattern, peaks, source in GPU_PEAKS:
        if re.search(pattern, name):
            rate = peaks.get(precision, peaks["bf16"] if precision == "fp16" else None)
            return rate * TF, f"{source}: {precision} {rate} TFLOP/s"
    return math.nan, f"no peak known for GPU {name!r}"


_CPU_PEAKS: Dict[Tuple[int, int], Tuple[float, str]] = {}


def cpu_peak_flops(n: int = 512, seconds: float = 0.2) -> Tuple[float, str]:
    """(fp32 FLOP/s, source): the rate of ``torch.mm`` on two n x n fp32 matrices, timed for about
    ``seconds`` after one warm-up, in the current thread count; measured once per process and
    thread count (2 n^3 FLOPs per product)."""
    threads = torch.get_num_threads()
    key = (threads, n)
    if key not in _CPU_PEAKS:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        reps, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            reps += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        rate = 2.0 * n ** 3 * reps / elapsed
        _CPU_PEAKS[key] = (rate, f"measured: fp32 torch.mm {n}x{n}, {threads} threads, "
                                 f"{reps} products in {elapsed:.2f} s")
    return _CPU_PEAKS[key]


def _cuda_precision(precision: str) -> str:
    """fp32 matmuls run on TF32 tensor cores when PyTorch allows it."""
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return precision


def device_peak_flops(device, precision: str = "fp32") -> Tuple[float, str]:
    """(peak FLOP/s, source) of ``device`` (a torch.device or string) at ``train.precision``
    (fp32 | bf16 | fp16; tf32 also accepted): the GPU table on CUDA (fp32 read as tf32 when
    ``torch.backends.cuda.matmul.allow_tf32``), the measured fp32 matmul rate on the CPU, NaN
    elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), _cuda_precision(precision))
    if device.type == "cpu":
        rate, source = cpu_peak_flops()
        return rate, source if precision == "fp32" else f"{source} (the run asked for {precision})"
    return math.nan, f"no peak known for device type {device.type!r}"


def mfu(tokens_per_s: Optional[float], flops_per_token_: float, peak_flops: float, world: int = 1) -> float:
    """Model FLOPs utilisation: tokens_per_s x FLOPs per token / (world x peak FLOP/s); NaN if unknown.
    ``tokens_per_s`` is the global rate (all ``world`` devices)."""
    if not tokens_per_s or not math.isfinite(peak_flops) or peak_flops <= 0:
        return math.nan
    return tokens_per_s * flops_per_token_ / (world * peak_flops)


def peak_memory_bytes(device) -> Optional[int]:
    """The peak memory of this process on ``device``, in bytes: CUDA ``max_memory_allocated``; CPU
    (and anything else) the max RSS (``ru_maxrss``: KiB on Linux, bytes on macOS); None without
    the ``resource`` module (Windows)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def cost_summary(shape, tokens_per_s: Optional[float], device, precision: str = "fp32",
                 world: int = 1) -> Dict[str, object]:
    """The summary fields (see the module docstring) of a run of a ``shape`` model at
    ``tokens_per_s`` (global) on ``world`` devices like ``device``."""
    fpt = flops_per_token(shape)
    peak, source = device_peak_flops(device, precision)
    return dict(flops_per_token=fpt, peak_flops=peak, peak_flops_source=source,
                mfu=mfu(tokens_per_s, fpt, peak, world), peak_memory_bytes=peak_memory_bytes(device))
