"""The norm-placement presets used at scale, each held to its paper (docs/variants.md has the choices).

- ``reordered`` (OLMo 2, arXiv:2501.00656 §3.2): ``x <- x + RMSNorm(F(x))``, final RMSNorm.
- ``layerscale`` (Touvron et al., arXiv:2103.17239 §2): ``x <- x + diag(lambda) F(LN(x))``, lambda learned
  per channel, initialised at 0.1 (L <= 18), 1e-5 (L <= 24), 1e-6 (deeper); final LN.
- ``keel`` (Chen & Wei, arXiv:2601.19895): ``x <- LN(alpha x + F(LN(x)))``, alpha = 2L sublayers; no final norm.
- ``normformer`` (Shleifer et al., arXiv:2110.09456 §2): ``x <- x + LN(W_o HeadScale(MHA(LN x)))``;
  ``x <- x + W_2 LN(GELU(W_1 LN x))``; head scales 1; final LN.
- ``hybridnorm`` (Zhuo et al., arXiv:2503.04598 §3 and its official code): ``x <- LN(x + W_o MHA(N(q),
  N(k), N(v)))`` with per-head norms of q, k, v; ``x <- x + FFN(x)``; a final LN; HybridNorm*
  (``model.hybridnorm_star``): block 1 Pre-Norm in both sublayers.

The references are written from those equations in float64 (tests/test_variants.py's attention, MLP
and norm formulas), reading only parameter values. The ``peer`` tests port the weights into
x-transformers' own ``Decoder`` / ``Attention`` / ``FeedForward`` and compare in float32 (1e-5).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose
from resnorm.model.blocks import MLP, Attention
from resnorm.model.transformer import build_model
from resnorm.config.variants import VARIANTS, keel_alpha, layerscale_init
from test_variants import (WEIGHTS, N, _std_ratio, _train, one_thread, ref_attention, ref_mlp,  # noqa: F401
                           tiny_model)

NAMES = ("reordered", "layerscale", "keel", "normformer", "hybridnorm")
D, H, T, B = 8, 2, 5, 3
SMALL = ("model.n_heads=2", "data=synthetic", "data.synthetic_tokens=3000")


# --- the references ---------------------------------------------------------------------------------

def ref_attention_ext(x, attn, qkv_norms=None, head_scale=None):
    """softmax(q k^T / sqrt(d_h) + M) v per head, with q, k, v normalised over d_model first (QKV-norm)
    and each head's output times its scale (HeadScale), then W_o."""
    b, t, d = x.shape
    hd = d // attn.n_heads
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(d, dim=-1)
    q, k, v = (z.view(b, t, attn.n_heads, hd).transpose(1, 2) for z in (q, k, v))
    if qkv_norms is not None:  # HybridNorm: per head, over d_head (its official code)
        q, k, v = (N(z, n) for z, n in zip((q, k, v), qkv_norms))
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    w = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(mask, float("-inf")), dim=-1)
    y = w @ v
    if head_scale is not None:
        y = y * head_scale.view(1, -1, 1, 1)
    return y.transpose(1, 2).reshape(b, t, d) @ attn.out.weight.T + attn.out.bias


def ref_mlp_inner(x, mlp):
    """W_2 LN(GELU(W_1 x)) (NormFormer's FFN)."""
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    h = N(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), mlp.inner_norm)
    return h @ mlp.fc2.weight.T + mlp.fc2.bias


def ref_block(norm, x, block, layer, L, star=False):
    a, m = block.attn, block.mlp
    if norm == "reordered":  # x + RMSNorm(F(x))
        x = x + N(ref_attention(x, a.branch), a.out_norm)
        return x + N(ref_mlp(x, m.branch), m.out_norm)
    if norm == "layerscale":  # x + diag(lambda) F(LN(x))
        x = x + a.lam * ref_attention(N(x, a.pre_norm), a.branch)
        return x + m.lam * ref_mlp(N(x, m.pre_norm), m.branch)
    if norm == "keel":  # LN(2L x + F(LN(x)))
        x = N(2 * L * x + ref_attention(N(x, a.pre_norm), a.branch), a.sum_norm)
        return N(2 * L * x + ref_mlp(N(x, m.pre_norm), m.branch), m.sum_norm)
    if norm == "normformer":
        x = x + N(ref_attention_ext(N(x, a.pre_norm), a.branch, head_scale=a.branch.head_scale), a.out_norm)
        return x + ref_mlp_inner(N(x, m.pre_norm), m.branch)
    if norm == "hybridnorm":
        if star and layer == 0:  # HybridNorm*: the first block Pre-Norm, QKV-norm kept
            x = x + ref_attention_ext(N(x, a.pre_norm), a.branch, qkv_norms=a.branch.qkv_norms)
            return x + ref_mlp(N(x, m.pre_norm), m.branch)
        x = N(x + ref_attention_ext(x, a.branch, qkv_norms=a.branch.qkv_norms), a.sum_norm)
        return x + ref_mlp(x, m.branch)
    raise AssertionError(f"tests/test_schemes_norm.py: ref_block has no branch for {norm!r}: add its paper's block "
                         "equation there (and its entries in FINAL, SLOTS and EXTRAS)")


