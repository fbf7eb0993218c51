"""Fault injection: bad configs, kill -9 at several points of a run and of a sweep, broken
checkpoints and summaries, W&B failing and hanging, unwritable folders. Each case checks the one-line
message, the exit code, and that no finished run is lost or duplicated.

Runs are tiny (conftest ``TINY``); the kills come from ``tests/faultrun.py`` (``RESNORM_FAULT``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, TINY, compose, run_cli
from resnorm import cli
from resnorm.config.compose import override
from resnorm.config.schema import leaves
from resnorm.errors import ConfigError
from resnorm.runs.identity import run_id

pd = pytest.importorskip("pandas")

RUN = TINY + ("depth=1", "train.checkpoint_every=2")  # checkpoints at steps 2 and 4 of 6
NO_ANALYSIS = "~hydra.callbacks.analysis"
COMPARED = ["step", "train_loss", "lr", "grad_norm", "val_loss"]  # tokens_per_s is a timing


def fault_cli(fault: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "RESNORM_FAULT": fault}
    return subprocess.run([PYTHON, str(ROOT / "tests" / "faultrun.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def metrics(run_dir: Path):
    return pd.read_parquet(run_dir / "metrics.parquet")[COMPARED]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single run of RUN: its folder."""
    cwd = tmp_path_factory.mktemp("reference")
    proc = run_cli(*RUN, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (cwd / "outputs" / "main").iterdir()
    assert run_dir.name == run_id(compose(*RUN)) and summary(run_dir)["threads"] == 1
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """A completed run, every step stored once, bit for bit the uninterrupted run's."""
    assert summary(run_dir)["status"] == "completed"
    got = metrics(run_dir)
    assert list(got["step"]) == list(range(6))
    pd.testing.assert_frame_equal(got, metrics(reference), check_exact=True)
    assert not list(run_dir.glob(".*.tmp*")), "a half-written file of the killed attempt is left"


# --- configuration: a bad value for every key, from the schema's metadata ---------------------------

def bad_values(lf):
    """(value, words the message must hold) for every way the leaf's metadata says a value is wrong."""
    rng, out = lf.meta.get("range"), []
    if not lf.nullable:
        out.append((None, "null is not allowed"))
    if lf.kind is bool:
        out += [("maybe", "true or false"), (3, "true or false")]
    elif lf.kind in (int, float):
        out.append(("abc", "must "))
        if lf.kind is int:
            out.append((1.5, "integer"))
        else:
            out += [(math.nan, "finite"), (math.inf, "finite")]
        if rng is not None and rng.low is not None:
            out.append((rng.low - 1, "must"))
        if rng is not None and rng.high is not None:
            out.append((rng.high + 1, "must"))
    elif lf.kind is str:
        if lf.choices is not None:
            out.append(("no-such-choice", "choose one of"))
        if "pattern" in lf.meta:
            out.append(("bad/value" if lf.key == "name" else "no such/value", lf.meta["pattern"][1]))
    return out


CASES = [(lf.key, value, words) for lf in leaves() for value, words in bad_values(lf)]


def test_every_key_has_a_bad_value_case():
    keys = {k for k, _, _ in CASES}
    free = {lf.key for lf in leaves() if lf.kind is str and lf.choices is None and "pattern" not in lf.meta}
    assert keys | free == {lf.key for lf in leaves()}  # only free-text strings (paths, names) have none


@pytest.mark.parametrize("key,value,words", CASES, ids=[f"{k}={v!r}" for k, v, _ in CASES])
def test_bad_value_is_one_config_error_line_and_exit_2(key, value, words, capsys):
    """The command line ``run.py KEY=VALUE`` stops in :func:`resnorm.cli.preflight`, before Hydra
    writes anything: one line naming the key, exit 2."""
    line = override(key, value) if not (isinstance(value, str) and value == "abc") else f"{key}=abc"
    with pytest.raises(SystemExit) as stop:
        cli.preflight(["run.py", line])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"config error: {key}=") and words in err[0], err


