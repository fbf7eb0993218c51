"""Each variant's forward against its paper's equation, and its initialisation.

The reference implementation below is written independently of resnorm.model: attention with an
explicit causal mask and softmax, LayerNorm/RMSNorm from their formulas, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose
from resnorm.model import build_model
from resnorm.variants import VARIANTS, deepnorm_alpha, deepnorm_beta

D, H, T, B = 8, 2, 5, 3


def ref_layernorm(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_rmsnorm(x, norm):
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def ref_norm(x, norm):
    return ref_rmsnorm(x, norm) if isinstance(norm, torch.nn.RMSNorm) else ref_layernorm(x, norm)


def ref_attention(x, attn):
    b, t, d = x.shape
    hd = d // H
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (z.view(b, t, H, hd).transpose(1, 2) for z in qkv.split(d, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    weights = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(b, t, d)
    return y @ attn.out.weight.T + attn.out.bias


def ref_mlp(x, mlp):
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return h @ mlp.fc2.weight.T + mlp.fc2.bias


EQUATIONS = {
    # name: (x, sublayer module, branch function) -> next x, written as in the papers
    "post": lambda x, s, f: ref_layernorm(x + f(x), s.sum_norm),
    "pre": lambda x, s, f: x + f(ref_layernorm(x, s.pre_norm)),
    "rmsnorm": lambda x, s, f: x + f(ref_rmsnorm(x, s.pre_norm)),
    "noresidual": lambda x, s, f: f(ref_layernorm(x, s.pre_norm)),
    # depth is read from the closure below: alpha = (2N)^(1/4)
    "deepnorm": lambda x, s, f, depth=None: ref_layernorm(deepnorm_alpha(depth) * x + f(x), s.sum_norm),
}


def tiny_model(norm: str, depth: int, seed: int = 0):
    cfg = compose(f"model.norm={norm}", f"depth={depth}", f"model.d_model={D}", f"model.n_heads={H}",
                  f"train.seq_len={T}")
    torch.manual_seed(seed)
    model = build_model(cfg).double()
    # random (not identity) norm gains and biases, so a misplaced norm cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def reference_hidden(model, idx, norm):
    depth = model.shape.depth
    x = model.tok_emb.weight[idx] + model.pos_emb.weight[: idx.shape[1]]
    step = EQUATIONS[norm]
    for block in model.blocks:
        for sub, fn in ((block.attn, ref_attention), (block.mlp, ref_mlp)):
            branch = lambda h, sub=sub, fn=fn: fn(h, sub.branch)  # noqa: E731
            x = step(x, sub, branch, depth=depth) if norm == "deepnorm" else step(x, sub, branch)
    if model.final_norm is not None:
        x = ref_norm(x, model.final_norm)
    return x


def test_every_registered_variant_has_an_equation_test():
    assert set(VARIANTS) <= set(EQUATIONS), f"add the equation of {set(VARIANTS) - set(EQUATIONS)} here"


@pytest.mark.parametrize("norm", sorted(EQUATIONS))
@pytest.mark.parametrize("depth", [1, 2])
def test_forward_matches_equation(norm, depth):
    model = tiny_model(norm, depth)
    idx = torch.randint(256, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.hidden(idx)
        want = reference_hidden(model, idx, norm)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("norm,final", [("post", False), ("pre", True), ("rmsnorm", True),
                                        ("deepnorm", False), ("noresidual", True)])
def test_final_norm_and_norm_layer(norm, final):
    model = tiny_model(norm, 2)
    assert (model.final_norm is not None) == final
    norm_cls = torch.nn.RMSNorm if norm == "rmsnorm" else torch.nn.LayerNorm
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
    assert norms and all(isinstance(m, norm_cls) for m in norms)


def test_deepnorm_constants_decoder_only():
    for n in (1, 6, 48, 100):
        assert deepnorm_alpha(n) == pytest.approx((2 * n) ** 0.25)
        assert deepnorm_beta(n) == pytest.approx((8 * n) ** -0.25)
    assert deepnorm_alpha(6) == pytest.approx(1.8612097182)
    assert deepnorm_beta(6) == pytest.approx(0.3799178428)  # 48^(-1/4)


def _std_ratio(model, pick):
    """Measured std of a weight group divided by Xavier-normal's std for its shape."""
    ratios = []
    for block in model.blocks:
        w = pick(block)
        fan_out, fan_in = w.shape
        ratios.append(w.std().item() / math.sqrt(2.0 / (fan_in + fan_out)))
    return sum(ratios) / len(ratios)


@pytest.mark.parametrize("depth", [6, 24])
def test_deepnorm_init_scales_value_output_and_mlp_by_beta(depth):
    d = 64
    cfg = compose("model.norm=deepnorm", f"depth={depth}", f"model.d_model={d}", "model.n_heads=4")
    torch.manual_seed(0)
    model = build_model(cfg)
    beta = deepnorm_beta(depth)
    picks = {
        "v": lambda b: b.attn.branch.qkv.weight[2 * d:],
        "out": lambda b: b.attn.branch.out.weight,
        "fc1": lambda b: b.mlp.branch.fc1.weight,
        "fc2": lambda b: b.mlp.branch.fc2.weight,
    }
    for name, pick in picks.items():
        assert _std_ratio(model, pick) == pytest.approx(beta, rel=0.05), name
    for name, pick in {"q": lambda b: b.attn.branch.qkv.weight[:d], "k": lambda b: b.attn.branch.qkv.weight[d:2 * d]}.items():
        assert _std_ratio(model, pick) == pytest.approx(1.0, rel=0.05), name
    alphas = [sub.spec.skip_scale for b in model.blocks for sub in (b.attn, b.mlp)]
    assert alphas == pytest.approx([deepnorm_alpha(depth)] * 2 * depth)


@pytest.mark.parametrize("norm", ["post", "pre", "rmsnorm", "noresidual"])
def test_xavier_init_is_the_papers(norm):
    d = 64
    cfg = compose(f"model.norm={norm}", "depth=6", f"model.d_model={d}", "model.n_heads=4")
    torch.manual_seed(0)
    model = build_model(cfg)
    for pick in (lambda b: b.attn.branch.qkv.weight[:d], lambda b: b.attn.branch.qkv.weight[2 * d:],
                 lambda b: b.attn.branch.out.weight, lambda b: b.mlp.branch.fc1.weight,
                 lambda b: b.mlp.branch.fc2.weight):
        assert _std_ratio(model, pick) == pytest.approx(1.0, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert all((b.attn.branch.qkv.bias == 0).all() for b in model.blocks)


def test_gpt2_init_is_selectable_and_different():
    d, depth = 64, 6
    cfg = compose("model.init=gpt2", f"depth={depth}", f"model.d_model={d}", "model.n_heads=4")
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.blocks[0].mlp.branch.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.branch.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * depth), rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_norm_layer_override_swaps_the_norm():
    cfg = compose("model.norm=pre", "model.norm_layer=rmsnorm", "depth=2", "model.d_model=16")
    model = build_model(cfg)
    assert isinstance(model.blocks[0].attn.pre_norm, torch.nn.RMSNorm)
    assert isinstance(model.final_norm, torch.nn.RMSNorm)
