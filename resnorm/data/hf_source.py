"""Where a ``data=hf`` dataset is on this machine, checked without loading it (torch-free).

A source is either ``data.path`` (a folder written by ``datasets``' ``save_to_disk``; a parquet,
JSON lines or text file; a folder of such files; or a glob pattern) or ``data.hub_id`` (a Hugging
Face Hub dataset already in the local ``datasets`` cache). :func:`resolve` finds it and raises
:class:`resnorm.errors.ConfigError` (one line naming the key, the value and what is allowed) when it
is not there; :func:`columns` reads its column names cheaply (the parquet schema, the saved
``dataset_info.json``, the first JSON line). Nothing is downloaded: :func:`offline` forces
``datasets`` and ``huggingface_hub`` offline before they are imported.

The config rules (:mod:`resnorm.config.schema`) and the loader (:mod:`resnorm.data.hf`) share these checks.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from resnorm.errors import ConfigError

#: file suffix -> the ``datasets`` builder that reads it
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text"}
#: the files ``save_to_disk`` writes at the top of its folder (a Dataset, a DatasetDict)
SAVED_MARKERS = ("state.json", "dataset_dict.json")
#: the column a text file's rows are read into by ``datasets``' text builder
TEXT_BUILDER_COLUMN = "text"


def offline() -> None:
    """Force ``datasets`` and ``huggingface_hub`` offline (before they are imported, and after)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    if "datasets" in sys.modules:  # imported earlier: its constants were read at import
        import datasets.config as dc

        dc.HF_DATASETS_OFFLINE = True
        dc.HF_HUB_OFFLINE = True


def hf_datasets_cache() -> Path:
    """The ``datasets`` cache a Hub dataset is loaded from (``HF_DATASETS_CACHE``, else
    ``$HF_HOME/datasets``, else ``~/.cache/huggingface/datasets``)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "datasets"


@dataclass(frozen=True)
class Source:
    """A located dataset: ``kind`` is ``saved`` (save_to_disk folder), ``files`` or ``hub``."""

    kind: str
    key: str  # the config key that names it: data.path or data.hub_id
    value: str  # what the user wrote
    files: Tuple[Path, ...] = ()  # kind files: the data files; kind saved: the folder
    builder: Optional[str] = None  # kind files: parquet, json or text

    def describe(self) -> str:
        return f"{self.key}={self.value}"

    def identity(self) -> List[Tuple[str, int, int]]:
        """(path, size, mtime_ns) of every file the data is read from (a saved folder: every file in it);
        a Hub dataset's identity is its fingerprint, known only once loaded (:mod:`resnorm.data.hf`)."""
        if self.kind == "hub":
            return []
        paths = self.files if self.kind == "files" else sorted(p for p in self.files[0].rglob("*") if p.is_file())
        return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def _data_files(paths: Sequence[Path], raw: str) -> Source:
    """Files of one format (parquet, JSON lines or text), else a ConfigError on ``data.path``."""
    allowed = "a save_to_disk folder, or .parquet, .jsonl/.json or .txt files (a file, a folder of them or a glob)"
    builders = {FORMATS.get(p.suffix.lower()) for p in paths}
    if None in builders:
        odd = next(p for p in paths if p.suffix.lower() not in FORMATS)
        raise ConfigError("data.path", raw, f"{odd.name} is not a format data=hf reads: use {allowed}")
    if len(builders) > 1:
        raise ConfigError("data.path", raw, f"mixes formats ({', '.join(sorted(builders))}): use files of one format")
    empty = [p for p in paths if p.stat().st_size == 0]
    if empty:
        raise ConfigError("data.path", raw, f"{empty[0]} is empty")
    return Source("files", "data.path", raw, tuple(paths), builders.pop())


