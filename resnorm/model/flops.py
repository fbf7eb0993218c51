"""The model's training FLOPs per token, the numerator of the MFU (:mod:`resnorm.monitors.cost`) and of
a dry run's time estimate (:mod:`resnorm.sweep.plan`). Torch-free."""

from __future__ import annotations


def train_flops_per_token(n_matmul: int, depth: int, d_model: int, seq_len: int) -> float:
    """FLOPs of one training token, forward and backward: 6N + 12·L·T·d (N = matmul parameters,
    T = seq_len, d = d_model; PaLM, arXiv:2204.02311, appendix B). An evaluation token is a third
    of it (2N + 4·L·T·d). Also the MFU's numerator (:mod:`resnorm.monitors.cost`)."""
    return 6.0 * n_matmul + 12.0 * depth * seq_len * d_model
