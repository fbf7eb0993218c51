"""The model options every variant can use, each held to its paper's equation.

- ``model.attn_gate``: gated attention, Qiu et al. 2025 (arXiv:2505.06708, eq. (5)):
  ``Y' = Y * sigmoid(X W_theta)``, the SDPA output Y (heads concatenated), elementwise and head
  specific, X the attention sublayer's (pre-normed) input, before the output projection.
- ``model.attn_softcap`` / ``model.logit_softcap``: Gemma 2 (arXiv:2408.00118 §2, "Logit
  soft-capping"): ``logits <- C * tanh(logits / C)`` on the attention logits (before the softmax) and
  on the final logits.
- ``model.qk_norm_axis`` / ``model.qk_norm_kind``: qk-norm per head (Wortsman et al. 2023) or over the
  flattened heads (OLMo 2, arXiv:2501.00656: one norm of size d_model on q and one on k), LayerNorm or
  RMSNorm.
- ``model.norm_layer=derf``: Chen et al. 2025 (arXiv:2512.10938): ``gamma * erf(alpha * x + s) + beta``.

The references below are written from those equations, in float64, reading only parameter values
from the model. The ``peer`` tests (``pytest -k peer``) port the weights into x-transformers' own
modules and compare outputs in float32 (1e-5); they are skipped when x-transformers is not installed
(``pip install --no-deps x-transformers==2.31.10 einops einx loguru frozendict torch-einops-utils``,
scripts/setup.sh does it).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from conftest import compose
from resnorm.config.rules import allowed
from resnorm.config.schema import QK_NORM_AXES, QK_NORM_KINDS, leaf
from resnorm.train.preflight import validate
from resnorm.errors import ConfigError
from resnorm.model.blocks import QK_NORMS, Attention, SoftcapLinear
from resnorm.model.transformer import build_model
from resnorm.model.norms import NORM_FACTORIES, NORM_TYPES, Derf
from resnorm.config.variants import NORM_LAYERS, VARIANTS

D, H, T, B = 16, 2, 6, 3
SMALL = ("model.d_model=16", "model.n_heads=2", "depth=2", "train.seq_len=16", "data=synthetic",
         "data.synthetic_tokens=3000")


pytestmark = pytest.mark.usefixtures("one_thread")


def small(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(compose(*SMALL, *overrides))


def randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter drawn at random (norm gains and biases too, so that they matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)


# --- the reference, from the papers --------------------------------------------------------------

def ref_norm(x, norm, kind):
    """LayerNorm (x - mean) / sqrt(var + eps) * g + b, or RMSNorm x / sqrt(mean(x^2) + eps) * g."""
    if kind == "layernorm":
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + norm.eps) * norm.weight + norm.bias
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def ref_attention(x, attn, cap=None, gate=False, qk=None):
    """Causal attention, explicit mask and softmax; ``qk=(axis, kind)``; Gemma 2's cap on the logits;
    Qiu et al.'s gate sigmoid(x W_g + b_g) on the concatenated head outputs."""
    b, t, d = x.shape
    hd = d // attn.n_heads
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(d, dim=-1)
    if qk and qk[0] == "flat":  # OLMo 2: one norm over d_model on q, one on k, before the split
        q, k = ref_norm(q, attn.q_norm, qk[1]), ref_norm(k, attn.k_norm, qk[1])
    q, k, v = (z.reshape(b, t, attn.n_heads, hd).transpose(1, 2) for z in (q, k, v))
    if qk and qk[0] == "head":
        q, k = ref_norm(q, attn.q_norm, qk[1]), ref_norm(k, attn.k_norm, qk[1])
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1), float("-inf"))
    y = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
    if gate:
        y = y * torch.sigmoid(x @ attn.gate.weight.T + attn.gate.bias)
    return y @ attn.out.weight.T + attn.out.bias


def ref_derf(x, norm):
    """gamma * erf(alpha * x + s) + beta, erf from math (not torch)."""
    z = (norm.alpha * x + norm.shift).detach()
    erf = torch.tensor([math.erf(v) for v in z.flatten().tolist()], dtype=x.dtype).view_as(x)
    return erf * norm.weight + norm.bias


# --- registries and config ------------------------------------------------------------------------

