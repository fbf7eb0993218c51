"""The multi-stream and cross-layer schemes: value residual, orthogonal update, DenseFormer, Hyper-Connections, mHC.

- float64 references written from the papers (they read only parameter values from the model;
  ``tests/test_variants.py`` runs them on its generic suite through :func:`reference_s12`), here
  with the schemes' own parameters randomised so a dropped term cannot hide;
- init: DenseFormer and (static, dynamic) HC equal Pre-LN; mHC's H_res is doubly stochastic;
- the learned value-residual mix receives gradients (BS-RoFormer #39 shipped one that did not);
- peers (``pytest -k peer``): x-transformers' Attention value residual, OrthogonalResidualUpdate and
  HyperConnection (its mHC form), and the ``hyper-connections`` package's HyperConnections, with
  ported parameters, to 1e-5 in float32; departures pinned and explained in each test.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose
from resnorm.model.transformer import build_model
from test_variants import N, one_thread, ref_attention, ref_mlp, tiny_model  # noqa: F401 (autouse fixture)

D, H, T, B = 8, 2, 5, 3
S12 = ("value_residual", "orthogonal", "denseformer", "hyper", "hyper_dynamic", "mhc")


# --- the references ----------------------------------------------------------------------------------

def ref_attention_values(x, attn, mix=None):
    """Causal attention whose values v may be replaced by ``mix(v)``; returns (output, v before the mix)."""
    b, t, d = x.shape
    hd = d // attn.n_heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (z.view(b, t, attn.n_heads, hd).transpose(1, 2) for z in qkv.split(d, dim=-1))
    v_used = v if mix is None else mix(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    y = (torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v_used).transpose(1, 2).reshape(b, t, d)
    return y @ attn.out.weight.T + attn.out.bias, v


def _sublayers(model):
    return [(s, fn) for b in model.blocks for s, fn in ((b.attn, ref_attention), (b.mlp, ref_mlp))]


def ref_value_residual(model, x):
    """Zhou et al.: V'_n = lambda_{n,1} V_1 + lambda_{n,2} V_n for n >= 2; the rest is Pre-LN."""
    lam, v1 = model.stream_params.lambdas, None
    for n, block in enumerate(model.blocks):
        mix = None if n == 0 else (lambda v, n=n: lam[n, 0] * v1 + lam[n, 1] * v)
        out, v = ref_attention_values(N(x, block.attn.pre_norm), block.attn.branch, mix)
        v1 = v if n == 0 else v1
        x = x + out
        x = x + ref_mlp(N(x, block.mlp.pre_norm), block.mlp.branch)
    return N(x, model.final_norm)


def ref_orthogonal(model, x):
    """Oh et al.: x <- x + f - (<f, x> / (<x, x> + eps)) x per token, f = F(LN(x)), eps = 1e-6."""
    for sub, fn in _sublayers(model):
        f = fn(N(x, sub.pre_norm), sub.branch)
        coef = (f * x).sum(-1, keepdim=True) / ((x * x).sum(-1, keepdim=True) + 1e-6)
        x = x + f - coef * x
    return N(x, model.final_norm)


def ref_denseformer(model, x):
    """Pagliardini et al.: X_i = B_i(Y_{i-1}), Y_i = sum_{j=0..i} alpha_ij X_j, X_0 = Y_0 = embedding."""
    X, y = [x], x
    for block, alpha in zip(model.blocks, model.stream_params.alphas):
        for sub, fn in ((block.attn, ref_attention), (block.mlp, ref_mlp)):
            y = y + fn(N(y, sub.pre_norm), sub.branch)
        X.append(y)
        y = sum(alpha[j] * X[j] for j in range(len(X)))
    return N(y, model.final_norm)