def _resolve_path(raw: str) -> Source:
    path = Path(raw).expanduser()
    if any(c in raw for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise ConfigError("data.path", raw, "the pattern matches no file")
        return _data_files(matches, raw)
    if path.is_file():
        return _data_files([path], raw)
    if path.is_dir():
        if any((path / m).is_file() for m in SAVED_MARKERS):
            return Source("saved", "data.path", raw, (path,))
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
        if not found:
            raise ConfigError("data.path", raw, "the folder holds neither a save_to_disk dataset (state.json or "
                                                "dataset_dict.json) nor .parquet, .jsonl/.json or .txt files")
        return _data_files(found, raw)
    raise ConfigError("data.path", raw, "no such file or folder (data=hf reads a save_to_disk folder, or parquet, "
                                        "JSON lines or text files)")


def fetch_hint(hub_id: str, hub_config: Optional[str]) -> str:
    """How to put a Hub dataset into the local cache once, on a machine with internet."""
    args = repr(hub_id) + (f", {hub_config!r}" if hub_config else "")
    return (f"fetch it once on a machine with internet: python -c \"import datasets; datasets.load_dataset({args})\" "
            f"(then copy {hf_datasets_cache()} here), or save_to_disk a copy and pass data.path=DIR")


def _hub_cached(hub_id: str) -> bool:
    """Whether the ``datasets`` cache holds a folder for ``hub_id`` (``owner___name``; for an id
    without an owner, the canonical ``<owner>___<name>`` it redirects to counts too)."""
    cache = hf_datasets_cache()
    if (cache / hub_id.replace("/", "___")).is_dir():
        return True
    return "/" not in hub_id and any(cache.glob(f"*___{hub_id}"))


def resolve(path: Optional[str], hub_id: Optional[str], hub_config: Optional[str] = None) -> Source:
    """The source ``data.path`` or ``data.hub_id`` names (exactly one of them), checked to be on this machine."""
    if bool(path) == bool(hub_id):
        both = "both are set" if path else "neither is set"
        raise ConfigError("data.path", path, f"data=hf needs exactly one of data.path=DIR_OR_FILES or "
                                             f"data.hub_id=ID ({both})")
    if path:
        return _resolve_path(path)
    if not _hub_cached(hub_id):
        raise ConfigError("data.hub_id", hub_id, f"not in the local Hugging Face cache ({hf_datasets_cache()}); "
                                                 + fetch_hint(hub_id, hub_config))
    return Source("hub", "data.hub_id", hub_id)


def _saved_splits(folder: Path) -> Tuple[str, ...]:
    """The splits of a save_to_disk folder (a single Dataset: ``train``)."""
    dict_file = folder / "dataset_dict.json"
    return tuple(json.loads(dict_file.read_text())["splits"]) if dict_file.is_file() else ("train",)


def splits(source: Source) -> Optional[Tuple[str, ...]]:
    """The split names a source has (files and a single saved Dataset: ``train``); None: known once loaded."""
    if source.kind == "hub":
        return None
    if source.kind == "files":
        return ("train",)
    return _saved_splits(source.files[0])


def columns(source: Source, split: str) -> Optional[Tuple[str, ...]]:
    """The column names of a split, read cheaply; None where that needs loading (a Hub dataset)."""
    if source.kind == "hub":
        return None
    if source.kind == "saved":
        root = source.files[0]
        folder = root / split if (root / "dataset_dict.json").is_file() else root
        info = folder / "dataset_info.json"
        return tuple(json.loads(info.read_text()).get("features") or ()) if info.is_file() else None
    first = source.files[0]
    if source.builder == "text":
        return (TEXT_BUILDER_COLUMN,)
    if source.builder == "parquet":
        import pyarrow.parquet as pq

        return tuple(pq.read_schema(first).names)
    with open(first, encoding="utf-8", errors="replace") as f:
        line = f.readline().strip()
    try:
        row = json.loads(line) if first.suffix.lower() == ".jsonl" or line.startswith("{") else None
    except json.JSONDecodeError:
        return None
    return tuple(row) if isinstance(row, dict) else None


def check_split_and_field(source: Source, split: str, key: str, text_field: str) -> None:
    """``split`` (at ``key``: data.split or data.val_split) exists and has the column ``data.text_field``."""
    names = splits(source)
    if names is not None and split not in names:
        raise ConfigError(key, split, f"{source.describe()} has the split(s) {', '.join(names)}")
    cols = columns(source, split)
    if cols is not None and text_field not in cols:
        raise ConfigError("data.text_field", text_field,
                          f"{source.describe()} (split {split}) has the columns {', '.join(cols) or '(none)'}")
