"""Peers: ``reordered`` and ``ngpt`` against OLMo-core's own blocks (ai2-olmo-core 3.0.0).

The weights of resnorm's blocks are ported into OLMo-core's ``ReorderedNormTransformerBlock`` (OLMo 2's
``x + RMSNorm(F(x))`` with QK-norm over the flattened heads) and ``NormalizedTransformerBlock`` (nGPT, with
``NormalizedAttention`` and ``NormalizedFeedForward``), and a stack of blocks is run on the same hidden
states: in float32 to 1e-5; the reordered blocks also in float64, to 1e-12 (OLMo-core's RMSNorm with
``full_precision=False``, else it computes in float32). nGPT runs in float32 only: OLMo-core's
``l2_normalize`` asks ``vector_norm`` for a float32 result, which raises on a float64 input.

Compared where the two agree (docs/variants.md, "Peer differences: OLMo-core"): the blocks on given hidden
states, since resnorm has learned absolute positions and OLMo-core RoPE (built here with ``rope=None``);
the reordered block's feed-forward is resnorm's own GELU MLP placed in OLMo-core's block (OLMo-core's
FeedForward is SwiGLU only). The departures are pinned by tests that fail if either side changes:
nGPT's q/k L2-norm per head (resnorm, the paper) vs over d_model (OLMo-core), OLMo-core's RMSNorm bias (on by default) and OLMo 2's epsilon 1e-6 (resnorm's default 1e-5).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose
from resnorm.model.transformer import build_model
from resnorm.model.ngpt import Scaled, ngpt_stream

pytest.importorskip(
    "olmo_core.nn.transformer.config",
    reason="the OLMo-core peer: scripts/setup.sh's `pip install --no-deps ai2-olmo-core==3.0.0 ...` (peers extra)")
from olmo_core.nn.attention import AttentionConfig  # noqa: E402
from olmo_core.nn.feed_forward import FeedForwardConfig  # noqa: E402
from olmo_core.nn.layer_norm import LayerNormConfig  # noqa: E402

D, T, B, DEPTH = 16, 6, 3, 2
OLMO2_EPS = 1e-6  # OLMo 2's layer_norm_eps (olmo_core TransformerConfig.olmo2_*)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def resnorm_model(norm, *overrides, heads=2):
    cfg = compose(f"model.norm={norm}", f"depth={DEPTH}", f"model.d_model={D}", f"model.n_heads={heads}",
                  f"train.seq_len={T}", "data=synthetic", "data.synthetic_tokens=3000", *overrides)
    torch.manual_seed(0)
    return build_model(cfg)


def max_err(a, b):
    return (a - b).abs().max().item()


# --- reordered: OLMo 2's block ------------------------------------------------------------------------

OLMO2 = ("model.qk_norm=true", "model.qk_norm_axis=flat", "model.qk_norm_kind=rmsnorm", f"model.norm_eps={OLMO2_EPS}")


@torch.no_grad()
def randomise(model):
    """Random norm gains and biases, so a missing or misplaced one cannot hide behind its init value."""
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))


@torch.no_grad()
def port_reordered(ours, theirs):
    """resnorm's Block (fused qkv, flat q/k RMSNorm, out-norms) -> OLMo-core's block; its feed-forward
    becomes resnorm's MLP itself (OLMo-core has no non-gated FFN)."""
    a, o = ours.attn.branch, theirs.attention
    for i, lin in enumerate((o.w_q, o.w_k, o.w_v)):
        lin.weight.copy_(a.qkv.weight[i * D:(i + 1) * D])
        if a.qkv.bias is not None:
            lin.bias.copy_(a.qkv.bias[i * D:(i + 1) * D])
    o.w_out.load_state_dict(a.out.state_dict())
    o.q_norm.weight.copy_(a.q_norm.weight)
    o.k_norm.weight.copy_(a.k_norm.weight)
    theirs.attention_norm.weight.copy_(ours.attn.out_norm.weight)
    theirs.feed_forward_norm.weight.copy_(ours.mlp.out_norm.weight)
    theirs.feed_forward = ours.mlp.branch


