"""A dataset as the training loop sees it (:class:`TokenData`): the train and validation token streams,
where they came from, their vocabulary and tokenizer, and the baselines a loss is read against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class TokenData:
    train: torch.Tensor  # uint8 or int64 1-D stream
    val: torch.Tensor
    source: str  # where the tokens came from, recorded in the run summary
    #: the trivial baseline: the unigram entropy of the training split, nats per token (the loss of a
    #: model that predicts every token from the training split's token frequencies alone)
    unigram_loss: Optional[float] = None
    #: data=synthetic only: the generating process's entropy rate, nats per token (see
    #: :func:`synthetic_entropy_rate`); None for text
    entropy_rate: Optional[float] = None
    #: the tokens' vocabulary (256 for bytes); the model's vocabulary follows it (resnorm.data.hf.with_data_vocab)
    vocab_size: int = 256
    #: data=hf: the resnorm.data.tokenizer tokenizer (None: the stream is bytes)
    tokenizer: Any = None
    #: data=hf: UTF-8 bytes per token id (None: one byte per token), for bits per byte
    token_bytes: Optional[torch.Tensor] = None
    #: target tokens per UTF-8 byte of the validation batches (set by resnorm.train.loop.setup; 1 for bytes);
    #: None where the tokens are not text (synthetic): no bits per byte
    val_tokens_per_byte: Optional[float] = 1.0
    #: what the tokens are when ``tokenizer`` is None: bytes, or synthetic symbols
    token_kind: str = "bytes"

    @property
    def tokenizer_name(self) -> str:
        """The summary's ``tokenizer``: bytes, synthetic, or the tokenizer's name (bpe-<hash>, file-<hash>)."""
        return self.tokenizer.name if self.tokenizer is not None else self.token_kind