def test_choices_equal_the_registries():
    assert allowed(leaf("model.norm_layer")) == tuple(NORM_FACTORIES) == NORM_LAYERS
    assert "derf" in NORM_LAYERS and Derf in NORM_TYPES
    assert leaf("model.qk_norm_kind").choices == QK_NORM_KINDS == tuple(QK_NORMS)
    assert leaf("model.qk_norm_axis").choices == QK_NORM_AXES == ("head", "flat")


@pytest.mark.parametrize("overrides,key,reason", [
    (["model.attn_softcap=0"], "model.attn_softcap", "positive"),
    (["model.attn_softcap=-30"], "model.attn_softcap", "positive"),
    (["model.logit_softcap=inf"], "model.logit_softcap", "finite"),
    (["model.qk_norm_axis=channel"], "model.qk_norm_axis", "head, flat"),
    (["model.qk_norm_kind=scalenorm"], "model.qk_norm_kind", "layernorm, rmsnorm"),
    (["model.derf_alpha0=0"], "model.derf_alpha0", "positive"),
])
def test_bad_option_values_are_one_line_errors(overrides, key, reason):
    with pytest.raises(ConfigError) as err:
        validate(compose(*overrides))
    assert key in str(err.value) and reason in str(err.value)


def test_defaults_are_off():
    m = compose().model
    assert (m.attn_gate, m.attn_softcap, m.logit_softcap, m.qk_norm_axis, m.qk_norm_kind, m.derf_alpha0) == \
        (False, None, None, "head", "layernorm", 0.5)
    validate(compose("model.attn_softcap=50", "model.logit_softcap=30", "model.attn_gate=true"))


# --- the defaults leave the model unchanged ---------------------------------------------------------

# model(idx) of the default config at depth 2 (seq_len 16), seed 0, computed at the merge base
# e7c9831 (before these options existed); the same code gives them bit for bit on the 2-core machine.
PINNED_FIRST = ["-0x1.d5e2460000000p-4", "-0x1.df95ce0000000p-1", "-0x1.87f9c40000000p-1", "0x1.4b93e40000000p-2"]
PINNED_LAST = [1.0923126935958862, 0.7044957876205444, -0.6955733895301819]
PINNED_SUM = -313.1877314695448


