"""Routing metadata: from ``topk_ids`` to counts, offsets, the expert-sorted permutation and the
tile schedule of the grouped GEMMs, on the device, with no host synchronization.

Derivation and pictures: notebooks/02_routing.ipynb. Shape letters: see :mod:`vmoe.config`.

The data structure (:class:`Routing`), for ``A = T*k`` assignments, assignment ``a = t*k + j``
being slot j of token t, and ``E`` experts:

=================  ============  =========================================================
array              shape/dtype   meaning
=================  ============  =========================================================
counts             [E] int32     n_e, assignments routed to expert e
offsets            [E+1] int32   first sorted position of expert e; offsets[E] is the number
                                 of computed assignments: ids outside [0, E) and those of null
                                 experts (f_e = 0) sort after it, in assignment order
sorted_to_assign   [A] int32     sorted position -> assignment a (token a // k)
assign_to_sorted   [A] int32     assignment a -> sorted position; inverse of the above
ragged_offsets     [E+1] int64   first element of expert e's [n_e, f_e] block in the ragged
                                 intermediate, sum_{j<e} n_j * f_j
=================  ============  =========================================================

Within one expert, assignments keep their original order (the scatter is stable), so the
permutation equals ``torch.sort(topk_ids.flatten(), stable=True)`` when no expert is null.
A null expert keeps its count n_e (the aux losses need it), but its block of sorted rows is empty
(``offsets[e+1] = offsets[e]``), and no GEMM schedules a tile for it.

The tile schedule of a grouped GEMM over ragged row blocks is not stored: every GEMM program
rebuilds it from ``counts`` in its prologue (:func:`locate_tile`), because it depends on the
GEMM's block sizes, which autotuning chooses. :func:`tile_schedule` materialises it for reading.

Three launches, each bounded by what the host knows (A, E):
  1. ``_block_histogram_kernel`` (one program per BLOCK assignments): per-block expert counts.
  2. ``_block_scan_kernel`` (one program per expert): exclusive scan of its column over the
     blocks, and its total n_e.
  3. ``_scatter_kernel`` (one program per block): position = offsets[e] + earlier blocks' count
     + rank inside the block, the rank from a sort of the block's (expert, lane) keys and the
     block's own counts (the difference of its row of the scan and the next); program 0 also
     writes offsets and ragged_offsets.

:func:`finish_routing` runs launches 2 and 3 from block counts that another kernel wrote (the
fused router of :mod:`vmoe.ops.router` writes them beside the top-k), and :func:`scatter_routing`
launch 3 alone, from a scan done elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vmoe.ops.utils.device import INT32_MAX, cdiv, checking, device_ints, interpreting, new_empty, next_pow2
from vmoe.ops.utils.launch import launch


@dataclass
class Routing:
    """Routing metadata for one ``topk_ids``; see the module docstring for each array."""

    counts: torch.Tensor
    offsets: torch.Tensor
    sorted_to_assign: torch.Tensor
    assign_to_sorted: torch.Tensor
    ragged_offsets: torch.Tensor
    widths: torch.Tensor          # [E] int32 on the device, f_e
    expert_widths: tuple          # the same, on the host
    k: int
    num_tokens: int

    @classmethod
    def from_tensors(cls, tensors, expert_widths: tuple, k: int, num_tokens: int) -> "Routing":
        """The inverse of :meth:`tensors`: rebuild the metadata from its five arrays."""
        counts, offsets, sorted_to_assign, assign_to_sorted, ragged_offsets = tensors
        return cls(counts=counts, offsets=offsets, sorted_to_assign=sorted_to_assign,
                   assign_to_sorted=assign_to_sorted, ragged_offsets=ragged_offsets,
                   widths=device_ints(expert_widths, counts.device),
                   expert_widths=tuple(expert_widths), k=k, num_tokens=num_tokens)

    def tensors(self) -> tuple:
        """``(counts, offsets, sorted_to_assign, assign_to_sorted, ragged_offsets)``: the arrays
        that cross an operator boundary (:mod:`vmoe.library`); the rest follows from the widths, k
        and T."""
        return (self.counts, self.offsets, self.sorted_to_assign, self.assign_to_sorted,
                self.ragged_offsets)

    @property
    def num_experts(self) -> int:
        return len(self.expert_widths)

    @property
    def num_assignments(self) -> int:
        return self.num_tokens * self.k


@triton.jit
def _load_ids(ids_ptr, o_a, m_a, E):
    """Expert ids in int32, with every id outside [0, E) sent to the drop bin E (which sorts after
    every expert). The range test runs in the ids' own dtype, before narrowing: narrowing first
    would turn 2**32 + 1 into 1, a valid id."""
    b_id = tl.load(ids_ptr + o_a, mask=m_a, other=0)
    return tl.where((b_id >= 0) & (b_id < E), b_id, E).to(tl.int32)


@triton.jit(do_not_specialize=['A'])
def _block_histogram_kernel(ids_ptr, block_counts_ptr, A, E,
                            BLOCK: tl.constexpr, E1_PAD: tl.constexpr):
    i_b = tl.program_id(0)
    o_a = i_b * BLOCK + tl.arange(0, BLOCK)
    m_a = o_a < A
    b_id = _load_ids(ids_ptr, o_a, m_a, E)
    o_e = tl.arange(0, E1_PAD)
    b_hit = (b_id[:, None] == o_e[None, :]) & m_a[:, None]      # [BLOCK, E1_PAD]
    b_cnt = tl.sum(b_hit.to(tl.int32), axis=0)                  # [E1_PAD]
    tl.store(block_counts_ptr + i_b.to(tl.int64) * (E + 1) + o_e, b_cnt, mask=o_e < E + 1)  # may pass 2**31


@triton.jit
def scan_block_column(block_counts_ptr, block_prefix_ptr, counts_ptr, i_e, NB, E,
                      SCAN: tl.constexpr):
    """Column ``i_e`` of ``block_counts [NB, E+1]``: its exclusive scan over the blocks into the
    same column of ``block_prefix`` (which may be ``block_counts`` itself), and its total into
    ``counts[i_e]``. A helper, so that :mod:`vmoe.ops.router` can run it beside its own reduction."""
    carry = tl.zeros((), dtype=tl.int32)
    for i_start in range(0, NB, SCAN):
        o_b = i_start + tl.arange(0, SCAN)
        m_b = o_b < NB
        o_c = o_b.to(tl.int64) * (E + 1) + i_e
        b_c = tl.load(block_counts_ptr + o_c, mask=m_b, other=0)
        b_inc = tl.cumsum(b_c, axis=0)
        tl.store(block_prefix_ptr + o_c, carry + b_inc - b_c, mask=m_b)
        carry += tl.sum(b_c, axis=0)
    # Column E (the dropped ids) is scanned, for their sorted positions, but its total is unused.
    tl.store(counts_ptr + i_e, carry, mask=i_e < E)


@triton.jit(do_not_specialize=['NB'])
def _block_scan_kernel(block_counts_ptr, counts_ptr, NB, E, SCAN: tl.constexpr):
    # Column e of block_counts [NB, E+1] becomes its exclusive scan over blocks, in place.
    scan_block_column(block_counts_ptr, block_counts_ptr, counts_ptr, tl.program_id(0), NB, E, SCAN)


@triton.jit(do_not_specialize=['A'])
def _scatter_kernel(ids_ptr,                 # [A] any integer dtype
                    block_prefix_ptr,        # [NB, E+1] int32, exclusive scan over the blocks
                    counts_ptr,              # [E] int32
                    widths_ptr,              # [E] int32
                    offsets_ptr,             # [E+1] int32, written by program 0
                    ragged_offsets_ptr,      # [E+1] int64, written by program 0
                    sorted_to_assign_ptr,    # [A] int32
                    assign_to_sorted_ptr,    # [A] int32
                    A, E, BLOCK: tl.constexpr, BLOCK_PAD: tl.constexpr, E1_PAD: tl.constexpr):
    # BLOCK assignments per block; BLOCK_PAD, the power of two >= BLOCK, shapes the lanes (the
    # router's blocks hold BT*k assignments, not a power of two when k is not).
    #
    # No tile here grows with BLOCK_PAD**2 or BLOCK_PAD*E1_PAD. Ranking each lane among the
    # earlier lanes of its expert with a [BLOCK_PAD, BLOCK_PAD] comparison, and picking offsets[id]
    # with a [BLOCK_PAD, E1_PAD] one, spills 686-848 bytes per thread at BLOCK = 256 and takes
    # 360-450 µs for T*k = 131k (H200, Triton 3.6), against about 5 µs for a
    # sort of BLOCK_PAD keys, a few [E1_PAD] rows and one gather (vmoe/bench/probes/scatter.py).
    i_b = tl.program_id(0)
    o_e = tl.arange(0, E1_PAD)
    m_e = o_e < E + 1
    b_w = tl.load(widths_ptr + o_e, mask=o_e < E, other=0)
    # Null experts (f_e = 0) are counted but own no sorted rows: their assignments join the
    # drop bin E, so that every kernel downstream skips them by the one test p < offsets[E].
    b_live = (o_e < E) & (b_w > 0)
    b_null = (o_e < E) & (b_w == 0)
    b_cnt = tl.load(counts_ptr + o_e, mask=b_live, other=0)                    # [E1_PAD]
    b_off = tl.cumsum(b_cnt, axis=0) - b_cnt       # exclusive: offsets[e]; offsets[E] = computed
    if i_b == 0:
        tl.store(offsets_ptr + o_e, b_off, mask=m_e)
        b_elems = b_cnt.to(tl.int64) * b_w.to(tl.int64)
        tl.store(ragged_offsets_ptr + o_e, tl.cumsum(b_elems, axis=0) - b_elems, mask=m_e)

    # Per bin, everything this block needs, from its row of the scan and the next one, which
    # differ by the block's own counts (the totals stand in for the row after the last block):
    # earlier blocks' assignments (for the drop bin E, to it and to every null expert), and the
    # block's assignments to lower bins, where the bin's run starts in the block's sorted order.
    p_prefix = block_prefix_ptr + i_b.to(tl.int64) * (E + 1)   # NB * (E+1) may pass 2**31
    b_pre = tl.load(p_prefix + o_e, mask=m_e, other=0)                         # [E1_PAD]
    b_drop = tl.sum(tl.where(b_null | (o_e == E), b_pre, 0), axis=0)
    b_before = tl.where(o_e == E, b_drop, b_pre)
    has_next = i_b + 1 < tl.num_programs(0)
    # tl.where, not b_live & has_next: Triton 3.9's interpreter turns a block & a scalar bool into int32.
    m_next = tl.where(has_next, b_live, False)
    b_next = tl.where(has_next, tl.load(p_prefix + (E + 1) + o_e, mask=m_next, other=0), b_cnt)
    b_own = tl.where(b_live, b_next - b_pre, 0)
    b_run = tl.cumsum(b_own, axis=0) - b_own
    # Sorted slot s of a lane of bin e goes to position b_first[e] + s:
    # offsets[e] + earlier blocks' count + (s - the run's start) = the stable rank inside the block.
    b_first = b_off + b_before - b_run                                         # [E1_PAD]

    o_j = tl.arange(0, BLOCK_PAD)                     # lanes: the block's assignments in order
    n_lanes = tl.minimum(A - i_b * BLOCK, BLOCK)      # not i_b*BLOCK + o_j < A, which can wrap
    m_j = o_j < n_lanes
    b_id = _load_ids(ids_ptr, i_b * BLOCK + o_j, m_j, E)
    b_lane_w = tl.load(widths_ptr + b_id, mask=m_j & (b_id < E), other=0)
    # Lanes past the block's end join bin E too: as the highest lanes they sort after its real
    # assignments, so they move no real slot.
    b_id = tl.where(m_j & (b_lane_w > 0), b_id, E)
    # Key (bin, lane): the sort is by bin and, within a bin, by lane, i.e. stable. Below
    # E1_PAD * BLOCK_PAD, which scatter_routing keeps under 2**31.
    b_key = tl.sort(b_id * BLOCK_PAD + o_j)                                   # [BLOCK_PAD]
    o_s = tl.arange(0, BLOCK_PAD)                     # sorted slots
    o_js = b_key % BLOCK_PAD                          # the lane in slot s
    b_pos = tl.gather(b_first, b_key // BLOCK_PAD, 0) + o_s
    m_s = o_js < n_lanes
    o_as = i_b * BLOCK + o_js
    # The stores scatter by slot: nothing needs the lanes' order back in registers.
    tl.store(assign_to_sorted_ptr + o_as, b_pos, mask=m_s)
    tl.store(sorted_to_assign_ptr + b_pos, o_as, mask=m_s)


def _block_size(e1_pad: int) -> int:
    if interpreting():
        return 16  # small, so CPU tests cross several blocks
    return max(16, min(256, 8192 // e1_pad))


def build_routing(topk_ids: torch.Tensor, expert_widths: tuple) -> Routing:
    """Build the :class:`Routing` metadata of ``topk_ids`` ([T, k], any integer dtype).

    Ids outside ``[0, E)`` are dropped (they sort after every expert and contribute nothing);
    with VMOE_CHECK=1 they raise instead, at the cost of a host synchronization.
    """
    E = len(expert_widths)
    T, k = topk_ids.shape
    A = T * k
    if A > INT32_MAX:
        raise ValueError(f"topk_ids has {A} assignments; vmoe indexes them with int32 (< 2**31)")
    device = topk_ids.device
    if checking() and A:
        bad = (topk_ids < 0) | (topk_ids >= E)
        if bool(bad.any()):  # host-ok: opt-in validation under VMOE_CHECK=1
            raise ValueError(f"topk_ids holds ids outside [0, {E}): e.g. "
                             f"{int(topk_ids[bad][0])}")  # host-ok: error path only
    ids = topk_ids.contiguous().reshape(-1)
    E1_PAD = next_pow2(E + 1)
    BLOCK = _block_size(E1_PAD)
    NB = cdiv(A, BLOCK)
    block_counts = torch.empty((max(NB, 1), E + 1), dtype=torch.int32, device=device)
    if NB == 0:
        block_counts.zero_()
    else:
        launch(_block_histogram_kernel, (NB,), ids, block_counts, A, E, BLOCK=BLOCK, E1_PAD=E1_PAD)
    return finish_routing(topk_ids, block_counts, BLOCK, expert_widths)


def finish_routing(topk_ids: torch.Tensor, block_counts: torch.Tensor, block: int,
                   expert_widths: tuple) -> Routing:
    """Launches 2 and 3 of :func:`build_routing`, from block counts produced elsewhere.

    ``block_counts`` is ``[max(NB, 1), E+1]`` int32 in ``_block_histogram_kernel``'s layout for
    blocks of ``block`` assignments (any size >= 1), ``NB = cdiv(T*k, block)``, all zeros when
    T*k = 0; it is overwritten with its exclusive scan over the blocks.
    """
    E = len(expert_widths)
    counts = new_empty((E,), torch.int32, topk_ids.device)
    NB = block_counts.shape[0]
    SCAN = min(1024, next_pow2(NB)) if not interpreting() else 16
    launch(_block_scan_kernel, (E + 1,), block_counts, counts, NB, E, SCAN=SCAN)
    return scatter_routing(topk_ids, block_counts, counts, block, expert_widths)


def scatter_routing(topk_ids: torch.Tensor, block_prefix: torch.Tensor, counts: torch.Tensor,
                    block: int, expert_widths: tuple) -> Routing:
    """Launch 3 of :func:`build_routing` alone: the :class:`Routing` from the exclusive scan of the
    block counts over the blocks (``block_prefix [max(NB, 1), E+1]``) and the totals
    (``counts [E]``), for blocks of ``block`` assignments."""
    E = len(expert_widths)
    T, k = topk_ids.shape
    A = T * k
    device = topk_ids.device
    ids = topk_ids.contiguous().reshape(-1)
    offsets = new_empty((E + 1,), torch.int32, device)
    ragged_offsets = new_empty((E + 1,), torch.int64, device)
    sorted_to_assign = new_empty((A,), torch.int32, device)
    assign_to_sorted = new_empty((A,), torch.int32, device)
    widths = device_ints(expert_widths, device)
    BLOCK_PAD, E1_PAD = next_pow2(block), next_pow2(E + 1)
    if E1_PAD * BLOCK_PAD > INT32_MAX:
        raise ValueError(f"{E} experts and blocks of {block} assignments: the scatter's int32 sort "
                         "key (expert, lane) needs next_pow2(E+1) * next_pow2(block) < 2**31")
    launch(_scatter_kernel, (block_prefix.shape[0],),
           ids_ptr=ids, block_prefix_ptr=block_prefix, counts_ptr=counts, widths_ptr=widths,
           offsets_ptr=offsets, ragged_offsets_ptr=ragged_offsets,
           sorted_to_assign_ptr=sorted_to_assign, assign_to_sorted_ptr=assign_to_sorted,
           A=A, E=E, BLOCK=block, BLOCK_PAD=BLOCK_PAD, E1_PAD=E1_PAD)
    return Routing(counts=counts, offsets=offsets, sorted_to_assign=sorted_to_assign,
                   assign_to_sorted=assign_to_sorted, ragged_offsets=ragged_offsets,
                   widths=widths, expert_widths=tuple(expert_widths), k=k, num_tokens=T)


@triton.jit(do_not_specialize=['T', 'SHARED_ELEMS'])
def _shared_slot_kernel(a2s_ptr, counts_ptr, offsets_ptr, ragged_offsets_ptr,
                        counts_x_ptr, offsets_x_ptr, ragged_offsets_x_ptr, s2a_x_ptr, a2s_x_ptr,
                        T, E, SHARED_ELEMS, KTOP: tl.constexpr, BT: tl.constexpr,
                        E2_PAD: tl.constexpr):
    # The computed rows keep their positions; the shared expert's T rows follow them, in token
    # order; the rows after offsets[E] (dropped and null assignments) move down by T.
    i_b = tl.program_id(0)
    n_comp = tl.load(offsets_ptr + E)
    if i_b == 0:
        o_e = tl.arange(0, E2_PAD)
        b_c = tl.load(counts_ptr + o_e, mask=o_e < E, other=0)
        tl.store(counts_x_ptr + o_e, tl.where(o_e == E, T, b_c), mask=o_e < E + 1)
        b_o = tl.load(offsets_ptr + o_e, mask=o_e < E + 1, other=0)
        tl.store(offsets_x_ptr + o_e, tl.where(o_e == E + 1, n_comp + T, b_o), mask=o_e < E + 2)
        b_r = tl.load(ragged_offsets_ptr + o_e, mask=o_e < E + 1, other=0)
        r_end = tl.load(ragged_offsets_ptr + E) + SHARED_ELEMS     # + T * S
        tl.store(ragged_offsets_x_ptr + o_e, tl.where(o_e == E + 1, r_end, b_r), mask=o_e < E + 2)
    o_t = i_b * BT + tl.arange(0, BT)
    m_t = o_t < T
    for j in tl.static_range(KTOP):
        b_p = tl.load(a2s_ptr + o_t * KTOP + j, mask=m_t, other=0)
        b_p = tl.where(b_p < n_comp, b_p, b_p + T)
        o_a = o_t * (KTOP + 1) + j
        tl.store(a2s_x_ptr + o_a, b_p, mask=m_t)
        tl.store(s2a_x_ptr + b_p, o_a, mask=m_t)
    o_a = o_t * (KTOP + 1) + KTOP
    tl.store(a2s_x_ptr + o_a, n_comp + o_t, mask=m_t)
    tl.store(s2a_x_ptr + n_comp + o_t, o_a, mask=m_t)


def add_shared_slot(routing: Routing, shared_width: int) -> Routing:
    """The :class:`Routing` of ``[T, k+1]`` ids whose slot k is one more expert, id E, of width
    ``shared_width``, that every token gets: the always-on shared expert, run by the same GEMM
    launches as the routed ones. One launch, from ``routing`` (of the ``[T, k]`` routed ids);
    equal to ``build_routing`` of the extended ids."""
    E, T, k = routing.num_experts, routing.num_tokens, routing.k
    if T * (k + 1) > INT32_MAX:
        raise ValueError(f"{T} tokens with k+1 = {k + 1} slots make {T * (k + 1)} assignments; "
                         "vmoe indexes them with int32 (< 2**31)")
    device = routing.counts.device
    A = T * (k + 1)
    counts = new_empty((E + 1,), torch.int32, device)
    offsets = new_empty((E + 2,), torch.int32, device)
    ragged_offsets = new_empty((E + 2,), torch.int64, device)
    sorted_to_assign = new_empty((A,), torch.int32, device)
    assign_to_sorted = new_empty((A,), torch.int32, device)
    BT = 16 if interpreting() else 256
    launch(_shared_slot_kernel, (max(1, cdiv(T, BT)),),
        routing.assign_to_sorted, routing.counts, routing.offsets, routing.ragged_offsets,
        counts, offsets, ragged_offsets, sorted_to_assign, assign_to_sorted, T, E, T * shared_width,
        KTOP=k, BT=BT, E2_PAD=next_pow2(E + 2))
    widths = routing.expert_widths + (shared_width,)
    return Routing(counts=counts, offsets=offsets, sorted_to_assign=sorted_to_assign,
                   assign_to_sorted=assign_to_sorted, ragged_offsets=ragged_offsets,
                   widths=device_ints(widths, device), expert_widths=widths, k=k + 1, num_tokens=T)


@triton.jit
def schedule_prologue(counts_ptr, widths_ptr, E, N, N_PER_WIDTH: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, E_PAD: tl.constexpr):
    """Tiles per expert for a GEMM whose expert e has n_e rows and N_e columns.

    N_e is ``N_PER_WIDTH * f_e`` when N_PER_WIDTH > 0 (the columns follow the expert's width),
    else the fixed N (d). Returns (inclusive cumsum of tiles [E_PAD], column tiles [E_PAD],
    total tiles): the whole schedule, from E numbers, in registers.
    """
    o_e = tl.arange(0, E_PAD)
    # A null expert's assignments own no sorted rows (see the module docstring): no tiles, even
    # where N is the fixed d.
    b_live = tl.load(widths_ptr + o_e, mask=o_e < E, other=0) > 0
    b_n_rows = tl.load(counts_ptr + o_e, mask=b_live, other=0)
    b_n_cols = expert_dims(widths_ptr, E, N, N_PER_WIDTH, E_PAD)
    b_nt = tl.cdiv(b_n_cols, BN)
    b_tiles = tl.cdiv(b_n_rows, BM) * b_nt
    return tl.cumsum(b_tiles, axis=0), b_nt, tl.sum(b_tiles, axis=0)


@triton.jit
def expert_dims(widths_ptr, E, FIXED, PER_WIDTH: tl.constexpr, E_PAD: tl.constexpr):
    """[E_PAD] sizes of one GEMM dimension per expert: PER_WIDTH * f_e, or FIXED (d) when 0."""
    o_e = tl.arange(0, E_PAD)
    m_e = o_e < E
    if PER_WIDTH > 0:
        dims = tl.load(widths_ptr + o_e, mask=m_e, other=0) * PER_WIDTH
    else:
        dims = tl.where(m_e, FIXED, 0)
    return dims


@triton.jit
def locate_tile(tile_id, b_cum, b_nt, E_PAD: tl.constexpr):
    """Map a flat tile id to (expert e, row tile, column tile).

    ``b_cum`` is the inclusive cumsum of tiles per expert and ``b_nt`` the column tiles per expert
    (from :func:`schedule_prologue`). An expert's tiles are row-major, so consecutive programs
    share a row tile of A and sweep that expert's weight columns.
    """
    o_e = tl.arange(0, E_PAD)
    e = tl.sum((b_cum <= tile_id).to(tl.int32), axis=0)
    first = tl.sum(tl.where(o_e == e - 1, b_cum, 0), axis=0)
    # max(., 1): a tile id past the total lands on no expert; callers mask it.
    n_tiles = tl.maximum(tl.sum(tl.where(o_e == e, b_nt, 0), axis=0), 1)
    local = tile_id - first
    return e, local // n_tiles, local % n_tiles


# The weight gradients order their tiles by load up to this many experts (padded), where it was
# measured: at E = 8 on an H100 it saves 12% of the experts' forward + backward at a trained
# router's skew and costs under 1% evenly routed (results/NOTES.md, "The study at d=768"). Above
# it the tiles keep their experts' index order: the [E_PAD, E_PAD] comparison grows with E, and
# no larger layer has been timed with it.
LOAD_ORDER_MAX_E = tl.constexpr(16)


@triton.jit
def locate_tile_by_load(tile_id, b_tiles, b_nt, b_load, E_PAD: tl.constexpr):
    """:func:`locate_tile` with the experts' tiles in order of decreasing load.

    ``b_tiles`` is the tiles per expert, ``b_nt`` the column tiles per expert and ``b_load`` a
    per-expert cost of one tile (a weight gradient's tile loops over all of the expert's rows, so
    its rows). The heaviest tiles are launched first, so that they do not run alone at the end
    of the grid (longest-processing-time-first); ties keep the experts' index order. Only the
    order of the programs changes: each tile is still computed by one program, in one order, so
    the result is bitwise the same. ``tile_id`` must be below the total number of tiles.
    """
    o_e = tl.arange(0, E_PAD)
    # first[e]: the tiles of every expert that goes before e.
    goes_before = (b_load[:, None] > b_load[None, :]) | (
        (b_load[:, None] == b_load[None, :]) & (o_e[:, None] < o_e[None, :]))
    first = tl.sum(tl.where(goes_before, b_tiles[:, None], 0), axis=0)
    hit = (first <= tile_id) & (tile_id < first + b_tiles)
    e = tl.sum(tl.where(hit, o_e, 0), axis=0)
    local = tile_id - tl.sum(tl.where(hit, first, 0), axis=0)
    n_tiles = tl.maximum(tl.sum(tl.where(hit, b_nt, 0), axis=0), 1)
    return e, local // n_tiles, local % n_tiles


@triton.jit(do_not_specialize=['max_tiles'])
def _tile_schedule_kernel(counts_ptr, widths_ptr, out_ptr, max_tiles, E, N,
                          N_PER_WIDTH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          E_PAD: tl.constexpr):
    i_t = tl.program_id(0)
    b_cum, b_nt, total = schedule_prologue(counts_ptr, widths_ptr, E, N, N_PER_WIDTH, BM, BN, E_PAD)
    e, i_m, i_n = locate_tile(i_t, b_cum, b_nt, E_PAD)
    live = i_t < total
    e = tl.where(live, e, -1)
    i_m = tl.where(live, i_m, -1)
    i_n = tl.where(live, i_n, -1)
    tl.store(out_ptr + i_t * 3 + 0, e)
    tl.store(out_ptr + i_t * 3 + 1, i_m)
    tl.store(out_ptr + i_t * 3 + 2, i_n)


def max_row_tiles(num_assignments: int, num_experts: int, bm: int) -> int:
    """An upper bound on sum_e cdiv(n_e, BM) over all routings: full tiles plus one partial each."""
    return cdiv(num_assignments, bm) + num_experts


def tile_schedule(routing: Routing, bm: int, bn: int, n_cols: int | None = None,
                  n_per_width: int = 1) -> torch.Tensor:
    """Materialise a grouped GEMM's tile schedule: for reading and drawing, and for the
    warp-specialized kernel (:mod:`vmoe.ops.grouped_gemm`), which cannot rebuild it in registers.

    Returns ``[max_tiles, 3]`` int32 rows ``(expert, row tile, column tile)``; rows past the real
    number of tiles hold -1. Columns follow the expert's width times ``n_per_width`` unless
    ``n_cols`` fixes them (the down projection's d).
    """
    E = routing.num_experts
    if n_cols is None:
        per_width, N = n_per_width, 0
        n_tiles_max = max(cdiv(n_per_width * f, bn) for f in routing.expert_widths)
    else:
        per_width, N = 0, n_cols
        n_tiles_max = cdiv(n_cols, bn)
    max_tiles = max_row_tiles(routing.num_assignments, E, bm) * n_tiles_max
    out = new_empty((max_tiles, 3), torch.int32, routing.counts.device)
    launch(_tile_schedule_kernel, (max_tiles,), routing.counts, routing.widths, out, max_tiles, E, N,
           N_PER_WIDTH=per_width, BM=bm, BN=bn, E_PAD=next_pow2(E))
    return out
