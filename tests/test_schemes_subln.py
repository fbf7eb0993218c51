"""Sub-LN (``subln``; Wang et al. 2022, "Foundation Transformers" (Magneto), arXiv:2210.06423).

Pre-LN plus a LayerNorm inside each branch: on the concatenated heads before the attention's output
projection, and after the FFN's activation before its second linear layer; a final LN; v, out, fc1 and
fc2 initialised with Magneto's gain sqrt(log 2N). The reference below is written from those equations
in float64 (tests/test_variants.py's attention, MLP and norm formulas); the ``peer`` tests port the
weights into torchscale 0.3.0's own ``EncoderLayer`` / ``DecoderLayer`` (``subln=True``) and ``Decoder``,
in float32 (1e-5) and float64 (1e-12). torchscale imports fairscale and timm at module level for
paths these tests do not take (activation checkpointing, FSDP, drop-path): they are stubbed. It casts
the softmax and the activation to float32: for float64 those two casts are lifted from its own source
(the rest of its forward runs as shipped).
"""

from __future__ import annotations

import inspect
import math
import sys
import textwrap
import types

import pytest
import torch

from conftest import compose
from resnorm.model.transformer import build_model
from resnorm.config.variants import VARIANTS, magneto_gain
from test_variants import WEIGHTS, N, _std_ratio, ref_mlp, tiny_model  # noqa: F401

#: the variants this file holds to their papers (tests/test_checklist.py reads it)
NAMES = ("subln",)
D, H, T, B = 8, 2, 5, 3


# --- the reference ------------------------------------------------------------------------------------

def ref_attention_subln(x, attn):
    """softmax(q k^T / sqrt(d_h) + M) v per head, the heads concatenated, LN over d_model, then W_o."""
    b, t, d = x.shape
    hd = d // attn.n_heads
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(d, dim=-1)
    q, k, v = (z.view(b, t, attn.n_heads, hd).transpose(1, 2) for z in (q, k, v))
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    w = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(mask, float("-inf")), dim=-1)
    y = N((w @ v).transpose(1, 2).reshape(b, t, d), attn.inner_norm)
    return y @ attn.out.weight.T + attn.out.bias


def ref_mlp_subln(x, mlp):
    """W_2 LN(GELU(W_1 x))."""
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    h = N(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), mlp.inner_norm)
    return h @ mlp.fc2.weight.T + mlp.fc2.bias


def reference_hidden(model, idx):
    x = model.tok_emb.weight[idx] + model.pos_emb.weight[: idx.shape[1]]
    for block in model.blocks:
        x = x + ref_attention_subln(N(x, block.attn.pre_norm), block.attn.branch)
        x = x + ref_mlp_subln(N(x, block.mlp.pre_norm), block.mlp.branch)
    return N(x, model.final_norm)


def test_registered():
    assert set(NAMES) <= set(VARIANTS)


@pytest.mark.parametrize("depth", [1, 3])
def test_subln_forward_matches_the_papers_equation(depth):
    model, _ = tiny_model("subln", depth)  # random norm gains and biases
    idx = torch.randint(256, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(idx), reference_hidden(model, idx), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("depth", [3, 24])
def test_subln_structure_and_magneto_gain(depth):
    d = 32
    cfg = compose("model.norm=subln", f"depth={depth}", f"model.d_model={d}", "model.n_heads=2", "train.seq_len=16")
    torch.manual_seed(0)
    with torch.no_grad():
        model = build_model(cfg)
    for block in model.blocks:
        a, m = block.attn, block.mlp
        assert a.pre_norm is not None and m.pre_norm is not None and a.out_norm is None and a.sum_norm is None
        assert a.branch.inner_norm.normalized_shape == (d,) and m.branch.inner_norm.normalized_shape == (4 * d,)
    gain = math.sqrt(math.log(2 * depth))
    assert magneto_gain(depth, model.shape.options) == pytest.approx(gain)
    for group in WEIGHTS:
        want = gain if group in ("v", "out", "fc1", "fc2") else 1.0
        assert _std_ratio(model, WEIGHTS[group]) == pytest.approx(want, rel=0.06), group


# --- the peer: torchscale 0.3.0 -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ts():
    """torchscale's architecture modules, with fairscale and timm stubbed (only their names are imported)."""
    pytest.importorskip("torchscale", reason="the Sub-LN peer: scripts/setup.sh's `pip install --no-deps torchscale==0.3.0`")
    stubs = {"fairscale": types.ModuleType("fairscale"), "fairscale.nn": types.ModuleType("fairscale.nn"),
             "timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
             "timm.models.layers": types.ModuleType("timm.models.layers")}
    stubs["fairscale.nn"].checkpoint_wrapper = stubs["fairscale.nn"].wrap = lambda m, *a, **k: m
    stubs["timm.models.layers"].drop_path = None
    saved = {k: sys.modules.get(k) for k in stubs}
    for name, mod in stubs.items():
        sys.modules.setdefault(name, mod)
    from torchscale.architecture import config, decoder, encoder
    from torchscale.component import feedforward_network, multihead_attention

    yield types.SimpleNamespace(config=config, decoder=decoder, encoder=encoder,
                                ffn=feedforward_network, mha=multihead_attention)
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)


