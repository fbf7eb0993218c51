"""Tokenizers of the token streams: bytes, a byte-level BPE trained here, or a saved ``tokenizer.json``.

- :class:`ByteTokenizer`: ``list(text.encode('utf-8'))``, vocabulary 256 (every built-in dataset).
- :func:`train_bpe`: a byte-level BPE (the ``tokenizers`` library: ``ByteLevel`` pre-tokenizer and
  decoder, the 256 byte symbols as its initial alphabet, :data:`SPECIAL_TOKENS`) trained on the
  training split's documents to ``data.vocab_size`` tokens (fewer when the corpus has fewer pairs
  to merge); so ``data.vocab_size`` is at least :data:`MIN_BPE_VOCAB`.
- :func:`load_file`: any tokenizer saved in the ``tokenizers`` JSON format (``data.tokenizer=file``).

A :class:`TextTokenizer` has ``encode(text) -> List[int]``, ``vocab_size``, ``name`` and
``token_bytes()`` (the UTF-8 bytes each id stands for: exact for bytes and byte-level BPE; for other
tokenizers the bytes of the id decoded alone), which bits per byte are computed from. Every run
trained with a non-byte tokenizer writes it as ``<run folder>/tokenizer.json``
(:func:`write_run_tokenizer`); :func:`load_run_tokenizer` reads a run's tokenizer back (fine-tuning).

Torch-free; ``tokenizers`` is imported only where a BPE is trained or loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from resnorm.errors import DataError

#: the special tokens a trained BPE reserves (ids 0..): the end-of-text marker for later use
SPECIAL_TOKENS = ("<|endoftext|>",)
#: the smallest data.vocab_size a byte-level BPE can have: the 256 bytes and the special tokens
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)
#: the run folder's tokenizer file (the ``tokenizers`` JSON format)
RUN_TOKENIZER = "tokenizer.json"
BYTE_VOCAB = 256


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds the ids 0 .. vocab_size - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} tokens does not fit in uint32")


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256)."""

    name = "bytes"
    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def encode_words(self, words: Sequence[str]) -> Tuple[List[int], List[Optional[int]]]:
        """The ids of the words joined by single spaces, and each id's word index (None for a space):
        what a tagging task needs (resnorm.tasks.labelled.encode_rows)."""
        ids: List[int] = []
        word_of: List[Optional[int]] = []
        for i, word in enumerate(words):
            if i:
                ids.append(ord(" "))
                word_of.append(None)
            b = word.encode("utf-8")
            ids += list(b)
            word_of += [i] * len(b)
        return ids, word_of

    def token_bytes(self) -> np.ndarray:
        return np.ones(BYTE_VOCAB, dtype=np.int64)

    def to_json(self) -> Optional[str]:
        return None  # nothing to save: the bytes are the tokens


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the interface the data pipeline and fine-tuning use."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer, self.name = tokenizer, name

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode_words(self, words: Sequence[str]) -> Tuple[List[int], List[Optional[int]]]:
        """The ids of pre-split words and each id's word index (the tokenizer's ``word_ids``)."""
        enc = self.tokenizer.encode(list(words), is_pretokenized=True, add_special_tokens=False)
        return enc.ids, enc.word_ids

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes per id: a byte-level token's symbols are one byte each; a special token has none;
        an added token its text's bytes; any other token the bytes of the id decoded alone."""
        added = self.tokenizer.get_added_tokens_decoder()
        byte_level = '"ByteLevel"' in json.dumps(json.loads(self.to_json()).get("pre_tokenizer"))
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            tok = self.tokenizer.id_to_token(i)
            if i in added:
                out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            elif tok is not None:
                out[i] = len(tok) if byte_level else len(self.tokenizer.decode([i]).encode("utf-8"))
        return out

    def to_json(self) -> str:
        return self.tokenizer.to_str()


def content_name(kind: str, text: str) -> str:
    """``kind-<12 hex digits of the SHA-256 of the tokenizer's JSON>``: names a tokenizer by its content."""
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def train_bpe(docs: Iterable[str], vocab_size: int, n_docs: Optional[int] = None) -> TextTokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens trained on ``docs`` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"a byte-level BPE needs vocab_size >= {MIN_BPE_VOCAB}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer, length=n_docs)
    return TextTokenizer(tok, content_name("bpe", tok.to_str()))


def from_json(text: str, kind: str = "file") -> TextTokenizer:
    from tokenizers import Tokenizer

    return TextTokenizer(Tokenizer.from_str(text), content_name(kind, text))


def load_file(path) -> TextTokenizer:
    """A tokenizer saved in the ``tokenizers`` JSON format (``tokenizer.save(path)``)."""
    return from_json(Path(path).expanduser().read_text(encoding="utf-8"))


def file_vocab_size(path) -> int:
    """The vocabulary of a saved ``tokenizer.json`` from its JSON alone (the model's vocab plus added
    tokens outside it); raises ValueError when it is not such a file."""
    spec = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise ValueError("not a tokenizers JSON file (no 'model' object)")
    vocab = spec["model"].get("vocab")
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab or ())))
    ids |= {t["id"] for t in spec.get("added_tokens") or ()}
    if not ids:
        raise ValueError("the tokenizer has an empty vocabulary")
    return max(ids) + 1


def write_run_tokenizer(run_dir, tokenizer) -> Optional[Path]:
    """Write a non-byte tokenizer as ``<run_dir>/tokenizer.json`` (atomically); bytes write nothing."""
    from resnorm.runs.folder import write_text

    text = tokenizer.to_json()
    if text is None or run_dir is None:
        return None
    return write_text(Path(run_dir) / RUN_TOKENIZER, text)


def load_run_tokenizer(run_dir, cfg=None):
    """The tokenizer a run trained with: its ``tokenizer.json``, else (a bytes run) a ByteTokenizer.
    With ``cfg`` (the run's config), a run whose config names a non-byte tokenizer but whose folder
    lacks the file is an error rather than silently bytes."""
    path = Path(run_dir) / RUN_TOKENIZER
    if path.is_file():
        return from_json(path.read_text(encoding="utf-8"), kind="run")
    kind = None
    if cfg is not None:
        from resnorm.config.schema import reader

        kind = reader(cfg)("data.tokenizer")
    if kind not in (None, "bytes"):
        raise DataError(f"{path}: the run was trained with data.tokenizer={kind} but its tokenizer.json "
                        "is missing")
    return ByteTokenizer()


def bits_per_byte(nats_per_token: Optional[float], tokens_per_byte: Optional[float]) -> Optional[float]:
    """nats per token / ln 2 * tokens per byte (None when either is unknown or the loss is not finite)."""
    if nats_per_token is None or tokens_per_byte is None or not math.isfinite(nats_per_token):
        return None
    return nats_per_token / math.log(2) * tokens_per_byte
