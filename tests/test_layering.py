"""The package's layering, read from the imports of every module (the AST; imports inside functions
included): the wings of resnorm/ follow the data, and every import points to the same wing or an
earlier one; no import circle anywhere; the run store, the analysis and the sweep's planning load no
torch. A failure names the offending import by file and line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("resnorm", "analysis", "experiments", "hydra_plugins")

#: the wings of resnorm/, in the order data flows through a run: a module may import its own wing and
#: the wings before it. ``errors`` is below everything; the entry points (cli, finetune, diagnose) above.
WINGS = ("errors", "config", "runs", "data", "model", "tasks", "monitors", "train", "sweep", "entry")
ENTRY_POINTS = ("cli", "finetune", "diagnose")
#: what a wing may not import although it comes later in WINGS (what the model must know of an
#: objective or a run arrives as arguments or config)
FORBIDDEN = {"model": {"runs"}, "data": set(), "tasks": {"runs"}}
#: analysis reads what runs wrote: it may import only these parts of resnorm
ANALYSIS_MAY_IMPORT = ("resnorm.errors", "resnorm.config", "resnorm.runs")
#: importing these must not load torch (analysis works on runs from any machine; a sweep plans
#: thousands of jobs without it)
TORCH_FREE = ("resnorm.runs.folder", "resnorm.runs.identity", "resnorm.runs.provenance", "resnorm.runs.progress",
              "resnorm.runs.tracking", "resnorm.runs.quantities", "resnorm.config.schema", "resnorm.config.rules", "resnorm.config.compose",
              "resnorm.config.variants", "resnorm.sweep.plan", "resnorm.sweep.packing", "resnorm.sweep.study",
              "resnorm.train.preflight",
              "resnorm.train.stack_plan", "resnorm.data.checks", "resnorm.data.hf_source", "resnorm.data.token_cache",
              "resnorm.model.flops", "analysis", "analysis.report", "analysis.callback", "hydra_plugins.resnorm_sweeper")


def modules() -> Dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path) -> Iterator[Tuple[str, int]]:
    """(imported module, line) for every import statement of a module, inside functions too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield base, node.lineno
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def resolve(target: str, known: Dict[str, Path]) -> str:
    """The project module an imported name lives in ('' for a third-party one)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target


def edges() -> Dict[str, List[Tuple[str, int]]]:
    known = modules()
    out: Dict[str, List[Tuple[str, int]]] = {m: [] for m in known}
    for name, path in known.items():
        for target, line in imports(name, path):
            module = resolve(target, known)
            parent = name if path.name == "__init__.py" else name.rpartition(".")[0]
            if module and module != name and not (module == parent and known[module].name == "__init__.py"):
                if (module, line) not in out[name]:
                    out[name].append((module, line))
    return out


def wing(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "resnorm" or len(parts) == 1:
        return ""
    if len(parts) == 2:
        return "entry" if parts[1] in ENTRY_POINTS else parts[1]
    return parts[1]


def where(module: str, line: int) -> str:
    return f"{modules()[module].relative_to(ROOT)}:{line}"


def test_resnorm_is_wings_plus_a_few_modules():
    top = sorted(p.stem for p in (ROOT / "resnorm").glob("*.py") if p.stem != "__init__")
    assert set(top) <= {"errors", *ENTRY_POINTS}, f"resnorm/ holds modules outside the wings: {top}"
    wings = sorted(p.name for p in (ROOT / "resnorm").iterdir() if (p / "__init__.py").is_file())
    assert set(wings) == set(WINGS) - {"errors", "entry"}, (
        f"resnorm/'s subpackages {wings} and tests/test_layering.py's WINGS differ: add a new wing to WINGS "
        "in data-flow order (and to the README's Layout)")


def test_imports_point_to_the_same_or_an_earlier_wing():
    rank = {w: i for i, w in enumerate(WINGS)}
    bad = []
    for source, targets in edges().items():
        ws = wing(source)
        for target, line in targets:
            wt = wing(target)
            if not ws or not wt:
                continue
            if rank[wt] > rank[ws] or wt in FORBIDDEN.get(ws, ()):
                bad.append(f"{where(source, line)}: resnorm.{ws} imports {target} (wing {wt}); the order is "
                           f"{' -> '.join(WINGS)}")
    assert not bad, "\n".join(bad)


def test_analysis_reads_only_what_runs_wrote():
    bad = []
    for source, targets in edges().items():
        if not source.startswith("analysis"):
            continue
        for target, line in targets:
            if target.startswith("resnorm") and not target.startswith(ANALYSIS_MAY_IMPORT):
                bad.append(f"{where(source, line)}: {source} imports {target}; analysis may import only "
                           f"{', '.join(ANALYSIS_MAY_IMPORT)}")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    graph = {m: {t for t, _ in ts} for m, ts in edges().items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    circles: List[List[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    detail = []
    for comp in circles:
        for m in comp:
            detail += [f"  {where(m, line)}: {m} imports {t}" for t, line in edges()[m] if t in comp]
    assert not circles, "import circles:\n" + "\n".join(detail)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_loads_without_torch(module):
    code = f"import sys, {module}; mods = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; " \
           "print(len(mods))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0", f"importing {module} loads torch"
