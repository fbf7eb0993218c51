"""data=hf: datasets on disk in every format, the BPE and its cache, the token cache,
bits per byte, the one-line errors, and one run from the command line. Offline, on data made here."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose, run_cli
from resnorm.data.corpora import fixed_batches, load_data, tokens_per_byte
from resnorm.errors import ConfigError
from resnorm.data.tokenizer import ByteTokenizer, dtype_for_vocab, load_run_tokenizer

datasets = pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

WORDS = "the quick brown fox jumps over a lazy dog résumé naïve café 東京 and then".split()
NO_ANALYSIS = "~hydra.callbacks.analysis"


def make_docs(n: int = 300, seed: int = 0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(n)]


DOCS = make_docs()
TEXT = "".join(d + "\n" for d in DOCS)  # what every format's token stream spells


def write_formats(root: Path) -> dict:
    """The same documents as each format data=hf reads: {format: data.path}."""
    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    ds.save_to_disk(str(root / "saved"))
    ds.to_parquet(str(root / "one.parquet"))
    ds.to_json(str(root / "one.jsonl"))
    (root / "one.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    (root / "parts").mkdir()
    ds.select(range(150)).to_parquet(str(root / "parts" / "a.parquet"))
    ds.select(range(150, len(DOCS))).to_parquet(str(root / "parts" / "b.parquet"))
    return {"saved": root / "saved", "parquet": root / "one.parquet", "jsonl": root / "one.jsonl",
            "txt": root / "one.txt", "folder": root / "parts", "glob": root / "parts" / "*.parquet"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_formats(root)


def hf(path, tmp_path, *extra):
    return compose("data=hf", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}", *extra)


@pytest.mark.parametrize("fmt", ["saved", "parquet", "jsonl", "txt", "folder", "glob"])
def test_every_format_loads_the_same_byte_stream(fmt, corpus, tmp_path):
    cfg = hf(corpus[1][fmt], tmp_path)
    data = load_data(cfg.data, 16)
    stream = torch.cat([data.train, data.val])
    assert data.train.dtype == torch.uint8 and data.vocab_size == 256
    assert bytes(stream.tolist()) == TEXT.encode("utf-8")
    n_val = int(len(TEXT.encode()) * cfg.data.val_fraction)
    assert abs(len(data.val) - n_val) <= 3  # the cut moved back to a character boundary
    bytes(data.val.tolist()).decode("utf-8")  # both sides are whole characters


def test_saved_dataset_dict_with_a_validation_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": DOCS[:200]}),
                               "validation": datasets.Dataset.from_dict({"body": DOCS[200:]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = hf(tmp_path / "dd", tmp_path, "data.text_field=body", "data.val_split=validation")
    data = load_data(cfg.data, 16)
    assert bytes(data.train.tolist()).decode() == "".join(d + "\n" for d in DOCS[:200])
    assert bytes(data.val.tolist()).decode() == "".join(d + "\n" for d in DOCS[200:])


def test_bpe_trains_once_and_is_cached(corpus, tmp_path):
    cfg = hf(corpus[1]["saved"], tmp_path, "data.tokenizer=bpe", "data.vocab_size=300")
    data = load_data(cfg.data, 16)
    assert data.tokenizer.name.startswith("bpe-") and 257 <= data.vocab_size <= 300
    assert data.train.dtype == torch.uint16 and int(data.train.long().max()) < data.vocab_size
    assert len(data.train) < 0.6 * len(TEXT.encode())  # merges happened
    assert data.tokenizer.tokenizer.decode(torch.cat([data.train, data.val]).tolist()) == TEXT
    cache = tmp_path / "cache"
    files = sorted(cache.glob("tokenizers/*/tokenizer.json")) + sorted(cache.glob("tokens/*/meta.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = load_data(cfg.data, 16)  # a cache hit: nothing trained or tokenized again
    assert torch.equal(again.train, data.train) and again.tokenizer.name == data.tokenizer.name
    assert sorted(cache.glob("tokenizers/*/tokenizer.json")) + sorted(cache.glob("tokens/*/meta.json")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps
    other = load_data(hf(corpus[1]["saved"], tmp_path, "data.tokenizer=bpe", "data.vocab_size=320").data, 16)
    assert other.tokenizer.name != data.tokenizer.name and len(list(cache.glob("tokenizers/*"))) == 2


def test_tokenizer_file_gives_the_same_tokens(corpus, tmp_path):
    bpe = load_data(hf(corpus[1]["parquet"], tmp_path, "data.tokenizer=bpe", "data.vocab_size=300").data, 16)
    path = tmp_path / "tok.json"
    bpe.tokenizer.tokenizer.save(str(path))
    cfg = hf(corpus[1]["parquet"], tmp_path, "data.tokenizer=file", f"data.tokenizer_path={path}")
    from resnorm.train.preflight import validate

    validate(cfg)
    loaded = load_data(cfg.data, 16)
    assert loaded.tokenizer.name.startswith("file-") and loaded.vocab_size == bpe.vocab_size
    assert torch.equal(loaded.train, bpe.train) and torch.equal(loaded.val, bpe.val)


def test_dtype_follows_the_vocabulary():
    assert [dtype_for_vocab(v).name for v in (2, 256, 257, 65536, 65537, 2 ** 32)] == \
        ["uint8", "uint8", "uint16", "uint16", "uint32", "uint32"]
    with pytest.raises(ValueError):
        dtype_for_vocab(2 ** 32 + 1)


def _gpt2_byte_decoder():
    """The GPT-2 byte <-> unicode table (the ByteLevel alphabet), written out independently."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def test_bits_per_byte_by_hand(corpus, tmp_path):
    data = load_data(hf(corpus[1]["saved"], tmp_path, "data.tokenizer=bpe", "data.vocab_size=300").data, 16)
    dec, tok = _gpt2_byte_decoder(), data.tokenizer.tokenizer
    special = {0}  # <|endoftext|>
    nbytes = {i: 0 if i in special else len(bytes(dec[c] for c in tok.id_to_token(i))) for i in range(data.vocab_size)}
    assert [nbytes[i] for i in range(data.vocab_size)] == data.token_bytes.tolist()
    assert sum(nbytes[i] for i in data.val.tolist()) == len(bytes(tok.decode(data.val.tolist()), "utf-8"))
    batches = fixed_batches(data.val, 2, 4, 16)
    by_hand = 2 * 4 * 16 / sum(nbytes[i] for _, y in batches for i in y.reshape(-1).tolist())
    assert tokens_per_byte(batches, data) == pytest.approx(by_hand, rel=1e-12)
    data.token_bytes = None  # bytes: one token per byte
    assert tokens_per_byte(batches, data) == 1.0
    data.val_tokens_per_byte = None  # synthetic symbols: no bytes at all
    assert tokens_per_byte(batches, data) is None


