"""Dong et al. 2021 Fig. 2 / Noci et al. 2022 Fig. 1: token representations collapse to rank 1 without skips.

Paths (L = 24, forward only at init, bidirectional and causal attention):

- ``san``: pure self-attention, no skip, no norm, no MLP: x <- Attn(x) (built in ``resnorm.monitors.measure.attention_only``
  from the ``noresidual`` model's attention modules);
- ``san_ln``: x <- Attn(LN(x)), the same with the pre-norm;
- ``noskip_mlp``: the ``noresidual`` variant (no skip, MLP kept): x <- F(LN(x));
- ``attn_skip``: Pre-LN attention sublayers only, with the skip: x <- x + Attn(LN(x));
- ``pre``, ``post``, ``depth_scaled``: the full registered variants (``depth_scaled`` is Pre-LN with
  1/sqrt(L) branch scaling, Noci's fix; SKIPPED while not registered).
"""

from __future__ import annotations

import pandas as pd
import torch

from resnorm.monitors import measure as M

from .common import figure, make_model, palette, registered, save, select
from .core import Claim, Experiment, Reference, register

REF = Reference("Attention is Not All You Need: Pure Attention Loses Rank Doubly Exponentially with Depth",
                "2103.03404", "Fig. 2", "Dong et al. 2021")
NOCI = Reference("Signal Propagation in Transformers: Theoretical Perspectives and the Role of Rank Collapse",
                 "2206.03126", "Fig. 1", "Noci et al. 2022")
NO_SKIP = ("san", "san_ln", "noskip_mlp")
PATHS = {  # path: (variant, how)
    "san": ("noresidual", "san"), "san_ln": ("noresidual", "san_ln"), "noskip_mlp": ("noresidual", "full"),
    "attn_skip": ("pre", "skip"), "pre": ("pre", "full"), "post": ("post", "full"),
    "depth_scaled": ("depth_scaled", "full"),
}


@torch.no_grad()
def streams(model, idx, how):
    if how == "full":
        return model.trace(idx, max_logits=False)["stream"]
    return M.attention_only(model, idx, how)


def run(grid, ctx) -> pd.DataFrame:
    rows = []
    depth = grid["depth"]
    for path, (variant, how) in PATHS.items():
        if not registered([variant]):
            ctx.log(f"{path}: variant {variant} not registered, skipped")
            continue
        for causal in grid["causal"]:
            for seed in grid["seeds"]:
                model = M.set_causal(make_model(variant, depth, seed), causal)
                idx = M.random_tokens(256, grid["batch"], 64, seed=seed)
                xs = streams(model, idx, how)
                vals = torch.stack([torch.stack([M.rank1_residual(x), M.token_cosine(x)]) for x in xs]).tolist()
                for layer, (res, cos) in enumerate(vals):
                    rows.append(dict(path=path, variant=variant, causal=bool(causal), seed=seed, layer=layer,
                                     rank1_residual=res, token_cosine=cos))
        ctx.log(f"{path} done")
    return pd.DataFrame(rows)


def at(df, path, layer, col, causal=False):
    return select(df, path=path, layer=layer, causal=causal)[col].mean()


def claims():
    return [
        Claim("noskip_collapse", "every no-skip path (SAN, SAN+LN, no-skip+MLP): relative residual at layer 3 (max)",
              lambda df: max(at(df, p, 3, "rank1_residual") for p in NO_SKIP), "<=", 0.05, needs=("noresidual",)),
        Claim("pre_keeps_rank", "Pre-LN keeps the relative residual at layer 3",
              lambda df: at(df, "pre", 3, "rank1_residual"), ">=", 0.7, needs=("pre",)),
        Claim("post_aligns", "Post-LN's token cosine at the last layer",
              lambda df: at(df, "post", df.layer.max(), "token_cosine"), ">=", 0.95, needs=("post",)),
        Claim("post_above_pre", "token cosine at the last layer: Post-LN minus Pre-LN",
              lambda df: at(df, "post", df.layer.max(), "token_cosine") - at(df, "pre", df.layer.max(), "token_cosine"),
              ">", 0.0, needs=("post", "pre")),
        Claim("pre_above_scaled", "token cosine at the last layer: Pre-LN minus 1/sqrt(L)-scaled Pre-LN",
              lambda df: at(df, "pre", df.layer.max(), "token_cosine")
              - at(df, "depth_scaled", df.layer.max(), "token_cosine"), ">", 0.0, needs=("pre", "depth_scaled")),
        Claim("scaled_far_apart", "1/sqrt(L)-scaled Pre-LN's token cosine at the last layer",
              lambda df: at(df, "depth_scaled", df.layer.max(), "token_cosine"), "<=", 0.3, needs=("depth_scaled",)),
        Claim("causal_noskip_collapse", "causal attention: no-skip paths' token cosine at layer 6 (min)",
              lambda df: min(at(df, p, 6, "token_cosine", causal=True) for p in NO_SKIP), ">=", 0.95,
              needs=("noresidual",)),
    ]


def plot(df, path) -> None:
    import seaborn as sns

    fig, axes = figure(3)
    order = [p for p in PATHS if p in set(df.path)]
    colours = {"san": "#000000", "san_ln": "#555555", "noskip_mlp": "#999999", "attn_skip": "#6baed6"}
    pal = {p: colours.get(p) or palette([p])[p] for p in order}
    bi, ca = df[~df.causal], df[df.causal]
    sns.lineplot(data=bi, x="layer", y="rank1_residual", hue="path", hue_order=order, palette=pal, ax=axes[0],
                 errorbar="sd")
    axes[0].set(title="bidirectional: distance to rank 1", xlabel="layer",
                ylabel=r"$\|X - 1\mu^T\|_F / \|X\|_F$ (symlog)")
    axes[0].set_yscale("symlog", linthresh=1e-4)
    axes[0].set_ylim(0, 1.5)
    sns.lineplot(data=bi, x="layer", y="token_cosine", hue="path", hue_order=order, palette=pal, ax=axes[1],
                 errorbar="sd", legend=False)
    axes[1].set(title="bidirectional: token alignment", xlabel="layer", ylabel="mean pairwise token cosine")
    sns.lineplot(data=ca, x="layer", y="token_cosine", hue="path", hue_order=order, palette=pal, ax=axes[2],
                 errorbar="sd", legend=False)
    axes[2].set(title="causal: token alignment", xlabel="layer", ylabel="mean pairwise token cosine")
    save(fig, path, f"{REF.authors} {REF.figure} / {NOCI.authors} {NOCI.figure}: rank collapse at init, L=24")


register(Experiment(
    name="rank_collapse",
    reference=REF,
    extra_refs=[NOCI],
    summary="relative distance to rank 1 and mean token cosine per layer, with and without skips (L=24, init)",
    kind="init",
    grids={"full": dict(depth=24, seeds=[0, 1, 2], causal=[False, True], batch=4),
           "ci": dict(depth=24, seeds=[0], causal=[False, True], batch=2)},
    run=run,
    plot=plot,
    claims=claims(),
))