def test_default_model_is_unchanged():
    torch.manual_seed(0)
    model = build_model(compose("depth=2", "data=synthetic", "train.seq_len=16"))
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(idx)
    first = torch.tensor([float.fromhex(h) for h in PINNED_FIRST])
    torch.testing.assert_close(out[0, 0, :4].double(), first.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1, -1, -3:].double(), torch.tensor(PINNED_LAST, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    assert out.double().sum().item() == pytest.approx(PINNED_SUM, rel=1e-6)
    attn = model.blocks[0].attn.branch
    assert attn.gate is None and attn.softcap is None and attn.q_norm is None
    assert type(model.head) is torch.nn.Linear
    assert not any(isinstance(m, Derf) for m in model.modules())


def test_qk_norm_default_is_layernorm_per_head():
    attn = small("model.qk_norm=true").blocks[0].attn.branch
    assert type(attn.q_norm) is torch.nn.LayerNorm and attn.q_norm.normalized_shape == (D // H,)


# --- each option against its equation (float64) ----------------------------------------------------

@pytest.mark.parametrize("overrides,cap,gate,qk", [
    (["model.attn_gate=true"], None, True, None),
    (["model.attn_softcap=1.5"], 1.5, False, None),
    (["model.qk_norm=true", "model.qk_norm_axis=flat"], None, False, ("flat", "layernorm")),
    (["model.qk_norm=true", "model.qk_norm_axis=flat", "model.qk_norm_kind=rmsnorm"], None, False, ("flat", "rmsnorm")),
    (["model.qk_norm=true", "model.qk_norm_kind=rmsnorm"], None, False, ("head", "rmsnorm")),
    (["model.qk_norm=true"], None, False, ("head", "layernorm")),
    (["model.attn_gate=true", "model.attn_softcap=2", "model.qk_norm=true", "model.qk_norm_axis=flat",
      "model.qk_norm_kind=rmsnorm"], 2.0, True, ("flat", "rmsnorm")),
])
def test_attention_options_match_their_equations(overrides, cap, gate, qk):
    attn = small(*overrides).blocks[0].attn.branch.double()
    randomise(attn)
    x = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref_attention(x, attn, cap, gate, qk), rtol=1e-10, atol=1e-10)
        probs = attn.attention_probs(x)
        assert torch.allclose(probs.sum(-1), torch.ones((), dtype=probs.dtype))


def test_flat_qk_norm_is_one_norm_over_d_model():
    for kind, cls in (("layernorm", torch.nn.LayerNorm), ("rmsnorm", torch.nn.RMSNorm)):
        attn = small("model.qk_norm=true", "model.qk_norm_axis=flat", f"model.qk_norm_kind={kind}").blocks[0].attn.branch
        assert type(attn.q_norm) is cls and attn.q_norm.normalized_shape == (D,)
        attn = attn.double()
        randomise(attn)
        x = torch.randn(B, T, D, dtype=torch.float64)
        q, k, _ = attn._qkv(x)
        q_flat = (x @ attn.qkv.weight.T + attn.qkv.bias)[..., :D]
        by_hand = ref_norm(q_flat, attn.q_norm, kind).view(B, T, H, D // H).transpose(1, 2)
        torch.testing.assert_close(q, by_hand, rtol=1e-12, atol=1e-12)
        # per-head statistics are not normalised, the flattened vector is
        if kind == "rmsnorm":
            flat = q.transpose(1, 2).reshape(B, T, D) / attn.q_norm.weight
            torch.testing.assert_close(flat.pow(2).mean(-1), torch.ones(B, T, dtype=torch.float64), rtol=1e-4, atol=1e-4)


def test_gate_init_follows_the_model_init():
    """W_g is initialised like every linear layer (Xavier-normal by default), b_g = 0, so the gate
    starts near sigmoid(0) = 1/2 up to the input's spread (docs/variants.md)."""
    torch.manual_seed(0)
    model = build_model(compose("model.attn_gate=true", "depth=2", "data=synthetic"))
    g = model.blocks[0].attn.branch.gate
    d = model.shape.d_model
    assert g.weight.shape == (d, d) and (g.bias == 0).all()
    assert g.weight.std().item() == pytest.approx(math.sqrt(2.0 / (2 * d)), rel=0.1)


def test_logit_softcap_is_in_forward_loss_and_evaluation():
    from resnorm.train.loop import evaluate

    model = small("model.logit_softcap=0.7").double()
    assert isinstance(model.head, SoftcapLinear)
    idx = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(3))
    tgt = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        raw = model.hidden(idx) @ model.head.weight.T
        capped = 0.7 * torch.tanh(raw / 0.7)
        torch.testing.assert_close(model(idx), capped, rtol=1e-12, atol=1e-12)
        assert model(idx).abs().max() < 0.7
        ce = F.cross_entropy(capped.reshape(-1, capped.shape[-1]), tgt.reshape(-1))
        torch.testing.assert_close(model.loss(idx, tgt).double(), ce.float().double(), rtol=1e-6, atol=1e-6)
        val = evaluate(model, [(idx, tgt)], torch.device("cpu"), nullcontext)
    assert val == pytest.approx(ce.item(), rel=1e-6)


@pytest.mark.parametrize("key", ["model.attn_softcap", "model.logit_softcap"])
def test_a_huge_cap_equals_no_cap(key):
    torch.manual_seed(0)
    plain = small()
    capped = small(f"{key}=1e6")
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 256, (B, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(capped(idx), plain(idx), rtol=0, atol=1e-6)
        a, b = capped.blocks[0].attn.branch, plain.blocks[0].attn.branch
        x = torch.randn(B, 12, D)
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-6)


def test_gate_and_caps_receive_gradients():
    model = small("model.attn_gate=true", "model.attn_softcap=1.0", "model.logit_softcap=2.0")
    idx = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(6))
    model.loss(idx, idx.roll(-1, 1)).backward()
    for block in model.blocks:
        attn = block.attn.branch
        for p in (attn.gate.weight, attn.gate.bias, attn.qkv.weight, attn.out.weight):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert torch.isfinite(model.head.weight.grad).all() and model.head.weight.grad.abs().sum() > 0
    assert torch.isfinite(model.tok_emb.weight.grad).all() and model.tok_emb.weight.grad.abs().sum() > 0


