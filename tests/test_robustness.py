"""The public API used as a demanding user would: autocast, NaN and Inf, ids of any width, second
derivatives, torch.func, a mismatched ``routing=``, inference mode, and config changes. Each case
was a crash or a silently wrong result before it had a test here."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import vmoe
from vmoe import MoEConfig, MoEMLP, reference
from vmoe import library as ops
from vmoe.config import ACTIVATIONS
from vmoe.ops.routing import build_routing
from vmoe.testing import DEVICE, assert_close, make_inputs, tolerance

WIDTHS = (7, 16, 1, 20)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(fn, leaves, dy):
    y = fn(*leaves)
    return (y, *torch.autograd.grad(y, leaves, dy))


# Autocast ---------------------------------------------------------------------------------------

def test_layer_under_autocast_follows_nn_linear():
    """Activations in the autocast dtype, float32 parameters: the layer runs, its output is in the
    autocast dtype, its parameters' gradients are float32, and its aux losses stay float32."""
    cfg = MoEConfig(n_embd=16, expert_sizes=[(2, 16), (2, 7)], num_active_experts=2,
                    activation="swiglu", router="softmax")
    moe = MoEMLP(cfg).to(DEVICE)
    x = torch.randn(12, 16, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, aux, _ = moe(x)
        loss = out.float().square().sum() + sum(aux.values())
    assert out.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in aux.values())
    loss.backward()
    got = {n: p.grad.clone() for n, p in moe.named_parameters()}
    assert all(g.dtype == torch.float32 for g in got.values())
    moe.zero_grad()
    ref_out, ref_aux, _ = moe(x)  # float32, no autocast: the same routing up to bf16 rounding
    (ref_out.square().sum() + sum(ref_aux.values())).backward()
    assert_close("out", out.float(), ref_out.detach(), torch.bfloat16)
    for n, p in moe.named_parameters():
        assert_close(f"grad {n}", got[n], p.grad, torch.bfloat16)


def test_expert_mlp_under_autocast():
    x, ids, w, w1, w2 = make_inputs(10, 12, WIDTHS, 2, "relu2", torch.float32, DEVICE)
    leaves = _leaves(x, w, w1, w2)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = vmoe.expert_mlp(leaves[0], ids, *leaves[1:], WIDTHS)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(x)
    grads = torch.autograd.grad(y, leaves, dy.bfloat16())
    assert all(g.dtype == torch.float32 for g in grads)
    ref = _grads(lambda *a: reference.expert_mlp(a[0], ids, *a[1:], WIDTHS),
                 _leaves(*(t.double() for t in (x, w, w1, w2))), dy.double())
    for name, a, b in zip(("y", "dx", "dw", "dw1", "dw2"), (y, *grads), ref):
        assert_close(name, a.detach(), b.detach(), torch.bfloat16)


# NaN and Inf ------------------------------------------------------------------------------------

def _nonfinite_rows(t):
    return (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1)


