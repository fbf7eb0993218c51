"""Peers: ``resi_dual``, ``ngpt`` and ``mhc`` against the code their authors released, transcribed here.

None of the three packages can be imported here (fairseq, flash-attn and TileLang kernels), so each
module's forward is transcribed line by line from the file named below, and resnorm's weights, every
one moved off its init value, are ported into it; the outputs are compared in float32 (1e-5) and
float64 (1e-12), and one deliberately wrong port per scheme must fail the same comparison.

- ResiDual: github microsoft/ResiDual @ 8682f7510be105a0caf5b98a021e712f44f90ace,
  ``resi_dual/resi_dual_layers.py`` (``ResiDualDecoderLayer.forward``) and ``resi_dual/resi_dual.py``
  (``ResiDualDecoder``: ``res = x * dec_res_input_norm_scale``, ``x * dec_alpha + self.layer_norm(res)``
  with ``LayerNorm(embed_dim, eps=1e-7)``). Transcription changes: fairseq's ``MultiheadAttention`` is
  torch's ``nn.MultiheadAttention`` (the same in-projection, 1/sqrt(d_head) scale, softmax and output
  projection), no encoder attention (decoder-only), dropout off, ``dec_alpha`` = 1.
- nGPT: github NVIDIA/ngpt @ ed19eb232380d41a9d71024b58d2403937d8f2c9, ``model.py`` (``Block.forward`` with
  ``use_nGPT == 1``, ``GPT.forward``'s ``sz``). Transcription changes: no rotary embedding (resnorm has
  learned absolute positions: the blocks are compared on given hidden states, the whole model with the
  position embedding zeroed), ``flash_attn_func`` is ``scaled_dot_product_attention`` with the same
  causal mask and ``softmax_scale``, no bfloat16 casts.
- mHC: github deepseek-ai/TileKernels @ 36d9e45d38e204ebb87e6f6e833821eee0482fe5,
  ``tile_kernels/torch/mhc.py`` (the ``*_ref`` functions) composed as ``tile_kernels/modeling/mhc/functional.py``
  ``mhc_pre`` (its grad-enabled path) / ``mhc_head``, with ``mhc_post`` applied as ``mhc_post_ref``.
  Transcription changes: the float32 / bfloat16 casts are lifted (so float64 stays float64);
  ``post_mult_value`` = 2 (the paper's 2 sigmoid; the function's default is 1).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose
from resnorm.model.transformer import build_model
from resnorm.model.multistream import MHC_PRE_EPS, MHC_SINKHORN_EPS
from resnorm.model.ngpt import Scaled, ngpt_stream, normalize_matrices

D, T, B, HEADS = 16, 6, 3, 2
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]


def resnorm_model(norm, depth, *overrides, dtype=torch.float64):
    cfg = compose(f"model.norm={norm}", f"depth={depth}", f"model.d_model={D}", f"model.n_heads={HEADS}",
                  f"train.seq_len={T}", "data=synthetic", "data.synthetic_tokens=3000", *overrides)
    torch.manual_seed(0)
    return build_model(cfg).to(dtype)


@torch.no_grad()
def move_off_init(module, seed=3, scale=0.3):
    """Every parameter plus noise (norm gains, biases, learned scalars, connection weights), so none sits
    at a value (0, 1, an identity) that would hide a missing or misplaced use of it."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def max_err(a, b):
    return (a - b).abs().max().item()


# --- ResiDual -----------------------------------------------------------------------------------------

class ResiDualDecoderLayer(nn.Module):
    """``ResiDualDecoderLayer.forward`` (self-attention path), transcribed; (T, B, C) layout as fairseq."""

    def __init__(self, d, heads, s):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dec_res_input_norm_scale = s

    def forward(self, data, self_attn_mask):
        x, res = data
        xr = x
        x, _ = self.self_attn(query=x, key=x, value=x, need_weights=False, attn_mask=self_attn_mask)
        res = res + x * self.dec_res_input_norm_scale
        x = self.self_attn_layer_norm(x + xr)
        xr = x
        x = F.gelu(self.fc1(x))
        x = self.fc2(x)
        res = res + x * self.dec_res_input_norm_scale
        x = self.final_layer_norm(x + xr)
        return x, res


def residual_decoder(x, layers, layer_norm, s, dec_alpha=1.0):
    """``ResiDualDecoder.extract_features_scriptable``'s stream: res = x s, the layers, x alpha + LN(res)."""
    x = x.transpose(0, 1)
    mask = torch.triu(torch.ones(x.shape[0], x.shape[0], dtype=torch.bool), 1)
    res = x * s
    for layer in layers:
        x, res = layer((x, res), mask)
    return (x * dec_alpha + layer_norm(res)).transpose(0, 1)