@pytest.mark.parametrize("line,words", [
    ("+model.nrom=pre", "did you mean model.norm?"),
    ("++train.stpes=3", "did you mean train.steps?"),
    ("+trian.steps=3", "did you mean train.steps?"),
    ("+model.extra.deep=1", "no such key"),
    ("model.nrom=pre", "did you mean model.norm?"),
    ("data=nope", "choose one of hf, shakespeare, synthetic, text"),
    ("depth=6,24", "add -m"),
    ("depth=[1,", "cannot be parsed"),
    ("depth=abc", "must be a positive integer"),
])
def test_hydra_errors_and_appended_keys_are_one_line(line, words, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.preflight(["run.py", line])
    assert stop.value.code == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("config error: ") and words in err


def test_extension_points_accept_new_keys():
    cli.preflight(["run.py", "-m", "+sweep=depth_lr_grid"])  # a group choice
    cli.preflight(["run.py", "+hydra.launcher.additional_parameters.account=me", *TINY])  # Hydra's own keys
    cli.preflight(["run.py", "-m", "depth=1,2", *TINY])


def test_pre_training_checks(tmp_path, monkeypatch):
    import torch

    from resnorm.train.preflight import validate

    def fails(*overrides):
        with pytest.raises(ConfigError) as err:
            validate(compose(*overrides))
        return str(err.value)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in fails("train.device=cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    validate(compose("train.device=cuda:0"))
    assert "has 1 GPU(s), cuda:0 to cuda:0" in fails("train.device=cuda:3")
    assert "train.devices=2 from cuda:0 needs 2" in fails("train.device=cuda", "train.devices=2")
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 100)
    msg = fails("data=text", f"data.path={small}", "train.seq_len=64")
    assert msg.startswith("train.seq_len=64") and "lower train.seq_len or use a larger corpus" in msg
    assert "val_fraction" not in msg.split(";")[-1]  # no advice that cannot help: 100 tokens < 2 sequences
    assert "must be >= 256" in fails("data=text", f"data.path={small}", "train.seq_len=8", "model.vocab_size=128")
    assert "must lie in [2, model.vocab_size=32]" in fails("data=synthetic", "model.vocab_size=32")
    assert "a directory, not a file" in fails("data=text", f"data.path={tmp_path}")
    assert "no such file" in fails("data=text", f"data.path={tmp_path / 'missing.txt'}")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if str(p) == str(small) else real_open(p, *a, **k))
    assert "cannot be read (PermissionError: Permission denied)" in fails("data=text", f"data.path={small}",
                                                                           "train.seq_len=8")


