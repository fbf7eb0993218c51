"""Labelled tasks for fine-tuning (``finetune.task``): reading them, splitting them, turning them into
token tensors, and scoring span F1.

A task is a built-in one (:data:`resnorm.tasks.builtin.BUILTIN_TASKS`, built offline from the
default corpus) or a file: a CSV (``.csv``), a JSON lines file (``.jsonl``, or ``.json`` holding
JSON lines or one JSON list of objects), or a Hugging Face dataset folder (``datasets.save_to_disk``).
Its columns decide its kind (:func:`task_kind`):

- ``text`` and ``label``: **classify**, one label per text (any strings; the label set is every
  distinct value, sorted);
- ``tokens`` and ``tags``: **tag**, one BIO tag per word (``O``, ``B-X``, ``I-X``; in a CSV both are
  whitespace-separated strings), scored by exact-match span F1 as CoNLL's ``conlleval``.

The held-out part is the file's own rows: those whose ``split`` column says ``test``, ``validation``,
``val``, ``dev`` or ``eval`` when it has one (the rest must say ``train``; a dataset folder's splits
are its ``split``), else every fifth row (rows 4, 9, 14, ... counting from 0), deterministically.

Texts are tokenized with the pre-trained run's tokenizer (:func:`resnorm.data.tokenizer.load_run_tokenizer`)
and cut to the model's context (``train.seq_len``); words past it are not scored. A tag is learned
and predicted at the last token of its word (:data:`TAG_AT`); the other tokens' targets
are -100. Shorter sequences are padded with -1, which :class:`resnorm.tasks.heads.TaskModel` masks out of
attention, pooling and the loss.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from resnorm.errors import DataError

KINDS = {"classify": ("text", "label"), "tag": ("tokens", "tags")}
EVAL_SPLITS = ("test", "validation", "val", "dev", "eval")
HOLDOUT_EVERY = 5  # without a split column, row i is held out when i % 5 == 4
PAD = -1
IGNORE = -100
FILE_KINDS = "a CSV (.csv), a JSON lines file (.jsonl/.json) or a Hugging Face dataset folder"


def _builtins() -> Dict[str, Any]:
    from resnorm.tasks.builtin import BUILTIN_TASKS

    return BUILTIN_TASKS


def unknown_task(spec: str) -> DataError:
    return DataError(f"--task {spec!r}: not a built-in task ({', '.join(_builtins())}) nor an existing file "
                     f"({FILE_KINDS} with columns text, label or tokens, tags)")


def task_name(spec: str) -> str:
    """The folder name of a task's results: a built-in's name, or the file's (folder's) name up to its
    first dot, leading dots dropped (``.x.csv`` is ``x``); DataError when nothing is left to name a folder."""
    if spec in _builtins():
        return spec
    name = Path(spec).expanduser().name.lstrip(".").split(".")[0]
    if not name or name in (".", ".."):
        raise DataError(f"--task {spec!r}: its file name leaves no task name (the results go to "
                        "<run>/finetune/<name>/): rename the file")
    return name


def task_fingerprint(spec: str) -> str:
    """``name`` for a built-in task; ``name@<sha256 prefix>`` of a file's bytes (of a folder's files'
    paths and bytes) otherwise: what a task is, wherever it lies."""
    import hashlib

    if spec in _builtins():
        return spec
    path = Path(spec).expanduser()
    digest = hashlib.sha256()
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode() if f != path else b"")
        digest.update(f.read_bytes())
    return f"{task_name(spec)}@{digest.hexdigest()[:12]}"


def _read_json(path: Path) -> List[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except RecursionError:
        raise DataError(f"task file {path}: nested too deeply to be a task's rows") from None
    except json.JSONDecodeError:
        try:
            rows = json.loads(text)
        except RecursionError:
            raise DataError(f"task file {path}: nested too deeply to be a task's rows") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"task file {path}: neither JSON lines nor a JSON list ({exc.msg}, line {exc.lineno})") from None
    if len(rows) == 1 and isinstance(rows[0], list):
        rows = rows[0]
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"task file {path}: every row must be a JSON object with the task's columns")
    return rows


def _read_dataset(path: Path) -> List[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"task folder {path}: reading a Hugging Face dataset folder needs the package datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001  # any reason the folder is not a saved dataset
        raise DataError(f"task folder {path}: not a Hugging Face dataset folder ({type(exc).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        return [{**row, "split": name} for name, part in ds.items() for row in part]
    return list(ds)


def read_rows(spec: str) -> Tuple[List[dict], str]:
    """The rows of a task (dicts) and where they came from; DataError for an unknown task."""
    if spec in _builtins():
        return _builtins()[spec].rows(), f"built-in task {spec}"
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_dataset(path), str(path)
    if not path.is_file():
        raise unknown_task(spec)
    try:
        return _read_file(path), str(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"task file {path}: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None


def _read_file(path: Path) -> List[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix in (".jsonl", ".json"):
        return _read_json(path)
    raise DataError(f"task file {path}: unknown format {path.suffix or '(no suffix)'}; use {FILE_KINDS}")


def kind_of(rows: Sequence[dict], source: str) -> str:
    """classify or tag, from the columns of the first row (every row must have them)."""
    if not rows:
        raise DataError(f"{source}: no rows")
    columns = set(rows[0])
    for kind, need in KINDS.items():
        if set(need) <= columns:
            missing = [i for i, r in enumerate(rows) if not set(need) <= set(r)]
            if missing:
                lacks = ", ".join(c for c in need if c not in rows[missing[0]])
                raise DataError(f"{source}: row {missing[0]} lacks column(s) {lacks} (needed by a {kind} task)")
            return kind
    raise DataError(f"{source}: columns {', '.join(sorted(map(str, columns)))}: a classification task needs "
                    "text and label, a tagging task tokens and tags (BIO)")


def task_kind(spec: str) -> str:
    """The kind (classify, tag) of the task ``spec``: a built-in's, or read from the file's columns."""
    if spec in _builtins():
        return _builtins()[spec].kind
    return kind_of(*read_rows(spec))


def _partition(rows: Sequence[dict], second: Sequence[bool]) -> Tuple[List[dict], List[dict]]:
    """(the rows whose flag is False, the rows whose flag is True), each in order."""
    return [r for r, f in zip(rows, second) if not f], [r for r, f in zip(rows, second) if f]


def _every(n: int, every: int) -> List[bool]:
    """Flags for rows every-1, 2*every-1, ... of ``n`` rows (every ``every``-th row)."""
    return [i % every == every - 1 for i in range(n)]


def split_rows(rows: Sequence[dict], source: str) -> Tuple[List[dict], List[dict]]:
    """(training rows, held-out rows): by the ``split`` column when the rows have one, else every fifth."""
    if any("split" in r for r in rows):
        splits = [str(r.get("split", "")).lower() for r in rows]
        bad = sorted(set(splits) - set(EVAL_SPLITS) - {"train"})
        if bad:
            raise DataError(f"{source}: split {bad[0]!r}: choose train or one of {', '.join(EVAL_SPLITS)}")
        train, held = _partition(rows, [s != "train" for s in splits])
    else:
        train, held = _partition(rows, _every(len(rows), HOLDOUT_EVERY))
    if not train or not held:
        raise DataError(f"{source}: {len(train)} training and {len(held)} held-out rows; both parts need rows")
    return train, held


GROUP_COLUMNS = ("group", "play")  # a row's group: the validation part takes whole groups
VAL_EVERY = 5  # every fifth training group (or row) is validation


def group_of(row: dict) -> Optional[str]:
    for column in GROUP_COLUMNS:
        if column in row and row[column] not in (None, ""):
            return str(row[column])
    return None


def carve_validation(rows: Sequence[dict], every: int = VAL_EVERY) -> Tuple[List[dict], List[dict]]:
    """(fitting rows, validation rows), both from ``rows`` (the task's *training* rows: the held-out
    rows are never passed here). With a group column (``group`` or ``play``) on every row and at least
    ``every`` groups, every ``every``-th group in sorted order from the third on is validation (so it
    asks the held-out split's question: unseen groups); else every ``every``-th row (rows every-1,
    2*every-1, ...)."""
    groups = [group_of(r) for r in rows]
    names = sorted({g for g in groups if g is not None})
    if None not in groups and len(names) >= every:
        val_groups = set(names[min(2, every - 1)::every])
        fit, val = _partition(rows, [g in val_groups for g in groups])
    else:
        fit, val = _partition(rows, _every(len(rows), every))
    if not fit or not val:
        raise DataError(f"{len(rows)} training rows: too few to carve a validation part (every {every}th row)")
    return fit, val


def _words(value: Any) -> List[str]:
    return value.split() if isinstance(value, str) else [str(v) for v in value]


def check_bio(tags: Sequence[str], where: str) -> None:
    for tag in tags:
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise DataError(f"{where}: tag {tag!r} is not BIO: use O, B-<type> or I-<type>")


def label_set(rows: Sequence[dict], kind: str, source: str) -> List[str]:
    """The task's labels (classify) or tags (tag), sorted; every row checked (BIO, one tag per token)."""
    if kind == "classify":
        labels = sorted({str(r["label"]) for r in rows})
    else:
        tags = set()
        for i, r in enumerate(rows):
            words, row_tags = _words(r["tokens"]), _words(r["tags"])
            if len(words) != len(row_tags):
                raise DataError(f"{source}: row {i} has {len(words)} tokens and {len(row_tags)} tags; one tag per token")
            check_bio(row_tags, f"{source}: row {i}")
            tags.update(row_tags)
        labels = sorted(tags)
    return labels


