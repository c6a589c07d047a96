"""Grouped GEMMs over ragged row blocks: the up projection (activation fused in the epilogue), the
down projection, and their backward (the activation derivative fused in the epilogue, and the
weight gradients reduced over each expert's rows).

Derivation, the version ladder and the padding it avoids: notebooks/04_grouped_gemm.ipynb and
notebooks/05_autograd.ipynb. Shape letters: see :mod:`vmoe.config`; ``g`` is the gate factor
(2 for swiglu, else 1) and ``A = T*k``.

Layouts:
  * sorted rows: ``[A, d]``, row p is sorted position p (:mod:`vmoe.ops.routing`).
  * ragged: expert e's ``[n_e, g*f_e]`` block starts at element ``g*ragged_offsets[e]``, row-major,
    so the whole tensor holds sum_e n_e*g*f_e elements, whatever the widths. Its buffer is sized
    for the worst routing, ``A * g * max(f_e)``: the exact size lives on the device, and reading
    it back would be a host synchronization.
  * w1 ``[d, g*F]``: expert e owns columns ``[g*o_e, g*(o_e+f_e))`` (gate first, then up).
    w2 ``[F, d]``: expert e owns rows ``[o_e, o_e+f_e)``.
  * per expert, when every expert has the same width I: w1 ``[E, d, g*I]`` and w2 ``[E, I, d]``,
    expert e's block being ``w[e]``, with any strides for which :func:`per_expert_weight` holds.
    A transformers experts module stores ``gate_up_proj [E, 2I, d]`` and ``down_proj [E, d, I]``
    (``nn.Linear``'s out-by-in); ``.transpose(1, 2)`` of each is this layout with no copy
    (:mod:`vmoe.hf`). The kernels address any weight as ``base + o_e*stride_be + r*stride_r +
    c*stride_c``; with o_e = e*I, ``stride_be = w.stride(0) / I`` reaches ``w[e]``
    (:func:`_expert_strides`). Its gradients come back with the weight's own strides, so that a
    parameter seen through a transposed view receives its gradient in its own layout.

Two kernels serve all six GEMMs. ``_rows_kernel`` computes ``C[rows of e] = A[rows of e] @ B_e`` for
each expert, over a persistent grid whose tile schedule is rebuilt on the device from the counts
(:func:`vmoe.ops.routing.schedule_prologue`). ``_wgrad_kernel`` computes ``A_e^T @ B_e`` over each
expert's rows; its tiles are known on the host (they depend only on the widths and d), and each
loops over all of its expert's rows, so in layers of up to ``LOAD_ORDER_MAX_E`` experts the most
loaded experts' tiles are launched first (:func:`vmoe.ops.routing.locate_tile_by_load`): a router
that sends most slots to a few narrow experts otherwise leaves their few long tiles running alone
at the end.

On a Hopper GPU both also have a tensor-descriptor (TMA) path, chosen by the autotuner among its
configs where :func:`tma_eligible` holds (16-bit dtypes, widths and d in multiples of 8): each
expert's blocks become descriptors, whose zero-filled loads and clipped stores replace the masks
(notebook 04, v5). A third kernel, ``_rows_ws_kernel``, takes the two ragged-to-sorted GEMMs
(down_proj and dX) at large sizes: descriptor loads only, persistent and warp-specialized, its
tiles read from a schedule in memory. ``VMOE_TMA`` / :class:`tma_mode` choose (auto, off, only).
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from vmoe.config import column_offsets, gate_factor
from vmoe.ops.activations import ACT_CODES, act_bwd, act_fwd, swiglu_bwd, swiglu_fwd
from vmoe.ops.routing import (
    LOAD_ORDER_MAX_E,
    Routing,
    expert_dims,
    locate_tile,
    locate_tile_by_load,
    max_row_tiles,
    schedule_prologue,
    tile_schedule,
)
from vmoe.ops.utils.device import (
    cdiv,
    device_ints,
    dot_dtype_flag,
    interpreting,
    new_empty,
    next_pow2,
    poisoning,
)
from vmoe.ops.utils.launch import launch
from vmoe.ops.utils.tuning import autotune

# Operand modes of the row kernel and the weight-gradient kernel.
SORTED = 0    # dense [A, *], row p is sorted position p
GATHERED = 1  # dense [T, *], row p is token sorted_to_assign[p] // k (the gather, fused)
RAGGED = 2    # ragged [n_e, g*f_e] blocks

# Epilogues of the row kernel.
EPI_STORE = 0     # C = acc
EPI_ACT = 1       # Z = acc (optional), H = act(Z)
EPI_ACT_BWD = 2   # dZ = acc * act'(Z)

# The same codes, as constants the kernels can read.
SORTED_C = tl.constexpr(SORTED)
GATHERED_C = tl.constexpr(GATHERED)
RAGGED_C = tl.constexpr(RAGGED)
EPI_STORE_C = tl.constexpr(EPI_STORE)
EPI_ACT_C = tl.constexpr(EPI_ACT)

# The config's TMA level: pointer loads and stores; descriptor loads (a ragged A, the weight, a
# ragged weight-gradient operand); and also descriptor stores and loads in the row kernel's
# epilogue.
TMA_OFF, TMA_LOADS, TMA_EPILOGUE = 0, 1, 2
TMA_EPILOGUE_C = tl.constexpr(TMA_EPILOGUE)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting, so an fp32 layer is as exact as torch's.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _persistent_programs(device: torch.device, max_tiles: int) -> int:
    if device.type != "cuda":
        return max(1, min(max_tiles, 3))  # the interpreter runs programs one by one
    return max(1, min(max_tiles, 2 * _num_sms(device.index or 0)))


@triton.jit
def _expert_geometry(e, widths_ptr, woffsets_ptr, ragged_offsets_ptr, DIM1_FIXED, DIM2_FIXED,
                     DIM1_PER_WIDTH: tl.constexpr, DIM2_PER_WIDTH: tl.constexpr,
                     ALIGN: tl.constexpr):
    """Expert e's width f_e, its first column o_e (int64), its ragged base (in units of g), and two
    GEMM sizes, each ``PER_WIDTH * f_e`` or, when PER_WIDTH is 0, the FIXED argument (d).

    ALIGN is the largest power of two up to 16 that divides every width, so it also divides o_e
    and the ragged bases: saying so lets the compiler issue loads of ALIGN elements (16 bytes for
    bf16 once ALIGN >= 8) and pipeline them with cp.async instead of scalar, synchronous ones.
    With a width of 610 and no hint (a bool flag for "all multiples of 16" gave none) the
    experts took 2.3x the GPU time of 608 (results/NOTES.md, "Alignment hints"). The hints sit on the
    loaded values themselves; on a product they would be lost wherever a factor of 1 folds the
    product away. The sizes are built from these hinted values or from arguments (whose
    divisibility the launcher specializes), never from a reduction, about which the compiler
    knows nothing (the weight-gradient loop ran ~3x slower unpipelined that way).
    """
    f_e = tl.load(widths_ptr + e)
    o_col = tl.load(woffsets_ptr + e).to(tl.int64)
    rag0 = tl.load(ragged_offsets_ptr + e)
    if ALIGN > 1:
        f_e = tl.multiple_of(f_e, ALIGN)
        o_col = tl.multiple_of(o_col, ALIGN)
        rag0 = tl.multiple_of(rag0, ALIGN)
    if DIM1_PER_WIDTH > 0:
        dim1 = f_e * DIM1_PER_WIDTH
    else:
        dim1 = DIM1_FIXED
    if DIM2_PER_WIDTH > 0:
        dim2 = f_e * DIM2_PER_WIDTH
    else:
        dim2 = DIM2_FIXED
    return f_e, o_col, rag0, dim1, dim2


@triton.jit
def _weight_descriptor(b_e, K, N, G: tl.constexpr, stride_bk, stride_bn, B_TRANS: tl.constexpr,
                       BK: tl.constexpr, BN: tl.constexpr):
    """Expert e's block of a weight, starting at ``b_e``, as a descriptor. B_TRANS: B[k, n] is
    stored at [n, k] (a transposed weight of the backward), an [N, K] block; else a [K, G*N]
    block, where the gated up projection's gate and up halves (G = 2) are one [K, 2*f_e] block."""
    if B_TRANS:
        desc = tl.make_tensor_descriptor(b_e, shape=[N, K], strides=[stride_bn, 1],
                                         block_shape=[BN, BK])
    else:
        desc = tl.make_tensor_descriptor(b_e, shape=[K, G * N], strides=[stride_bk, 1],
                                         block_shape=[BK, BN])
    return desc


