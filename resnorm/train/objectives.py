"""What a run trains the model to do: a registry of objectives that :func:`resnorm.train.loop.setup` reads.

An :class:`Objective` gives the loop its data, its model, its batch sampler and its validation
batches; :func:`resnorm.train.loop.fit` then trains every objective alike (guard, outcomes, probes,
monitors, W&B, checkpoints and the run store unchanged). Every model's loss is its own ``loss(x, y)``
(cross-entropy that ignores targets of -100) and every validation loss is
:func:`resnorm.train.loop.evaluate`'s, so an objective is only its batches.

- ``clm`` (``model.objective=clm``, the default): causal next-token language modelling, exactly the
  loop's original batches (:class:`resnorm.data.corpora.BatchSampler`, :func:`resnorm.data.corpora.fixed_batches`).
- ``mlm`` (``model.objective=mlm``): a bidirectional encoder (attention not causal) trained with
  BERT's masking (Devlin et al. 2019, arXiv:1810.04805 §3.1 and appendix A.1): in every sequence of
  ``train.seq_len`` tokens, ``round(0.15 * seq_len)`` positions (at least one) are chosen; of these
  80% become the mask token, 10% a uniformly random token of the data vocabulary, 10% stay as they
  are; the loss is the cross-entropy on the chosen positions only (the others' targets are -100).
  The mask token is one extra id: the model's vocabulary is ``model.vocab_size + 1`` and the mask id
  is ``model.vocab_size`` (256 for bytes). The windows and the masks are drawn from **one**
  generator seeded by ``seed`` (:class:`MaskedSampler`), the sampler's generator that a checkpoint
  keeps, so a resumed run masks exactly as an uninterrupted one. Validation masks the same fixed
  windows with a generator of fixed seed (:data:`VAL_MASK_SEED`): every run and every step is
  scored on the same masked positions. The outcome baseline stays the training split's unigram
  entropy: the masked positions are chosen uniformly, so the targets follow the data's unigram
  distribution, and predicting it without context costs exactly that entropy.
- ``classify`` and ``tag``: fine-tuning a pre-trained run on a labelled task (``finetune.task``;
  :mod:`resnorm.tasks.labelled` loads it, :mod:`resnorm.tasks.heads` adds the head). Not choices of
  ``model.objective``: :func:`for_config` picks them from the task.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from resnorm.config.schema import OBJECTIVE_SHAPES

#: BERT's masking: the fraction of positions predicted, and of those, the share masked / randomised
MASK_FRACTION = 0.15
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1
#: the seed of the fixed validation masks (the same for every run, whatever its ``seed``)
VAL_MASK_SEED = 0
IGNORE = -100  # the target of a position that is not scored (torch's cross-entropy default)


@dataclass(frozen=True)
class Objective:
    """How one kind of run gets its data, model and batches (each a function of the config).

    ``load(cfg)`` -> the data (with ``source``, ``unigram_loss``, ``entropy_rate`` for the summary);
    ``build(cfg, data)`` -> the model (on the CPU); ``sampler(cfg, data)`` -> an object with
    ``sample() -> (x, y)`` and the ``generator`` a checkpoint keeps; ``val_batches(cfg, data)`` ->
    fixed ``[(x, y), ...]``; ``optimizer(model, cfg)``, when set, replaces ``optim.name``'s optimizer
    (a fine-tune trains with the recipe's). ``causal`` and ``extra_ids`` shape a pre-training model
    (:meth:`resnorm.model.blocks.ModelShape.from_config`); ``pretraining``: a choice of ``model.objective``.
    """

    name: str
    description: str
    load: Callable[[Any], Any]
    build: Callable[[Any, Any], Any]
    sampler: Callable[[Any, Any], Any]
    val_batches: Callable[[Any, Any], List[Tuple[torch.Tensor, torch.Tensor]]]
    causal: bool = True
    extra_ids: int = 0
    pretraining: bool = True
    optimizer: Optional[Callable[[Any, Any], Any]] = None  # (model, cfg) -> optimizer; None: optim.name's


def _load_corpus(cfg):
    from resnorm.data.corpora import load_data

    return load_data(cfg.data, cfg.train.seq_len, cfg.seed)


def _build_lm(cfg, data):
    from resnorm.model.transformer import build_model

    return build_model(cfg)


def _clm_sampler(cfg, data):
    from resnorm.data.corpora import BatchSampler

    return BatchSampler(data.train, cfg.train.batch_size, cfg.train.seq_len, seed=cfg.seed)


def _clm_val(cfg, data):
    from resnorm.data.corpora import fixed_batches

    return fixed_batches(data.val, cfg.train.eval_batches, cfg.train.batch_size, cfg.train.seq_len)


def mask_tokens(x: torch.Tensor, vocab: int, mask_id: int,
                generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of a (batch, T) token batch: ``(inputs, targets)``, targets -100 except at the
    ``max(1, round(MASK_FRACTION * T))`` chosen positions of each row, which hold the original token.
    Of the chosen positions, a uniform draw u < 0.8 puts ``mask_id``, 0.8 <= u < 0.9 a uniform token
    of ``[0, vocab)``, the rest keep theirs. All draws come from ``generator``."""
    b, t = x.shape
    k = max(1, round(MASK_FRACTION * t))
    order = torch.rand(b, t, generator=generator).argsort(dim=1)
    chosen = torch.zeros(b, t, dtype=torch.bool).scatter_(1, order[:, :k], True)
    u = torch.rand(b, t, generator=generator)
    random_ids = torch.randint(vocab, (b, t), generator=generator)
    inputs = torch.where(chosen & (u < MASK_SHARE), torch.full_like(x, mask_id), x)
    swap = chosen & (u >= MASK_SHARE) & (u < MASK_SHARE + RANDOM_SHARE)
    inputs = torch.where(swap, random_ids, inputs)
    return inputs, torch.where(chosen, x, torch.full_like(x, IGNORE))


class MaskedSampler:
    """Random windows of ``seq_len`` tokens (:class:`resnorm.data.corpora.BatchSampler`), masked by
    :func:`mask_tokens`; windows and masks share one generator (``generator``, seeded by ``seed``),
    so the checkpoint's sampler state restores both."""

    def __init__(self, stream: torch.Tensor, batch_size: int, seq_len: int, seed: int, vocab: int):
        from resnorm.data.corpora import BatchSampler

        self.windows = BatchSampler(stream, batch_size, seq_len, seed=seed)
        self.generator = self.windows.generator
        self.vocab, self.mask_id = vocab, vocab

    def sample(self) -> Tuple[torch.Tensor, torch.Tensor]:
        x, _ = self.windows.sample()
        return mask_tokens(x, self.vocab, self.mask_id, self.generator)


def _mlm_sampler(cfg, data):
    return MaskedSampler(data.train, cfg.train.batch_size, cfg.train.seq_len, cfg.seed, cfg.model.vocab_size)


def _mlm_val(cfg, data):
    """The fixed validation windows of clm, masked once with a generator of seed VAL_MASK_SEED."""
    g = torch.Generator().manual_seed(VAL_MASK_SEED)
    vocab = cfg.model.vocab_size
    return [mask_tokens(x, vocab, vocab, g) for x, _ in _clm_val(cfg, data)]


def _task_load(cfg):
    from resnorm.tasks.labelled import load_task_data

    return load_task_data(cfg)


def _task_build(cfg, data):
    from resnorm.tasks.heads import build_task_model

    return build_task_model(cfg, data)


def _task_sampler(cfg, data):
    from resnorm.tasks.labelled import ExampleSampler

    # the fitting rows: the training rows less the validation part the recipe chose the rate on
    return ExampleSampler(*(data.fit or data.train), cfg.train.batch_size, cfg.seed)


def _task_val(cfg, data):
    from resnorm.tasks.labelled import example_batches

    return example_batches(*data.val, cfg.train.batch_size)


def _task_optimizer(model, cfg):
    """The recipe's optimizer (:func:`resnorm.train.optimizers.task_optimizer`) at ``optim.lr``, the head at
    ``finetune.head_lr_scale`` times it: the loop's fine-tune replays the recipe's chosen trial."""
    from resnorm.tasks.recipe import Recipe
    from resnorm.train.optimizers import task_optimizer

    return task_optimizer(model, cfg.optim.lr, Recipe(head_lr_scale=cfg.finetune.head_lr_scale))


OBJECTIVES: Dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    if objective.name in OBJECTIVES:
        raise ValueError(f"objective {objective.name!r} is registered twice")
    OBJECTIVES[objective.name] = objective
    return objective


register(Objective("clm", "causal next-token language model (decoder-only)", _load_corpus, _build_lm,
                   _clm_sampler, _clm_val, **asdict(OBJECTIVE_SHAPES["clm"])))
register(Objective("mlm", "bidirectional encoder, BERT's masked-token objective", _load_corpus, _build_lm,
                   _mlm_sampler, _mlm_val, **asdict(OBJECTIVE_SHAPES["mlm"])))
register(Objective("classify", "fine-tuning: one label per sequence from a pooled head", _task_load, _task_build,
                   _task_sampler, _task_val, pretraining=False, optimizer=_task_optimizer))
register(Objective("tag", "fine-tuning: one BIO tag per word from a per-token head", _task_load, _task_build,
                   _task_sampler, _task_val, pretraining=False, optimizer=_task_optimizer))


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise KeyError(f"model.objective={name!r}: choose one of "
                       f"{', '.join(n for n, o in OBJECTIVES.items() if o.pretraining)}") from None


def for_config(cfg) -> Objective:
    """The objective a config trains: the fine-tuning kind of ``finetune.task`` when it is set
    (:func:`resnorm.tasks.labelled.task_kind`), else ``model.objective``."""
    ft = cfg.get("finetune") if hasattr(cfg, "get") else getattr(cfg, "finetune", None)
    task = ft.get("task") if ft is not None else None
    if task:
        from resnorm.tasks.labelled import task_kind

        return OBJECTIVES[task_kind(task)]
    return get_objective(cfg.model.get("objective", "clm"))
