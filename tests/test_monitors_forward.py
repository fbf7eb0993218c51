"""resnorm.monitors.forward and its formulas in resnorm.monitors.measure, against hand-computed values."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, compose
from resnorm.monitors import measure as M
from resnorm.runs.quantities import QUANTITIES
from resnorm.model.blocks import Attention
from resnorm.model.transformer import build_model
from resnorm.monitors.forward import ForwardStatsProbe, StreamGradProbe, forward_probes

T = 8


def tiny(norm="pre", depth=2, *extra):
    cfg = compose(*TINY, f"model.norm={norm}", f"depth={depth}", f"train.seq_len={T}", *extra)
    torch.manual_seed(0)
    return build_model(cfg), cfg


def tokens(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(model.shape.vocab_size, (batch, T), generator=g)


def uniform_attention(model):
    """Zero the query and key projections: every attention logit is 0, attention is uniform."""
    d = model.shape.d_model
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Attention):
                m.qkv.weight[:2 * d] = 0.0
                if m.qkv.bias is not None:
                    m.qkv.bias[:2 * d] = 0.0
    return model


# --- formulas ----------------------------------------------------------------------------------------

def test_absmax_and_plain_kurtosis_by_hand():
    assert M.absmax(torch.tensor([[1.0, -5.0], [3.0, 2.0]])).item() == 5.0
    assert M.kurtosis(torch.tensor([1.0, -1.0, 1.0, -1.0])).item() == pytest.approx(1.0)
    # [0, 0, 0, 2]: mu 1/2, deviations (-1/2 x3, 3/2); var 3/4, m4 = (3/16 + 81/16) / 4 = 21/16
    # kurtosis = (21/16) / (9/16) = 7/3 (plain, not excess)
    assert M.kurtosis(torch.tensor([[0.0, 0.0], [0.0, 2.0]])).item() == pytest.approx(7 / 3)
    g = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    assert M.kurtosis(g).item() == pytest.approx(3.0, abs=0.05)  # Gaussian: 3


def test_attention_entropy_sink_mass_and_log_partition_by_hand():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
    ent = M.attention_entropy(p)
    assert ent.tolist() == pytest.approx([0.0, math.log(2), 1.5 * math.log(2)])
    assert M.sink_mass(p).item() == pytest.approx((1 + 0.5 + 0.25) / 3)
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    assert M.log_partition(logits).tolist() == pytest.approx([math.log(2), math.log(4)])


# --- attention_probs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_attention_probs_is_the_softmax_sdpa_uses(causal):
    model, _ = tiny()
    attn = model.blocks[0].attn.branch
    attn.causal = causal
    h = torch.randn(2, T, model.shape.d_model, generator=torch.Generator().manual_seed(2))
    p = attn.attention_probs(h)
    assert p.shape == (2, model.shape.n_heads, T, T)
    assert torch.allclose(p.sum(-1), torch.ones(2, model.shape.n_heads, T))
    q, k, v = attn._qkv(h)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s + torch.full((T, T), float("-inf")).triu(1)
        assert (p.triu(1) == 0).all()
    assert torch.allclose(p, torch.softmax(s, -1), atol=1e-6)
    # the same mixing as forward (SDPA)
    b, t, d = h.shape
    out = attn.out((p @ v).transpose(1, 2).reshape(b, t, d))
    assert torch.allclose(out, attn(h), atol=1e-5)


# --- ForwardStatsProbe --------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_uniform_attention_entropy_and_sink_mass(causal):
    model, cfg = tiny()
    uniform_attention(M.set_causal(model, causal))
    probe = ForwardStatsProbe(model, every=2, total_steps=6)
    x = tokens(model)
    out = probe.before_update(x)
    assert out.shape == (len(probe.quantities_before), len(probe.labels))
    ts = range(1, T + 1)
    ent = sum(math.log(t) for t in ts) / T if causal else math.log(T)
    sink = sum(1 / t for t in ts) / T if causal else 1 / T
    q = {name: out[i] for i, name in enumerate(probe.quantities_before)}
    for j, (layer, sub) in enumerate(probe.labels):
        if sub == "attn":
            assert q["attn_entropy_mean"][j].item() == pytest.approx(ent, rel=1e-5)
            assert q["attn_entropy_min_head"][j].item() == pytest.approx(ent, rel=1e-5)
            assert q["attn_sink_mass"][j].item() == pytest.approx(sink, rel=1e-5)
        else:
            assert all(math.isnan(q[k][j].item()) for k in ("attn_entropy_mean", "attn_entropy_min_head",
                                                             "attn_sink_mass"))


def test_outliers_are_the_formulas_on_each_sublayer_output():
    model, _ = tiny()
    x = tokens(model)
    out = ForwardStatsProbe(model, 2, 6).before_update(x)
    with torch.no_grad():
        parts = model.eval().trace(x)["parts"]
    for j, p in enumerate(parts):
        y = p.y.flatten()
        mu, sd = y.mean(), y.std(unbiased=False)
        assert out[0, j].item() == pytest.approx(y.abs().max().item())
        assert out[1, j].item() == pytest.approx(((y - mu) ** 4).mean().item() / sd.item() ** 4, rel=1e-5)


def test_entropy_min_head_is_the_lowest_head():
    model, _ = tiny(depth=1)
    attn = model.blocks[0].attn.branch
    x = tokens(model)
    out = ForwardStatsProbe(model, 2, 6).before_update(x)
    with torch.no_grad():
        h = model.eval().trace(x)["parts"][0].h
        p = attn.attention_probs(h)
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (b, heads, T)
    per_head = ent.mean(dim=(0, 2))
    assert out[2, 0].item() == pytest.approx(ent.mean().item(), rel=1e-5)
    assert out[3, 0].item() == pytest.approx(per_head.min().item(), rel=1e-5)
    assert out[4, 0].item() == pytest.approx(p[..., 0].mean().item(), rel=1e-5)


# --- StreamGradProbe ----------------------------------------------------------------------------------

def independent_stream_grads(model, x, y, shift=False):
    """dL/dx per sublayer by retain_grad + backward on a copy of the model."""
    work = copy.deepcopy(model).eval()
    parts = []
    logits = work.head(work.hidden(x, parts))
    for p in parts:
        p.x.retain_grad()
    if shift:
        logits, y = logits[:, :-1], x[:, 1:]
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    return [M.rms(p.x.grad).item() for p in parts]


@pytest.mark.parametrize("norm", ["pre", "post", "b2t", "resi_dual", "noresidual", "hyper", "denseformer"])
def test_stream_grad_rms_against_retain_grad(norm):
    """The probe reads the step's own backward (hooks armed before the forward); its values equal
    an independent retain_grad computation, and the step's parameter gradients are unchanged."""
    model, _ = tiny(norm)
    x = tokens(model)
    y = tokens(model, seed=3)
    want = independent_stream_grads(model, x, y)
    plain = copy.deepcopy(model)
    plain.loss(x, y).backward()
    probe = StreamGradProbe(model, 2, 6)
    probe.before_forward()
    model.loss(x, y).backward()
    got = probe.before_update(x)
    assert got.shape == (1, len(probe.labels))
    assert got[0].tolist() == pytest.approx(want, rel=1e-5)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):  # hooks read, never change
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), n
    assert all(sub.grad_sink is None for sub in model.sublayers())  # disarmed
    model.zero_grad()
    model.loss(x, y).backward()  # not armed: nothing recorded
    assert probe._sq == []


