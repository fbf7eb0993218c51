"""Fast sweep planning (resnorm.sweep.fastplan) against Hydra's full compose of each job, and the sweep
folder's run index and progress counters (resnorm.runs.index)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from resnorm.config.compose import group_options, override
from resnorm.config.rules import allowed
from resnorm.config.schema import CONF_DIR, leaves, register_schemas
from resnorm.errors import ConfigError
from resnorm.runs.identity import _plain, register_resolver, run_id
from resnorm.runs.folder import record
from resnorm.runs.index import count_finished, done_runs, read_index, start_counters
from resnorm.sweep.fastplan import FastPlanner, RuleCache, job_config
from resnorm.train.preflight import validate

GROUPS = ("data", "optim")  # the config groups a sweep chooses between (conf/<group>/*.yaml)


@pytest.fixture(scope="module")
def hydra_loader():
    """Hydra's config loader over conf/ and a multirun's master config, as the sweeper gets them."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    register_schemas()
    register_resolver()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", overrides=["name=fastplan"], run_mode=RunMode.MULTIRUN)
        yield master, loader
    GlobalHydra.instance().clear()


def random_value(lf, rng: random.Random):
    """A value for a schema leaf: mostly allowed (its default or a neighbour, one of its choices),
    sometimes not (null where null is not allowed, a string no rule accepts)."""
    choices = allowed(lf)
    default = lf.default
    if rng.random() < 0.05:
        return override(lf.key, None)
    if lf.kind is bool:
        return override(lf.key, rng.random() < 0.5)
    if choices:
        return override(lf.key, rng.choice(list(choices)))
    if lf.kind is int:
        base = default if isinstance(default, int) and default > 0 else 1
        return override(lf.key, rng.choice([base, base + 1, 2 * base]))
    if lf.kind is float:
        base = default if isinstance(default, float) and default > 0 else 0.5
        return override(lf.key, rng.choice([base, base / 2, float(base * 0.9)]))
    return override(lf.key, rng.choice([default if isinstance(default, str) else "abc", "x y", "/no/such/file.txt"]))


def random_jobs(n: int, seed: int = 0):
    """``n`` jobs of a few random overrides each: every leaf of the schema (every key type) and every
    option of the groups in :data:`GROUPS` appear; some jobs change the sweep's name (its folder)."""
    rng = random.Random(seed)
    keys = list(leaves())
    jobs = []
    for i in range(n):
        chosen = [keys[i % len(keys)]] + rng.sample(keys, 2)
        job = [random_value(lf, rng) for lf in chosen]
        for group in GROUPS:
            if rng.random() < 0.5:
                job.insert(rng.randrange(len(job) + 1), f"{group}={rng.choice(group_options(group))}")
        job.append(rng.choice(["name=fastplan", "name=other"]))
        jobs.append(job)
    return jobs



@pytest.fixture(autouse=True)
def hydra_config_restored():
    """full_plan sets Hydra's global HydraConfig as the sweeper does: put it back after each test, so that
    later tests outside Hydra (JobInfo.from_hydra) do not see a stale one."""
    from hydra.core.hydra_config import HydraConfig

    previous = HydraConfig.instance().cfg
    yield
    HydraConfig.instance().cfg = previous


def full_plan(master, loader, overrides):
    """What the sweeper's full path gives: the config (no hydra node), its folder, name and hydra yaml;
    None when it does not compose or validate."""
    from hydra.core.hydra_config import HydraConfig

    try:
        cfg = loader.load_sweep_config(master_config=master, sweep_overrides=list(overrides))
    except Exception:  # noqa: BLE001  # Hydra refuses it: the fast path must not plan it either
        return None
    HydraConfig.instance().set_config(cfg)
    run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
    name = str(cfg.hydra.job.override_dirname or "default")
    hydra_yaml = OmegaConf.to_yaml(OmegaConf.create({"hydra": cfg.hydra}))
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        validate(cfg, host=True)
    except ConfigError:
        return None
    return cfg, run_dir, name, hydra_yaml


def same_composition(built, composed, job) -> None:
    """The two composed configs (hydra node included) are equal, with the same YAML, flags and node types."""
    assert OmegaConf.to_yaml(built) == OmegaConf.to_yaml(composed), job
    assert built == composed, job
    assert OmegaConf.is_struct(built) == OmegaConf.is_struct(composed), job
    assert OmegaConf.is_readonly(built.hydra) == OmegaConf.is_readonly(composed.hydra), job
    for group in composed:
        if OmegaConf.is_dict(composed[group]):
            assert OmegaConf.get_type(built[group]) is OmegaConf.get_type(composed[group]), (job, group)
            for key in composed[group]:
                assert type(built[group]._get_node(key)) is type(composed[group]._get_node(key)), (job, key)