@pytest.mark.parametrize("where", ["x-nan", "x-inf", "w1-nan"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_and_inf_propagate_like_the_reference(activation, where):
    """A NaN or Inf in the inputs reaches the same output rows and gradient entries as in the
    reference; the finite rest agrees. A diverging run must show its NaN."""
    x, ids, w, w1, w2 = make_inputs(10, 12, WIDTHS, 2, activation, torch.float32, DEVICE)
    if where == "x-nan":
        x[3, 5] = float("nan")
    elif where == "x-inf":
        x[3, 5] = float("inf")
    else:
        w1[:, 7] = float("nan")  # expert 1's first column (the gate, for swiglu)
    dy = torch.randn_like(x)
    got = _grads(lambda *a: vmoe.expert_mlp(a[0], ids, *a[1:], WIDTHS, activation),
                 _leaves(x, w, w1, w2), dy)
    ref = _grads(lambda *a: reference.expert_mlp(a[0], ids, *a[1:], WIDTHS, activation),
                 _leaves(x, w, w1, w2), dy)
    assert _nonfinite_rows(ref[0]).any(), "the case must make some output row non-finite"
    for name, a, b in zip(("y", "dx", "dw", "dw1", "dw2"), got, ref):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN in different places"
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{name}: Inf in different places"
        finite = torch.isfinite(b)
        assert_close(name, a[finite], b[finite], torch.float32)


# Expert ids of any width ------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", [2**31, 2**31 + 1, 2**32, 2**32 + 1, 2**40 + 2, -1, -(2**32) + 1],
                         ids=lambda v: f"id{v}")
def test_out_of_range_ids_are_dropped_whatever_their_width(bad_id):
    """An id outside [0, E) contributes nothing, also when narrowing it to int32 would land in
    range (2**32 + 1 -> 1)."""
    x, ids, w, w1, w2 = make_inputs(9, 12, WIDTHS, 2, "relu2", torch.float32, DEVICE)
    ids[2, 0] = bad_id
    ids[5, 1] = bad_id
    r = build_routing(ids, WIDTHS)
    assert int(r.offsets[-1]) == ids.numel() - 2
    y = vmoe.expert_mlp(x, ids, w, w1, w2, WIDTHS)
    ref = reference.expert_mlp(x.double(), ids, w.double(), w1.double(), w2.double(), WIDTHS)
    assert_close("y", y, ref, torch.float32)


def test_out_of_range_ids_raise_under_check(monkeypatch):
    monkeypatch.setenv("VMOE_CHECK", "1")
    x, ids, w, w1, w2 = make_inputs(4, 8, WIDTHS, 2, "relu2", torch.float32, DEVICE)
    ids[1, 1] = 2**32 + 1
    with pytest.raises(ValueError, match="outside"):
        vmoe.expert_mlp(x, ids, w, w1, w2, WIDTHS)


# Second derivatives and torch.func ----------------------------------------------------------------

def test_double_backward_raises():
    x, ids, w, w1, w2 = make_inputs(6, 8, WIDTHS, 2, "silu", torch.float32, DEVICE)
    leaves = _leaves(x, w, w1, w2)
    y = vmoe.expert_mlp(leaves[0], ids, *leaves[1:], WIDTHS, "silu")
    gx, = torch.autograd.grad(y.square().sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.square().sum().backward()


@pytest.mark.parametrize("target", ["weights", "backward"])
def test_gradient_penalty_with_a_constant_incoming_gradient_raises(target):
    """``autograd.grad(y.sum(), x, create_graph=True)``: the incoming gradient is a constant, so
    ``once_differentiable`` alone would hand back a graph-less dx and the penalty would silently add
    nothing to the weights' gradients."""
    x, ids, w, w1, w2 = make_inputs(6, 8, WIDTHS, 2, "silu", torch.float32, DEVICE)
    leaves = _leaves(x, w, w1, w2)
    y = vmoe.expert_mlp(leaves[0], ids, *leaves[1:], WIDTHS, "silu")
    gx, = torch.autograd.grad(y.sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice.*impl='reference'"):
        if target == "weights":
            torch.autograd.grad(gx.square().sum(), leaves[2])
        else:
            gx.square().sum().backward()


def test_gradient_penalty_through_the_layer_raises():
    moe = MoEMLP(MoEConfig(n_embd=16, expert_sizes=[(2, 16), (2, 7)], num_active_experts=2)).to(DEVICE)
    x = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    out, _, _ = moe(x)
    gx, = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.square().sum().backward()


def test_gradient_penalty_on_the_reference_path_differentiates_twice():
    """The loop is plain torch: the penalty reaches the weights, as a float64 finite difference says."""
    x, ids, w, w1, w2 = make_inputs(5, 6, (3, 4), 2, "silu", torch.float64, DEVICE)
    w1 = w1.detach().requires_grad_()

    def penalty(w1_):
        xl = x.detach().requires_grad_()
        y = vmoe.expert_mlp(xl, ids, w, w1_, w2, (3, 4), "silu", impl="reference")
        gx, = torch.autograd.grad(y.sum(), xl, create_graph=True)
        return gx.square().sum()

    grad, = torch.autograd.grad(penalty(w1), w1)
    assert grad.abs().sum() > 0
    assert torch.autograd.gradcheck(penalty, (w1,))


def test_func_grad_matches_autograd_and_leaves_no_state():
    x, ids, w, w1, w2 = make_inputs(6, 8, WIDTHS, 2, "swiglu", torch.float32, DEVICE)
    got = torch.func.grad(lambda a: vmoe.expert_mlp(a, ids, w, w1, w2, WIDTHS, "swiglu").sum())(x)
    leaf = x.clone().requires_grad_()
    want, = torch.autograd.grad(vmoe.expert_mlp(leaf, ids, w, w1, w2, WIDTHS, "swiglu").sum(), leaf)
    assert_close("func.grad", got, want, torch.float32)
    # A new width list, first seen under the transform, must not leave a wrapped tensor in the
    # device cache for the plain call after it.
    widths = (5, 3)
    xs, ids2, w_, w1_, w2_ = make_inputs(4, 8, widths, 1, "relu2", torch.float32, DEVICE)
    torch.func.grad(lambda a: vmoe.expert_mlp(a, ids2, w_, w1_, w2_, widths).sum())(xs)
    y = vmoe.expert_mlp(xs, ids2, w_, w1_, w2_, widths)
    assert_close("after func.grad", y, reference.expert_mlp(xs, ids2, w_, w1_, w2_, widths),
                 torch.float32)


def test_vmap_raises_clearly_and_leaves_no_state():
    x, ids, w, w1, w2 = make_inputs(6, 8, WIDTHS, 2, "relu2", torch.float32, DEVICE)
    with pytest.raises(RuntimeError, match="vmap"):
        torch.vmap(lambda a: vmoe.expert_mlp(a, ids, w, w1, w2, WIDTHS))(x[None].expand(2, -1, -1))
    y = vmoe.expert_mlp(x, ids, w, w1, w2, WIDTHS)
    assert_close("after vmap", y, reference.expert_mlp(x, ids, w, w1, w2, WIDTHS), torch.float32)


# A routing built for something else ---------------------------------------------------------------

@pytest.mark.parametrize("case", ["fewer-tokens", "other-k", "other-widths"])
def test_mismatched_routing_is_rejected(case):
    x, ids, w, w1, w2 = make_inputs(24, 8, WIDTHS, 2, "relu2", torch.float32, DEVICE)
    if case == "fewer-tokens":
        routing, match = build_routing(ids[:5], WIDTHS), r"\[5, 2\].*\[24, 2\]"
    elif case == "other-k":
        routing, match = build_routing(ids[:, :1], WIDTHS), r"\[24, 1\].*\[24, 2\]"
    else:
        routing, match = build_routing(ids, (7, 16, 21)), "expert_widths"
    with pytest.raises(ValueError, match=match):
        vmoe.expert_mlp(x, ids, w, w1, w2, WIDTHS, routing=routing)


def test_routing_of_the_wrong_type_is_rejected():
    x, ids, w, w1, w2 = make_inputs(4, 8, WIDTHS, 2, "relu2", torch.float32, DEVICE)
    with pytest.raises(TypeError, match="routing"):
        vmoe.expert_mlp(x, ids, w, w1, w2, WIDTHS, routing=ops.routing(ids, WIDTHS))


# All ids dropped: the reference path keeps the graph ---------------------------------------------

@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_all_ids_dropped_gives_connected_zeros(impl):
    x, ids, w, w1, w2 = make_inputs(5, 8, WIDTHS, 2, "gelu", torch.float32, DEVICE)
    ids.fill_(len(WIDTHS) + 3)
    x[0, 0] = float("nan")  # dropped everywhere, so it must not leak into the output
    leaves = _leaves(x, w, w1, w2)
    y = vmoe.expert_mlp(leaves[0], ids, *leaves[1:], WIDTHS, "gelu", impl=impl)
    assert y.requires_grad
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    for t in leaves:
        assert torch.equal(t.grad, torch.zeros_like(t))


# Inference keeps no training buffers ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "no_grad", "inference_mode"])
def test_inference_saves_nothing_for_backward(mode, monkeypatch):
    saved = []
    up_proj = ops.up_proj

    def spy(*args, save_z, **kwargs):
        saved.append(save_z)
        return up_proj(*args, save_z=save_z, **kwargs)

    monkeypatch.setattr(ops, "up_proj", spy)
    moe = MoEMLP(MoEConfig(n_embd=8, expert_sizes=[(2, 8)], num_active_experts=1)).to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE)
    context = {"train": torch.enable_grad, "no_grad": torch.no_grad,
               "inference_mode": torch.inference_mode}[mode]
    with context():
        moe(x)
    assert saved == [mode == "train"]


# Dtypes: widths survive casts, aux losses stay float32, a wrong input dtype names both -----------

def test_widths_survive_a_round_trip_through_bfloat16():
    """257 is not a bfloat16: a float buffer of the widths would come back as 256 and skew
    compute_loss on the torch path."""
    cfg = MoEConfig(n_embd=16, expert_sizes=[(2, 257), (2, 7)], num_active_experts=2, impl="reference")
    moe = MoEMLP(cfg).to(torch.bfloat16).to(torch.float32)
    x = torch.randn(12, 16)
    _, aux, _ = moe(x)
    logits = moe.router(x).double()
    probs = torch.softmax(logits, -1) if cfg.router == "softmax" else torch.sigmoid(logits)
    widths = torch.tensor(cfg.expert_widths, dtype=torch.float64)
    expected = ((probs * widths).sum(-1).mean() / widths.mean()).item()
    err = abs(aux["compute_loss"].item() - expected) / expected
    assert err < 1e-6, f"compute_loss rel err {err:.2e} after a bfloat16 round trip"


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_aux_losses_under_autocast_are_float32_accurate(impl):
    cfg = MoEConfig(n_embd=16, expert_sizes=[(3, 257), (2, 7)], num_active_experts=2, impl=impl)
    moe = MoEMLP(cfg).to(DEVICE)
    x = torch.randn(64, 16, device=DEVICE)
    _, aux32, _ = moe(x)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        _, aux, _ = moe(x)
    for name, value in aux.items():
        assert value.dtype == torch.float32, name
    # The router's logits come from a bf16 matmul under autocast: compare against the float64
    # losses of those logits, not of the float32 ones.
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        logits = moe.router(x).double()
    probs = torch.softmax(logits, -1) if cfg.router == "softmax" else torch.sigmoid(logits)
    widths = torch.tensor(cfg.expert_widths, dtype=torch.float64, device=DEVICE)
    expected = ((probs * widths).sum(-1).mean() / widths.mean()).item()
    err = abs(aux["compute_loss"].item() - expected) / expected
    assert err < 1e-5, f"compute_loss rel err {err:.2e} under autocast ({impl})"
    assert aux32["compute_loss"].dtype == torch.float32


def test_float64_input_to_a_float32_layer_names_both_dtypes():
    moe = MoEMLP(MoEConfig(n_embd=16, expert_sizes=[(2, 16)], num_active_experts=1)).to(DEVICE)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64.*parameters are torch.float32"):
        moe(torch.randn(4, 16, device=DEVICE, dtype=torch.float64))


def test_reference_path_on_a_cpu_without_the_interpreter_warns_once(monkeypatch):
    import vmoe.layer
    import vmoe.ops.utils.device

    monkeypatch.setattr(vmoe.ops.utils.device, "_INTERPRETING", False)
    monkeypatch.setattr(vmoe.layer, "_warned_reference_on_cpu", False)
    moe = MoEMLP(MoEConfig(n_embd=16, expert_sizes=[(2, 16)], num_active_experts=1))
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match="TRITON_INTERPRET=1"):
        moe(x)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moe(x)  # once only
        MoEMLP(MoEConfig(n_embd=16, expert_sizes=[(2, 16)], num_active_experts=1, impl="reference"))(x)


# torch.compile on the torch path --------------------------------------------------------------------

@pytest.mark.parametrize("sizes,shared", [([(2, 8), (2, 4)], 0), ([(2, 8), (1, 0)], 4)],
                         ids=["routed", "null-shared"])
def test_reference_path_compiles_fullgraph(sizes, shared):
    """The loop's expert sizes depend on the data; under compile it takes a masked form instead, so
    ``torch.compile(fullgraph=True)`` works and gives the eager loop's output and gradients."""
    cfg = MoEConfig(n_embd=16, expert_sizes=sizes, num_active_experts=2, impl="reference",
                    shared_expert_width=shared)
    moe = MoEMLP(cfg)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    x = torch.randn(10, 16)
    results = []
    for layer in (moe, compiled):
        moe.zero_grad()
        xl = x.clone().requires_grad_()
        out, aux, _ = layer(xl)
        (out.square().sum() + sum(aux.values())).backward()
        results.append((out, xl.grad, *(p.grad.clone() for p in (moe.w1, moe.w2, moe.router.weight))))
    for name, a, b in zip(["out", "dx", "dw1", "dw2", "drouter"], *results):
        assert_close(name, b, a, torch.float32)


# Config ---------------------------------------------------------------------------------------------

def test_config_checks_norm_topk_prob():
    with pytest.raises(TypeError, match="norm_topk_prob"):
        MoEConfig(norm_topk_prob="no")


def test_config_is_frozen_and_replace_revalidates():
    cfg = MoEConfig(n_embd=8, expert_sizes=[(2, 8)], num_active_experts=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.expert_sizes = [(2, 0)]
    with pytest.raises(ValueError, match="width"):
        dataclasses.replace(cfg, expert_sizes=[(2, 0)])
    assert dataclasses.replace(cfg, num_active_experts=2).num_active_experts == 2


def test_tolerance_is_used():
    """(A guard on this file's own checks: bf16 comparisons above use the bf16 bound.)"""
    assert tolerance(torch.bfloat16) > tolerance(torch.float32)