@torch.no_grad()
def port_resi_dual(model, s, eps, dtype):
    """resnorm's sublayers -> the authors' layers; ``eps``: their final LayerNorm's (1e-7 in their code)."""
    layers = []
    for block in model.blocks:
        theirs = ResiDualDecoderLayer(D, HEADS, s).to(dtype)
        a = block.attn.branch
        theirs.self_attn.in_proj_weight.copy_(a.qkv.weight)
        theirs.self_attn.in_proj_bias.copy_(a.qkv.bias)
        theirs.self_attn.out_proj.load_state_dict(a.out.state_dict())
        theirs.self_attn_layer_norm.load_state_dict(block.attn.sum_norm.state_dict())
        theirs.fc1.load_state_dict(block.mlp.branch.fc1.state_dict())
        theirs.fc2.load_state_dict(block.mlp.branch.fc2.state_dict())
        theirs.final_layer_norm.load_state_dict(block.mlp.sum_norm.state_dict())
        layers.append(theirs)
    norm = nn.LayerNorm(D, eps=eps).to(dtype)
    norm.load_state_dict(model.final_norm.state_dict())
    return layers, norm


def resi_dual_pair(s, dtype, depth=3):
    model = resnorm_model("resi_dual", depth, f"model.resi_dual_scale={s}", dtype=dtype)
    move_off_init(model)
    x = torch.randn(B, T, D, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return model, x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", [1.0, 0.05])
def test_peer_authors_resi_dual_equals_microsoft_resi_dual(s, dtype):
    """The head input for every s, the authors' OPUS setting s = 0.05 included: their final norm has
    eps 1e-7 on the scaled y, resnorm's has ``model.resi_dual_eps`` (1e-7) on the scaled y."""
    model, x = resi_dual_pair(s, dtype)
    assert model.final_norm.eps == 1e-7 and model.blocks[0].attn.sum_norm.eps == 1e-5
    layers, norm = port_resi_dual(model, s, 1e-7, dtype)
    from resnorm.model.transformer import dual_stream

    with torch.no_grad():
        got = dual_stream(model, x, None)
        want = residual_decoder(x, layers, norm, s)
    assert max_err(got, want) <= TOL[dtype]


def test_peer_authors_resi_dual_wrong_port_is_caught():
    """The port with resnorm's former epsilon (model.norm_eps = 1e-5 on the scaled y) at s = 0.05 is the
    departure the authors' code exposed; the comparison above must reject it."""
    model, x = resi_dual_pair(0.05, torch.float64)
    layers, norm = port_resi_dual(model, 0.05, 1e-5, torch.float64)
    from resnorm.model.transformer import dual_stream

    with torch.no_grad():
        err = max_err(dual_stream(model, x, None), residual_decoder(x, layers, norm, 0.05))
    assert err > TOL[torch.float32]  # fails even the float32 comparison


# --- nGPT ---------------------------------------------------------------------------------------------

class NvidiaBlock(nn.Module):
    """NVIDIA/ngpt ``Block`` with ``use_nGPT == 1`` (its __init__'s parameters and forward), transcribed."""

    def __init__(self, n_embd, n_head, base_scale):
        super().__init__()
        self.n_embd, self.n_head = n_embd, n_head
        self.key = nn.Linear(n_embd, n_embd, bias=False)
        self.query = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.att_c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 2 * 4 * n_embd, bias=False)
        self.silu = nn.SiLU()
        self.mlp_c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)
        self.attn_alpha_init_value, self.attn_alpha_init_scaling = 0.05, base_scale
        self.attn_alpha = nn.Parameter(base_scale * torch.ones(n_embd))
        self.mlp_alpha_init_value, self.mlp_alpha_init_scaling = 0.05, base_scale
        self.mlp_alpha = nn.Parameter(base_scale * torch.ones(n_embd))
        self.sqk_init_value, self.sqk_init_scaling = 1.0, base_scale
        self.sqk = nn.Parameter(base_scale * torch.ones(n_embd))
        self.suv_init_value, self.suv_init_scaling = 1.0, 1.0
        self.suv = nn.Parameter(torch.ones(2 * 4 * n_embd))

    def justnorm(self, x):
        return x / x.norm(p=2, dim=-1, keepdim=True)

    def forward(self, h):
        B_, T_, C = h.size()
        hd = self.n_embd // self.n_head
        hin = h
        q = self.query(hin).view(B_, T_, self.n_head, hd)
        k = self.key(hin).view(B_, T_, self.n_head, hd)
        v = self.value(hin).view(B_, T_, self.n_head, hd)
        sqk = (self.sqk * (self.sqk_init_value / self.sqk_init_scaling)).view(1, 1, self.n_head, hd)
        q = sqk * self.justnorm(q)
        k = sqk * self.justnorm(k)
        softmax_scale = hd ** 0.5
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=softmax_scale).transpose(1, 2)
        y = y.contiguous().view(B_, T_, self.n_embd)
        h_att = self.att_c_proj(y)
        lr = self.attn_alpha * (self.attn_alpha_init_value / self.attn_alpha_init_scaling)
        lr = torch.abs(lr)
        A_norm, B_norm = self.justnorm(h), self.justnorm(h_att)
        h = self.justnorm(A_norm + lr * (B_norm - A_norm))
        hin = h
        uv = self.c_fc(hin)
        suv = self.suv * ((self.suv_init_value / self.suv_init_scaling) * (self.n_embd ** 0.5))
        uv = suv * uv
        u, v = torch.chunk(uv, 2, dim=-1)
        h_mlp = self.mlp_c_proj(u * self.silu(v))
        lr = self.mlp_alpha * (self.mlp_alpha_init_value / self.mlp_alpha_init_scaling)
        lr = torch.abs(lr)
        A_norm, B_norm = self.justnorm(h), self.justnorm(h_mlp)
        return self.justnorm(A_norm + lr * (B_norm - A_norm))