def reordered_configs(dtype, bias, eps):
    from olmo_core.nn.transformer.config import TransformerBlockConfig

    # float64: full_precision=False, or OLMo-core's RMSNorm computes in float32 (x.float())
    norm = LayerNormConfig(name="rms", eps=eps, bias=False, full_precision=dtype == torch.float32)
    attn = AttentionConfig(n_heads=2, bias=bias, qk_norm=norm, rope=None)
    block = TransformerBlockConfig(name="reordered_norm", sequence_mixer=attn, layer_norm=norm,
                                   feed_forward=FeedForwardConfig(hidden_size=4 * D, bias=False))
    return block, norm


def reordered_pair(dtype, bias, eps=OLMO2_EPS, theirs=None):
    model = resnorm_model("reordered", *OLMO2, f"model.bias={str(bias).lower()}").to(dtype)
    randomise(model)
    if theirs is None:
        block, _ = reordered_configs(dtype, bias, eps)
        theirs = [block.build(d_model=D, block_idx=i, n_layers=DEPTH) for i in range(DEPTH)]
    for ours_b, theirs_b in zip(model.blocks, theirs):
        theirs_b.to(dtype)
        port_reordered(ours_b, theirs_b)
    return model, theirs


def run_both(model, theirs, x):
    y_ours = x
    for block in model.blocks:
        y_ours = block(y_ours)
    y_theirs = x
    for block in theirs:
        y_theirs = block(y_theirs)
    return y_ours, y_theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_peer_olmo_reordered_blocks(dtype, bias):
    model, theirs = reordered_pair(dtype, bias)
    torch.manual_seed(1)
    x = torch.randn(B, T, D, dtype=dtype)
    with torch.no_grad():
        ours, ref = run_both(model, theirs, x)
    assert max_err(ours, ref) <= TOL[dtype]


def test_peer_olmo_reordered_model_logits_with_positions_off():
    """Token ids to logits against OLMo-core's ``Transformer`` of reordered-norm blocks (rope=None, each
    block's feed-forward resnorm's MLP) whose ``LMHead`` has the final RMSNorm: resnorm's position
    embedding zeroed, so both start from E_tok[x]."""
    from olmo_core.nn.lm_head import LMHeadConfig
    from olmo_core.nn.transformer.config import TransformerConfig

    block, norm = reordered_configs(torch.float32, False, OLMO2_EPS)
    vocab = compose().model.vocab_size
    theirs = TransformerConfig(name="default", d_model=D, vocab_size=vocab, n_layers=DEPTH, block=block,
                               lm_head=LMHeadConfig(layer_norm=norm, bias=False)).build()
    model, _ = reordered_pair(torch.float32, False, theirs=list(theirs.blocks.values()))
    assert model.head.weight.shape[0] == vocab
    with torch.no_grad():
        model.pos_emb.weight.zero_()
        theirs.embeddings.weight.copy_(model.tok_emb.weight)
        theirs.lm_head.norm.weight.copy_(model.final_norm.weight)
        theirs.lm_head.w_out.weight.copy_(model.head.weight)
        idx = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(2))
        ours, ref = model(idx), theirs(idx)
    assert ref.shape == ours.shape == (B, T, vocab)
    assert max_err(ours, ref) <= 1e-5


def test_peer_olmo_reordered_departures_rmsnorm_bias_and_eps():
    """OLMo-core's RMSNorm has a bias unless told otherwise (OLMo 2's configs set bias=False; resnorm's
    RMSNorm has none), and OLMo 2's epsilon is 1e-6 (resnorm's model.norm_eps default 1e-5)."""
    from olmo_core.nn.layer_norm import RMSNorm

    assert RMSNorm(size=D).bias is not None and isinstance(LayerNormConfig(name="rms").build(D).bias, torch.nn.Parameter)
    assert compose().model.norm_eps == 1e-5
    model, theirs = reordered_pair(torch.float64, False, eps=1e-5)  # OLMo-core at 1e-5, resnorm at 1e-6
    x = torch.randn(B, T, D, dtype=torch.float64) * 1e-3  # small inputs: epsilon matters
    with torch.no_grad():
        ours, ref = run_both(model, theirs, x)
    assert max_err(ours, ref) > 1e-6


# --- nGPT ---------------------------------------------------------------------------------------------

def ngpt_model(dtype, heads):
    model = resnorm_model("ngpt", heads=heads).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Scaled):  # random effective scales
                m.p.copy_(m.scale * (0.5 + torch.rand_like(m.p)))
    return model


