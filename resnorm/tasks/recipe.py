"""The fine-tuning recipe: a learning-rate grid chosen on a validation split carved from the training
rows (never the held-out rows), early stopping on that split's score, the head at its own rate.

What GLUE-style practice does (Devlin et al. 2019, arXiv:1810.04805 §4: a small grid of learning
rates per task, the best on the development set): :func:`resnorm.tasks.labelled.carve_validation` splits the task's
*training* rows into a fitting part and a validation part (by whole groups, e.g. whole plays, when
the rows carry a ``group`` or ``play`` column, so validation asks the same question as the held-out
plays; else every fifth training row). For each rate of the grid, :func:`train_one` fine-tunes a
fresh copy of the pre-trained model on the fitting part (AdamW, linear warm-up then constant, the
head's rate ``head_lr_scale`` times the body's, gradient clipping; the loop's fine-tune at the chosen
rate trains with the same optimizer and clipping, so it replays the chosen trial), scores the
validation part every ``eval_every``
steps and keeps the weights of the best score (early stopping with ``patience`` evaluations).
:func:`select` returns the rate whose best validation score is highest, with its weights: that
model, and only that model, is then scored once on the held-out rows (:mod:`resnorm.finetune`).

Scores (:func:`task_metric`): accuracy for ``classify``; CoNLL span F1 for ``tag``, ties broken by
the validation loss.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

LR_GRID = (3e-4, 1e-3, 3e-3)

#: the recipe's defaults by task kind (docs/finetune.md, "The recipe's defaults for classification,
#: measured"): a pooled classification head learns at 30 times the body's rate and needs up to 1000
#: steps with 12 validation scores of patience (its validation accuracy is noisy on a few hundred rows);
#: tagging, per-token, learns at the body's rate in 400 steps
KIND_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "classify": dict(steps=1000, head_lr_scale=30.0, patience=12),
    "tag": dict(steps=400, head_lr_scale=1.0, patience=4),
}


@dataclass
class Recipe:
    """The recipe's settings (``python -m resnorm.finetune`` flags)."""

    lrs: Sequence[float] = LR_GRID
    steps: int = 400
    batch: int = 16
    head_lr_scale: float = 1.0
    warmup: int = 30
    eval_every: int = 25
    patience: int = 4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0


@dataclass
class Trial:
    """One rate's fine-tune: its best validation score and step, and the scores along the way."""

    lr: float
    best_score: float
    best_loss: float
    best_step: int
    steps_run: int
    history: List[Tuple[int, float, float]] = field(default_factory=list)  # (step, score, val loss)
    state: Optional[Dict[str, torch.Tensor]] = None


def task_metric(kind: str, labels: Sequence[str], preds: torch.Tensor, gold: torch.Tensor) -> float:
    """Accuracy (classify) or span F1 over the labelled tokens of words (tag; targets -100 elsewhere)."""
    if kind == "classify":
        return float((preds == gold).double().mean())
    from resnorm.tasks.labelled import span_f1

    words_gold, words_pred = tag_words(labels, preds, gold)
    return span_f1(words_gold, words_pred)["span_f1"]


def tag_words(labels: Sequence[str], preds: torch.Tensor, gold: torch.Tensor) -> Tuple[list, list]:
    """Per row, the gold and predicted tags of its scored words (targets that are not -100)."""
    words_gold, words_pred = [], []
    for p, g in zip(preds, gold):
        keep = g != -100
        words_gold.append([labels[i] for i in g[keep].tolist()])
        words_pred.append([labels[i] for i in p[keep].tolist()])
    return words_gold, words_pred


