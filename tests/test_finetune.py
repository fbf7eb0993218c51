"""Fine-tuning (python -m resnorm.finetune): task files and their errors, the built-in play_genre
task, span F1, padding, the heads, the CLI over a sweep (skip, re-run, bad input) and the
downstream figure. Every run and task file is made here, small."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, Interrupt, compose, interrupt_at
from resnorm.tasks.builtin import FOLIO_GENRE, held_out_plays, play_genre_rows
from resnorm.errors import DataError
from resnorm.finetune import main
from resnorm.runs.identity import run_id
from resnorm.data.tokenizer import ByteTokenizer, load_run_tokenizer
from resnorm.tasks.labelled import (IGNORE, bio_spans, encode_rows, kind_of, label_set, read_rows, span_f1, split_rows,
                           task_kind)
from resnorm.train.job import JobInfo, train

TASK_STEPS = ("--steps", "40", "--lr", "0.01", "--batch", "8")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: torch on one thread, restored after


def _write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _letters_task(path: Path) -> Path:
    """A separable classification task: texts of a's are label x, texts of b's label y."""
    rows = [{"text": ("a" if i % 2 else "b") * (3 + i % 9), "label": "x" if i % 2 else "y"} for i in range(60)]
    return _write_csv(path, rows)


def _names_task(path: Path) -> Path:
    """A tagging task: capitalised words are NAME spans (two-word names B-NAME I-NAME)."""
    names, words = ["Ann", "Bob Lee", "Cy"], ["the", "saw", "and", "a", "dog"]
    with open(path, "w") as f:
        for i in range(40):
            tokens, tags = [], []
            for j in range(4):
                if (i + j) % 3 == 0:
                    name = names[(i + 2 * j) % 3].split()
                    tokens += name
                    tags += ["B-NAME"] + ["I-NAME"] * (len(name) - 1)
                else:
                    tokens.append(words[(i * j) % 5])
                    tags.append("O")
            f.write(json.dumps({"tokens": tokens, "tags": tags}) + "\n")
    return path


# --- tasks, spans, tokenizers --------------------------------------------------------------------

def test_conll_spans_and_f1():
    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]) == [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6)]
    assert bio_spans(["I-PER", "I-PER", "I-LOC", "O", "I-PER"]) == [("PER", 0, 2), ("LOC", 2, 3), ("PER", 4, 5)]
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-PER"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "B-PER"]]  # a span cut short: no credit; one extra
    s = span_f1(gold, pred)
    assert (s["gold_spans"], s["predicted_spans"]) == (3, 4)
    assert s["span_precision"] == pytest.approx(2 / 4) and s["span_recall"] == pytest.approx(2 / 3)
    assert s["span_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert span_f1([["O"]], [["O"]])["span_f1"] == 0.0


def test_task_files_their_kinds_splits_and_encoding(tmp_path):
    rows, source = read_rows(str(_letters_task(tmp_path / "letters.csv")))
    assert kind_of(rows, source) == "classify" and label_set(rows, "classify", source) == ["x", "y"]
    train_rows, held = split_rows(rows, source)
    assert len(held) == 12 and held[0] is rows[4] and held[1] is rows[9]  # every fifth row
    x, y = encode_rows(train_rows[:3], "classify", ["x", "y"], ByteTokenizer(), 16)
    assert x.shape == (3, 5) and x[0, 3:].eq(-1).all() and y.tolist() == [1, 0, 1]
    tag_path = _names_task(tmp_path / "names.jsonl")
    assert task_kind(str(tag_path)) == "tag"
    rows, source = read_rows(str(tag_path))
    labels = label_set(rows, "tag", source)
    assert labels == ["B-NAME", "I-NAME", "O"]
    x, y = encode_rows([{"tokens": ["Bob", "Lee", "saw"], "tags": ["B-NAME", "I-NAME", "O"]}], "tag", labels,
                       ByteTokenizer(), 64)
    assert bytes(x[0].tolist()).decode() == "Bob Lee saw"
    assert [(i, v) for i, v in enumerate(y[0].tolist()) if v != IGNORE] == [(0, 0), (4, 1), (8, 2)]  # first bytes
    x, y = encode_rows([{"tokens": ["Bob", "Lee", "saw"], "tags": ["B-NAME", "I-NAME", "O"]}], "tag", labels,
                       ByteTokenizer(), 9, at="last")  # last bytes; "saw" ends past the context: not scored
    assert [(i, v) for i, v in enumerate(y[0].tolist()) if v != IGNORE] == [(2, 0), (6, 1)]
    split = [{"text": "t", "label": "a", "split": s} for s in ("train", "test", "train", "validation")]
    assert [len(p) for p in split_rows(split, "s")] == [2, 2]


@pytest.mark.parametrize("content, suffix, message", [
    ("words,label\nhi,a\n", ".csv", "columns label, words: a classification task needs text and label, "
                                    "a tagging task tokens and tags (BIO)"),
    ('{"tokens": ["a", "b"], "tags": ["O", "PER"]}\n', ".jsonl", "tag 'PER' is not BIO: use O, B-<type> or I-<type>"),
    ('{"tokens": ["a", "b"], "tags": ["O"]}\n', ".jsonl", "row 0 has 2 tokens and 1 tags; one tag per token"),
    ("text,label,split\nhi,a,holdout\n", ".csv", "split 'holdout': choose train or one of test, validation"),
    ("text\tlabel\n", ".tsv", "unknown format .tsv"),
])
def test_bad_task_files_are_one_line_errors(tmp_path, capsys, content, suffix, message):
    path = tmp_path / f"task{suffix}"
    path.write_text(content)
    assert main([str(tmp_path), "--task", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(path) in err


def test_an_unknown_task_and_bad_flags(tmp_path, capsys):
    assert main([str(tmp_path), "--task", "no_such_task"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a built-in task (play_genre, speaker_tags) nor an existing file" in err
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--task", "play_genre", "--steps", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--steps: '0': must be a positive integer" in err
    assert main([str(tmp_path / "nowhere"), "--task", "play_genre"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_the_command_line_entry_point(tmp_path):
    import subprocess

    from conftest import PYTHON, ROOT

    r = subprocess.run([PYTHON, "-m", "resnorm.finetune", str(tmp_path), "--task", "nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: --task 'nope': not a built-in task (play_genre, speaker_tags)")


def test_hf_dataset_folders_are_tasks(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(10)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]),
                          "test": datasets.Dataset.from_list(rows[8:])}).save_to_disk(str(tmp_path / "ds"))
    got, source = read_rows(str(tmp_path / "ds"))
    assert kind_of(got, source) == "classify" and [len(p) for p in split_rows(got, source)] == [8, 2]


def test_a_run_with_tokenizer_json_is_tokenized_with_it(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = tokenizers.Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    got = load_run_tokenizer(tmp_path, compose(*TINY))
    assert got.encode("hello world there") == [1, 2, 0]
    assert got.encode_words(["world", "hello"]) == ([2, 1], [0, 1])
    assert isinstance(load_run_tokenizer(tmp_path / "elsewhere", compose(*TINY)), ByteTokenizer)


def test_play_genre_is_the_first_folio_catalogue_with_whole_plays_held_out():
    genres = list(FOLIO_GENRE.values())
    assert (genres.count("comedy"), genres.count("history"), genres.count("tragedy")) == (14, 10, 11)
    assert not {"pericles_gut.txt", "troilus_and_cressida_gut.txt", "sonnets_gut.txt"} & set(FOLIO_GENRE)
    rows = play_genre_rows()
    assert len(rows) == 35 * 60 and all(len(r["text"]) == 256 for r in rows)
    held = {r["play"] for r in rows if r["split"] == "test"}
    trained = {r["play"] for r in rows if r["split"] == "train"}
    assert not held & trained and len(held) == len(held_out_plays()) == 12
    assert {r["label"] for r in rows if r["split"] == "test"} == {"comedy", "history", "tragedy"}
    assert not any("by William Shakespeare" in r["text"] for r in rows)  # the title pages are dropped


def test_speaker_tags_follow_the_heading_rule_with_whole_plays_held_out():
    from resnorm.tasks.builtin import speaker_tag_rows, tagged_lines

    assert tagged_lines("x\n\nFIRST WITCH.\nWhen shall we meet?\n\nACT II.\n[Enter MACBETH.]\nMACBETH.") == [
        (["x"], ["O"]), ([], []), (["FIRST", "WITCH."], ["B-SPEAKER", "I-SPEAKER"]),
        (["When", "shall", "we", "meet?"], ["O"] * 4), ([], []), (["ACT", "II."], ["O", "O"]),
        (["[Enter", "MACBETH.]"], ["O", "O"]), (["MACBETH."], ["O"])]  # a heading follows an empty line
    rows = speaker_tag_rows()
    plays = {r["play"] for r in rows}
    assert len(plays) == 33 and not {"hamlet", "lear", "romeo_and_juliet", "midsummer_nights_dream"} & plays
    held = {r["play"] for r in rows if r["split"] == "test"}
    assert held and not held & {r["play"] for r in rows if r["split"] == "train"}
    heads = [w for r in rows for w, t in zip(r["tokens"], r["tags"]) if t != "O"]
    assert len(heads) > len(rows) and all(w == w.upper() for w in heads)
    assert task_kind("speaker_tags") == "tag"


# --- the model with a head -----------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["clm", "mlm"])
@pytest.mark.parametrize("kind", ["classify", "tag"])
def test_padding_changes_nothing(objective, kind):
    """A padded sequence gives the outputs of the unpadded one: the padding is out of attention and pooling."""
    from resnorm.tasks.heads import TaskModel
    from resnorm.model.blocks import ModelShape

    torch.manual_seed(0)
    model = TaskModel(ModelShape.from_config(compose(*TINY, f"model.objective={objective}", "depth=2")), kind, 3)
    model.reset_head()
    x = torch.randint(64, (1, 5))
    padded = torch.cat([x, torch.full((1, 4), -1)], dim=1)
    with torch.no_grad():
        alone, both = model(x), model(torch.cat([padded, torch.randint(64, (1, 9))]))
    got = both[:1] if kind == "classify" else both[:1, :5]
    assert torch.allclose(alone, got, atol=1e-5)


# --- the CLI over a sweep ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep folder: a clm and an mlm run that kept their checkpoints, and one that did not."""
    root = tmp_path_factory.mktemp("multirun") / "ft"
    runs = {"clm": ("model.objective=clm", "depth=1", "train.keep_checkpoint=true", "train.checkpoint_every=4"),
            "mlm": ("model.objective=mlm", "depth=2", "train.keep_checkpoint=true"),
            "none": ("model.objective=clm", "depth=2")}
    dirs = {}
    with torch.random.fork_rng():
        for name, over in runs.items():
            cfg = compose(*TINY, "name=ft", *over)
            rid = run_id(cfg)
            dirs[name] = root / rid
            train(cfg, JobInfo(dirs[name], ",".join(over[:2]), "ft", list(over[:2]), rid))
    return root, dirs