def ngpt_block_config(model, heads):
    from olmo_core.nn.transformer.config import TransformerBlockConfig

    hidden = model.blocks[0].mlp.branch.fc2.weight.shape[1]
    attn = AttentionConfig(name="normalized", n_heads=heads, qk_norm=LayerNormConfig(name="l2_norm"), rope=None)
    return TransformerBlockConfig(name="normalized", sequence_mixer=attn,
                                  feed_forward=FeedForwardConfig(name="normalized", hidden_size=hidden))


def ngpt_olmo(model, dtype, heads, theirs=None):
    if theirs is None:
        theirs = [ngpt_block_config(model, heads).build(d_model=D, block_idx=i, n_layers=DEPTH) for i in range(DEPTH)]
    for layer, (ours_b, theirs_b) in enumerate(zip(model.blocks, theirs)):
        theirs_b.to(dtype)
        port_ngpt(ours_b, theirs_b, model.stream_params.alpha[2 * layer], model.stream_params.alpha[2 * layer + 1])
    return theirs


@torch.no_grad()
def port_ngpt(ours, theirs, alpha_a, alpha_m):
    """Effective values are ported (each side stores its own init/scale): s_qk -> sq and sk (resnorm ties
    them); W_1 = [u; v] -> w3 (u), w1 (v); s_u -> sw3, s_v -> sw1; alpha -> attn_alpha / mlp_alpha."""
    a, o = ours.attn.branch, theirs.attention
    for i, lin in enumerate((o.w_q, o.w_k, o.w_v)):
        lin.weight.copy_(a.qkv.weight[i * D:(i + 1) * D])
    o.w_out.weight.copy_(a.out.weight)
    s_qk = a.s_qk()
    o.sq.copy_(s_qk * o.sq_init_scaling / o.sq_init_value)
    o.sk.copy_(s_qk * o.sk_init_scaling / o.sk_init_value)
    m, f = ours.mlp.branch, theirs.feed_forward
    u, v = m.fc1.weight.chunk(2, dim=0)
    f.w3.weight.copy_(u)
    f.w1.weight.copy_(v)
    f.w2.weight.copy_(m.fc2.weight)
    f.sw3.copy_(m.s_u() * f.sw_init_scaling / f.sw_init_value)
    f.sw1.copy_(m.s_v() * f.sw_init_scaling / f.sw_init_value)  # OLMo-core multiplies by sqrt(d) itself
    theirs.attn_alpha.copy_(alpha_a() * theirs.attn_alpha_init_scaling / theirs.attn_alpha_init_value)
    theirs.mlp_alpha.copy_(alpha_m() * theirs.mlp_alpha_init_scaling / theirs.mlp_alpha_init_value)


class PerHeadL2(torch.nn.Module):
    """An L2 norm of each head's slice of a (B, T, H * d_head) tensor: resnorm's (and the paper's) q/k norm."""

    def __init__(self, heads):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        z = x.view(b, t, self.heads, d // self.heads)
        return (z / z.norm(dim=-1, keepdim=True)).view(b, t, d)


def ngpt_run(model, theirs, dtype, seed=1):
    torch.manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(B, T, D, dtype=dtype), dim=-1)
    with torch.no_grad():
        ours = ngpt_stream(model, x, None)
        ref = x
        for block in theirs:
            ref = block(ref)
    return ours, ref


def test_peer_olmo_ngpt_blocks_one_head(dtype=torch.float32):
    """One head: OLMo-core's q/k norm over d_model is the per-head norm, and the blocks agree."""
    model = ngpt_model(dtype, heads=1)
    ours, ref = ngpt_run(model, ngpt_olmo(model, dtype, 1), dtype)
    assert max_err(ours, ref) <= 1e-5


def test_peer_olmo_ngpt_blocks_two_heads_differ_only_by_the_qk_norm_axis(dtype=torch.float32):
    """Two heads: OLMo-core L2-normalises q and k over all heads at once (its L2Norm on (B, T, d_model),
    before the split), resnorm per head (the paper, §2.3.2). With OLMo-core's q/k norm swapped for a
    per-head L2 norm the blocks agree, so that is the only difference."""
    model = ngpt_model(dtype, heads=2)
    theirs = ngpt_olmo(model, dtype, 2)
    ours, ref = ngpt_run(model, theirs, dtype)
    assert max_err(ours, ref) > 1e-3
    for block in theirs:
        block.attention.q_norm = PerHeadL2(2)
        block.attention.k_norm = PerHeadL2(2)
    ours, ref = ngpt_run(model, theirs, dtype)
    assert max_err(ours, ref) <= 1e-5