def test_fast_plan_equals_the_full_compose_on_random_jobs(hydra_loader):
    master, loader = hydra_loader
    planner = FastPlanner(master, loader, host=True)
    jobs = random_jobs(200)
    fast_count = valid = 0
    for job in jobs:
        full = full_plan(master, loader, job)
        fast = planner.plan(job)
        if full is None:
            assert fast is None, f"the fast path planned a job Hydra or the validation refuses: {job}"
            continue
        valid += 1
        if fast is None:
            continue
        fast_count += 1
        cfg, run_dir, name, hydra_yaml = full
        values, rid, fast_dir, fast_name, fast_yaml, prepared = fast
        assert json.dumps(dict(values), sort_keys=True) == json.dumps(_plain(cfg), sort_keys=True), job
        assert rid == run_id(cfg) and fast_dir == run_dir and fast_name == name, job
        assert fast_yaml() == hydra_yaml, job
        if fast_count <= 25:  # the launcher workers' config of the job: Hydra's compose, node for node
            same_composition(job_config(*prepared.payload()), loader.load_sweep_config(master, list(job)), job)
    assert planner.enabled, "a representative job disagreed with its full compose"
    # every job is compared: the valid ones (94 of 200 when written) planned fast and equal to Hydra, the rest
    # refused by both; the floor only guards against a generator that stops producing valid jobs
    assert valid >= len(jobs) // 4 and fast_count == valid, (valid, fast_count)


def test_overrides_the_fast_path_does_not_reproduce_take_the_full_compose(hydra_loader):
    master, loader = hydra_loader
    planner = FastPlanner(master, loader, host=True)
    assert planner.plan(["seed=3"]) is not None
    for job in (["+foo=1"], ["~seed"], ["model.norm=${model.activation}"], ["train.steps=[1,2]"],
                ["seed=-1"], ["model.n_heads=3"]):  # added, deleted, interpolated, a list, out of range, a rule
        assert planner.plan(job) is None, job


def test_rule_cache_reruns_a_rule_only_for_new_values():
    calls = []

    def rule(get):
        calls.append(1)
        if get("a") > 1 and get("b"):
            raise ConfigError("b", get("b"), "not with a > 1")

    cache = RuleCache()
    for a, b in [(0, True), (0, False), (0, True), (2, True), (2, True), (2, False)]:
        values = {"a": a, "b": b}
        if a > 1 and b:
            with pytest.raises(ConfigError):
                cache.run(rule, values.get)
        else:
            cache.run(rule, values.get)
    assert len(calls) == 3  # a=0 (reads a only), a=2 b=True, a=2 b=False


def test_index_and_counters(tmp_path):
    from resnorm.runs.folder import PLAN_FILE

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / PLAN_FILE).write_text("{}")  # a launched sweep's folder (a single run's gets no index)
    for rid, status in [("a", "completed"), ("b", "failed"), ("c", "running"), ("a", "diverged")]:
        (sweep / rid).mkdir(parents=True, exist_ok=True)
        (sweep / rid / "summary.json").write_text("{}")
        record(sweep / rid, {"run_id": rid, "status": status, "outcome": "trained"})
    assert {k: v["status"] for k, v in read_index(sweep).items()} == {"a": "diverged", "b": "failed"}
    (sweep / "b" / "summary.json").unlink()
    assert done_runs(sweep, ("completed", "diverged", "failed")) == {(str(sweep / "a"), "a"): "diverged"}
    (sweep / "a" / "summary.json").write_text('{"status": "x"}')  # changed since it was indexed: not trusted
    assert done_runs(sweep, ("completed", "diverged", "failed")) == {}
    start_counters(sweep, [1.0, 3.0], runs=3, done={"trained": 1})
    assert count_finished(sweep, ["trained"], 1.0)["finished"] == 2
    counters = count_finished(sweep, ["stalled"], 3.0)
    assert counters["counts"] == {"trained": 2, "stalled": 1} and counters["done_flops"] == 4.0
    assert count_finished(tmp_path, ["trained"], 1.0) is None  # outside a launched sweep


def test_the_dry_runs_parameter_count_is_the_built_models_for_every_variant():
    """model_size counts the model as constructed (no init, no Admin profile): the built model's count."""
    import torch

    from resnorm.config.compose import compose
    from resnorm.config.variants import VARIANTS
    from resnorm.model.transformer import build_model
    from resnorm.sweep.plan import model_size

    for norm in VARIANTS:
        cfg = compose(["model.d_model=16", "model.n_heads=2", "depth=3", "data=synthetic", "train.seq_len=16",
                      "train.batch_size=2", "data.synthetic_tokens=2000", f"model.norm={norm}"])
        model = build_model(cfg)
        total = sum(p.numel() for p in model.parameters())
        embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)
                        for p in m.parameters(recurse=False))
        assert model_size(cfg) == (total, total - embedding), norm