def check_label_count(labels: Sequence[str], kind: str, source: str) -> None:
    """DataError for a task with a single label (or tag): every prediction would be right, nothing measured."""
    if len(labels) < 2:
        what = "label" if kind == "classify" else "tag"
        raise DataError(f"{source}: every row has the {what} {labels[0] if labels else '(none)'!r}; a task needs at "
                        f"least two {what}s (with one, every prediction is right and nothing is measured)")


def label_positions(word_of: Sequence[Optional[int]], at: str) -> Dict[int, int]:
    """position -> word index: each word's first token (``at="first"``) or last token (``"last"``)."""
    out: Dict[int, int] = {}
    for pos, w in enumerate(word_of):
        if w is None:
            continue
        if at == "first" and (pos == 0 or word_of[pos - 1] != w):
            out[pos] = w
        if at == "last" and (pos == len(word_of) - 1 or word_of[pos + 1] != w):
            out[pos] = w
    return out


# where a word's tag is learned and read: its last token, for a causal model the only one that has
# seen the whole word, and measured better for an encoder too (docs/finetune.md)
TAG_AT = {True: "last", False: "last"}


def encode_rows(rows: Sequence[dict], kind: str, labels: List[str], tokenizer, max_len: int,
                at: str = "first"):
    """(X, Y): X (N, T) token ids padded with -1 (T <= max_len); Y (N,) label ids for classify, or
    (N, T) tag ids at each word's first (``at="first"``) or last token and -100 elsewhere for tag
    (a word whose labelled token lies past ``max_len`` is not scored)."""
    index = {lab: i for i, lab in enumerate(labels)}
    seqs, targets = [], []
    for r in rows:
        if kind == "classify":
            ids = list(tokenizer.encode(str(r["text"])))[:max_len] or [0]
            seqs.append(ids)
            targets.append(index[str(r["label"])])
            continue
        ids, word_of = tokenizer.encode_words(_words(r["tokens"]))
        positions = label_positions(word_of, at)
        ids = ids[:max_len]
        tags = _words(r["tags"])
        y = [IGNORE] * len(ids)
        for pos, w in positions.items():
            if pos < max_len:
                y[pos] = index[tags[w]]
        seqs.append(ids or [0])
        targets.append(y or [IGNORE])
    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    if kind == "classify":
        return x, torch.tensor(targets, dtype=torch.long)
    y = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, t in enumerate(targets):
        y[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    return x, y


WINDOWS = 4  # classify: a text is read as up to this many context-sized windows


def encode_windows(rows: Sequence[dict], labels: List[str], tokenizer, max_len: int, windows: int = WINDOWS):
    """A classification task's examples as windows: each text's first ``windows * max_len`` tokens cut
    into windows of ``max_len`` (a shorter text gives fewer), each window an example with its text's
    label. (X, Y, row_of): X (M, T) padded with -1, Y (M,), row_of (M,) the row each window is from
    (rows in order), so a row's prediction is the mean of its windows' logits (:func:`row_logits`)."""
    index = {lab: i for i, lab in enumerate(labels)}
    split = []
    for i, r in enumerate(rows):
        ids = list(tokenizer.encode(str(r["text"])))[:windows * max_len] or [0]
        split.append((str(r["label"]), i, [ids[j:j + max_len] for j in range(0, len(ids), max_len)]))
    chunks = [c for _, _, cs in split for c in cs]
    x = torch.full((len(chunks), max(len(c) for c in chunks)), PAD, dtype=torch.long)
    for j, c in enumerate(chunks):
        x[j, :len(c)] = torch.tensor(c, dtype=torch.long)
    y = torch.tensor([index[lab] for lab, _, cs in split for _ in cs], dtype=torch.long)
    row_of = torch.tensor([i for _, i, cs in split for _ in cs], dtype=torch.long)
    return x, y, row_of


def row_logits(logits: torch.Tensor, row_of: Optional[torch.Tensor]) -> torch.Tensor:
    """The mean of each row's windows' logits ((M, L) -> (rows, L)); unchanged without ``row_of``."""
    if row_of is None:
        return logits
    n = int(row_of.max()) + 1
    total = logits.new_zeros(n, logits.shape[-1]).index_add_(0, row_of, logits)
    return total / torch.bincount(row_of, minlength=n).clamp(min=1)[:, None].to(logits.dtype)


def row_targets(y: torch.Tensor, row_of: Optional[torch.Tensor]) -> torch.Tensor:
    """Each row's label (its first window's) for classify; unchanged without ``row_of``."""
    if row_of is None:
        return y
    first = torch.ones_like(row_of, dtype=torch.bool)
    first[1:] = row_of[1:] != row_of[:-1]
    return y[first]


def label_entropy(y: torch.Tensor) -> float:
    """Nats: the entropy of the training targets' label frequencies (the loss of predicting the
    label priors, the fine-tuning analogue of the unigram loss)."""
    counts = torch.bincount(y[y != IGNORE]).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@dataclass
class TaskData:
    """A task as the loop sees it: ``train`` and ``val`` are (X, Y) tensors (see :func:`encode_rows`)."""

    name: str
    kind: str
    labels: List[str]
    train: Tuple[torch.Tensor, torch.Tensor]
    val: Tuple[torch.Tensor, torch.Tensor]
    source: str
    unigram_loss: float  # the training labels' entropy (runfolder.classify_outcome's baseline)
    entropy_rate: Optional[float] = None
    tokenizer_name: str = "bytes"  # the pre-trained run's tokenizer (the summary's ``tokenizer``)
    vocab_size: int = 256  # its vocabulary
    val_tokens_per_byte: Optional[float] = None  # the targets are labels, not text: no bits per byte
    fit: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # the training rows less the validation part
    dev: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # the validation part carved from the training rows
    rows: Optional[Dict[str, List[dict]]] = None  # "fit", "dev", "train", "held": the rows of each part
    row_of: Optional[Dict[str, torch.Tensor]] = None  # classify: part -> each window's row (encode_windows)
    tokenizer: Any = None


def load_task_data(cfg) -> TaskData:
    """The task ``cfg.finetune.task`` tokenized with the tokenizer of the run ``cfg.finetune.init_from``."""
    from resnorm.data.tokenizer import load_run_tokenizer

    spec = cfg.finetune.task
    rows, source = read_rows(spec)
    kind = kind_of(rows, source)
    labels = label_set(rows, kind, source)
    train, held = split_rows(rows, source)
    check_label_count(labels, kind, source)
    fit, dev = carve_validation(train)
    tok = load_run_tokenizer(Path(cfg.finetune.init_from), cfg)
    from resnorm.model.blocks import objective_io

    at = TAG_AT[objective_io(cfg.model)[0]]
    parts = dict(fit=fit, dev=dev, train=train, held=held)
    if kind == "classify":
        enc = {k: encode_windows(v, labels, tok, cfg.train.seq_len) for k, v in parts.items()}
        row_of = {k: e[2] for k, e in enc.items()}
    else:
        enc = {k: encode_rows(v, kind, labels, tok, cfg.train.seq_len, at) for k, v in parts.items()}
        row_of = None
    xy = {k: (e[0], e[1]) for k, e in enc.items()}
    return TaskData(task_name(spec), kind, labels, xy["train"], xy["held"],
                    f"{source} ({kind}: {len(train)} train, {len(held)} held-out rows, {len(labels)} labels)",
                    label_entropy(xy["train"][1]), tokenizer_name=tok.name, vocab_size=int(tok.vocab_size),
                    fit=xy["fit"], dev=xy["dev"], rows=parts, row_of=row_of, tokenizer=tok)


class ExampleSampler:
    """Random training examples (with replacement), reproducible from ``seed``; ``generator`` is what
    a checkpoint keeps."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.x), (self.batch_size,), generator=self.generator)
        return self.x[idx], self.y[idx]


def example_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Every held-out example once, in file order, in batches of ``batch_size`` (the last may be smaller)."""
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


# --- span F1 (CoNLL) -------------------------------------------------------------------------------

def bio_spans(tags: Sequence[str]) -> List[Tuple[str, int, int]]:
    """The (type, start, end) chunks of a BIO sequence, end exclusive, as conlleval reads them: a
    chunk starts at B-X, or at an I-X that does not continue a chunk of type X."""
    spans, current = [], None
    for i, tag in enumerate(list(tags) + ["O"]):
        kind = tag[2:] if tag != "O" else None
        continues = tag.startswith("I-") and current is not None and current[0] == kind
        if current is not None and not continues:
            spans.append((current[0], current[1], i))
            current = None
        if kind is not None and not continues:
            current = (kind, i)
    return spans


def span_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> Dict[str, float]:
    """Micro precision, recall and F1 of exact span matches over sentences (CoNLL): a predicted span
    counts only if its type, start and end all match a gold span. F1 is 0 when nothing matches."""
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred):
        gs, ps = set(bio_spans(g)), set(bio_spans(p))
        tp, n_gold, n_pred = tp + len(gs & ps), n_gold + len(gs), n_pred + len(ps)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"span_precision": precision, "span_recall": recall, "span_f1": f1,
            "gold_spans": n_gold, "predicted_spans": n_pred}


def majority_accuracy(train_y: torch.Tensor, val_y: torch.Tensor) -> float:
    """The held-out accuracy of always predicting the most frequent training label."""
    top = Counter(train_y.tolist()).most_common(1)[0][0]
    return float((val_y == top).double().mean())

