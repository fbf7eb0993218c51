"""Fault injection, the newer surfaces (continues tests/test_faults.py): broken data=hf files, the BPE
vocabulary's bound, fine-tuning bad checkpoints and copied folders, a full disk (a small tmpfs), hostile
run folders (deep summaries, foreign checkpoints, symbolic links), the smaller one-line refusals, and a
run's identity across an upgrade of the schema. Each case checks the one-line message, the exit code,
and that nothing finished is lost or duplicated.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, TINY, compose, run_cli
from resnorm.errors import ConfigError, DataError
from resnorm.runs.identity import run_id
from test_faults import NO_ANALYSIS, RUN, assert_same_run, one_line, reference, summary  # noqa: F401

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TEXTS = [f"The quick brown fox {i} jumps over the lazy dog. " * 4 for i in range(300)]


# --- data=hf: broken files, named with the line --------------------------------------------------

def _parquet(path: Path, texts, column: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: pa.array(texts, pa.string())}), path)
    return path


def _bad_sources(root: Path):
    """(name, data.path, words the one-line error must hold): every way a data file can be broken."""
    good = _parquet(root / "good" / "a.parquet", TEXTS).read_bytes()
    cases = []

    def case(name, files, *words):
        folder = root / name
        folder.mkdir()
        for fname, content in files.items():
            if isinstance(content, bytes):
                (folder / fname).write_bytes(content)
            else:  # texts, or (column, texts)
                column, texts = content if isinstance(content, tuple) else ("text", content)
                _parquet(folder / fname, texts, column)
        cases.append((name, folder, words))

    lines = [json.dumps({"text": t}) for t in TEXTS]
    case("truncated-parquet", {"a.parquet": good[: len(good) // 2]}, "a.parquet: not a readable parquet file")
    case("random-bytes-parquet", {"a.parquet": os.urandom(4000)}, "a.parquet: not a readable parquet file")
    case("one-bad-among-good", {"a.parquet": TEXTS, "b.parquet": good[:-9], "c.parquet": TEXTS},
         "b.parquet: not a readable parquet file")
    case("zero-row-parquet", {"a.parquet": []}, "a.parquet: has no rows")
    case("column-missing-in-one-file", {"a.parquet": TEXTS, "b.parquet": ("body", TEXTS)},
         "b.parquet: no column 'text'", "its columns: body")
    case("json-broken-mid-file", {"a.jsonl": "\n".join(lines[:120] + [lines[120][:-7]] + lines[121:]).encode()},
         "a.jsonl: line 121: not valid JSON")
    case("json-array-line", {"a.jsonl": "\n".join(lines[:5] + ["[1, 2]"] + lines[5:]).encode()},
         "a.jsonl: line 6: a JSON list, not an object")
    case("json-not-utf8", {"a.jsonl": "\n".join(lines[:3]).encode() + b'\n{"text": "\xff"}\n'},
         "a.jsonl: line 4: not UTF-8")
    case("txt-not-utf8", {"a.txt": "\n".join(TEXTS[:50]).encode() + b"\nok \xfe\xff\n" + TEXTS[50].encode()},
         "a.txt: line 51: not UTF-8 (byte 0xfe at column 4)")
    case("txt-bad-second-file", {"a.txt": TEXTS[0].encode(), "b.txt": b"\x80"}, "b.txt: line 1: not UTF-8")
    return cases


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory):
    return _bad_sources(tmp_path_factory.mktemp("hf"))


def test_bad_data_files_are_one_line_before_training(bad_sources, tmp_path):
    """Every broken file is named, with its line, by the up-front check (a ConfigError on data.path)."""
    from resnorm.train.preflight import validate

    for name, folder, words in bad_sources:
        with pytest.raises(ConfigError) as err:
            validate(compose("data=hf", f"data.path={folder}", f"data.cache_dir={tmp_path}"))
        message = str(err.value)
        assert "\n" not in message and message.startswith("data.path="), (name, message)
        assert all(w in message for w in words), (name, message)


def test_bad_data_files_are_named_when_loading_too(bad_sources, tmp_path, monkeypatch):
    """Files too large to read up front (here: a limit of 0 bytes) are read when ``datasets`` fails:
    the loader's DataError names the file and the line, not ``DatasetGenerationError``."""
    from resnorm.data import hf_source
    from resnorm.data.hf import load_hf

    monkeypatch.setattr(hf_source, "SCAN_LIMIT", 0)
    for name, folder, words in bad_sources:
        if not name.startswith(("json", "txt")):
            continue
        cfg = compose("data=hf", f"data.path={folder}", f"data.cache_dir={tmp_path / name}")
        with pytest.raises(DataError) as err:
            load_hf(cfg.data, 16)
        message = str(err.value)
        assert "\n" not in message and all(w in message for w in words), (name, message)


