"""vmoe.ops.routing against the sort + bincount + cumsum of vmoe.reference.routing, and the invariants
of the Routing data structure (see the table in vmoe/ops/routing.py)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from vmoe import expert_mlp, reference
from vmoe.ops.routing import (
    add_shared_slot,
    build_routing,
    finish_routing,
    locate_tile_by_load,
    scatter_routing,
    tile_schedule,
)
from vmoe.testing import DEVICE, assert_close, make_inputs, random_ids

# (T, k, widths): several interpreter blocks of 16 assignments, ragged widths, more experts than
# tokens, and k = E.
CASES = [
    (1, 1, (5,)),
    (7, 2, (7, 33, 100)),
    (13, 2, (7, 33, 1, 20)),
    (40, 3, (3, 5, 8, 13, 21)),
    (5, 4, (4, 4, 4, 4)),
    (9, 2, tuple(range(1, 21))),
    # Null experts (width 0): counted, but their assignments sort after offsets[E].
    (13, 2, (7, 0, 33, 0, 20)),
    (20, 3, (0, 5, 0)),
]


def _id(case):
    T, k, widths = case
    return f"T{T}-w[{','.join(map(str, widths))}]-k{k}"


def _random_ids_with_repeats(T, E, k):
    return torch.randint(0, E, (T, k), device=DEVICE)


def check_invariants(r, topk_ids, widths):
    """The documented invariants of a Routing, for ids all in [0, E)."""
    T, k = topk_ids.shape
    A, E = T * k, len(widths)
    counts, offsets = r.counts.long().cpu(), r.offsets.long().cpu()
    s2a, a2s = r.sorted_to_assign.long().cpu(), r.assign_to_sorted.long().cpu()
    assert counts.shape == (E,) and offsets.shape == (E + 1,) and s2a.shape == (A,)
    assert int(counts.sum()) == A, "counts must sum to T*k"
    live = torch.tensor([f > 0 for f in widths])
    assert offsets[0] == 0 and torch.equal(offsets.diff(), counts * live), \
        "offsets diff must equal counts (0 for a null expert)"
    assert torch.equal(s2a[a2s], torch.arange(A)), "sorted_to_assign[assign_to_sorted] != arange"
    assert torch.equal(a2s[s2a], torch.arange(A)), "assign_to_sorted[sorted_to_assign] != arange"
    flat = topk_ids.reshape(-1).long().cpu()
    tail = s2a[offsets[E]:]
    assert bool((~live[flat[tail]]).all()), "only null experts' assignments may sort after offsets[E]"
    assert bool((tail.diff() > 0).all()), "the null assignments must keep assignment order"
    for e in range(E):
        block = s2a[offsets[e]:offsets[e + 1]]
        assert bool((flat[block] == e).all()), f"expert {e}'s block holds other experts' assignments"
        assert bool((block.diff() > 0).all()), f"expert {e}'s block is not in assignment order (unstable)"
    elems = counts * torch.tensor(widths)
    expected = torch.cat([torch.zeros(1, dtype=torch.long), elems.cumsum(0)])
    assert torch.equal(r.ragged_offsets.cpu(), expected), "ragged_offsets != exclusive cumsum of n_e*f_e"
    assert r.ragged_offsets.dtype == torch.int64


def check_against_reference(r, topk_ids, E, widths=None):
    counts, offsets, s2a, a2s = reference.routing(topk_ids, E, widths)
    assert torch.equal(r.counts.long(), counts), f"counts {r.counts.tolist()} != {counts.tolist()}"
    assert torch.equal(r.offsets.long(), offsets)
    assert torch.equal(r.sorted_to_assign.long(), s2a)
    assert torch.equal(r.assign_to_sorted.long(), a2s)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_build_routing_matches_reference(case):
    T, k, widths = case
    ids = _random_ids_with_repeats(T, len(widths), k)
    r = build_routing(ids, widths)
    check_against_reference(r, ids, len(widths), widths)
    check_invariants(r, ids, widths)
    assert r.k == k and r.num_tokens == T and r.expert_widths == widths


@pytest.mark.parametrize("case", CASES[1:3], ids=_id)
def test_build_routing_top_k_distinct(case):
    T, k, widths = case
    ids = random_ids(T, len(widths), k, device=DEVICE)
    r = build_routing(ids, widths)
    check_against_reference(r, ids, len(widths))
    check_invariants(r, ids, widths)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8],
                         ids=lambda t: str(t).removeprefix("torch."))
def test_any_integer_dtype(dtype):
    widths = (7, 33, 1, 20)
    ids64 = _random_ids_with_repeats(19, len(widths), 2)
    r = build_routing(ids64.to(dtype), widths)
    check_against_reference(r, ids64, len(widths))
    check_invariants(r, ids64, widths)


def test_all_to_one_expert():
    widths = (7, 33, 1)
    for e in (0, len(widths) - 1):
        ids = torch.full((21, 1), e, device=DEVICE)
        r = build_routing(ids, widths)
        check_against_reference(r, ids, len(widths))
        check_invariants(r, ids, widths)
        assert int(r.counts[e]) == 21


def test_zero_tokens():
    widths = (7, 33, 1)
    ids = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    r = build_routing(ids, widths)
    assert r.sorted_to_assign.numel() == 0 and r.assign_to_sorted.numel() == 0
    assert r.counts.tolist() == [0, 0, 0]
    assert r.offsets.tolist() == [0, 0, 0, 0]
    assert r.ragged_offsets.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64], ids=["int8", "int64"])
def test_out_of_range_ids_sort_last(dtype):
    """Ids outside [0, E) go to a drop bin after every expert: offsets[E] counts only the valid ones,
    and the permutation equals a stable sort with every bad id replaced by E."""
    widths = (7, 33, 1, 20)
    E = len(widths)
    ids = _random_ids_with_repeats(17, E, 2)
    ids[0, 0], ids[3, 1], ids[8, 0], ids[16, 1] = -1, E, 100, -7
    r = build_routing(ids.to(dtype), widths)
    keyed = torch.where((ids >= 0) & (ids < E), ids, E)
    counts, offsets, s2a, a2s = reference.routing(keyed, E + 1)
    assert torch.equal(r.counts.long(), counts[:E])
    assert torch.equal(r.offsets.long(), offsets[:E + 1])
    assert int(r.offsets[E]) == ids.numel() - 4
    assert torch.equal(r.sorted_to_assign.long(), s2a)
    assert torch.equal(r.assign_to_sorted.long(), a2s)
    elems = counts[:E].cpu() * torch.tensor(widths)
    assert r.ragged_offsets.tolist() == [0] + elems.cumsum(0).tolist()


# (name, T, k, widths, block, ids): launch 3 alone, for blocks that the launchers never choose
# (not powers of two, larger than A, of one assignment), against a stable sort by torch. The ids
# builder takes (T, k, E) and may put ids outside [0, E), including 2**32 + 1, which narrowing to
# int32 before the range test would turn into expert 1.
SCATTER_CASES = [
    ("E1", 10, 3, (5,), 24, lambda T, k, E: torch.randint(-1, 2, (T, k))),
    ("all-to-one", 13, 7, (7, 33, 1, 20), 40, lambda T, k, E: torch.full((T, k), 2)),
    ("all-to-last", 13, 7, (7, 33, 1, 20), 24, lambda T, k, E: torch.full((T, k), E - 1)),
    ("empty-experts", 11, 4, (3, 5, 8, 13, 21), 24,
     lambda T, k, E: torch.tensor([0, 3])[torch.randint(0, 2, (T, k))]),
    ("null-in-middle", 17, 3, (7, 0, 33, 0, 0, 20), 40, lambda T, k, E: torch.randint(0, E, (T, k))),
    ("all-to-null", 9, 2, (7, 0, 33), 24, lambda T, k, E: torch.full((T, k), 1)),
    ("out-of-range", 19, 3, (7, 0, 33, 20), 24, lambda T, k, E: torch.tensor(
        [-1, E, E + 5, -(2**40), 2**32 + 1, 0, 1, 2, 3])[torch.randint(0, 9, (T, k))]),
    ("all-dropped", 7, 3, (7, 33), 40, lambda T, k, E: torch.full((T, k), -3)),
    ("A-multiple-of-block", 12, 4, (7, 0, 33, 20), 24, lambda T, k, E: torch.randint(-1, E + 1, (T, k))),
    ("block-larger-than-A", 5, 3, (7, 0, 33, 20), 40, lambda T, k, E: torch.randint(-1, E + 1, (T, k))),
    ("block3", 11, 2, (7, 0, 33, 20), 3, lambda T, k, E: torch.randint(-1, E + 1, (T, k))),
    ("block1", 6, 2, (7, 0, 33), 1, lambda T, k, E: torch.randint(-1, E + 1, (T, k))),
    ("A1", 1, 1, (7, 33), 24, lambda T, k, E: torch.ones(T, k, dtype=torch.long)),
    ("A0", 0, 2, (7, 0, 33), 24, lambda T, k, E: torch.zeros(T, k, dtype=torch.long)),
    ("E37-null-ends", 9, 5, (0,) + tuple(range(1, 36)) + (0,), 40,
     lambda T, k, E: torch.randint(-2, E + 2, (T, k))),
]


def _block_counts(ids, E, block):
    """``[max(NB, 1), E+1]`` int32 per-block counts by torch, every id outside [0, E) in column E:
    the layout that ``_block_histogram_kernel`` and the fused router write."""
    flat = ids.reshape(-1).long().cpu()
    flat = torch.where((flat >= 0) & (flat < E), flat, E)
    out = torch.zeros(max(triton.cdiv(flat.numel(), block), 1), E + 1, dtype=torch.int32)
    for b in range(out.shape[0]):
        out[b] = torch.bincount(flat[b * block:(b + 1) * block], minlength=E + 1).int()
    return out.to(ids.device)


@pytest.mark.parametrize("case", SCATTER_CASES, ids=[c[0] for c in SCATTER_CASES])
def test_scatter_any_block_equals_stable_sort(case):
    """finish_routing and scatter_routing with any block size: every array bitwise equal to a
    stable argsort of the ids with out-of-range ids and null experts' ids mapped to E."""
    _, T, k, widths, block, make_ids = case
    E = len(widths)
    ids = make_ids(T, k, E).to(DEVICE)
    flat = ids.reshape(-1)
    key = torch.where((flat >= 0) & (flat < E), flat, E)
    valid = key < E
    null = torch.tensor([f == 0 for f in widths] + [True], device=DEVICE)
    counts = torch.bincount(key[valid], minlength=E).int()
    computed = torch.where(null[:E], 0, counts)
    s2a = torch.sort(torch.where(null[key], E, key), stable=True).indices.int()
    a2s = torch.empty_like(s2a)
    a2s[s2a.long()] = torch.arange(T * k, dtype=torch.int32, device=DEVICE)
    zero = torch.zeros(1, dtype=torch.long, device=DEVICE)
    want = {"counts": counts,
            "offsets": torch.cat([zero, computed.long().cumsum(0)]).int(),
            "sorted_to_assign": s2a, "assign_to_sorted": a2s,
            "ragged_offsets": torch.cat([zero, (counts.long() * torch.tensor(widths, device=DEVICE))
                                         .cumsum(0)])}
    raw = _block_counts(ids, E, block)
    for path, r in (("finish_routing", finish_routing(ids, raw.clone(), block, widths)),
                    ("scatter_routing", scatter_routing(ids, (raw.cumsum(0) - raw).int(), counts,
                                                        block, widths))):
        for name, expected in want.items():
            got = getattr(r, name)
            assert got.dtype == expected.dtype and torch.equal(got, expected), \
                f"{path} {name}: {got.tolist()} != {expected.tolist()}"


