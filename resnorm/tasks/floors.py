"""Floors beside every fine-tuned score, on the same split: the majority class, a bag-of-n-grams
logistic regression, and a linear probe on the frozen pre-trained features.

All three see what the fine-tuned model sees: the training rows less the carved validation part to
fit, the validation part to choose the regularisation ``C`` (:data:`C_GRID`), the held-out rows to
score, each text cut to the model's context (:func:`visible_text`), each tagged row to the words
the model scores. scikit-learn does the fitting.

- **majority** (classify): the held-out accuracy of always predicting the most frequent training
  label. For tag, the all-O prediction: its span F1 is 0 by definition; its per-word accuracy is given.
- **ngram** (classify): TF-IDF of word uni- and bigrams and of character 2- to 4-grams, then a
  logistic regression. (tag): a per-token logistic regression on the word and its two neighbours on
  each side (the word, lower-cased, its shape: capitals, title case, a final period, its suffix).
- **probe**: a logistic regression on the frozen pre-trained model's features (the pooled vector
  the classify head reads, or the labelled token of each word for tag), :func:`probe_floor`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

C_GRID = (0.1, 1.0, 10.0)
WINDOW = 2  # tag floor: neighbours on each side


def visible_text(tokenizer, text: str, max_len: int) -> str:
    """The part of ``text`` the model reads: its first ``max_len`` tokens."""
    if getattr(tokenizer, "name", "bytes") == "bytes":
        return text.encode("utf-8")[:max_len].decode("utf-8", errors="ignore")
    enc = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    offsets = enc.offsets[:max_len]
    return text[:offsets[-1][1]] if offsets else ""


def _choose_c(make, fit: Tuple[Any, Any], dev: Tuple[Any, Any], score) -> Tuple[Any, float]:
    """The model fitted on ``fit`` with the C of :data:`C_GRID` that scores best on ``dev``."""
    best, best_c, best_score = None, None, -1.0
    for c in C_GRID:
        model = make(c).fit(*fit)
        s = score(model, *dev)
        if s > best_score:
            best, best_c, best_score = model, c, s
    return best, best_c


def _logreg(c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000)


def _accuracy(model, x, y) -> float:
    return float(np.mean(model.predict(x) == np.asarray(y)))


def ngram_classify(texts: Dict[str, List[str]], labels: Dict[str, List[str]]) -> Dict[str, Any]:
    """The n-gram floor of a classification task: ``texts``/``labels`` keyed fit, dev, held."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline, make_union

    def make(c):
        features = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                              TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True))
        return make_pipeline(features, _logreg(c))

    model, c = _choose_c(make, (texts["fit"], labels["fit"]), (texts["dev"], labels["dev"]), _accuracy)
    return dict(score=_accuracy(model, texts["held"], labels["held"]), C=c)


def token_features(words: Sequence[str], i: int) -> Dict[str, Any]:
    """The tag floor's features of word ``i``: it and its :data:`WINDOW` neighbours on each side."""
    out: Dict[str, Any] = {"bias": 1.0}
    for d in range(-WINDOW, WINDOW + 1):
        j = i + d
        w = words[j] if 0 <= j < len(words) else ("<s>" if j < 0 else "</s>")
        out[f"{d}:w"] = w
        out[f"{d}:lower"] = w.lower()
        out[f"{d}:upper"] = w.isupper()
        out[f"{d}:title"] = w.istitle()
        out[f"{d}:period"] = w.endswith(".")
        out[f"{d}:suffix"] = w[-3:].lower()
    return out


def _tag_matrix(rows: Sequence[Sequence[str]]) -> List[Dict[str, Any]]:
    return [token_features(words, i) for words in rows for i in range(len(words))]


def ngram_tag(words: Dict[str, List[List[str]]], tags: Dict[str, List[List[str]]]) -> Dict[str, Any]:
    """The per-token floor of a tagging task: ``words``/``tags`` keyed fit, dev, held (the scored
    words of each row); span F1 on the held-out rows."""
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.pipeline import make_pipeline

    def make(c):
        return make_pipeline(DictVectorizer(), _logreg(c))

    x = {k: _tag_matrix(v) for k, v in words.items()}
    y = {k: [t for row in v for t in row] for k, v in tags.items()}

    def score(model, xs, ys, part="dev"):
        return span_score(model.predict(xs), tags[part])

    model, c = _choose_c(make, (x["fit"], y["fit"]), (x["dev"], y["dev"]), score)
    return dict(score=span_score(model.predict(x["held"]), tags["held"]), C=c)


def span_score(flat_pred: Sequence[str], rows: Sequence[Sequence[str]]) -> float:
    """Span F1 of flat predictions, cut back into the rows of ``rows`` (the gold tags)."""
    from resnorm.tasks.labelled import span_f1

    pred, at = [], 0
    for row in rows:
        pred.append(list(flat_pred[at:at + len(row)]))
        at += len(row)
    return span_f1(rows, pred)["span_f1"]


def probe_floor(kind: str, feats: Dict[str, np.ndarray], labels: Dict[str, Any],
                rows: Dict[str, List[List[str]]] = None) -> Dict[str, Any]:
    """A logistic regression on frozen features (``feats`` keyed fit, dev, held: one row per example
    for classify, per scored word for tag, with ``labels`` to match); standardised first."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def make(c):
        return make_pipeline(StandardScaler(), _logreg(c))

    if kind == "classify":
        model, c = _choose_c(make, (feats["fit"], labels["fit"]), (feats["dev"], labels["dev"]), _accuracy)
        return dict(score=_accuracy(model, feats["held"], labels["held"]), C=c)

    def score(model, xs, ys):
        return span_score(model.predict(xs), rows["dev"])

    model, c = _choose_c(make, (feats["fit"], labels["fit"]), (feats["dev"], labels["dev"]), score)
    return dict(score=span_score(model.predict(feats["held"]), rows["held"]), C=c)
