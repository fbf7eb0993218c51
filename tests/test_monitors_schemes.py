"""Scheme monitors (resnorm.monitors.schemes): the HC/mHC gains on hand-built matrices and on the real
connections, the AttnRes and DenseFormer depth weights, the value-mix lambdas, and their rows in a real
run's layers.parquet and W&B history."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from conftest import TINY, compose
from resnorm.model.transformer import build_model
from resnorm.monitors.schemes import (SchemeForwardProbe, SchemeParamProbe, col_gain, composites, gain_stats,
                                      residual_maps, row_gain, scheme_probes, share_entropy, share_stats,
                                      stream_shares, stream_states)
from resnorm.model.multistream import sinkhorn


def _model(variant, *overrides, depth=2, seed=0):
    cfg = compose(*TINY, f"depth={depth}", f"model.norm={variant}", *overrides)
    torch.manual_seed(seed)
    return cfg, build_model(cfg)


def _batch(seed=0):
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


def _randomise(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.stream_params.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_row_and_column_gains_by_hand():
    m = torch.tensor([[1.0, -2.0], [3.0, 0.5]])  # rows |.|: 3, 3.5; columns: 4, 2.5
    assert row_gain(m).item() == 3.5 and col_gain(m).item() == 4.0
    batch = torch.stack([m, torch.eye(2), -2 * torch.eye(2)])
    assert row_gain(batch).tolist() == [3.5, 1.0, 2.0] and col_gain(batch).tolist() == [4.0, 1.0, 2.0]


def test_doubly_stochastic_products_have_gain_exactly_one():
    a = torch.tensor([[0.25, 0.75], [0.75, 0.25]], dtype=torch.float64)
    b = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # a permutation
    stats = gain_stats([a, b, p, a])
    assert torch.equal(stats, torch.ones(4, 4))
    # Sinkhorn's output (rows exactly 1, columns to its tolerance): every composite stays at 1
    ds = [sinkhorn(torch.randn(4, 4, generator=torch.Generator().manual_seed(i), dtype=torch.float64), 50, eps=0.0)
          for i in range(12)]
    assert gain_stats(ds).sub(1).abs().max().item() < 1e-6


def test_composites_run_from_each_matrix_to_the_top_and_grow_for_unconstrained_matrices():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    out = composites([a, b, c])
    assert torch.allclose(out[0], c @ b @ a) and torch.allclose(out[1], c @ b) and torch.equal(out[2], c)
    k = 1.5 * torch.eye(3, dtype=torch.float64)  # forward and backward gain 1.5 each; composite 1.5^n
    stats = gain_stats([k] * 4)
    assert stats[2].tolist() == pytest.approx([1.5 ** 4, 1.5 ** 3, 1.5 ** 2, 1.5])
    assert stats[0].tolist() == stats[1].tolist() == pytest.approx([1.5] * 4)


@pytest.mark.parametrize("variant", ["hyper", "hyper_dynamic", "mhc"])
def test_residual_map_is_the_matrix_the_connection_applies(variant):
    """H_out - (the branch term) = R H, R = residual_map(H) [target, source], per token."""
    _, model = _model(variant)
    _randomise(model)
    conn, sub = model.stream_params.layers[1], model.sublayers()[1]
    H = torch.randn(4, 2, 8, 16, generator=torch.Generator().manual_seed(2))
    parts = []
    with torch.no_grad():
        out = conn(H, sub, parts)
        if variant == "mhc":
            branch = conn.weights(H)[1].movedim(-1, 0)[..., None] * parts[0].f
        else:
            branch = conn.weights(H)[1] * parts[0].f
        R = conn.residual_map(H)
        assert torch.allclose(out - branch, torch.einsum("...ts,s...d->t...d", R.expand(2, 8, 4, 4), H), atol=1e-5)


def test_hc_at_init_is_the_identity_and_mhc_doubly_stochastic():
    for variant in ("hyper", "hyper_dynamic"):
        _, model = _model(variant)
        stats = SchemeForwardProbe(model, 1).before_update(_batch())
        assert torch.equal(stats[:4], torch.ones(4, 4)), variant  # the gains
        # the n = 4 streams are equal copies at init: shares 1, entropy ln 4
        assert torch.allclose(stats[5:], torch.ones(4, 4)) and torch.allclose(stats[4], torch.full((4,), math.log(4)))
    _, model = _model("mhc")
    stats = SchemeForwardProbe(model, 1).before_update(_batch())
    assert stats[:4].sub(1).abs().max() < 1e-3 and stats[5:].sub(1).abs().max() < 1e-5


def test_dynamic_gains_are_per_token_then_averaged():
    """hyper_dynamic's matrices differ per token: the gain of each token's composite, averaged."""
    _, model = _model("hyper_dynamic")
    _randomise(model, scale=0.5)
    x = _batch()
    with torch.no_grad():
        maps = residual_maps(model, x)
        stats = SchemeForwardProbe(model, 1).before_update(x)
    assert maps[0].shape == (2, 8, 4, 4)
    per_token = []
    for b in range(2):
        for t in range(8):
            prod = torch.eye(4, dtype=torch.float64)
            for m in maps:
                prod = m[b, t].double() @ prod
            per_token.append(prod.abs().sum(1).max().item())
    assert stats[2, 0].item() == pytest.approx(sum(per_token) / len(per_token), rel=1e-5)
    mean_matrix = torch.eye(4, dtype=torch.float64)
    for m in maps:
        mean_matrix = m.double().mean((0, 1)) @ mean_matrix
    assert stats[2, 0].item() != pytest.approx(row_gain(mean_matrix).item(), rel=1e-6)


def test_static_hc_gain_from_hand_set_matrices():
    """hyper: A_r set by hand per sublayer; the probe's composite is the product of A_r^T."""
    _, model = _model("hyper")
    g = torch.Generator().manual_seed(3)
    rs = []
    with torch.no_grad():
        for conn in model.stream_params.layers:
            conn.static_alpha[:, 1:] = torch.randn(4, 4, generator=g)
            rs.append(conn.static_alpha[:, 1:].T.clone())  # [target, source]
        stats = SchemeForwardProbe(model, 1).before_update(_batch())
    full = rs[3] @ rs[2] @ rs[1] @ rs[0]
    assert stats[0].tolist() == pytest.approx([r.abs().sum(1).max().item() for r in rs], rel=1e-6)
    assert stats[1].tolist() == pytest.approx([r.abs().sum(0).max().item() for r in rs], rel=1e-6)
    assert stats[2, 0].item() == pytest.approx(full.abs().sum(1).max().item(), rel=1e-5)
    assert stats[3, 0].item() == pytest.approx(full.abs().sum(0).max().item(), rel=1e-5)
    assert stats[2, 3].item() == pytest.approx(stats[0, 3].item())


