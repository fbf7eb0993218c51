"""Forward/backward measurements of a model's signal propagation, for the paper reproductions.

Two layers, both hook-free:

- tensor math on activations, each the formula of a paper (tested against hand-computed values):
  :func:`rms`, :func:`branch_ratio`, :func:`update_ratio`, :func:`output_change`,
  :func:`token_cosine`, :func:`rank1_residual`, :func:`angular_distance`, :func:`dependency`,
  :func:`absmax`, :func:`kurtosis`, :func:`attention_entropy`, :func:`sink_mass`, :func:`log_partition`;
- model-level measurements built on :meth:`resnorm.model.transformer.Transformer.trace`:
  :func:`layer_profile` (per layer: activation RMS, branch-to-skip ratio, token cosine, rank-1
  residual, angular distance to the previous layer, max attention logit), :func:`grad_norms`
  (per-layer gradient norms at init), :func:`perturbation_change` (Admin's amplification),
  :func:`model_update` (DeepNet's ``||f(x; theta_t) - f(x; theta_0)||``), :func:`dependency_matrix`
  (Admin's beta^2) and :func:`attention_only` (the no-MLP paths of Dong et al. 2021).

Conventions: activations are ``(batch, tokens, d)``; per-token statistics are averaged over batch
and tokens; "layer" is a block (attention + MLP), "sublayer" one of the two.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

# --- tensor math -------------------------------------------------------------------------------------


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over all elements: sqrt(mean(x^2))."""
    return x.float().pow(2).mean().sqrt()