def _lifted(cls, name, old, new):
    """``cls.name`` recompiled from torchscale's own source with ``old`` replaced by ``new`` (once)."""
    src = textwrap.dedent(inspect.getsource(getattr(cls, name)))
    assert src.count(old) == 1, (cls.__name__, old)
    scope = dict(vars(sys.modules[cls.__module__]))
    exec(compile(src.replace(old, new), f"<lifted {cls.__name__}.{name}>", "exec"), scope)
    return scope[name]


@pytest.fixture
def lift_casts(ts, monkeypatch):
    """For float64: torchscale's float32 softmax and float32 activation computed in the input's dtype."""
    mha, ffn = ts.mha.MultiheadAttention, ts.ffn.FeedForwardNetwork
    monkeypatch.setattr(mha, "forward", _lifted(mha, "forward", "dtype=torch.float32", "dtype=attn_weights.dtype"))
    monkeypatch.setattr(ffn, "forward", _lifted(ffn, "forward", "self.activation_fn(x.float())", "self.activation_fn(x)"))


def ts_args(ts, depth, vocab, encoder=False):
    kind = "encoder" if encoder else "decoder"
    cfg = ts.config.EncoderConfig if encoder else ts.config.DecoderConfig
    return cfg(**{f"{kind}_embed_dim": D, f"{kind}_attention_heads": H, f"{kind}_ffn_embed_dim": 4 * D,
                  f"{kind}_layers": depth}, subln=True, vocab_size=vocab, activation_fn="gelu",
               no_scale_embedding=True, layernorm_eps=1e-5)


@torch.no_grad()
def port_layer(block, layer):
    """resnorm's Block -> torchscale's EncoderLayer / DecoderLayer (subln)."""
    a, m, o = block.attn.branch, block.mlp.branch, layer.self_attn
    for i, lin in enumerate((o.q_proj, o.k_proj, o.v_proj)):
        lin.weight.copy_(a.qkv.weight[i * D:(i + 1) * D])
        lin.bias.copy_(a.qkv.bias[i * D:(i + 1) * D])
    o.out_proj.load_state_dict(a.out.state_dict())
    o.inner_attn_ln.load_state_dict(a.inner_norm.state_dict())
    layer.self_attn_layer_norm.load_state_dict(block.attn.pre_norm.state_dict())
    layer.final_layer_norm.load_state_dict(block.mlp.pre_norm.state_dict())
    for name in ("fc1", "fc2"):
        getattr(layer.ffn, name).load_state_dict(getattr(m, name).state_dict())
    layer.ffn.ffn_layernorm.load_state_dict(m.inner_norm.state_dict())


def subln_model(dtype, depth, *overrides):
    model, _ = tiny_model("subln", depth, *overrides)
    return model.to(dtype)


DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", DTYPES)
def test_peer_torchscale_subln_decoder_layers(ts, lift_casts, dtype):
    depth = 3
    model = subln_model(dtype, depth)
    args = ts_args(ts, depth, 256)
    layers = [ts.decoder.DecoderLayer(args, depth=i).to(dtype) for i in range(depth)]
    for block, layer in zip(model.blocks, layers):
        port_layer(block, layer)
    x = torch.randn(B, T, D, dtype=dtype, generator=torch.Generator().manual_seed(2))
    mask = torch.triu(torch.full((T, T), float("-inf"), dtype=dtype), 1)  # Decoder.forward's self_attn_mask
    with torch.no_grad():
        ours, ref = x, x
        for block, layer in zip(model.blocks, layers):
            ours = block(ours)
            ref = layer(ref, self_attn_mask=mask)[0]
    assert (ours - ref).abs().max().item() <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_peer_torchscale_subln_encoder_layers(ts, lift_casts, dtype):
    """Bidirectional (resnorm's ``model.objective=mlm``) against torchscale's EncoderLayer."""
    depth = 2
    model = subln_model(dtype, depth, "model.objective=mlm")
    assert not model.blocks[0].attn.branch.causal
    layers = [ts.encoder.EncoderLayer(ts_args(ts, depth, 256, encoder=True), depth=i).to(dtype) for i in range(depth)]
    for block, layer in zip(model.blocks, layers):
        port_layer(block, layer)
    x = torch.randn(B, T, D, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, ref = x, x
        for block, layer in zip(model.blocks, layers):
            ours = block(ours)
            ref = layer(ref, encoder_padding_mask=None)[0]
    assert (ours - ref).abs().max().item() <= TOL[dtype]


class Positions(torch.nn.Module):
    """resnorm's learned absolute positions in the call form torchscale's Decoder uses."""

    def __init__(self, emb):
        super().__init__()
        self.emb = emb

    def forward(self, tokens, incremental_state=None):
        return self.emb(torch.arange(tokens.shape[1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_peer_torchscale_subln_whole_decoder(ts, lift_casts, dtype):
    """Token ids to logits through torchscale's ``Decoder`` (its embedding sum, causal mask, layers, final
    LayerNorm and output projection) with resnorm's weights."""
    depth = 3
    model = subln_model(dtype, depth)
    vocab = model.head.weight.shape[0]
    head = torch.nn.Linear(D, vocab, bias=False).to(dtype)
    emb = torch.nn.Embedding(vocab, D).to(dtype)
    with torch.no_grad():
        head.weight.copy_(model.head.weight)
        emb.weight.copy_(model.tok_emb.weight)
    theirs = ts.decoder.Decoder(ts_args(ts, depth, vocab), embed_tokens=emb, embed_positions=Positions(model.pos_emb),
                                output_projection=head).to(dtype)
    for block, layer in zip(model.blocks, theirs.layers):
        port_layer(block, layer)
    with torch.no_grad():
        theirs.layer_norm.load_state_dict(model.final_norm.state_dict())
        idx = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(3))
        ours, ref = model(idx), theirs(idx)[0]
    assert ref.shape == ours.shape and (ours - ref).abs().max().item() <= TOL[dtype]
    with torch.no_grad():  # the wrong port: the attention's inner LN left at torchscale's init
        for layer in theirs.layers:
            layer.self_attn.inner_attn_ln.reset_parameters()
        assert (model(idx) - theirs(idx)[0]).abs().max().item() > TOL[torch.float32]


def test_peer_torchscale_subln_init_gain(ts):
    """torchscale's subln init multiplies v, out, fc1, fc2 by sqrt(log 2N) (its Decoder.__init__): measured
    as the ratio of the same draws with subln off and on, it is resnorm's magneto_gain."""
    depth = 6
    built = {}
    for subln in (False, True):
        torch.manual_seed(0)
        args = ts_args(ts, depth, 256)
        args.subln = subln
        built[subln] = dict(ts.decoder.Decoder(args).named_parameters())
    ratio = {k: (built[True][k] / built[False][k]).mean().item() for k in built[False] if k.endswith("weight")
             and built[False][k].dim() == 2}
    want = magneto_gain(depth, None)
    for name, r in ratio.items():
        scaled = any(s in name for s in ("fc1", "fc2", "out_proj", "v_proj"))
        assert r == pytest.approx(want if scaled else 1.0, rel=1e-6), name
