"""The on-disk cache of trained tokenizers and tokenized streams (torch-free).

Layout under the cache root (``data.cache_dir``; null: ``$RESNORM_CACHE``, else ``~/.cache/resnorm``)::

    tokenizers/<key>/tokenizer.json      a BPE trained on a training split
    tokens/<key>/train.bin, val.bin      the token streams, raw uint8/uint16/uint32 (meta.json says which)
    tokens/<key>/meta.json               dtype, lengths, UTF-8 bytes, unigram loss, source, tokenizer
    hf/                                  ``datasets``' own cache of the parquet/JSON/text files it read
    locks/<key>.lock                     held while an entry is built

An entry's ``key`` is a hash of everything it is computed from (:func:`key_of`): the source's
identity (file paths, sizes and modification times, or a Hub dataset's fingerprint), the split, the
text field, the validation split or fraction, and the tokenizer (its config, or its JSON's hash).
Entries are built in a temporary folder and renamed into place, under a lock, so the jobs of a
sweep that start together build each entry once and never read a half-written one. The streams are
read back as memory maps (:func:`read_stream`): a training step never waits on tokenization.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np

ENV = "RESNORM_CACHE"
DEFAULT_ROOT = "~/.cache/resnorm"
META = "meta.json"


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """``data.cache_dir``, else ``$RESNORM_CACHE``, else ``~/.cache/resnorm``."""
    return Path(cache_dir or os.environ.get(ENV) or DEFAULT_ROOT).expanduser()


def key_of(parts: Dict[str, Any]) -> str:
    """24 hex digits of the SHA-256 of ``parts`` as canonical JSON."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@contextlib.contextmanager
def lock(root: Path, key: str) -> Iterator[None]:
    """An exclusive lock on ``<root>/locks/<key>.lock``, waited for (released when the process dies)."""
    from resnorm.runs.locks import exclusive

    folder = root / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder / f"{key}.lock"):
        yield


def entry(root: Path, kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """The folder ``<root>/<kind>/<key>``, built by ``build(tmp_folder)`` if it is not there yet
    (under the key's lock, in a temporary folder renamed into place)."""
    final = root / kind / key
    if (final / META).is_file():
        return final
    with lock(root, key):
        if (final / META).is_file():  # built by another process while we waited
            return final
        tmp = root / kind / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            if final.exists():  # a stale entry without its meta.json: a build killed mid-way
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def write_meta(folder: Path, meta: Dict[str, Any]) -> None:
    """``meta.json`` is written last: an entry with it is complete."""
    (folder / META).write_text(json.dumps(meta, indent=1, sort_keys=True))


def read_meta(folder: Path) -> Dict[str, Any]:
    return json.loads((folder / META).read_text())


def write_stream(path: Path, ids: np.ndarray) -> None:
    with open(path, "wb") as f:
        ids.tofile(f)


def read_stream(path: Path, dtype: str, length: int) -> np.ndarray:
    """The stream as a copy-on-write memory map (pages are read when a batch touches them)."""
    if length == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="c", shape=(length,))
