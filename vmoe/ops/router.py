"""The fused router: from router logits to the top-k, the routing metadata and the auxiliary
losses in three launches, and the gradient of the logits in one, with no host synchronization.

Shape letters: see :mod:`vmoe.config`; BT is the tokens per program (:func:`route_block_tokens`),
``NB = max(cdiv(T, BT), 1)`` the token blocks and ``NUM_GROUPS`` the groups of experts (the ``count`` of
each ``(count, width)`` pair of ``MoEConfig.expert_sizes``). The router GEMM stays in cuBLAS.

Forward, three launches:
  1. ``_route_fwd_kernel`` (one program per BT tokens): probabilities, logsumexp, top-k, weights,
     and the block statistics below.
  2. ``_route_stats_kernel`` (E + 2 programs): programs 0..E scan one column of the block
     histogram over the blocks (:func:`vmoe.ops.routing.scan_block_column`); program E + 1 reduces
     the block statistics in block order (deterministic, no float atomics) and computes the
     losses. The scan writes its prefix to a separate array, so that the last program can read
     the raw histogram at the same time.
  3. ``vmoe.ops.routing._scatter_kernel``: the expert-sorted permutation (:func:`scatter_routing`).
No separate launch makes the histogram (as :func:`vmoe.ops.routing.build_routing` does for ids
it is given): kernel 1 writes the histogram in that layout, for blocks of ``BT*k`` assignments
(assignment ``a = t*k + j``).

Backward, one launch: ``_route_bwd_kernel`` (one program per BT tokens) recomputes P and the
logsumexp from the saved logits, and every program recomputes the loss gradient with respect to
``p_sum`` from E numbers, so no step runs between the losses and the logits.

The arrays:

=================  ==============  ==============================================================
array              shape/dtype     meaning
=================  ==============  ==============================================================
logits             [T, E] float    router logits (any float dtype; computed in fp32)
P                  (not stored)    router probabilities: sigmoid(logits), or softmax over E
lse                (not stored)    logsumexp_e logits[t, e], for the z-loss
topk_ids           [T, k] int32    the k experts of token t, in descending P; ties go to the
                                   lower expert id, so the ids equal the first k of
                                   ``torch.sort(P, descending=True, stable=True)``
topk_weights       [T, k] fp32     P[t, topk_ids[t, j]], divided by their sum over j when
                                   ``norm_topk_prob``
block_counts       [NB, E+1] int32 assignments of token block b to expert e; column E (dropped
                                   ids) is 0. Exactly ``_block_histogram_kernel``'s layout for
                                   blocks of BT*k assignments
p_partial          [NB, E] fp32    sum of P[t, e] over the tokens of block b
lse_partial        [NB] fp32       sum of lse_t^2 over the tokens of block b
block_prefix       [NB, E+1] int32 exclusive scan of block_counts over the blocks
counts             [E] int32       n_e, assignments per expert
p_sum              [E] fp32        sum_t P[t, e]
lse_sq_sum         [] fp32         sum_t lse_t^2
z_loss, lb_loss,   [] fp32 each    router_z_loss, load_balance_loss and compute_loss, as
compute_loss                       ``MoEMLP.aux_losses`` defines them; all 0 when T = 0. Three
                                   tensors, not views of one: the gradient of a view would cost
                                   the backward a zero-fill, a copy and an add per loss
f_i                [E] fp32        n_e / max(T*k, 1), the fraction of assignments per expert
group_ids          [E] int32       the group of expert e (host-built, cached on the device)
=================  ==============  ==============================================================

NaN logits: P is NaN where the logit is (every P of the row under softmax), and NaN ranks above
every number, as in ``torch.sort``; so the row's top slots hold its NaN experts, lowest id
first (under softmax: ids 0..k-1), their weights are NaN (every weight of the row under
``norm_topk_prob``), and the losses are NaN. The other rows are unaffected.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vmoe.config import ROUTERS
from vmoe.ops.routing import scan_block_column, scatter_routing
from vmoe.ops.utils.device import INT32_MAX, cdiv, device_ints, interpreting, new_empty, next_pow2
from vmoe.ops.utils.launch import launch


@triton.jit
def _probs(b_x, SOFTMAX: tl.constexpr):
    """P, lse and softmax of a ``[BT, E_PAD]`` logit tile whose padding holds -inf."""
    b_m = tl.max(b_x, axis=1)
    b_m = tl.where(b_m == float("-inf"), 0.0, b_m)     # an all -inf row: lse -inf, not NaN
    b_ex = tl.exp(b_x - b_m[:, None])
    b_s = tl.sum(b_ex, axis=1)
    b_lse = b_m + tl.log(b_s)                           # [BT]
    b_sm = b_ex / b_s[:, None]                          # softmax, [BT, E_PAD]
    if SOFTMAX:
        b_p = b_sm
    else:
        b_p = 1.0 / (1.0 + tl.exp(-b_x))
    return b_p, b_lse, b_sm


@triton.jit
def _group_total(b_in, b_v):
    """For each expert, the sum of ``b_v [E_PAD]`` over its group; ``b_in [GROUPS_PAD, E_PAD]`` says
    which experts each group holds."""
    b_g = tl.sum(tl.where(b_in, b_v[None, :], 0.0), axis=1)          # [GROUPS_PAD]
    return tl.sum(tl.where(b_in, b_g[:, None], 0.0), axis=0)          # [E_PAD]


@triton.jit
def _balance_terms(b_n, b_ps, b_gid, m_e, inv_t, GROUPS_PAD: tl.constexpr):
    """Per expert: the group membership matrix [GROUPS_PAD, E_PAD], f (count over the group's count),
    p_mean, the group's total of p_mean, and the group's size |g|."""
    o_g = tl.arange(0, GROUPS_PAD)
    b_in = (b_gid[None, :] == o_g[:, None]) & m_e[None, :]            # [GROUPS_PAD, E_PAD]
    b_pm = b_ps * inv_t                                               # p_mean, [E_PAD]
    b_f = b_n / tl.maximum(_group_total(b_in, b_n), 1.0)
    b_pg = _group_total(b_in, b_pm)
    b_size = _group_total(b_in, tl.where(m_e, 1.0, 0.0))              # |g| of e's group
    return b_in, b_f, b_pm, b_pg, b_size


@triton.jit
def _aux_losses(b_n, b_ps, lse_sq_sum, b_gid, b_w, m_e, inv_t, E, NUM_GROUPS, GROUPS_PAD: tl.constexpr):
    """``MoEMLP.aux_losses`` from the statistics: (router_z_loss, load_balance_loss, compute_loss).
    ``inv_t`` is 1 / max(T, 1), a host float: an int argument equal to 1 would be specialised."""
    _, b_f, b_pm, b_pg, b_size = _balance_terms(b_n, b_ps, b_gid, m_e, inv_t, GROUPS_PAD)
    b_p = b_pm / tl.maximum(b_pg, 1e-20)
    # sum_g |g| sum_{i in g} f_i p_i, one term per expert.
    lb = tl.sum(tl.where(m_e, b_size * b_f * b_p, 0.0), axis=0) / NUM_GROUPS
    mean_w = tl.sum(b_w, axis=0) / E
    compute = tl.sum(tl.where(m_e, b_ps * b_w, 0.0), axis=0) * inv_t / mean_w
    return lse_sq_sum * inv_t, lb, compute


@triton.jit
def _aux_losses_grad(b_n, b_ps, b_gid, b_w, m_e, inv_t, E, NUM_GROUPS, d_lb, d_c, GROUPS_PAD: tl.constexpr):
    """The gradient of ``d_lb * lb + d_c * compute`` w.r.t. p_sum, ``[E_PAD]`` (counts have none;
    the z-loss is ``lse_sq_sum / T``)."""
    b_in, b_f, b_pm, b_pg, b_size = _balance_terms(b_n, b_ps, b_gid, m_e, inv_t, GROUPS_PAD)
    b_d = tl.maximum(b_pg, 1e-20)
    # p_i = pm_i / D_g: d/dpm_i of sum_j f_j p_j is f_i / D_g - sum_j f_j pm_j / D_g^2, the second
    # term only where the clamp is inactive (torch's clamp_min passes the gradient at x >= min).
    b_fpm = _group_total(b_in, b_f * b_pm)
    b_dd = tl.where(b_pg >= 1e-20, b_fpm / (b_d * b_d), 0.0)
    b_dpm = d_lb / NUM_GROUPS * b_size * (b_f / b_d - b_dd)
    mean_w = tl.sum(b_w, axis=0) / E
    b_dps = (b_dpm + d_c * b_w / mean_w) * inv_t
    return tl.where(m_e, b_dps, 0.0)


@triton.jit(do_not_specialize=['T'])
def _route_fwd_kernel(logits_ptr,         # [T, E] row stride stride_l
                      ids_ptr,            # [T, k] int32
                      weights_ptr,        # [T, k] the experts' dtype
                      block_counts_ptr,   # [NB, E+1] int32
                      p_partial_ptr,      # [NB, E] fp32
                      lse_partial_ptr,    # [NB] fp32
                      T, E, stride_l,
                      KTOP: tl.constexpr, K_PAD: tl.constexpr, SOFTMAX: tl.constexpr,
                      NORM: tl.constexpr, BT: tl.constexpr, E_PAD: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    o_t = i_b * BT + tl.arange(0, BT)
    o_e = tl.arange(0, E_PAD)
    o_k = tl.arange(0, K_PAD)
    m_t = o_t < T
    m_e = o_e < E
    # Rows past T read 0 (finite, so that no dead lane computes log(0)); padding columns -inf.
    b_x = tl.load(logits_ptr + o_t[:, None] * stride_l + o_e[None, :],
                  mask=m_t[:, None] & m_e[None, :], other=0.0).to(tl.float32)
    b_x = tl.where(m_e[None, :], b_x, float("-inf"))                   # [BT, E_PAD]
    b_p, b_lse, _ = _probs(b_x, SOFTMAX)                               # [BT, E_PAD], [BT]

    # Top-k by k rounds of max, then the lowest id holding it: a stable descending sort. The key
    # ranks NaN first (as torch.sort does), and padding and chosen experts (-1) last; P >= 0.
    b_key = tl.where(b_p != b_p, 2.0, b_p)  # noqa: PLR0124 (the NaN test; isnan is libdevice)
    b_key = tl.where(m_e[None, :], b_key, -1.0)
    b_ids = tl.zeros((BT, K_PAD), dtype=tl.int32)
    b_w = tl.zeros((BT, K_PAD), dtype=tl.float32)
    for j in tl.static_range(KTOP):
        b_max = tl.max(b_key, axis=1)                                  # [BT]
        b_idx = tl.min(tl.where(b_key == b_max[:, None], o_e[None, :], E_PAD), axis=1)
        b_hit = o_e[None, :] == b_idx[:, None]                         # [BT, E_PAD]
        b_pj = tl.sum(tl.where(b_hit, b_p, 0.0), axis=1)               # [BT]
        b_ids = tl.where(o_k[None, :] == j, b_idx[:, None], b_ids)
        b_w = tl.where(o_k[None, :] == j, b_pj[:, None], b_w)
        b_key = tl.where(b_hit, -1.0, b_key)
    if NORM:
        b_w = b_w / tl.sum(b_w, axis=1)[:, None]
    o_tk = o_t[:, None] * KTOP + o_k[None, :]
    m_tk = m_t[:, None] & (o_k < KTOP)[None, :]
    tl.store(ids_ptr + o_tk, b_ids, mask=m_tk)
    tl.store(weights_ptr + o_tk, b_w.to(weights_ptr.dtype.element_ty), mask=m_tk)

    # Block statistics over the block's real tokens. The ids of a row are distinct, so the
    # histogram counts the chosen (key -1) real experts.
    b_chosen = (b_key < -0.5) & m_e[None, :] & m_t[:, None]
    b_cnt = tl.sum(b_chosen.to(tl.int32), axis=0)                      # [E_PAD]
    # NB * (E+1) can pass 2**31 (many experts, few tokens per block): int64 row bases.
    p_c = block_counts_ptr + i_b.to(tl.int64) * (E + 1)
    tl.store(p_c + o_e, b_cnt, mask=m_e)
    tl.store(p_c + E, 0)                                               # drop bin: ids are in [0, E)
    b_psum = tl.sum(tl.where(m_t[:, None], b_p, 0.0), axis=0)          # [E_PAD]
    tl.store(p_partial_ptr + i_b.to(tl.int64) * E + o_e, b_psum, mask=m_e)
    tl.store(lse_partial_ptr + i_b, tl.sum(tl.where(m_t, b_lse * b_lse, 0.0), axis=0))


@triton.jit(do_not_specialize=['NB'])
def _route_stats_kernel(block_counts_ptr,    # [NB, E+1] int32, read only
                        block_prefix_ptr,    # [NB, E+1] int32
                        counts_ptr,          # [E] int32
                        p_partial_ptr,       # [NB, E] fp32
                        lse_partial_ptr,     # [NB] fp32
                        group_ptr,           # [E] int32
                        widths_ptr,          # [E] int32
                        p_sum_ptr,           # [E] fp32
                        lse_sq_sum_ptr,      # [] fp32
                        z_loss_ptr,          # [] fp32
                        lb_loss_ptr,         # [] fp32
                        compute_loss_ptr,    # [] fp32
                        frac_ptr,            # [E] fp32
                        NB, E, NUM_GROUPS, inv_t, inv_a,
                        SCAN: tl.constexpr, SB: tl.constexpr, E_PAD: tl.constexpr,
                        GROUPS_PAD: tl.constexpr):
    i_p = tl.program_id(0)
    if i_p <= E:
        scan_block_column(block_counts_ptr, block_prefix_ptr, counts_ptr, i_p, NB, E, SCAN)
    else:
        o_e = tl.arange(0, E_PAD)
        m_e = o_e < E
        b_n = tl.zeros((E_PAD,), dtype=tl.int32)
        b_ps = tl.zeros((E_PAD,), dtype=tl.float32)
        b_lsq = tl.zeros((SB,), dtype=tl.float32)
        for i_start in range(0, NB, SB):                               # block order: deterministic
            o_b = i_start + tl.arange(0, SB)
            m_b = o_b < NB
            o_b64 = o_b.to(tl.int64)
            m = m_b[:, None] & m_e[None, :]
            b_n += tl.sum(tl.load(block_counts_ptr + o_b64[:, None] * (E + 1) + o_e[None, :],
                                  mask=m, other=0), axis=0)
            b_ps += tl.sum(tl.load(p_partial_ptr + o_b64[:, None] * E + o_e[None, :],
                                   mask=m, other=0.0), axis=0)
            b_lsq += tl.load(lse_partial_ptr + o_b64, mask=m_b, other=0.0)
        lse_sq_sum = tl.sum(b_lsq, axis=0)
        b_nf = b_n.to(tl.float32)
        tl.store(p_sum_ptr + o_e, b_ps, mask=m_e)
        tl.store(lse_sq_sum_ptr, lse_sq_sum)
        tl.store(frac_ptr + o_e, b_nf * inv_a, mask=m_e)
        b_gid = tl.load(group_ptr + o_e, mask=m_e, other=-1)
        b_w = tl.load(widths_ptr + o_e, mask=m_e, other=0).to(tl.float32)
        z, lb, compute = _aux_losses(b_nf, b_ps, lse_sq_sum, b_gid, b_w, m_e, inv_t, E, NUM_GROUPS,
                                      GROUPS_PAD)
        tl.store(z_loss_ptr, z)
        tl.store(lb_loss_ptr, lb)
        tl.store(compute_loss_ptr, compute)


@triton.heuristics({
    "HAS_DW": lambda a: a["d_weights_ptr"] is not None,
    "HAS_DPS": lambda a: a["d_p_sum_ptr"] is not None,
    "HAS_DLSQ": lambda a: a["d_lse_sq_sum_ptr"] is not None,
    "HAS_DZ": lambda a: a["d_z_loss_ptr"] is not None,
    "HAS_DLB": lambda a: a["d_lb_loss_ptr"] is not None,
    "HAS_DC": lambda a: a["d_compute_loss_ptr"] is not None,
})
@triton.jit(do_not_specialize=['T'])
def _route_bwd_kernel(logits_ptr,          # [T, E] row stride stride_l
                      ids_ptr,             # [T, k] int32
                      d_weights_ptr,       # [T, k]
                      d_p_sum_ptr,         # [E]
                      d_lse_sq_sum_ptr,    # []
                      d_z_loss_ptr,        # []
                      d_lb_loss_ptr,       # []
                      d_compute_loss_ptr,  # []
                      counts_ptr,          # [E] int32
                      p_sum_ptr,           # [E] fp32
                      group_ptr,           # [E] int32
                      widths_ptr,          # [E] int32
                      d_logits_ptr,        # [T, E] row stride stride_d
                      T, E, NUM_GROUPS, inv_t, stride_l, stride_d,
                      KTOP: tl.constexpr, SOFTMAX: tl.constexpr, NORM: tl.constexpr,
                      BT: tl.constexpr, E_PAD: tl.constexpr, GROUPS_PAD: tl.constexpr,
                      HAS_DW: tl.constexpr, HAS_DPS: tl.constexpr, HAS_DLSQ: tl.constexpr,
                      HAS_DZ: tl.constexpr, HAS_DLB: tl.constexpr, HAS_DC: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    o_t = i_b * BT + tl.arange(0, BT)
    o_e = tl.arange(0, E_PAD)
    m_t = o_t < T
    m_e = o_e < E
    m = m_t[:, None] & m_e[None, :]
    b_x = tl.load(logits_ptr + o_t[:, None] * stride_l + o_e[None, :], mask=m,
                  other=0.0).to(tl.float32)
    b_x = tl.where(m_e[None, :], b_x, float("-inf"))                   # as in the forward
    b_p, b_lse, b_sm = _probs(b_x, SOFTMAX)

    # dL/dP [BT, E_PAD] and dL/d(lse_sq_sum), from every upstream gradient given.
    b_dp = tl.zeros((BT, E_PAD), dtype=tl.float32)
    d_lsq = tl.zeros((), dtype=tl.float32)
    if HAS_DPS:
        b_dp += tl.load(d_p_sum_ptr + o_e, mask=m_e, other=0.0).to(tl.float32)[None, :]
    if HAS_DLSQ:
        d_lsq += tl.load(d_lse_sq_sum_ptr).to(tl.float32)
    if HAS_DZ:
        d_lsq += tl.load(d_z_loss_ptr).to(tl.float32) * inv_t           # z = lse_sq_sum / T
    if HAS_DLB or HAS_DC:
        d_lb = tl.zeros((), dtype=tl.float32)
        d_c = tl.zeros((), dtype=tl.float32)
        if HAS_DLB:
            d_lb += tl.load(d_lb_loss_ptr).to(tl.float32)
        if HAS_DC:
            d_c += tl.load(d_compute_loss_ptr).to(tl.float32)
        b_n = tl.load(counts_ptr + o_e, mask=m_e, other=0).to(tl.float32)
        b_ps = tl.load(p_sum_ptr + o_e, mask=m_e, other=0.0)
        b_gid = tl.load(group_ptr + o_e, mask=m_e, other=-1)
        b_w = tl.load(widths_ptr + o_e, mask=m_e, other=0).to(tl.float32)
        b_dps = _aux_losses_grad(b_n, b_ps, b_gid, b_w, m_e, inv_t, E, NUM_GROUPS, d_lb, d_c, GROUPS_PAD)
        b_dp += b_dps[None, :]
    if HAS_DW:
        # The slot gradients spread onto their experts' columns; ids of a row are distinct.
        b_g = tl.zeros((BT, E_PAD), dtype=tl.float32)
        b_sel = tl.zeros((BT, E_PAD), dtype=tl.int1)
        for j in tl.static_range(KTOP):
            b_id = tl.load(ids_ptr + o_t * KTOP + j, mask=m_t, other=-1)
            b_gj = tl.load(d_weights_ptr + o_t * KTOP + j, mask=m_t, other=0.0).to(tl.float32)
            b_hit = o_e[None, :] == b_id[:, None]
            b_g = tl.where(b_hit, b_gj[:, None], b_g)
            b_sel = b_sel | b_hit
        if NORM:
            # w_j = P_j / S: dP_j = (g_j - sum_i g_i w_i) / S on the chosen experts.
            b_pc = tl.where(b_sel, b_p, 0.0)
            b_s = tl.where(m_t, tl.sum(b_pc, axis=1), 1.0)             # [BT]; rows past T: 1
            b_gw = tl.sum(b_g * b_pc, axis=1) / b_s
            b_dp += tl.where(b_sel, (b_g - b_gw[:, None]) / b_s[:, None], 0.0)
        else:
            b_dp += b_g
    b_dlse = 2.0 * b_lse * d_lsq                                       # [BT]
    if SOFTMAX:
        b_dpp = tl.sum(tl.where(m, b_p * b_dp, 0.0), axis=1)
        b_dx = b_p * (b_dp - b_dpp[:, None] + b_dlse[:, None])
    else:
        b_q = 1.0 / (1.0 + tl.exp(b_x))                                # 1 - P, without cancellation
        b_dx = b_dp * b_p * b_q + b_dlse[:, None] * b_sm
    tl.store(d_logits_ptr + o_t[:, None] * stride_d + o_e[None, :],
             b_dx.to(d_logits_ptr.dtype.element_ty), mask=m)


def route_block_tokens(num_experts: int, k: int) -> int:
    """BT, the tokens per program of the forward and backward kernels, from static sizes only; a
    routing block holds ``BT*k`` assignments.

    On the GPU: at most 256 assignments per block (the scatter sorts a block's assignments in
    registers, :mod:`vmoe.ops.routing`) and 8192 logits per tile. In the
    interpreter, 4 tokens, so that tiny tests cross several blocks.
    """
    if interpreting():
        return 4
    bt = max(1, min(256 // k, 8192 // next_pow2(num_experts)))
    return 1 << (bt.bit_length() - 1)


def _check(logits: torch.Tensor, k: int, router: str) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a [T, E] float tensor, got {tuple(logits.shape)} "
                         f"{logits.dtype}")
    T, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, E] = [1, {E}], got {k}")
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    if T * k > INT32_MAX:
        raise ValueError(f"{T}*{k} assignments; vmoe indexes them with int32 (< 2**31)")


@functools.lru_cache(maxsize=None)
def _group_tuple(group_sizes: tuple, num_experts: int) -> tuple:
    if sum(group_sizes) != num_experts or min(group_sizes) < 1:
        raise ValueError(f"group_sizes {list(group_sizes)} must be >= 1 and sum to E = "
                         f"{num_experts}")
    return tuple(g for g, n in enumerate(group_sizes) for _ in range(n))


def _group_ids(group_sizes, num_experts: int, device) -> torch.Tensor:
    """Each expert's load-balance group, ``[E]`` int32 on the device (cached, like the widths)."""
    return device_ints(_group_tuple(tuple(group_sizes), num_experts), device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def route_fwd(logits: torch.Tensor, k: int, router: str, norm_topk_prob: bool,
              weights_dtype: torch.dtype = torch.float32):
    """Launch 1: ``(topk_ids [T, k] int32, topk_weights [T, k], block_counts [NB, E+1] int32,
    p_partial [NB, E] fp32, lse_partial [NB] fp32)``; see the module docstring. The weights are
    computed in fp32 and stored in ``weights_dtype``, the experts' dtype, so that no cast kernel
    runs between the router and the experts."""
    _check(logits, k, router)
    logits = _rows(logits)
    T, E = logits.shape
    BT = route_block_tokens(E, k)
    NB = max(cdiv(T, BT), 1)  # one all-masked program writes zero statistics when T = 0
    dev = logits.device
    ids = new_empty((T, k), torch.int32, dev)
    weights = new_empty((T, k), weights_dtype, dev)
    block_counts = new_empty((NB, E + 1), torch.int32, dev)
    p_partial = new_empty((NB, E), torch.float32, dev)
    lse_partial = new_empty((NB,), torch.float32, dev)
    launch(_route_fwd_kernel, (NB,),
        logits_ptr=logits, ids_ptr=ids, weights_ptr=weights, block_counts_ptr=block_counts,
        p_partial_ptr=p_partial, lse_partial_ptr=lse_partial,
        T=T, E=E, stride_l=logits.stride(0),
        KTOP=k, K_PAD=next_pow2(k), SOFTMAX=router == "softmax", NORM=bool(norm_topk_prob),
        BT=BT, E_PAD=next_pow2(E))
    return ids, weights, block_counts, p_partial, lse_partial


def route_stats(block_counts: torch.Tensor, p_partial: torch.Tensor, lse_partial: torch.Tensor,
                num_tokens: int, k: int, expert_widths, group_sizes):
    """Launch 2: ``(block_prefix [NB, E+1] int32, counts [E] int32, p_sum [E] fp32,
    lse_sq_sum [] fp32, z_loss [] fp32, lb_loss [] fp32, compute_loss [] fp32, f_i [E] fp32)``
    from launch 1's block statistics; ``block_counts`` is left as it is.

    ``expert_widths``: the E widths f_e; ``group_sizes``: the experts in each load-balance group,
    in order (the counts of ``MoEConfig.expert_sizes``).
    """
    NB, E1 = block_counts.shape
    E = E1 - 1
    if len(expert_widths) != E:
        raise ValueError(f"expert_widths has {len(expert_widths)} entries for E = {E} experts")
    dev = block_counts.device
    group_ids = _group_ids(group_sizes, E, dev)
    widths = device_ints(tuple(expert_widths), dev)
    block_prefix = new_empty((NB, E + 1), torch.int32, dev)
    counts = new_empty((E,), torch.int32, dev)
    p_sum = new_empty((E,), torch.float32, dev)
    lse_sq_sum, z_loss, lb_loss, compute_loss = (new_empty((), torch.float32, dev)
                                                 for _ in range(4))
    f_i = new_empty((E,), torch.float32, dev)
    E_PAD = next_pow2(E)
    if interpreting():
        SCAN, SB = 16, 4  # small, so that tiny tests loop
    else:
        SCAN, SB = min(1024, next_pow2(NB)), max(1, min(next_pow2(NB), 8192 // E_PAD))
    launch(_route_stats_kernel, (E + 2,),
        block_counts_ptr=block_counts, block_prefix_ptr=block_prefix, counts_ptr=counts,
        p_partial_ptr=p_partial, lse_partial_ptr=lse_partial, group_ptr=group_ids,
        widths_ptr=widths, p_sum_ptr=p_sum, lse_sq_sum_ptr=lse_sq_sum, z_loss_ptr=z_loss,
        lb_loss_ptr=lb_loss, compute_loss_ptr=compute_loss, frac_ptr=f_i,
        NB=NB, E=E, NUM_GROUPS=len(group_sizes), inv_t=1.0 / max(num_tokens, 1),
        inv_a=1.0 / max(num_tokens * k, 1),
        SCAN=SCAN, SB=SB, E_PAD=E_PAD, GROUPS_PAD=next_pow2(len(group_sizes)))
    return block_prefix, counts, p_sum, lse_sq_sum, z_loss, lb_loss, compute_loss, f_i


def route_bwd(logits: torch.Tensor, topk_ids: torch.Tensor, d_topk_weights: torch.Tensor | None,
              d_p_sum: torch.Tensor | None, d_lse_sq_sum: torch.Tensor | None,
              d_z_loss: torch.Tensor | None, d_lb_loss: torch.Tensor | None,
              d_compute_loss: torch.Tensor | None, counts: torch.Tensor | None,
              p_sum: torch.Tensor | None, router: str, norm_topk_prob: bool,
              expert_widths, group_sizes) -> torch.Tensor:
    """The one backward launch: ``d_logits [T, E]`` (logits' dtype) from any of the gradients of
    ``topk_weights [T, k]``, ``p_sum [E]``, ``lse_sq_sum []`` and the three losses (None: zero).

    ``counts`` and ``p_sum`` (launch 2's), the widths and the groups are read only for the
    load-balance and compute losses.
    """
    k = topk_ids.shape[1]
    _check(logits, k, router)
    logits = _rows(logits)
    T, E = logits.shape
    dev = logits.device
    has_stats = d_lb_loss is not None or d_compute_loss is not None
    if has_stats and (counts is None or p_sum is None):
        raise ValueError("the gradient of load_balance_loss or compute_loss needs counts and "
                         "p_sum")
    d_logits = new_empty((T, E), logits.dtype, dev)
    if T == 0:
        return d_logits
    # Autograd hands out expanded (stride-0) gradients, e.g. of p_sum.sum(): make them real.
    d_topk_weights, d_p_sum = (None if g is None else g.contiguous()
                               for g in (d_topk_weights, d_p_sum))
    BT = route_block_tokens(E, k)
    num_groups = len(group_sizes)
    launch(_route_bwd_kernel, (cdiv(T, BT),),
        logits_ptr=logits, ids_ptr=topk_ids.contiguous(), d_weights_ptr=d_topk_weights,
        d_p_sum_ptr=d_p_sum, d_lse_sq_sum_ptr=d_lse_sq_sum, d_z_loss_ptr=d_z_loss,
        d_lb_loss_ptr=d_lb_loss, d_compute_loss_ptr=d_compute_loss,
        counts_ptr=counts if has_stats else None, p_sum_ptr=p_sum if has_stats else None,
        group_ptr=_group_ids(group_sizes, E, dev) if has_stats else None,
        widths_ptr=device_ints(tuple(expert_widths), dev) if has_stats else None,
        d_logits_ptr=d_logits, T=T, E=E, NUM_GROUPS=num_groups, inv_t=1.0 / T, stride_l=logits.stride(0),
        stride_d=d_logits.stride(0), KTOP=k, SOFTMAX=router == "softmax",
        NORM=bool(norm_topk_prob), BT=BT, E_PAD=next_pow2(E), GROUPS_PAD=next_pow2(num_groups))
    return d_logits


def route_impl(logits: torch.Tensor, k: int, router: str, norm_topk_prob: bool, expert_widths,
               group_sizes, weights_dtype: torch.dtype = torch.float32):
    """The three forward launches, from the logits to everything the layer needs:
    ``(topk_weights, p_sum, lse_sq_sum, z_loss, lb_loss, compute_loss, topk_ids, f_i)`` followed by
    the five routing arrays of :meth:`vmoe.ops.routing.Routing.tensors`. The first six are
    differentiable (:class:`vmoe.autograd.RouteFunction`); the backward is :func:`route_bwd`."""
    T = logits.shape[0]
    ids, weights, block_counts, p_partial, lse_partial = route_fwd(logits, k, router,
                                                                    norm_topk_prob, weights_dtype)
    (block_prefix, counts, p_sum, lse_sq_sum, z_loss, lb_loss, compute_loss,
     f_i) = route_stats(block_counts, p_partial, lse_partial, T, k, expert_widths, group_sizes)
    routing = scatter_routing(ids, block_prefix, counts, route_block_tokens(len(expert_widths), k) * k,
                              tuple(expert_widths))
    return (weights, p_sum, lse_sq_sum, z_loss, lb_loss, compute_loss, ids, f_i, *routing.tensors())