def _train(cfg, tmp_path):
    from resnorm.train.job import JobInfo, train

    run_dir = tmp_path / "run"
    return train(cfg, JobInfo(run_dir, "t", "g", [])), run_dir


@pytest.mark.usefixtures("one_thread")
def test_a_bytes_run_reports_bpb_as_loss_over_ln2(corpus, tmp_path):
    tiny = [o for o in TINY if not o.startswith("data")]
    summary, run_dir = _train(hf(corpus[1]["txt"], tmp_path, *tiny, "depth=1"), tmp_path)
    assert summary["final_val_bpb"] == summary["final_val_loss"] / math.log(2)
    assert summary["best_val_bpb"] == summary["best_val_loss"] / math.log(2)
    assert summary["tokenizer"] == "bytes" and summary["val_tokens_per_byte"] == 1.0
    assert not (run_dir / "tokenizer.json").exists()
    assert load_run_tokenizer(run_dir, summary["config"]).encode("é") == [0xC3, 0xA9]
    assert isinstance(load_run_tokenizer(run_dir), ByteTokenizer)


def test_bad_input_is_one_line_naming_the_key(corpus, tmp_path):
    from resnorm.train.preflight import validate

    saved = corpus[1]["saved"]
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "emptydir").mkdir()
    cases = [
        (hf(tmp_path / "missing", tmp_path), "data.path=", "no such file or folder"),
        (hf(tmp_path / "emptydir", tmp_path), "data.path=", "neither a save_to_disk dataset"),
        (hf(tmp_path / "notes.csv", tmp_path), "data.path=", "not a format data=hf reads"),
        (hf(tmp_path / "*.nothing", tmp_path), "data.path=", "matches no file"),
        (compose("data=hf"), "data.path=None", "exactly one of data.path"),
        (hf(saved, tmp_path, "data.text_field=body"), "data.text_field='body'", "has the columns text, n"),
        (hf(corpus[1]["parquet"], tmp_path, "data.text_field=body"), "data.text_field='body'", "columns text, n"),
        (hf(corpus[1]["jsonl"], tmp_path, "data.text_field=body"), "data.text_field='body'", "columns text, n"),
        (hf(saved, tmp_path, "data.split=test"), "data.split='test'", "has the split(s) train"),
        (hf(saved, tmp_path, "data.tokenizer=bpe", "data.vocab_size=100"), "data.vocab_size=100",
         "a byte-level BPE needs >= 257"),
        (hf(saved, tmp_path, "data.tokenizer=bpe", "model.vocab_size=300"), "model.vocab_size=300",
         "must be >= 512 (the tokens of data.vocab_size)"),
        (compose("data.tokenizer=bpe"), "data.tokenizer='bpe'", "needs data=hf"),
        (hf(saved, tmp_path, "data.tokenizer=file"), "data.tokenizer_path=None", "needs data.tokenizer_path=FILE"),
        (hf(saved, tmp_path, f"data.tokenizer_path={tmp_path / 'notes.csv'}"), "data.tokenizer_path=",
         "read only with data.tokenizer=file"),
        (hf(saved, tmp_path, "data.tokenizer=file", f"data.tokenizer_path={tmp_path / 'notes.csv'}"),
         "data.tokenizer_path=", "not a readable tokenizer.json"),
    ]
    for cfg, start, hint in cases:
        with pytest.raises(ConfigError) as err:
            validate(cfg)
        message = str(err.value)
        assert "\n" not in message and message.startswith(start) and hint in message, message


