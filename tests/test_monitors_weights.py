"""Weight/optimizer-side monitors (resnorm.monitors.weights) and the cost functions
(resnorm.monitors.cost), each against a value computed by hand on a tiny model."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from conftest import TINY, compose
from resnorm.train.loop import make_optimizer
from resnorm.model.blocks import ModelShape
from resnorm.model.transformer import build_model
from resnorm.monitors import cost
from resnorm.monitors.weights import (LearnedScalarProbe, OptimizerStateProbe, ParamNormProbe, UpdateProbe,
                                      weight_probes)


def _tiny(*overrides):
    cfg = compose(*TINY, "depth=2", "train.threads=1", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    return cfg, model, make_optimizer(model, cfg.optim)


def _backward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(0, 64, (4, 16), generator=g) for _ in range(2))
    loss = model.loss(x, y)
    loss.backward()
    return x, loss


def _cat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _subs(model):
    return [(i, name, getattr(b, name)) for i, b in enumerate(model.blocks) for name in ("attn", "mlp")]


def test_adam_moment_norms_are_the_norms_of_the_optimizer_state():
    cfg, model, opt = _tiny()
    probe = OptimizerStateProbe(model, opt, every=1)
    assert probe.quantities_after == ("adam_m_norm", "adam_v_norm") and probe.labels[:2] == [(0, "attn"), (0, "mlp")]
    assert torch.isnan(probe.after_update()).all()  # no state before the first step
    for step in range(2):
        _backward(model, step)
        opt.step()
        opt.zero_grad()
    got = probe.after_update()
    for j, (_, _, sub) in enumerate(_subs(model)):
        ps = list(sub.parameters())
        m = _cat([opt.state[p]["exp_avg"] for p in ps]).norm()
        v = _cat([opt.state[p]["exp_avg_sq"] for p in ps]).norm()
        assert got[0, j].item() == pytest.approx(m.item(), rel=1e-5)
        assert got[1, j].item() == pytest.approx(v.item(), rel=1e-5)


def test_update_norm_and_cosine_with_the_raw_gradient():
    cfg, model, opt = _tiny()
    probe = UpdateProbe(model, every=5)
    assert probe.due(0, False) and probe.due(5, False) and not probe.due(3, False) and probe.due(3, True)
    x, _ = _backward(model)
    subs = [list(sub.parameters()) for _, _, sub in _subs(model)]
    before = [_cat(ps).clone() for ps in subs]
    grads = [_cat([p.grad for p in ps]).clone() for ps in subs]
    assert probe.before_update(x).shape == (0, 4)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # clipping must not change what is read
    opt.step()
    got = probe.after_update()
    for j, ps in enumerate(subs):
        delta = _cat(ps) - before[j]
        cos = (delta @ grads[j]) / (delta.norm() * grads[j].norm())
        assert got[0, j].item() == pytest.approx(delta.norm().item(), rel=1e-5)
        assert got[1, j].item() == pytest.approx(cos.item(), rel=1e-4)
        assert got[1, j].item() < 0  # the update goes against the gradient


def test_param_norm_by_hand():
    cfg, model, opt = _tiny()
    got = ParamNormProbe(model, every=2).before_update()
    want = [_cat(list(sub.parameters())).norm().item() for _, _, sub in _subs(model)]
    assert got.shape == (1, 4) and got[0].tolist() == pytest.approx(want, rel=1e-6)


def test_rezero_alpha_is_the_gate_shared_by_the_block():
    cfg, model, opt = _tiny("model.norm=rezero")
    with torch.no_grad():
        model.blocks[0].attn.gate.fill_(0.25)
        model.blocks[1].attn.gate.fill_(-0.5)
    probe = LearnedScalarProbe(model, every=1)
    assert probe.quantities_before == ("rezero_alpha",)
    assert probe.before_update().tolist() == [[0.25, 0.25, -0.5, -0.5]]
    # the shared gate is one parameter of the MLP group (as in GradNormProbe)
    index = ParamNormProbe(model, 1).index.tolist()
    assert index.count(0) == len(list(model.blocks[0].attn.branch.parameters()))
    assert index.count(1) == len(list(model.blocks[0].mlp.branch.parameters())) + 1


def test_admin_omega_mean_min_max():
    cfg, model, opt = _tiny("model.norm=admin", "model.admin_mode=closed_form")
    with torch.no_grad():
        model.blocks[1].mlp.omega.copy_(torch.arange(16.0))
    probe = LearnedScalarProbe(model, every=1)
    assert probe.quantities_before == ("admin_omega_mean", "admin_omega_min", "admin_omega_max")
    got = probe.before_update()
    assert got[:, 3].tolist() == [7.5, 0.0, 15.0]
    first = model.blocks[0].attn.omega[0].item()  # closed form: sqrt(1) everywhere
    assert got[:, 0].tolist() == pytest.approx([first] * 3)


def test_dyt_alpha_is_the_mean_over_the_sublayer_norms():
    cfg, model, opt = _tiny("model.norm=sandwich", "model.norm_layer=dyt")
    with torch.no_grad():
        model.blocks[0].attn.pre_norm.alpha.fill_(0.25)
        model.blocks[0].attn.out_norm.alpha.fill_(0.75)
    probe = LearnedScalarProbe(model, every=3)
    assert probe.quantities_before == ("dyt_alpha",) and probe.due(3, False) and not probe.due(1, True)
    assert probe.before_update().tolist() == [[0.5, 0.5, 0.5, 0.5]]  # alpha0 = 0.5 elsewhere


def test_the_builder_gives_only_the_probes_that_apply():
    cfg, model, opt = _tiny()
    kinds = [type(p).__name__ for p in weight_probes(model, opt, cfg.train)]
    assert kinds == ["ParamNormProbe", "OptimizerStateProbe", "UpdateProbe"]  # no learned scalars in pre
    cfg, model, opt = _tiny("model.norm=rezero", "train.probe_every=0")
    kinds = [type(p).__name__ for p in weight_probes(model, opt, cfg.train)]
    assert kinds == ["ParamNormProbe", "OptimizerStateProbe", "LearnedScalarProbe"]
    cfg, model, opt = _tiny("train.probes=false")
    assert weight_probes(model, opt, cfg.train) == []


def test_flops_per_token_on_a_known_shape():
    cfg = compose(*TINY, "depth=2")
    shape = ModelShape.from_config(cfg)
    d, f, L, V, T = 16, 64, 2, 256, 16
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d  # qkv, out, fc1, fc2, 2 LNs
    n = L * block + 2 * d + d * V  # final LN, head
    assert cost.matmul_params(shape) == n
    assert cost.flops_per_token(shape) == 6 * n + 12 * L * d * T
    assert cost.mfu(1000.0, 6e5, 1e9) == pytest.approx(0.6) and cost.mfu(1000.0, 6e5, 1e9, world=2) == pytest.approx(0.3)
    assert math.isnan(cost.mfu(None, 6e5, 1e9)) and math.isnan(cost.mfu(1.0, 1.0, math.nan))


@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "tf32", 378.0), ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156.0), ("NVIDIA A10", "bf16", 125.0), ("NVIDIA L4", "fp32", 30.3),
    ("Tesla V100-SXM2-16GB", "fp32", 15.7), ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("NVIDIA H100 80GB HBM3", "fp16", 989.4), ("Tesla V100-SXM2-16GB", "fp16", 125.0),  # train.precision=fp16
])
def test_gpu_peak_table(name, precision, tflops):
    flops, source = cost.gpu_peak_flops(name, precision)
    assert flops == pytest.approx(tflops * 1e12) and "NVIDIA" in source
    assert math.isnan(cost.gpu_peak_flops("NVIDIA L40S", "bf16")[0])


def test_cpu_peak_is_measured_once_and_memory_is_positive():
    flops, source = cost.device_peak_flops("cpu", "fp32")
    assert math.isfinite(flops) and flops > 0 and source.startswith("measured")
    assert cost.cpu_peak_flops() == (flops, source)  # cached
    assert cost.peak_memory_bytes("cpu") > 10 * 2 ** 20
    s = cost.cost_summary(ModelShape.from_config(compose(*TINY)), 1e4, "cpu")
    assert set(s) == {"flops_per_token", "peak_flops", "peak_flops_source", "mfu", "peak_memory_bytes"}
    assert 0 < s["mfu"] < 1


def _train_by_hand(with_probes: bool, steps: int = 4):
    cfg, model, opt = _tiny("train.probe_every=1", "optim.grad_clip=0.5")
    probes = weight_probes(model, opt, cfg.train) if with_probes else []
    losses, rows = [], 0
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        x, loss = _backward(model, step)
        due = [p for p in probes if p.due(step, step + 1 == steps)]
        before = [p.before_update(x) for p in due]
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        after = [p.after_update() for p in due]
        rows += sum(t.numel() for t in before + after if t is not None)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()], rows


def test_the_probes_do_not_change_training():
    plain, w_plain, _ = _train_by_hand(False)
    probed, w_probed, rows = _train_by_hand(True)
    assert plain == probed and all(torch.equal(a, b) for a, b in zip(w_plain, w_probed))
    assert rows == 4 * 4 * 5  # 4 steps x 4 sublayers x (param, m, v, update, cos)


def test_rows_reach_the_run_folder_through_probe_callbacks(tmp_path):
    from resnorm.train.job import JobInfo, train

    cfg = compose(*TINY, "depth=1", "train.steps=3", "train.probe_every=2", "model.norm=rezero", "train.threads=1")
    train(cfg, JobInfo(tmp_path, "r", "g", []))  # the default callbacks include these probes
    t = pd.read_parquet(tmp_path / "layers.parquet")
    steps = t.groupby("quantity").step.apply(lambda s: sorted(set(s))).to_dict()
    for q in ("param_norm", "adam_m_norm", "adam_v_norm", "rezero_alpha"):
        assert steps[q] == [0, 1, 2]
    assert steps["update_norm"] == steps["update_grad_cos"] == [0, 2]
    assert t[t.quantity == "adam_v_norm"].value.notna().all()


def test_the_cuda_branch_reads_the_table_by_device_name(monkeypatch):
    """No GPU here: the device name and the allocator's peak are stand-ins."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 123)
    was = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert cost.device_peak_flops("cuda:0", "fp32")[0] == pytest.approx(66.9e12)
        assert cost.device_peak_flops("cuda:0", "bf16")[0] == pytest.approx(989.4e12)
        torch.backends.cuda.matmul.allow_tf32 = True
        flops, source = cost.device_peak_flops("cuda:0", "fp32")
        assert flops == pytest.approx(494.7e12) and "tf32" in source
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was
    assert cost.peak_memory_bytes("cuda:0") == 123
