"""The implementations under test, each as a ready-to-call training step on the same batches.

- ``ours``: ``resnorm.model.transformer.build_model(compose(...))`` (the real code path) with the optimizer of
  ``resnorm.train.loop.make_optimizer`` and :class:`resnorm.monitors.probes.GradNormProbe`; the step is what
  ``resnorm.train.loop.fit`` does per step: set the lr, forward + loss, backward, ``probe.before_update()``,
  one host transfer of loss and statistics, AdamW step, ``zero_grad(set_to_none=True)``.
  ``probes=True`` is the default config (per-layer gradient norms every step); ``probes=False`` is
  ``GradNormProbe(model, per_layer=False)`` (the total gradient norm only).
- ``hf_gpt2``: ``transformers.GPT2LMHeadModel`` built from a ``GPT2Config`` (no weights downloaded).
- ``x_transformers``: ``TransformerWrapper(Decoder(...))``.

A peer's step does what a user logging loss and gradient norm does: forward, the same cross-entropy,
backward, the total gradient norm (one ``torch._foreach_norm``), one host transfer, AdamW
(``foreach=True``, the same hyper-parameters), ``zero_grad(set_to_none=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .common import compose, reference_overrides


@dataclass
class Impl:
    name: str
    model: torch.nn.Module
    step: Callable[[], List[float]]  # one training step; returns the host values (loss first)
    n_params: int
    note: str = ""
    extra: dict = field(default_factory=dict)


def make_batches(n: int, batch: int, seq: int, vocab: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = torch.randint(vocab, (batch, seq + 1), generator=g)
        out.append((w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device)))
    return out


class _Cycle:
    def __init__(self, items):
        self.items, self.i = items, 0

    def __call__(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


def ours(depth: int, ref: dict, device="cpu", probes: bool = True, norm: str = "pre", batches=None,
         optimizer_fn=None, extra_overrides: Sequence[str] = (), autocast_dtype=None, compile_loss: bool = False,
         name: Optional[str] = None, seed: int = 0) -> Impl:
    """Our model through the real code path; ``optimizer_fn`` lets :mod:`benchmarks.speedups` swap in
    a prototype optimizer for a side-by-side measurement."""
    from resnorm.model.transformer import build_model
    from resnorm.monitors.probes import GradNormProbe
    from resnorm.train.loop import lr_at, make_optimizer

    cfg = compose(*reference_overrides(depth, ref, norm=norm, extra=extra_overrides))
    torch.manual_seed(seed)
    model = build_model(cfg)
    model = model.to(device).train()
    optimizer = (optimizer_fn or make_optimizer)(model, cfg.optim)
    probe = GradNormProbe(model, per_layer=probes)
    loss_fn = torch.compile(model.loss) if compile_loss else model.loss
    data = _Cycle(batches or make_batches(4, ref["batch"], ref["seq"], ref["vocab"], device))
    lr = lr_at(100, cfg.optim, 1000)

    def step() -> List[float]:
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = data()
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            loss = loss_fn(x, y)
        loss.backward()
        stats = probe.before_update()
        host = torch.cat([loss.detach().float().view(1), stats]).tolist()  # one host transfer
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return host

    label = name or f"ours{'' if probes else ' (probes off)'}"
    return Impl(label, model, step, sum(p.numel() for p in model.parameters()),
                extra=dict(probe=probe, cfg=cfg, optimizer=optimizer))


def _peer_step(model, logits_fn, ref, device, batches, autocast_dtype, cfg_optim) -> Callable[[], List[float]]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg_optim["lr"], betas=cfg_optim["betas"],
                                  eps=cfg_optim["eps"], weight_decay=0.0, foreach=True)
    data = _Cycle(batches or make_batches(4, ref["batch"], ref["seq"], ref["vocab"], device))
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> List[float]:
        x, y = data()
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            logits = logits_fn(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
        loss.backward()
        total = torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None])).norm()
        host = torch.stack([loss.detach().float(), total.float()]).tolist()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return host

    return step


OPTIM = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-8)  # conf/optim/adamw.yaml


def hf_gpt2(depth: int, ref: dict, device="cpu", batches=None, autocast_dtype=None, seed: int = 0) -> Impl:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    config = GPT2Config(vocab_size=ref["vocab"], n_positions=ref["seq"], n_embd=ref["d_model"], n_layer=depth,
                        n_head=ref["n_heads"], n_inner=ref["d_ff"], activation_function="gelu",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                        tie_word_embeddings=False, use_cache=False, bos_token_id=None, eos_token_id=None)
    try:
        config._attn_implementation = "sdpa"
    except Exception:  # noqa: BLE001 - older/newer transformers: keep its default
        pass
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(device).train()
    attn = getattr(model.config, "_attn_implementation", "?")
    step = _peer_step(model, lambda x: model(input_ids=x, use_cache=False).logits, ref, device, batches,
                      autocast_dtype, OPTIM)
    return Impl("hf_gpt2", model, step, sum(p.numel() for p in model.parameters()),
                note=f"transformers {transformers.__version__}, attn={attn}, gelu exact, untied head",
                extra=dict(attn_implementation=attn))


def x_transformers(depth: int, ref: dict, device="cpu", batches=None, autocast_dtype=None, flash: bool = True,
                   seed: int = 0) -> Impl:
    from importlib.metadata import version

    from x_transformers import Decoder, TransformerWrapper

    assert ref["d_ff"] % ref["d_model"] == 0
    torch.manual_seed(seed)
    model = TransformerWrapper(
        num_tokens=ref["vocab"], max_seq_len=ref["seq"],
        attn_layers=Decoder(dim=ref["d_model"], depth=depth, heads=ref["n_heads"],
                            attn_dim_head=ref["d_model"] // ref["n_heads"], ff_mult=ref["d_ff"] // ref["d_model"],
                            attn_flash=flash),
    ).to(device).train()
    step = _peer_step(model, model, ref, device, batches, autocast_dtype, OPTIM)
    name = "x_transformers" if flash else "x_transformers (no flash)"
    return Impl(name, model, step, sum(p.numel() for p in model.parameters()),
                note=f"x-transformers {version('x-transformers')}, attn_flash={flash} "
                     "(no attention biases, LayerNorm without beta)")


def available_peers() -> dict:
    """Which peers can be imported here ({name: None or the reason it cannot})."""
    out = {}
    for name, mod in (("hf_gpt2", "transformers"), ("x_transformers", "x_transformers")):
        try:
            __import__(mod)
            out[name] = None
        except Exception as exc:  # noqa: BLE001
            out[name] = f"{type(exc).__name__}: {exc} (pip install -e '.[bench]')"
    return out