def test_a_run_without_checkpoint_is_one_line(sweep, capsys):
    _, dirs = sweep
    assert main([str(dirs["none"]), "--task", "play_genre"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint.pt: pre-train it with train.keep_checkpoint=true" in err


def test_a_sweep_without_any_fine_tunable_run_is_one_line(tmp_path, capsys):
    for name, status in (("a", "completed"), ("b", "diverged")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"status": status}))
    assert main([str(tmp_path), "--task", "play_genre"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of its 2 runs can be fine-tuned (the first: no checkpoint.pt: " \
        "pre-train it with train.keep_checkpoint=true" in err


def test_finetune_a_sweep_then_skip_then_the_downstream_figure(sweep, tmp_path, capsys):
    from analysis import downstream
    from analysis.downstream import downstream_table
    from analysis.load import load_sweep

    root, dirs = sweep
    assert downstream.figures(load_sweep(root)) == {}  # nothing fine-tuned yet: no figure, no "not drawn"
    task = _letters_task(tmp_path / "letters.csv")
    assert main([str(root), "--task", str(task), *TASK_STEPS]) == 0
    out, err = capsys.readouterr()
    assert f"{dirs['none']}: skipped, no checkpoint.pt" in err and out.count("letters accuracy") == 2
    for name in ("clm", "mlm"):
        s = json.loads((dirs[name] / "finetune" / "letters" / "summary.json").read_text())
        assert s["status"] == "completed" and s["task_metric"] == "accuracy" and s["task_eval_examples"] == 12
        assert s["task_majority_accuracy"] == 0.5 and s["task_accuracy"] >= 0.9  # separable by one byte
        assert s["pretrained_objective"] == name and s["unigram_loss"] == pytest.approx(math.log(2))
        assert s["outcome"] in ("trained", "stalled") and (dirs[name] / "finetune" / "letters" / "metrics.parquet").exists()
        assert not (dirs[name] / "finetune" / "letters" / "checkpoint.pt").exists()
    assert main([str(root), "--task", str(task), *TASK_STEPS]) == 0
    assert capsys.readouterr().out.count("already fine-tuned") == 2
    moved = tmp_path / "elsewhere" / dirs["mlm"].name  # a sweep copied to another place, with its task file
    shutil.copytree(dirs["mlm"], moved)
    assert main([str(moved), "--task", str(shutil.copy(task, tmp_path / "elsewhere")), *TASK_STEPS]) == 0
    assert "already fine-tuned" in capsys.readouterr().out
    task.write_text(task.read_text() + "aaa,x\n")  # an edited task under the same name: not the same fine-tune
    assert main([str(dirs["mlm"]), "--task", str(task), *TASK_STEPS]) == 1
    assert "holds another run" in capsys.readouterr().out
    assert main([str(root), "--task", str(_names_task(tmp_path / "names.jsonl")), *TASK_STEPS]) == 0
    s = json.loads((dirs["mlm"] / "finetune" / "names" / "summary.json").read_text())
    assert s["task_metric"] == "span_f1" and 0.0 <= s["task_span_f1"] <= 1.0 and s["task_gold_spans"] > 0
    loaded = load_sweep(root)
    table = downstream_table(loaded)
    assert sorted(zip(table.task, table.depth)) == [("letters", 1), ("letters", 2), ("names", 1), ("names", 2)]
    assert len(loaded.runs) == 3  # the fine-tunes inside the run folders are not runs of the sweep
    figure = downstream.figures(loaded)["downstream"](loaded, tmp_path / "downstream.png")  # as make_report does
    assert figure == tmp_path / "downstream.png" and figure.stat().st_size > 0
    assert table[list(downstream.FLOORS)].notna().all().all()  # every fine-tune reports its three floors
    scores = downstream.score_intervals(table)
    assert len(scores) == 4 and (scores["n_seeds"] == 1).all() and scores["ci_low"].isna().all()
    paired = downstream.downstream_verdicts(table)  # one seed each: judged, never decided
    assert len(paired) >= 4 and set(paired["verdict"]) == {"inconclusive"} and (paired["n_pairs"] == 1).all()


def test_an_interrupted_finetune_resumes_bit_for_bit(sweep, tmp_path, monkeypatch, capsys):
    """Killed after its checkpoint at step 4, the same command resumes the fine-tune, with the losses
    of an uninterrupted one (same rows under another file name)."""
    import pandas as pd

    _, dirs = sweep
    ref, task = _letters_task(tmp_path / "ref.csv"), _letters_task(tmp_path / "again.csv")
    steps = ("--steps", "8", "--batch", "4", "--eval-every", "8")  # one validation score: the loop runs 8 steps
    assert main([str(dirs["clm"]), "--task", str(ref), *steps]) == 0
    interrupt_at(monkeypatch, 6)
    with pytest.raises(Interrupt):
        main([str(dirs["clm"]), "--task", str(task), *steps])
    monkeypatch.undo()
    assert main([str(dirs["clm"]), "--task", str(task), *steps]) == 0
    done = json.loads((dirs["clm"] / "finetune" / "again" / "summary.json").read_text())
    assert done["status"] == "completed" and done["resumed_from_step"] == 4 and done["attempts"] == 2
    cols = ["step", "train_loss", "grad_norm", "val_loss"]
    a, b = (pd.read_parquet(dirs["clm"] / "finetune" / n / "metrics.parquet")[cols] for n in ("ref", "again"))
    pd.testing.assert_frame_equal(a, b)
    assert done["task_score"] == json.loads((dirs["clm"] / "finetune" / "ref" / "summary.json").read_text())["task_score"]


def test_finetune_the_built_in_tasks(sweep, capsys):
    _, dirs = sweep
    for task in ("play_genre", "speaker_tags"):
        assert main([str(dirs["mlm"]), "--task", task, "--steps", "3", "--batch", "4"]) == 0
    s = json.loads((dirs["mlm"] / "finetune" / "play_genre" / "summary.json").read_text())
    assert s["task_labels"] == ["comedy", "history", "tragedy"] and s["task_eval_examples"] == 720
    assert s["task_majority_accuracy"] == pytest.approx(300 / 720) and 0 <= s["task_accuracy"] <= 1
    s = json.loads((dirs["mlm"] / "finetune" / "speaker_tags" / "summary.json").read_text())
    assert s["task_labels"] == ["B-SPEAKER", "I-SPEAKER", "O"] and s["task_metric"] == "span_f1"
    assert s["task_gold_spans"] > 0 and 0 <= s["task_span_f1"] <= 1


def test_a_missing_checkpoint_is_a_config_error():
    from resnorm.train.preflight import validate
    from resnorm.errors import ConfigError

    with pytest.raises(ConfigError, match="finetune.init_from=None is invalid: finetune.task needs"):
        validate(compose(*TINY, "finetune.task=play_genre"))
    with pytest.raises(DataError, match="not a built-in task"):
        task_kind("nothing_here")


# --- the recipe and the floors ---------------------------------------------------------------------

def _cue_rows(n: int = 150, held_label=None):
    """Three classes (60% / 20% / 20%) told apart by one cue word among shared filler; every fifth
    row a held-out row (split column), its label replaced by ``held_label`` when given."""
    filler, cues = ["the", "of", "and", "a", "to", "in"], {"alpha": "red", "beta": "green", "gamma": "blue"}
    rows = []
    for i in range(n):
        label = "alpha" if i % 5 < 3 else ("beta" if i % 5 == 3 else "gamma")
        if i % 10 == 9:
            label = "gamma" if label == "beta" else "beta"
        words = [filler[(i * 7 + j) % 6] for j in range(6)]
        words.insert(i % 5, cues[label])
        held = i % 7 == 6
        rows.append(dict(text=" ".join(words), label=held_label if held and held_label else label,
                         split="test" if held else "train", n=i))
    return rows


def test_the_recipe_never_sees_the_held_out_rows(sweep, tmp_path):
    """The rate grid's validation scores and choice are the same whatever the held-out rows' labels
    say; the fitting and validation rows are training rows only."""
    from resnorm.finetune import choose, parse_args, task_setup
    from resnorm.tasks.recipe import LR_GRID

    _, dirs = sweep
    a = _write_csv(tmp_path / "a.csv", _cue_rows())
    b = _write_csv(tmp_path / "b.csv", _cue_rows(held_label="gamma"))
    setup = task_setup(dirs["clm"], str(a))
    held = {r["n"] for r in setup.data.rows["held"]}
    seen = [r["n"] for r in setup.data.rows["fit"] + setup.data.rows["dev"]]
    assert held and not held & set(seen) and sorted(seen, key=int) == [str(i) for i in range(150) if i % 7 != 6]
    args = parse_args([str(dirs["clm"]), "--task", str(a), "--steps", "30", "--eval-every", "10", "--batch", "8"])
    ca, cb = choose(dirs["clm"], str(a), args), choose(dirs["clm"], str(b), args)
    assert ca["recipe_grid"] == cb["recipe_grid"] and ca["recipe_lr"] == cb["recipe_lr"]
    assert len(ca["recipe_grid"]) == len(LR_GRID)
    assert ca["floor_majority"] != cb["floor_majority"]  # the floors do score the held-out rows


def test_the_floors_are_on_the_same_split(sweep, tmp_path):
    from resnorm.tasks.heads import floors
    from resnorm.finetune import task_setup

    _, dirs = sweep
    rows = _cue_rows()
    setup = task_setup(dirs["mlm"], str(_write_csv(tmp_path / "cues.csv", rows)))
    out = floors(setup.model, setup.data, setup.cfg.train.seq_len)
    fit_labels = [r["label"] for r in setup.data.rows["fit"]]
    top = max(set(fit_labels), key=fit_labels.count)
    held = [r["label"] for r in rows if r["split"] == "test"]
    assert out["floor_majority"] == pytest.approx(held.count(top) / len(held))
    assert out["floor_ngram"] >= 0.95  # one cue word per class: a bag of words reads it
    assert 0.0 <= out["floor_probe"] <= 1.0
    tags = task_setup(dirs["clm"], str(_names_task(tmp_path / "names.jsonl")))
    out = floors(tags.model, tags.data, tags.cfg.train.seq_len)
    assert out["floor_majority"] == 0.0 and out["floor_ngram"] >= 0.9  # capitalised names: the word itself
    assert 0.5 < out["floor_majority_word_accuracy"] < 1.0


def test_default_fine_tuning_beats_the_majority_class_on_a_cue_task(sweep, tmp_path, capsys):
    """End to end with the default recipe (grid, early stopping) on a tiny pre-trained run: a word
    cue per class, the majority class 60% of the held-out rows."""
    _, dirs = sweep
    task = _write_csv(tmp_path / "cue.csv", _cue_rows(200))
    assert main([str(dirs["mlm"]), "--task", str(task), "--steps", "150", "--batch", "16"]) == 0
    s = json.loads((dirs["mlm"] / "finetune" / "cue" / "summary.json").read_text())
    assert s["task_accuracy"] >= s["task_majority_accuracy"] + 0.2
    assert s["outcome"] == "trained" and s["task_p_above_floor"] < 0.05 and s["loss_outcome"] in ("trained", "stalled")
    assert s["recipe_lr"] in [g["lr"] for g in s["recipe_grid"]] and s["floor_ngram"] >= 0.9


def test_the_loop_replays_the_recipes_chosen_trial(sweep, tmp_path):
    """The loop's fine-tune at the chosen rate trains as the recipe's trial did (the recipe's optimizer,
    the head at its own rate, the same clipping, batches and head init), so the held-out score is that of
    the model the validation part chose: same predictions, same held-out loss."""
    import pandas as pd

    from resnorm.finetune import parse_args, recipe_of, task_setup, with_kind_defaults
    from resnorm.tasks.labelled import example_batches
    from resnorm.tasks.recipe import predict, select
    from resnorm.train.optimizers import task_optimizer

    _, dirs = sweep
    task = _write_csv(tmp_path / "replay.csv", _cue_rows(120))
    flags = ["--lr", "3e-3", "--steps", "40", "--eval-every", "10", "--patience", "100", "--batch", "8"]
    assert main([str(dirs["mlm"]), "--task", str(task), *flags]) == 0
    done = json.loads((dirs["mlm"] / "finetune" / "replay" / "summary.json").read_text())
    args = with_kind_defaults(parse_args([str(dirs["mlm"]), "--task", str(task), *flags]), str(task))
    assert args.head_lr_scale == 30.0 and done["config"]["finetune"]["head_lr_scale"] == 30.0
    setup = task_setup(dirs["mlm"], str(task), 0, args)
    best, _ = select(setup.model, setup.data, setup.fit, setup.val, recipe_of(args, 0), task_optimizer)
    assert best.best_step == done["recipe_steps"]
    preds, _, gold = predict(setup.model, *setup.data.val, row_of=setup.data.row_of["held"])
    assert float((preds == gold).double().mean()) == done["task_score"]
    with torch.no_grad():  # the loop's held-out loss: the mean of its batches' mean losses
        losses = [float(setup.model.eval().loss(x, y)) for x, y in example_batches(*setup.data.val, 8)]
    last = pd.read_parquet(dirs["mlm"] / "finetune" / "replay" / "metrics.parquet").dropna(subset=["val_loss"]).iloc[-1]
    assert last.val_loss == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_the_recipe_defaults_follow_the_task_kind_and_flags_win():
    from resnorm.finetune import parse_args, with_kind_defaults
    from resnorm.tasks.recipe import KIND_DEFAULTS

    for task, kind in (("play_genre", "classify"), ("speaker_tags", "tag")):
        defaults = KIND_DEFAULTS[kind]
        args = with_kind_defaults(parse_args(["x", "--task", task]), task)
        assert {k: getattr(args, k) for k in defaults} == defaults
        given = with_kind_defaults(parse_args(["x", "--task", task, "--steps", "7", "--head-lr-scale", "2"]), task)
        assert (given.steps, given.head_lr_scale, given.patience) == (7, 2.0, defaults["patience"])
    every = ["--steps", "7", "--head-lr-scale", "2", "--patience", "3"]
    assert vars(with_kind_defaults(parse_args(["x", "--task", "nope.csv", *every]), "nope.csv")) == \
        vars(parse_args(["x", "--task", "nope.csv", *every]))  # every flag given: the task is not read


@pytest.mark.parametrize("source", sorted(__import__("experiments.user_csv", fromlist=["SOURCES"]).SOURCES))
def test_the_user_style_csvs_are_deterministic_classification_tasks(source, tmp_path):
    """Each source of ``python -m experiments.user_csv`` (the CSVs docs/finetune.md measures the
    done-when check on) writes the same file twice, reads as a classification task, and gives no text
    two labels; an unknown source is one error line."""
    from experiments.user_csv import MIN_CHARS, write

    first, second = write(tmp_path / "a.csv", source), write(tmp_path / "b.csv", source)
    assert first.read_bytes() == second.read_bytes()
    rows, spec = read_rows(str(first))
    assert kind_of(rows, spec) == "classify" and len(label_set(rows, "classify", spec)) >= 2
    labels_of = {}
    for r in rows:
        labels_of.setdefault(r["text"], set()).add(r["label"])
    assert all(len(v) == 1 for v in labels_of.values()) and min(map(len, labels_of)) >= MIN_CHARS
    with pytest.raises(SystemExit, match="unknown source 'nope'"):
        write(tmp_path / "c.csv", "nope")


def test_a_fine_tunes_outcome_is_its_score_against_the_floor():
    """``trained`` when the held-out score beats the constant prediction by an exact one-sided binomial
    test (checked against the sum by hand), else ``stalled``; diverged stays diverged."""
    from resnorm.tasks.heads import OUTCOME_ALPHA, above_floor_p, task_outcome

    n, right, q = 20, 9, 0.25
    by_hand = sum(math.comb(n, k) * q ** k * (1 - q) ** (n - k) for k in range(right, n + 1))
    assert above_floor_p(right, n, q) == pytest.approx(by_hand, rel=1e-9)
    assert above_floor_p(5, 20, 0.25) > 0.5 and above_floor_p(0, 0, 0.5) == 1.0 and above_floor_p(3, 3, 1.0) == 1.0
    assert task_outcome("stalled", OUTCOME_ALPHA / 2) == "trained"
    assert task_outcome("trained", OUTCOME_ALPHA) == "stalled"
    assert task_outcome("diverged", 0.0) == "diverged" and task_outcome(None, 0.0) is None