#: whether the paper puts a final norm before the head
FINAL = {"reordered": True, "layerscale": True, "keel": False, "normformer": True, "hybridnorm": True}


def expected(table: dict, name: str, norm: str, what: str):
    """``table[norm]``, or a failure naming the entry a new variant of this file must add."""
    if norm not in table:
        raise AssertionError(f"tests/test_schemes_norm.py: add {norm!r} to {name} ({what})")
    return table[norm]


def reference_hidden(model, idx, norm, star=False):
    x = model.tok_emb.weight[idx] + model.pos_emb.weight[: idx.shape[1]]
    for layer, block in enumerate(model.blocks):
        x = ref_block(norm, x, block, layer, model.shape.depth, star)
    return N(x, model.final_norm) if expected(FINAL, "FINAL", norm, "a final norm or not") else x


def randomised(norm, depth, *overrides):
    """tiny_model (random norm gains, biases) with LayerScale's lambda and the head scales random too."""
    model, cfg = tiny_model(norm, depth, *overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".lam", ".head_scale")):
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    return model, cfg


def test_every_preset_is_registered():
    assert set(NAMES) <= set(VARIANTS)


@pytest.mark.parametrize("norm", NAMES)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_forward_matches_the_papers_equation(norm, depth):
    model, _ = randomised(norm, depth)
    idx = torch.randint(256, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(idx), reference_hidden(model, idx, norm), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("depth", [1, 3])
def test_hybridnorm_star_matches_its_equation(depth):
    model, _ = randomised("hybridnorm", depth, "model.hybridnorm_star=true")
    idx = torch.randint(256, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference_hidden(model, idx, "hybridnorm", star=True)
        torch.testing.assert_close(model.hidden(idx), want, atol=1e-6, rtol=1e-6)
    assert model.blocks[0].attn.pre_norm is not None and model.blocks[0].attn.sum_norm is None
    assert model.blocks[0].mlp.pre_norm is not None
    assert all(b.attn.pre_norm is None and b.attn.sum_norm is not None and b.mlp.pre_norm is None
               and b.mlp.sum_norm is None for b in model.blocks[1:])


def test_reordered_with_flat_rms_qk_norm():
    """OLMo 2's combination: the preset with model.qk_norm=true qk_norm_axis=flat qk_norm_kind=rmsnorm."""
    model, _ = randomised("reordered", 2, "model.qk_norm=true", "model.qk_norm_axis=flat", "model.qk_norm_kind=rmsnorm")
    a = model.blocks[0].attn.branch
    assert isinstance(a.q_norm, torch.nn.RMSNorm) and a.q_norm.normalized_shape == (D,)
    assert isinstance(model.blocks[0].attn.out_norm, torch.nn.RMSNorm) and model.blocks[0].attn.pre_norm is None


def test_hybridnorm_rejects_a_second_qk_norm():
    with pytest.raises(ValueError, match="qk_norm"):
        tiny_model("hybridnorm", 1, "model.qk_norm=true")


# --- structure and initialisation ----------------------------------------------------------------------

#: (pre, out, sum) norms of (attention, MLP); extra: learned lambda, head scales, QKV-norm, FFN inner norm
SLOTS = {"reordered": ((0, 1, 0), (0, 1, 0)), "layerscale": ((1, 0, 0), (1, 0, 0)),
         "keel": ((1, 0, 1), (1, 0, 1)), "normformer": ((1, 1, 0), (1, 0, 0)),
         "hybridnorm": ((0, 0, 1), (0, 0, 0))}
NORM_TYPE = {"reordered": torch.nn.RMSNorm}
#: the branch features of each variant: head scales (NormFormer), QKV norms (HybridNorm), the FFN's inner norm
EXTRAS = {"reordered": set(), "layerscale": set(), "keel": set(), "normformer": {"head_scale", "inner_norm"},
          "hybridnorm": {"qkv_norms"}}


def _slots(sub):
    return tuple(int(n is not None) for n in (sub.pre_norm, sub.out_norm, sub.sum_norm))


@pytest.mark.parametrize("norm", NAMES)
@pytest.mark.parametrize("depth", [3, 12, 20, 30])
def test_structure_and_initialisation_match_the_paper(norm, depth):
    d = 32
    cfg = compose(f"model.norm={norm}", f"depth={depth}", f"model.d_model={d}", "model.n_heads=2", "train.seq_len=16")
    torch.manual_seed(0)
    with torch.no_grad():
        model = build_model(cfg)
    L = depth
    for group in WEIGHTS:  # Xavier-normal, gain 1 (none of the five changes the weight init)
        assert _std_ratio(model, WEIGHTS[group]) == pytest.approx(1.0, rel=0.06), group
    final, slots = expected(FINAL, "FINAL", norm, "a final norm or not"), expected(SLOTS, "SLOTS", norm, "its norm slots")
    extras = expected(EXTRAS, "EXTRAS", norm, "its branch features")
    assert (model.final_norm is not None) == final and model.embed_norm is None
    want_type = NORM_TYPE.get(norm, torch.nn.LayerNorm)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
    assert norms and all(type(m) is want_type and (m.weight == 1).all() for m in norms)
    assert all(getattr(m, "bias", None) is None or (m.bias == 0).all() for m in norms)
    for block in model.blocks:
        assert (_slots(block.attn), _slots(block.mlp)) == slots
        attn, mlp = block.attn.branch, block.mlp.branch
        assert (attn.head_scale is not None) == ("head_scale" in extras)
        assert (attn.qkv_norms is not None) == ("qkv_norms" in extras)
        assert (mlp.inner_norm is not None) == ("inner_norm" in extras)
        if norm == "normformer":
            assert attn.head_scale.shape == (2,) and (attn.head_scale == 1).all()  # gamma_h = 1
            assert mlp.inner_norm.normalized_shape == (4 * d,)  # LN over the FFN's hidden width
        if norm == "hybridnorm":
            assert [n.normalized_shape for n in attn.qkv_norms] == [(d // 2,)] * 3  # per head, for q, k, v
    subs = model.sublayers()
    lams = [s.lam for s in subs]
    if norm == "layerscale":  # CaiT: 0.1 up to depth 18, 1e-5 up to 24, 1e-6 beyond
        want = 0.1 if L <= 18 else 1e-5 if L <= 24 else 1e-6
        assert all(lam.shape == (d,) and torch.equal(lam, torch.full((d,), want)) for lam in lams)
    else:
        assert lams == [None] * 2 * L
    skip = 2.0 * L if norm == "keel" else 1.0  # Keel: alpha = L sublayers = 2 x blocks
    assert [s.spec.skip_scale for s in subs] == [skip] * 2 * L
    assert all(s.gate is None and s.omega is None for s in subs)


def test_layerscale_init_at_the_papers_depths():
    assert [layerscale_init(L) for L in (1, 12, 18, 19, 24, 25, 36, 48)] == [0.1] * 3 + [1e-5] * 2 + [1e-6] * 3
    assert keel_alpha(24) == 48.0


def test_learned_scales_receive_gradients_and_train():
    cfg = compose("model.norm=layerscale", "depth=2", "model.d_model=16", "train.seq_len=16", "train.batch_size=8", *SMALL)
    torch.manual_seed(0)
    model = build_model(cfg)
    before = model.blocks[0].attn.lam.clone()
    _train(model, steps=3)
    assert not torch.equal(before, model.blocks[0].attn.lam)
    cfg = compose("model.norm=normformer", "depth=2", "model.d_model=16", "train.seq_len=16", *SMALL)
    model = build_model(cfg)
    _train(model, steps=3)
    assert not torch.equal(model.blocks[0].attn.branch.head_scale, torch.ones(2))


# --- peers: x-transformers' own code ----------------------------------------------------------------

def _xt():
    return pytest.importorskip("x_transformers.x_transformers",
                               reason="x-transformers is not installed (scripts/setup.sh installs it with --no-deps)")


def _peer_model(norm, depth, *overrides):
    """Ours in float32 without biases (x-transformers' projections have none), every parameter random."""
    cfg = compose(f"model.norm={norm}", f"depth={depth}", "model.d_model=16", "model.n_heads=2", "model.bias=false",
                  "train.seq_len=8", *SMALL, *overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.bias"):
                continue  # x-transformers' LayerNorm has no bias; ours stays 0
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "norm" in name or name.endswith(".lam") else 0.0))
    return model


def _port_attention(ours, peer):
    d = ours.qkv.weight.shape[1]
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        getattr(peer, name).weight.copy_(ours.qkv.weight[i * d:(i + 1) * d])
    peer.to_out.weight.copy_(ours.out.weight)


def _port_ff(ours, peer):
    peer.ff[0][0].weight.copy_(ours.fc1.weight)
    peer.ff[-1].weight.copy_(ours.fc2.weight)


def _port_decoder(model, dec):
    """Our blocks into x-transformers' AttentionLayers: per layer (norms, block, residual)."""
    subs = model.sublayers()
    assert len(dec.layers) == len(subs)
    for sub, (norms, block, _) in zip(subs, dec.layers):
        fn = getattr(block, "fn", block)  # LayerScale wraps the branch
        (_port_attention if isinstance(sub.branch, Attention) else _port_ff)(sub.branch, fn)
        if hasattr(block, "gamma"):
            block.gamma.copy_(sub.lam - float(block.unit_offset))
        for ours, theirs in ((sub.pre_norm, norms[0]), (sub.sum_norm, norms[2])):
            assert (ours is None) == (theirs is None)
            if ours is not None:
                theirs.gamma.copy_(ours.weight - float(theirs.unit_offset))
    if model.final_norm is not None:
        dec.final_norm.gamma.copy_(model.final_norm.weight - float(dec.final_norm.unit_offset))


def _compare_decoder(model, dec):
    x = torch.randn(B, 8, 16, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        _port_decoder(model, dec)
        ours = x
        for block in model.blocks:
            ours = block(ours)
        if model.final_norm is not None:
            ours = model.final_norm(ours)
        torch.testing.assert_close(ours, dec(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [2, 20])
def test_peer_xtransformers_layerscale(depth):
    """x-transformers' Decoder(use_layerscale, layerscale_init_value): Pre-LN, gamma * F(LN x), final LN."""
    xt = _xt()
    model = _peer_model("layerscale", depth)
    dec = xt.Decoder(dim=16, depth=depth, heads=2, attn_dim_head=8, ff_no_bias=True, use_layerscale=True,
                     layerscale_init_value=layerscale_init(depth))
    # x-transformers stores gamma - 1 (norm_add_unit_offset, its default): the effective value is ours up to
    # float32's spacing near 1 (6e-8), a 0.6% error on 1e-5 (a departure of the peer; ours stores lambda)
    assert all(torch.allclose(layer[1].gamma + float(layer[1].unit_offset), torch.full((16,), layerscale_init(depth)),
                              rtol=0, atol=1.2e-7) for layer in dec.layers)
    _compare_decoder(model, dec)


@pytest.mark.parametrize("depth", [1, 3])
def test_peer_xtransformers_keel(depth):
    """x-transformers' Decoder(pre_and_post_norm=True, scale_residual_constant=2L): LN(2L x + F(LN x)), no
    final norm (pre_and_post_norm drops it)."""
    xt = _xt()
    model = _peer_model("keel", depth)
    dec = xt.Decoder(dim=16, depth=depth, heads=2, attn_dim_head=8, ff_no_bias=True, pre_and_post_norm=True,
                     scale_residual_constant=keel_alpha(depth))
    _compare_decoder(model, dec)


def test_peer_xtransformers_normformer_head_scale_and_ffn_ln():
    """NormFormer's two branch changes against x-transformers' Attention(head_scale) and
    FeedForward(post_act_ln). Its post-attention LN is ours' out_norm (the equation test): x-transformers
    only has it as sandwich_norm, which also norms the FFN output (NormFormer does not)."""
    xt = _xt()
    model = _peer_model("normformer", 1)
    attn, mlp = model.blocks[0].attn.branch, model.blocks[0].mlp.branch
    peer_attn = xt.Attention(16, heads=2, dim_head=8, causal=True, flash=False, head_scale=True)
    peer_ff = xt.FeedForward(16, mult=4, post_act_ln=True, no_bias=True)
    x = torch.randn(B, 8, 16, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        _port_attention(attn, peer_attn)
        peer_attn.head_scale_params.copy_(attn.head_scale.view(1, 2, 1, 1))
        _port_ff(mlp, peer_ff)
        peer_ff.ff[1].gamma.copy_(mlp.inner_norm.weight - float(peer_ff.ff[1].unit_offset))
        torch.testing.assert_close(attn(x), peer_attn(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp(x), peer_ff(x), rtol=1e-5, atol=1e-5)
    assert isinstance(mlp, MLP)
