"""Variant options and overrides at the config edge; the README's variants table; every preset from the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, compose, run_cli
from resnorm.train.preflight import validate
from resnorm.errors import ConfigError
from resnorm.config.variants import NORM_LAYERS, VARIANTS, VariantOptions

NO_ANALYSIS = "~hydra.callbacks.analysis"


@pytest.mark.parametrize("overrides,key,hint", [
    (["model.mixln_fraction=1.5"], "model.mixln_fraction", "must lie in [0, 1]"),
    (["model.mixln_fraction=-0.1"], "model.mixln_fraction", "must lie in [0, 1]"),
    (["model.dyt_alpha0=0"], "model.dyt_alpha0", "positive number"),
    (["model.resi_dual_scale=0"], "model.resi_dual_scale", "must lie in (0, 1]"),
    (["model.resi_dual_scale=2"], "model.resi_dual_scale", "must lie in (0, 1]"),
    (["model.admin_mode=adaptive"], "model.admin_mode", "profile, closed_form"),
    (["model.depth_scale_a=-1"], "model.depth_scale_a", "positive number"),
    (["model.norm_layer=groupnorm"], "model.norm_layer", "layernorm, rmsnorm, scalenorm, dyt"),
    (["model.norm=rezero", "model.norm_layer=dyt"], "model.norm_layer", "model.norm=rezero has no norm to replace"),
    (["model.norm=rezero", "model.norm_layer=layernorm"], "model.norm_layer", "leave model.norm_layer unset"),
])
def test_bad_variant_options_are_one_line_errors(overrides, key, hint):
    with pytest.raises(ConfigError) as err:
        validate(compose(*overrides))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{key}=") and hint in message
    assert overrides[-1].split("=", 1)[1] in message


@pytest.mark.parametrize("norm", sorted(VARIANTS))
def test_every_norm_layer_fits_every_variant_with_norms(norm):
    for layer in NORM_LAYERS:
        overrides = [f"model.norm={norm}", f"model.norm_layer={layer}"]
        if VARIANTS[norm].has_norm:
            validate(compose(*overrides))
        else:
            with pytest.raises(ConfigError):
                validate(compose(*overrides))


def test_variant_options_are_typed_config_keys_with_the_papers_defaults():
    cfg = compose()
    opts = VariantOptions.from_config(cfg.model)
    assert opts == VariantOptions(mixln_fraction=0.25, dyt_alpha0=0.5, resi_dual_scale=1.0,
                                  admin_mode="profile", depth_scale_a=1.0, b2t_rescale_init=False)
    cfg = compose("model.mixln_fraction=0.5", "model.dyt_alpha0=1.0", "model.admin_mode=closed_form",
                  "model.b2t_rescale_init=true")
    assert VariantOptions.from_config(cfg.model) == VariantOptions(
        mixln_fraction=0.5, dyt_alpha0=1.0, admin_mode="closed_form", b2t_rescale_init=True)
    # a stored config written before the options existed still validates and gets the defaults
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(compose(), resolve=True)
    for key in ("mixln_fraction", "dyt_alpha0", "resi_dual_scale", "admin_mode", "depth_scale_a", "b2t_rescale_init"):
        del old["model"][key]
    validate(old)
    assert VariantOptions.from_config(old["model"]) == VariantOptions()


def test_a_typo_in_an_option_value_type_is_rejected_by_the_schema():
    with pytest.raises(Exception, match="mixln_fraction"):
        compose("model.mixln_fraction=quarter")


def test_variants_and_config_import_no_torch():
    code = ("import sys; import resnorm.config.schema, resnorm.config.variants; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_every_variant_cites_its_paper():
    for v in VARIANTS.values():
        assert re.search(r"arXiv:\d{4}\.\d{5}", v.citation), v.name
        assert v.title and v.equation and v.init, v.name


def _readme_rows():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Variants", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([a-z0-9_]+)`\s*\|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def test_readme_variants_table_lists_every_variant_with_its_paper():
    rows = _readme_rows()
    assert set(rows) == set(VARIANTS), f"README ## Variants: add {set(VARIANTS) - set(rows)}"
    for name, v in VARIANTS.items():
        for arxiv in re.findall(r"\d{4}\.\d{5}", v.citation):
            assert arxiv in rows[name], f"README row of {name} lacks arXiv {arxiv}"


@pytest.mark.slow
def test_every_preset_runs_from_the_command_line(tmp_path):
    presets = ",".join(VARIANTS)
    proc = run_cli("-m", f"model.norm={presets}", "depth=2", "train.steps=4", "train.eval_every=2",
                   "train.eval_batches=1", "train.batch_size=4", "train.seq_len=16", "model.d_model=16",
                   "data=synthetic", "data.synthetic_tokens=4000", "logger.mode=disabled", "train.progress=false",
                   "train.threads=1", "name=allvariants", NO_ANALYSIS, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "multirun" / "allvariants").rglob("summary.json")]
    assert sorted(s["variant"] for s in summaries) == sorted(VARIANTS)
    assert {s["status"] for s in summaries} == {"completed"}, [(s["variant"], s["error"]) for s in summaries]
    admin = next(s for s in summaries if s["variant"] == "admin")
    assert admin["config"]["model"]["admin_mode"] == "profile"
    assert admin["config"]["model"]["mixln_fraction"] == 0.25  # every option is recorded in the run's config
