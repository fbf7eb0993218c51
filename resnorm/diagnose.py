"""Init-time diagnostics without training: ``python -m resnorm.diagnose [key=a,b,...] [--out FILE.csv]``.

Takes the same ``key=value`` overrides as ``run.py`` (comma lists are swept, as with ``-m``), builds each
model at step 0 and measures, per layer, on one batch of random tokens (or ``--data`` for a real batch):
activation RMS and variance of the residual stream, branch-to-skip ratios, mean token cosine, distance to
rank 1, angular distance to the previous layer, max attention logit and the FFN output-weight gradient
norm; per model, the output change under a 1% weight perturbation (Admin's amplification). A depth sweep
takes seconds::

    python -m resnorm.diagnose model.norm=pre,post,deepnorm depth=6,12,24,48 --out /tmp/init.csv
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import List


def _expand(overrides: List[str]) -> List[List[str]]:
    axes = []
    for o in overrides:
        if "=" not in o:
            raise SystemExit(f"override {o!r} is not key=value")
        key, value = o.split("=", 1)
        axes.append([f"{key}={v}" for v in value.split(",")] if "," in value and not value.startswith("[") else [o])
    return [list(c) for c in itertools.product(*axes)] or [[]]


def diagnose(cfg, batch: int = 8, use_data: bool = False):
    """Per-layer rows (dicts) for one composed config, at init."""
    import torch

    from resnorm.monitors import measure as M
    from resnorm.model.transformer import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    t = cfg.train.seq_len
    if use_data:
        from resnorm.data.corpora import BatchSampler, load_data

        data = load_data(cfg.data, t, cfg.seed)
        idx, tgt = BatchSampler(data.train, batch, t, seed=cfg.seed).sample()
    else:
        idx = M.random_tokens(cfg.model.vocab_size, batch, t, seed=cfg.seed)
        tgt = M.random_tokens(cfg.model.vocab_size, batch, t, seed=cfg.seed + 1)
    if cfg.model.get("objective", "clm") == "mlm":  # an encoder's loss is on BERT-masked inputs
        from resnorm.train.objectives import mask_tokens

        idx, tgt = mask_tokens(idx, cfg.model.vocab_size, cfg.model.vocab_size, torch.Generator().manual_seed(cfg.seed))
    rows = M.layer_profile(model, idx)
    grads = M.grad_norms(model, idx, tgt)
    change = M.perturbation_change(model, idx, eps=1e-2, seed=cfg.seed)
    for r in rows:
        r["grad_norm_fc2"] = grads["fc2"][r["layer"] - 1] if r["layer"] > 0 else float("nan")
        r.update(variant=cfg.model.norm, depth=int(cfg.depth), seed=int(cfg.seed), output_change=change)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resnorm.diagnose", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key=value (comma lists are swept), as for run.py")
    ap.add_argument("--out", type=Path, help="write every per-layer row to this CSV")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--data", action="store_true", help="a batch of the configured data instead of random tokens")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import pandas as pd
    import torch

    from resnorm.config.compose import compose
    from resnorm.errors import ConfigError
    from resnorm.train.preflight import validate

    torch.set_num_threads(args.threads)
    rows, t0 = [], time.perf_counter()
    try:
        for combo in _expand(args.overrides):
            cfg = compose(combo)
            validate(cfg)
            rows += diagnose(cfg, args.batch, args.data)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    df = pd.DataFrame(rows)
    cols = ["variant", "depth", "seed", "layer", "act_rms", "branch_ratio_attn", "branch_ratio_mlp", "token_cosine",
            "rank1_residual", "angular_distance", "max_attn_logit", "grad_norm_fc2"]
    df = df[cols + [c for c in df.columns if c not in cols]]
    # one line per model: the last layer against the first
    summary = []
    for (v, d, s), g in df.groupby(["variant", "depth", "seed"], sort=False):
        first, last = g[g.layer == 1].iloc[0], g[g.layer == d].iloc[0]
        summary.append(dict(variant=v, depth=d, seed=s, rms_last_over_first=last.act_rms / first.act_rms,
                            cos_last=last.token_cosine, rank1_last=last.rank1_residual,
                            grad_fc2_top_over_bottom=last.grad_norm_fc2 / first.grad_norm_fc2,
                            max_attn_logit=g.max_attn_logit.max(), output_change=last.output_change))
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 4):
        print(pd.DataFrame(summary).to_string(index=False))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)
        print(f"{len(df)} per-layer rows -> {args.out}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":  # python -m resnorm.diagnose ...
    sys.exit(main())
