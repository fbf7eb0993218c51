"""The data files of a ``data=hf`` source read through once: which file (and line) is broken, and how.

``datasets`` reports a bad file as ``DatasetGenerationError: An error occurred while generating the
dataset``, naming neither the file nor the reason. :func:`file_problem` finds them: a parquet file
whose footer does not open (truncated, not parquet), that has no rows or lacks the text column; a
JSON lines file with a line that is not a JSON object (the line number, the parser's reason); a text
file with bytes that are not UTF-8 (the line number). :func:`problems_before_training` runs the cheap
part up front (every parquet footer; JSON and text files read through when they hold at most
:data:`SCAN_LIMIT` bytes together); the loader runs the whole of it when ``datasets`` fails.

Torch-free; pyarrow only for parquet files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

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