def ngpt_model(dtype, depth=2):
    """d_ff = 6 d: resnorm's SwiGLU width int(2 d_ff / 3) = 4 d, NVIDIA's fixed width. Every scale
    random, a third of every alpha's channels negative; the matrices renormalised in ``dtype`` (unit rows
    in float32 are not unit rows in float64, and NVIDIA's GPT reads E[x] without normalising it)."""
    model = resnorm_model("ngpt", depth, f"model.d_ff={6 * D}", dtype=dtype)
    normalize_matrices(model)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Scaled):
                m.p.copy_(m.scale * (0.5 + torch.rand(m.p.shape, generator=g, dtype=dtype)))
        for alpha in model.stream_params.alpha:
            alpha.p[: D // 3].mul_(-1.0)
    return model


@torch.no_grad()
def port_ngpt(model, dtype, swap_uv=False):
    """Effective values (each side stores its own init/scaling). NVIDIA scales u by sqrt(d) too
    (``suv`` multiplies all of [u; v]); the factor on u passes linearly to h_mlp and Norm removes it."""
    base = D ** -0.5
    alphas = model.stream_params.alpha
    out = []
    for layer, block in enumerate(model.blocks):
        theirs = NvidiaBlock(D, HEADS, base).to(dtype)
        a, m = block.attn.branch, block.mlp.branch
        for i, lin in enumerate((theirs.query, theirs.key, theirs.value)):
            lin.weight.copy_(a.qkv.weight[i * D:(i + 1) * D])
        theirs.att_c_proj.weight.copy_(a.out.weight)
        theirs.sqk.copy_(a.s_qk() * theirs.sqk_init_scaling / theirs.sqk_init_value)
        u, v = m.fc1.weight.chunk(2, dim=0)
        theirs.c_fc.weight.copy_(torch.cat([v, u] if swap_uv else [u, v]))
        theirs.mlp_c_proj.weight.copy_(m.fc2.weight)
        theirs.suv.copy_(torch.cat([m.s_u(), m.s_v()]))
        theirs.attn_alpha.copy_(alphas[2 * layer]() * base / 0.05)
        theirs.mlp_alpha.copy_(alphas[2 * layer + 1]() * base / 0.05)
        out.append(theirs)
    return out


def ngpt_blocks(model, theirs, dtype):
    h = F.normalize(torch.randn(B, T, D, dtype=dtype, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        ours = ngpt_stream(model, h, None)
        for block in theirs:
            h = block(h)
    return ours, h


@pytest.mark.parametrize("dtype", DTYPES)
def test_peer_authors_ngpt_blocks_equal_nvidia_with_negative_alphas(dtype):
    model = ngpt_model(dtype)
    assert all((a() < 0).any() for a in model.stream_params.alpha)
    ours, ref = ngpt_blocks(model, port_ngpt(model, dtype), dtype)
    assert max_err(ours, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_peer_authors_ngpt_model_logits_with_positions_off(dtype):
    """Token ids to logits: NVIDIA's ``GPT.forward`` reads E[x] (unit rows, no position embedding), the
    blocks, then ``sz * lm_head(x)``; resnorm with its position embedding zeroed."""
    model = ngpt_model(dtype)
    theirs = port_ngpt(model, dtype)
    idx = torch.randint(0, model.head.weight.shape[0], (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.pos_emb.weight.zero_()
        x = F.embedding(idx, model.tok_emb.weight)
        for block in theirs:
            x = block(x)
        base = D ** -0.5  # GPT: sz stored at sz_init_scaling = base_scale, read as sz * (1.0 / base_scale)
        sz = model.head.s_z() * base
        ref = (sz * (1.0 / base)) * F.linear(x, model.head.weight)
        ours = model(idx)
    assert max_err(ours, ref) <= TOL[dtype]


def test_peer_authors_ngpt_wrong_port_is_caught():
    """W_1's halves swapped (u <-> v): the SwiGLU then gates the other half."""
    model = ngpt_model(torch.float64)
    ours, ref = ngpt_blocks(model, port_ngpt(model, torch.float64, swap_uv=True), torch.float64)
    assert max_err(ours, ref) > TOL[torch.float32]  # fails even the float32 comparison


# --- mHC ----------------------------------------------------------------------------------------------
# tile_kernels/torch/mhc.py, the casts lifted

def expand_to_mhc_ref(hidden, mhc_mult):
    return hidden.unsqueeze(-2).expand(*hidden.shape[:-1], mhc_mult, hidden.shape[-1]).contiguous()


def sinkhorn_normalize_ref(x, repeat=10, eps=1e-6):
    x = x.softmax(-1) + eps
    x = x / (x.sum(-2, keepdim=True) + eps)
    for _ in range(repeat - 1):
        x = x / (x.sum(-1, keepdim=True) + eps)
        x = x / (x.sum(-2, keepdim=True) + eps)
    return x


def mhc_head_compute_mix_ref(input_mix, mhc_scale, mhc_base, mhc_pre_eps):
    return torch.sigmoid(input_mix * mhc_scale + mhc_base) + mhc_pre_eps


def mhc_pre_split_mixes_ref(input_mixes, mhc_scale, mhc_base, mhc_mult, mhc_post_mult_value, mhc_pre_eps):
    a, b = input_mixes.shape[:2]
    mhc_scale = torch.cat([mhc_scale[0].expand(mhc_mult), mhc_scale[1].expand(mhc_mult),
                           mhc_scale[2].expand(mhc_mult * mhc_mult)])
    input_mixes = input_mixes * mhc_scale + mhc_base
    pre_layer_mix = input_mixes[:, :, :mhc_mult].sigmoid().unsqueeze(-1) + mhc_pre_eps
    post_layer_mix = (input_mixes[:, :, mhc_mult:2 * mhc_mult].sigmoid() * mhc_post_mult_value).unsqueeze(-1)
    comb_res_mix = input_mixes[:, :, 2 * mhc_mult:].view(a, b, mhc_mult, mhc_mult)
    return pre_layer_mix, post_layer_mix, comb_res_mix


def mhc_pre_apply_mix_ref(x, mix):
    return (x * mix).sum(-2)


def mhc_post_ref(x, residual, post_layer_mix, comb_res_mix):
    term2 = torch.einsum("abmn,abmc->abnc", comb_res_mix, residual)
    return x.unsqueeze(-2) * post_layer_mix + term2


def mhc_pre_norm_fn_ref(residual, mhc_fn, mhc_norm_weight, mhc_norm_eps):
    if mhc_norm_weight is not None:
        mhc_fn = mhc_fn * mhc_norm_weight
    residual = residual.flatten(2, 3)
    mhc_mult = mhc_fn.shape[0]
    rms_group_size = mhc_fn.shape[-1]
    mixes = torch.einsum("mbk,nbk->mbn", residual.view(-1, 1, rms_group_size), mhc_fn.view(mhc_mult, 1, rms_group_size))
    sqrsum = residual.view(-1, 1, rms_group_size).square().sum(-1)
    mixes = (mixes * (sqrsum.unsqueeze(-1) / rms_group_size + mhc_norm_eps).rsqrt()).sum(-2)
    return mixes.view(*residual.shape[:2], -1)


def mhc_pre(residual, fn, scale, base, *, norm_eps, mhc_mult, post_mult_value, pre_eps, sinkhorn_eps, sinkhorn_repeat):
    """functional.py ``mhc_pre``, the grad-enabled path."""
    mixes = mhc_pre_norm_fn_ref(residual, fn, None, norm_eps)
    pre_mix, post_mix, comb_mix = mhc_pre_split_mixes_ref(mixes, scale, base, mhc_mult, post_mult_value, pre_eps)
    comb_mix = sinkhorn_normalize_ref(comb_mix, repeat=sinkhorn_repeat, eps=sinkhorn_eps)
    return mhc_pre_apply_mix_ref(residual, pre_mix), (post_mix, comb_mix)


def mhc_head(residual, fn, scale, base, *, norm_eps, mhc_mult, pre_eps):
    """functional.py ``mhc_head``."""
    mhc_mult3 = mhc_mult * (2 + mhc_mult)
    if fn.shape[0] < mhc_mult3:
        fn = F.pad(fn, (0, 0, 0, mhc_mult3 - fn.shape[0]))
    mixes = mhc_pre_norm_fn_ref(residual, fn, None, norm_eps)[..., :mhc_mult]
    if scale.numel() == 1:
        scale = scale.reshape(1)
    mix = mhc_head_compute_mix_ref(mixes, scale, base, pre_eps)
    return mhc_pre_apply_mix_ref(residual, mix.unsqueeze(-1))


def deepseek_layer_weights(conn, n, transpose_res=True):
    """resnorm's (phi (n d, 2n + n n), b_pre, b_post, b_res [target, source]) -> DeepSeek's (fn (n(n+2), n d),
    base) with the comb block laid out [source, target] (``einsum('abmn,abmc->abnc')``: m the source).
    ``transpose_res=False`` is the wrong port."""
    res_cols = conn.phi[:, 2 * n:].T.reshape(n, n, -1)  # [target, source, n d]
    b_res = conn.b_res
    if transpose_res:
        res_cols, b_res = res_cols.transpose(0, 1), b_res.T
    fn = torch.cat([conn.phi[:, :2 * n].T, res_cols.reshape(n * n, -1)])
    return fn, torch.cat([conn.b_pre, conn.b_post, b_res.reshape(-1)])


def deepseek_hidden(model, x, transpose_res=True):
    """x_0 -> expand -> per sublayer mhc_pre, resnorm's branch, mhc_post -> mhc_head -> the final norm."""
    conns, o = model.stream_params, model.shape.options
    n, eps = conns.n, model.shape.norm_eps
    residual = expand_to_mhc_ref(x, n)
    for sub, conn in zip(model.sublayers(), conns.layers):
        fn, base = deepseek_layer_weights(conn, n, transpose_res)
        layer_input, (post, comb) = mhc_pre(residual, fn, conn.scales, base, norm_eps=eps, mhc_mult=n,
                                            post_mult_value=2.0, pre_eps=1e-6, sinkhorn_eps=1e-6,
                                            sinkhorn_repeat=o.mhc_sinkhorn_iters)
        residual = mhc_post_ref(sub.run(layer_input).f, residual, post, comb)
    h = mhc_head(residual, conns.head.phi.T, conns.head.scale, conns.head.bias, norm_eps=eps, mhc_mult=n, pre_eps=1e-6)
    return model.final_norm(h)


def mhc_model(dtype, depth=3):
    model = resnorm_model("mhc", depth, "model.hc_streams=4", "model.mhc_sinkhorn_iters=10", dtype=dtype)
    move_off_init(model)
    return model


@pytest.mark.parametrize("dtype", DTYPES)
def test_peer_authors_mhc_equals_deepseek_reference(dtype):
    model = mhc_model(dtype)
    assert MHC_PRE_EPS == MHC_SINKHORN_EPS == 1e-6 and model.stream_params.layers[0].eps == model.shape.norm_eps
    idx = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = model.embed(idx)
        ours, ref = model.hidden(idx), deepseek_hidden(model, x)
        logits = model(idx)
    assert max_err(ours, ref) <= TOL[dtype]
    assert max_err(logits, model.head(ref)) <= TOL[dtype] * 10


def test_peer_authors_mhc_wrong_port_is_caught():
    """H_res's logits handed over in resnorm's [target, source] order, not transposed to DeepSeek's."""
    model = mhc_model(torch.float64)
    idx = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = max_err(model.hidden(idx), deepseek_hidden(model, model.embed(idx), transpose_res=False))
    assert err > TOL[torch.float32]  # fails even the float32 comparison


def test_mhc_sum_head_is_kept_as_an_option():
    """``model.mhc_head=sum``: no head parameters, the final norm reads the plain sum of the streams."""
    model = resnorm_model("mhc", 2, "model.mhc_head=sum")
    assert model.stream_params.head is None
    H = torch.randn(4, B, T, D, dtype=torch.float64)
    assert torch.equal(model.stream_params.read(H), H.sum(0))
    assert math.isclose(resnorm_model("mhc", 2).stream_params.head.mix(H).mean().item(), 0.5 + 1e-6)