def test_a_bad_data_file_on_the_command_line_writes_nothing(bad_sources, tmp_path):
    folder = dict((n, f) for n, f, _ in bad_sources)["one-bad-among-good"]
    tiny = [a for a in TINY if not a.startswith("data")]
    proc = run_cli("data=hf", f"data.path={folder}", f"data.cache_dir={tmp_path / 'cache'}", *tiny,
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "b.parquet: not a readable parquet file" in one_line(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a config error left a folder behind"


def test_bpe_vocabulary_is_bounded_by_the_schema_and_the_data(tmp_path):
    from resnorm.train.preflight import validate
    from resnorm.data.token_cache import entry

    src = _parquet(tmp_path / "d" / "a.parquet", TEXTS[:3])
    base = ("data=hf", f"data.path={src}", "data.tokenizer=bpe", f"data.cache_dir={tmp_path}")
    for size, words in ((1_000_000_000, "must be an integer in (0, 1048576]"), (1_048_576, "a BPE of it has at most")):
        with pytest.raises(ConfigError) as err:
            validate(compose(*base, f"data.vocab_size={size}"))
        assert str(err.value).startswith(f"data.vocab_size={size}") and words in str(err.value), str(err.value)
    validate(compose(*base, "data.vocab_size=400"))
    # a build killed (or aborted) mid-way left its temporary folder: the next build of the key removes it
    stale = tmp_path / "tokenizers" / ".k1.999999.deadbeef.tmp"
    stale.mkdir(parents=True)
    folder = entry(tmp_path, "tokenizers", "k1", lambda tmp: (tmp / "meta.json").write_text("{}"))
    assert folder.is_dir() and not stale.exists()


# --- fine-tuning ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A sweep folder with a run pre-trained on a text file (its checkpoint kept), and one twice as wide."""
    import torch

    from resnorm.train.job import JobInfo, train

    root = tmp_path_factory.mktemp("ft")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(TEXTS) * 3)
    runs = {}
    with torch.random.fork_rng():
        for name, width in (("one", 16), ("two", 32)):
            cfg = compose(*TINY[:-3], "data=text", f"data.path={corpus}", "logger.mode=disabled", "name=ft",
                          "depth=1", f"model.d_model={width}", "train.keep_checkpoint=true")
            runs[name] = root / "sweep" / run_id(cfg)
            train(cfg, JobInfo(runs[name], name, "ft", [], run_id(cfg)))
    return root, corpus, runs


def _letters(path: Path, labels=("x", "y")) -> Path:
    rows = ["text,label"] + [f"{('a' if i % 2 else 'b') * (3 + i % 5)},{labels[i % len(labels)]}" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _finetune(*args):
    from resnorm.finetune import main

    return main([*map(str, args), "--steps", "4", "--batch", "4", "logger.mode=disabled"])


def test_a_task_with_one_label_is_refused(pretrained, tmp_path, capsys):
    _, _, runs = pretrained
    task = _letters(tmp_path / "same.csv", labels=("x",))
    assert _finetune(runs["one"], "--task", task) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "every row has the label 'x'; a task needs at least two labels" in err
    assert not (runs["one"] / "finetune").exists()


def test_a_foreign_or_misshapen_checkpoint_is_one_line(pretrained, tmp_path, capsys):
    import torch

    _, _, runs = pretrained
    task = _letters(tmp_path / "letters.csv")
    copy = tmp_path / "copy"
    shutil.copytree(runs["one"], copy)
    shutil.copy(runs["two"] / "checkpoint.pt", copy / "checkpoint.pt")  # another run's, twice as wide
    assert _finetune(copy, "--task", task) == 2
    err = capsys.readouterr().err
    other = summary(runs["two"])["run_id"]
    assert err.count("\n") == 1 and f"checkpoint.pt belongs to run {other}, not to the folder's run" in err
    state = torch.load(copy / "checkpoint.pt", weights_only=True)
    state["run_id"] = summary(copy)["run_id"]  # relabelled: now only its shape tells
    torch.save(state, copy / "checkpoint.pt")
    assert _finetune(copy, "--task", task) == 2  # refused when the recipe builds the model, before any step
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and "does not match the run's config (" in out and "Traceback" not in out
    assert "32) in the checkpoint, (" in out and "16) in the run's config" in out and "size mismatch" not in out
    torch.save([1, 2, 3], copy / "checkpoint.pt")  # not a checkpoint at all
    assert _finetune(copy, "--task", task) == 2
    assert "checkpoint.pt holds a list, not a run's checkpoint" in capsys.readouterr().err


def test_a_copied_sweep_without_its_corpus_stored_values_as_data_and_a_dotted_task_name(
        pretrained, tmp_path, capsys, monkeypatch):
    """The corpus is gone (data.* is never read); ``${oc.env:...}`` in the copied summary stays text; the
    copied W&B settings are not used (the command's are); ``.x.csv`` is the task ``x``."""
    root, corpus, runs = pretrained
    copy = tmp_path / "copied" / runs["one"].name
    shutil.copytree(runs["one"], copy)
    stored = summary(copy)
    stored["config"]["logger"].update(project="${oc.env:RESNORM_SECRET}", entity="someone-else", mode="online")
    stored["config"]["name"] = "${oc.env:RESNORM_SECRET}"
    stored["config"]["data"]["path"] = str(tmp_path / "not-here.txt")
    (copy / "summary.json").write_text(json.dumps(stored))
    monkeypatch.setenv("RESNORM_SECRET", "s3cr3t-value")
    task = _letters(tmp_path / ".x.csv")
    assert _finetune(copy, "--task", task) == 0, capsys.readouterr()
    done = copy / "finetune" / "x"
    result = summary(done)
    assert result["status"] == "completed" and "s3cr3t-value" not in (done / "summary.json").read_text()
    assert result["config"]["name"] == "${oc.env:RESNORM_SECRET}"  # data, not resolved
    assert result["config"]["logger"]["mode"] == "disabled" and result["config"]["logger"]["entity"] is None
    assert result["config"]["logger"]["project"] == "resnorm"
    assert not list((copy / "finetune").glob("*.json"))  # nothing written into <run>/finetune/ itself
    capsys.readouterr()
    from resnorm.finetune import main

    with pytest.raises(SystemExit) as stop:
        main([str(copy), "--task", str(task), "model.d_model=8"])
    assert stop.value.code == 2 and "only KEY=VALUE of the keys outside a run's identity" in capsys.readouterr().err


# --- resources: a full disk ------------------------------------------------------------------------

def _tmpfs(folder: Path, size: str) -> None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs (a disk that fills up)")
    folder.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()[:120]}")


def _umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=60)  # lazy: datasets may hold a map