def test_out_of_range_ids_dropped_in_expert_mlp():
    """A dropped assignment contributes nothing: the same as routing it to expert 0 with weight 0,
    and its routing-weight gradient is zero."""
    widths, k = (7, 33, 1), 2
    E = len(widths)
    x, ids, w, w1, w2 = make_inputs(11, 16, widths, k, device=DEVICE)
    ids[1, 0], ids[4, 1], ids[10, 0] = -1, E, 50
    valid = (ids >= 0) & (ids < E)
    leaves = [t.clone().requires_grad_() for t in (x, w, w1, w2)]
    y = expert_mlp(leaves[0], ids, leaves[1], leaves[2], leaves[3], widths)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)

    ref_leaves = [t.double().requires_grad_() for t in (x, w, w1, w2)]
    ids_ref = torch.where(valid, ids, 0)
    w_ref = torch.where(valid, ref_leaves[1], 0.0)
    y_ref = reference.expert_mlp(ref_leaves[0], ids_ref, w_ref, ref_leaves[2], ref_leaves[3], widths)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.double())

    assert_close("y", y, y_ref, torch.float32)
    assert_close("dx", grads[0], ref_grads[0], torch.float32)
    assert_close("dw1", grads[2], ref_grads[2], torch.float32)
    assert_close("dw2", grads[3], ref_grads[3], torch.float32)
    assert_close("dweights (valid)", grads[1][valid], ref_grads[1][valid], torch.float32)
    assert bool((grads[1][~valid] == 0).all()), "a dropped assignment's weight gradient must be 0"


