"""vmoe.expert_mlp, forward and all four gradients, against vmoe.reference.expert_mlp run in float64
autograd.

gradcheck is not run here: the kernels take fp32/fp16/bf16 only, and a float64 gradcheck of the
reference loop would test torch, not vmoe (notebooks/05_autograd.ipynb derives the gradients).
"""
from __future__ import annotations

import pytest
import torch

from vmoe import expert_mlp, reference
from vmoe.config import gate_factor
from vmoe.ops import grouped_gemm
from vmoe.ops.routing import LOAD_ORDER_MAX_E
from vmoe.testing import (
    ACT_DTYPE_IDS,
    ACT_DTYPES,
    DEVICE,
    DTYPE_IDS,
    assert_close,
    case_id,
    make_inputs,
    sizes,
)

NAMES = ("y", "dx", "dtopk_weights", "dw1", "dw2")


def run_vmoe(x, ids, w, w1, w2, widths, activation, dy, **kw):
    leaves = [t.clone().requires_grad_() for t in (x, w, w1, w2)]
    y = expert_mlp(leaves[0], ids, leaves[1], leaves[2], leaves[3], widths, activation, **kw)
    grads = torch.autograd.grad(y, leaves, dy)
    return (y.detach(), grads[0], grads[1], grads[2], grads[3])


def run_reference(x, ids, w, w1, w2, widths, activation, dy):
    leaves = [t.detach().double().requires_grad_() for t in (x, w, w1, w2)]
    y = reference.expert_mlp(leaves[0], ids, leaves[1], leaves[2], leaves[3], widths, activation)
    grads = torch.autograd.grad(y, leaves, dy.double())
    return (y.detach(), grads[0], grads[1], grads[2], grads[3])


def check_case(T, d, widths, k, activation, dtype, ids=None):
    x, ids, w, w1, w2 = make_inputs(T, d, widths, k, activation, dtype, ids=ids, device=DEVICE)
    dy = torch.randn(T, d, device=DEVICE).to(dtype)
    out = run_vmoe(x, ids, w, w1, w2, widths, activation, dy)
    ref = run_reference(x, ids, w, w1, w2, widths, activation, dy)
    assert out[0].dtype == dtype and out[0].shape == (T, d)
    for name, o, r in zip(NAMES, out, ref):
        assert o.dtype == dtype, f"{name} has dtype {o.dtype}, expected {dtype}"
        assert_close(name, o, r, dtype)
    return out


@pytest.mark.parametrize("activation,dtype", ACT_DTYPES, ids=ACT_DTYPE_IDS)
@pytest.mark.parametrize("T,d,widths,k", [(13, 24, (7, 33, 1, 20), 2)],
                         ids=[case_id(13, 24, (7, 33, 1, 20), 2)])
def test_expert_mlp(T, d, widths, k, activation, dtype):
    check_case(T, d, widths, k, activation, dtype)


@pytest.mark.skipif(DEVICE != "cuda", reason="a GPU-sized problem; the interpreter is too slow for it")
@pytest.mark.parametrize("activation,dtype", [("relu2", torch.bfloat16), ("swiglu", torch.bfloat16),
                                              ("gelu", torch.float32)],
                         ids=["relu2-bf16", "swiglu-bf16", "gelu-fp32"])
def test_expert_mlp_gpu_size(activation, dtype):
    check_case(1000, 256, (512,) * 2 + (256,) * 4 + (100, 33), 2, activation, dtype)


def _row_bms() -> list:
    """The row blocks BM the grouped GEMMs may run with: every autotuning candidate (on a GPU the
    autotuner picks one per shape, so each is a block boundary worth testing; the interpreter pins
    one config)."""
    return sorted({c.kwargs["BM"] for c in grouped_gemm.ROW_CONFIGS})


def _ids_from_counts(counts, k=1):
    """[T, k] ids in a shuffled order giving expert e exactly counts[e] assignments (k=1)."""
    flat = torch.cat([torch.full((n,), e) for e, n in enumerate(counts)])
    return flat[torch.randperm(flat.numel())].reshape(-1, k)