@pytest.mark.parametrize("variant", ["attnres", "attnres_block"])
def test_attnres_depth_weights_uniform_at_init(variant):
    _, model = _model(variant, "model.attnres_block_size=1", depth=3)
    stats = SchemeForwardProbe(model, 1).before_update(_batch())
    # sources per sublayer: full AttnRes 1..6; Block AttnRes (2 sublayers a block): 1, 2, 2, 3, 3, 4
    n = list(range(1, 7)) if variant == "attnres" else [1, 2, 2, 3, 3, 4]
    assert stats[0].tolist() == pytest.approx([1 / k for k in n])
    assert stats[1].tolist() == pytest.approx([1 / k for k in n])
    assert stats[2].tolist() == pytest.approx([math.log(k) for k in n], abs=1e-6)
    assert stats[3].tolist() == [0.0] * 6


def test_attnres_depth_weights_against_the_trace():
    """With random pseudo-queries: the weights softmax_i(w_l . RMSNorm(v_i)) over [x0, v_0, ..., v_{l-1}]
    (the trace's sublayer outputs), averaged over the tokens."""
    _, model = _model("attnres")
    _randomise(model, scale=1.0)
    x = _batch()
    with torch.no_grad():
        stats = SchemeForwardProbe(model, 1).before_update(x)
        parts = model.trace(x, max_logits=False)["parts"]
    sources = [parts[0].x]
    for k, p in enumerate(parts):
        v = torch.stack(sources)
        logits = torch.nn.functional.rms_norm(v, (16,), eps=model.shape.norm_eps) @ model.stream_params.queries[k]
        a = logits.softmax(0)
        assert stats[0, k].item() == pytest.approx(a[0].mean().item(), abs=1e-6)
        assert stats[1, k].item() == pytest.approx(a[-1].mean().item(), abs=1e-6)
        assert stats[2, k].item() == pytest.approx((-(a * a.log()).sum(0)).mean().item(), abs=1e-5)
        assert stats[3, k].item() == pytest.approx(model.stream_params.queries[k].norm().item())
        sources.append(p.y)