@pytest.mark.parametrize("training", [True, False])
def test_probes_leave_parameter_grads_and_mode_as_they_were(training):
    model, _ = tiny()
    x, y = tokens(model), tokens(model, seed=3)
    model.loss(x, y).backward()
    model.blocks[0].mlp.branch.fc1.bias.grad = None  # one gradient absent: it stays absent
    before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.train(training)
    ForwardStatsProbe(model, 2, 6).before_update(x)
    assert all(m.training == training for m in model.modules())
    for n, p in model.named_parameters():
        if before[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, before[n]), n


def test_forward_stats_reuse_the_activation_probes_trace():
    from resnorm.monitors.probes import ActivationProbe

    model, _ = tiny()
    x = tokens(model)
    act = ActivationProbe(model, 2, 6)
    alone = ForwardStatsProbe(model, 2, 6).before_update(x)
    act.before_update(x)
    shared = ForwardStatsProbe(model, 2, 6, share=act)
    calls = []
    real = model.trace
    model.trace = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got = shared.before_update(x)
    finally:
        model.trace = real
    assert calls == [] and torch.equal(torch.nan_to_num(got, nan=-1.0), torch.nan_to_num(alone, nan=-1.0))


# --- logit_stats, builder -----------------------------------------------------------------------------

def logit_stats(model, batches, device):
    """The validation logits' (log Z, RMS), as the loop's evaluate computes them at every evaluation."""
    import contextlib

    from resnorm.train.loop import evaluate

    return evaluate(model, batches, device, contextlib.nullcontext, logit_stats=True)[1:]


