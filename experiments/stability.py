"""Stability metrics used by the reproductions: re-exported from :mod:`analysis.stability` (pure pandas/numpy)."""

from analysis.stability import (ci95, divergence_rate, largest_stable_lr, loss_spikes, lr_sensitivity,  # noqa: F401
                                run_metrics)