def test_denseformer_weights_on_each_blocks_mlp_row():
    _, model = _model("denseformer", depth=3)
    with torch.no_grad():
        model.stream_params.alphas[2].copy_(torch.tensor([0.3, -0.2, 0.5, 0.9]))  # X_0, X_1, X_2, X_3
    stats = SchemeParamProbe(model, 1).before_update()
    assert torch.isnan(stats[:, 0::2]).all()
    assert stats[:, 1].tolist() == [1.0, 0.0, 0.0] and stats[:, 3].tolist() == [1.0, 0.0, 0.0]
    assert stats[:, 5].tolist() == pytest.approx([0.9, 0.3, 0.7])


def test_value_lambdas_learned_only():
    _, fixed = _model("value_residual")
    assert scheme_probes(fixed, compose(*TINY).train) == []
    cfg, model = _model("value_residual", "model.value_residual_learned=true", depth=3)
    with torch.no_grad():
        model.stream_params.lambdas.copy_(torch.tensor([[9.0, 9.0], [0.1, 0.2], [0.3, 0.4]]))
    stats = scheme_probes(model, cfg.train)[0].before_update()
    assert torch.isnan(stats[:, [0, 1, 3, 5]]).all()
    assert stats[:, 2].tolist() == pytest.approx([0.1, 0.2]) and stats[:, 4].tolist() == pytest.approx([0.3, 0.4])