def test_logit_stats_by_hand():
    model, _ = tiny()
    batches = [(tokens(model, 2, s), tokens(model, 2, s + 10)) for s in range(2)]
    with torch.no_grad():
        model.head.weight.zero_()
    logz, r = logit_stats(model, batches, torch.device("cpu"))
    assert logz == pytest.approx(math.log(model.shape.vocab_size))  # all logits 0: log V
    assert r == 0.0
    torch.manual_seed(5)
    model.head.weight.data.normal_()
    model.train()
    logz, r = logit_stats(model, batches, torch.device("cpu"))
    assert model.training
    with torch.no_grad():
        allz = torch.cat([model.eval()(x).reshape(-1, model.shape.vocab_size) for x, _ in batches])
    assert logz == pytest.approx(torch.logsumexp(allz, -1).mean().item(), rel=1e-6)
    assert r == pytest.approx(allz.pow(2).mean().sqrt().item(), rel=1e-6)


def test_forward_probes_builder_and_cadence():
    model, cfg = tiny()
    probes = forward_probes(model, cfg.train)
    assert [type(p) for p in probes] == [ForwardStatsProbe, StreamGradProbe]
    every = cfg.train.probe_every
    assert all(p.labels == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")] for p in probes)
    assert probes[0].due(0, False) and probes[0].due(2 * every, False) and not probes[0].due(1, False)
    assert probes[1].due(7, True)
    assert forward_probes(model, compose(*TINY, "train.probe_every=0").train) == []
    assert forward_probes(model, compose(*TINY, "train.probes=false").train) == []


def test_probes_rows_reach_layers_parquet_through_fit(tmp_path):
    import pandas as pd

    from resnorm.train.job import JobInfo, train

    cfg = compose(*TINY, "depth=1", "train.steps=4", "train.eval_every=2", "train.probe_every=2")
    train(cfg, JobInfo(tmp_path, "r", "g", []))  # the default callbacks include these probes
    t = pd.read_parquet(tmp_path / "layers.parquet")
    names = ForwardStatsProbe.quantities_before + StreamGradProbe.quantities_before
    for q in names:
        rows = t[t.quantity == q]
        assert sorted(set(rows.step)) == [0, 2, 3], q
        per_step = len(QUANTITIES[q].sublayers)  # an MLP has no attention quantity: no row for it
        assert len(rows) == 3 * per_step  # (0, attn), (0, mlp) per probe step
    attn = t[t.quantity.isin(names) & (t.sublayer == "attn")]
    assert attn.value.map(math.isfinite).all()
    attention = [q for q in names if QUANTITIES[q].sublayers == ("attn",)]
    assert attention and set(t[t.quantity.isin(attention)].sublayer) == {"attn"}  # no all-NaN MLP series