def ref_hyper(model, x):
    """Zhu et al. (Alg. 2): h = sum_s A_m[s] H_s; H'_t = sum_s A_r[s, t] H_s + B_t F(LN(h)); dynamic:
    A = A_static + s_a tanh(N(H_s) W_a) and B = B_static + s_b tanh(N(H_s) W_b), per stream s."""
    conns = model.stream_params
    Hs = [x] * conns.n
    for (sub, fn), c in zip(_sublayers(model), conns.layers):
        n = len(Hs)
        A = [c.static_alpha[s] for s in range(n)]
        Bv = [c.static_beta[s] for s in range(n)]
        if c.dynamic:
            A = [A[s] + c.alpha_scale * torch.tanh(N(Hs[s], c.norm) @ c.alpha_fn) for s in range(n)]
            Bv = [Bv[s] + c.beta_scale * torch.tanh(N(Hs[s], c.norm) @ c.beta_fn)[..., None] for s in range(n)]
        h = sum(A[s][..., 0:1] * Hs[s] for s in range(n))
        f = fn(N(h, sub.pre_norm), sub.branch)
        Hs = [sum(A[s][..., 1 + t:2 + t] * Hs[s] for s in range(n)) + Bv[t] * f for t in range(n)]
    return N(sum(Hs), model.final_norm)


def ref_sinkhorn(logits, iters, eps=1e-6):
    """DeepSeek's reference order in our [target, source] layout: exp normalised over the targets
    (columns) + eps, then rows (over the sources), then ``iters - 1`` x (columns, rows); denominators + eps."""
    m = torch.exp(logits)
    m = m / m.sum(-2, keepdim=True) + eps
    m = m / (m.sum(-1, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-2, keepdim=True) + eps)
        m = m / (m.sum(-1, keepdim=True) + eps)
    return m


def ref_mhc(model, x):
    """Xie et al.: x~ = RMSNorm(vec H) (no gain); H_pre = sigmoid(b + a x~ phi_pre) + 1e-6, H_post =
    2 sigmoid(b + a x~ phi_post), H_res = Sinkhorn(b + a mat(x~ phi_res)); H <- H_res H + H_post F(LN(H_pre H));
    the head reads LN(sum_s m_s H_s), m = sigmoid(c x~ phi_head + b_head) + 1e-6 (DeepSeek's mhc_head)."""
    conns = model.stream_params
    n, iters = conns.n, cfg_iters(model)
    Hs = [x] * n
    for (sub, fn), c in zip(_sublayers(model), conns.layers):
        flat = torch.cat(Hs, dim=-1)
        xt = flat / torch.sqrt((flat ** 2).mean(-1, keepdim=True) + model.shape.norm_eps)
        z = xt @ c.phi
        pre = torch.sigmoid(c.b_pre + c.scales[0] * z[..., :n]) + 1e-6
        post = 2 * torch.sigmoid(c.b_post + c.scales[1] * z[..., n:2 * n])
        res = ref_sinkhorn(c.b_res + c.scales[2] * z[..., 2 * n:].reshape(*z.shape[:-1], n, n), iters)
        f = fn(N(sum(pre[..., s:s + 1] * Hs[s] for s in range(n)), sub.pre_norm), sub.branch)
        Hs = [sum(res[..., t, s:s + 1] * Hs[s] for s in range(n)) + post[..., t:t + 1] * f for t in range(n)]
    head = conns.head
    if head is None:
        return N(sum(Hs), model.final_norm)
    flat = torch.cat(Hs, dim=-1)
    xt = flat / torch.sqrt((flat ** 2).mean(-1, keepdim=True) + model.shape.norm_eps)
    m = torch.sigmoid(head.scale * (xt @ head.phi) + head.bias) + 1e-6
    return N(sum(m[..., s:s + 1] * Hs[s] for s in range(n)), model.final_norm)


def cfg_iters(model):
    return model.shape.options.mhc_sinkhorn_iters


REFERENCES = {"value_residual": ref_value_residual, "orthogonal": ref_orthogonal, "denseformer": ref_denseformer,
              "hyper": ref_hyper, "hyper_dynamic": ref_hyper, "mhc": ref_mhc}


def reference_s12(model, x, norm, cfg):
    """The head input of an issue-12 scheme from the embedding x (tests/test_variants.py calls this)."""
    return REFERENCES[norm](model, x)


# --- equations with the schemes' own parameters randomised ---------------------------------------------

