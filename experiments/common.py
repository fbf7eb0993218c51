"""Helpers shared by the reproductions: building a pinned-init model, statistics, colours, figures."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pandas as pd

from .core import Skip

def colour(name: str) -> str:
    """A variant's colour, the same as in every sweep figure (:mod:`analysis.style`); curves that are
    not variants (e.g. attention-only paths) get a colour fixed by their name."""
    from analysis.style import colour as style_colour

    return style_colour(name)


def palette(names: Iterable[str]) -> Dict[str, str]:
    return {n: colour(n) for n in names}


def registered(names: Iterable[str]) -> List[str]:
    from resnorm.config.variants import VARIANTS

    return [n for n in names if n in VARIANTS]


def model_config(variant: str, depth: int, d_model: int = 128, n_heads: int = 4, d_ff: Optional[int] = 512,
                 activation: str = "relu", seq_len: int = 64, vocab: int = 256, **model_extra):
    """A validated config for the papers' setting: Xavier-normal weights, N(0,1) token embeddings (pinned)."""
    from resnorm.config.compose import compose, override
    from resnorm.train.preflight import validate

    model = dict(norm=variant, d_model=d_model, n_heads=n_heads, d_ff=d_ff, activation=activation,
                 vocab_size=vocab, init="xavier", **model_extra)
    cfg = compose([f"depth={depth}", f"train.seq_len={seq_len}",
                   *(override(f"model.{k}", v) for k, v in model.items())])
    validate(cfg)
    return cfg


def make_model(variant: str, depth: int, seed: int, **kw):
    """Build and initialise (Xavier, N(0,1) embeddings) a model after ``torch.manual_seed(seed)``."""
    import torch

    from resnorm.model.transformer import build_model

    torch.manual_seed(seed)
    return build_model(model_config(variant, depth, **kw))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties), numpy only."""
    def ranks(a):
        a = np.asarray(a, dtype=float)
        order = a.argsort()
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        for v in np.unique(a):  # average ties
            m = a == v
            r[m] = r[m].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def select(df: pd.DataFrame, **eq) -> pd.DataFrame:
    """Rows where every column equals the value; raises Skip when none match."""
    m = np.ones(len(df), dtype=bool)
    for k, v in eq.items():
        if k not in df.columns:
            raise Skip(f"no column {k!r} in the data")
        m &= (df[k] == v).to_numpy()
    out = df[m]
    if out.empty:
        raise Skip("no data for " + ", ".join(f"{k}={v}" for k, v in eq.items()))
    return out


def figure(n_panels: int, width: float = 4.2, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, height), squeeze=False)
    return fig, axes[0]


def save(fig, path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
