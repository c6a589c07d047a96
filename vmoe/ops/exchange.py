"""The buffers of the expert-parallel exchange (:mod:`vmoe.parallel`): which rows a rank sends to
which rank, the send buffer with each row's slots beside it, and the deterministic sum of the rows
that come back, on the device, with no host synchronization.

Derivation and a worked example: notebooks/09_parallel.ipynb. Shape letters: see
:mod:`vmoe.config`; also W ranks (q a destination), n chunks of TC tokens (the local tokens split
for pipelining; n = 1 without), ``NB = n*W`` bins (chunk, destination), K slots per row
(``min(k, most experts of nonzero width on a rank)``) and, in the capacity mode, C rows per bin.

**One row per (token, destination rank).** Token t sends x[t] once to every rank that holds one of
its k experts, whatever the number of them there, with those slots beside it: the receiver's local
ids (in slot order, packed first) and their routing weights; the row's other slots name the
receiver's null expert (id ``L_q``, width 0: vmoe's kernels give it no rows, and it adds exactly 0),
with weight 0. A null expert of the full layer (width 0) is on no rank: its slots never travel.

The plan (:class:`ExchangePlan`), for ``A = T*W`` (token, rank) pairs, pair ``a = t*W + q``:

=================  ==============  ============================================================
array              shape/dtype     meaning
=================  ==============  ============================================================
owner              [E] int32       rank of expert e; -1 for a null expert (its slots stay home)
local_index        [E] int32       e's index among its rank's experts (its id there)
null_id            [W] int32       L_q, the number of rank q's experts: its null expert's id
dest               [T, W] int32    bin ``c*W + q`` of pair a when token t (of chunk c = t // TC)
                                   has a slot on q, else NB (a null bin: no row)
routing            :class:`vmoe.ops.routing.Routing` of ``dest`` over NB + 1 bins of widths
                                   (1, ..., 1, 0) (bin NB a null expert rather than an id out of
                                   range, which VMOE_CHECK=1 would reject): counts [NB+1] (rows
                                   per bin; bin NB counts the pairs without a row), offsets
                                   [NB+2], sorted_to_assign [A] (sorted position -> pair) and
                                   assign_to_sorted [A] (pair -> sorted position). Sorted means
                                   by chunk, then destination, then token; the pairs without a
                                   row sort after offsets[NB]
=================  ==============  ============================================================

Row p of chunk c's send buffer:

- ``sync`` (``capacity`` None): sorted position ``offsets[c*W] + p``. Chunk c sends
  ``counts[c*W + q]`` rows to rank q, which the host must know (:mod:`vmoe.parallel` reads the
  counts once per layer).
- ``capacity``: bin ``b = c*W + p // C``, position ``i = p % C`` in it; sorted position
  ``offsets[b] + i`` when ``i < counts[b]``, else an empty row (zeros, every slot the null expert).
  Every bin holds C rows, so the sizes are known without reading anything back; the pairs past C
  in a bin (in token order) are dropped: their row is not sent, and their slots add nothing.

Each chunk's buffers: x rows ``[rows, d]`` and ``side [rows, 2K]`` float32 (float64 for float64
x): the K local ids as floats (exact below 2**24), then the K weights (exact in float32).

Launches (:func:`plan_exchange`, :func:`dispatch`, :func:`combine`, :func:`weight_grad`):

1. ``_destinations_kernel`` (BT tokens a program): ``dest`` from topk_ids and ``owner``.
2. :func:`vmoe.ops.routing.build_routing` of ``dest`` (three launches).
3. ``_dispatch_kernel`` (per chunk; BR rows x BD columns a program): the send buffer, and the side
   columns from the programs of the first column block. Without its side (``side=None``) it is
   the combine's backward: ``dy`` rows by their token, zeros for an empty row.
4. ``_combine_kernel`` (per chunk; BT tokens x BD columns a program): ``out[t] = base[t] +
   sum_q rows[row(t, q)]`` over the ranks q that hold a row of t, in the fixed order q = 0..W-1,
   in float32: deterministic, with no atomics. Also the dispatch's backward for x.
5. ``_weight_grad_kernel`` (per chunk): the dispatch's backward for the routing weights, the
   weight gradient of each slot read from the side gradient of the row it travelled in.

Every launcher has a torch twin in :mod:`vmoe.reference` (``reference.exchange_*``) with the same
results, for ``impl="reference"`` (and a CPU without the interpreter); tests/test_parallel.py holds
the two to the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vmoe import reference
from vmoe.ops.routing import Routing, build_routing
from vmoe.ops.utils.device import cdiv, interpreting, new_empty, next_pow2
from vmoe.ops.utils.launch import launch


@dataclass
class ExchangePlan:
    """Where every (token, rank) row of one layer call goes; see the module docstring."""

    routing: Routing              # of dest [T, W] over NB + 1 bins
    owner: torch.Tensor           # [E] int32
    local_index: torch.Tensor     # [E] int32
    null_id: torch.Tensor         # [W] int32
    world: int                    # W
    chunks: int                   # n
    chunk_tokens: int             # TC
    num_tokens: int               # T
    k: int
    slots: int                    # K
    capacity: int | None          # C rows per bin, or None (sync: sizes from the counts)
    send_splits: list | None = None   # [n][W] rows chunk c sends to each rank (host ints)
    recv_splits: list | None = None   # [n][W] rows chunk c receives from each rank

    @property
    def bins(self) -> int:
        return self.chunks * self.world

    def live_chunks(self):
        """``(c, t0, t1)`` for each chunk c that holds tokens ``[t0, t1)``."""
        for c in range(self.chunks):
            t0, t1 = self.tokens(c)
            if t1 > t0:
                yield c, t0, t1

    def tokens(self, c: int) -> tuple[int, int]:
        """The token range [t0, t1) of chunk c."""
        t0 = min(c * self.chunk_tokens, self.num_tokens)
        return t0, min(t0 + self.chunk_tokens, self.num_tokens)

    def rows(self, c: int) -> int:
        """Rows of chunk c's send buffer."""
        if self.capacity is not None:
            return self.world * self.capacity
        return sum(self.send_splits[c])


