"""The catalogue of per-layer quantities (resnorm.runs.quantities) against the probes that write them,
the page generated from it (docs/monitors.md) and the runs' layers.parquet."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnorm.config.variants import VARIANTS
from resnorm.runs.quantities import QUANTITIES, SUBLAYERS, monitors_markdown

ROOT = Path(__file__).resolve().parent.parent


def declared_by_probes():
    """{probe class name: the quantity names it can write}, read from the probes' own declarations
    (class tuples, the scheme tables keyed by stream, the learned-scalar registry)."""
    from resnorm.monitors import forward, probes, schemes, weights

    out = {}
    for module in (probes, forward, weights):
        for name, cls in vars(module).items():
            if isinstance(cls, type) and issubclass(cls, probes.Probe) and cls.__module__ == module.__name__:
                names = tuple(cls.quantities_before) + tuple(cls.quantities_after)
                if names:
                    out[name] = set(names)
    out["SchemeForwardProbe"] = {q for qs, _ in schemes.FORWARD.values() for q in qs}
    out["SchemeParamProbe"] = {q for qs, _, _ in schemes.PARAMS.values() for q in qs}
    out["LearnedScalarProbe"] = {s.quantity for s in weights.SCALARS}
    return out


def test_every_quantity_a_probe_writes_is_declared_once_by_that_probe():
    by_probe = declared_by_probes()
    missing = [f"{q} ({probe})" for probe, names in by_probe.items() for q in sorted(names) if q not in QUANTITIES]
    assert not missing, (f"declare {', '.join(missing)} in resnorm/runs/quantities.py (_LIST: name, unit, combine, "
                         "cadence, probe, label, description, sublayers)")
    wrong = [f"{q}: declared for {QUANTITIES[q].probe}, written by {probe}"
             for probe, names in by_probe.items() for q in names if QUANTITIES[q].probe != probe]
    assert not wrong, wrong
    orphans = [q.name for q in QUANTITIES.values() if q.name not in by_probe.get(q.probe, ())]
    assert not orphans, f"declared in resnorm/runs/quantities.py but written by no probe: {orphans}"


def test_every_quantity_has_a_unit_a_label_and_a_description():
    for q in QUANTITIES.values():
        assert q.unit and q.label and q.description and q.where, q.name
        assert "\n" not in q.description, f"{q.name}: the description is one line"


def test_docs_monitors_table_is_the_generated_one():
    """docs/monitors.md's quantity table is generated from the catalogue; regenerate it with
    ``python -m resnorm.runs.quantities docs/monitors.md``."""
    from resnorm.runs.quantities import generated_part

    committed = generated_part((ROOT / "docs" / "monitors.md").read_text())
    assert committed == monitors_markdown(), \
        "docs/monitors.md's quantity table is stale: run `python -m resnorm.runs.quantities docs/monitors.md`"
    for name in QUANTITIES:
        assert f"| `{name}` |" in committed, name


def test_loggers_and_figures_read_the_catalogue():
    from analysis import canvas as plots
    from resnorm.runs.quantities import training_quantities
    from resnorm.train.callbacks import step_scalars

    assert plots.PROFILE_QUANTITIES == training_quantities()
    assert set(plots.PROFILE_QUANTITIES) | set(plots.MONITOR_ORDER) == set(QUANTITIES)

    class Rec:
        loss = lr = grad_norm = tokens_per_s = 1.0
        spike = skipped = scaler_skipped = False
        loss_scale = float("nan")
        val_loss = None
        layer_rows = [(name, [(3, sub) for sub in SUBLAYERS], [0.5] * len(SUBLAYERS)) for name in QUANTITIES]

    scalars = step_scalars(Rec())
    for name in QUANTITIES:
        assert {f"{name}/{sub}/003" for sub in SUBLAYERS} <= set(scalars), name


def test_block_values_combine_as_declared():
    """One block, two sublayers with values 3 and 4: the figure's block value is the declared combination
    (a one-sublayer quantity, NaN on the other row, is that sublayer's value)."""
    import math

    import pandas as pd

    from analysis.figures_layers import block_values

    expect = {"norm": 5.0, "rms": math.sqrt(12.5), "max": 4.0, "mean": 3.5}
    for q in QUANTITIES.values():
        values = {"attn": 3.0, "mlp": 4.0}
        if len(q.sublayers) == 1:
            values = {sub: (v if sub in q.sublayers else math.nan) for sub, v in values.items()}
        layers = pd.DataFrame([dict(run_dir="r", step=0, layer=0, sublayer=sub, quantity=q.name, value=v)
                               for sub, v in values.items()])
        (got,) = block_values(layers, q.name)["value"]
        want = values[q.sublayers[0]] if len(q.sublayers) == 1 else expect[q.combine]
        assert got == pytest.approx(want), q.name


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("norm", sorted(VARIANTS))
def test_runs_write_only_declared_quantities_on_their_sublayers(norm, tmp_path):
    """A real two-step run of every variant, every probe on: each quantity in layers.parquet is
    declared, and finite only on the sublayers the catalogue says it exists for."""
    import numpy as np
    import pandas as pd

    from conftest import TINY, compose
    from resnorm.train.job import JobInfo, train

    cfg = compose(*TINY, "depth=2", f"model.norm={norm}", "train.probe_every=1", "train.steps=2",
                  "train.eval_every=2")
    train(cfg, JobInfo(run_dir=tmp_path, run_name="r", group="t", overrides=[]))
    layers = pd.read_parquet(tmp_path / "layers.parquet")
    undeclared = sorted(set(layers["quantity"]) - set(QUANTITIES))
    assert not undeclared, f"declare {undeclared} in resnorm/runs/quantities.py"
    finite = layers[np.isfinite(layers["value"].astype(float))]
    for name, rows in finite.groupby("quantity"):
        assert set(rows["sublayer"]) <= set(QUANTITIES[name].sublayers), name