@pytest.mark.parametrize("bad", [-1, 3, 127], ids=["neg", "eqE", "big"])
def test_check_mode_raises_on_out_of_range(monkeypatch, bad):
    monkeypatch.setenv("VMOE_CHECK", "1")
    widths = (7, 33, 1)
    x, ids, w, w1, w2 = make_inputs(5, 16, widths, 2, device=DEVICE)
    ids[2, 1] = bad
    with pytest.raises(ValueError, match="topk_ids"):
        build_routing(ids, widths)
    with pytest.raises(ValueError, match="topk_ids"):
        expert_mlp(x, ids, w, w1, w2, widths)


def test_check_mode_accepts_valid_ids(monkeypatch):
    monkeypatch.setenv("VMOE_CHECK", "1")
    widths = (7, 33, 1)
    ids = _random_ids_with_repeats(9, len(widths), 2)
    check_against_reference(build_routing(ids, widths), ids, len(widths))


def _expected_tiles(counts, widths, bm, bn, n_cols, n_per_width):
    out = []
    for e, (n, f) in enumerate(zip(counts, widths)):
        cols = n_cols if n_cols is not None else n_per_width * f
        for i_m in range(triton.cdiv(n, bm)):
            for i_n in range(triton.cdiv(cols, bn)):
                out.append((e, i_m, i_n))
    return out