def test_stream_shares_and_entropy_on_hand_built_streams():
    """Balanced streams: every share 1, entropy ln n; one stream carrying everything: share sqrt(n), the
    dead ones 0, entropy 0; energies 9 : 16 (stream RMS 3 and 4): shares 3 and 4 over sqrt(12.5)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    balanced = torch.stack([x, -x, x.flip(-1), x.roll(1, -1)])  # equal RMS, different content
    assert stream_shares(balanced).tolist() == pytest.approx([1.0] * 4)
    assert share_entropy(stream_shares(balanced)).item() == pytest.approx(math.log(4))
    alone = torch.stack([torch.zeros_like(x), 3 * x, torch.zeros_like(x)])
    assert stream_shares(alone).tolist() == pytest.approx([0.0, math.sqrt(3), 0.0])
    assert share_entropy(stream_shares(alone)).item() == 0.0
    ones = torch.ones(2, 4, 6, dtype=torch.float64)
    two = torch.stack([3 * ones, 4 * ones])
    assert stream_shares(two).tolist() == pytest.approx([3 / math.sqrt(12.5), 4 / math.sqrt(12.5)])
    p = torch.tensor([9 / 25, 16 / 25], dtype=torch.float64)
    assert share_entropy(stream_shares(two)).item() == pytest.approx(-(p * p.log()).sum().item())
    alone4 = torch.zeros(4, 2, 5, 8, dtype=torch.float64)
    alone4[2] = 3 * x
    stats = share_stats([balanced, alone4])  # two sublayers, columns
    assert stats.shape == (5, 2) and stats[0].tolist() == pytest.approx([math.log(4), 0.0])
    assert stats[1:, 1].tolist() == pytest.approx([0.0, 0.0, 2.0, 0.0])


@pytest.mark.parametrize("variant", ["hyper", "hyper_dynamic", "mhc"])
def test_stream_share_rows_read_the_streams_each_connection_returns(variant):
    """One row per stream after the entropy, per sublayer; the values are those of the streams H the
    connection returned (hooked in the same forward as the gains)."""
    _, model = _model(variant, "model.hc_streams=3")
    _randomise(model)
    probe = SchemeForwardProbe(model, 1)
    assert probe.quantities_before[4:] == ("hc_stream_entropy", "hc_stream_share_0", "hc_stream_share_1",
                                           "hc_stream_share_2")
    x = _batch()
    stats = probe.before_update(x)
    assert stats.shape == (4 + 1 + 3, 4)
    with torch.no_grad():
        model.eval()
        _, outs = stream_states(model, x)
    want = share_stats(outs)
    assert torch.allclose(stats[4:], want) and (stats[5:].pow(2).mean(0) - 1).abs().max() < 1e-5


def test_builder_and_cadence():
    cfg, model = _model("mhc", "train.probe_every=5", "train.log_every=2")
    (probe,) = scheme_probes(model, cfg.train)
    assert isinstance(probe, SchemeForwardProbe) and probe.due(10, False) and probe.due(7, True)
    assert not probe.due(7, False)
    assert scheme_probes(model, compose(*TINY, "train.probe_every=0").train) == []
    assert scheme_probes(model, compose(*TINY, "train.probes=false").train) == []
    cfg, dense = _model("denseformer", "train.log_every=2")
    (probe,) = scheme_probes(dense, cfg.train)
    assert probe.due(4, False) and not probe.due(5, True)
    assert scheme_probes(_model("pre")[1], cfg.train) == []


def test_probes_leave_gradients_weights_and_mode_alone():
    cfg, model = _model("hyper_dynamic")
    _randomise(model)
    x = _batch()
    model.loss(x, x).backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    SchemeForwardProbe(model, 1).before_update(x)
    assert model.training
    assert all(torch.equal(w, p) and torch.equal(g, p.grad) for (w, g), p in zip(before, model.parameters()))


def test_rows_reach_layers_parquet_and_wandb(tmp_path):
    from wandb_records import read_run

    from resnorm.train.job import JobInfo, train

    cfg = compose(*TINY, "depth=2", "model.norm=hyper", "train.steps=4", "train.probe_every=2",
                  "logger.mode=offline", "name=schemes")
    summary = train(cfg, JobInfo(tmp_path / "hc", "hc", "schemes", []))
    assert summary["status"] == "completed" and summary["wandb_error"] is None
    t = pd.read_parquet(tmp_path / "hc" / "layers.parquet")
    for q in ("hc_row_gain", "hc_col_gain", "hc_composite_row_gain", "hc_composite_col_gain"):
        rows = t[t.quantity == q]
        assert sorted(set(rows.step)) == [0, 2, 3] and len(rows) == 3 * 4, q
        assert rows.value.map(math.isfinite).all() and (rows[rows.step == 0].value == 1.0).all()
    assert (t[(t.quantity == "hc_composite_row_gain") & (t.step == 3)].value != 1.0).any()  # it trained
    for q in ("hc_stream_entropy",) + tuple(f"hc_stream_share_{s}" for s in range(4)):  # n = 4 streams
        rows = t[t.quantity == q]
        assert sorted(set(rows.step)) == [0, 2, 3] and len(rows) == 3 * 4 and rows.value.map(math.isfinite).all(), q
    (wb,) = (tmp_path / "hc" / "wandb").glob("offline-run-*/run-*.wandb")
    history = read_run(wb)["history"]
    logged = [h["hc_composite_row_gain/attn/000"] for h in history if "hc_composite_row_gain/attn/000" in h]
    stored = t[(t.quantity == "hc_composite_row_gain") & (t.layer == 0) & (t.sublayer == "attn")]
    assert logged == pytest.approx(stored.sort_values("step").value.tolist())
    logged = [h["hc_stream_share_0/mlp/001"] for h in history if "hc_stream_share_0/mlp/001" in h]
    stored = t[(t.quantity == "hc_stream_share_0") & (t.layer == 1) & (t.sublayer == "mlp")]
    assert logged == pytest.approx(stored.sort_values("step").value.tolist()) and len(logged) == 3

    cfg = compose(*TINY, "depth=2", "model.norm=denseformer", "train.steps=3", "name=schemes")
    train(cfg, JobInfo(tmp_path / "dense", "dense", "schemes", []))
    t = pd.read_parquet(tmp_path / "dense" / "layers.parquet")
    self_w = t[(t.quantity == "dwa_alpha_self") & (t.sublayer == "mlp")]
    assert sorted(set(self_w.step)) == [0, 1, 2] and self_w.value.map(math.isfinite).all()
