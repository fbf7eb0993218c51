"""Where a ``data=hf`` dataset is on this machine, checked without loading it (torch-free).

A source is either ``data.path`` (a folder written by ``datasets``' ``save_to_disk``; a parquet,
JSON lines or text file; a folder of such files; or a glob pattern) or ``data.hub_id`` (a Hugging
Face Hub dataset already in the local ``datasets`` cache). :func:`resolve` finds it and raises
:class:`resnorm.errors.ConfigError` (one line naming the key, the value and what is allowed) when it
is not there; :func:`columns` reads its column names cheaply (the parquet schema, the saved
``dataset_info.json``, the first JSON line). Nothing is downloaded: :func:`offline` forces
``datasets`` and ``huggingface_hub`` offline before they are imported.

The data files are also read through (:func:`file_problem`), since ``datasets`` reports a bad file as
``DatasetGenerationError: An error occurred while generating the dataset``, naming neither the file
nor the reason: a parquet file whose footer does not open (truncated, not parquet), that has no rows
or lacks the text column; a JSON lines line that is not a JSON object (its number, the parser's
reason); bytes that are not UTF-8 (the line). :func:`problems_before_training` runs the cheap part up
front (every parquet footer; JSON and text files when they hold at most :data:`SCAN_LIMIT` bytes
together); the loader runs the whole of it when ``datasets`` fails.

The config rules (:mod:`resnorm.config.schema`) and the loader (:mod:`resnorm.data.hf`) share these checks.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

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
    if not dict_file.is_file():
        return ("train",)
    try:
        return tuple(str(s) for s in json.loads(dict_file.read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ConfigError("data.path", str(folder), f"{dict_file.name} is not a save_to_disk split list "
                                                    f"({type(exc).__name__})") from None


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
        try:
            return tuple(json.loads(info.read_text()).get("features") or ()) if info.is_file() else None
        except (OSError, ValueError, AttributeError, TypeError, RecursionError):
            return None  # a damaged info file: datasets' load reports the folder
    first = source.files[0]
    if source.builder == "text":
        return (TEXT_BUILDER_COLUMN,)
    if source.builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return tuple(pq.read_schema(first).names)
        except Exception:  # noqa: BLE001  # not a readable parquet file: file_problem says which and why
            return None
    with open(first, encoding="utf-8", errors="replace") as f:
        line = f.readline().strip()
    try:
        row = json.loads(line) if first.suffix.lower() == ".jsonl" or line.startswith("{") else None
    except (json.JSONDecodeError, RecursionError):
        return None
    return tuple(row) if isinstance(row, dict) else None


def check_split_and_field(source: Source, split: str, key: str, text_field: str) -> None:
    """``split`` (at ``key``: data.split or data.val_split) exists and has the column ``data.text_field``;
    data files open and hold rows (:func:`problems_before_training`: the file, the line, what is wrong)."""
    names = splits(source)
    if names is not None and split not in names:
        raise ConfigError(key, split, f"{source.describe()} has the split(s) {', '.join(names)}")
    cols = columns(source, split)
    if cols is not None and text_field not in cols:
        raise ConfigError("data.text_field", text_field,
                          f"{source.describe()} (split {split}) has the columns {', '.join(cols) or '(none)'}")
    if source.kind == "files":
        problem = problems_before_training(source.files, source.builder, text_field)
        if problem:
            raise ConfigError(source.key, source.value, problem)


def text_bytes_bound(source: Source, text_field: str) -> Optional[int]:
    """An upper bound on the bytes of text a source holds, read cheaply (None: unknown without loading):
    JSON lines and text files' sizes; parquet files' uncompressed size of the text column (footers)."""
    if source.kind != "files":
        return None
    if source.builder != "parquet":
        return sum(p.stat().st_size for p in source.files)
    import pyarrow.parquet as pq

    total = 0
    try:
        for p in source.files:
            meta = pq.ParquetFile(p).metadata
            names = meta.schema.to_arrow_schema().names
            if text_field not in names:
                return None
            col = names.index(text_field)
            total += sum(meta.row_group(g).column(col).total_uncompressed_size for g in range(meta.num_row_groups))
    except Exception:  # noqa: BLE001  # a broken file: file_problem reports it
        return None
    return total


# --- the data files read through: which one is broken, where and how ---------------------------------

#: JSON lines and text files are read through before training when together at most this many bytes
SCAN_LIMIT = 64 << 20


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def parquet_problem(path: Path, text_field: str) -> Optional[str]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # noqa: BLE001  # any reason the footer does not open
        return f"{path}: not a readable parquet file ({first_line(exc)})"
    names = meta.schema.to_arrow_schema().names
    if text_field not in names:
        return f"{path}: no column {text_field!r} (data.text_field); its columns: {', '.join(names) or '(none)'}"
    if meta.num_rows == 0:
        return f"{path}: has no rows (remove it, or add rows)"
    return None


def json_problem(path: Path, text_field: str) -> Optional[str]:
    """The first line of a JSON lines file that is not a JSON object (a file holding one JSON list is
    read whole); ``text_field`` is checked on the first row only (resnorm.hf_source.columns)."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"["):
        try:
            rows = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            return f"{path}: not UTF-8 at byte {exc.start}"
        except json.JSONDecodeError as exc:
            return f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})"
        return next((f"{path}: item {i}: a JSON {type(r).__name__}, not an object" for i, r in enumerate(rows)
                     if not isinstance(r, dict)), None)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))  # a BOM, as datasets allows
            except UnicodeDecodeError as exc:
                return f"{path}: line {number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
            except json.JSONDecodeError as exc:
                return f"{path}: line {number}: not valid JSON ({exc.msg}, column {exc.colno})"
            if not isinstance(row, dict):
                return f"{path}: line {number}: a JSON {type(row).__name__}, not an object"
    return None  # a row without data.text_field is an empty document, as datasets reads it


def text_problem(path: Path, text_field: str = "text") -> Optional[str]:
    """The first line of a text file that is not UTF-8."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"{path}: line {number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
    return None


#: the data files' builder (resnorm.hf_source.FORMATS) -> what reads one file through
CHECKS = {"parquet": parquet_problem, "json": json_problem, "text": text_problem}
#: the builders whose check reads only a file's footer (always cheap)
FOOTER_ONLY = ("parquet",)


def file_problem(files: Iterable[Path], builder: str, text_field: str) -> Optional[str]:
    """What is wrong with the first broken file of ``files`` (all of ``builder``'s format), or None."""
    check = CHECKS[builder]
    return next((p for p in (check(Path(f), text_field) for f in files) if p), None)


def problems_before_training(files, builder: str, text_field: str) -> Optional[str]:
    """:func:`file_problem` where it is cheap: parquet footers always; JSON and text files when they
    hold at most :data:`SCAN_LIMIT` bytes together (else the loader finds a bad line if there is one)."""
    files = [Path(f) for f in files]
    if builder not in FOOTER_ONLY and sum(f.stat().st_size for f in files) > SCAN_LIMIT:
        return None
    return file_problem(files, builder, text_field)
