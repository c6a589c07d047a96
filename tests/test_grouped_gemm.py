"""The ragged grouped GEMMs of vmoe.ops.grouped_gemm against a per-expert torch loop in float64.

Ragged buffers are flat: expert e's [n_e, g*f_e] block starts at element g*ragged_offsets[e]. The
tests read exactly those blocks (through the routing's counts and ragged_offsets), so only the
sum_e n_e*g*f_e elements the kernels must write are compared; every one must be finite (the
conftest poisons fresh outputs with NaN). Ragged *inputs* are NaN outside their blocks, so a kernel
that reads past an expert's block fails too.
"""
from __future__ import annotations

import threading

import pytest
import torch
import triton
from triton.runtime import _allocation

from vmoe import reference
from vmoe.config import gate_factor
from vmoe.ops import grouped_gemm as gg
from vmoe.ops.grouped_gemm import (
    down_proj,
    down_proj_bwd,
    ragged_capacity,
    tma_eligible,
    tma_mode,
    up_proj,
    up_proj_bwd,
    w1_grad,
    w2_grad,
    width_alignment,
)
from vmoe.ops.routing import build_routing
from vmoe.testing import ACT_DTYPE_IDS, ACT_DTYPES, DEVICE, DTYPE_IDS, assert_close, case_id, sizes

# (T, d, widths, k): widths off the block sizes, a width-1 expert, and more experts than rows.
CASES = [
    (13, 24, (7, 33, 1, 20), 2),
    (7, 40, (7, 33, 100), 2),
    (sizes(5, 200), sizes(16, 256), (3, 5, 8, 13, 21, 34), 1),
]
CASE_IDS = [case_id(*c) for c in CASES]


class Problem:
    """Routing plus the per-expert views the reference loop needs."""

    def __init__(self, T, d, widths, k, empty=(), ids=None):
        E = len(widths)
        if ids is None:
            live = [e for e in range(E) if e not in empty]
            ids = torch.tensor(live)[torch.randint(0, len(live), (T, k))]
        self.ids = ids.to(DEVICE)
        self.T, self.d, self.widths, self.k = T, d, widths, k
        self.r = build_routing(self.ids, widths)
        self.counts = self.r.counts.tolist()
        self.offsets = self.r.offsets.tolist()
        self.rag = self.r.ragged_offsets.tolist()
        self.s2a = self.r.sorted_to_assign.long()
        self.woff = [sum(widths[:e]) for e in range(E)]

    def experts(self):
        """(e, n_e, f_e, o_e, assignments of e in sorted order) for every non-empty expert."""
        for e, (n, f) in enumerate(zip(self.counts, self.widths)):
            if n:
                yield e, n, f, self.woff[e], self.s2a[self.offsets[e]:self.offsets[e] + n]

    def block(self, flat, e, g):
        n, f = self.counts[e], self.widths[e]
        start = g * self.rag[e]
        return flat[start:start + n * g * f].view(n, g * f)

    def ragged_random(self, g, dtype):
        """A ragged buffer of capacity size, random inside the blocks and NaN outside them."""
        buf = torch.full((g * ragged_capacity(self.r),), float("nan"), device=DEVICE, dtype=dtype)
        for e, n, f, _, _ in self.experts():
            self.block(buf, e, g).copy_(torch.randn(n, g * f, device=DEVICE))
        return buf

    def written(self, g):
        return g * self.rag[-1]


def _w1(d, widths, g, dtype):
    return (torch.randn(d, g * sum(widths), device=DEVICE) / d ** 0.5).to(dtype)


def _w2(d, widths, dtype):
    return torch.cat([torch.randn(f, d, device=DEVICE) / f ** 0.5 for f in widths]).to(dtype)