@pytest.mark.parametrize("bm,bn,n_cols,n_per_width", [
    (16, 16, None, 1),
    (8, 8, None, 1),
    (8, 8, None, 2),
    (8, 16, 40, 1),
    (32, 32, None, 1),
], ids=["bm16-bn16-perwidth1", "bm8-bn8-perwidth1", "bm8-bn8-perwidth2", "bm8-bn16-ncols40",
        "bm32-bn32-perwidth1"])
def test_tile_schedule(bm, bn, n_cols, n_per_width):
    widths = (7, 33, 1, 20, 40)
    ids = _random_ids_with_repeats(23, len(widths), 2)
    ids[ids == 2] = 3  # expert 2 empty: it must own no tile
    r = build_routing(ids, widths)
    sched = tile_schedule(r, bm, bn, n_cols=n_cols, n_per_width=n_per_width).cpu()
    counts = r.counts.tolist()
    assert counts[2] == 0
    expected = _expected_tiles(counts, widths, bm, bn, n_cols, n_per_width)
    live = [tuple(row) for row in sched.tolist() if row[0] != -1]
    assert len(live) == len(set(live)), "a tile appears twice"
    assert sorted(live) == sorted(expected), "the tile set differs from cdiv(n_e,BM)*cdiv(N_e,BN) per expert"
    assert live == expected, "tiles must run expert by expert, row-major inside an expert"
    assert bool((sched[len(expected):] == -1).all()), "rows past the last tile must be -1"
    for e in range(len(widths)):
        cols = n_cols if n_cols is not None else n_per_width * widths[e]
        n_e = sum(1 for t in live if t[0] == e)
        assert n_e == triton.cdiv(counts[e], bm) * triton.cdiv(cols, bn), f"expert {e}"


