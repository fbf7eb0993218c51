"""The measurements of resnorm.monitors.measure against hand-computed values, and the model options they need."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose
from resnorm.monitors import measure as M
from resnorm.train.preflight import validate
from resnorm.errors import ConfigError
from resnorm.model.transformer import build_model


def small(norm="pre", depth=3, *extra):
    cfg = compose(f"model.norm={norm}", f"depth={depth}", "model.d_model=16", "model.n_heads=2",
                  "train.seq_len=8", *extra)
    torch.manual_seed(0)
    return build_model(cfg)


# --- tensor math ------------------------------------------------------------------------------------

def test_rms_and_variance_by_hand():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert M.rms(x).item() == pytest.approx(math.sqrt(25 / 4))
    assert M.variance(torch.tensor([1.0, 3.0])).item() == pytest.approx(1.0)


def test_branch_ratio_and_update_ratio():
    x = torch.tensor([3.0, 4.0])  # norm 5
    f = torch.tensor([0.0, 1.0])  # norm 1
    assert M.branch_ratio(f, x).item() == pytest.approx(0.2)
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # norm sqrt(2)
    new = old + torch.tensor([[0.0, 0.1], [0.0, 0.0]])
    assert M.update_ratio(new, old).item() == pytest.approx(0.1 / math.sqrt(2))


def test_output_change_is_rms_over_tokens_of_norm_over_sqrt_d():
    a = torch.zeros(1, 2, 4)
    b = torch.zeros(1, 2, 4)
    b[0, 0] = torch.tensor([2.0, 0, 0, 0])  # token 0 moved by 2, token 1 not
    # sqrt(mean_t ||a_t - b_t||^2 / d) = sqrt((4/4 + 0) / 2)
    assert M.output_change(a, b).item() == pytest.approx(math.sqrt(0.5))


def test_token_cosine_orthogonal_identical_and_opposite():
    assert M.token_cosine(torch.eye(3)).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])
    assert M.token_cosine(same).item() == pytest.approx(1.0)
    assert M.token_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() == pytest.approx(-1.0)
    # three tokens: pairs (e1, e1+e2) cos 1/sqrt2, (e1, e2) 0, (e2, e1+e2) 1/sqrt2 -> mean sqrt(2)/3
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert M.token_cosine(x).item() == pytest.approx(math.sqrt(2) / 3)
    # batched: mean over the batch
    assert M.token_cosine(torch.stack([torch.eye(2), torch.ones(2, 2)])).item() == pytest.approx(0.5)


def test_rank1_residual_by_hand():
    rows = torch.tensor([1.0, -2.0, 3.0]).repeat(5, 1)  # identical rows: exactly rank 1 = 1 mu^T
    assert M.rank1_residual(rows).item() == pytest.approx(0.0, abs=1e-7)
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # mean 0: the residual is all of X
    assert M.rank1_residual(x).item() == pytest.approx(1.0)
    x = torch.tensor([[2.0, 1.0], [0.0, 1.0]])  # mean (1, 1): residual [[1,0],[-1,0]], norm sqrt2; ||X|| sqrt6
    assert M.rank1_residual(x).item() == pytest.approx(math.sqrt(2 / 6))


def test_angular_distance_formula():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [2.0, 0.0]])  # 90 degrees (0.5) and 0 degrees (0): mean 0.25
    assert M.angular_distance(a, b).item() == pytest.approx(0.25)
    assert M.angular_distance(a, -a).item() == pytest.approx(1.0)
    c = torch.tensor([[1.0, 1.0]])  # 45 degrees from e1: 1/4
    assert M.angular_distance(torch.tensor([[1.0, 0.0]]), c).item() == pytest.approx(0.25, abs=1e-6)
    assert M.angular_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, math.sqrt(3)]])).item() == \
        pytest.approx(1 / 3, abs=1e-6)


def test_dependency_shares():
    c = [torch.tensor([1.0, -1.0]), torch.tensor([2.0, -2.0]), torch.tensor([0.0, 0.0])]  # var 1, 4, 0
    assert M.dependency(c).tolist() == pytest.approx([0.2, 0.8, 0.0])


# --- model options and trace --------------------------------------------------------------------------

def test_trace_matches_forward_and_has_every_sublayer():
    model = small("pre", 3)
    idx = M.random_tokens(256, 2, 8, seed=1)
    with torch.no_grad():
        tr = model.trace(idx)
        torch.testing.assert_close(tr["hidden"], model.hidden(idx))
    assert len(tr["parts"]) == 6 and tr["kinds"] == ["attn", "mlp"] * 3
    assert len(tr["stream"]) == 4 and tr["max_logit"].shape == (3,)
    p = tr["parts"][0]
    torch.testing.assert_close(p.h, model.blocks[0].attn.pre_norm(p.x))
    torch.testing.assert_close(p.y, p.x + p.f)  # pre-LN: y = x + F(LN(x))
    torch.testing.assert_close(tr["stream"][1], tr["parts"][1].y)


def test_trace_post_ln_parts():
    model = small("post", 2)
    idx = M.random_tokens(256, 2, 8, seed=1)
    with torch.no_grad():
        p = model.trace(idx)["parts"][1]
    torch.testing.assert_close(p.z, p.x + p.f)
    torch.testing.assert_close(p.y, model.blocks[0].mlp.sum_norm(p.z))


def test_max_logit_against_explicit_scores():
    model = small("pre", 1)
    attn = model.blocks[0].attn.branch
    h = torch.randn(2, 8, 16)
    q, k, _ = (z.view(2, 8, 2, 8).transpose(1, 2) for z in attn.qkv(h).split(16, dim=-1))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    mask = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    want = scores.abs()[..., mask].max()
    assert attn.max_logit(h).item() == pytest.approx(want.item(), rel=1e-5)
    attn.causal = False
    assert attn.max_logit(h).item() == pytest.approx(scores.abs().max().item(), rel=1e-5)


def test_qk_norm_normalises_queries_and_keys_per_head():
    model = small("pre", 1, "model.qk_norm=true")
    attn = model.blocks[0].attn.branch
    assert attn.q_norm is not None and attn.q_norm.normalized_shape == (8,)
    q, k, _ = attn._qkv(torch.randn(2, 8, 16) * 50)
    assert q.mean(-1).abs().max().item() < 1e-4 and q.var(-1, unbiased=False).mean().item() == pytest.approx(1, abs=1e-3)
    # logits bounded by sqrt(d_head) = ||LN(q)|| ||LN(k)|| / sqrt(d_head)
    assert attn.max_logit(torch.randn(2, 8, 16) * 100).item() <= math.sqrt(8) + 1e-4
    assert small("pre", 1).blocks[0].attn.branch.q_norm is None


def test_z_loss_adds_c_times_mean_logsumexp_squared():
    plain, zl = small("pre", 2), small("pre", 2, "model.z_loss=0.1")
    zl.load_state_dict(plain.state_dict())
    idx = M.random_tokens(256, 2, 8, seed=3)
    tgt = M.random_tokens(256, 2, 8, seed=4)
    with torch.no_grad():
        logz = torch.logsumexp(plain(idx).reshape(-1, 256), -1)
        assert zl.loss(idx, tgt).item() == pytest.approx(plain.loss(idx, tgt).item() + 0.1 * logz.pow(2).mean().item(),
                                                         rel=1e-6)


@pytest.mark.parametrize("override,key", [("model.z_loss=-1", "model.z_loss")])
def test_new_keys_are_validated(override, key):
    with pytest.raises(ConfigError, match=key):
        validate(compose(override))
    validate(compose("model.qk_norm=true", "model.z_loss=1e-4"))


# --- model-level measurements ---------------------------------------------------------------------------

def test_layer_profile_rows():
    model = small("pre", 3)
    rows = M.layer_profile(model, M.random_tokens(256, 2, 8, seed=1))
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert math.isnan(rows[0]["angular_distance"]) and rows[1]["branch_ratio_attn"] > 0
    assert all(0 <= r["token_cosine"] <= 1 for r in rows)


def test_perturbation_change_restores_the_model_and_is_zero_at_eps_zero():
    model = small("post", 2)
    idx = M.random_tokens(256, 2, 8, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert M.perturbation_change(model, idx, eps=0.0) == 0.0
    assert M.perturbation_change(model, idx, eps=1e-2) > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_model_update_leaves_the_model_alone_and_grows_with_lr():
    model = small("post", 2)
    idx, tgt = M.random_tokens(256, 2, 8, seed=1), M.random_tokens(256, 2, 8, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small_step = M.model_update(model, idx, tgt, lr=1e-5)
    big_step = M.model_update(model, idx, tgt, lr=1e-3)
    assert 0 < small_step < big_step
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_dependency_matrix_rows_sum_to_one_and_match_pre_ln_bookkeeping():
    model = small("pre", 2)
    idx = M.random_tokens(256, 2, 8, seed=1)
    beta = M.dependency_matrix(model, idx)
    assert beta.shape == (4, 5)
    for i in range(4):
        assert beta[i, : i + 2].sum().item() == pytest.approx(1.0, abs=1e-5)
        assert torch.isnan(beta[i, i + 2:]).all()
    with torch.no_grad():
        parts = model.trace(idx)["parts"]
    comps = [parts[0].x] + [p.f for p in parts]  # pre-LN: the stream is the plain sum
    torch.testing.assert_close(beta[3], M.dependency(comps), atol=1e-5, rtol=1e-4)


def test_dependency_matrix_post_ln_and_noresidual():
    idx = M.random_tokens(256, 2, 8, seed=1)
    post = M.dependency_matrix(small("post", 2), idx)
    assert post[0, :2].sum().item() == pytest.approx(1.0, abs=1e-5)
    nores = M.dependency_matrix(small("noresidual", 2), idx)
    assert nores[2].tolist()[:4] == pytest.approx([0.0, 0.0, 0.0, 1.0])


def test_grad_norms_per_layer():
    model = small("pre", 3)
    g = M.grad_norms(model, M.random_tokens(256, 2, 8, 1), M.random_tokens(256, 2, 8, 2))
    assert set(g) == {"fc2", "fc1", "qkv", "out", "attn", "mlp"} and all(len(v) == 3 for v in g.values())
    assert all(v > 0 for v in g["fc2"]) and all(p.grad is None for p in model.parameters())
    assert all(m >= f for m, f in zip(g["mlp"], g["fc2"]))


def test_attention_only_paths():
    model = M.set_causal(small("noresidual", 3), False)
    idx = M.random_tokens(256, 2, 8, seed=1)
    for path in ("san", "san_ln", "skip"):
        assert len(M.attention_only(model, idx, path)) == 4
    with pytest.raises(ValueError):
        M.attention_only(small("post", 1), idx, "san_ln")


def test_periodic_probes_land_in_layers_parquet(tmp_path):
    import pandas as pd

    from conftest import TINY
    from resnorm.train.job import JobInfo, train

    cfg = compose(*TINY, "depth=2", "train.probe_every=4")  # 6 steps: probes at steps 0, 4 and the last (5)
    train(cfg, JobInfo(run_dir=tmp_path, run_name="r", group="t", overrides=[]))
    from resnorm.runs.quantities import QUANTITIES, SUBLAYERS, by_probe

    layers = pd.read_parquet(tmp_path / "layers.parquet")
    activation = by_probe("ActivationProbe")
    probes = layers[layers.quantity.isin(activation)]
    assert set(probes.quantity) == set(activation)
    assert sorted(probes.step.unique()) == [0, 4, 5]
    for q in activation:
        v, only = probes[probes.quantity == q], QUANTITIES[q].sublayers
        if only == SUBLAYERS:
            assert len(v) == 3 * 2 * 2 and (v.value > 0).all(), q
        else:  # max_attn_logit: attention only, NaN on the MLP rows
            assert v[v.sublayer.isin(only)].value.gt(0).all() and v[~v.sublayer.isin(only)].value.isna().all(), q
    off = compose(*TINY, "depth=2", "train.probe_every=0")
    train(off, JobInfo(run_dir=tmp_path / "off", run_name="r", group="t", overrides=[]))
    # log_every, not probe_every: what every variant has under the default optimizer (AdamW)
    every_step = {q.name for q in QUANTITIES.values()
                  if q.cadence == "log_every" and q.where in ("every variant", "`optim=adamw`")}
    assert set(pd.read_parquet(tmp_path / "off" / "layers.parquet").quantity) == every_step


def test_activation_probe_update_ratio_by_hand():
    model = small("pre", 1)
    from resnorm.monitors.probes import ActivationProbe

    probe = ActivationProbe(model, every=1, total_steps=1)
    x = M.random_tokens(256, 2, 8, seed=1)
    before = probe.before_update(x)
    with torch.no_grad():
        for p in model.blocks[0].mlp.parameters():
            if p.dim() == 2:
                p.mul_(1.1)  # every 2-D MLP weight grows by 10%: ||dW|| / ||W|| = 0.1
    after = probe.after_update()
    assert probe.quantities_before == ("act_rms", "branch_ratio", "max_attn_logit")
    assert before.shape == (3, 2) and after.shape == (1, 2)
    assert after[0, 1].item() == pytest.approx(0.1, rel=1e-5) and after[0, 0].item() == 0.0
    assert math.isnan(before[2, 1].item()) and before[2, 0].item() > 0


def test_probe_every_is_validated():
    with pytest.raises(ConfigError, match="train.probe_every"):
        validate(compose("train.probe_every=-1"))


def test_diagnose_cli_depth_sweep(tmp_path):
    import subprocess
    import sys

    import pandas as pd

    from conftest import ROOT

    out = tmp_path / "init.csv"
    proc = subprocess.run([sys.executable, "-m", "resnorm.diagnose", "model.norm=pre,post", "depth=2,4",
                           "model.d_model=16", "train.seq_len=8", "--batch", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "rms_last_over_first" in proc.stdout
    df = pd.read_csv(out)
    assert len(df) == (3 + 5) * 2  # (depth + 1) layers per model, two variants
    assert {"act_rms", "token_cosine", "rank1_residual", "angular_distance", "max_attn_logit", "grad_norm_fc2",
            "output_change"} <= set(df.columns)
    bad = subprocess.run([sys.executable, "-m", "resnorm.diagnose", "model.norm=bogus"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "model.norm='bogus'" in bad.stderr
