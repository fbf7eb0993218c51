"""``data=hf``: a dataset read through the ``datasets`` library, offline, as cached token streams.

:func:`load_hf` turns the ``data`` config node into a :class:`resnorm.data.corpora.TokenData`:

1. find the source (:mod:`resnorm.data.hf_source`: ``data.path`` or ``data.hub_id``, offline only);
2. the documents: the column ``data.text_field`` of ``data.split``, each followed by ``"\\n"``;
   validation is ``data.val_split`` when set, else the last ``data.val_fraction`` of those bytes
   (cut at a character boundary);
3. the tokenizer (``data.tokenizer``): bytes; a byte-level BPE trained on the training documents
   (:func:`resnorm.data.tokenizer.train_bpe`, cached by a hash of its inputs); or a saved ``tokenizer.json``;
4. the token streams, tokenized once into the cache (:mod:`resnorm.data.token_cache`) and read back as
   memory maps (uint8, uint16 or uint32: :func:`resnorm.data.tokenizer.dtype_for_vocab`).

A cache hit reads no text at all (a Hub dataset is opened for its fingerprint only). Everything a
user can get wrong is one line naming the key (a ConfigError); :func:`with_data_vocab` gives the
config the model is built from (``model.vocab_size`` follows the tokenizer).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from resnorm.errors import ConfigError, DataError
from resnorm.data.hf_source import Source, fetch_hint, offline, resolve
from resnorm.data.token_cache import cache_root, entry, key_of, read_meta, read_stream, write_meta, write_stream
from resnorm.data.tokenizer import ByteTokenizer, dtype_for_vocab, from_json, load_file, train_bpe

ENCODE_CHUNK = 1024  # documents per encode_batch call
STRING_TYPES = ("string", "large_string")


def _open(source: Source, split: str, key: str, hf_cache: str, hub_config: Optional[str] = None):
    """One split of the source as a ``datasets.Dataset`` (offline)."""
    offline()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if source.kind == "saved":
        ds = datasets.load_from_disk(str(source.files[0]))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(key, split, f"{source.describe()} has the split(s) {', '.join(ds)}")
            return ds[split]
        if split != "train":
            raise ConfigError(key, split, f"{source.describe()} is a single dataset: its one split is train")
        return ds
    if source.kind == "files":
        if split != "train":
            raise ConfigError(key, split, f"{source.describe()} ({source.builder} files) has the one split train")
        return datasets.load_dataset(source.builder, data_files=[str(f) for f in source.files], split="train",
                                     cache_dir=hf_cache)
    return _open_hub(source.value, split, key, hub_config)


def _open_hub(hub_id: str, split: str, key: str, hub_config: Optional[str]):
    import datasets

    try:
        return datasets.load_dataset(hub_id, hub_config, split=split)
    except ValueError as exc:  # an unknown split or config
        raise ConfigError(key, split, f"data.hub_id={hub_id}: {str(exc).splitlines()[0]}") from None
    except (ConnectionError, FileNotFoundError, OSError) as exc:
        raise ConfigError("data.hub_id", hub_id, f"cannot be loaded from the local cache ({type(exc).__name__}); "
                                                 + fetch_hint(hub_id, hub_config)) from None


def _check_text_column(ds, source: Source, split: str, field: str) -> None:
    if field not in ds.column_names:
        raise ConfigError("data.text_field", field,
                          f"{source.describe()} (split {split}) has the columns {', '.join(ds.column_names)}")
    dtype = getattr(ds.features[field], "dtype", None)
    if dtype not in STRING_TYPES:
        text_cols = [c for c in ds.column_names if getattr(ds.features[c], "dtype", None) in STRING_TYPES]
        raise ConfigError("data.text_field", field, f"the column holds {dtype or type(ds.features[field]).__name__}, "
                                                    f"not text; text columns: {', '.join(text_cols) or '(none)'}")


def split_pieces(docs: List[str], val_fraction: float) -> Tuple[List[str], List[str]]:
    """Documents (each with its ``"\\n"``) cut into train and validation at the last ``val_fraction``
    of their UTF-8 bytes, the cut moved back to a character boundary."""
    pieces = [d + "\n" for d in docs]
    sizes = [len(p.encode("utf-8")) for p in pieces]
    total = sum(sizes)
    cut = total - int(total * val_fraction)
    acc = 0
    for i, size in enumerate(sizes):
        if acc + size > cut:
            raw = pieces[i].encode("utf-8")
            at = cut - acc
            while at > 0 and raw[at] & 0xC0 == 0x80:  # a UTF-8 continuation byte: not a boundary
                at -= 1
            head, tail = raw[:at].decode("utf-8"), raw[at:].decode("utf-8")
            return pieces[:i] + ([head] if head else []), [tail] + pieces[i + 1:]
        acc += size
    return pieces, []


class SplitTexts:
    """The training and validation documents a data config names, opened lazily: ``identity()``
    (what the caches are keyed by) reads no text; ``pieces()`` reads it once."""

    def __init__(self, cfg, source: Source, hf_cache: str):
        self.cfg, self.source, self.hf_cache = cfg, source, hf_cache
        self._pieces: Optional[Tuple[List[str], List[str]]] = None
        self._sets: Dict[str, Any] = {}

    def _split(self, split: str, key: str):
        if split not in self._sets:
            ds = _open(self.source, split, key, self.hf_cache, self.cfg.hub_config)
            _check_text_column(ds, self.source, split, self.cfg.text_field)
            self._sets[split] = ds
        return self._sets[split]

    def _splits(self) -> List[Tuple[str, str]]:
        out = [(self.cfg.split, "data.split")]
        return out + [(self.cfg.val_split, "data.val_split")] if self.cfg.val_split else out

    def identity(self) -> Dict[str, Any]:
        c = self.cfg
        files = self.source.identity()
        if self.source.kind == "hub":  # the fingerprints of the cached splits
            files = [c.hub_id, c.hub_config] + [self._split(s, k)._fingerprint for s, k in self._splits()]
        return {"source": files, "split": c.split, "text_field": c.text_field, "val_split": c.val_split,
                "val_fraction": None if c.val_split else c.val_fraction}

    def pieces(self) -> Tuple[List[str], List[str]]:
        if self._pieces is None:
            docs = [self._docs(s, k) for s, k in self._splits()]
            if self.cfg.val_split:
                self._pieces = ([d + "\n" for d in docs[0]], [d + "\n" for d in docs[1]])
            else:
                self._pieces = split_pieces(docs[0], self.cfg.val_fraction)
        return self._pieces

    def _docs(self, split: str, key: str) -> List[str]:
        return ["" if t is None else t for t in self._split(split, key)[self.cfg.text_field]]


def tokenizer_for(cfg, root, texts: SplitTexts):
    """The tokenizer ``data.tokenizer`` names: bytes, the cached (else newly trained) BPE, or the file."""
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer == "file":
        return load_file(cfg.tokenizer_path)
    key = key_of({"kind": "bpe-bytelevel", "vocab_size": cfg.vocab_size, "data": texts.identity()})

    def build(tmp) -> None:
        train, _ = texts.pieces()
        tok = train_bpe(iter(train), cfg.vocab_size, len(train))
        (tmp / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
        write_meta(tmp, {"vocab_size": tok.vocab_size, "requested": cfg.vocab_size, "name": tok.name})

    folder = entry(root, "tokenizers", key, build)
    return from_json((folder / "tokenizer.json").read_text(encoding="utf-8"), kind="bpe")


def encode_pieces(tok, pieces: List[str]) -> np.ndarray:
    """The concatenated token ids of ``pieces``, in the smallest dtype the vocabulary needs."""
    dtype = dtype_for_vocab(tok.vocab_size)
    if isinstance(tok, ByteTokenizer):
        return np.frombuffer("".join(pieces).encode("utf-8"), dtype=np.uint8).copy()
    parts = [np.asarray(ids, dtype=dtype) for start in range(0, len(pieces), ENCODE_CHUNK)
             for ids in tok.encode_batch(pieces[start:start + ENCODE_CHUNK])]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def unigram_entropy_np(ids: np.ndarray) -> Optional[float]:
    """-sum p ln p of the token frequencies, nats per token (as :func:`resnorm.data.corpora.unigram_entropy`)."""
    if len(ids) == 0:
        return None
    counts = np.bincount(ids).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def build_streams(tmp, tok, texts: SplitTexts) -> None:
    """Tokenize the two splits into ``train.bin`` and ``val.bin``, then ``meta.json``."""
    train, val = texts.pieces()
    meta = {"dtype": dtype_for_vocab(tok.vocab_size).name, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "source": texts.source.describe()}
    for name, pieces in (("train", train), ("val", val)):
        ids = encode_pieces(tok, pieces)
        write_stream(tmp / f"{name}.bin", ids)
        meta[f"{name}_tokens"] = int(len(ids))
        meta[f"{name}_bytes"] = sum(len(p.encode("utf-8")) for p in pieces)
        if name == "train":
            meta["unigram_loss"] = unigram_entropy_np(ids)
    write_meta(tmp, meta)


def load_hf(cfg, seq_len: int):
    """The ``data=hf`` dataset ``cfg`` (a ``data`` config node) names, as train/validation token streams."""
    from resnorm.data.token_data import TokenData

    source = resolve(cfg.path, cfg.hub_id, cfg.hub_config)
    root = cache_root(cfg.cache_dir)
    texts = SplitTexts(cfg, source, str(root / "hf"))
    tok = tokenizer_for(cfg, root, texts)
    key = key_of({"data": texts.identity(), "tokenizer": tok.name})
    folder = entry(root, "tokens", key, lambda tmp: build_streams(tmp, tok, texts))
    meta = read_meta(folder)
    streams = {}
    for name, part in (("train", "training"), ("val", "validation")):
        n = meta[f"{name}_tokens"]
        if n < seq_len + 1:
            raise DataError(f"{source.describe()}: the {part} split has {n} tokens ({tok.name}), fewer than one "
                            f"sequence of {seq_len + 1} (train.seq_len + 1); lower train.seq_len or use more data"
                            + ("" if cfg.val_split else " (or change data.val_fraction)"))
        streams[name] = torch.from_numpy(read_stream(folder / f"{name}.bin", meta["dtype"], n))
    return TokenData(train=streams["train"], val=streams["val"], source=f"{source.describe()} ({tok.name})",
                     unigram_loss=meta["unigram_loss"], vocab_size=tok.vocab_size, tokenizer=tok,
                     token_bytes=torch.from_numpy(tok.token_bytes()))


def with_data_vocab(cfg, data):
    """The config the model is built from: ``model.vocab_size`` follows a non-byte tokenizer when it
    is left at its default (256); a set value smaller than the tokenizer's vocabulary is an error."""
    from resnorm.config.schema import leaf

    size, default = int(cfg.model.vocab_size), leaf("model.vocab_size").default
    if data.tokenizer is None or isinstance(data.tokenizer, ByteTokenizer) or size == data.vocab_size:
        return cfg
    if size != default and size < data.vocab_size:
        raise ConfigError("model.vocab_size", size, f"the tokenizer {data.tokenizer.name} has {data.vocab_size} "
                                                    f"tokens: must be >= {data.vocab_size}, or leave it at {default} "
                                                    "to follow the tokenizer")
    if size != default:
        return cfg
    out = copy.deepcopy(cfg)
    out.model.vocab_size = data.vocab_size
    return out


def model_config(cfg, data, job):
    """:func:`with_data_vocab` for a job: when the model's vocabulary follows the tokenizer, the job's
    identity stays that of the config as given (``job.run_id`` is fixed from it if unset)."""
    built = with_data_vocab(cfg, data)
    if built is not cfg and getattr(job, "run_id", "") is None:
        from resnorm.runs.identity import run_id

        job.run_id = run_id(cfg)
    return built