# --- Derf -----------------------------------------------------------------------------------------

def test_derf_by_hand():
    norm = Derf(D, alpha0=0.5).double()
    assert norm.alpha.shape == norm.shift.shape == (1,) and norm.weight.shape == norm.bias.shape == (D,)
    assert norm.alpha.item() == 0.5 and norm.shift.item() == 0 and (norm.weight == 1).all() and (norm.bias == 0).all()
    randomise(norm)
    x = torch.randn(B, T, D, dtype=torch.float64) * 3
    torch.testing.assert_close(norm(x), ref_derf(x, norm), rtol=1e-12, atol=1e-12)


def test_derf_fills_every_norm_slot_with_alpha0():
    model = small("model.norm=peri", "model.norm_layer=derf", "model.derf_alpha0=0.8")
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    assert len(norms) == 2 * 2 * 2 + 2 and all(isinstance(m, Derf) for m in norms)  # pre+out per sublayer, embed, final
    assert all(m.alpha.item() == pytest.approx(0.8) and m.shift.item() == 0 for m in norms)


@pytest.mark.parametrize("norm", [n for n, v in VARIANTS.items() if v.has_norm])
def test_derf_in_every_variant_with_norms(norm):
    validate(compose(*SMALL, f"model.norm={norm}", "model.norm_layer=derf"))
    model = small(f"model.norm={norm}", "model.norm_layer=derf", "model.admin_mode=closed_form")
    assert any(isinstance(m, Derf) for m in model.modules())
    idx = torch.randint(0, 64, (2, 8))
    model.loss(idx, idx).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- peers: x-transformers' own code (pip install --no-deps x-transformers==2.31.10 + its deps) -------

def _xt():
    return pytest.importorskip("x_transformers.x_transformers",
                               reason="x-transformers is not installed (scripts/setup.sh installs it with --no-deps)")


def test_peer_xtransformers_attention_softcap_and_gate():
    """x-transformers' Attention with softclamp_logits and gate_values (a bias-less d x d gate on x,
    sigmoid, over the merged heads) equals ours with the weights ported (ours without biases)."""
    xt = _xt()
    torch.manual_seed(0)
    for cap, gate in ((3.0, True), (0.5, False), (50.0, True)):
        ours = Attention(D, H, False, gate=gate, softcap=cap)
        randomise(ours)
        peer = xt.Attention(D, heads=H, dim_head=D // H, causal=True, flash=False, softclamp_logits=True,
                            logit_softclamp_value=cap, gate_values=gate)
        with torch.no_grad():
            for name, rows in (("to_q", slice(0, D)), ("to_k", slice(D, 2 * D)), ("to_v", slice(2 * D, 3 * D))):
                getattr(peer, name).weight.copy_(ours.qkv.weight[rows])
            peer.to_out.weight.copy_(ours.out.weight)
            if gate:
                peer.to_v_gate.weight.copy_(ours.gate.weight)
            x = torch.randn(B, 9, D) * 2
            torch.testing.assert_close(ours(x), peer(x), rtol=1e-5, atol=1e-5)


def test_peer_xtransformers_logit_softcap():
    """The head's cap equals x-transformers' softclamp (TransformerWrapper's softclamp_output)."""
    xt = _xt()
    head = SoftcapLinear(D, 40, 30.0)
    randomise(head)
    with torch.no_grad():
        head.weight.mul_(20)  # logits well past the cap
        h = torch.randn(B, T, D)
        torch.testing.assert_close(head(h), xt.softclamp(h @ head.weight.T, 30.0), rtol=1e-5, atol=1e-5)


def test_peer_xtransformers_derf():
    xt = _xt()
    ours = Derf(D, alpha0=0.5)
    peer = xt.Derf(D, init_alpha=0.5)
    x = torch.randn(B, T, D) * 3
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), rtol=1e-5, atol=1e-5)  # same init
        randomise(ours)
        peer.alpha.copy_(ours.alpha[0])
        peer.s.copy_(ours.shift[0])
        peer.gamma.copy_(ours.weight)
        peer.beta.copy_(ours.bias)
        torch.testing.assert_close(ours(x), peer(x), rtol=1e-5, atol=1e-5)
