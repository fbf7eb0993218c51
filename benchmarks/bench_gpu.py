"""(5) On a GPU: bf16 autocast, step time and MFU of the reference config scaled up
(d_model 512, seq 512, batch 32, depth 24) against the same peers. Skipped without CUDA."""

from __future__ import annotations

import torch

from . import bench_step, common


def measure(depths, steps: int, warmup: int) -> dict:
    if not torch.cuda.is_available():
        return dict(skipped="no CUDA device here (torch.cuda.is_available() is False): GPU part not run")
    torch.backends.cuda.matmul.allow_tf32 = True
    out = bench_step.measure(depths, common.GPU_REFERENCE, steps=steps, warmup=warmup, device="cuda",
                             autocast_dtype=torch.bfloat16, peak_dtype=torch.bfloat16, mfu_depth=24)
    out["gpu"] = torch.cuda.get_device_name(0)
    out["peak_note"] = "peak: an 8192^3 bf16 matmul on this GPU, same process"
    return out
