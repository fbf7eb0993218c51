"""The shape of the code the issue asked for, held by tests: short functions, one copy of each
piece of plumbing (the training loop, the config builder, the atomic write, the summary reader)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("resnorm", "analysis", "experiments")
MAX_FUNCTION_LINES = 80


def _sources(*dirs: str):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in _sources(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


MAX_MODULE_LINES = 600


def test_no_module_is_longer_than_600_lines_unless_it_is_a_data_table():
    """A reader takes a module in at one sitting; a longer one must say in its docstring that it is a
    data table and why."""
    long = []
    for path in _sources(*PACKAGES):
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > MAX_MODULE_LINES and "data table" not in " ".join(doc.split()):
            long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines): split it by topic, or say in "
                        "its docstring that it is a data table and why")
    assert not long, long


@pytest.mark.parametrize("pattern, home", [
    (r"^def atomic_write\(", ["resnorm/runs/folder.py"]),
    (r"^def read_summary\(", ["resnorm/runs/folder.py"]),
    (r"^def compose\(", ["resnorm/config/compose.py"]),
    (r"^def fit\(", ["resnorm/train/loop.py"]),
    (r"fcntl\.flock\(", ["resnorm/runs/locks.py"]),  # run folders, device slots and the token cache
    # optimizer steps: the one training loop, and DeepNet's one-step model-update measurement at init
    # (and resnorm.train.optimizers.OptimizerChain.step, which steps Muon and AdamW as one optimizer)
    (r"optimizer\.step\(\)|opt\.step\(\)", ["resnorm/monitors/measure.py", "resnorm/train/loop.py", "resnorm/train/optimizers.py"]),
])
def test_one_copy_of_each_piece_of_plumbing(pattern, home):
    found = [str(p.relative_to(ROOT)) for p in _sources(*PACKAGES, "hydra_plugins")
             if re.search(pattern, p.read_text(), re.M)]
    assert found == home, found


def test_the_compose_helpers_of_tests_and_benchmarks_delegate():
    for path in ("tests/conftest.py", "benchmarks/common.py"):
        text = (ROOT / path).read_text()
        body = text[text.index("def compose("):].split("\ndef ", 1)[0]
        assert "resnorm.config.compose import compose" in body, path


def test_configs_are_built_only_by_compose():
    """Nothing builds a run config by hand (``OmegaConf.structured(Config)`` + setattr) or composes
    Hydra's conf/ itself, except resnorm.config.compose and the test that checks Hydra's own run-dir
    resolution (it needs the ``hydra`` node, which compose leaves out)."""
    builders = []
    for path in _sources(*PACKAGES, "benchmarks", "tests", "hydra_plugins"):
        if path.name == "test_layout.py":
            continue
        text = path.read_text()
        if "OmegaConf.structured(Config)" in text or "initialize_config_dir" in text:
            builders.append(str(path.relative_to(ROOT)))
    assert set(builders) <= {"resnorm/config/compose.py", "tests/test_config.py", "tests/test_scaling.py"}, builders


def test_every_registered_variant_has_a_fixed_colour_and_label():
    """analysis.style pins a colour per variant so adding one to a sweep never recolours the others;
    a variant registered without one would get a hash colour that can clash."""
    from analysis.style import KNOWN_VARIANTS
    from resnorm.config.variants import VARIANTS

    assert set(VARIANTS) <= set(KNOWN_VARIANTS), sorted(set(VARIANTS) - set(KNOWN_VARIANTS))
    from analysis.style import _COLOURS

    assert len(set(_COLOURS.values())) == len(_COLOURS)  # no two variants share a colour
