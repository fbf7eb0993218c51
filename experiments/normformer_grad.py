"""Shleifer, Weston & Ott 2021 (NormFormer): Pre-LN's gradients are much larger in the early layers than
in the late ones; NormFormer's extra norms bring the per-layer gradient norms closer together.

Measured at init (the papers' init pinned: Xavier-normal, N(0,1) token embeddings; random tokens), per
block: the gradient norm of the MLP's second (output) weight ``fc2`` (the quantity of the paper's
gradient figure as we recall it: the L1 gradient norm of the second FFN weight per layer, early in
training [recall]; here the Frobenius norm) and of the whole block (every attention and MLP parameter,
NormFormer's extra norm gains included), their first-to-last ratios and the mismatch |log(ratio)| (0:
equal gradients in the first and the last block). The claims read ``fc2``; the block-wide numbers are
in the CSV and the figure. The paper shows it during training; only init is reproduced here.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from resnorm.monitors import measure as M

from .common import figure, make_model, palette, registered, save, select
from .core import Claim, Experiment, Reference, register

REF = Reference("NormFormer: Improved Transformer Pretraining with Extra Normalization", "2110.09456",
                "gradient norm per layer (§2, the gradient-mismatch motivation)", "Shleifer, Weston & Ott 2021")
BATCH, SEQ = 16, 64


def run(grid, ctx) -> pd.DataFrame:
    rows = []
    for variant in registered(grid["variants"]):
        for depth in grid["depths"]:
            for seed in grid["seeds"]:
                model = make_model(variant, depth, seed)
                fc2, block = np.zeros(depth), np.zeros(depth)
                for b in range(grid["batches"]):
                    idx = M.random_tokens(256, BATCH, SEQ, seed=1000 * seed + 2 * b)
                    tgt = M.random_tokens(256, BATCH, SEQ, seed=1000 * seed + 2 * b + 1)
                    g = M.grad_norms(model, idx, tgt)
                    fc2 += np.asarray(g["fc2"]) / grid["batches"]
                    block += np.hypot(g["attn"], g["mlp"]) / grid["batches"]  # ||grad|| of the whole block
                for layer in range(depth):
                    rows.append(dict(variant=variant, depth=depth, seed=seed, layer=layer + 1, grad_norm=fc2[layer],
                                     block_grad_norm=block[layer]))
            ctx.log(f"{variant} done")
    return pd.DataFrame(rows)


def mismatch(df, variant, depth, col="grad_norm") -> float:
    """|log(first block's / last block's gradient norm)| (``col``: fc2's or the block's), averaged over seeds."""
    d = select(df, variant=variant, depth=depth).groupby("layer")[col].mean()
    return abs(math.log(d.iloc[0] / d.iloc[-1]))


def ratio(variant):
    def measure(df) -> float:
        L = int(df.depth.max())
        d = select(df, variant=variant, depth=L).groupby("layer").grad_norm.mean()
        return float(d.iloc[0] / d.iloc[-1])
    return measure


def closer_everywhere(col="grad_norm"):
    def measure(df) -> float:
        """min over depths of mismatch(Pre-LN) - mismatch(NormFormer) (> 0: NormFormer closer to 1 at every depth)."""
        return min(mismatch(df, "pre", L, col) - mismatch(df, "normformer", L, col) for L in sorted(df.depth.unique()))
    return measure


def plot(df, path) -> None:
    depths = sorted(df.depth.unique())
    fig, axes = figure(len(depths))
    pal = palette(df.variant.unique())
    for ax, L in zip(axes, depths):
        for v, g in select(df, depth=L).groupby("variant"):
            m = g.groupby("layer")[["grad_norm", "block_grad_norm"]].mean()
            ax.plot(m.index, m.grad_norm, marker="o", color=pal[v], label=f"{v}: fc2")
            ax.plot(m.index, m.block_grad_norm, ls="--", color=pal[v], label=f"{v}: whole block")
        ax.set(yscale="log", xlabel="block", ylabel="||grad|| at init", title=f"L = {L}")
        ax.legend(fontsize=7)
    save(fig, path, f"{REF.authors}: per-block gradient norm at init, Pre-LN vs NormFormer")


register(Experiment(
    name="normformer_grad",
    reference=REF,
    summary="per-block gradient norm at init and its first-to-last ratio, Pre-LN vs NormFormer (L = 6, 12, 24)",
    kind="init",
    grids={"full": dict(variants=["pre", "normformer"], depths=[6, 12, 24], seeds=[0, 1, 2], batches=2),
           "ci": dict(variants=["pre", "normformer"], depths=[4, 8], seeds=[0], batches=1)},
    run=run,
    plot=plot,
    claims=[
        Claim("pre_early_layers_larger", "Pre-LN at the deepest L: fc2's gradient norm, first block / last block",
              ratio("pre"), ">", 1.0, needs=("pre",)),
        Claim("normformer_closer_to_one", "fc2: min over depths of |log ratio| (Pre-LN) - |log ratio| (NormFormer)",
              closer_everywhere(), ">", 0.0, needs=("pre", "normformer")),
        Claim("normformer_closer_whole_block", "whole block: min over depths of |log ratio| (Pre-LN) - |log ratio| "
              "(NormFormer)", closer_everywhere("block_grad_norm"), ">", 0.0, needs=("pre", "normformer")),
    ],
))
