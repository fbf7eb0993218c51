"""``ngpt``, ``completep`` and ``derf``, each held to its paper (docs/variants.md).

- ``ngpt`` (Loshchilov et al., arXiv:2410.01131 §2): ``h <- Norm(h + alpha (Norm(F(h)) - h))`` with
  per-dimension alpha; q, k L2-normed per head times s_qk, softmax scale sqrt(d_head); SwiGLU with
  s_u, s_v sqrt(d); logits s_z E h; every matrix unit-norm along d_model, renormalised after every
  optimizer step; trains with no warm-up and no weight decay.
- ``completep`` (Dey et al., arXiv:2505.01618; reference code EleutherAI/nanoGPT-mup@completep):
  ``x <- x + m^-alpha F(LN(x))``, m = L / L_base; the blocks' AdamW LR x m^(alpha-1), eps x m^-alpha.
- ``derf`` (Chen et al., arXiv:2512.10938): Pre-LN with Derf in every norm slot.

The nGPT reference is written from the paper's equations in float64, reading only parameter values;
the ``peer`` test ports the weights into lucidrains' nGPT-pytorch (``Attention``, ``FeedForward``,
``Residual``) and compares in float32. The generic gradient (depth 48), training, save/load and
compile tests of tests/test_variants.py run for all three.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import compose
from resnorm.train.loop import make_optimizer, set_lr
from resnorm.model.transformer import build_model
from resnorm.model.ngpt import Scaled
from resnorm.model.norms import NORM_TYPES, Derf
from resnorm.config.variants import VARIANTS, completep_group_scales, completep_multiplier, get_variant

NAMES = ("ngpt", "completep", "derf")
D, H, T, B = 16, 2, 6, 3
SMALL = ("model.n_heads=2", "data=synthetic", "data.synthetic_tokens=3000")


def small(norm, depth, *overrides, d=D, seed=0):
    cfg = compose(f"model.norm={norm}", f"depth={depth}", f"model.d_model={d}", f"train.seq_len={T}", *SMALL, *overrides)
    torch.manual_seed(seed)
    return build_model(cfg), cfg


def test_every_variant_is_registered():
    assert set(NAMES) <= set(VARIANTS)


# --- nGPT: the float64 reference ----------------------------------------------------------------------

def nrm(x, dim=-1):
    return x / x.norm(dim=dim, keepdim=True)


def eff(s: Scaled):
    return s.p * s.init / s.scale


def ref_attention(h, a):
    b, t, d = h.shape
    hd = d // a.n_heads
    q, k, v = (z.view(b, t, a.n_heads, hd).transpose(1, 2) for z in (h @ a.qkv.weight.T).split(d, dim=-1))
    s = eff(a.s_qk).view(1, a.n_heads, 1, hd)
    q, k = nrm(q) * s, nrm(k) * s  # q <- Norm(q) s_qk, k <- Norm(k) s_qk (per head)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    w = torch.softmax((q @ k.transpose(-1, -2) * math.sqrt(hd)).masked_fill(mask, float("-inf")), dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, t, d) @ a.out.weight.T


def ref_mlp(h, m):
    u, v = (h @ m.fc1.weight.T).chunk(2, dim=-1)
    u, v = u * eff(m.s_u), v * eff(m.s_v) * math.sqrt(h.shape[-1])  # u <- u s_u, v <- v s_v sqrt(d)
    return (u * v * torch.sigmoid(v)) @ m.fc2.weight.T  # u * SiLU(v)


def ref_logits(model, idx):
    h = nrm(model.tok_emb.weight[idx] + model.pos_emb.weight[: idx.shape[1]])
    for block, (a_att, a_mlp) in zip(model.blocks, zip(model.stream_params.alpha[::2], model.stream_params.alpha[1::2])):
        # the step is |alpha| (the authors' code, NVIDIA/ngpt; the paper writes alpha)
        h = nrm(h + eff(a_att).abs() * (nrm(ref_attention(h, block.attn.branch)) - h))
        h = nrm(h + eff(a_mlp).abs() * (nrm(ref_mlp(h, block.mlp.branch)) - h))
    return eff(model.head.s_z) * (h @ model.head.weight.T)


def randomised_ngpt(depth, *overrides):
    model, cfg = small("ngpt", depth, *overrides)
    model = model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Scaled):  # random effective scales, so a dropped or misplaced one cannot hide
                m.p.copy_(m.scale * (0.5 + torch.rand_like(m.p)))
    return model, cfg


@pytest.mark.parametrize("depth", [1, 3])
def test_ngpt_forward_matches_the_papers_equations(depth):
    model, _ = randomised_ngpt(depth)
    idx = torch.randint(256, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref_logits(model, idx), atol=1e-10, rtol=1e-10)


def test_ngpt_hidden_states_stay_on_the_sphere_and_parts_add_up():
    model, _ = randomised_ngpt(3)
    idx = torch.randint(256, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tr = model.trace(idx)
    for p in tr["parts"]:
        torch.testing.assert_close(p.y.norm(dim=-1), torch.ones(B, T, dtype=torch.float64))
        torch.testing.assert_close(p.z, p.x + p.f)
    assert len(tr["parts"]) == 6 and tr["max_logit"].shape == (3,)


def test_ngpt_gate_and_softcaps_apply_on_top():
    """model.attn_gate, attn_softcap and logit_softcap (the "Done when" sweep uses them with ngpt)."""
    model, _ = small("ngpt", 2, "model.attn_gate=true", "model.attn_softcap=0.5", "model.logit_softcap=2")
    a = model.blocks[0].attn.branch
    assert a.gate is not None and a.softcap == 0.5 and a.softmax_scale == math.sqrt(D // H)
    idx = torch.randint(256, (B, T))
    with torch.no_grad():
        logits = model(idx)
        uncapped = model.head.s_z() * torch.nn.functional.linear(model.hidden(idx), model.head.weight)
    torch.testing.assert_close(logits, 2 * torch.tanh(uncapped / 2))


def test_ngpt_rejects_qk_norm_and_norm_layer():
    from resnorm.train.preflight import validate
    from resnorm.errors import ConfigError

    with pytest.raises(ValueError, match="qk_norm"):
        small("ngpt", 1, "model.qk_norm=true")
    with pytest.raises(ConfigError, match="model.norm_layer"):
        validate(compose("model.norm=ngpt", "model.norm_layer=rmsnorm", *SMALL))


# --- nGPT: structure, initialisation, renormalisation ----------------------------------------------------

def _matrices(model):
    """(weight, dim along which it is unit-norm) for every nGPT matrix."""
    out = [(model.tok_emb.weight, -1), (model.pos_emb.weight, -1), (model.head.weight, -1)]
    for b in model.blocks:
        out += [(b.attn.branch.qkv.weight, -1), (b.mlp.branch.fc1.weight, -1),
                (b.attn.branch.out.weight, 0), (b.mlp.branch.fc2.weight, 0)]
    return out


def _max_norm_error(model):
    return max((w.norm(dim=dim) - 1).abs().max().item() for w, dim in _matrices(model))


@pytest.mark.parametrize("depth", [3, 12])
def test_ngpt_structure_and_initialisation_match_the_paper(depth):
    d = 32
    model, _ = small("ngpt", depth, d=d)
    assert not any(isinstance(m, NORM_TYPES) for m in model.modules())  # no norm layers
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))  # no biases
    assert _max_norm_error(model) < 1e-6  # every matrix unit-norm along d_model
    alphas = model.stream_params.alpha
    assert len(alphas) == 2 * depth
    for a in alphas:  # alpha_init 0.05 stored at alpha_scale 1/sqrt(d)
        assert torch.allclose(a.p, torch.full((d,), d ** -0.5)) and torch.allclose(a(), torch.full((d,), 0.05))
    b = model.blocks[0]
    assert torch.allclose(b.attn.branch.s_qk.p, torch.full((d,), d ** -0.5)) and torch.allclose(b.attn.branch.s_qk(), torch.ones(d))
    hidden = int(2 * 4 * d / 3)  # SwiGLU width 2/3 of d_ff (both peers)
    assert b.mlp.branch.fc1.weight.shape == (2 * hidden, d) and torch.equal(b.mlp.branch.s_u.p, torch.ones(hidden))
    assert torch.allclose(model.head.s_z.p, torch.full((256,), d ** -0.5)) and torch.allclose(model.head.s_z(), torch.ones(256))
    # the weights were Xavier-normal before the renormalisation: row directions are random, not a copy
    w = b.attn.branch.qkv.weight
    assert (w @ w.T - torch.eye(3 * d)).abs().max() < 0.9


def _steps(model, optimizer, n=3, seed=0):
    from resnorm.data.corpora import BatchSampler, synthetic_stream

    sampler = BatchSampler(synthetic_stream(3000, 16, 64, seed), 4, T, seed=seed)
    losses = []
    for _ in range(n):
        x, y = sampler.sample()
        loss = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_ngpt_rows_stay_unit_norm_after_optimizer_steps():
    model, cfg = small("ngpt", 2, "optim.lr=0.05")
    _steps(model, make_optimizer(model, cfg.optim))
    assert _max_norm_error(model) < 1e-6
    raw, _ = small("ngpt", 2)  # the same steps without the hook leave the sphere (the check can fail)
    _steps(raw, torch.optim.AdamW(raw.parameters(), lr=0.05))
    assert _max_norm_error(raw) > 1e-2


def test_ngpt_trains_30_steps_with_its_optimizer():
    model, cfg = small("ngpt", 2, "optim.lr=0.01")
    losses = _steps(model, make_optimizer(model, cfg.optim), n=30)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_ngpt_preset_no_warmup_no_weight_decay_and_explicit_conflicts_are_errors():
    from resnorm.train.preflight import validate
    from resnorm.errors import ConfigError
    from resnorm.train.variant_optim import apply_preset

    cfg = compose("model.norm=ngpt", *SMALL)
    assert get_variant("ngpt").optim_preset == (("warmup_steps", 0), ("weight_decay", 0.0))
    out = apply_preset(cfg)
    assert out.optim.warmup_steps == 0 and out.optim.weight_decay == 0.0 and cfg.optim.warmup_steps == 20
    assert apply_preset(compose("model.norm=pre")).optim.warmup_steps == 20  # other variants untouched
    validate(compose("model.norm=ngpt", "optim.warmup_steps=0", *SMALL))
    for bad in ("optim.warmup_steps=50", "optim.weight_decay=0.1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            validate(compose("model.norm=ngpt", bad, *SMALL))


def test_ngpt_run_trains_with_the_preset_and_records_it(tmp_path):
    from conftest import TINY
    from resnorm.train.job import JobInfo, train

    cfg = compose(*TINY, "model.norm=ngpt", "depth=2", "train.steps=3", "train.probe_every=2")
    summary = train(cfg, JobInfo(tmp_path, "ngpt", "t", []))
    assert summary["status"] == "completed" and summary["config"]["optim"]["warmup_steps"] == 0
    import pandas as pd

    lrs = pd.read_parquet(tmp_path / "metrics.parquet").lr.tolist()
    assert lrs[0] == pytest.approx(cfg.optim.lr * (0.5 * (1 + math.cos(0))))  # the peak at step 0: no warm-up


# --- nGPT: peer (lucidrains/nGPT-pytorch 0.2.16) ---------------------------------------------------------

def test_peer_ngpt_pytorch_layer():
    """One layer of lucidrains' nGPT (Residual(Attention), Residual(FeedForward), no rotary, no value
    residual) equals ours with the weights ported. lucidrains scales q only, by s; ours scales q and k by
    s_qk, so s_qk = sqrt(s) gives the same logits."""
    ng = pytest.importorskip("nGPT_pytorch.nGPT", reason="pip install --no-deps ngpt-pytorch==0.2.16 rotary-embedding-torch==0.9.1")
    model, _ = small("ngpt", 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Scaled):
                m.p.copy_(m.scale * (0.5 + torch.rand_like(m.p)))
    a, f = model.blocks[0].attn.branch, model.blocks[0].mlp.branch
    hid = f.fc2.weight.shape[1]
    attn = ng.Attention(D, dim_head=D // H, heads=H)
    ff = ng.FeedForward(D, expand_factor=4)
    assert ff.dim_inner == hid
    r_att = ng.Residual(attn, D, 0.05, D ** -0.5)
    r_ff = ng.Residual(ff, D, 0.05, D ** -0.5)
    with torch.no_grad():
        for lin, w in ((attn.to_q, a.qkv.weight[:D]), (attn.to_k, a.qkv.weight[D:2 * D]), (attn.to_v, a.qkv.weight[2 * D:]),
                       (attn.to_out, a.out.weight), (ff.to_hidden, f.fc1.weight[:hid]), (ff.to_gate, f.fc1.weight[hid:]),
                       (ff.to_out, f.fc2.weight)):
            lin.linear.parametrizations.weight.original.copy_(w)
        attn.qk_scale.scale.copy_(a.s_qk() ** 2 / attn.qk_scale.forward_scale)
        ff.hidden_scale.scale.copy_(f.s_u() / ff.hidden_scale.forward_scale)
        ff.gate_scale.scale.copy_(f.s_v() / ff.gate_scale.forward_scale)
        alphas = model.stream_params.alpha
        r_att.branch_scale.scale.copy_(alphas[0]() / r_att.branch_scale.forward_scale)
        r_ff.branch_scale.scale.copy_(alphas[1]() / r_ff.branch_scale.forward_scale)
        h = torch.nn.functional.normalize(torch.randn(B, T, D), dim=-1)
        ours = model.sublayers()
        mine = h
        for sub, alpha in zip(ours, alphas):
            mine = torch.nn.functional.normalize(mine + alpha() * (torch.nn.functional.normalize(sub.branch(mine), dim=-1) - mine), dim=-1)
        peer = r_ff(r_att(h))
    torch.testing.assert_close(mine, peer, atol=1e-5, rtol=1e-5)


# --- CompleteP ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth,base,alpha", [(4, 1, 1.0), (16, 2, 1.0), (16, 2, 0.5), (8, 4, 0.75)])
def test_completep_multiplier_and_group_lr_eps_equal_the_formulas(depth, base, alpha):
    model, cfg = small("completep", depth, f"model.completep_base_depth={base}", f"model.completep_alpha={alpha}",
                       "optim.lr=0.003", "optim.eps=1e-8", "optim.warmup_steps=0", "optim.schedule=constant", d=8)
    m = depth / base
    assert completep_multiplier(depth, model.shape.options) == pytest.approx(m ** -alpha)
    assert all(s.spec.branch_scale == pytest.approx(m ** -alpha) and s.pre_norm is not None for s in model.sublayers())
    opt = make_optimizer(model, cfg.optim)
    set_lr(SimpleNamespace(optimizer=opt, cfg=cfg), 0)  # the loop's Run, as set_lr reads it
    hidden = {id(p) for p in model.blocks.parameters()}
    seen = 0
    for g in opt.param_groups:
        is_hidden = {id(p) in hidden for p in g["params"]}
        assert len(is_hidden) == 1  # a group holds one kind
        want_lr = 0.003 * (m ** (alpha - 1) if is_hidden.pop() else 1.0)
        assert g["lr"] == pytest.approx(want_lr) and g["eps"] == pytest.approx(1e-8 * m ** -alpha)
        seen += len(g["params"])
    assert seen == len(list(model.parameters()))
    assert completep_group_scales(depth, model.shape.options)["hidden"] == pytest.approx((m ** (alpha - 1), m ** -alpha))


def test_completep_alpha_half_is_depth_scaled_and_alpha_one_is_depth_scaled_with_a():
    idx = torch.randint(256, (B, T), generator=torch.Generator().manual_seed(5))
    for depth in (3, 8):
        ours, _ = small("completep", depth, "model.completep_alpha=0.5")
        ds, _ = small("depth_scaled", depth)
        with torch.no_grad():
            assert torch.equal(ours(idx), ds(idx))
        ours, _ = small("completep", depth)  # alpha 1: 1/L = a/sqrt(L) with a = L^-1/2
        ds, _ = small("depth_scaled", depth, f"model.depth_scale_a={depth ** -0.5!r}")
        with torch.no_grad():
            torch.testing.assert_close(ours(idx), ds(idx), atol=1e-6, rtol=1e-6)


def test_other_variants_keep_two_groups_without_lr_scale():
    model, cfg = small("pre", 2)
    opt = make_optimizer(model, cfg.optim)
    assert len(opt.param_groups) == 2 and all("lr_scale" not in g for g in opt.param_groups)
    assert not opt._optimizer_step_post_hooks  # no post-step hook


# --- Derf preset ---------------------------------------------------------------------------------------

def test_derf_preset_is_pre_ln_with_derf_everywhere():
    model, _ = small("derf", 2, "model.derf_alpha0=0.7")
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    assert len(norms) == 2 * 2 + 1 and all(isinstance(m, Derf) and m.alpha.item() == pytest.approx(0.7) for m in norms)
    pre, _ = small("pre", 2, "model.norm_layer=derf", "model.derf_alpha0=0.7")
    idx = torch.randint(256, (B, T))
    with torch.no_grad():
        assert torch.equal(model(idx), pre(idx))


def _port_derf(ours, theirs):
    off = float(theirs.scale_offset)
    theirs.alpha.copy_(ours.alpha[0] - off)
    theirs.s.copy_(ours.shift[0])
    theirs.gamma.copy_(ours.weight - off)
    theirs.beta.copy_(ours.bias)


@pytest.mark.parametrize("depth", [1, 3])
def test_peer_xtransformers_derf_decoder(depth):
    """x-transformers' Decoder(use_derf=True): Pre-Derf blocks and a final Derf, every Derf parameter random."""
    xt = pytest.importorskip("x_transformers.x_transformers", reason="scripts/setup.sh installs x-transformers")
    from test_schemes_norm import _peer_model, _port_attention, _port_ff

    model = _peer_model("derf", depth)
    dec = xt.Decoder(dim=16, depth=depth, heads=2, attn_dim_head=8, ff_no_bias=True, use_derf=True)
    x = torch.randn(B, 8, 16, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        for sub, (norms, block, _) in zip(model.sublayers(), dec.layers, strict=True):
            (_port_attention if sub.pre_norm is not None and hasattr(block, "to_q") else _port_ff)(sub.branch, block)
            assert norms[1] is None and norms[2] is None and isinstance(norms[0], xt.Derf)
            _port_derf(sub.pre_norm, norms[0])
        _port_derf(model.final_norm, dec.final_norm)
        ours = x
        for b in model.blocks:
            ours = b(ours)
        torch.testing.assert_close(model.final_norm(ours), dec(x), rtol=1e-5, atol=1e-5)


def test_reproduction_harness_trains_ngpt_with_its_preset():
    """experiments/training.py's recipe (5% warm-up, weight decay 1e-4) leaves those keys to nGPT's preset."""
    from experiments.training import overrides
    from resnorm.config.compose import compose as config_compose
    from resnorm.train.preflight import validate

    ngpt, pre = overrides(dict(variant="ngpt")), overrides(dict(variant="pre"))
    assert not [o for o in ngpt if o.startswith(("optim.warmup_steps=", "optim.weight_decay="))]
    assert "optim.warmup_steps=15" in pre and "optim.weight_decay=0.0001" in pre
    validate(config_compose(ngpt))


def test_optimizer_rules_apply_to_every_optimizer():
    """CompleteP's factors fold into Muon's own lr_scale and eps; nGPT's hook runs once per chain step."""
    model, cfg = small("completep", 4, "model.completep_base_depth=2", "model.completep_alpha=0.5", "optim=muon", d=8)
    opt = make_optimizer(model, cfg.optim)
    hidden = {id(p) for p in model.blocks.parameters()}
    muon = opt.optimizers[0].param_groups
    assert all(id(p) in hidden for g in muon for p in g["params"])  # Muon holds block matrices only
    assert all(g["lr_scale"] == pytest.approx(cfg.optim.muon_lr / cfg.optim.lr * 2 ** -0.5) for g in muon)
    model, cfg = small("ngpt", 2, "optim=muon", "optim.lr=0.05")
    opt = make_optimizer(model, cfg.optim)
    assert [len(o._optimizer_step_post_hooks) for o in opt.optimizers] == [0, 1]
    _steps(model, opt)
    assert _max_norm_error(model) < 1e-6
