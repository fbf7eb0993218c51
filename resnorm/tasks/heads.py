"""A pre-trained model with a task head, for fine-tuning (``classify`` and ``tag``, :mod:`resnorm.tasks`).

:class:`TaskModel` is a :class:`resnorm.model.Transformer` of the pre-trained run's shape (variant,
depth, widths, ``model.objective``'s attention direction) whose LM head is replaced by a task head,
``Linear(d_model, n_labels)`` (weights N(0, 0.02), bias 0, seeded by ``seed``); everything else is
loaded from the run's ``checkpoint.pt``. Being a Transformer, it trains through the same loop with
the same probes and monitors. Its inputs are token ids with -1 for padding: the padding is masked
out of every attention (``Attention.key_mask``), of the pooling and of the loss.

- **classify**: one vector per sequence, then the head: the mean of the last hidden states over the
  real tokens, for an encoder (``mlm``) and a causal model (``clm``) alike (for a causal model the
  last token alone, the only one that has seen the whole window, learned less: docs/finetune.md).
- **tag**: the head on every token; the loss and the prediction are at each word's last token.

The loss is the cross-entropy over the targets that are not -100 (no z-loss: that regularises LM
logits). :func:`score` is the task metric on the held-out examples: accuracy (classify) or CoNLL
span F1 over BIO spans (tag), with the majority-class accuracy and the per-word tag accuracy beside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resnorm.errors import DataError
from resnorm.model.blocks import Attention, ModelShape, eval_mode
from resnorm.model.transformer import Transformer

HEAD_STD = 0.02
#: a completed fine-tune is ``trained`` when its held-out score beats the floor's constant prediction
#: at this level (one-sided exact binomial test, :func:`above_floor_p`), else ``stalled``
OUTCOME_ALPHA = 0.05


class TaskModel(Transformer):
    """The pre-trained Transformer with a task head (see the module docstring)."""

    def __init__(self, shape: ModelShape, kind: str, n_labels: int):
        super().__init__(shape)
        self.kind = kind
        self.pooling = "mean"  # classify: see the module docstring ("last": the last real token)
        self.head = nn.Linear(shape.d_model, n_labels)

    @torch.no_grad()
    def reset_head(self) -> None:
        nn.init.normal_(self.head.weight, std=HEAD_STD)
        nn.init.zeros_(self.head.bias)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The embedding of the real tokens (ids >= 0); every attention masks the padding (-1) keys."""
        real = idx >= 0
        for module in self.modules():
            if isinstance(module, Attention):
                module.key_mask = real
        return super().embed(idx.clamp(min=0))

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """What the head reads: (batch, d_model) pooled for classify, (batch, T, d_model) for tag."""
        h = self.hidden(idx)
        if self.kind == "tag":
            return h
        real = (idx >= 0).to(h.dtype)
        if self.pooling == "last":  # the last real token (inputs are padded on the right)
            last = real.sum(dim=1).long().clamp(min=1) - 1
            return h[torch.arange(h.shape[0], device=h.device), last]
        return (h * real[..., None]).sum(dim=1) / real.sum(dim=1, keepdim=True).clamp(min=1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(batch, n_labels) for classify, (batch, T, n_labels) for tag."""
        return self.head(self.features(idx))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, z_loss: bool = True) -> torch.Tensor:
        logits = self(idx).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _load_checkpoint(path: Path):
    """(the checkpoint's dict, None) or (None, why it is not a run's checkpoint)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  # truncated, garbled, not a torch file
        return None, f"{path.name} cannot be read ({type(exc).__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        return None, f"{path.name} holds a {type(state).__name__}, not a run's checkpoint"
    return state, None


def checkpoint_problem(path: Path, run_id: Any) -> Optional[str]:
    """Why the checkpoint at ``path`` is not the pre-trained state of run ``run_id`` (the folder's
    summary says which run it holds), or None: unreadable, not a checkpoint, or another run's (its own
    ``run_id`` differs: a checkpoint copied in from elsewhere is not credited to this run)."""
    state, why = _load_checkpoint(Path(path))
    if why:
        return why
    if state.get("run_id") != run_id:
        return (f"{Path(path).name} belongs to run {state.get('run_id')}, not to the folder's run {run_id}: "
                "fine-tune the run it came from")
    return None


def build_task_model(cfg, data) -> TaskModel:
    """The run ``cfg.finetune.init_from``'s model from its ``checkpoint.pt``, with a fresh head. A
    checkpoint of another shape (or not a checkpoint) is one DataError line naming the first parameter
    that differs."""
    path = Path(cfg.finetune.init_from).expanduser() / "checkpoint.pt"
    if not path.is_file():
        raise DataError(f"{path.parent}: no checkpoint.pt to fine-tune; pre-train with train.keep_checkpoint=true")
    model = TaskModel(ModelShape.from_config(cfg), data.kind, len(data.labels))
    state, why = _load_checkpoint(path)
    if why:
        raise DataError(f"{path.parent}: {why}")
    state = {k: v for k, v in state["model"].items() if not k.startswith("head.")}
    own = model.state_dict()
    shapes = [f"{k} is {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the run's config"
              for k, v in state.items() if k in own and getattr(v, "shape", None) != own[k].shape]
    wrong = sorted(set(own) - set(state) - {"head.weight", "head.bias"}) + sorted(set(state) - set(own))
    if shapes or wrong:
        detail = shapes[0] if shapes else f"parameter {wrong[0]}"
        raise DataError(f"{path}: does not match the run's config ({detail}); was the folder's config changed "
                        "after training, or the checkpoint copied from another run?")
    model.load_state_dict(state, strict=False)
    model.reset_head()
    return model


def score(run) -> Dict[str, Any]:
    """The task metric of a fine-tuned run on its held-out rows (the summary's ``task_*`` keys); a
    classified row's prediction is the mean of its windows' logits (:func:`resnorm.tasks.labelled.row_logits`)."""
    from resnorm.tasks.recipe import predict, tag_words
    from resnorm.tasks.labelled import majority_accuracy, row_targets, span_f1

    data, model = run.data, run.model
    row_of = data.row_of or {}
    preds, _, gold = predict(model, *data.val, row_of=row_of.get("held"))
    fit = data.fit or data.train
    out: Dict[str, Any] = dict(task=data.name, task_kind=data.kind, task_labels=list(data.labels),
                               task_train_examples=len(data.rows["fit"]) if data.rows else len(fit[0]),
                               task_eval_examples=len(gold))
    if data.kind == "classify":
        hits = preds == gold
        acc = float(hits.double().mean())
        majority = majority_accuracy(row_targets(fit[1], row_of.get("fit")), gold)
        return {**out, "task_metric": "accuracy", "task_score": acc, "task_accuracy": acc,
                "task_majority_accuracy": majority,
                "task_p_above_floor": above_floor_p(int(hits.sum()), len(gold), majority)}
    words_gold, words_pred = tag_words(data.labels, preds, gold)
    spans = span_f1(words_gold, words_pred)
    n_words = sum(len(w) for w in words_gold)
    right = sum(a == b for gw, pw in zip(words_gold, words_pred) for a, b in zip(gw, pw))
    all_o = sum(t == "O" for gw in words_gold for t in gw)
    return {**out, "task_metric": "span_f1", "task_score": spans["span_f1"],
            **{f"task_{k}": v for k, v in spans.items()}, "task_word_accuracy": right / n_words if n_words else None,
            "task_p_above_floor": above_floor_p(right, n_words, all_o / n_words if n_words else 1.0)}


def above_floor_p(right: int, n: int, floor_rate: float) -> float:
    """The chance of ``right`` or more right answers of ``n`` for a predictor right at the floor's rate
    (the majority class's held-out accuracy; for tag, all-O's per-word accuracy): a one-sided exact
    binomial test (scipy). Small: the fine-tune beats the constant prediction beyond chance."""
    from scipy.stats import binomtest

    if n == 0:
        return 1.0
    return float(binomtest(right, n, min(max(float(floor_rate), 0.0), 1.0), alternative="greater").pvalue)


def task_outcome(loss_outcome: Optional[str], p_above_floor: float) -> Optional[str]:
    """A completed fine-tune's outcome, judged by its task score rather than its loss: ``trained`` when
    the held-out score beats the floor's constant prediction (``p_above_floor`` under
    :data:`OUTCOME_ALPHA`), else ``stalled``. The loss's rule (:func:`resnorm.runs.folder.classify_outcome`)
    misjudges a classifier: its held-out loss is per window and grows with confidence, so a fine-tune
    30 points above the majority class kept a loss within ``train.stall_margin`` of the label entropy.
    A diverged or non-finite fine-tune keeps that outcome."""
    if loss_outcome not in ("trained", "stalled"):
        return loss_outcome
    return "trained" if p_above_floor < OUTCOME_ALPHA else "stalled"


@torch.no_grad()
def frozen_features(model: TaskModel, x: torch.Tensor, y: torch.Tensor, row_of=None, batch: int = 64):
    """The frozen model's features (numpy): one per row (classify: the mean over its windows) or per
    scored word (tag), with the matching label ids."""
    from resnorm.tasks.labelled import row_logits, row_targets

    if row_of is not None:
        f, t = frozen_features(model, x, y, None, batch)
        return (row_logits(torch.from_numpy(f), row_of).numpy(),
                row_targets(torch.from_numpy(t), row_of).numpy())
    feats, labels = [], []
    with eval_mode(model):
        for i in range(0, len(x), batch):
            f, t = model.features(x[i:i + batch]).float(), y[i:i + batch]
            if model.kind == "tag":
                keep = t != -100
                f, t = f[keep], t[keep]
            feats.append(f)
            labels.append(t)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def floors(model: TaskModel, data, max_len: int) -> Dict[str, Any]:
    """The three floors (:mod:`resnorm.tasks.floors`) of ``data`` on its own split, the probe on ``model``'s
    features as they are now (call it before fine-tuning): ``floor_majority``, ``floor_ngram``,
    ``floor_probe`` and the C each chose."""
    from resnorm.tasks import floors as fl
    from resnorm.tasks.labelled import IGNORE, WINDOWS, _words, majority_accuracy

    parts = {"fit": data.fit, "dev": data.dev, "held": data.val}
    rows = {k: data.rows[k] for k in parts}
    out: Dict[str, Any] = {}
    if data.kind == "classify":
        feats = {k: frozen_features(model, *parts[k], row_of=data.row_of[k]) for k in parts}
        out["floor_majority"] = majority_accuracy(torch.from_numpy(feats["fit"][1]), torch.from_numpy(feats["held"][1]))
        texts = {k: [fl.visible_text(data.tokenizer, str(r["text"]), max_len * WINDOWS) for r in v]
                 for k, v in rows.items()}
        ngram = fl.ngram_classify(texts, {k: [str(r["label"]) for r in v] for k, v in rows.items()})
        probe = fl.probe_floor("classify", {k: f for k, (f, _) in feats.items()},
                               {k: y for k, (_, y) in feats.items()})
    else:
        scored = {k: (parts[k][1] != IGNORE).sum(dim=1).tolist() for k in parts}
        words = {k: [_words(r["tokens"])[:n] for r, n in zip(rows[k], scored[k])] for k in parts}
        tags = {k: [_words(r["tags"])[:n] for r, n in zip(rows[k], scored[k])] for k in parts}
        held_tags = [t for row in tags["held"] for t in row]
        out["floor_majority"] = 0.0  # all-O: no span predicted, span F1 0
        out["floor_majority_word_accuracy"] = sum(t == "O" for t in held_tags) / max(len(held_tags), 1)
        ngram = fl.ngram_tag(words, tags)
        feats = {k: frozen_features(model, *parts[k]) for k in parts}
        names = np.asarray(data.labels)
        probe = fl.probe_floor("tag", {k: f for k, (f, _) in feats.items()},
                               {k: names[y] for k, (_, y) in feats.items()}, rows=tags)
    out.update(floor_ngram=ngram["score"], floor_ngram_C=ngram["C"], floor_probe=probe["score"],
               floor_probe_C=probe["C"])
    return out