def _randomise_stream(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.stream_params.named_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("norm", S12)
@pytest.mark.parametrize("depth", [2, 3])
def test_forward_matches_the_papers_equation_with_random_stream_parameters(norm, depth):
    model, cfg = tiny_model(norm, depth, "model.hc_streams=3", "model.value_residual_learned=true",
                            "model.mhc_sinkhorn_iters=7")
    if model.stream_params is not None:
        _randomise_stream(model)
    idx = torch.randint(256, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.hidden(idx)
        want = reference_s12(model, model.embed(idx), norm, cfg)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    if norm == "orthogonal":  # per token, the update is orthogonal to the stream it is added to
        parts = []
        model.hidden(idx, parts)
        for p in parts:
            assert ((p.y - p.x) * p.x).sum(-1).abs().max() < 1e-6 * (p.x * p.x).sum(-1).max()


# --- init ----------------------------------------------------------------------------------------------

def _small(norm, *overrides, seed=0):
    cfg = compose(f"model.norm={norm}", "depth=4", "model.d_model=16", "model.n_heads=2", "train.seq_len=8",
                  "data=synthetic", "data.synthetic_tokens=2000", *overrides)
    torch.manual_seed(seed)
    return build_model(cfg).double()


@pytest.mark.parametrize("norm", ["denseformer", "hyper", "hyper_dynamic", "mhc"])
def test_equal_to_pre_ln_at_init(norm):
    """Every sublayer sees Pre-LN's branch input up to a positive scale (HC: the stream the layer reads is
    Pre-LN's stream; mHC: sum_s sigmoid(b_pre,s) copies of it); the head reads LN(n x_L) = LN(x_L) up to eps."""
    model, pre = _small(norm), _small("pre")
    idx = torch.randint(256, (2, 8), generator=torch.Generator().manual_seed(2))
    ours, theirs = [], []
    with torch.no_grad():
        got, want = model.hidden(idx, ours), pre.hidden(idx, theirs)
    exact = norm in ("denseformer", "hyper", "hyper_dynamic")  # mHC: LN's eps sees the scaled input
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.f, b.f, atol=1e-9 if exact else 1e-4, rtol=1e-7 if exact else 1e-3)
    torch.testing.assert_close(got, want, atol=1e-12 if norm == "denseformer" else 1e-4, rtol=0 if exact else 1e-4)


def test_hyper_connection_inits():
    model = _small("hyper_dynamic", "model.hc_streams=3")
    for k, c in enumerate(model.stream_params.layers):
        assert torch.equal(c.static_alpha[:, 0], torch.eye(3, dtype=c.static_alpha.dtype)[k % 3])  # A_m = e_(k mod n)
        assert torch.equal(c.static_alpha[:, 1:], torch.eye(3, dtype=c.static_alpha.dtype))  # A_r = I
        assert (c.static_beta == 1).all() and (c.alpha_fn == 0).all() and (c.beta_fn == 0).all()
        assert c.alpha_scale.item() == pytest.approx(0.01) and c.beta_scale.item() == pytest.approx(0.01)
    assert len(model.stream_params.layers) == 8  # one per sublayer
    alphas = _small("denseformer").stream_params.alphas
    assert [a.tolist() for a in alphas] == [[0, 1], [0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0, 1]]


def test_mhc_residual_mixing_is_doubly_stochastic():
    model = _small("mhc", "model.hc_streams=4")
    _randomise_stream(model)
    c = model.stream_params.layers[3]
    Hs = torch.randn(4, 2, 8, 16, dtype=torch.float64)
    _, post, res = c.weights(Hs)
    assert (res > 0).all() and (post > 0).all() and (post < 2).all()
    # rows up to the denominator's eps (the last step: s / (s + 1e-6)), columns to Sinkhorn's tolerance
    torch.testing.assert_close(res.sum(-1), torch.ones_like(res.sum(-1)), atol=2e-6, rtol=0)
    torch.testing.assert_close(res.sum(-2), torch.ones_like(res.sum(-2)), atol=1e-3, rtol=0)  # columns after 20


def test_value_residual_mix_learned_receives_gradients_and_fixed_is_not_a_parameter():
    model = _small("value_residual", "model.value_residual_learned=true")
    idx = torch.randint(256, (2, 8), generator=torch.Generator().manual_seed(2))
    model.loss(idx, idx.roll(-1, 1)).backward()
    g = model.stream_params.lambdas.grad
    assert g is not None and (g[1:].abs() > 0).all() and (g[0] == 0).all()  # layer 1 has no mix
    fixed = _small("value_residual")
    assert "stream_params.lambdas" not in dict(fixed.named_parameters())
    assert (fixed.stream_params.lambdas == 0.5).all()
    assert all(b.attn.branch.value_hook is None for b in model.blocks)  # the stream leaves no hook behind


# --- peers ---------------------------------------------------------------------------------------------

def _xt():
    return pytest.importorskip("x_transformers.x_transformers", reason="pip install --no-deps x-transformers==2.31.10")


def test_peer_xtransformers_value_residual():
    """x-transformers' ResFormer (add_value_residual, learned_value_residual_mix=False): v <- V_1.lerp(v, 0.5),
    i.e. 0.5 V_1 + 0.5 V_n, our fixed mix. Its learned mix is per token and head (sigmoid(Linear(x)));
    ours is the paper's per-layer scalars, so only the fixed mix is compared."""
    xt = _xt()
    torch.manual_seed(0)
    model = _small("value_residual").float()
    a1, a2 = model.blocks[0].attn.branch, model.blocks[1].attn.branch
    x1, x2 = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    peer = xt.Attention(16, heads=2, dim_head=8, causal=True, flash=False)
    d = 16
    with torch.no_grad():
        for name, rows in (("to_q", slice(0, d)), ("to_k", slice(d, 2 * d)), ("to_v", slice(2 * d, 3 * d))):
            getattr(peer, name).weight.copy_(a2.qkv.weight[rows])
        peer.to_out.weight.copy_(a2.out.weight)
        a2.qkv.bias.zero_(), a2.out.bias.zero_()
        v1 = a1._qkv(x1)[2]
        a2.value_hook = lambda v: 0.5 * v1 + 0.5 * v
        ours = a2(x2)
        a2.value_hook = None
        theirs, _ = peer(x2, value_residual=v1, return_intermediates=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_peer_xtransformers_orthogonal_residual():
    """x-transformers' OrthogonalResidualUpdate projects over everything but the batch axis ('b *'): a
    sequence-level projection. Per token (our and the paper's reading) is its result on (b t, 1, d);
    on (b, t, d) it differs, pinned below. Its projection has no eps (ours 1e-6 in <x, x>)."""
    xt = _xt()
    from resnorm.model.multistream import orthogonal_part

    x, f = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    peer = xt.OrthogonalResidualUpdate(16)
    theirs = peer(f.reshape(16, 1, 16), x.reshape(16, 1, 16)).reshape(2, 8, 16)
    torch.testing.assert_close(x + orthogonal_part(f, x), theirs, rtol=1e-5, atol=1e-5)
    assert (x + orthogonal_part(f, x) - peer(f, x)).abs().max() > 1e-2  # the sequence-level reading differs


def _hc_package():
    return pytest.importorskip("hyper_connections.hyper_connections",
                               reason="pip install --no-deps hyper-connections==0.4.11")


@pytest.mark.parametrize("norm", ["hyper", "hyper_dynamic"])
def test_peer_hyper_connections_package(norm):
    """lucidrains' hyper-connections (Alg. 2 of the paper): same A_m, A_r, B, W, s and tanh. Departure:
    its stream norm is an RMSNorm ((gamma + 1) sqrt(d) x / ||x||); the paper's and ours is a LayerNorm;
    the test puts our LayerNorm into the peer (the norm only matters for the dynamic weights)."""
    pkg = _hc_package()
    n, k = 3, 4
    model = _small(norm, f"model.hc_streams={n}").float()
    _randomise_stream(model)
    conn, sub = model.stream_params.layers[k], model.sublayers()[k]
    peer = pkg.HyperConnections(n, dim=16, layer_index=k, tanh=True)
    with torch.no_grad():
        peer.static_alpha.copy_(conn.static_alpha)
        peer.static_beta.copy_(conn.static_beta)
        if conn.dynamic:
            peer.norm = conn.norm
            for a, b in (("alpha_fn", "dynamic_alpha_fn"), ("alpha_scale", "dynamic_alpha_scale"),
                         ("beta_fn", "dynamic_beta_fn"), ("beta_scale", "dynamic_beta_scale")):
                getattr(peer, b).copy_(getattr(conn, a))
        else:  # static HC: no dynamic part in the peer
            peer.dynamic_alpha_scale.zero_(), peer.dynamic_beta_scale.zero_()
        Hs = torch.randn(n, 2, 8, 16)
        ours = conn(Hs, sub, None)
        branch_in, residuals, kw = peer.width_connection(Hs.transpose(0, 1).reshape(2 * n, 8, 16))
        out = peer.depth_connection(sub.run(branch_in).f, residuals, **kw)
    torch.testing.assert_close(ours, out.reshape(2, n, 8, 16).transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_peer_xtransformers_mhc():
    """x-transformers' HyperConnection (its mHC form): H_pre = sigmoid(static + dynamic), H_post =
    2 sigmoid(static_beta + s * 2 sigmoid(N(H) w)), H_res = sinkhorn(static + dynamic).

    - Its ``sinkhorn`` (softmax over the sources, then iters x (rows, columns) in its (source, target)
      layout) starts over the other axis than ours (DeepSeek's reference: over the targets, with eps);
      with eps = 0 and enough iterations both reach the same doubly stochastic matrix, compared directly.
    - Departure (a bug in 2.31.10): ``rearrange(alpha[..., views:], '... (s1 s2) -> ... s1 s2', s2=n)``
      is applied to a last axis of size n, so s1 = 1 and Sinkhorn runs on 1 x n rows; the result is
      the all-ones matrix and every stream becomes the sum of all streams (H_res = 1 1^T, not doubly
      stochastic). The test pins that: its output is ours with H_res replaced by ones.
    - Its dynamic terms read a per-stream LayerNorm and its H_post's dynamic term is squashed by
      2 sigmoid; ours (the paper) read RMSNorm(vec H) linearly; so phi = 0 here, biases ported
      (static_beta = b_post - s, as its dynamic term is s * 2 sigmoid(0) = s)."""
    xt = _xt()
    n, k, iters = 4, 5, 5
    from resnorm.model.multistream import sinkhorn

    logits = torch.randn(3, n, n, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sinkhorn(logits.double(), 300, eps=0.0),
                               xt.sinkhorn(logits.double().transpose(-1, -2), 300).transpose(-1, -2),
                               rtol=0, atol=1e-6)  # x-transformers computes in float32
    model = _small("mhc", f"model.hc_streams={n}", f"model.mhc_sinkhorn_iters={iters}").float()
    conn, sub = model.stream_params.layers[k], model.sublayers()[k]
    peer = xt.HyperConnection(16, layer_index=k, num_residual_streams=n, sinkhorn_iters=iters)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (conn.b_pre, conn.b_post, conn.b_res):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
        peer.static_alpha.copy_(torch.cat([conn.b_pre[:, None], conn.b_res.T], dim=1))
        peer.static_beta.copy_(conn.b_post - peer.dynamic_beta_scale)
        Hs = torch.randn(n, 2, 8, 16)
        pre, post, res = conn.weights(Hs)
        branch_in, residuals, kw = peer.prepare(Hs.transpose(0, 1).reshape(2 * n, 8, 16))
        f = sub.run(branch_in).f
        out = peer(f, residuals, **kw).reshape(2, n, 8, 16).transpose(0, 1)
        torch.testing.assert_close(branch_in, torch.einsum("...s,s...d->...d", pre, Hs), rtol=1e-5, atol=1e-5)
        ones_mix = Hs.sum(0) + post.movedim(-1, 0)[..., None] * f  # H_res = 1 1^T (the bug)
        torch.testing.assert_close(out, ones_mix, rtol=1e-5, atol=1e-5)
        ours = conn(Hs, sub, None)
        assert (ours - out).abs().max() > 0.1 and torch.allclose(res.sum(-1), torch.ones(()))


# --- Attention Residuals (Kimi Team, arXiv:2603.15031), full and block ---
# A layer is one sublayer; its output v_i = F_i(N_pre(h_i)) (no skip of its own); v_0 = the embedding.
# h_l = sum_i softmax_i(w_l^T RMSNorm(v_i)) v_i; the head reads LN of the same aggregate (query w_2L).

def ref_rms(v, eps):
    return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)


def ref_depth_attention(w, sources, eps):
    """sum_i exp(w^T RMSNorm(v_i)) v_i / sum_j exp(w^T RMSNorm(v_j)), per token, written out."""
    logits = [(ref_rms(v, eps) * w).sum(-1) for v in sources]
    top = torch.stack(logits).amax(0)
    e = [torch.exp(z - top) for z in logits]
    return sum(a[..., None] * v for a, v in zip(e, sources)) / sum(e)[..., None]


def ref_per_block(cfg):
    """Sublayers per source: 1 (full AttnRes); Block AttnRes: 2 x attnres_block_size, null ceil(L / 8)."""
    if cfg.model.norm == "attnres":
        return 1
    size = cfg.model.attnres_block_size
    return 2 * (size if size is not None else math.ceil(cfg.depth / 8))


def ref_attnres(model, x, cfg):
    """The sources: x0, each completed block's sum of sublayer outputs, the current block's partial sum."""
    w, eps, per_block = model.stream_params.queries, model.shape.norm_eps, ref_per_block(cfg)
    sources, block = [x], []
    for k, (sub, fn) in enumerate(_sublayers(model)):
        h = ref_depth_attention(w[k], sources + ([sum(block)] if block else []), eps)
        block.append(fn(N(h, sub.pre_norm), sub.branch))
        if len(block) == per_block:
            sources, block = sources + [sum(block)], []
    return N(ref_depth_attention(w[-1], sources + ([sum(block)] if block else []), eps), model.final_norm)


@pytest.mark.parametrize("norm,depth,size", [("attnres", 2, None), ("attnres", 3, None), ("attnres_block", 3, 1),
                                             ("attnres_block", 3, 2), ("attnres_block", 5, None)])
def test_attnres_forward_matches_the_papers_equation_with_random_queries(norm, depth, size):
    model, cfg = tiny_model(norm, depth, f"model.attnres_block_size={'null' if size is None else size}")
    _randomise_stream(model)
    assert model.stream_params.queries.abs().min() > 0
    idx = torch.randint(256, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model.hidden(idx), ref_attnres(model, model.embed(idx), cfg)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_attnres_block_size_default_is_about_eight_blocks():
    from resnorm.model.attnres import block_sublayers
    from resnorm.model.blocks import ModelShape

    for depth, size, per_block in ((4, "null", 2), (16, "null", 4), (48, "null", 12), (12, 3, 6)):
        cfg = compose("model.norm=attnres_block", f"depth={depth}", "model.d_model=16", "model.n_heads=2",
                      f"model.attnres_block_size={size}")
        assert block_sublayers("attnres_block", ModelShape.from_config(cfg)) == per_block
    assert _small("attnres_block").stream_params.per_block == 2 and _small("attnres").stream_params.per_block == 1


@pytest.mark.parametrize("norm", ["attnres", "attnres_block"])
def test_attnres_uniform_weights_at_init(norm):
    """w = 0: every sublayer's input is the plain mean of its sources (alpha = 1/l over l sources), and so
    is the head's; the sublayers add no skip (v = F(LN(h)))."""
    model = _small(norm, "depth=3")
    assert (model.stream_params.queries == 0).all() and model.stream_params.queries.shape == (7, 16)
    per_block = model.stream_params.per_block
    idx = torch.randint(256, (2, 8), generator=torch.Generator().manual_seed(2))
    parts = []
    with torch.no_grad():
        hidden = model.hidden(idx, parts)
        sources, block = [model.embed(idx)], []
        for k, p in enumerate(parts):
            current = sources + ([sum(block)] if block else [])
            torch.testing.assert_close(p.x, sum(current) / len(current), atol=1e-12, rtol=0)
            assert torch.equal(p.y, p.f)
            block.append(p.y)
            if len(block) == per_block:
                sources, block = sources + [sum(block)], []
        current = sources + ([sum(block)] if block else [])
        torch.testing.assert_close(hidden, model.final_norm(sum(current) / len(current)), atol=1e-12, rtol=0)
    from resnorm.model.attnres import depth_weights
    vs = [torch.randn(2, 8, 16, dtype=torch.float64) * s for s in (1, 10, 100)]
    assert torch.equal(depth_weights(torch.zeros(16, dtype=torch.float64), torch.stack(vs), 1e-5), torch.full((3, 2, 8), 1 / 3,
                                                                                                  dtype=torch.float64))


@pytest.mark.parametrize("norm", ["attnres", "attnres_block"])
def test_attnres_pseudo_queries_receive_gradients(norm):
    """Every pseudo-query with more than one source gets a gradient at init (w = 0); the first
    sublayer's has the embedding alone (softmax over one source), so none."""
    model = _small(norm)
    idx = torch.randint(256, (2, 8), generator=torch.Generator().manual_seed(2))
    model.loss(idx, idx.roll(-1, 1)).backward()
    g = model.stream_params.queries.grad
    assert g is not None and (g[0] == 0).all() and (g[1:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("norm", ["attnres", "attnres_block"])
def test_attnres_short_training_run_learns_and_moves_the_queries(norm):
    cfg = compose(f"model.norm={norm}", "depth=3", "model.d_model=16", "model.n_heads=2", "train.seq_len=16",
                  "data=synthetic", "data.synthetic_tokens=2000")
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(64, (8, 17), generator=g)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]
    assert model.stream_params.queries[1:].abs().amax(-1).min() > 1e-3  # every w_l (l >= 1) left zero


def test_peer_xtransformers_attention_residual():
    """x-transformers' AttentionResidual (attn_aggregated_residuals) attends over its stack with
    softmax(q . RMSNorm_gamma(v_i) / sqrt(d)), the paper's operator for a given query. Departures, all
    pinned: (1) its query is input-dependent, q = RMSNorm(h + LoRA(RMSNorm(h))) from the latest entry
    (the up-projection is zero at init, so q = RMSNorm(h), not 0: weights are not uniform at init);
    the paper's (and ours) is a static pseudo-query w_l, zero at init; (2) in its Decoder the stack is
    the residual stream entering every sublayer and the ordinary residual is kept (x + F(N(agg))); the
    paper's sources are the sublayer outputs with no skip; (3) no head aggregate, no Block AttnRes.
    So the operator is compared with its query replaced by sqrt(d) w (port), at 1e-5 in float32."""
    xt = _xt()
    from resnorm.model.attnres import depth_attention, depth_weights

    d, n = 16, 5
    g = torch.Generator().manual_seed(7)
    vs = [torch.randn(2, 8, d, generator=g) * s for s in (1.0, 3.0, 0.5, 10.0, 2.0)]
    w = torch.randn(d, generator=g)
    peer = xt.AttentionResidual(d, lora_rank=4)

    class Fixed(torch.nn.Module):
        def forward(self, u):
            return (w * math.sqrt(d)).expand_as(u)

    with torch.no_grad():
        at_init = peer(vs)
        uniform = sum(vs) / n
        assert (at_init - uniform).abs().max() > 1e-2  # (1): the peer is not uniform at init
        peer.norm = Fixed()
        theirs = peer(vs)
        ours = depth_attention(w, vs, eps=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.allclose(depth_weights(torch.zeros(d), torch.stack(vs), 1e-5), torch.full((n, 2, 8), 1 / n))
# --- torch.compile (inductor) through the training loop ----------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("norm", ["mhc"])
def test_compiled_training_matches_eager(norm, tmp_path):
    """``train.compile=true`` (inductor, as the loop compiles) gives the eager run's losses to 1e-5, with
    the scheme monitors reading the uncompiled model on the same steps. Every issue-12 variant (and
    attnres's ``DepthQueries.record`` guard) is compiled without graph breaks and matched to eager by
    ``tests/test_variants.py::test_compiles_without_graph_breaks`` (aot_eager); inductor's code
    generation costs ~20 s a model on 2 idle cores, so one stream, mHC's (Sinkhorn loop, per-token
    matrices), goes through it here."""
    import pandas as pd

    from resnorm.train.job import JobInfo, train

    losses = {}
    for compiled in (False, True):
        cfg = compose(f"model.norm={norm}", "depth=2", "model.d_model=16", "model.n_heads=2", "train.seq_len=16",
                      "train.batch_size=4", "train.steps=3", "train.eval_every=3", "train.eval_batches=1",
                      "train.probe_every=2", "train.progress=false", "data=synthetic", "data.synthetic_tokens=3000",
                      "logger.mode=disabled", "train.threads=1", f"train.compile={str(compiled).lower()}")
        run_dir = tmp_path / str(compiled)
        summary = train(cfg, JobInfo(run_dir, norm, "compile", []))
        assert summary["status"] == "completed"
        losses[compiled] = pd.read_parquet(run_dir / "metrics.parquet")["train_loss"].tolist() + [summary["final_val_loss"]]
        quantity = "hc_composite_row_gain" if norm == "mhc" else "attnres_w_embed"
        assert (pd.read_parquet(run_dir / "layers.parquet").quantity == quantity).any()
    assert losses[True] == pytest.approx(losses[False], abs=1e-5, rel=1e-5)
