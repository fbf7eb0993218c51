"""The tokenizer a pre-trained run was trained with, to tokenize a fine-tuning task the same way.

:func:`load_run_tokenizer` is the one entry point (the lead may point it at
``resnorm.tokenizer.load_run_tokenizer`` once BPE runs exist there): a run folder holding a
``tokenizer.json`` (the ``tokenizers`` library's format) gets that tokenizer; every other run is
byte-level (``data.tokenizer`` absent or ``bytes``: UTF-8 bytes, ids 0-255, the default corpus's).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .errors import DataError

TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255)."""

    name = "bytes"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_words(self, words: Sequence[str]) -> Tuple[List[int], List[Optional[int]]]:
        """The ids of the words joined by single spaces, and each id's word index (None for a space)."""
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


class FileTokenizer:
    """A ``tokenizers.Tokenizer`` read from a run's ``tokenizer.json``."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"{path}: the run was trained with this tokenizer; reading it needs the package "
                            "tokenizers (pip install tokenizers)") from None
        self.name = str(path)
        self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text).ids

    def encode_words(self, words: Sequence[str]) -> Tuple[List[int], List[Optional[int]]]:
        enc = self.tokenizer.encode(list(words), is_pretokenized=True)
        return enc.ids, enc.word_ids


def load_run_tokenizer(run_dir: Path, cfg=None):
    """The tokenizer of the run in ``run_dir``: its ``tokenizer.json`` if it has one, else bytes. A
    config that names another tokenizer (``data.tokenizer`` other than ``bytes``) without the file
    is an error."""
    path = Path(run_dir) / TOKENIZER_FILE
    if path.is_file():
        return FileTokenizer(path)
    data = cfg.get("data") if cfg is not None and hasattr(cfg, "get") else None
    kind = data.get("tokenizer", "bytes") if data is not None and hasattr(data, "get") else "bytes"
    if kind not in (None, "bytes"):
        raise DataError(f"{run_dir}: data.tokenizer={kind!r} but the run folder has no {TOKENIZER_FILE}")
    return ByteTokenizer()