@triton.jit
def _tiles_by_load_kernel(tiles_ptr, nt_ptr, load_ptr, out_ptr, E, E_PAD: tl.constexpr):
    o_e = tl.arange(0, E_PAD)
    m_e = o_e < E
    e, i_m, i_n = locate_tile_by_load(tl.program_id(0), tl.load(tiles_ptr + o_e, mask=m_e, other=0),
                                      tl.load(nt_ptr + o_e, mask=m_e, other=0),
                                      tl.load(load_ptr + o_e, mask=m_e, other=0), E_PAD)
    tl.store(out_ptr + tl.program_id(0) * 3 + 0, e)
    tl.store(out_ptr + tl.program_id(0) * 3 + 1, i_m)
    tl.store(out_ptr + tl.program_id(0) * 3 + 2, i_n)


@pytest.mark.parametrize("seed", range(4))
def test_locate_tile_by_load_runs_the_heaviest_experts_first(seed):
    """Every tile once; experts by decreasing load, ties by index; row-major within an expert.
    Experts with no tiles (a null expert's width 0) and with no load (no rows) included."""
    gen = torch.Generator().manual_seed(seed)
    E = 7
    row_tiles = torch.randint(0, 4, (E,), generator=gen)
    col_tiles = torch.randint(1, 4, (E,), generator=gen)
    load = torch.randint(0, 3, (E,), generator=gen) * 50  # few values: ties
    tiles = row_tiles * col_tiles
    total = int(tiles.sum())
    out = torch.full((total, 3), -1, dtype=torch.int32, device=DEVICE)
    to_dev = [t.to(torch.int32).to(DEVICE) for t in (tiles, col_tiles, load)]
    _tiles_by_load_kernel[(total,)](*to_dev, out, E, E_PAD=8)
    order = sorted(range(E), key=lambda e: (-int(load[e]), e))
    expected = [(e, i, j) for e in order for i in range(int(row_tiles[e])) for j in range(int(col_tiles[e]))]
    assert [tuple(r) for r in out.cpu().tolist()] == expected


def test_tile_schedule_zero_tokens():
    r = build_routing(torch.zeros(0, 2, dtype=torch.long, device=DEVICE), (7, 33))
    sched = tile_schedule(r, 16, 16)
    assert sched.shape[1] == 3 and bool((sched == -1).all())


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[-2], CASES[-1]], ids=_id)
@pytest.mark.parametrize("shared_width", [1, 24])
def test_add_shared_slot_equals_build_routing(case, shared_width):
    """The one-launch extension equals the routing of [T, k+1] ids whose last slot is id E, with
    null experts and out-of-range ids in the routed slots."""
    T, k, widths = case
    E = len(widths)
    ids = _random_ids_with_repeats(T, E, k)
    ids[::5, 0] = E + 3                                         # dropped ids move down by T too
    ext_ids = torch.cat([ids, torch.full((T, 1), E, device=DEVICE)], 1)
    want = build_routing(ext_ids, widths + (shared_width,))
    got = add_shared_slot(build_routing(ids, widths), shared_width)
    assert got.k == k + 1 and got.num_tokens == T and got.expert_widths == widths + (shared_width,)
    for name, a, b in zip(("counts", "offsets", "sorted_to_assign", "assign_to_sorted",
                           "ragged_offsets"), got.tensors(), want.tensors()):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"