@pytest.mark.slow
def test_a_disk_that_fills_up_mid_run_is_one_line_then_resumes(tmp_path, reference):
    """300 KiB: the first checkpoint fits, the second's temporary does not. One line naming the file,
    exit 1, the summary says failed; with space freed the same command resumes bit for bit."""
    disk = tmp_path / "disk"
    _tmpfs(disk, "300k")
    try:
        proc = run_cli(*RUN, cwd=disk, timeout=300)
        assert proc.returncode == 1
        line = one_line(proc)
        run_dir = disk / "outputs" / "main" / reference.name
        assert line.startswith(f"run failed: DiskFullError: cannot write {run_dir}/checkpoint.pt: the disk is full")
        assert summary(run_dir)["status"] == "failed" and summary(run_dir)["traceback"] is None
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True, timeout=60)
        proc = run_cli(*RUN, cwd=disk, timeout=300)
        assert proc.returncode == 0 and "resumes from its checkpoint at step 2" in proc.stdout + proc.stderr
        assert_same_run(run_dir, reference)
    finally:
        _umount(disk)


def test_a_full_token_cache_is_one_line_and_leaves_no_temporary(tmp_path):
    from resnorm.data.hf import load_hf

    text = tmp_path / "text" / "big.txt"
    text.parent.mkdir()
    text.write_text("".join(f"line {i} of a text with some words\n" for i in range(20000)))
    cache = tmp_path / "cache"
    _tmpfs(cache, "1100k")  # the datasets cache of the text fits, its token stream does not
    try:
        with pytest.raises(DataError) as err:
            load_hf(compose("data=hf", f"data.path={text.parent}", f"data.cache_dir={cache}").data, 16)
        assert str(err.value).startswith(f"cannot write the token cache {cache}/tokens (data.cache_dir): the disk is full")
        assert not list(cache.rglob("*.tmp")) and not list((cache / "tokens").iterdir())
    finally:
        _umount(cache)