def _edge_cases():
    E4 = (7, 33, 1, 20)
    cases = [
        # (id, T, d, widths, k, activation, dtype, ids builder or None)
        ("widths-1-7-33-100", 7, 24, (1, 7, 33, 100), 2, "relu2", torch.float32, None),
        ("widths-1-7-33-100", 7, 24, (1, 7, 33, 100), 2, "swiglu", torch.bfloat16, None),
        ("all-to-first", 9, 16, E4, 1, "gelu", torch.float32,
         lambda T, E, k: torch.zeros(T, k, dtype=torch.long)),
        ("all-to-last", 9, 16, E4, 1, "silu", torch.float32,
         lambda T, E, k: torch.full((T, k), E - 1, dtype=torch.long)),
        ("all-to-one-k2", 9, 16, E4, 2, "swiglu", torch.float32,
         lambda T, E, k: torch.tensor([1, 3]).repeat(T, 1)),
        ("empty-experts", 11, 16, (5, 9, 17, 3, 12), 2, "relu2", torch.float32,
         lambda T, E, k: torch.stack([torch.tensor([1, 3])[torch.randperm(2)] for _ in range(T)])),
        ("one-token-per-expert", 4, 16, E4, 1, "swiglu", torch.float32,
         lambda T, E, k: torch.randperm(E).reshape(T, 1)),
        *[(f"counts-bm-1-bm-bm+1-bm{bm}", 3 * bm, 16, (7, 33, 20), 1, "relu2", torch.float32,
           lambda T, E, k, bm=bm: _ids_from_counts([bm - 1, bm, bm + 1])) for bm in _row_bms()],
        *[(f"counts-2bm-and-1-bm{bm}", 2 * bm + 1, 16, (7, 33), 1, "silu", torch.bfloat16,
           lambda T, E, k, bm=bm: _ids_from_counts([2 * bm, 1])) for bm in _row_bms()],
        # Widths that are multiples of 16 take the kernels' aligned path (16-byte load hints); d
        # must not inherit those hints, so make its rows 72 bytes.
        ("aligned-widths-odd-d", 9, 36, (16, 32, 48), 2, "swiglu", torch.bfloat16, None),
        ("k-equals-E", 6, 16, E4, 4, "gelu", torch.float32, None),
        ("single-expert-k-equals-E", 6, 16, (19,), 1, "swiglu", torch.float32, None),
        ("T1", 1, 16, E4, 2, "relu2", torch.float32, None),
        ("T1", 1, 16, E4, 2, "swiglu", torch.bfloat16, None),
        ("repeated-ids", 5, 16, E4, 3, "relu2", torch.float32,
         lambda T, E, k: torch.tensor([[2, 2, 0], [1, 1, 1], [3, 0, 3], [0, 1, 2], [3, 3, 3]])),
        # Null experts (width 0): no columns, no tiles, exactly nothing added.
        ("null-experts", 13, 24, (7, 0, 33, 0, 1), 2, "relu2", torch.float32, None),
        ("null-experts", 13, 24, (7, 0, 33, 0, 1), 2, "swiglu", torch.bfloat16, None),
        ("null-first-and-last", 8, 16, (0, 5, 0), 1, "swiglu", torch.float32, None),
        ("null-k-equals-E", 6, 16, (7, 0, 12, 0), 4, "gelu", torch.float32, None),
        ("null-all-tokens-null", 9, 16, (0, 7, 0, 20), 2, "silu", torch.float32,
         lambda T, E, k: torch.tensor([[0, 2], [2, 0], [1, 3]]).repeat(3, 1)),
        # Above LOAD_ORDER_MAX_E experts the weight gradients keep their tiles in expert order.
        ("many-experts", 11, 16, tuple(3 * e % 10 for e in range(LOAD_ORDER_MAX_E.value + 1)), 2,
         "relu2", torch.float32, None),
        # Below it they go by load: one narrow expert with most of the rows.
        ("skewed-load", 10, 16, (33, 7, 20), 2, "swiglu", torch.float32,
         lambda T, E, k: torch.tensor([[1, 0], [1, 2], [1, 0], [1, 2], [1, 0]]).repeat(2, 1)),
    ]
    params, ids = [], []
    for name, T, d, widths, k, act, dtype, make_ids in cases:
        params.append((T, d, widths, k, act, dtype, make_ids))
        ids.append(f"{name}-{case_id(T, d, widths, k)}-{act}-{DTYPE_IDS[dtype]}")
    return params, ids


EDGE_PARAMS, EDGE_IDS = _edge_cases()


@pytest.mark.parametrize("T,d,widths,k,activation,dtype,make_ids", EDGE_PARAMS, ids=EDGE_IDS)
def test_edge_case(T, d, widths, k, activation, dtype, make_ids):
    ids = make_ids(T, len(widths), k) if make_ids is not None else None
    if ids is not None:
        assert ids.shape == (T, k)
    out = check_case(T, d, widths, k, activation, dtype, ids=ids)
    if make_ids is not None:
        # Experts that got no assignment have exactly zero weight gradients.
        g, ids_l = gate_factor(activation), ids.reshape(-1).tolist()
        o = 0
        for e, f in enumerate(widths):
            if e not in ids_l:
                assert bool((out[3][:, g * o:g * (o + f)] == 0).all()), f"dw1 of empty expert {e}"
                assert bool((out[4][o:o + f] == 0).all()), f"dw2 of empty expert {e}"
            o += f


@pytest.mark.parametrize("activation,dtype", [("relu2", torch.float32), ("swiglu", torch.bfloat16)],
                         ids=["relu2-fp32", "swiglu-bf16"])