def branch_ratio(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||F(x)||_F / ||x||_F: the size of a branch's output against the stream it is added to."""
    return f.float().norm() / x.float().norm()


def update_ratio(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """||W_new - W_old||_F / ||W_old||_F."""
    return (new.float() - old.float()).norm() / old.float().norm()


def output_change(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMS over tokens of ||a_t - b_t|| / sqrt(d) (Liu et al. 2020; Wang et al. 2022): the elementwise RMS of a - b."""
    return rms(a - b)


def token_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over distinct token pairs (i != j), averaged over the batch (Noci et al. 2022)."""
    x = x.float()
    if x.dim() == 2:
        x = x.unsqueeze(0)
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    g = u @ u.transpose(-1, -2)  # (b, t, t)
    t = g.shape[-1]
    if t < 2:
        raise ValueError("token cosine needs at least two tokens")
    off = g.sum(dim=(-1, -2)) - g.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (off / (t * (t - 1))).mean()


def rank1_residual(x: torch.Tensor) -> torch.Tensor:
    """||X - 1 mu^T||_F / ||X||_F with mu the token mean, averaged over the batch (Dong et al. 2021).

    The token mean is the Frobenius-optimal token-uniform (rank-1 ``1 x^T``) approximation; Dong et al.
    use the composite l1/l-inf norm, this is the Frobenius proxy of docs/papers.md §6.
    """
    x = x.float()
    if x.dim() == 2:
        x = x.unsqueeze(0)
    res = x - x.mean(dim=-2, keepdim=True)
    return (res.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-30)).mean()


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(1/pi) arccos(a.b / (||a|| ||b||)) per token, averaged over tokens (Gromov et al. 2024; Sun et al. 2025)."""
    a, b = a.float(), b.float()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)
    return (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).mean()


def variance(x: torch.Tensor) -> torch.Tensor:
    """Variance over all elements (the residual-stream variance of Sun et al. 2025)."""
    return x.float().var(unbiased=False)


def dependency(components: Sequence[torch.Tensor]) -> torch.Tensor:
    """beta^2_j = Var(c_j) / sum_k Var(c_k) for additive components of one stream (Liu et al. 2020, Fig. 7)."""
    v = torch.stack([variance(c) for c in components])
    return v / v.sum()


def absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over all elements (the "massive activations" of Sun et al. 2024, arXiv:2402.17762)."""
    return x.float().abs().amax()


def kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Plain (not excess) kurtosis over all elements: E[(x - mu)^4] / sigma^4, mu and sigma the mean
    and population standard deviation of all elements (3 for a Gaussian; outlier features raise it,
    Bondarenko et al. 2023, arXiv:2306.12929). A constant tensor gives NaN (0 / 0)."""
    x = x.float()
    z = (x - x.mean()) / x.std(unbiased=False)
    return z.pow(4).mean()


def attention_entropy(p: torch.Tensor) -> torch.Tensor:
    """-sum_j p_ij log p_ij in nats, per query: ``p`` (..., T_q, T_k) attention probabilities, rows
    summing to 1 (masked keys have p = 0 and add 0); returns (..., T_q)."""
    return -torch.special.xlogy(p, p).sum(-1)


def sink_mass(p: torch.Tensor) -> torch.Tensor:
    """Mean attention probability on the first key (the "attention sink", Xiao et al. 2023,
    arXiv:2309.17453), over every other dimension of ``p`` (..., T_q, T_k)."""
    return p[..., 0].float().mean()


def log_partition(logits: torch.Tensor) -> torch.Tensor:
    """log Z = logsumexp over the last (vocabulary) dimension, per token (Wortsman et al. 2023, §3.2)."""
    return torch.logsumexp(logits.float(), dim=-1)


# --- model-level measurements ------------------------------------------------------------------------


def random_tokens(vocab: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """A fixed probe batch of uniformly random token ids (init-time probes need no data)."""
    return torch.randint(vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def set_causal(model: nn.Module, causal: bool) -> nn.Module:
    """Make every attention causal or bidirectional (Dong/Noci's rank collapse is stated bidirectionally)."""
    from resnorm.model.blocks import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            m.causal = causal
    return model


@torch.no_grad()
def layer_profile(model, idx: torch.Tensor) -> List[Dict[str, float]]:
    """Per-layer statistics of one forward pass, one dict per layer (``layer`` 0 = the embedding).

    Keys: ``act_rms`` and ``variance`` of the residual stream after the layer, ``branch_ratio_attn`` /
    ``branch_ratio_mlp`` (||F|| / ||x|| of the layer's sublayers), ``token_cosine``, ``rank1_residual``,
    ``angular_distance`` (to the previous layer's stream), ``max_attn_logit``. One host transfer.
    """
    tr = model.trace(idx)
    stream, parts = tr["stream"], tr["parts"]
    rows: List[Dict[str, torch.Tensor]] = []
    nan = torch.tensor(float("nan"))
    for layer, x in enumerate(stream):
        row = dict(act_rms=rms(x), variance=variance(x), token_cosine=token_cosine(x),
                   rank1_residual=rank1_residual(x))
        if layer == 0:
            row.update(angular_distance=nan, branch_ratio_attn=nan, branch_ratio_mlp=nan, max_attn_logit=nan)
        else:
            a, m = parts[2 * layer - 2], parts[2 * layer - 1]
            row.update(angular_distance=angular_distance(stream[layer - 1], x),
                       branch_ratio_attn=branch_ratio(a.f, a.x), branch_ratio_mlp=branch_ratio(m.f, m.x),
                       max_attn_logit=tr["max_logit"][layer - 1])
        rows.append(row)
    keys = list(rows[0])
    flat = torch.stack([torch.as_tensor(r[k]).float().cpu() for r in rows for k in keys]).tolist()
    return [dict(layer=i, **{k: flat[i * len(keys) + j] for j, k in enumerate(keys)}) for i in range(len(rows))]


def grad_norms(model, idx: torch.Tensor, targets: torch.Tensor) -> Dict[str, List[float]]:
    """Per-layer gradient Frobenius norms of one loss backward at the current parameters.

    Returns lists over layers for ``fc2`` (the FFN output weight, Xiong et al. Fig. 3), ``fc1``, ``qkv``,
    ``out`` and ``attn`` / ``mlp`` (all parameters of each sublayer). Gradients are left zeroed.
    """
    model.zero_grad(set_to_none=True)
    model.loss(idx, targets).backward()
    groups = {"fc2": [], "fc1": [], "qkv": [], "out": [], "attn": [], "mlp": []}
    tensors = []
    for block in model.blocks:
        br_a, br_m = block.attn.branch, block.mlp.branch
        tensors += [br_m.fc2.weight.grad, br_m.fc1.weight.grad, br_a.qkv.weight.grad, br_a.out.weight.grad]
        tensors.append(torch.sqrt(sum(p.grad.float().pow(2).sum() for p in block.attn.parameters() if p.grad is not None)))
        tensors.append(torch.sqrt(sum(p.grad.float().pow(2).sum() for p in block.mlp.parameters() if p.grad is not None)))
    values = torch.stack([t.float().norm() for t in tensors]).tolist()
    names = list(groups)
    for i, v in enumerate(values):
        groups[names[i % len(names)]].append(v)
    model.zero_grad(set_to_none=True)
    return groups


def branch_matrices(model) -> List[nn.Parameter]:
    """Every 2-D weight of the blocks (attention qkv/out, MLP fc1/fc2): embeddings and head excluded."""
    return [p for block in model.blocks for p in block.parameters() if p.dim() == 2]


@torch.no_grad()
def perturbation_change(model, idx: torch.Tensor, eps: float = 1e-2, seed: int = 0) -> float:
    """Admin's amplification measure (Liu et al. 2020, Fig. 4): output change under a weight perturbation.

    Every 2-D block weight W gets ``eps * std(W) * N(0, 1)``; returns :func:`output_change` of the final
    hidden state (after the final norm) on the probe batch ``idx``. The model is restored.
    """
    before = model.hidden(idx)
    gen = torch.Generator().manual_seed(seed)
    weights = branch_matrices(model)
    saved = [w.detach().clone() for w in weights]
    try:
        for w in weights:
            noise = torch.randn(w.shape, generator=gen).to(w.device, w.dtype)
            w.add_(eps * w.std() * noise)
        after = model.hidden(idx)
    finally:
        for w, s in zip(weights, saved):
            w.copy_(s)
    return output_change(after, before).item()


def model_update(model, idx: torch.Tensor, targets: torch.Tensor, steps: int = 1, optimizer: str = "adam",
                 lr: float = 1e-4, betas=(0.9, 0.98), probe: Optional[torch.Tensor] = None) -> float:
    """DeepNet's model update ``||f(x; theta_t) - f(x; theta_0)||`` (Wang et al. 2022, Fig. 5).

    Takes ``steps`` optimizer steps (Adam with ``betas`` or SGD, constant ``lr``, no warm-up) on the
    batch (idx, targets) with a copy of the model, and returns :func:`output_change` of the final hidden
    state on ``probe`` (default: ``idx``). The model passed in is not modified.
    """
    probe = idx if probe is None else probe
    work = copy.deepcopy(model)
    with torch.no_grad():
        before = work.hidden(probe)
    opt = (torch.optim.Adam(work.parameters(), lr=lr, betas=betas) if optimizer == "adam"
           else torch.optim.SGD(work.parameters(), lr=lr))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        work.loss(idx, targets).backward()
        opt.step()
    with torch.no_grad():
        after = work.hidden(probe)
    return output_change(after, before).item()


@torch.no_grad()
def dependency_matrix(model, idx: torch.Tensor) -> torch.Tensor:
    """Admin's dependency beta^2_{i,j} (Liu et al. 2020, Fig. 7), as in Transformer-Clinic's ``plot_variance``.

    The stream is tracked as additive components [x_0 (embedding), f_1, f_2, ...]. At sublayer i the
    skip multiplies every component by its skip factor (fitted per channel from the trace, so a scalar
    alpha or Admin's vector omega are both exact), the branch output f_i is appended, and a sum norm
    (LayerNorm: centre each component per token, divide all by the sum's per-token std, times gain;
    RMSNorm: divide by the sum's RMS, times gain) rescales them; norm biases are ignored (0 at init).
    A sublayer without residual restarts the list at its branch. Returns a (S, S + 1) matrix, S the
    number of sublayers: row i holds beta^2_{i,j} = Var(c_j) / sum_k Var(c_k) for j <= i + 1 (column 0
    is the embedding), NaN above. Other norm layers than LayerNorm/RMSNorm raise NotImplementedError.
    """
    tr = model.trace(idx, max_logits=False)
    parts = tr["parts"]
    subs = [s for block in model.blocks for s in (block.attn, block.mlp)]
    n = len(parts)
    comps: List[Optional[torch.Tensor]] = [parts[0].x.float()]
    out = torch.full((n, n + 1), float("nan"))
    for i, (sub, p) in enumerate(zip(subs, parts)):
        skip = (p.z - p.f).float()
        if skip.norm() <= 1e-6 * p.z.float().norm():  # no residual: the stream restarts at the branch
            comps = [None] * (i + 1)
        else:  # skip = omega * x with a per-channel (or scalar) omega: least squares per channel
            x = p.x.float()
            omega = (skip * x).sum(dim=(0, 1)) / x.pow(2).sum(dim=(0, 1)).clamp_min(1e-30)
            comps = [None if c is None else c * omega for c in comps]
        comps.append(p.f.float())
        norm = sub.sum_norm
        if norm is not None:
            z = p.z.float()
            if isinstance(norm, nn.LayerNorm):
                scale = norm.weight.float() / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + norm.eps)
                comps = [None if c is None else (c - c.mean(-1, keepdim=True)) * scale for c in comps]
            elif isinstance(norm, nn.RMSNorm):
                eps = norm.eps if norm.eps is not None else torch.finfo(z.dtype).eps
                scale = norm.weight.float() / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + eps)
                comps = [None if c is None else c * scale for c in comps]
            else:
                raise NotImplementedError(f"dependency through a {type(norm).__name__} sum norm")
        present = [j for j, c in enumerate(comps) if c is not None]
        beta = dependency([comps[j] for j in present])
        out[i, present] = beta.cpu()
        out[i, [j for j in range(i + 2) if comps[j] is None]] = 0.0
    return out


@torch.no_grad()
def attention_only(model, idx: torch.Tensor, path: str = "san") -> List[torch.Tensor]:
    """The stream through the blocks' attention sublayers only (the MLPs removed), Dong et al. 2021's paths.

    ``path``: ``san`` (pure self-attention, no skip, no norm: x <- Attn(x)), ``san_ln``
    (x <- Attn(LN(x)), the sublayer's own pre-norm), ``skip`` (the attention sublayer as the variant
    defines it, skip included: x <- Sublayer_attn(x)). Returns the stream at the embedding and after
    every block (depth + 1 tensors).
    """
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1], device=idx.device))
    out = [x]
    for block in model.blocks:
        sub = block.attn
        if path == "san":
            x = sub.branch(x)
        elif path == "san_ln":
            if sub.pre_norm is None:
                raise ValueError("path 'san_ln' needs a variant with a pre-norm (pre, rmsnorm, noresidual)")
            x = sub.branch(sub.pre_norm(x))
        elif path == "skip":
            x = sub(x)
        else:
            raise ValueError(f"path={path!r}: choose san, san_ln or skip")
        out.append(x)
    return out


__all__ = ["rms", "branch_ratio", "update_ratio", "output_change", "token_cosine", "rank1_residual",
           "angular_distance", "variance", "dependency", "random_tokens", "set_causal", "layer_profile",
           "grad_norms", "branch_matrices", "perturbation_change", "model_update", "dependency_matrix",
           "attention_only", "absmax", "kurtosis", "attention_entropy", "sink_mass", "log_partition"]
