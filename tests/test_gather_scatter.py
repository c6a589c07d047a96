"""vmoe.ops.gather_scatter against vmoe.reference.gather/combine, in float64, and its determinism."""
from __future__ import annotations

import pytest
import torch

from vmoe import reference
from vmoe.ops.gather_scatter import combine, combine_weight_grad, gather
from vmoe.ops.routing import build_routing
from vmoe.testing import DEVICE, DTYPE_IDS, assert_close, case_id, sizes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (T, d, widths, k); only the number of experts matters here, the widths keep ids readable.
CASES = [
    (1, 8, (7, 33), 1),
    (13, 24, (7, 33, 1, 20), 2),
    (17, 40, (7, 33, 100), 3),
    (sizes(9, 300), sizes(5, 200), (4, 4, 4, 4), 4),
]
CASE_IDS = [case_id(*c) for c in CASES]


def _routing(T, widths, k):
    ids = torch.randint(0, len(widths), (T, k), device=DEVICE)
    return ids, build_routing(ids, widths)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gather(case, dtype):
    T, d, widths, k = case
    _, r = _routing(T, widths, k)
    x = torch.randn(T, d, device=DEVICE).to(dtype)
    out = gather(x, r)
    ref = reference.gather(x, r.sorted_to_assign.long() // k)
    # A copy: exact in every dtype.
    assert torch.equal(out, ref), "gather must copy rows exactly"


def test_gather_zeroes_dropped_rows():
    widths, k, T = (7, 33, 1), 2, 9
    ids = torch.randint(0, 3, (T, k), device=DEVICE)
    ids[0, 1], ids[5, 0] = -1, 3
    r = build_routing(ids, widths)
    x = torch.randn(T, 16, device=DEVICE)
    out = gather(x, r)
    n_valid = int(r.offsets[-1])
    assert n_valid == T * k - 2
    assert torch.equal(out[:n_valid], x[r.sorted_to_assign[:n_valid].long() // k])
    assert torch.equal(out[n_valid:], torch.zeros_like(out[n_valid:]))


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_combine(case, dtype, weighted):
    T, d, widths, k = case
    _, r = _routing(T, widths, k)
    ys = torch.randn(T * k, d, device=DEVICE).to(dtype)
    w = (torch.rand(T, k, device=DEVICE) + 0.1).to(dtype) if weighted else None
    out = combine(ys, r, w.reshape(-1) if weighted else None)
    ref = reference.combine(ys.double(), r.assign_to_sorted, w.double() if weighted else None, k)
    assert out.dtype == dtype
    assert_close("combine", out, ref, dtype)


def test_combine_drops_out_of_range():
    widths, k, T = (7, 33, 1), 2, 9
    ids = torch.randint(0, 3, (T, k), device=DEVICE)
    ids[0, 1], ids[5, 0] = -1, 3
    valid = (ids >= 0) & (ids < 3)
    r = build_routing(ids, widths)
    ys = torch.randn(T * k, 16, device=DEVICE)
    w = torch.rand(T, k, device=DEVICE) + 0.1
    out = combine(ys, r, w.reshape(-1))
    ref = reference.combine(ys.double(), r.assign_to_sorted, (w * valid).double(), k)
    assert_close("combine with dropped ids", out, ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_combine_weight_grad(case, dtype):
    T, d, widths, k = case
    _, r = _routing(T, widths, k)
    ys = torch.randn(T * k, d, device=DEVICE).to(dtype)
    dy = torch.randn(T, d, device=DEVICE).to(dtype)
    dw = combine_weight_grad(dy, ys, r)
    w64 = torch.rand(T, k, device=DEVICE, dtype=torch.float64, requires_grad=True)
    y64 = reference.combine(ys.double(), r.assign_to_sorted, w64, k)
    (ref,) = torch.autograd.grad(y64, w64, dy.double())
    assert dw.shape == (T, k)
    assert_close("combine_weight_grad", dw, ref, dtype)


def test_combine_weight_grad_zero_for_dropped():
    widths, k, T = (7, 33, 1), 2, 9
    ids = torch.randint(0, 3, (T, k), device=DEVICE)
    ids[0, 1], ids[5, 0] = -1, 3
    r = build_routing(ids, widths)
    dw = combine_weight_grad(torch.randn(T, 16, device=DEVICE), torch.randn(T * k, 16, device=DEVICE), r)
    assert dw[0, 1] == 0 and dw[5, 0] == 0
    assert not torch.isnan(dw).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_deterministic(dtype):
    T, d, widths, k = CASES[2]
    _, r = _routing(T, widths, k)
    x = torch.randn(T, d, device=DEVICE).to(dtype)
    ys = torch.randn(T * k, d, device=DEVICE).to(dtype)
    w = torch.rand(T * k, device=DEVICE).to(dtype)
    dy = torch.randn(T, d, device=DEVICE).to(dtype)
    for name, fn in [("gather", lambda: gather(x, r)), ("combine", lambda: combine(ys, r, w)),
                     ("combine_weight_grad", lambda: combine_weight_grad(dy, ys, r))]:
        assert torch.equal(fn(), fn()), f"{name}: two runs differ"


def test_zero_tokens():
    r = build_routing(torch.zeros(0, 2, dtype=torch.long, device=DEVICE), (7, 33))
    assert gather(torch.randn(0, 8, device=DEVICE), r).shape == (0, 8)
    assert combine(torch.randn(0, 8, device=DEVICE), r).shape == (0, 8)
    dy, ys = torch.randn(0, 8, device=DEVICE), torch.randn(0, 8, device=DEVICE)
    assert combine_weight_grad(dy, ys, r).shape == (0, 2)
