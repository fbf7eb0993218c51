"""model.objective=mlm: BERT's masking, a bidirectional encoder for every variant, DeepNorm's encoder
constants, masks restored on resume, fixed validation masks, and the objective registry."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import TINY, Interrupt, compose, interrupt_at
from resnorm.model.blocks import Attention
from resnorm.model.transformer import build_model
from resnorm.train.objectives import (IGNORE, MASK_FRACTION, OBJECTIVES, VAL_MASK_SEED, MaskedSampler, for_config,
                                mask_tokens)
from resnorm.train.job import JobInfo, train
from resnorm.config.variants import VARIANTS, deepnorm_constants

MLM = (*TINY, "model.objective=mlm")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: torch on one thread, restored after


def test_bert_masking_chooses_15_percent_and_splits_them_80_10_10():
    vocab, rows, t = 50, 4000, 40
    x = torch.randint(vocab, (rows, t), generator=torch.Generator().manual_seed(1))
    inputs, targets = mask_tokens(x, vocab, vocab, torch.Generator().manual_seed(2))
    chosen = targets != IGNORE
    k = round(MASK_FRACTION * t)
    assert chosen.sum(dim=1).tolist() == [k] * rows  # exactly round(0.15 T) per sequence
    assert torch.equal(targets[chosen], x[chosen])  # the targets are the original tokens
    assert torch.equal(inputs[~chosen], x[~chosen])  # nothing else is touched
    n = rows * k
    masked = (inputs[chosen] == vocab).sum().item()
    changed = ((inputs[chosen] != vocab) & (inputs[chosen] != x[chosen])).sum().item()
    # binomial counts within 5 standard deviations of their expectation
    assert abs(masked - 0.8 * n) < 5 * math.sqrt(n * 0.8 * 0.2)
    # a random replacement equals the original token 1 / vocab of the time
    p_changed = 0.1 * (1 - 1 / vocab)
    assert abs(changed - p_changed * n) < 5 * math.sqrt(n * p_changed * (1 - p_changed))
    assert int(inputs.max()) == vocab and int(inputs[inputs != vocab].max()) < vocab
    one = mask_tokens(torch.zeros(2, 3, dtype=torch.long), vocab, vocab, torch.Generator().manual_seed(0))[1]
    assert ((one != IGNORE).sum(dim=1) == 1).all()  # a short sequence still has one scored position


def test_the_objective_registry_matches_the_config_choices():
    from resnorm.config.schema import OBJECTIVES as CHOICES, leaf

    assert CHOICES == tuple(n for n, o in OBJECTIVES.items() if o.pretraining)
    assert leaf("model.objective").choices == CHOICES and leaf("model.objective").default == "clm"
    assert for_config(compose(*TINY)).name == "clm" and for_config(compose(*MLM)).name == "mlm"


def test_mlm_model_is_an_encoder_with_one_extra_token():
    clm, mlm = build_model(compose(*TINY)), build_model(compose(*MLM))
    assert mlm.shape.vocab_size == clm.shape.vocab_size + 1 == 257
    assert mlm.tok_emb.weight.shape[0] == mlm.head.weight.shape[0] == 257
    assert all(m.causal for m in clm.modules() if isinstance(m, Attention))
    assert not any(m.causal for m in mlm.modules() if isinstance(m, Attention))


def _depends_on_the_last_token(model, vocab: int) -> bool:
    """Whether position 0's logits change with the last token, weights jittered (ReZero's alpha = 0 at
    init would hide every branch)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randint(vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % vocab
    with torch.no_grad():
        return not torch.allclose(model(x)[:, 0], model(y)[:, 0])


@pytest.mark.parametrize("norm", sorted(VARIANTS))
def test_every_variant_trains_as_an_encoder(norm, tmp_path):
    """Every registered variant: bidirectional at depth 2 (the first position sees the last token,
    which a causal model's never does), and 3 steps of MLM training to a completed run."""
    cfg = compose(*MLM, f"model.norm={norm}", "depth=2", "model.d_model=32", "train.steps=3",
                  "train.eval_every=3", "train.probe_every=1")
    assert _depends_on_the_last_token(build_model(cfg), 64), norm
    if norm == "pre":
        assert not _depends_on_the_last_token(build_model(compose(*TINY, "depth=2", "model.d_model=32")), 64)
    summary = train(cfg, JobInfo(tmp_path, norm, "g", []))
    assert summary["status"] == "completed" and math.isfinite(summary["final_val_loss"]), norm
    assert summary["outcome"] in ("trained", "stalled") and summary["unigram_loss"] > 0
    layers = pd.read_parquet(tmp_path / "layers.parquet")
    assert {"grad_norm", "act_rms", "attn_entropy_mean"} <= set(layers.quantity)


def test_encoder_attention_maps_see_every_token():
    """The probes' attention probabilities follow the objective: an encoder's rows put mass above
    the diagonal, a decoder's none; both sum to 1."""
    for over, above in ((TINY, False), (MLM, True)):
        model = build_model(compose(*over, "depth=1"))
        attn = model.blocks[0].attn
        x = model.embed(torch.randint(64, (2, 8)))
        p = attn.branch.attention_probs(attn.pre_norm(x) if attn.pre_norm is not None else x)
        assert torch.allclose(p.sum(-1), torch.ones(()))
        upper = p.triu(1).sum().item()
        assert (upper > 0.1) if above else upper == 0.0


def test_deepnorm_takes_its_encoder_constants_for_mlm():
    depth = 6
    model = build_model(compose(*MLM, "model.norm=deepnorm", f"depth={depth}"))
    alpha, beta = deepnorm_constants(encoder_layers=depth).encoder
    assert all(s.spec.skip_scale == alpha for s in model.sublayers())
    assert VARIANTS["deepnorm"].branch_gain(depth, _opts(model)) == beta


def _opts(model):
    return model.shape.options


def test_validation_masks_are_fixed_and_the_same_for_every_seed():
    a, b = (OBJECTIVES["mlm"].val_batches(compose(*MLM, f"seed={s}"), _data(compose(*MLM))) for s in (0, 3))
    assert len(a) == 2 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    g = torch.Generator().manual_seed(VAL_MASK_SEED)
    assert torch.equal(a[0][1], mask_tokens(_clm_x(compose(*MLM)), 256, 256, g)[1])


def _data(cfg):
    return OBJECTIVES["mlm"].load(cfg)


def _clm_x(cfg):
    return OBJECTIVES["clm"].val_batches(cfg, _data(cfg))[0][0]


def test_the_sampler_masks_from_its_checkpointed_generator():
    stream = torch.arange(500) % 64
    s = MaskedSampler(stream, 4, 16, seed=0, vocab=256)
    s.sample()
    state = s.generator.get_state()
    first = s.sample()
    s.generator.set_state(state)
    again = s.sample()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_mlm_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Interrupted after a checkpoint and resumed: the same losses as an uninterrupted run (the
    masks come from the sampler's generator, which the checkpoint restores)."""
    over = (*MLM, "depth=2", "train.steps=8", "train.checkpoint_every=4", "train.eval_every=4")
    train(compose(*over), JobInfo(tmp_path / "ref", "ref", "g", []))
    interrupt_at(monkeypatch, 6)
    with pytest.raises(Interrupt):
        train(compose(*over), JobInfo(tmp_path / "b", "b", "g", []))
    monkeypatch.undo()
    done = train(compose(*over), JobInfo(tmp_path / "b", "b", "g", []))
    assert done["resumed_from_step"] == 4
    cols = ["step", "train_loss", "grad_norm", "val_loss"]
    pd.testing.assert_frame_equal(pd.read_parquet(Path(tmp_path / "ref" / "metrics.parquet"))[cols],
                                  pd.read_parquet(Path(tmp_path / "b" / "metrics.parquet"))[cols])