def test_a_column_that_is_not_text_is_rejected_at_load(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"^data.text_field='n' is invalid: the column holds int64, not text; "
                                          r"text columns: text$"):
        load_data(hf(corpus[1]["saved"], tmp_path, "data.text_field=n").data, 16)


def test_too_little_data_for_a_sequence(corpus, tmp_path):
    from resnorm.errors import DataError

    with pytest.raises(DataError, match="the validation split has .* fewer than one sequence of 2001"):
        load_data(hf(corpus[1]["saved"], tmp_path, "data.tokenizer=bpe", "data.vocab_size=300").data, 2000)


def _fake_hub_cache(root: Path, corpus_file: Path) -> Path:
    """What ``datasets.load_dataset('me/tiny')`` leaves in the datasets cache (datasets 5.2's layout):
    made offline by loading a parquet file and naming its cache entry as the Hub dataset's."""
    import shutil

    scratch = root / "scratch"
    datasets.load_dataset("parquet", data_files=[str(corpus_file)], split="train", cache_dir=str(scratch))
    built = next(p for p in scratch.glob("parquet/*/0.0.0/*") if p.is_dir())
    dest = root / "hf" / "me___tiny" / "default" / "0.0.0" / built.name
    shutil.copytree(built, dest)
    for f in dest.glob("parquet-*.arrow"):
        f.rename(f.with_name(f.name.replace("parquet-", "tiny-", 1)))
    return root / "hf"


def test_hub_dataset_from_the_local_cache_and_one_missing(corpus, tmp_path, monkeypatch):
    import datasets.config as dc
    from resnorm.train.preflight import validate

    cache = _fake_hub_cache(tmp_path, corpus[1]["parquet"])
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(dc, "HF_DATASETS_CACHE", cache)
    cfg = compose("data=hf", "data.hub_id=me/tiny", f"data.cache_dir={tmp_path / 'cache'}")
    validate(cfg)
    data = load_data(cfg.data, 16)
    assert bytes(torch.cat([data.train, data.val]).tolist()) == TEXT.encode("utf-8")
    with pytest.raises(ConfigError) as err:
        validate(compose("data=hf", "data.hub_id=wikitext"))
    message = str(err.value)
    assert message.startswith(f"data.hub_id='wikitext' is invalid: not in the local Hugging Face cache ({cache})")
    assert "datasets.load_dataset('wikitext')" in message and "data.path=DIR" in message and "\n" not in message


def test_identity_follows_the_tokenizer(corpus, tmp_path):
    from resnorm.runs.identity import run_id

    ids = {run_id(hf(corpus[1]["saved"], tmp_path, *o)) for o in
           [(), ("data.tokenizer=bpe",), ("data.tokenizer=bpe", "data.vocab_size=300")]}
    assert len(ids) == 3
    assert run_id(hf(corpus[1]["saved"], tmp_path)) == run_id(hf(corpus[1]["saved"], tmp_path / "elsewhere"))