@torch.no_grad()
def predict(model, x: torch.Tensor, y: torch.Tensor, row_of: Optional[torch.Tensor] = None,
            batch: int = 64) -> Tuple[torch.Tensor, float, torch.Tensor]:
    """(arg-max predictions, mean cross-entropy, gold), in eval mode; with ``row_of`` (classify over
    windows) one prediction per row from the mean of its windows' logits, and each row's label."""
    from resnorm.model.blocks import eval_mode
    from resnorm.tasks.labelled import row_logits, row_targets

    out, loss, n = [], 0.0, 0
    device = next(model.parameters()).device
    with eval_mode(model):
        for i in range(0, len(x), batch):
            logits = model(x[i:i + batch].to(device)).float().cpu()
            target = y[i:i + batch]
            loss += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                          reduction="sum"))
            n += int((target != -100).sum())
            out.append(logits)
    logits = row_logits(torch.cat(out), row_of)
    return logits.argmax(dim=-1), loss / max(n, 1), row_targets(y, row_of)


def optimizer_for(model, lr: float, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW: the head at ``lr * head_lr_scale``, the body at ``lr``; decay on matrices only."""
    head = {id(p) for p in model.head.parameters()}
    groups = []
    for is_head in (False, True):
        params = [p for p in model.parameters() if (id(p) in head) == is_head]
        scale = recipe.head_lr_scale if is_head else 1.0
        groups.append({"params": [p for p in params if p.dim() >= 2], "weight_decay": recipe.weight_decay,
                       "lr_scale": scale})
        groups.append({"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def train_one(model, data, fit: Tuple[torch.Tensor, torch.Tensor], val: Tuple[torch.Tensor, torch.Tensor],
              lr: float, recipe: Recipe, make_optimizer: Callable = optimizer_for) -> Trial:
    """Fine-tune ``model`` (in place) at ``lr``; the best validation score's weights into ``Trial.state``.
    ``make_optimizer(model, lr, recipe)``: :func:`optimizer_for`, or the loop's (which adds the variant's
    optimizer rules), so a trial trains as the loop's fine-tune at the chosen rate does."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = make_optimizer(model, lr, recipe)
    trial = Trial(lr, -math.inf, math.inf, 0, 0)
    since_best = 0
    for step in range(1, recipe.steps + 1):
        factor = min(1.0, step / recipe.warmup) if recipe.warmup else 1.0
        for g in opt.param_groups:
            g["lr"] = lr * factor * g["lr_scale"]
        idx = torch.randint(len(fit[0]), (recipe.batch,), generator=gen)
        loss = model.loss(fit[0][idx], fit[1][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        trial.steps_run = step
        if step % recipe.eval_every and step != recipe.steps:
            continue
        preds, val_loss, gold = predict(model, *val, row_of=(data.row_of or {}).get("dev"))
        score = task_metric(data.kind, data.labels, preds, gold)
        trial.history.append((step, score, val_loss))
        if not math.isfinite(val_loss):
            break
        if score > trial.best_score or (score == trial.best_score and val_loss < trial.best_loss):
            trial.best_score, trial.best_loss, trial.best_step = score, val_loss, step
            trial.state = copy.deepcopy(model.state_dict())
            since_best = 0
        else:
            since_best += 1
            if since_best >= recipe.patience:
                break
    return trial


def select(model, data, fit, val, recipe: Recipe, make_optimizer: Callable = optimizer_for) -> Tuple[Trial, List[Trial]]:
    """Every rate of ``recipe.lrs`` from a copy of ``model``; (the best trial, all trials). The best:
    the highest validation score, then the lowest validation loss, then the lower rate."""
    initial = copy.deepcopy(model.state_dict())
    trials = []
    for lr in recipe.lrs:
        model.load_state_dict(initial)
        trials.append(train_one(model, data, fit, val, lr, recipe, make_optimizer))
    best = max(trials, key=lambda t: (t.best_score, -t.best_loss, -t.lr))
    model.load_state_dict(best.state if best.state is not None else initial)
    for t in trials:
        if t is not best:
            t.state = None
    return best, trials


def trials_record(trials: Sequence[Trial]) -> List[Dict[str, Any]]:
    """The grid as plain data for a summary: rate, best validation score and step, steps run."""
    return [dict(lr=t.lr, val_score=t.best_score, val_loss=t.best_loss, best_step=t.best_step,
                 steps_run=t.steps_run) for t in trials]