def placement_tables(placement, expert_widths) -> tuple[tuple, tuple, tuple]:
    """``(owner, local_index, null_id)`` of a placement (see the module docstring), as host tuples."""
    E = len(expert_widths)
    owner, local = [-1] * E, [0] * E
    for r, experts in enumerate(placement):
        for i, e in enumerate(experts):
            local[e] = i
            if expert_widths[e]:
                owner[e] = r
    return tuple(owner), tuple(local), tuple(len(experts) for experts in placement)


def row_slots(k: int, placement, expert_widths) -> int:
    """K: the slots a row needs, ``min(k, most experts of nonzero width on one rank)`` (a token's k
    experts are distinct, as a top-k router picks them)."""
    most = max(sum(1 for e in experts if expert_widths[e]) for experts in placement)
    return max(1, min(k, most))


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _slot_owner(ids_ptr, owner_ptr, o_t, m_t, j, E, KTOP: tl.constexpr):
    """The rank that owns slot j of tokens ``o_t`` (-1 for an id outside [0, E) or a masked
    token), and the mask of the slots whose id is in range."""
    b_id = tl.load(ids_ptr + o_t * KTOP + j, mask=m_t, other=-1)
    m_id = m_t & (b_id >= 0) & (b_id < E)
    return tl.load(owner_ptr + b_id, mask=m_id, other=-1), m_id