def test_cache_entry_is_built_atomically(tmp_path):
    from resnorm.data.token_cache import entry, write_meta

    def broken(tmp):
        (tmp / "train.bin").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        entry(tmp_path, "tokens", "k", broken)
    assert not (tmp_path / "tokens" / "k").exists() and not list((tmp_path / "tokens").glob(".*tmp"))
    (tmp_path / "tokens" / "k").mkdir()  # a stale folder without meta.json is rebuilt
    folder = entry(tmp_path, "tokens", "k", lambda tmp: write_meta(tmp, {"ok": 1}))
    assert json.loads((folder / "meta.json").read_text()) == {"ok": 1}


def test_a_locked_entry_waits_for_the_builder_and_is_not_built_twice(tmp_path):
    import threading

    from resnorm.data.token_cache import entry, lock, write_meta

    built = []

    def build(tmp):
        built.append(threading.current_thread().name)
        write_meta(tmp, {"by": built[-1]})

    with lock(tmp_path, "k"):  # another job is building the entry
        waiter = threading.Thread(target=entry, args=(tmp_path, "tokens", "k", build), name="waiter")
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and built == []  # it waits for the lock
        folder = tmp_path / "tokens" / "k"
        folder.mkdir(parents=True)
        write_meta(folder, {"by": "the other job"})
    waiter.join(10)
    assert not waiter.is_alive() and built == []  # it found the entry the other job built
    assert json.loads((folder / "meta.json").read_text()) == {"by": "the other job"}


def test_cli_trains_a_bpe_run_and_writes_its_tokenizer(corpus, tmp_path):
    tiny = [o for o in TINY if not o.startswith("data") and not o.startswith("train.steps")]
    proc = run_cli("data=hf", f"data.path={corpus[1]['saved']}", "data.tokenizer=bpe", "data.vocab_size=300",
                   "train.steps=3", "depth=1", f"data.cache_dir={tmp_path / 'cache'}", NO_ANALYSIS, *tiny,
                   cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["tokenizer"].startswith("bpe-")
    vocab = summary["data_vocab_size"]
    assert summary["config"]["model"]["vocab_size"] == vocab and 257 <= vocab <= 300
    tpb = summary["val_tokens_per_byte"]
    assert 0 < tpb < 1 and summary["final_val_bpb"] == pytest.approx(summary["final_val_loss"] / math.log(2) * tpb)
    assert summary["run_id"] == run_dir.name  # the identity of the config as given (model.vocab_size=256)
    tok = load_run_tokenizer(run_dir, summary["config"])
    cached = load_data(hf(corpus[1]["saved"], tmp_path, "data.tokenizer=bpe", "data.vocab_size=300").data, 16)
    assert tok.vocab_size == vocab and tok.encode(DOCS[0]) == cached.tokenizer.encode(DOCS[0])


def test_cli_bad_path_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("data=hf", f"data.path={tmp_path / 'nope'}", NO_ANALYSIS, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"config error: data.path='{tmp_path / 'nope'}' is invalid: no such file or folder (data=hf reads a "
        "save_to_disk folder, or parquet, JSON lines or text files)"]


@pytest.mark.slow
def test_two_jobs_starting_together_build_each_cache_entry_once(corpus, tmp_path):
    """Two processes load the same data=hf bpe config into an empty cache at the same time (the jobs
    of a sweep): both get the same tokenizer and streams, and the cache holds one entry of each."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    script = ("import hashlib, sys; from resnorm.config.compose import compose; from resnorm.data.corpora import load_data; "
              "d = load_data(compose(sys.argv[1:]).data, 16); "
              "print(d.tokenizer.name, hashlib.sha256(d.train.numpy().tobytes() + d.val.numpy().tobytes()).hexdigest())")
    args = ["data=hf", f"data.path={corpus[1]['saved']}", "data.tokenizer=bpe", "data.vocab_size=300",
            f"data.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    lines = [out.strip() for out, _ in outs]
    assert lines[0] == lines[1] and lines[0].startswith("bpe-")
    cache = tmp_path / "cache"
    assert len(list(cache.glob("tokenizers/*/meta.json"))) == 1 and len(list(cache.glob("tokens/*/meta.json"))) == 1
    assert not list(cache.glob("*/.*.tmp"))