def test_peer_olmo_ngpt_model_logits_with_positions_off():
    """The whole model, token ids to logits, against OLMo-core's ``NormalizedTransformer`` (rope=None) with
    resnorm's position embedding zeroed: h_0 = Norm(E_tok[x]) is OLMo-core's E[x] (unit rows), then the
    blocks, then z = s_z (E_out h) (``NormalizedLMHead``). One head (see the qk-norm axis test)."""
    from olmo_core.nn.lm_head import LMHeadConfig
    from olmo_core.nn.transformer.config import TransformerConfig

    model = ngpt_model(torch.float32, heads=1)
    vocab = model.head.weight.shape[0]
    theirs = TransformerConfig(name="normalized", d_model=D, vocab_size=vocab, n_layers=DEPTH,
                               block=ngpt_block_config(model, 1), lm_head=LMHeadConfig(name="normalized")).build()
    with torch.no_grad():
        model.pos_emb.weight.zero_()
        model.head.s_z.p.copy_(model.head.s_z.scale * (0.5 + torch.rand_like(model.head.s_z.p)))
        theirs.embeddings.weight.copy_(model.tok_emb.weight)
        theirs.lm_head.w_out.weight.copy_(model.head.weight)
        head = theirs.lm_head
        head.sz.copy_(model.head.s_z() * head.sz_init_scaling / head.sz_init_value)
    ngpt_olmo(model, torch.float32, 1, theirs=list(theirs.blocks.values()))
    idx = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, ref = model(idx), theirs(idx)
    assert ref.shape == ours.shape == (B, T, vocab)
    assert max_err(ours, ref) <= 1e-5


def test_peer_olmo_ngpt_steps_by_abs_alpha_as_olmo_core():
    """OLMo-core steps by |alpha| (torch.lerp with .abs()), as the authors' code (NVIDIA/ngpt) and resnorm;
    with a third of alpha_A's channels negative the blocks still agree; a port of alpha_M into alpha_A does not."""
    model = ngpt_model(torch.float32, heads=1)
    with torch.no_grad():
        model.stream_params.alpha[0].p[: D // 3].mul_(-1.0)
    theirs = ngpt_olmo(model, torch.float32, 1)
    ours, ref = ngpt_run(model, theirs, torch.float32)
    assert max_err(ours, ref) <= 1e-5
    with torch.no_grad():
        theirs[0].attn_alpha.copy_(theirs[0].mlp_alpha)  # the wrong port
    ours, ref = ngpt_run(model, theirs, torch.float32)
    assert max_err(ours, ref) > 1e-3


def test_peer_olmo_ngpt_init_values_agree():
    """The effective initial scales: alpha 0.05 (stored 1/sqrt(d)), s_qk 1 (stored 1/sqrt(d)), s_u = s_v = 1
    (stored 1); OLMo-core's reset_parameters give the same effective values and storage."""
    model = resnorm_model("ngpt", heads=2)
    theirs = ngpt_block_config(model, 2).build(d_model=D, block_idx=0, n_layers=DEPTH)  # fresh, not ported
    alpha = model.stream_params.alpha[0]
    assert torch.allclose(alpha.p, theirs.attn_alpha) and torch.allclose(alpha(), torch.full((D,), 0.05))
    assert torch.allclose(theirs.mlp_alpha * theirs.mlp_alpha_init_value / theirs.mlp_alpha_init_scaling, alpha())
    a = model.blocks[0].attn.branch.s_qk
    assert torch.allclose(a.p, theirs.attention.sq) and torch.allclose(a.p, theirs.attention.sk)
    assert math.isclose(model.blocks[0].attn.branch.softmax_scale, theirs.attention.backend.scale)
    m = model.blocks[0].mlp.branch
    assert torch.allclose(m.s_u.p, theirs.feed_forward.sw3) and torch.allclose(m.s_v.p, theirs.feed_forward.sw1)


def test_peer_olmo_ngpt_has_no_float64():
    """Why the nGPT comparisons are float32 only: OLMo-core's l2_normalize raises on float64 input."""
    from olmo_core.nn.functional import l2_normalize

    with pytest.raises(RuntimeError, match="narrowing"):
        l2_normalize(torch.ones(2, D, dtype=torch.float64))
