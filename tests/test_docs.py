"""The documentation holds together: links and anchors resolve, every page is indexed, the README's
Layout names every module of ``resnorm/``, and ``results/`` keeps only what the docs show.

Markdown is read as GitHub renders it: links and images outside code, anchors by GitHub's heading
slugs (lower case, punctuation but ``-`` and ``_`` dropped, each space a ``-``, ``-1``, ``-2``, ...
for repeated headings). Everything is derived from the files: no page, module or figure is listed here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS = ROOT / "results"
PACKAGE = ROOT / "resnorm"

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def pages() -> List[Path]:
    """The Markdown pages the docs consist of: the README, every page under docs/, benchmarks/README.md."""
    return [README, *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "README.md"]


def _prose_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, text) of the lines outside fenced and indented code blocks, inline code removed."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or line.startswith("    ") and not line.lstrip().startswith(("-", "*", "|")):
            continue
        yield number, INLINE_CODE.sub("", line)


def links(path: Path) -> List[Tuple[int, str]]:
    """(line, target) of every Markdown link and image of ``path`` outside code."""
    return [(n, m.group(1)) for n, line in _prose_lines(path) for m in LINK.finditer(line)]


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: links reduced to their text, lower case, every character
    that is not a letter, digit, ``_``, ``-`` or space dropped, spaces to ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = "".join(c for c in text if c in "-_ " or c.isalpha() or c.isdecimal())
    return text.replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    """Every anchor GitHub makes for ``path``'s headings (repeats get -1, -2, ...)."""
    seen: Dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def _relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target) and not target.startswith("//")


def link_problems(path: Path) -> List[str]:
    """What does not resolve among ``path``'s relative links: a missing file, or an anchor its
    target page lacks."""
    problems = []
    for line, target in links(path):
        if not _relative(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{line}"
        if not dest.exists():
            problems.append(f"{where}: {target}: no such file {dest.relative_to(ROOT) if ROOT in dest.parents else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: {target}: {dest.relative_to(ROOT)} has no heading with anchor #{anchor}")
    return problems


def test_github_slug_follows_githubs_rules():
    assert github_slug("The main result (measured)") == "the-main-result-measured"
    assert github_slug("`xiong_grad`: per-layer ||grad W2|| vs depth") == "xiong_grad-per-layer-grad-w2-vs-depth"
    assert github_slug("Weights & Biases and TensorBoard") == "weights--biases-and-tensorboard"
    assert github_slug("How the figures combine a block's sublayers") == "how-the-figures-combine-a-blocks-sublayers"
    assert github_slug("See [the run folder](run-folder.md)") == "see-the-run-folder"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    problems = link_problems(page)
    assert not problems, "broken links (fix the link or the heading):\n" + "\n".join(problems)


def test_docs_index_lists_every_page():
    index = DOCS / "index.md"
    listed = {(index.parent / t.partition("#")[0]).resolve() for _, t in links(index) if _relative(t)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p != index and p.resolve() not in listed]
    assert not missing, f"docs/index.md: add a row for {', '.join(missing)}"
    readme_targets = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(README) if _relative(t)}
    assert index.resolve() in readme_targets, "README.md: link docs/index.md (## Where to read on)"


# --- the README's Layout section ------------------------------------------------------------------

def readme_section(title: str) -> str:
    """The text of the README's ``## title`` section, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def package_entries() -> List[str]:
    """Every module (``resnorm/x.py``, ``resnorm/wing/x.py``) and subpackage (``resnorm/wing/``) of
    the library, from the filesystem; ``__init__``/``__main__`` belong to their package's line."""
    out = []
    for path in sorted(PACKAGE.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if "__pycache__" in path.parts:
            continue
        if path.is_dir() and (path / "__init__.py").exists():
            out.append(rel + "/")
        elif path.suffix == ".py" and path.name not in ("__init__.py", "__main__.py"):
            out.append(rel)
    return out


def test_readme_layout_names_every_module_and_subpackage():
    layout = readme_section("Layout")
    named = set(re.findall(r"`([^`\s]+)`", layout))
    missing = [entry for entry in package_entries() if entry not in named]
    assert not missing, ("README.md, section '## Layout': add one line per module, naming it by its path "
                         "in backticks with the first line of its docstring, for: " + ", ".join(missing))


def test_readme_layout_names_only_modules_that_exist():
    layout = readme_section("Layout")
    paths = [p for p in re.findall(r"`((?:resnorm|analysis|experiments|hydra_plugins)/[\w/]*(?:\.py|/))`", layout)]
    stale = [p for p in paths if not (ROOT / p).exists()]
    assert not stale, "README.md, section '## Layout': these are not in the repository: " + ", ".join(stale)


def test_docs_name_only_repository_paths_that_exist():
    """A path in backticks (`resnorm/train/loop.py`, `tests/test_recipe.py::test_name`) must exist, and
    so must the test it names: a moved module or a renamed test shows here with the page and line that
    still name its old place."""
    pattern = re.compile(r"`((?:resnorm|analysis|experiments|hydra_plugins|tests|benchmarks|scripts|conf)"
                         r"/[\w./-]*?(?:\.py|\.yaml|\.sh|/))(?:::(\w+))?`")
    stale = []
    for page in pages():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for path, name in pattern.findall(line):
                where = f"{page.relative_to(ROOT)}:{number}: {path}"
                if not (ROOT / path).exists():
                    stale.append(where)
                elif name and not re.search(rf"^\s*(?:def|class) {name}\b", (ROOT / path).read_text(), re.M):
                    stale.append(f"{where} has no {name}")
    assert not stale, "paths that do not exist (update the page):\n" + "\n".join(stale)


# --- results/ ----------------------------------------------------------------------------------------

def referenced_results() -> Set[Path]:
    """The files under results/ the docs show: every link target there, the files beside a linked one
    that share its name up to the first dot (a figure's ``.csv`` and ``.claims.json``), everything
    under a linked folder, and what a linked report page links in turn."""
    keep: Set[Path] = set()
    todo = [(page, target) for page in pages() for _, target in links(page) if _relative(target)]
    while todo:
        page, target = todo.pop()
        dest = (page.parent / target.partition("#")[0]).resolve()
        if RESULTS.resolve() not in dest.parents or not dest.exists():
            continue
        found = sorted(dest.rglob("*")) if dest.is_dir() else [dest]
        stem = dest.name.split(".")[0]
        found += [] if dest.is_dir() else [f for f in dest.parent.iterdir() if f.name.split(".")[0] == stem]
        for f in found:
            if f.is_file() and f not in keep:
                keep.add(f)
                if f.suffix == ".md":
                    todo += [(f, t) for _, t in links(f) if _relative(t)]
    return keep


def committed_results() -> List[Path]:
    """The files under results/ that git tracks (a sweep run here writes results/<name>/ too, untracked)."""
    proc = subprocess.run(["git", "ls-files", "-z", "results"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout ({proc.stderr.strip()}): cannot tell committed results apart")
    return [(ROOT / name).resolve() for name in proc.stdout.split("\0") if name]


def test_results_hold_only_what_the_docs_show():
    keep = referenced_results()
    stray = sorted(p.relative_to(ROOT.resolve()).as_posix() for p in committed_results() if p not in keep)
    assert not stray, ("results/ holds files no page links to (link them from README.md or a docs/ page, "
                       "or `git rm` them):\n" + "\n".join(stray))