@triton.jit(do_not_specialize=['T', 'NB', 'TC'])
def _destinations_kernel(ids_ptr,      # [T, KTOP] any integer dtype
                         owner_ptr,    # [E] int32
                         dest_ptr,     # [T, W] int32
                         T, E, NB, TC,
                         KTOP: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr,
                         BT: tl.constexpr):
    i_t = tl.program_id(0).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_q = tl.arange(0, W_PAD)
    b_hit = tl.zeros((BT, W_PAD), dtype=tl.int32)
    for j in tl.static_range(KTOP):
        b_own, _ = _slot_owner(ids_ptr, owner_ptr, o_t, m_t, j, E, KTOP)
        b_hit += (b_own[:, None] == o_q[None, :]).to(tl.int32)          # [BT, W_PAD]
    b_bin = (o_t // TC)[:, None] * W + o_q[None, :]
    b_dest = tl.where(b_hit > 0, b_bin, NB).to(tl.int32)
    tl.store(dest_ptr + o_t[:, None] * W + o_q[None, :], b_dest,
             mask=m_t[:, None] & (o_q < W)[None, :])


@triton.jit
def _row_of_pair(a2s_ptr, offsets_ptr, o_t, b_q, m, chunk, NB, C, W: tl.constexpr,
                 CAPACITY: tl.constexpr):
    """Row (in chunk ``chunk``'s buffer) of the pairs (o_t, b_q), and whether it exists: the pair
    has a row, and, in the capacity mode, it is within its bin's C."""
    n_valid = tl.load(offsets_ptr + NB)
    b_pos = tl.load(a2s_ptr + o_t * W + b_q, mask=m, other=0)
    m_row = m & (b_pos < n_valid)
    if CAPACITY:
        b_first = tl.load(offsets_ptr + chunk * W + b_q, mask=m_row, other=0)
        b_i = b_pos - b_first
        m_row = m_row & (b_i < C)
        b_row = b_q * C + b_i
    else:
        b_row = b_pos - tl.load(offsets_ptr + chunk * W)
    return b_row.to(tl.int64), m_row


@triton.heuristics({"HAS_SIDE": lambda a: a["side_ptr"] is not None})
@triton.jit(do_not_specialize=['rows', 'C', 'chunk'])
def _dispatch_kernel(x_ptr,          # [T, D] rows by token (x, or the combine's dy)
                     out_ptr,        # [rows, D] the chunk's send rows
                     side_ptr,       # [rows, 2K] float: K local ids, then K weights; or None
                     ids_ptr,        # [T, KTOP] any integer dtype
                     w_ptr,          # [T, KTOP] routing weights
                     owner_ptr,      # [E] int32
                     local_ptr,      # [E] int32
                     null_ptr,       # [W] int32
                     s2a_ptr,        # [T*W] int32 sorted position -> pair
                     offsets_ptr,    # [NB+2] int32
                     rows, D, E, C, chunk, stride_x, stride_o,
                     W: tl.constexpr, KTOP: tl.constexpr, K: tl.constexpr,
                     CAPACITY: tl.constexpr, HAS_SIDE: tl.constexpr,
                     BR: tl.constexpr, BD: tl.constexpr):
    i_r, i_d = tl.program_id(0), tl.program_id(1)
    o_r = i_r.to(tl.int64) * BR + tl.arange(0, BR)
    o_d = i_d * BD + tl.arange(0, BD)
    m_r = o_r < rows
    m_d = o_d < D
    if CAPACITY:
        b_bin = chunk * W + o_r // C
        b_i = o_r % C
        b_first = tl.load(offsets_ptr + b_bin, mask=m_r, other=0)
        b_n = tl.load(offsets_ptr + b_bin + 1, mask=m_r, other=0) - b_first
        m_live = m_r & (b_i < b_n)
        b_pos = b_first + b_i
        b_q = (o_r // C).to(tl.int32)          # an empty row's destination too
    else:
        b_pos = tl.load(offsets_ptr + chunk * W) + o_r
        m_live = m_r
    b_a = tl.load(s2a_ptr + b_pos, mask=m_live, other=0)
    b_t = (b_a // W).to(tl.int64)
    if not CAPACITY:
        b_q = b_a % W
    b_x = tl.load(x_ptr + b_t[:, None] * stride_x + o_d[None, :],
                  mask=m_live[:, None] & m_d[None, :], other=0.0)      # [BR, BD]
    tl.store(out_ptr + o_r[:, None] * stride_o + o_d[None, :], b_x,
             mask=m_r[:, None] & m_d[None, :])
    if HAS_SIDE:
        if i_d == 0:
            p_side = side_ptr + o_r * (2 * K)
            b_null = tl.load(null_ptr + b_q, mask=m_r, other=0).to(tl.float32)
            # The row's slots, packed first in slot order: cnt is the next free one.
            b_cnt = tl.zeros((BR,), dtype=tl.int32)
            for j in tl.static_range(KTOP):
                b_id = tl.load(ids_ptr + b_t * KTOP + j, mask=m_live, other=-1)
                m_id = m_live & (b_id >= 0) & (b_id < E)
                b_own = tl.load(owner_ptr + b_id, mask=m_id, other=-1)
                m_on = m_id & (b_own == b_q) & (b_cnt < K)
                b_loc = tl.load(local_ptr + b_id, mask=m_on, other=0)
                b_w = tl.load(w_ptr + b_t * KTOP + j, mask=m_on, other=0.0)
                tl.store(p_side + b_cnt, b_loc.to(tl.float32), mask=m_on)
                tl.store(p_side + K + b_cnt, b_w.to(tl.float32), mask=m_on)
                b_cnt += m_on.to(tl.int32)
            for s in tl.static_range(K):
                m_pad = m_r & (b_cnt <= s)
                tl.store(p_side + s, b_null, mask=m_pad)
                tl.store(p_side + K + s, tl.zeros((BR,), dtype=tl.float32), mask=m_pad)


@triton.heuristics({"HAS_BASE": lambda a: a["base_ptr"] is not None})
@triton.jit(do_not_specialize=['t0', 'n_tokens', 'NB', 'C', 'chunk'])
def _combine_kernel(ys_ptr,        # [rows, D] the chunk's returned rows
                    base_ptr,      # [T, D] added first (the shared expert's output), or None
                    out_ptr,       # [T, D]
                    a2s_ptr,       # [T*W] int32 pair -> sorted position
                    offsets_ptr,   # [NB+2] int32
                    t0, n_tokens, D, NB, C, chunk, stride_ys, stride_base, stride_o,
                    W: tl.constexpr, CAPACITY: tl.constexpr, HAS_BASE: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr):
    i_t, i_d = tl.program_id(0), tl.program_id(1)
    o_j = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_t = t0 + o_j
    o_d = i_d * BD + tl.arange(0, BD)
    m_t = o_j < n_tokens
    m_d = o_d < D
    m = m_t[:, None] & m_d[None, :]
    if HAS_BASE:
        acc = tl.load(base_ptr + o_t[:, None] * stride_base + o_d[None, :], mask=m,
                      other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BT, BD), dtype=tl.float32)
    for q in tl.static_range(W):                       # fixed rank order: deterministic
        b_q = tl.zeros((BT,), dtype=tl.int32) + q
        b_row, m_row = _row_of_pair(a2s_ptr, offsets_ptr, o_t, b_q, m_t, chunk, NB, C, W,
                                    CAPACITY)
        acc += tl.load(ys_ptr + b_row[:, None] * stride_ys + o_d[None, :],
                       mask=m_row[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + o_t[:, None] * stride_o + o_d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m)


@triton.jit(do_not_specialize=['t0', 'n_tokens', 'NB', 'C', 'chunk'])
def _weight_grad_kernel(dside_ptr,     # [rows, 2K] the side's gradient (weights in columns K..2K)
                        ids_ptr,       # [T, KTOP] any integer dtype
                        owner_ptr,     # [E] int32
                        a2s_ptr,       # [T*W] int32
                        offsets_ptr,   # [NB+2] int32
                        dw_ptr,        # [T, KTOP]
                        t0, n_tokens, E, NB, C, chunk,
                        W: tl.constexpr, W_PAD: tl.constexpr, KTOP: tl.constexpr,
                        K: tl.constexpr, CAPACITY: tl.constexpr, BT: tl.constexpr):
    i_t = tl.program_id(0)
    o_j = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_t = t0 + o_j
    m_t = o_j < n_tokens
    o_q = tl.arange(0, W_PAD)
    # Slots already packed into each destination's row: slot j sits at cnt[owner(j)].
    b_cnt = tl.zeros((BT, W_PAD), dtype=tl.int32)
    for j in tl.static_range(KTOP):
        b_own, m_id = _slot_owner(ids_ptr, owner_ptr, o_t, m_t, j, E, KTOP)
        b_hot = b_own[:, None] == o_q[None, :]                               # [BT, W_PAD]
        b_slot = tl.sum(tl.where(b_hot, b_cnt, 0), axis=1)
        b_cnt += b_hot.to(tl.int32)
        m_on = m_id & (b_own >= 0) & (b_slot < K)
        b_q = tl.where(m_on, b_own, 0)
        b_row, m_row = _row_of_pair(a2s_ptr, offsets_ptr, o_t, b_q, m_on, chunk, NB, C, W,
                                    CAPACITY)
        b_dw = tl.load(dside_ptr + b_row * (2 * K) + K + b_slot, mask=m_row, other=0.0)
        tl.store(dw_ptr + o_t * KTOP + j, b_dw.to(dw_ptr.dtype.element_ty), mask=m_t)


def _blocks(rows_per_prog: int, d: int) -> tuple[int, int]:
    if interpreting():
        return 4, 16
    return rows_per_prog, max(16, min(512, next_pow2(d)))


# ---------------------------------------------------------------------------------------------
# Launchers


def plan_exchange(topk_ids: torch.Tensor, owner: torch.Tensor, local_index: torch.Tensor,
                  null_id: torch.Tensor, *, world: int, chunks: int, slots: int,
                  capacity: int | None, use_triton: bool = True) -> ExchangePlan:
    """The :class:`ExchangePlan` of ``topk_ids [T, k]``: ``dest`` and its routing, on the device.
    In the sync mode (``capacity`` None) the split sizes are left for the caller to fill from the
    counts. ``use_triton=False`` builds the same with torch ops."""
    T, k = topk_ids.shape
    TC = max(1, cdiv(T, chunks))
    NB = chunks * world
    widths = (1,) * NB + (0,)
    if use_triton:
        dest = new_empty((T, world), torch.int32, topk_ids.device)
        if T:
            BT = 16 if interpreting() else 128
            launch(_destinations_kernel, (cdiv(T, BT),),
                   ids_ptr=topk_ids.contiguous(), owner_ptr=owner, dest_ptr=dest,
                   T=T, E=owner.shape[0], NB=NB, TC=TC, KTOP=k, W=world, W_PAD=next_pow2(world),
                   BT=BT)
        routing = build_routing(dest, widths)
    else:
        dest = reference.exchange_destinations(topk_ids, owner, world, TC, NB)
        counts, offsets, s2a, a2s = reference.routing(dest, NB + 1, widths)
        routing = Routing.from_tensors((counts.to(torch.int32), offsets.to(torch.int32),
                                        s2a.to(torch.int32), a2s.to(torch.int32), offsets),
                                       widths, world, T)
    plan = ExchangePlan(routing=routing, owner=owner, local_index=local_index, null_id=null_id,
                        world=world, chunks=chunks, chunk_tokens=TC, num_tokens=T, k=k,
                        slots=slots, capacity=capacity)
    if capacity is not None:
        plan.send_splits = plan.recv_splits = [[capacity] * world for _ in range(chunks)]
    return plan


def _side_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dispatch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor | None,
             plan: ExchangePlan, use_triton: bool = True) -> list:
    """Chunk by chunk, the send buffer ``[rows, d]`` of ``x [T, d]`` and its side ``[rows, 2K]``
    (the row's local ids, then weights), as a list of ``(rows, side)``. With ``topk_weights``
    None, the rows alone (``side`` None): the combine's backward, dy rows by their token."""
    out = []
    D, K = x.shape[1], plan.slots
    x = x if x.stride(1) == 1 else x.contiguous()
    has_side = topk_weights is not None
    if has_side:
        topk_ids, topk_weights = topk_ids.contiguous(), topk_weights.contiguous()
    for c in range(plan.chunks):
        rows = plan.rows(c)
        buf = new_empty((rows, D), x.dtype, x.device)
        side = new_empty((rows, 2 * K), _side_dtype(x.dtype), x.device) if has_side else None
        if not use_triton:
            reference.exchange_dispatch(x, topk_ids, topk_weights, plan, c, buf, side)
        elif rows:
            BR, BD = _blocks(16, D)
            r = plan.routing
            launch(_dispatch_kernel, (cdiv(rows, BR), cdiv(D, BD)),
                   x_ptr=x, out_ptr=buf, side_ptr=side,
                   ids_ptr=topk_ids if has_side else None,
                   w_ptr=topk_weights,
                   owner_ptr=plan.owner if has_side else None,
                   local_ptr=plan.local_index if has_side else None,
                   null_ptr=plan.null_id if has_side else None,
                   s2a_ptr=r.sorted_to_assign, offsets_ptr=r.offsets,
                   rows=rows, D=D, E=plan.owner.shape[0], C=plan.capacity or 1, chunk=c,
                   stride_x=x.stride(0), stride_o=buf.stride(0), W=plan.world, KTOP=plan.k,
                   K=K, CAPACITY=plan.capacity is not None, BR=BR, BD=BD)
        out.append((buf, side))
    return out


def combine(ys, plan: ExchangePlan, base: torch.Tensor | None = None,
            use_triton: bool = True) -> torch.Tensor:
    """``out[t] = base[t] + sum_q ys_c[row(t, q)]`` ``[T, d]``, ``ys`` one ``[rows, d]`` tensor per
    chunk, summed over the ranks q in order 0..W-1 in float32 (deterministic); ``base`` None adds
    nothing. Tokens with no row and no base get zeros."""
    D, dtype, device = ys[0].shape[1], ys[0].dtype, ys[0].device
    out = new_empty((plan.num_tokens, D), dtype, device)
    for c, t0, t1 in plan.live_chunks():
        y = ys[c]
        if not use_triton:
            reference.exchange_combine(y, plan, c, base, out)
            continue
        BT, BD = _blocks(16, D)
        launch(_combine_kernel, (cdiv(t1 - t0, BT), cdiv(D, BD)),
               ys_ptr=y, base_ptr=base, out_ptr=out, a2s_ptr=plan.routing.assign_to_sorted,
               offsets_ptr=plan.routing.offsets, t0=t0, n_tokens=t1 - t0, D=D, NB=plan.bins,
               C=plan.capacity or 1, chunk=c, stride_ys=y.stride(0),
               stride_base=base.stride(0) if base is not None else 0, stride_o=out.stride(0),
               W=plan.world, CAPACITY=plan.capacity is not None, BT=BT, BD=BD)
    return out


def weight_grad(dsides, topk_ids: torch.Tensor, plan: ExchangePlan, dtype: torch.dtype,
                use_triton: bool = True) -> torch.Tensor:
    """The gradient of the routing weights ``[T, k]`` from the side gradients (one ``[rows, 2K]``
    per chunk): each slot's from the row it travelled in, 0 for a slot that did not travel."""
    T, k = plan.num_tokens, plan.k
    dw = new_empty((T, k), dtype, topk_ids.device)
    for c, t0, t1 in plan.live_chunks():
        dside = dsides[c]
        if not use_triton:
            reference.exchange_weight_grad(dside, topk_ids, plan, c, dw)
            continue
        BT = 16 if interpreting() else 128
        launch(_weight_grad_kernel, (cdiv(t1 - t0, BT),),
               dside_ptr=dside.contiguous(), ids_ptr=topk_ids.contiguous(), owner_ptr=plan.owner,
               a2s_ptr=plan.routing.assign_to_sorted, offsets_ptr=plan.routing.offsets,
               dw_ptr=dw, t0=t0, n_tokens=t1 - t0, E=plan.owner.shape[0], NB=plan.bins,
               C=plan.capacity or 1, chunk=c, W=plan.world, W_PAD=next_pow2(plan.world), KTOP=k,
               K=plan.slots, CAPACITY=plan.capacity is not None, BT=BT)
    return dw
