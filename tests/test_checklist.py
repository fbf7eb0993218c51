"""The newcomer's checklist, held by one test per kind: for every registered variant, stream, figure,
per-layer quantity and experiment, everything docs/extending.md asks to add exists. A failure names the
exact file and the entry to add, e.g. ``analysis/style.py: add ("subln", "<label>", "#rrggbb") to _TABLE``.

The registries read: ``resnorm.config.variants.VARIANTS`` and ``STREAMS``, ``analysis.plots.FIGURES``,
``resnorm.runs.quantities.QUANTITIES``, ``experiments.REGISTRY``. Other tests hold what each entry does
(tests/test_variants.py the equations, tests/test_quantities.py the probes, tests/test_experiments.py the
claims); this one holds that nothing a reader or a figure needs is missing.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _text(path: str) -> str:
    return (ROOT / path).read_text()


def _docs() -> str:
    """README.md and every page under docs/, as one text."""
    return "\n".join([_text("README.md")] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))])


def _check(missing: List[str]) -> None:
    assert not missing, "the checklist (docs/extending.md) finds missing entries:\n  " + "\n  ".join(missing)


def _variant_bullets() -> set:
    """Names documented as a bullet ``- **name**`` (or ``- **a / b**``) in docs/variants.md."""
    names = set()
    for bold in re.findall(r"^- \*\*([^*]+)\*\*", _text("docs/variants.md"), re.M):
        names |= {part.strip() for part in bold.split("/")}
    return names


def _pinned_equations() -> set:
    """The variants whose forward is held to the paper's equation: tests/test_variants.py's EQUATIONS
    and the NAMES of every tests/test_schemes_*.py file."""
    import test_variants

    pinned = set(test_variants.EQUATIONS)
    for path in sorted((ROOT / "tests").glob("test_schemes_*.py")):
        pinned |= set(getattr(importlib.import_module(path.stem), "NAMES", ()))
    return pinned


def test_every_variant_has_its_colour_docs_row_readme_row_paper_and_equation():
    from analysis import style
    from resnorm.config.variants import VARIANTS

    bullets, pinned, readme = _variant_bullets(), _pinned_equations(), _text("README.md")
    missing = []
    for name, variant in VARIANTS.items():
        if name not in style.KNOWN_VARIANTS:
            missing.append(f'analysis/style.py: add ("{name}", "<display label>", "#rrggbb") to _TABLE '
                           "(a colour no other variant has)")
        if name not in bullets:
            missing.append(f"docs/variants.md: add a bullet '- **{name}**: <equation, init, paper (arXiv id)>' "
                           "under 'The variants' (or the section of its family)")
        if f"| `{name}` |" not in readme:
            missing.append(f"README.md: add the row '| `{name}` | <block> | <init> | <paper> |' to the Variants table")
        if "arXiv" not in variant.citation:
            missing.append(f"resnorm/config/variants.py: register(Variant(name={name!r}, citation=...)) "
                           "must cite the paper with its arXiv id")
        if name not in pinned:
            missing.append(f"tests/test_variants.py: write {name}'s equation in SUBLAYER_EQUATIONS (or "
                           "reference_hidden) and add it to EQUATIONS, or put it in the NAMES of a "
                           "tests/test_schemes_*.py file that holds it to its paper")
    _check(missing)


def test_every_stream_has_its_function_docs_and_a_variant():
    from resnorm.config.variants import STREAMS, VARIANTS
    from resnorm.model.transformer import STREAMS as FUNCTIONS

    page = _text("docs/variants.md")
    section = page[page.index("### Streams"):].split("\n#", 1)[0]  # its "Streams (`Variant.stream`)" section
    used = {v.stream for v in VARIANTS.values()}
    missing = []
    for name in STREAMS:
        if name not in FUNCTIONS:
            missing.append(f"resnorm/model/transformer.py: add {name!r}: <fn(model, x0, parts)> to the STREAMS dict "
                           "(in the order of resnorm.config.variants.STREAMS)")
        if f"`{name}`" not in section:
            missing.append(f"docs/variants.md: describe the stream `{name}` under 'Streams (`Variant.stream`)'")
        if name not in used:
            missing.append(f"resnorm/config/variants.py: register a Variant with stream={name!r} (no variant uses it)")
    missing += [f"resnorm/config/variants.py: add {name!r} to STREAMS (the stream function exists in "
                "resnorm/model/transformer.py)" for name in FUNCTIONS if name not in STREAMS]
    _check(missing)


def test_every_figure_has_its_needs_title_and_docs_row():
    from analysis import plots
    from analysis.report import FIGURE_TITLES

    docs = _docs()
    missing = []
    for name in plots.FIGURES:
        if name not in plots.NEEDS:
            missing.append(f"analysis/plots.py: add {name!r}: (<data it needs: "
                           f"{', '.join(sorted({n for ns in plots.NEEDS.values() for n in ns}))}>) to NEEDS")
        if name not in FIGURE_TITLES:
            missing.append(f"analysis/report.py: add {name!r}: '<section title>' to FIGURE_TITLES")
        if not re.search(rf"^\|\s*\[?`{name}\.png`", docs, re.M):  # a table row, the file name maybe linked
            missing.append(f"README.md (the table of `results/main/` files) or a docs/ page: add the row "
                           f"'| `{name}.png` | <what it shows, what it needs> |'")
    missing += [f"analysis/plots.py: NEEDS has {name!r}, which is not in FIGURES" for name in plots.NEEDS
                if name not in plots.FIGURES]
    _check(missing)


def test_every_quantity_is_written_by_its_probe_and_has_its_docs_row():
    from test_quantities import declared_by_probes

    from resnorm.runs.quantities import QUANTITIES, monitors_markdown

    from resnorm.runs.quantities import generated_part

    written = declared_by_probes()
    page = generated_part(_text("docs/monitors.md"))
    missing = []
    for name, q in QUANTITIES.items():
        if name not in written.get(q.probe, ()):
            missing.append(f"resnorm/monitors/: {q.probe} must write {name!r} (its quantities_before/after, or "
                           "schemes.FORWARD / PARAMS, or weights.register_scalar), or fix its probe= in "
                           "resnorm/runs/quantities.py")
        if f"| `{name}` |" not in page or page != monitors_markdown():
            missing.append(f"docs/monitors.md: regenerate its quantity table for {name!r} "
                           "(`python -m resnorm.runs.quantities docs/monitors.md`)")
    declared = set(QUANTITIES)
    missing += [f"resnorm/runs/quantities.py: declare {name!r} (written by {probe}) in _LIST"
                for probe, names in written.items() for name in sorted(names) if name not in declared]
    _check(missing)


@pytest.mark.parametrize("suffix", ["png", "csv", "claims.json"])
def test_every_experiment_has_its_committed_results(suffix):
    import experiments

    missing = [f"results/papers/{name}.{suffix}: run `python -m experiments run {name}` and commit it"
               for name in experiments.REGISTRY if not (ROOT / "results" / "papers" / f"{name}.{suffix}").exists()]
    _check(missing)


def test_every_experiment_has_its_reference_grids_and_docs_section():
    import experiments

    docs = _docs()
    missing = []
    for name, exp in experiments.REGISTRY.items():
        ref = exp.reference
        if not (ref.title and ref.arxiv and ref.figure):
            missing.append(f"experiments/{name}.py: give Reference(title=..., arxiv=..., figure=...) all three")
        for grid in ("full", "ci"):
            if grid not in exp.grids:
                missing.append(f"experiments/{name}.py: add the {grid!r} grid to grids=")
        if f"### `{name}`" not in docs:
            missing.append(f"README.md's 'Reproduced figures' (or its docs/ page): add a section '### `{name}`: "
                           "<what it measures>' with the figure and its claims (`python -m experiments markdown`)")
    _check(missing)


# --- the checklist itself: a newcomer's entry that lacks everything gets every file named ------------------


def _failure(check) -> str:
    with pytest.raises(AssertionError) as err:
        check()
    return str(err.value)


def test_a_new_variant_without_anything_gets_every_file_named(monkeypatch):
    import dataclasses

    from resnorm.config import variants

    toy = dataclasses.replace(variants.VARIANTS["pre"], name="toy_subln", citation="a blog post")
    monkeypatch.setitem(variants.VARIANTS, "toy_subln", toy)
    text = _failure(test_every_variant_has_its_colour_docs_row_readme_row_paper_and_equation)
    for where in ('analysis/style.py: add ("toy_subln"', "docs/variants.md: add a bullet '- **toy_subln**",
                  "README.md: add the row '| `toy_subln` |", "name='toy_subln', citation=",
                  "tests/test_variants.py: write toy_subln's equation"):
        assert where in text, where


def test_a_new_figure_and_a_new_quantity_get_every_file_named(monkeypatch):
    from analysis import plots
    from resnorm.monitors.weights import ParamNormProbe

    monkeypatch.setitem(plots.FIGURES, "toy_figure", lambda sweep, path: None)
    text = _failure(test_every_figure_has_its_needs_title_and_docs_row)
    for where in ("analysis/plots.py: add 'toy_figure'", "analysis/report.py: add 'toy_figure'",
                  "'| `toy_figure.png` |"):
        assert where in text, where
    monkeypatch.setattr(ParamNormProbe, "quantities_before", ("param_norm", "toy_quantity"))
    text = _failure(test_every_quantity_is_written_by_its_probe_and_has_its_docs_row)
    assert "resnorm/runs/quantities.py: declare 'toy_quantity' (written by ParamNormProbe)" in text