def test_null_experts_add_exactly_zero(activation, dtype):
    """A token whose k choices are all null gets exactly 0 (and a zero input gradient), and a null
    slot's weight gradient is exactly 0."""
    widths, d = (5, 0, 9, 0, 0), 16
    ids = torch.tensor([[1, 3], [0, 4], [4, 1], [2, 3], [0, 2], [3, 4]], device=DEVICE)
    x, _, w, w1, w2 = make_inputs(6, d, widths, 2, activation, dtype, ids=ids.cpu(), device=DEVICE)
    dy = torch.randn(6, d, device=DEVICE).to(dtype)
    y, dx, dw, dw1, dw2 = run_vmoe(x, ids, w, w1, w2, widths, activation, dy)
    all_null = torch.tensor([True, False, True, False, False, True], device=DEVICE)
    assert bool((y[all_null] == 0).all()), "tokens routed only to null experts must get exactly 0"
    assert bool((dx[all_null] == 0).all()), "and exactly zero input gradient"
    null_slot = torch.tensor([f == 0 for f in widths], device=DEVICE)[ids]
    assert bool((dw[null_slot] == 0).all()), "a null slot's weight gradient must be exactly 0"
    assert bool((dw[~null_slot] != 0).all()), "a real slot's weight gradient is not 0 here"
    assert bool((y[~all_null] != 0).any(1).all()), "tokens with a real expert must get output"


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's pinned row block")
def test_interpreter_row_block_is_16():
    # The block-boundary edge cases size T from BM: a larger pinned BM would make them crawl.
    assert _row_bms() == [16]


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_zero_tokens(activation):
    widths, d, k = (7, 33, 1), 16, 2
    x, ids, w, w1, w2 = make_inputs(0, d, widths, k, activation, device=DEVICE)
    y, dx, dw, dw1, dw2 = run_vmoe(x, ids, w, w1, w2, widths, activation,
                                   torch.zeros(0, d, device=DEVICE))
    assert y.shape == (0, d) and dx.shape == (0, d) and dw.shape == (0, k)
    for name, t in (("dw1", dw1), ("dw2", dw2)):
        assert not torch.isnan(t).any(), f"{name} has NaN"
        assert bool((t == 0).all()), f"{name} must be all zero for T = 0"


def test_repeated_id_contributes_twice():
    """[e, e] with weights (a, b) is the same as [e] with weight a + b."""
    widths, d = (7, 33, 1, 20), 16
    x, _, _, w1, w2 = make_inputs(6, d, widths, 2, device=DEVICE)
    ids2 = torch.tensor([[1, 1], [0, 0], [3, 3], [2, 2], [1, 1], [3, 3]], device=DEVICE)
    w = torch.rand(6, 2, device=DEVICE) + 0.1
    y2 = expert_mlp(x, ids2, w, w1, w2, widths)
    y1 = expert_mlp(x, ids2[:, :1], w.sum(1, keepdim=True), w1, w2, widths)
    assert_close("[e, e] vs [e] with summed weight", y2, y1.double(), torch.float32)


@pytest.mark.parametrize("activation,dtype", [("relu2", torch.float32), ("swiglu", torch.bfloat16)],
                         ids=["relu2-fp32", "swiglu-bf16"])
def test_deterministic(activation, dtype):
    T, d, widths, k = sizes(17, 512), sizes(24, 256), (7, 33, 1, 20), 2
    x, ids, w, w1, w2 = make_inputs(T, d, widths, k, activation, dtype, device=DEVICE)
    dy = torch.randn(T, d, device=DEVICE).to(dtype)
    first = run_vmoe(x, ids, w, w1, w2, widths, activation, dy)
    second = run_vmoe(x, ids, w, w1, w2, widths, activation, dy)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name}: two runs are not bitwise equal"


def test_noncontiguous_inputs():
    widths, T, d, k = (7, 33, 1, 20), 9, 16, 2
    x, ids, w, w1, w2 = make_inputs(T, d, widths, k, device=DEVICE)
    dy = torch.randn(T, d, device=DEVICE)
    ref = run_vmoe(x, ids, w, w1, w2, widths, "relu2", dy)
    out = run_vmoe(x.t().contiguous().t(), ids.t().contiguous().t(), w.t().contiguous().t(),
                   w1.t().contiguous().t(), w2.t().contiguous().t(), widths, "relu2", dy)
    for name, a, b in zip(NAMES, out, ref):
        assert torch.equal(a, b), f"{name}: a non-contiguous input changed the result"


def test_expert_widths_as_tensor():
    widths, T, d, k = (7, 33, 1, 20), 9, 16, 2
    x, ids, w, w1, w2 = make_inputs(T, d, widths, k, device=DEVICE)
    a = expert_mlp(x, ids, w, w1, w2, widths)
    b = expert_mlp(x, ids, w, w1, w2, torch.tensor(widths, device=DEVICE))
    assert torch.equal(a, b)


def test_impl_reference_is_the_loop():
    widths, T, d, k = (7, 33, 1, 20), 9, 16, 2
    x, ids, w, w1, w2 = make_inputs(T, d, widths, k, device=DEVICE)
    y = expert_mlp(x, ids, w, w1, w2, widths, impl="reference")
    assert torch.equal(y, reference.expert_mlp(x, ids, w, w1, w2, widths))
    assert_close("impl=triton vs reference", expert_mlp(x, ids, w, w1, w2, widths, impl="triton"),
                 reference.expert_mlp(*(t.double() if t.is_floating_point() else t
                                        for t in (x, ids, w, w1, w2)), widths), torch.float32)
