"""Tokenizers (resnorm.data.tokenizer) and bits per byte in the analysis of a sweep that mixes tokenizers."""

from __future__ import annotations

import json
import math

import pytest

from resnorm.errors import DataError
from resnorm.data.tokenizer import (MIN_BPE_VOCAB, ByteTokenizer, bits_per_byte, file_vocab_size, load_run_tokenizer,
                               train_bpe)


def test_byte_tokenizer_is_utf8():
    tok = ByteTokenizer()
    assert tok.encode("aé東") == list("aé東".encode("utf-8")) and tok.vocab_size == 256 and tok.name == "bytes"
    assert tok.token_bytes().tolist() == [1] * 256 and tok.to_json() is None


def test_bpe_is_deterministic_and_its_file_vocab_is_read_from_json(tmp_path):
    pytest.importorskip("tokenizers")
    docs = ["low lower lowest newer wider " * 20, "the wider newest lowest " * 20] * 5
    a, b = train_bpe(iter(docs), 280), train_bpe(iter(docs), 280)
    assert a.to_json() == b.to_json() and a.name == b.name and MIN_BPE_VOCAB < a.vocab_size <= 280
    assert a.tokenizer.decode(a.encode("lowest newer")) == "lowest newer"
    path = tmp_path / "t.json"
    a.tokenizer.save(str(path))
    assert file_vocab_size(path) == a.vocab_size
    (tmp_path / "bad.json").write_text(json.dumps({"vocab": {}}))
    with pytest.raises(ValueError, match="no 'model' object"):
        file_vocab_size(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=f">= {MIN_BPE_VOCAB}"):
        train_bpe(iter(docs), MIN_BPE_VOCAB - 1)


def test_load_run_tokenizer_refuses_a_bpe_run_without_its_file(tmp_path):
    with pytest.raises(DataError, match="data.tokenizer=bpe"):
        load_run_tokenizer(tmp_path, {"data": {"tokenizer": "bpe"}})
    assert isinstance(load_run_tokenizer(tmp_path, {"data": {"name": "shakespeare"}}), ByteTokenizer)


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), 1.0) == 1.0
    assert bits_per_byte(2.0, 0.25) == 2.0 / math.log(2) * 0.25
    assert bits_per_byte(None, 1.0) is None and bits_per_byte(math.nan, 1.0) is None


def test_a_sweep_that_mixes_tokenizers_is_compared_in_bits_per_byte(tmp_path):
    from test_analysis import losses_for, write_run

    from analysis.load import load_sweep
    from analysis.metrics import loss_column
    from analysis.figures_loss import depth_vs_val_loss, loss_curves

    sweep = tmp_path / "mixed"
    def edit(run_dir, **changes):
        summary = json.loads((run_dir / "summary.json").read_text())
        summary.update(changes)
        (run_dir / "summary.json").write_text(json.dumps(summary))

    old = write_run(sweep, variant="pre", depth=2, losses=losses_for(2.0), final_val=2.1, best_val=2.0)
    bpe = write_run(sweep, variant="pre", depth=4, losses=losses_for(4.0), final_val=4.2, best_val=4.1)
    symbols = write_run(sweep, variant="post", depth=2, losses=losses_for(3.0), final_val=3.1, best_val=3.0)
    config = json.loads((old / "summary.json").read_text())["config"]
    edit(old, config={**config, "data": {"name": "shakespeare"}})  # an older summary of a byte run
    edit(bpe, tokenizer="bpe-0123456789ab", val_tokens_per_byte=0.3,
         final_val_bpb=bits_per_byte(4.2, 0.3), best_val_bpb=bits_per_byte(4.1, 0.3))
    runs = load_sweep(sweep).runs.set_index("run_name")
    a, b, c = runs.loc[old.name], runs.loc[bpe.name], runs.loc[symbols.name]
    assert a["tokenizer"] == "bytes" and a["final_val_bpb"] == pytest.approx(2.1 / math.log(2))
    assert a["best_val_bpb"] == pytest.approx(2.0 / math.log(2))
    assert b["final_val_bpb"] == pytest.approx(4.2 / math.log(2) * 0.3)
    assert c["tokenizer"] == "synthetic" and math.isnan(c["final_val_bpb"])  # symbols: no bits per byte
    assert loss_column(runs) == "final_val_bpb"
    assert loss_column(runs[runs["tokenizer"] != "bpe-0123456789ab"]) == "final_val_loss"  # bytes and symbols
    assert loss_column(runs[runs["tokenizer"] == "bytes"]) == "final_val_loss"
    loaded = load_sweep(sweep)
    assert depth_vs_val_loss(loaded, tmp_path / "d.png").is_file()
    assert loss_curves(loaded, tmp_path / "c.png").is_file()