@pytest.mark.parametrize("activation,dtype", ACT_DTYPES, ids=ACT_DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_up_proj(case, activation, dtype):
    p = Problem(*case)
    g = gate_factor(activation)
    x = torch.randn(p.T, p.d, device=DEVICE).to(dtype)
    w1 = _w1(p.d, p.widths, g, dtype)
    h, z = up_proj(x, w1, p.r, activation)
    assert p.written(g) == g * sum(n * f for n, f in zip(p.counts, p.widths))
    for e, n, f, o, assign in p.experts():
        z_ref = x.double()[assign // p.k] @ w1.double()[:, g * o:g * (o + f)]
        assert_close(f"z expert {e}", p.block(z, e, g), z_ref, dtype)
        # H is computed from Z rounded to the storage dtype, as the kernel documents.
        h_ref = reference.act(p.block(z, e, g).double(), activation)
        assert_close(f"h expert {e}", p.block(h, e, 1), h_ref, dtype)
        h_exact = reference.act(z_ref, activation)
        assert_close(f"h expert {e} vs float64 chain", p.block(h, e, 1), h_exact, dtype)


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_up_proj_without_z(activation):
    p = Problem(*CASES[0])
    g = gate_factor(activation)
    x = torch.randn(p.T, p.d, device=DEVICE)
    w1 = _w1(p.d, p.widths, g, torch.float32)
    h, z = up_proj(x, w1, p.r, activation, save_z=False)
    assert z is None
    for e, n, f, o, assign in p.experts():
        h_ref = reference.act(x.double()[assign // p.k] @ w1.double()[:, g * o:g * (o + f)], activation)
        assert_close(f"h expert {e}", p.block(h, e, 1), h_ref, torch.float32)


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_down_proj(case, dtype):
    p = Problem(*case)
    h = p.ragged_random(1, dtype)
    w2 = _w2(p.d, p.widths, dtype)
    ys = down_proj(h, w2, p.r)
    assert ys.shape == (p.T * p.k, p.d)
    for e, n, f, o, _ in p.experts():
        ref = p.block(h, e, 1).double() @ w2.double()[o:o + f]
        assert_close(f"ys expert {e}", ys[p.offsets[e]:p.offsets[e] + n], ref, dtype)


def _dh_inputs(case, activation, dtype):
    """A problem and the inputs of down_proj_bwd: dy, routing weights, w2 and a saved Z."""
    p = Problem(*case)
    dy = torch.randn(p.T, p.d, device=DEVICE).to(dtype)
    weights = (torch.rand(p.T, p.k, device=DEVICE) + 0.1).to(dtype)
    return p, dy, weights, _w2(p.d, p.widths, dtype), p.ragged_random(gate_factor(activation), dtype)


@pytest.mark.parametrize("activation,dtype", ACT_DTYPES, ids=ACT_DTYPE_IDS)
@pytest.mark.parametrize("case", CASES[:2], ids=CASE_IDS[:2])
def test_down_proj_bwd(case, activation, dtype):
    p, dy, weights, w2, z = _dh_inputs(case, activation, dtype)
    g = gate_factor(activation)
    dz = down_proj_bwd(dy, weights, w2, z, p.r, activation)
    for e, n, f, o, assign in p.experts():
        scaled = dy.double()[assign // p.k] * weights.double().reshape(-1)[assign][:, None]
        dh = scaled @ w2.double()[o:o + f].T                                   # [n_e, f_e]
        z_e = p.block(z, e, g).double().requires_grad_()
        (dz_ref,) = torch.autograd.grad(reference.act(z_e, activation), z_e, dh)
        assert_close(f"dz expert {e}", p.block(dz, e, g), dz_ref, dtype)


@pytest.mark.parametrize("activation,dtype", ACT_DTYPES, ids=ACT_DTYPE_IDS)
@pytest.mark.parametrize("case", CASES[:2], ids=CASE_IDS[:2])
def test_down_proj_bwd_weighted_h(case, activation, dtype):
    # The epilogue also writes w * act(Z), the W2 gradient's operand; dZ must not change.
    p, dy, weights, w2, z = _dh_inputs(case, activation, dtype)
    g = gate_factor(activation)
    dz, hw = down_proj_bwd(dy, weights, w2, z, p.r, activation, weighted_h=True)
    written = p.written(g)
    assert torch.equal(dz[:written], down_proj_bwd(dy, weights, w2, z, p.r, activation)[:written])
    for e, n, f, o, assign in p.experts():
        w = weights.double().reshape(-1)[assign][:, None]
        assert_close(f"w*H expert {e}", p.block(hw, e, 1),
                     w * reference.act(p.block(z, e, g).double(), activation), dtype)


@pytest.mark.parametrize("activation,dtype", ACT_DTYPES, ids=ACT_DTYPE_IDS)
@pytest.mark.parametrize("case", CASES[:2], ids=CASE_IDS[:2])
def test_up_proj_bwd(case, activation, dtype):
    p = Problem(*case)
    g = gate_factor(activation)
    dz = p.ragged_random(g, dtype)
    w1 = _w1(p.d, p.widths, g, dtype)
    dxs = up_proj_bwd(dz, w1, p.r, activation)
    assert dxs.shape == (p.T * p.k, p.d)
    for e, n, f, o, _ in p.experts():
        ref = p.block(dz, e, g).double() @ w1.double()[:, g * o:g * (o + f)].T
        assert_close(f"dxs expert {e}", dxs[p.offsets[e]:p.offsets[e] + n], ref, dtype)


# (T, d, widths, k, empty experts): the weight gradients must write zeros for an expert with no rows.
WGRAD_CASES = [
    (13, 24, (7, 33, 1, 20), 2, ()),
    (9, 40, (7, 33, 1, 20, 100), 2, (0, 2)),
    (6, 16, (5, 9, 17), 1, (2,)),
]
WGRAD_IDS = [case_id(*c[:4], f"empty{list(c[4])}".replace(" ", "")) for c in WGRAD_CASES]


@pytest.mark.parametrize("activation,dtype", ACT_DTYPES, ids=ACT_DTYPE_IDS)
@pytest.mark.parametrize("case", WGRAD_CASES, ids=WGRAD_IDS)
def test_w1_grad(case, activation, dtype):
    T, d, widths, k, empty = case
    p = Problem(T, d, widths, k, empty=empty)
    g = gate_factor(activation)
    x = torch.randn(T, d, device=DEVICE).to(dtype)
    w1 = _w1(d, widths, g, dtype)
    dz = p.ragged_random(g, dtype)
    dw1 = w1_grad(x, dz, w1, p.r, activation)
    ref = torch.zeros(d, g * sum(widths), dtype=torch.float64, device=DEVICE)
    for e, n, f, o, assign in p.experts():
        ref[:, g * o:g * (o + f)] = x.double()[assign // k].T @ p.block(dz, e, g).double()
    assert_close("dw1", dw1, ref, dtype)
    for e in empty:
        o, f = p.woff[e], widths[e]
        assert p.counts[e] == 0
        assert bool((dw1[:, g * o:g * (o + f)] == 0).all()), f"dw1 of empty expert {e} is not zero"


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", WGRAD_CASES, ids=WGRAD_IDS)
def test_w2_grad(case, dtype):
    T, d, widths, k, empty = case
    p = Problem(T, d, widths, k, empty=empty)
    h = p.ragged_random(1, dtype)
    dy = torch.randn(T, d, device=DEVICE).to(dtype)
    weights = (torch.rand(T, k, device=DEVICE) + 0.1).to(dtype)
    w2 = _w2(d, widths, dtype)
    dw2 = w2_grad(h, dy, weights, w2, p.r)
    ref = torch.zeros(sum(widths), d, dtype=torch.float64, device=DEVICE)
    for e, n, f, o, assign in p.experts():
        scaled = dy.double()[assign // k] * weights.double().reshape(-1)[assign][:, None]
        ref[o:o + f] = p.block(h, e, 1).double().T @ scaled
    assert_close("dw2", dw2, ref, dtype)
    for e in empty:
        o, f = p.woff[e], widths[e]
        assert bool((dw2[o:o + f] == 0).all()), f"dw2 of empty expert {e} is not zero"
    # Without weights, h is taken as already weighted (w * H) and dy is only gathered.
    dw2_pre = w2_grad(h, dy, None, w2, p.r)
    ref_pre = torch.zeros_like(ref)
    for e, n, f, o, assign in p.experts():
        ref_pre[o:o + f] = p.block(h, e, 1).double().T @ dy.double()[assign // k]
    assert_close("dw2 of a weighted h", dw2_pre, ref_pre, dtype)


def test_zero_tokens():
    p = Problem(0, 16, (7, 33), 2, ids=torch.zeros(0, 2, dtype=torch.long))
    x = torch.randn(0, 16, device=DEVICE)
    w1, w2 = _w1(16, p.widths, 1, torch.float32), _w2(16, p.widths, torch.float32)
    h, z = up_proj(x, w1, p.r, "relu2")
    assert h.numel() == 0 and z.numel() == 0
    assert down_proj(h, w2, p.r).shape == (0, 16)
    dw1 = w1_grad(x, z, w1, p.r, "relu2")
    dw2 = w2_grad(h, x, torch.zeros(0, 2, device=DEVICE), w2, p.r)
    assert bool((dw1 == 0).all()) and bool((dw2 == 0).all())


@pytest.mark.parametrize("widths, align", [
    ((512, 256, 128), 16), ((610,) * 8, 2), ((616, 616), 8), ((7,), 1), ((100, 36), 4),
    ((16, 0, 48), 16), ((24, 40), 8), ((1280, 256, 0), 16), ((64, 1472, 6), 2)])
def test_width_alignment(widths, align):
    """The kernels' ALIGN hint: the largest power of two up to 16 that divides every width. Too
    large a value would let the compiler assume alignment that is not there (wrong loads on the
    GPU), too small costs speed (2.3x at width 610 with no hint)."""
    assert width_alignment(widths) == align
    assert all(w % align == 0 for w in widths)


# The tensor-descriptor (TMA) path: widths and d in multiples of 8, an empty expert, an expert of
# one row, a single token, and k = E. Every GEMM test above runs again with the path forced on;
# a spy on the launches checks that the descriptor kernels, not the pointer ones, ran.
ALIGNED_CASES = [(13, 24, (8, 40, 16, 24), 2, (2,)), (1, 32, (8, 16), 2, ()),
                 (9, 16, (24, 8, 48), 3, ())]
ALIGNED_IDS = [case_id(*c[:4], f"empty{list(c[4])}".replace(" ", "")) for c in ALIGNED_CASES]
DESCRIPTOR_TESTS = {
    "up_proj": lambda c, a, t: test_up_proj(c[:4], a, t),
    "down_proj": lambda c, a, t: test_down_proj(c[:4], t),
    "down_proj_bwd": lambda c, a, t: (test_down_proj_bwd(c[:4], a, t),
                                      test_down_proj_bwd_weighted_h(c[:4], a, t)),
    "up_proj_bwd": lambda c, a, t: test_up_proj_bwd(c[:4], a, t),
    "w1_grad": lambda c, a, t: test_w1_grad(c, a, t),
    "w2_grad": lambda c, a, t: test_w2_grad(c, t),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
@pytest.mark.parametrize("gemm", list(DESCRIPTOR_TESTS))
@pytest.mark.parametrize("case", ALIGNED_CASES, ids=ALIGNED_IDS)
def test_descriptor_path(case, gemm, activation, dtype, gemm_launches):
    with tma_mode("only"):
        DESCRIPTOR_TESTS[gemm](case, activation, dtype)
    assert gemm_launches
    for kernel, tma_ok in gemm_launches:
        # The warp-specialized kernel is descriptor-only; the others may only try descriptor
        # configs.
        assert kernel is gg._rows_ws_kernel or tma_ok == gg.TMA_ONLY, (kernel, tma_ok)
    ragged_to_sorted = gemm in ("down_proj", "up_proj_bwd")
    assert any(k is gg._rows_ws_kernel for k, _ in gemm_launches) == ragged_to_sorted


@pytest.mark.parametrize("gemm", ["up_proj", "down_proj", "w1_grad"])
def test_descriptor_path_off_and_ineligible(gemm, gemm_launches):
    """"off" never offers the descriptor kernels, and "only" falls back to the pointer kernels
    (correctly) where the widths are not multiples of 8."""
    with tma_mode("off"):
        DESCRIPTOR_TESTS[gemm](ALIGNED_CASES[0], "relu2", torch.bfloat16)
    with tma_mode("only"):
        DESCRIPTOR_TESTS[gemm]((13, 24, (12, 20, 4), 2, ()), "relu2", torch.bfloat16)
    assert gemm_launches and all(k is not gg._rows_ws_kernel and ok == gg.TMA_NO
                                 for k, ok in gemm_launches)


def _eligible(dtype=torch.bfloat16, widths=(8, 16), d=32, operands=()):
    return tma_eligible(torch.device(DEVICE), dtype, widths, d, operands)


def test_descriptor_eligibility():
    """What the copy engine needs, each condition on its own: a 16-bit dtype, widths and d in
    multiples of 8, 16-byte aligned operands with row strides in multiples of 8 elements."""
    w = torch.zeros(32, 48, device=DEVICE, dtype=torch.bfloat16)
    flat = torch.zeros(64, device=DEVICE, dtype=torch.bfloat16)
    if DEVICE == "cuda" and not gg._has_tma(torch.cuda.current_device()):
        assert not _eligible(operands=[(w, 48)])  # a GPU without TMA: pointer kernels only
        return
    assert _eligible(operands=[(w, 48), (flat, None)])
    assert not _eligible(dtype=torch.float32)
    assert not _eligible(widths=(8, 12))
    assert not _eligible(widths=(7,))
    assert not _eligible(d=36)
    assert not _eligible(operands=[(flat[1:], None)])    # 2 bytes off a 16-byte boundary
    assert not _eligible(operands=[(w[:, :44], 44)])     # rows of 88 bytes
    assert not _eligible(operands=[(None, None)])        # no unit stride found by the caller
    assert _eligible(widths=(0, 8, 16))                  # a null expert's width 0


def test_tma_mode_names_bad_input():
    with pytest.raises(ValueError, match="mode must be one of"):
        tma_mode("fast")
    before = gg._TMA_MODE[0]  # "auto", unless VMOE_TMA says otherwise
    with tma_mode("off"):
        assert gg._TMA_MODE[0] == "off"
    assert gg._TMA_MODE[0] == before


def test_scratch_allocator_respects_the_programs_own():
    """The descriptors' scratch allocator is installed per thread (autograd's backward runs on
    its own), and only where the program set none."""
    def own(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8, device=DEVICE)

    def in_thread(setup, out):
        setup()
        gg._ensure_allocator()
        out.append(_allocation._allocator.get())
    seen = []
    worker = threading.Thread(target=in_thread, args=(lambda: None, seen))
    worker.start()
    worker.join()
    worker = threading.Thread(target=in_thread, args=(lambda: triton.set_allocator(own), seen))
    worker.start()
    worker.join()
    assert seen == [gg._scratch, own]


def test_warp_specialized_kernel_dispatch(monkeypatch):
    """Which ragged-to-sorted GEMMs take the warp-specialized kernel: under "auto" only at the
    sizes where it was measured faster (about 1,000 rows per expert, d >= 512), and as if on a
    GPU (the interpreter's "auto" is "off"); under "only" wherever descriptors are eligible;
    never under "off" or when not eligible."""
    def routing(rows, experts):
        return type("R", (), {"num_assignments": rows * experts, "expert_widths": (8,) * experts})

    def ws(r, eligible, n_max):
        return gg._ws_eligible(r, gg._tma_ok(eligible), n_max)
    monkeypatch.setattr(gg, "interpreting", lambda: False)
    with tma_mode("auto"):
        assert ws(routing(1024, 128), True, 2048)
        assert not ws(routing(256, 128), True, 2048)    # the seed configs' size
        assert not ws(routing(1024, 128), True, 256)
        assert not ws(routing(1024, 128), False, 2048)
    with tma_mode("only"):
        assert ws(routing(4, 2), True, 16)
        assert not ws(routing(4, 2), False, 16)
    with tma_mode("off"):
        assert not ws(routing(1024, 128), True, 2048)
