"""A pre-trained model with a task head, for fine-tuning (``classify`` and ``tag``, :mod:`resnorm.tasks.labelled`).

:class:`TaskModel` is a :class:`resnorm.model.transformer.Transformer` of the pre-trained run's shape (variant,
depth, widths, ``model.objective``'s attention direction) whose LM head is replaced by a task head,
``Linear(d_model, n_labels)`` (weights N(0, 0.02), bias 0, seeded by ``seed``); everything else is
loaded from the run's ``checkpoint.pt``. Being a Transformer, it trains through the same loop with
the same probes and monitors. Its inputs are token ids with -1 for padding: the padding is masked
out of every attention (``Attention.key_mask``), of the pooling and of the loss.

- **classify**: one vector per sequence, then the head. An encoder (``mlm``) takes the mean of its
  last hidden states over the real tokens (each has seen the whole passage); a causal model
  (``clm``) takes its last real token's (the only one that has seen the whole passage).
- **tag**: the head on every token; the loss and the prediction are at each word's first token.

The loss is the cross-entropy over the targets that are not -100 (no z-loss: that regularises LM
logits). :func:`score` is the task metric on the held-out examples: accuracy (classify) or CoNLL
span F1 over BIO spans (tag), with the majority-class accuracy and the per-word tag accuracy beside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from resnorm.errors import DataError
from resnorm.model.blocks import Attention, ModelShape, eval_mode
from resnorm.model.transformer import Transformer

HEAD_STD = 0.02


class TaskModel(Transformer):
    """The pre-trained Transformer with a task head (see the module docstring)."""

    def __init__(self, shape: ModelShape, kind: str, n_labels: int):
        super().__init__(shape)
        self.kind = kind
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

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(batch, n_labels) for classify, (batch, T, n_labels) for tag."""
        h = self.hidden(idx)
        if self.kind == "tag":
            return self.head(h)
        real = (idx >= 0).to(h.dtype)
        if self.shape.causal:  # the last real token (inputs are padded on the right)
            last = real.sum(dim=1).long().clamp(min=1) - 1
            pooled = h[torch.arange(h.shape[0], device=h.device), last]
        else:
            pooled = (h * real[..., None]).sum(dim=1) / real.sum(dim=1, keepdim=True).clamp(min=1)
        return self.head(pooled)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, z_loss: bool = True) -> torch.Tensor:
        logits = self(idx).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_task_model(cfg, data) -> TaskModel:
    """The run ``cfg.finetune.init_from``'s model from its ``checkpoint.pt``, with a fresh head."""
    path = Path(cfg.finetune.init_from).expanduser() / "checkpoint.pt"
    if not path.is_file():
        raise DataError(f"{path.parent}: no checkpoint.pt to fine-tune; pre-train with train.keep_checkpoint=true")
    model = TaskModel(ModelShape.from_config(cfg), data.kind, len(data.labels))
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = sorted(set(missing) - {"head.weight", "head.bias"}) + sorted(unexpected)
    if wrong:
        raise DataError(f"{path}: does not match the run's config (parameter {wrong[0]}); was the folder's "
                        "config changed after training?")
    model.reset_head()
    return model


@torch.no_grad()
def predictions(model: TaskModel, batches, device) -> List[torch.Tensor]:
    """The arg-max labels of every held-out batch, in eval mode (CPU tensors)."""
    out = []
    with eval_mode(model):
        for x, _ in batches:
            out.append(model(x.to(device)).argmax(dim=-1).cpu())
    return out


def score(run) -> Dict[str, Any]:
    """The task metric of a fine-tuned run on its held-out examples (the summary's ``task_*`` keys)."""
    from resnorm.tasks.labelled import majority_accuracy, span_f1

    data, model = run.data, run.model
    preds = predictions(model, run.val_batches, run.device)
    gold = [y for _, y in run.val_batches]
    out: Dict[str, Any] = dict(task=data.name, task_kind=data.kind, task_labels=list(data.labels),
                               task_train_examples=len(data.train[0]), task_eval_examples=len(data.val[0]))
    if data.kind == "classify":
        p, g = torch.cat(preds), torch.cat(gold)
        acc = float((p == g).double().mean())
        return {**out, "task_metric": "accuracy", "task_score": acc, "task_accuracy": acc,
                "task_majority_accuracy": majority_accuracy(data.train[1], g)}
    words_gold, words_pred = [], []
    for p, g in zip(preds, gold):
        for pi, gi in zip(p, g):
            keep = gi != -100
            words_gold.append([data.labels[i] for i in gi[keep].tolist()])
            words_pred.append([data.labels[i] for i in pi[keep].tolist()])
    spans = span_f1(words_gold, words_pred)
    n_words = sum(len(w) for w in words_gold)
    right = sum(a == b for gw, pw in zip(words_gold, words_pred) for a, b in zip(gw, pw))
    return {**out, "task_metric": "span_f1", "task_score": spans["span_f1"],
            **{f"task_{k}": v for k, v in spans.items()}, "task_word_accuracy": right / n_words if n_words else None}