@triton.jit
def _weight_tile(b_desc, k0, c0, B_TRANS: tl.constexpr):
    """The [BK, BN] tile at rows k0.., columns c0.. of a weight block from
    :func:`_weight_descriptor` (read as [BN, BK] and transposed when B_TRANS)."""
    # (One return: a helper that returns from constexpr branches is not inlined by Triton 3.6.)
    if B_TRANS:
        tile = tl.trans(b_desc.load([c0, k0]))
    else:
        tile = b_desc.load([k0, c0])
    return tile


@triton.jit
def _rows_kernel(
    a_ptr,              # SORTED [A, K] | GATHERED [T, K] | RAGGED [n_e, K_e] blocks
    b_ptr,              # the weight: expert e's [K_e, N_e] block, strided (w1, w2 or their transposes)
    c_ptr,              # SORTED [A, N] | RAGGED [n_e, N_e] blocks (H, dZ)
    z_ptr,              # RAGGED [n_e, g*f_e] pre-activation: written (EPI_ACT) or read (EPI_ACT_BWD); or None
    scale_ptr,          # [A] routing weight per assignment, scaling the product's rows; or None
    hw_ptr,             # RAGGED [n_e, f_e] w * act(Z), written by EPI_ACT_BWD; or None
    counts_ptr,         # [E] n_e
    offsets_ptr,        # [E+1] first sorted position of expert e
    ragged_offsets_ptr,  # [E+1] int64, sum_{j<e} n_j f_j
    widths_ptr,         # [E] f_e
    woffsets_ptr,       # [E] o_e
    sorted_to_assign_ptr,  # [A] assignment of each sorted position
    E, K_FIXED, N_FIXED, K_MAX, N_MAX,
    stride_am, stride_be, stride_bk, stride_bn, stride_cm,
    KTOP: tl.constexpr, A_MODE: tl.constexpr, C_MODE: tl.constexpr,
    K_PER_WIDTH: tl.constexpr, N_PER_WIDTH: tl.constexpr,
    EPI: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, G: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_HW: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, E_PAD: tl.constexpr, ALIGN: tl.constexpr,
    TMA_OK: tl.constexpr, B_TRANS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr,
):
    tl.static_assert(TMA_OK > 0 or not TMA, "a descriptor config for a launch not eligible for it")
    b_cum, b_nt, total = schedule_prologue(counts_ptr, widths_ptr, E, N_FIXED, N_PER_WIDTH,
                                           BM, BN, E_PAD)
    for tile_id in range(tl.program_id(0), total, tl.num_programs(0)):
        e, i_m, i_n = locate_tile(tile_id, b_cum, b_nt, E_PAD)
        n_rows = tl.load(counts_ptr + e)
        row0 = tl.load(offsets_ptr + e)
        f_e, o_col, rag0, K, N = _expert_geometry(e, widths_ptr, woffsets_ptr, ragged_offsets_ptr,
                                                  K_FIXED, N_FIXED, K_PER_WIDTH, N_PER_WIDTH,
                                                  ALIGN)

        o_m = i_m * BM + tl.arange(0, BM)
        m_m = o_m < n_rows
        o_p = row0 + o_m                                             # sorted positions [BM]
        if A_MODE == GATHERED_C or HAS_SCALE:
            b_assign = tl.load(sorted_to_assign_ptr + o_p, mask=m_m, other=0)
        if A_MODE == GATHERED_C:
            p_a_row = a_ptr + (b_assign // KTOP).to(tl.int64) * stride_am
        elif A_MODE == SORTED_C:
            p_a_row = a_ptr + o_p.to(tl.int64) * stride_am
        else:
            p_a_row = a_ptr + rag0 * G + o_m.to(tl.int64) * K
        o_n = i_n * BN + tl.arange(0, BN)
        m_n = o_n < N
        p_b = b_ptr + o_col * stride_be + o_n[None, :].to(tl.int64) * stride_bn
        if TMA:
            # Expert e's own blocks as tensor descriptors: the copy engine zero-fills what lies
            # past them, so a K tail never reads the next expert's rows or columns, and a ragged
            # block needs no row mask.
            if A_MODE == RAGGED_C:
                a_desc = tl.make_tensor_descriptor(a_ptr + rag0 * G, shape=[n_rows, K],
                                                   strides=[K, 1], block_shape=[BM, BK])
            b_desc = _weight_descriptor(b_ptr + o_col * stride_be, K, N, G, stride_bk, stride_bn,
                                        B_TRANS, BK, BN)

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if EPI == EPI_ACT_C and GATED:
            acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            if TMA and A_MODE == RAGGED_C:
                b_a = a_desc.load([i_m * BM, k0])                                      # [BM, BK]
            else:
                b_a = tl.load(p_a_row[:, None] + o_k[None, :],
                              mask=m_m[:, None] & m_k[None, :], other=0.0)            # [BM, BK]
            p_bk = p_b + o_k[:, None].to(tl.int64) * stride_bk
            if TMA:
                b_b = _weight_tile(b_desc, k0, i_n * BN, B_TRANS)
            else:
                b_b = tl.load(p_bk, mask=m_k[:, None] & m_n[None, :], other=0.0)       # [BK, BN]
            if UPCAST:
                b_a = b_a.to(tl.float32)
                b_b = b_b.to(tl.float32)
            acc = tl.dot(b_a, b_b, acc, input_precision=DOT_PREC)
            if EPI == EPI_ACT_C and GATED:
                if TMA:
                    b_u = b_desc.load([k0, i_n * BN + f_e])
                else:
                    b_u = tl.load(p_bk + f_e * stride_bn, mask=m_k[:, None] & m_n[None, :],
                                  other=0.0)                                           # [BK, BN]
                if UPCAST:
                    b_u = b_u.to(tl.float32)
                acc_up = tl.dot(b_a, b_u, acc_up, input_precision=DOT_PREC)

        if HAS_SCALE:
            b_w = tl.load(scale_ptr + b_assign, mask=m_m, other=0.0).to(tl.float32)  # [BM]
            acc = acc * b_w[:, None]
        else:
            b_w = tl.full((BM,), 1.0, tl.float32)
        desc_epi = TMA >= TMA_EPILOGUE_C
        if C_MODE == SORTED_C:
            _tile_store(c_ptr + row0.to(tl.int64) * stride_cm, n_rows, N, stride_cm, i_m * BM,
                        i_n * BN, acc, desc_epi, BM, BN)
        elif EPI == EPI_STORE_C:
            _tile_store(c_ptr + rag0 * G, n_rows, N, N, i_m * BM, i_n * BN, acc, desc_epi, BM,
                        BN)
        else:
            # Z and dZ share the ragged layout [n_e, g*f_e]; the gate half comes first. Each half
            # is its own [n_e, f_e] block of row stride g*f_e, so a store past f_e is clipped
            # (a descriptor) or masked (pointers) rather than landing in the other half.
            if HAS_Z:
                z_e = z_ptr + rag0 * G
            if EPI == EPI_ACT_C:
                # Round Z to the storage dtype (H's, which is Z's) first, so that H and the saved
                # Z agree exactly and the backward's recomputation of H matches the forward.
                if GATED:
                    z_g = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
                    z_u = acc_up.to(c_ptr.dtype.element_ty).to(tl.float32)
                    if HAS_Z:
                        _tile_store(z_e, n_rows, f_e, G * f_e, i_m * BM, i_n * BN, z_g, desc_epi,
                                    BM, BN)
                        _tile_store(z_e + f_e, n_rows, f_e, G * f_e, i_m * BM, i_n * BN, z_u,
                                    desc_epi, BM, BN)
                    b_h = swiglu_fwd(z_g, z_u)
                else:
                    z = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
                    if HAS_Z:
                        _tile_store(z_e, n_rows, f_e, f_e, i_m * BM, i_n * BN, z, desc_epi, BM, BN)
                    b_h = act_fwd(z, ACT)
                _tile_store(c_ptr + rag0, n_rows, f_e, f_e, i_m * BM, i_n * BN, b_h, desc_epi, BM,
                            BN)
            else:
                dz_e = c_ptr + rag0 * G
                if GATED:
                    # Two column halves, one after the other: the swiglu backward holds six
                    # [BM, BN] float32 tiles at once (dH, both Z halves, both dZ halves, w*H),
                    # which spilled at 128x128 over 8 warps (results/NOTES.md, "The swiglu backward
                    # epilogue (v4)").
                    acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)),
                                                         (0, 2, 1)))
                    _swiglu_bwd_cols(z_e, dz_e, hw_ptr, rag0, n_rows, f_e, i_m * BM,
                                     i_n * BN, acc_lo, b_w, HAS_HW, desc_epi, BM, BN // 2)
                    _swiglu_bwd_cols(z_e, dz_e, hw_ptr, rag0, n_rows, f_e, i_m * BM,
                                     i_n * BN + BN // 2, acc_hi, b_w, HAS_HW, desc_epi, BM,
                                     BN // 2)
                else:
                    z = _tile_load(z_e, n_rows, f_e, f_e, i_m * BM, i_n * BN, desc_epi, BM, BN)
                    _tile_store(dz_e, n_rows, f_e, f_e, i_m * BM, i_n * BN, act_bwd(z, acc, ACT),
                                desc_epi, BM, BN)
                    if HAS_HW:
                        # w * H, recomputed from the Z already in registers: dW2 = (w H)^T dy
                        # then streams both operands straight to shared memory, and H is never
                        # saved.
                        _tile_store(hw_ptr + rag0, n_rows, f_e, f_e, i_m * BM, i_n * BN,
                                    act_fwd(z, ACT) * b_w[:, None], desc_epi, BM, BN)


@triton.jit
def _swiglu_bwd_cols(z_e, dz_e, hw_ptr, rag0, n_rows, f_e, r0, c0, dh, b_w,
                     HAS_HW: tl.constexpr, DESC: tl.constexpr, BM: tl.constexpr,
                     BC: tl.constexpr):
    """The swiglu backward epilogue on columns [c0, c0 + BC) of expert e's tile at row r0: dZ's
    two halves from dH and Z's, and w*H (see the EPI_ACT_BWD branch of the row kernel)."""
    z_g = _tile_load(z_e, n_rows, f_e, 2 * f_e, r0, c0, DESC, BM, BC)
    z_u = _tile_load(z_e + f_e, n_rows, f_e, 2 * f_e, r0, c0, DESC, BM, BC)
    d_g, d_u = swiglu_bwd(z_g, z_u, dh)
    _tile_store(dz_e, n_rows, f_e, 2 * f_e, r0, c0, d_g, DESC, BM, BC)
    _tile_store(dz_e + f_e, n_rows, f_e, 2 * f_e, r0, c0, d_u, DESC, BM, BC)
    if HAS_HW:
        _tile_store(hw_ptr + rag0, n_rows, f_e, f_e, r0, c0, swiglu_fwd(z_g, z_u) * b_w[:, None],
                    DESC, BM, BC)


@triton.jit
def _tile_store(ptr, n_rows, n_cols, row_stride, r0, c0, value, DESC: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr):
    """``value`` [BM, BN] at rows r0.., columns c0.. of the [n_rows, n_cols] block at ``ptr`` (row stride
    ``row_stride``), cast to its dtype; what lies outside the block is not written. DESC: through
    a tensor descriptor (the copy engine clips, and no per-element address is ever in
    registers), else masked stores."""
    if DESC:
        desc = tl.make_tensor_descriptor(ptr, shape=[n_rows, n_cols], strides=[row_stride, 1],
                                         block_shape=[BM, BN])
        desc.store([r0, c0], value.to(ptr.dtype.element_ty))
    else:
        o_m = r0 + tl.arange(0, BM)
        o_n = c0 + tl.arange(0, BN)
        tl.store(ptr + o_m[:, None].to(tl.int64) * row_stride + o_n[None, :],
                 value.to(ptr.dtype.element_ty),
                 mask=(o_m < n_rows)[:, None] & (o_n < n_cols)[None, :])


@triton.jit
def _tile_load(ptr, n_rows, n_cols, row_stride, r0, c0, DESC: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr):
    """The [BM, BN] tile at rows r0.., columns c0.. of the [n_rows, n_cols] block at ``ptr``, as
    float32, zeros outside the block."""
    # (One return: a helper that returns from constexpr branches is not inlined by Triton 3.6.)
    if DESC:
        desc = tl.make_tensor_descriptor(ptr, shape=[n_rows, n_cols], strides=[row_stride, 1],
                                         block_shape=[BM, BN])
        tile = desc.load([r0, c0])
    else:
        o_m = r0 + tl.arange(0, BM)
        o_n = c0 + tl.arange(0, BN)
        tile = tl.load(ptr + o_m[:, None].to(tl.int64) * row_stride + o_n[None, :],
                       mask=(o_m < n_rows)[:, None] & (o_n < n_cols)[None, :], other=0.0)
    return tile.to(tl.float32)


@triton.jit(do_not_specialize=['MAX_TILES'])
def _rows_ws_kernel(
    a_ptr,              # RAGGED [n_e, K_e] blocks (H, dZ)
    b_ptr,              # the weight, as in _rows_kernel
    c_ptr,              # SORTED [A, N]
    schedule_ptr,       # [MAX_TILES, 3] (expert, row tile, column tile), -1 past the last tile
    counts_ptr, offsets_ptr, ragged_offsets_ptr, widths_ptr, woffsets_ptr,
    MAX_TILES, K_FIXED, N_FIXED, stride_be, stride_bk, stride_bn, stride_cm,
    K_PER_WIDTH: tl.constexpr, N_PER_WIDTH: tl.constexpr, G: tl.constexpr,
    B_TRANS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, ALIGN: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr,
):
    """``C[rows of e] = A_e @ B_e`` for a ragged A and a sorted C (the down projection and dX),
    every load through a descriptor, over a persistent loop that Triton warp-specializes (a
    producer warpgroup issuing the copies, consumer warpgroups on the tensor cores, so one
    tile's epilogue overlaps the next tile's loads).

    Triton 3.6 specializes a Hopper loop only when every load in it is a descriptor load and
    no tensor reduction sits in the kernel before or in it; the in-register schedule of
    _rows_kernel (:func:`vmoe.ops.routing.locate_tile`) is such a reduction, so the tiles come from
    a schedule written to memory first (:func:`vmoe.ops.routing.tile_schedule`).
    """
    for t in tl.range(tl.program_id(0), MAX_TILES, tl.num_programs(0), warp_specialize=WS):
        e = tl.load(schedule_ptr + t * 3)
        if e >= 0:
            i_m = tl.load(schedule_ptr + t * 3 + 1)
            i_n = tl.load(schedule_ptr + t * 3 + 2)
            n_rows = tl.load(counts_ptr + e)
            row0 = tl.load(offsets_ptr + e)
            f_e, o_col, rag0, K, N = _expert_geometry(e, widths_ptr, woffsets_ptr,
                                                      ragged_offsets_ptr, K_FIXED, N_FIXED,
                                                      K_PER_WIDTH, N_PER_WIDTH, ALIGN)
            a_desc = tl.make_tensor_descriptor(a_ptr + rag0 * G, shape=[n_rows, K],
                                               strides=[K, 1], block_shape=[BM, BK])
            b_desc = _weight_descriptor(b_ptr + o_col * stride_be, K, N, G, stride_bk, stride_bn,
                                        B_TRANS, BK, BN)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                b_a = a_desc.load([i_m * BM, k0])
                b_b = _weight_tile(b_desc, k0, i_n * BN, B_TRANS)
                if UPCAST:
                    b_a = b_a.to(tl.float32)
                    b_b = b_b.to(tl.float32)
                acc = tl.dot(b_a, b_b, acc, input_precision=DOT_PREC)
            # Pointer stores: through a descriptor they measured 6% slower here (results/probe_ws.py@355447b).
            _tile_store(c_ptr + row0.to(tl.int64) * stride_cm, n_rows, N, stride_cm, i_m * BM,
                        i_n * BN, acc, False, BM, BN)


@triton.jit
def _operand_ptrs(ptr, o_tok, o_r, o_c, rag0, width, stride_tok, GATHERED: tl.constexpr):
    """Pointers to a [BK, B] block of a weight gradient's operand: columns ``o_c`` of rows gathered
    by token (``o_tok``, row stride ``stride_tok``), or of rows ``o_r`` of expert e's ragged
    ``[n_e, width]`` block starting at ``rag0``."""
    if GATHERED:
        p = ptr + o_tok[:, None] * stride_tok + o_c[None, :]
    else:
        p = ptr + rag0 + o_r[:, None].to(tl.int64) * width + o_c[None, :]
    return p


@triton.jit
def _wgrad_kernel(
    l_ptr,              # GATHERED [T, M] (x) | RAGGED [n_e, M_e] blocks (w*H)
    r_ptr,              # GATHERED [T, N] (dy) | RAGGED [n_e, N_e] blocks (dZ)
    out_ptr,            # expert e's [M_e, N_e] block of dW1 [d, g*F] or dW2 [F, d], strided
    scale_ptr,          # [A] routing weight per assignment, scaling R's rows; or None
    # The routing metadata, as _rows_kernel takes it:
    counts_ptr, offsets_ptr, ragged_offsets_ptr, widths_ptr, woffsets_ptr, sorted_to_assign_ptr,
    E, M_FIXED, N_FIXED, M_MAX, N_MAX, stride_lm, stride_rm, stride_oe, stride_om,
    KTOP: tl.constexpr, L_MODE: tl.constexpr, R_MODE: tl.constexpr,
    M_PER_WIDTH: tl.constexpr, N_PER_WIDTH: tl.constexpr, HAS_SCALE: tl.constexpr,
    G: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, E_PAD: tl.constexpr,
    ALIGN: tl.constexpr, TMA_OK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, TMA: tl.constexpr,
):
    """out_e[M_e, N_e] = L_e^T @ R_e, summed over expert e's rows; out_e starts at o_e*stride_oe."""
    tl.static_assert(TMA_OK > 0 or not TMA, "a descriptor config for a launch not eligible for it")
    b_m = expert_dims(widths_ptr, E, M_FIXED, M_PER_WIDTH, E_PAD)
    b_n = expert_dims(widths_ptr, E, N_FIXED, N_PER_WIDTH, E_PAD)
    b_nt = tl.cdiv(b_n, BN)
    b_tiles = tl.cdiv(b_m, BM) * b_nt
    if E_PAD <= LOAD_ORDER_MAX_E:
        # Every tile of expert e loops over its n_e rows: the most loaded experts' tiles go first.
        b_load = tl.load(counts_ptr + tl.arange(0, E_PAD), mask=tl.arange(0, E_PAD) < E, other=0)
        e, i_m, i_n = locate_tile_by_load(tl.program_id(0), b_tiles, b_nt, b_load, E_PAD)
    else:
        e, i_m, i_n = locate_tile(tl.program_id(0), tl.cumsum(b_tiles, axis=0), b_nt, E_PAD)
    # M and N from the arguments and f_e (see _expert_geometry), not from b_m / b_n.
    f_e, o_col, rag0, M, N = _expert_geometry(e, widths_ptr, woffsets_ptr, ragged_offsets_ptr,
                                              M_FIXED, N_FIXED, M_PER_WIDTH, N_PER_WIDTH, ALIGN)
    n_rows = tl.load(counts_ptr + e)
    row0 = tl.load(offsets_ptr + e)
    rag0 = rag0 * G

    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N
    if TMA:
        # The ragged operand as expert e's own [n_e, *] block: rows past n_e arrive as zeros.
        if L_MODE == RAGGED_C:
            # (An expert with no rows still has tiles, which write zeros; its descriptor is
            # never read, but keeps a valid shape.)
            l_desc = tl.make_tensor_descriptor(l_ptr + rag0, shape=[tl.maximum(n_rows, 1), M],
                                               strides=[M, 1],
                                               block_shape=[BK, BM])
        if R_MODE == RAGGED_C:
            r_desc = tl.make_tensor_descriptor(r_ptr + rag0, shape=[tl.maximum(n_rows, 1), N],
                                               strides=[N, 1],
                                               block_shape=[BK, BN])
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, n_rows, BK):
        o_r = r0 + tl.arange(0, BK)
        m_r = o_r < n_rows
        o_p = row0 + o_r
        if L_MODE == GATHERED_C or R_MODE == GATHERED_C:
            b_assign = tl.load(sorted_to_assign_ptr + o_p, mask=m_r, other=0)
            o_tok = (b_assign // KTOP).to(tl.int64)
        else:
            o_tok = o_p.to(tl.int64)  # unread: neither operand is gathered
        if TMA and L_MODE == RAGGED_C:
            b_l = l_desc.load([r0, i_m * BM])                                          # [BK, BM]
        else:
            p_l = _operand_ptrs(l_ptr, o_tok, o_r, o_m, rag0, M, stride_lm, L_MODE == GATHERED_C)
            b_l = tl.load(p_l, mask=m_r[:, None] & m_m[None, :], other=0.0)           # [BK, BM]
        if TMA and R_MODE == RAGGED_C:
            b_r = r_desc.load([r0, i_n * BN])                                          # [BK, BN]
        else:
            p_r = _operand_ptrs(r_ptr, o_tok, o_r, o_n, rag0, N, stride_rm, R_MODE == GATHERED_C)
            b_r = tl.load(p_r, mask=m_r[:, None] & m_n[None, :], other=0.0)           # [BK, BN]
        if HAS_SCALE:
            b_s = tl.load(scale_ptr + b_assign, mask=m_r, other=0.0)
            b_r = (b_r.to(tl.float32) * b_s.to(tl.float32)[:, None]).to(r_ptr.dtype.element_ty)
        if UPCAST:
            b_l = b_l.to(tl.float32)
            b_r = b_r.to(tl.float32)
        acc = tl.dot(tl.trans(b_l), b_r, acc, input_precision=DOT_PREC)
    p_o = out_ptr + o_col * stride_oe + o_m[:, None].to(tl.int64) * stride_om + o_n[None, :]
    tl.store(p_o, acc.to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


# The tensor-descriptor (TMA) path. Modes: "auto" (default) lets the autotuner choose between
# the descriptor and the pointer kernels wherever the descriptor path is eligible
# (:func:`tma_eligible`); "off" keeps the pointer kernels only; "only" keeps the descriptor
# kernels wherever eligible. Ineligible launches always take the pointer kernels. Under the
# interpreter, "auto" means "off" (a single pinned config), so CI tests the descriptor path by
# asking for it: ``with tma_mode("only")``.
TMA_MODES = ("auto", "off", "only")
_TMA_MODE = [os.environ.get("VMOE_TMA", "auto")]
if _TMA_MODE[0] not in TMA_MODES:
    raise ValueError(f"VMOE_TMA must be one of {TMA_MODES}, got {_TMA_MODE[0]!r}")

# What a launch tells its kernel (the TMA_OK argument, also in the tuning key).
TMA_NO, TMA_AUTO, TMA_ONLY = 0, 1, 2


class tma_mode:
    """``with tma_mode("off"): ...`` (or a plain call, which sets it until changed)."""

    def __init__(self, mode: str):
        if mode not in TMA_MODES:
            raise ValueError(f"mode must be one of {TMA_MODES}, got {mode!r}")
        self.previous = _TMA_MODE[0]
        _TMA_MODE[0] = mode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _TMA_MODE[0] = self.previous


def _configs(shapes, tma_shapes=()):
    """Autotuning candidates: (BM, BN, BK, warps, stages) for the pointer kernel, then (the same
    and a TMA level) for the descriptor kernel. One pinned config of each path when
    interpreting (the descriptor one at the highest level, which runs every descriptor access),
    or when VMOE_PIN_CONFIG=1 (reproducible timings without a tuning pass)."""
    if interpreting():
        return [triton.Config({"BM": 16, "BN": 16, "BK": 16, "TMA": level}, num_warps=1,
                              num_stages=1) for level in (TMA_OFF, max(t[-1] for t in tma_shapes))]
    if os.environ.get("VMOE_PIN_CONFIG", "0") not in ("", "0"):
        shapes, tma_shapes = shapes[:1], tma_shapes[:1]
    return ([triton.Config({"BM": bm, "BN": bn, "BK": bk, "TMA": TMA_OFF}, num_warps=w,
                           num_stages=st) for bm, bn, bk, w, st in shapes]
            + [triton.Config({"BM": bm, "BN": bn, "BK": bk, "TMA": level}, num_warps=w,
                             num_stages=st) for bm, bn, bk, w, st, level in tma_shapes])


def _prune(configs, named_args, **kwargs):
    """Keep the path the launch allows (TMA_OK), and drop blocks much wider than the widest
    expert (masked work only) and pipelines whose shared memory would not fit (the gated up
    projection streams two B tiles)."""
    args = {**named_args, **kwargs}  # the launches pass everything by keyword
    n_max = args["N_MAX"]
    b_tiles = 2 if (args.get("EPI") == EPI_ACT and args.get("GATED")) else 1
    elem = args["a_ptr" if "a_ptr" in args else "l_ptr"].element_size()
    allowed = {TMA_NO: (TMA_OFF,), TMA_AUTO: (TMA_OFF, TMA_LOADS, TMA_EPILOGUE),
               TMA_ONLY: (TMA_LOADS, TMA_EPILOGUE)}[args["TMA_OK"]]
    keep = []
    for c in configs:
        bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
        if c.kwargs["TMA"] not in allowed:
            continue
        smem = c.num_stages * (bm * bk + b_tiles * bk * bn) * elem
        if bn <= max(16, next_pow2(n_max)) and smem <= 200 * 1024:
            keep.append(c)
    if not keep:  # the smallest allowed block
        keep = [c for c in configs if c.kwargs["TMA"] in allowed][-1:]
    return keep


_ROW_SHAPES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
               (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3), (16, 64, 64, 4, 3)]
_ROW_TMA_SHAPES = [(128, 128, 64, 8, 4, TMA_EPILOGUE), (128, 256, 64, 8, 3, TMA_EPILOGUE),
                   (64, 128, 64, 4, 4, TMA_EPILOGUE), (64, 64, 64, 4, 3, TMA_EPILOGUE),
                   (128, 128, 64, 8, 4, TMA_LOADS), (128, 128, 64, 4, 4, TMA_LOADS),
                   (64, 128, 64, 4, 4, TMA_LOADS)]
_WGRAD_SHAPES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
                 (128, 128, 64, 8, 4), (128, 128, 32, 4, 4),
                 (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 3), (32, 32, 64, 4, 3)]
_WGRAD_TMA_SHAPES = [(128, 128, 64, 8, 4, TMA_LOADS), (128, 256, 64, 8, 3, TMA_LOADS),
                     (128, 128, 64, 4, 4, TMA_LOADS), (64, 128, 64, 4, 4, TMA_LOADS),
                     (64, 64, 64, 4, 3, TMA_LOADS)]
ROW_CONFIGS = _configs(_ROW_SHAPES, _ROW_TMA_SHAPES)
WGRAD_CONFIGS = _configs(_WGRAD_SHAPES, _WGRAD_TMA_SHAPES)

# Absent operands are passed as None; these flags say which are present. The heuristics wrap the
# autotuner (as in flash-linear-attention), so the tuning key can name them.
_rows_kernel = triton.heuristics({
    "HAS_Z": lambda a: a["z_ptr"] is not None,
    "HAS_SCALE": lambda a: a["scale_ptr"] is not None,
    "HAS_HW": lambda a: a["hw_ptr"] is not None,
})(autotune(
    ROW_CONFIGS,
    # The sizes, and what tells the six GEMMs apart where sizes coincide (the up projection and
    # dH both have K = d and N = f_e): operand layouts, epilogue, gating and the w*H output. Each
    # gets its own tuning, and a gated one never inherits a block shape whose two B tiles
    # overflow shared memory. No token count: one tuning serves every T.
    key=["K_FIXED", "N_FIXED", "K_MAX", "N_MAX", "E", "A_MODE", "C_MODE", "EPI", "GATED",
         "HAS_HW", "TMA_OK"],
    prune=_prune,
)(_rows_kernel))

_wgrad_kernel = triton.heuristics({
    "HAS_SCALE": lambda a: a["scale_ptr"] is not None,
})(autotune(
    WGRAD_CONFIGS,
    # HAS_SCALE: a scaled right operand goes through registers, an unscaled one does not.
    key=["M_FIXED", "N_FIXED", "M_MAX", "N_MAX", "E", "L_MODE", "R_MODE", "HAS_SCALE", "TMA_OK"],
    prune=_prune,
)(_wgrad_kernel))


def device_woffsets(widths: tuple, device) -> torch.Tensor:
    """o_e, the first column (of F) that expert e owns, as an int32 tensor cached on the device."""
    return device_ints(column_offsets(tuple(widths))[:-1], device)


@functools.lru_cache(maxsize=None)
def width_alignment(widths: tuple) -> int:
    """The largest power of two up to 16 that divides every width (a null expert's 0 too)."""
    return functools.reduce(math.gcd, widths, 16)


def uniform_width(widths: tuple) -> int:
    """I when every expert has the same width I >= 1, else 0."""
    # (tuple.count: about 1 µs for 128 experts, and no cache wrapper for torch.compile to trace.)
    return widths[0] if widths and widths[0] > 0 and widths.count(widths[0]) == len(widths) else 0


def _dense(w: torch.Tensor) -> bool:
    """Whether w's elements fill its storage span exactly once, in some order of its dimensions
    (so that ``torch.empty_like`` gives a tensor with w's strides)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(w.shape, w.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def per_expert_weight(w: torch.Tensor, widths: tuple) -> bool:
    """Whether w is a per-expert weight the kernels read and write in place: ``[E, *, *]`` for E
    experts of one width I, dense, unit stride along one of its last two dimensions, and an
    expert stride that is a multiple of I (so that ``o_e * stride(0) / I`` is expert e's start).
    Any permutation of a contiguous ``[E, a, b]`` with the experts outermost qualifies."""
    if w.dim() != 3 or w.shape[0] != len(widths):
        return False  # (vmoe's 2-D layouts return here, at no cost to their launches)
    f = uniform_width(tuple(widths))
    return f > 0 and w.stride(0) % f == 0 and 1 in (w.stride(1), w.stride(2)) and _dense(w)


def kernel_weight(w: torch.Tensor, widths: tuple) -> torch.Tensor:
    """w as the kernels take it: a per-expert weight (:func:`per_expert_weight`) as it is, with no
    copy; anything else contiguous."""
    return w if per_expert_weight(w, widths) else w.contiguous()


def _expert_strides(w: torch.Tensor, routing: Routing, g: int, expert_dim: int):
    """``(stride_be, stride_r, stride_c)``: expert e's block of the weight w starts
    ``o_e * stride_be`` elements in, and its element (r, c) lies ``r*stride_r + c*stride_c``
    further on. For vmoe's w1 ``[d, g*F]`` the experts split the columns (``expert_dim=1``; block
    e starts g*o_e columns in), for w2 ``[F, d]`` the rows (``expert_dim=0``); a per-expert
    ``[E, r, c]`` weight's block e is ``w[e]``, ``e*stride(0) = o_e*stride(0)/I`` in."""
    if w.dim() == 3:
        if not per_expert_weight(w, routing.expert_widths):
            raise ValueError(f"a 3-D weight must be [E, *, *] for E experts of one width, dense, "
                             f"unit-strided along a last dimension and with an expert stride that "
                             f"is a multiple of the width; got shape {tuple(w.shape)}, strides "
                             f"{w.stride()} for widths {list(routing.expert_widths)}")
        return w.stride(0) // routing.expert_widths[0], w.stride(1), w.stride(2)
    return g * w.stride(expert_dim), w.stride(0), w.stride(1)


def _weight_grad_buffer(w: torch.Tensor) -> torch.Tensor:
    """A fresh tensor for the gradient of the weight w: contiguous for vmoe's 2-D layouts, with
    w's own strides for a per-expert weight (the fake implementation of
    ``vmoe::expert_mlp_backward`` allocates the same)."""
    if w.dim() != 3:
        return new_empty(tuple(w.shape), w.dtype, w.device)
    out = torch.empty_like(w)
    return out.fill_(float("nan")) if poisoning() else out


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    # Hopper, where the descriptor path is built and measured (results/NOTES.md, "Tensor
    # descriptors (TMA) and warp specialization").
    return torch.cuda.get_device_capability(device_index)[0] == 9


def tma_eligible(device: torch.device, dtype: torch.dtype, widths: tuple, d: int,
                 operands=()) -> bool:
    """Whether a GEMM can take the tensor-descriptor path: a Hopper GPU (or the interpreter), a
    16-bit dtype, widths and d in multiples of 8 (16-byte rows, row bases and expert offsets, as
    the copy engine requires), and every descriptor operand, given as (tensor, its row stride in
    elements, or None for a flat ragged buffer whose rows are widths or d long), 16-byte aligned
    with a row stride in multiples of 8 (a None tensor is not eligible), and with a last stride
    of 1. The descriptor code builds its weight blocks for weights laid out as vmoe's own are,
    contiguous along their last dimension; a weight read through a transposed view (a
    transformers ``[E, out, in]`` parameter seen as ``[E, in, out]``) takes the pointer kernels."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if not interpreting() and (device.type != "cuda" or not _has_tma(device.index or 0)):
        return False
    if width_alignment(tuple(widths)) < 8 or d % 8:
        return False
    for t, row_stride in operands:
        if t is None or t.data_ptr() % 16 or t.stride(-1) != 1 or (
                row_stride is not None and row_stride % 8):
            return False
    return True


def _tma_ok(eligible: bool) -> int:
    """The launch's TMA_OK code: which configs its autotuner may try."""
    mode = _TMA_MODE[0]
    if not eligible or mode == "off" or (mode == "auto" and interpreting()):
        return TMA_NO
    _ensure_allocator()
    return TMA_ONLY if mode == "only" else TMA_AUTO


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # Each program's descriptors are written to global memory before the copy engine reads
    # them; torch's caching allocator (256-byte aligned) provides that space, inside a CUDA
    # graph's pool when capturing.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Give Triton an allocator for the descriptors' scratch unless the program set its own. The
    setting is per thread (a ContextVar), and autograd runs the backward on its own thread, so
    every launch that may need it checks."""
    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_scratch)


def ragged_capacity(routing: Routing) -> int:
    """Elements per unit of g in a ragged buffer: A * max(f_e), enough for any routing."""
    return routing.num_assignments * max(routing.expert_widths)


def _routing_args(routing: Routing, device) -> dict:
    """The routing metadata, as the kernels' keyword arguments."""
    widths = routing.expert_widths
    return dict(counts_ptr=routing.counts, offsets_ptr=routing.offsets,
                ragged_offsets_ptr=routing.ragged_offsets, widths_ptr=routing.widths,
                woffsets_ptr=device_woffsets(widths, device),
                sorted_to_assign_ptr=routing.sorted_to_assign, E=len(widths), KTOP=routing.k,
                E_PAD=next_pow2(len(widths)), ALIGN=width_alignment(widths))


def _ws_eligible(routing: Routing, tma_ok: int, n_max: int) -> bool:
    """Whether a ragged-to-sorted GEMM takes the warp-specialized kernel, given the launch's
    TMA_OK code (:func:`_tma_ok`): always under TMA_ONLY, and under TMA_AUTO at the sizes where
    it was measured faster (results/NOTES.md, "Tensor descriptors (TMA) and warp
    specialization": about 1,000 rows per expert and d = 2048)."""
    rows_per_expert = routing.num_assignments / max(1, len(routing.expert_widths))
    return tma_ok == TMA_ONLY or (tma_ok == TMA_AUTO and rows_per_expert >= 512
                                  and n_max >= 512)


def _launch_rows_ws(a, b, c, routing: Routing, *, k_fixed, k_per_width, n_fixed, stride_be,
                    stride_bk, stride_bn, stride_cm, b_trans, g):
    # One program per multiprocessor; 128 x 256 tiles over one producer and two consumer
    # warpgroups (4 warps each), 3 stages: the measured best of results/probe_ws.py@355447b (128 x 128: 20-30%
    # slower; 4 stages: no faster and out of shared memory with descriptor stores).
    if interpreting():
        bm, bn, bk, programs = 16, 16, 16, 3
    else:
        bm, bn, bk = 128, (256 if n_fixed >= 256 else 128), 64
        programs = _num_sms(a.device.index or 0)
    schedule = tile_schedule(routing, bm, bn, n_cols=n_fixed)
    launch(_rows_ws_kernel, (programs,), a, b, c, schedule, routing.counts, routing.offsets,
           routing.ragged_offsets, routing.widths, device_woffsets(routing.expert_widths, a.device),
           schedule.shape[0], k_fixed, n_fixed, stride_be, stride_bk, stride_bn, stride_cm,
           K_PER_WIDTH=k_per_width, N_PER_WIDTH=0, G=g, B_TRANS=b_trans,
           UPCAST=dot_dtype_flag(a.dtype), DOT_PREC=_dot_precision(a.dtype),
           ALIGN=width_alignment(routing.expert_widths), BM=bm, BN=bn, BK=bk,
           WS=not interpreting(), num_warps=4, num_stages=3)


def _launch_rows(a, b, c, routing: Routing, *, z=None, scale=None, hw=None, a_mode, c_mode,
                 k_fixed=0, k_per_width=0, n_fixed=0, n_per_width=0, stride_am=0, stride_be,
                 stride_bk, stride_bn, stride_cm=0, epi=EPI_STORE, activation=None, g=1):
    """One row-kernel GEMM. K and N are either fixed (d) or a multiple of each expert's width.
    The weight b is read through a descriptor where eligible (B_TRANS when it is contiguous
    along N, as the transposed weights of the backward are), and so is a ragged a."""
    widths = routing.expert_widths
    b_trans = stride_bk == 1 and stride_bn != 1
    b_unit = stride_bn == 1 or b_trans
    # Every operand a descriptor may touch: the weight, a ragged A, and the epilogue's outputs
    # (and Z), which vmoe allocates itself.
    operands = [(b, stride_bn if b_trans else stride_bk),
                (c, stride_cm if c_mode == SORTED else None)]
    operands += [(t, None) for t in (a if a_mode == RAGGED else None, z, hw) if t is not None]
    eligible = b_unit and tma_eligible(a.device, a.dtype, widths, k_fixed or n_fixed, operands)
    tma_ok = _tma_ok(eligible)
    n_max = n_fixed if n_per_width == 0 else max(widths) * n_per_width
    k_max = k_fixed if k_per_width == 0 else max(widths) * k_per_width
    if (a_mode == RAGGED and c_mode == SORTED and epi == EPI_STORE and scale is None
            and _ws_eligible(routing, tma_ok, n_max)):
        _launch_rows_ws(a, b, c, routing, k_fixed=k_fixed, k_per_width=k_per_width,
                        n_fixed=n_fixed, stride_be=stride_be, stride_bk=stride_bk,
                        stride_bn=stride_bn, stride_cm=stride_cm, b_trans=b_trans, g=g)
        return

    # A persistent grid, sized from what the host knows: the tile count's upper bound for this
    # block shape, capped at two programs per multiprocessor.
    def grid(meta):
        bound = (max_row_tiles(routing.num_assignments, len(widths), meta["BM"])
                 * cdiv(n_max, meta["BN"]))
        return (_persistent_programs(a.device, bound),)

    launch(_rows_kernel, grid,
        a_ptr=a, b_ptr=b, c_ptr=c, z_ptr=z, scale_ptr=scale, hw_ptr=hw,
        **_routing_args(routing, a.device),
        K_FIXED=k_fixed, N_FIXED=n_fixed, K_MAX=k_max, N_MAX=n_max,
        stride_am=stride_am, stride_be=stride_be, stride_bk=stride_bk, stride_bn=stride_bn,
        stride_cm=stride_cm, A_MODE=a_mode, C_MODE=c_mode, K_PER_WIDTH=k_per_width,
        N_PER_WIDTH=n_per_width, EPI=epi,
        ACT=None if activation is None else ACT_CODES[activation],
        GATED=activation is not None and gate_factor(activation) == 2, G=g,
        UPCAST=dot_dtype_flag(a.dtype), DOT_PREC=_dot_precision(a.dtype),
        TMA_OK=tma_ok, B_TRANS=b_trans)


def up_proj(x: torch.Tensor, w1: torch.Tensor, routing: Routing, activation: str,
            save_z: bool = True):
    """``H_e = act(x[tokens of e] @ W1_e)``, ragged; the gather of x is fused into the A loads.
    w1 is ``[d, g*F]`` or, for experts of one width, ``[E, d, g*I]`` (see Layouts).

    Returns ``(h, z)``: h ragged ``[n_e, f_e]`` blocks, z the pre-activation ragged
    ``[n_e, g*f_e]`` blocks (None unless ``save_z``), both flat 1-D buffers.
    """
    g = gate_factor(activation)
    cap = ragged_capacity(routing)
    h = new_empty((cap,), x.dtype, x.device)
    z = new_empty((g * cap,), x.dtype, x.device) if save_z else None
    if routing.num_assignments:
        stride_be, stride_r, stride_c = _expert_strides(w1, routing, g, expert_dim=1)
        _launch_rows(x, w1, h, routing, z=z, a_mode=GATHERED, c_mode=RAGGED,
                     k_fixed=x.shape[1], n_per_width=1, stride_am=x.stride(0),
                     stride_be=stride_be, stride_bk=stride_r, stride_bn=stride_c,
                     epi=EPI_ACT, activation=activation, g=g)
    return h, z


def down_proj(h: torch.Tensor, w2: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``ys[rows of e] = H_e @ W2_e``: ``[A, d]`` in sorted order, unweighted. w2 is ``[F, d]``
    or ``[E, I, d]``."""
    d = w2.shape[-1]
    ys = new_empty((routing.num_assignments, d), h.dtype, h.device)
    if routing.num_assignments:
        stride_be, stride_r, stride_c = _expert_strides(w2, routing, 1, expert_dim=0)
        _launch_rows(h, w2, ys, routing, a_mode=RAGGED, c_mode=SORTED, k_per_width=1,
                     n_fixed=d, stride_be=stride_be, stride_bk=stride_r, stride_bn=stride_c,
                     stride_cm=ys.stride(0))
    return ys


def down_proj_bwd(dy: torch.Tensor, topk_weights: torch.Tensor, w2: torch.Tensor, z: torch.Tensor,
                  routing: Routing, activation: str, weighted_h: bool = False):
    """``dZ_e = act'(Z_e) * ((w * dy)[tokens of e] @ W2_e^T)``, ragged ``[n_e, g*f_e]``.

    The routing weight scales the rows of the product, and dy is gathered by token on load, so
    the weighted, sorted copy of dy is never written. With ``weighted_h``, returns ``(dz, hw)``:
    ``hw = w * act(Z)``, ragged ``[n_e, f_e]``, recomputed from Z in the epilogue, the left
    operand of :func:`w2_grad` with ``topk_weights=None``.
    """
    g = gate_factor(activation)
    dz = new_empty((g * ragged_capacity(routing),), dy.dtype, dy.device)
    hw = new_empty((ragged_capacity(routing),), dy.dtype, dy.device) if weighted_h else None
    if routing.num_assignments:
        # B = W2_e^T: its rows are w2's columns.
        stride_be, stride_r, stride_c = _expert_strides(w2, routing, 1, expert_dim=0)
        _launch_rows(dy, w2, dz, routing, z=z, scale=topk_weights.reshape(-1), hw=hw,
                     a_mode=GATHERED, c_mode=RAGGED, k_fixed=dy.shape[1], n_per_width=1,
                     stride_am=dy.stride(0), stride_be=stride_be, stride_bk=stride_c,
                     stride_bn=stride_r, epi=EPI_ACT_BWD, activation=activation, g=g)
    return (dz, hw) if weighted_h else dz


def up_proj_bwd(dz: torch.Tensor, w1: torch.Tensor, routing: Routing, activation: str) -> torch.Tensor:
    """``dxs[rows of e] = dZ_e @ W1_e^T``: ``[A, d]`` in sorted order (summed per token later)."""
    g = gate_factor(activation)
    d = w1.shape[-2]
    dxs = new_empty((routing.num_assignments, d), dz.dtype, dz.device)
    if routing.num_assignments:
        # B = W1_e^T: its rows are w1's columns.
        stride_be, stride_r, stride_c = _expert_strides(w1, routing, g, expert_dim=1)
        _launch_rows(dz, w1, dxs, routing, a_mode=RAGGED, c_mode=SORTED, k_per_width=g,
                     n_fixed=d, stride_be=stride_be, stride_bk=stride_c, stride_bn=stride_r,
                     stride_cm=dxs.stride(0), g=g)
    return dxs


@functools.lru_cache(maxsize=None)
def _wgrad_tiles(widths: tuple, m_fixed, m_per_width, n_fixed, n_per_width, bm, bn) -> int:
    # Exact tile count: it depends only on the widths and d, which the host knows.
    return sum(cdiv(m_fixed or f * m_per_width, bm) * cdiv(n_fixed or f * n_per_width, bn)
               for f in widths)


def _launch_wgrad(left, right, out, routing: Routing, *, scale=None, l_mode, r_mode, m_fixed=0,
                  m_per_width=0, n_fixed=0, n_per_width=0, stride_lm=0, stride_rm=0, stride_oe,
                  stride_om, g=1):
    """One weight-gradient GEMM. M and N are either fixed (d) or a multiple of each expert's width."""
    widths = routing.expert_widths
    m_max = m_fixed if m_per_width == 0 else max(widths) * m_per_width
    n_max = n_fixed if n_per_width == 0 else max(widths) * n_per_width
    ragged = left if l_mode == RAGGED else right
    eligible = tma_eligible(left.device, left.dtype, widths, m_fixed or n_fixed, [(ragged, None)])

    def grid(meta):
        return (_wgrad_tiles(widths, m_fixed, m_per_width, n_fixed, n_per_width,
                             meta["BM"], meta["BN"]),)

    launch(_wgrad_kernel, grid,
        l_ptr=left, r_ptr=right, out_ptr=out, scale_ptr=scale, **_routing_args(routing, left.device),
        M_FIXED=m_fixed, N_FIXED=n_fixed, M_MAX=m_max, N_MAX=n_max, stride_lm=stride_lm,
        stride_rm=stride_rm, stride_oe=stride_oe, stride_om=stride_om, L_MODE=l_mode,
        R_MODE=r_mode, M_PER_WIDTH=m_per_width, N_PER_WIDTH=n_per_width, G=g,
        UPCAST=dot_dtype_flag(left.dtype), DOT_PREC=_dot_precision(left.dtype),
        TMA_OK=_tma_ok(eligible))


def w2_grad(h: torch.Tensor, dy: torch.Tensor, topk_weights: torch.Tensor | None, w2: torch.Tensor,
            routing: Routing) -> torch.Tensor:
    """``dW2_e = H_e^T @ (w * dy)[tokens of e]``, ``[F, d]``; zero for an expert with no rows.

    With ``topk_weights=None``, h is already weighted (``w * H``, from
    ``down_proj_bwd(..., weighted_h=True)``) and dy is only gathered. For a per-expert w2
    ``[E, I, d]`` the result has w2's strides.
    """
    dw2 = _weight_grad_buffer(w2)
    scale = None if topk_weights is None else topk_weights.reshape(-1)
    stride_oe, stride_r, stride_c = _expert_strides(dw2, routing, 1, expert_dim=0)
    if stride_c == 1:
        _launch_wgrad(h, dy, dw2, routing, scale=scale, l_mode=RAGGED, r_mode=GATHERED,
                      m_per_width=1, n_fixed=dy.shape[1], stride_rm=dy.stride(0),
                      stride_oe=stride_oe, stride_om=stride_r)
    else:
        # Columns of W2_e are contiguous (a transformers down_proj [E, d, I] seen as [E, I, d]):
        # compute dW2_e^T = (w dy)^T H_e instead, so that the stores still run along unit stride.
        _launch_wgrad(dy, h, dw2, routing, scale=scale, l_mode=GATHERED, r_mode=RAGGED,
                      m_fixed=dy.shape[1], n_per_width=1, stride_lm=dy.stride(0),
                      stride_oe=stride_oe, stride_om=stride_c)
    return dw2


def w1_grad(x: torch.Tensor, dz: torch.Tensor, w1: torch.Tensor, routing: Routing,
            activation: str) -> torch.Tensor:
    """``dW1_e = x[tokens of e]^T @ dZ_e``, ``[d, g*F]`` (or, for a per-expert w1
    ``[E, d, g*I]``, with w1's strides); zero for an expert with no rows."""
    g = gate_factor(activation)
    dw1 = _weight_grad_buffer(w1)
    stride_oe, stride_r, stride_c = _expert_strides(dw1, routing, g, expert_dim=1)
    if stride_c == 1:
        _launch_wgrad(x, dz, dw1, routing, l_mode=GATHERED, r_mode=RAGGED, m_fixed=x.shape[1],
                      n_per_width=g, stride_lm=x.stride(0), stride_oe=stride_oe,
                      stride_om=stride_r, g=g)
    else:
        # Rows of W1_e are contiguous (a transformers gate_up_proj [E, 2I, d] seen as
        # [E, d, 2I]): compute dW1_e^T = dZ_e^T x instead, stores along unit stride.
        _launch_wgrad(dz, x, dw1, routing, l_mode=RAGGED, r_mode=GATHERED, m_per_width=g,
                      n_fixed=x.shape[1], stride_rm=x.stride(0), stride_oe=stride_oe,
                      stride_om=stride_c, g=g)
    return dw1