def test_config_errors_write_nothing_single_and_sweep(tmp_path):
    for args in (("depth=abc",), ("-m", "depth=6,abc"), ("+model.nrom=pre",), ("-m", "+model.nrom=pre,post")):
        proc = run_cli(*args, NO_ANALYSIS, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2 and one_line(proc).startswith("config error: "), proc.stderr
    assert not list(tmp_path.iterdir()), "a config error left a folder behind"


# --- exit codes, resume by identity, kill -9 ------------------------------------------------------

def test_single_run_exit_code_and_resume_by_identity(tmp_path, reference):
    proc = fault_cli("raise_in_checkpoint:1", *RUN, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("run failed: OSError: [Errno 28] No space left")
    (run_dir,) = (tmp_path / "outputs" / "main").iterdir()
    assert run_dir.name == reference.name and summary(run_dir)["status"] == "failed"
    proc = run_cli(*RUN, cwd=tmp_path)  # the same command: the same folder, retried
    assert proc.returncode == 0, proc.stderr
    assert_same_run(run_dir, reference)
    before = (run_dir / "summary.json").read_bytes()
    proc = run_cli(*RUN, cwd=tmp_path)  # done: skipped, not trained twice
    assert proc.returncode == 0 and "already completed: skipped" in proc.stdout + proc.stderr
    assert (run_dir / "summary.json").read_bytes() == before
    assert len(list((tmp_path / "outputs" / "main").iterdir())) == 1


@pytest.mark.parametrize("fault,resumes", [("kill_after_checkpoint:1", "at step 2"),
                                           ("kill_in_checkpoint:2", "at step 2"),
                                           ("kill_in_summary:1", None)])
def test_single_run_killed_then_rerun(fault, resumes, tmp_path, reference):
    proc = fault_cli(fault, *RUN, cwd=tmp_path)
    assert proc.returncode == -9
    (run_dir,) = (tmp_path / "outputs" / "main").iterdir()
    assert summary(run_dir)["status"] == "running"
    proc = run_cli(*RUN, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    if resumes:
        assert f"resumes from its checkpoint {resumes}" in proc.stdout + proc.stderr
    assert_same_run(run_dir, reference)


def test_sweep_killed_in_a_checkpoint_write_then_rerun(tmp_path, reference):
    args = ("-m", "hydra/launcher=basic", "hydra.sweeper.order=given", "depth=1,2", *RUN[:-2],
            "train.checkpoint_every=2", NO_ANALYSIS)
    proc = fault_cli("kill_in_checkpoint:3", *args, cwd=tmp_path)  # the second job's first checkpoint
    assert proc.returncode == -9
    sweep = tmp_path / "multirun" / "main"
    first = sweep / reference.name
    assert summary(first)["status"] == "completed"
    done = (first / "summary.json").read_bytes()
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (first / "summary.json").read_bytes() == done, "a finished run was trained again"
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2 and all(summary(r)["status"] == "completed" for r in runs)
    assert_same_run(first, reference)
    for r in runs:
        assert list(metrics(r)["step"]) == list(range(6))


def test_local_and_basic_launchers_compute_the_same_bits(tmp_path, reference):
    """One job left under the local launcher trains with train.threads (null: 1), as under basic."""
    proc = run_cli("-m", "hydra/launcher=local", *RUN, NO_ANALYSIS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "multirun" / "main" / reference.name
    assert summary(run_dir)["threads"] == 1
    assert_same_run(run_dir, reference)


def test_truncated_and_garbled_checkpoints(tmp_path, reference):
    from resnorm.train import checkpoint

    args = ("-m", "hydra/launcher=basic", *RUN, NO_ANALYSIS)
    assert fault_cli("kill_after_checkpoint:1", *args, cwd=tmp_path).returncode == -9
    run_dir = tmp_path / "multirun" / "main" / reference.name
    ckpt = run_dir / "checkpoint.pt"
    good = ckpt.read_bytes()
    assert checkpoint.load(ckpt, reference.name) is not None
    assert checkpoint.load(ckpt, "another-run") is None
    proc = run_cli(*args, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0 and "resume @2" in proc.stdout
    for broken in (good[: len(good) // 2], os.urandom(len(good))):  # truncated, then garbled
        ckpt.write_bytes(broken)
        assert checkpoint.load(ckpt, reference.name) is None
    proc = run_cli(*args, "--dry-run", cwd=tmp_path)
    assert "resume? (checkpoint unreadable: restarts)" in proc.stdout, proc.stdout
    proc = run_cli(*args, cwd=tmp_path)  # the garbled one: starts over, the same numbers
    assert proc.returncode == 0 and "ignoring unreadable checkpoint" in proc.stdout + proc.stderr
    assert_same_run(run_dir, reference)


def test_the_losing_sweep_of_two_exits_non_zero_without_analysis(tmp_path):
    """The same sweep started twice: the job folder is locked by the other process."""
    from resnorm.runs.folder import job_lock

    run_dir = tmp_path / "multirun" / "main" / run_id(compose(*RUN))
    with job_lock(run_dir) as ours:
        assert ours
        proc = run_cli("-m", "hydra/launcher=basic", *RUN, cwd=tmp_path)  # analysis callback on
    assert proc.returncode == 1
    assert "1 of 1 runs are being trained by another process" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (run_dir / "summary.json").exists()


# --- unwritable folders ------------------------------------------------------------------------------

def test_unwritable_single_run_folder_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "outputs").write_text("")  # a file where the run folder's parent should be
    proc = run_cli(*RUN, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    line = one_line(proc)
    assert line.startswith("error: cannot write the run folder outputs/") and "is not a folder" in line
    assert "Traceback" not in proc.stdout + proc.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_cli(*RUN, f"hydra.run.dir={blocker}/run", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and one_line(proc).startswith(f"error: cannot write the run folder {blocker}/run (")


def test_unwritable_sweep_folder_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_cli("-m", *RUN, f"hydra.sweep.dir={blocker}/sweep", NO_ANALYSIS, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert one_line(proc).startswith(f"error: cannot write the sweep folder {blocker}/sweep (")


def test_read_only_folder_even_for_root(tmp_path):
    """Root bypasses permission bits, but not a read-only file system: the sweep runs in its own
    mount namespace (``unshare -m``) where its folder is a read-only tmpfs. One line, exit 2, and
    the single-run check says the same of a run folder there."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare (a read-only mount in a private mount namespace)")
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {ro} && touch {ro}/x"],
                           capture_output=True, text=True, timeout=60)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"no read-only mount here: {probe.stderr.strip()[:120]}")
    env = {**os.environ, "WANDB_SILENT": "true"}
    for args, what in ((["-m", *RUN, f"hydra.sweep.dir={ro}/sweep", NO_ANALYSIS], "sweep"),
                       ([*RUN, f"hydra.run.dir={ro}/run"], "run")):
        cmd = " ".join([f"mount -t tmpfs -o ro tmpfs {ro} &&", "exec", PYTHON, str(ROOT / "run.py"),
                        *[f"'{a}'" for a in args]])
        proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = one_line(proc)
        assert line.startswith(f"error: cannot write the {what} folder {ro}/{what}"), line
        assert "Traceback" not in proc.stdout + proc.stderr
    assert not list(ro.iterdir())  # outside the namespace: nothing was written


def _nobody():
    """(uid, gid) of an unprivileged user who can run this interpreter and read the code, or a reason."""
    import pwd

    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        return "no user nobody"
    try:
        probe = subprocess.run([PYTHON, "-c", "import resnorm"], capture_output=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": str(ROOT)},
                               preexec_fn=lambda: (os.setgid(user.pw_gid), os.setuid(user.pw_uid)))
    except PermissionError:
        probe = None
    if probe is None or probe.returncode:
        return f"user nobody cannot run {PYTHON} or read {ROOT}"
    return user.pw_uid, user.pw_gid


def test_read_only_sweep_folder_as_an_unprivileged_user(tmp_path):
    who = _nobody()
    if isinstance(who, str):
        pytest.skip(who)
    uid, gid = who
    ro = tmp_path / "ro"
    ro.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chown(home, uid, gid)
    ro.chmod(0o555)
    env = {**os.environ, "HOME": str(home), "MPLCONFIGDIR": str(home), "WANDB_SILENT": "true"}
    proc = subprocess.run([PYTHON, str(ROOT / "run.py"), "-m", *RUN, f"hydra.sweep.dir={ro}/sweep", NO_ANALYSIS],
                          cwd=home, capture_output=True, text=True, timeout=120, env=env,
                          preexec_fn=(lambda: (os.setgid(gid), os.setuid(uid))) if os.geteuid() == 0 else None)
    assert proc.returncode == 2
    assert one_line(proc).startswith(f"error: cannot write the sweep folder {ro}/sweep (PermissionError")


# --- analysis of broken run folders ----------------------------------------------------------------

MALFORMED = {
    "not-json": "{\"status\": \"comp",
    "not-an-object": "[1, 2]",
    "overrides-a-number": {"overrides": 5},
    "status-a-list": {"status": ["completed"]},
    "loss-a-list": {"final_val_loss": [1.0]},
    "config-a-number": {"config": 3},
    "steps-a-string": {"steps_done": "six"},
}


def test_analysis_skips_malformed_summaries_and_lists_them(tmp_path, reference):
    from analysis.load import load_sweep
    from analysis.report import make_report

    sweep = tmp_path / "sweep"
    shutil.copytree(reference, sweep / "good")
    good = summary(reference)
    for name, bad in MALFORMED.items():
        (sweep / name).mkdir()
        text = bad if isinstance(bad, str) else json.dumps({**good, **bad})
        (sweep / name / "summary.json").write_text(text)
    shutil.copytree(reference, sweep / "no-metrics")
    (sweep / "no-metrics" / "metrics.parquet").unlink()
    with pytest.warns(UserWarning) as caught:
        loaded = load_sweep(sweep)
    assert sorted(loaded.runs["run_dir"].map(lambda d: Path(d).name)) == ["good", "no-metrics"]
    skipped = dict(loaded.skipped)
    assert set(skipped) == set(MALFORMED) | {"no-metrics"}
    assert "no readable metrics.parquet" in skipped["no-metrics"]
    assert "overrides is int 5, not a list or a string" in skipped["overrides-a-number"]
    assert len(caught) == len(skipped)
    with pytest.warns(UserWarning):
        make_report(sweep, tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Runs left out or incomplete" in report and all(f"`{n}`" in report for n in skipped)


# --- W&B that fails or never answers ---------------------------------------------------------------

def test_wandb_that_fails_falls_back_to_offline(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from resnorm.runs import tracking

    modes = []

    def fake_init(self, wandb, mode, timeout=None):
        modes.append((mode, timeout))
        if mode == "online":
            raise RuntimeError("api_key not configured")
        return type("FakeRun", (), {"id": "abc", "log": lambda *a, **k: None, "finish": lambda *a, **k: None})()

    monkeypatch.setattr(tracking.WandbTracker, "_init", fake_init)
    monkeypatch.setattr(tracking, "answers", lambda url, timeout: None)
    cfg = OmegaConf.create(dict(wandb=True, mode="online", project="p", entity=None, init_timeout=2.5))
    with tracking.WandbTracker(cfg, tmp_path, "g", "n", {}, run_id="abc") as tracker:
        assert tracker.run is not None and "logged offline" in tracker.error
    assert modes == [("online", 2.5), ("offline", None)]
    modes.clear()
    monkeypatch.setattr(tracking, "answers", lambda url, timeout: (_ for _ in ()).throw(ConnectionRefusedError()))
    with tracking.WandbTracker(cfg, tmp_path, "g", "n", {}, run_id="abc") as tracker:
        assert tracker.run is not None
    assert modes == [("offline", None)]  # a server that refuses is not waited on at all


@pytest.fixture
def silent_server():
    """A local address that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_wandb_online_that_never_answers_is_bounded(tmp_path, silent_server):
    args = [a for a in RUN if not a.startswith("logger.")] + ["logger.mode=online", "logger.init_timeout=2"]
    t0 = time.monotonic()
    proc = run_cli(*args, cwd=tmp_path, timeout=120,
                   env_extra={"WANDB_BASE_URL": silent_server, "WANDB_API_KEY": "x" * 40})
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert f"wandb: connecting to {silent_server} (at most 2 s" in out
    assert f"wandb: no answer from {silent_server}" in out and "wandb sync" in out
    (run_dir,) = (tmp_path / "outputs" / "main").iterdir()
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B copy to sync later"
    result = summary(run_dir)
    assert result["status"] == "completed" and "logged offline" in result["wandb_error"]
    assert took < 60, f"the run waited {took:.0f} s on W&B"