# --- hostile and damaged run folders ---------------------------------------------------------------

@pytest.fixture(scope="module")
def done_sweep(tmp_path_factory):
    """A finished one-job sweep (the reference run's config) to copy and damage."""
    cwd = tmp_path_factory.mktemp("done")
    proc = run_cli("-m", "hydra/launcher=basic", *RUN, NO_ANALYSIS, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd


def _copy(done_sweep: Path, tmp_path: Path) -> Path:
    shutil.copytree(done_sweep / "multirun", tmp_path / "multirun", symlinks=True)
    return tmp_path / "multirun" / "main"


@pytest.mark.slow
def test_deep_summary_and_non_dict_checkpoint_are_skipped_or_restarted(done_sweep, tmp_path, reference):
    import torch

    from analysis.load import load_sweep

    sweep = _copy(done_sweep, tmp_path)
    (sweep / "deep").mkdir()
    (sweep / "deep" / "summary.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.warns(UserWarning, match="nested too deeply"):
        loaded = load_sweep(sweep)
    assert len(loaded.runs) == 1 and [w for w, _ in loaded.skipped] == ["deep"]
    job = sweep / reference.name
    (job / "summary.json").write_text("[" * 200_000)  # the job's own summary: too deep to read, so redone
    torch.save([1, 2, 3], job / "checkpoint.pt")
    args = ("-m", "hydra/launcher=basic", *RUN, NO_ANALYSIS)
    proc = run_cli(*args, "--dry-run", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "resume? (checkpoint unreadable: restarts)" in proc.stdout, proc.stderr
    proc = run_cli(*args, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout + proc.stderr).count("ignoring checkpoint") == 1  # one warning
    assert_same_run(job, reference)


@pytest.mark.slow
def test_symbolic_links_are_refused_for_job_folders_and_followed_above_them(done_sweep, tmp_path, reference):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # a single run whose folder is a link, then a real folder whose run.log is a link
    single = tmp_path / "single" / "outputs" / "main" / reference.name
    single.parent.mkdir(parents=True)
    single.symlink_to(elsewhere)
    proc = run_cli(*RUN, cwd=tmp_path / "single", timeout=120)
    assert proc.returncode == 2 and "is a symbolic link (to " in one_line(proc)
    single.unlink()
    single.mkdir()
    (single / "run.log").symlink_to(elsewhere / "victim.log")
    proc = run_cli(*RUN, cwd=tmp_path / "single", timeout=120)
    assert proc.returncode == 2 and f"{reference.name}/run.log is a symbolic link" in one_line(proc)
    assert not list(elsewhere.iterdir()), "a run file was written through a link"
    # a sweep whose job folder is a link: refused before anything runs; a linked multirun/ is followed
    sweep = _copy(done_sweep, tmp_path / "copy")
    job = sweep / reference.name
    shutil.rmtree(job)
    job.symlink_to(elsewhere)
    args = ("-m", "hydra/launcher=basic", *RUN, NO_ANALYSIS)
    proc = run_cli(*args, cwd=tmp_path / "copy", timeout=120)
    assert proc.returncode == 2 and one_line(proc).startswith("error: refusing the job folder multirun/main/")
    assert not list(elsewhere.iterdir())
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "multirun").symlink_to(done_sweep / "multirun")
    proc = run_cli(*args, "--dry-run", cwd=linked, timeout=120)
    assert proc.returncode == 0 and "done: completed" in proc.stdout, proc.stderr


# --- smaller, same spirit ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "1", "yes"])
def test_sweeper_stack_takes_only_its_words(value, tmp_path):
    proc = run_cli("-m", f"hydra.sweeper.stack={value}", *RUN, NO_ANALYSIS, "--dry-run", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "hydra.sweeper.stack=" in one_line(proc) and "choose one of" in one_line(proc)


def test_auto_packing_on_fake_gpus_without_their_memory_writes_nothing(tmp_path):
    proc = run_cli("-m", "hydra/launcher=local", "hydra.launcher.fake_gpus=2", "hydra.launcher.jobs_per_device=auto",
                   *RUN, NO_ANALYSIS, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "set hydra.launcher.fake_gpu_free_gb" in one_line(proc)
    assert not (tmp_path / "multirun").exists()


def test_an_unwritable_tensorboard_folder_is_one_warning(tmp_path, capfd):
    pytest.importorskip("tensorboard")
    from resnorm.train.job import JobInfo, train

    (tmp_path / "tensorboard").write_text("a file where the folder goes")
    result = train(compose(*RUN, "logger.tensorboard=true"), JobInfo(tmp_path, "r", "g", []))
    assert result["status"] == "completed" and "no TensorBoard events" in result["tensorboard_error"]
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("no TensorBoard events") <= 1


# --- a run's identity across upgrades, and the code version ----------------------------------------

def test_existing_identities_are_pinned():
    """The default config's identity as of this rule: a key added to the schema without a ``neutral``
    value (resnorm.config.METADATA_KEYS) changes it, and with it every run's: this test then fails."""
    assert run_id(compose()) == "31ac41cf0b36"
    assert run_id(compose("depth=24", "model.norm=post")) == "f8ae07c7eca2"


def test_a_key_only_some_variants_read_is_out_of_the_other_variants_identities():
    """``read_by`` (resnorm.config.schema.METADATA_KEYS): mHC's head changes an mhc run's identity and
    no other run's; ResiDual's dual-stream eps likewise."""
    assert run_id(compose("model.mhc_head=sum")) == run_id(compose())
    assert run_id(compose("model.resi_dual_eps=1e-5")) == run_id(compose())
    assert run_id(compose("model.norm=mhc", "model.mhc_head=sum")) != run_id(compose("model.norm=mhc"))
    assert run_id(compose("model.norm=resi_dual", "model.resi_dual_eps=1e-5")) != run_id(compose("model.norm=resi_dual"))


@pytest.mark.slow
def test_a_key_added_later_leaves_a_finished_sweep_done(done_sweep, tmp_path, reference):
    """A later version adds ``model.new_knob`` (neutral 0.0): the sweep is still found done; set to
    another value, the jobs are new runs."""
    args = ("-m", "hydra/launcher=basic", *RUN, NO_ANALYSIS, "--dry-run")
    env = {"RESNORM_SCHEMA_ADD": "model.new_knob=0.0"}
    faultrun = [PYTHON, str(ROOT / "tests" / "faultrun.py")]
    proc = subprocess.run([*faultrun, *args], cwd=done_sweep, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0 and f"{reference.name}  done: completed" in proc.stdout, proc.stderr
    proc = subprocess.run([*faultrun, *args, "model.new_knob=0.5"], cwd=done_sweep, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})
    assert proc.returncode == 0 and "done: completed" not in proc.stdout and "to run: 1 of 1" in proc.stdout


def test_the_code_version_is_recorded_and_mixed_versions_are_reported(reference, tmp_path):
    from analysis.load import load_sweep
    from resnorm.runs.provenance import git_commit

    assert summary(reference)["git_commit"] == git_commit()
    sweep = tmp_path / "sweep"
    for name, commit in (("a", "1" * 40), ("b", "2" * 40 + "+dirty")):
        shutil.copytree(reference, sweep / name)
        s = summary(sweep / name)
        (sweep / name / "summary.json").write_text(json.dumps({**s, "git_commit": commit}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_sweep(sweep)
    assert loaded.versions == "1 run at 1111111111, 1 at 2222222222+dirty"
    assert any("mixes code versions" in str(w.message) for w in caught)
    # the sweeper: the finished runs' versions and this checkout's for the jobs still to run
    from resnorm.sweep.plan import JobPlan, version_note

    done = JobPlan([], "a", sweep / "a", "completed", None)
    todo = JobPlan([], "c", tmp_path / "c", "new", None)
    note = version_note([done, todo])
    assert note.startswith("this sweep mixes code versions (1 run at 1111111111, 1 at ") and "start a new sweep name" in note
    s = summary(sweep / "a")
    (sweep / "a" / "summary.json").write_text(json.dumps({**s, "git_commit": git_commit()}))
    assert version_note([done, todo]) is None  # one version: nothing to say
