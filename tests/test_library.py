"""The PyTorch operators of vmoe.library: torch.library.opcheck (schema, fake tensors, AOT dispatch with
dynamic shapes), and the eager path computing exactly what the operators compute."""
from __future__ import annotations

import pytest
import torch

from vmoe import library as ops
from vmoe.testing import DEVICE, make_inputs

WIDTHS = (7, 16, 1, 20)

CASES = [("relu2", torch.float32), ("swiglu", torch.float32), ("gelu", torch.bfloat16)]
CASE_IDS = ["relu2-fp32", "swiglu-fp32", "gelu-bf16"]


def _problem(activation, dtype, T=9, d=12, k=2):
    x, ids, w, w1, w2 = make_inputs(T, d, WIDTHS, k, activation, dtype, DEVICE)
    return x, ids, w, w1, w2, ops.routing(ids, WIDTHS)


def test_opcheck_routing():
    _, ids, *_ = _problem("relu2", torch.float32)
    torch.library.opcheck(ops.routing_op, (ids, WIDTHS))
    # Out-of-range ids (dropped) and an int32 id tensor take the same path.
    bad = ids.clone().to(torch.int32)
    bad[0, 0] = -3
    torch.library.opcheck(ops.routing_op, (bad, WIDTHS))


def test_opcheck_add_shared_slot():
    """With a null expert and a dropped id among the routed slots; T=0 too."""
    widths = (7, 0, 16)
    for T in (9, 0):
        ids = make_inputs(T, 12, widths, 2, device=DEVICE)[1]
        if T:
            ids[0, 0] = 5
        routing = ops.routing(ids, widths)
        torch.library.opcheck(ops.add_shared_slot_op, (*routing, widths, 11, 2))
        want = ops.routing(torch.cat([ids, torch.full((T, 1), 3, device=DEVICE)], 1), widths + (11,))
        for a, b in zip(ops.shared_slot(routing, widths, 11, 2), want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("activation,dtype", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("save", [True, False], ids=["save", "nosave"])
def test_opcheck_expert_mlp(activation, dtype, save):
    x, _, w, w1, w2, routing = _problem(activation, dtype)
    args = (x, w, w1, w2, *routing, WIDTHS, activation, save)
    # z is a buffer sized for the worst routing whose tail past sum_e n_e g f_e is never written
    # (filling it would cost a memset of the worst case), so opcheck's AOT-dispatch test, which
    # compares every element of every output between two runs, cannot hold when z is saved;
    # test_compile.py compares every meaningful output of the compiled layer with eager instead.
    tests = (("test_schema", "test_autograd_registration", "test_faketensor") if save
             else ("test_schema", "test_autograd_registration", "test_faketensor",
                   "test_aot_dispatch_dynamic"))
    torch.library.opcheck(ops.expert_mlp_op, args, test_utils=tests)


@pytest.mark.parametrize("activation,dtype", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("needs", [(True, True, True, True), (True, False, False, True),
                                   (False, True, True, False)], ids=["all", "x-w2", "w-w1"])
def test_opcheck_expert_mlp_backward(activation, dtype, needs):
    x, _, w, w1, w2, routing = _problem(activation, dtype)
    _, z, ys = ops.expert_mlp_impl(x, w, w1, w2, *routing, WIDTHS, activation, True)
    dy = torch.randn_like(x)
    torch.library.opcheck(ops.expert_mlp_backward_op,
                          (dy, x, w, w1, w2, z, ys, *routing, WIDTHS, activation, needs))


def test_ops_equal_eager_path():
    """The operator and the direct call (what eager mode runs) give bitwise-equal results."""
    x, ids, w, w1, w2, routing = _problem("swiglu", torch.float32)
    for a, b in zip(ops.routing_op(ids, WIDTHS), routing):
        assert torch.equal(a, b)
    args = (x, w, w1, w2, *routing, WIDTHS, "swiglu", True)
    (y, z, ys), (y_ref, z_ref, ys_ref) = ops.expert_mlp_op(*args), ops.expert_mlp_impl(*args)
    written = 2 * int(routing[4][-1])  # swiglu's Z: 2 * sum_e n_e f_e; the rest is never written
    assert torch.equal(y, y_ref) and torch.equal(ys, ys_ref)
    assert torch.equal(z[:written], z_ref[:written])


def test_nosave_keeps_nothing():
    x, _, w, w1, w2, routing = _problem("relu2", torch.float32)
    y, z, ys = ops.expert_mlp_impl(x, w, w1, w2, *routing, WIDTHS, "relu2", False)
    y_saved, z_saved, ys_saved = ops.expert_mlp_impl(x, w, w1, w2, *routing, WIDTHS, "relu2", True)
    assert z.numel() == 0 and ys.numel() == 0
    assert z_saved.numel() > 0 and ys_saved.shape == (x.shape[0] * 2, x.shape[1])
    assert torch.equal(y, y_saved)


ROUTE_SIZES = ((7, 16, 1, 20), (2, 2))  # widths, and the load-balance groups they form


@pytest.mark.parametrize("router,norm,dtype", [("sigmoid", True, torch.float32),
                                               ("softmax", False, torch.bfloat16)],
                         ids=["sigmoid-norm-fp32", "softmax-nonorm-bf16"])
def test_opcheck_route(router, norm, dtype):
    widths, groups = ROUTE_SIZES
    logits = torch.randn(9, len(widths), device=DEVICE)
    torch.library.opcheck(ops.route_op, (logits, 2, router, norm, widths, groups, dtype))


@pytest.mark.parametrize("given", ["all", "weights-only", "losses-only"])
def test_opcheck_route_backward(given):
    widths, groups = ROUTE_SIZES
    logits = torch.randn(9, len(widths), device=DEVICE)
    out = ops.route_impl(logits, 2, "softmax", True, widths, groups)
    weights, p_sum, lse_sq_sum, z, lb, c, ids, _, counts = out[:9]
    grads = [torch.randn_like(t) for t in (weights, p_sum, lse_sq_sum, z, lb, c)]
    if given == "weights-only":
        grads[1:] = [None] * 5
    elif given == "losses-only":
        grads[:3] = [None] * 3
    torch.library.opcheck(ops.route_backward_op, (logits, ids, *grads, counts, p_sum, "softmax",
                                                  True, widths, groups))
