"""Gather token rows into expert order, and the weighted combine back to tokens.

Derivation: notebooks/03_gather_scatter.ipynb. Shape letters: see :mod:`vmoe.config`.

The combine is deterministic: each token sums its k contributions in slot order j = 0..k-1, in
fp32 registers, and writes its row once; no float atomics, so two runs are bitwise equal.
Assignments whose id was out of range (sorted position >= offsets[E]) contribute nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vmoe.ops.routing import Routing
from vmoe.ops.utils.device import cdiv, interpreting, new_empty, next_pow2
from vmoe.ops.utils.launch import launch


@triton.jit(do_not_specialize=['A'])
def _gather_kernel(x_ptr, out_ptr, sorted_to_assign_ptr, offsets_ptr, A, D, E, stride_x, stride_o,
                   KTOP: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    i_r, i_d = tl.program_id(0), tl.program_id(1)
    o_r = i_r * BR + tl.arange(0, BR)
    o_d = i_d * BD + tl.arange(0, BD)
    n_valid = tl.load(offsets_ptr + E)
    m_r = o_r < A
    b_a = tl.load(sorted_to_assign_ptr + o_r, mask=m_r & (o_r < n_valid), other=0)
    m = m_r[:, None] & (o_d < D)[None, :]
    # Rows of dropped assignments (past offsets[E]) are written as zeros.
    m_live = (o_r < n_valid)[:, None] & m
    b_x = tl.load(x_ptr + (b_a // KTOP).to(tl.int64)[:, None] * stride_x + o_d[None, :],
                  mask=m_live, other=0.0)
    tl.store(out_ptr + o_r.to(tl.int64)[:, None] * stride_o + o_d[None, :], b_x, mask=m)


@triton.jit(do_not_specialize=['T'])
def _combine_kernel(ys_ptr, w_ptr, out_ptr, assign_to_sorted_ptr, offsets_ptr, T, D, E,
                    stride_ys, stride_o, KTOP: tl.constexpr, HAS_W: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr):
    i_t, i_d = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_t = o_t < T
    m_d = o_d < D
    n_valid = tl.load(offsets_ptr + E)
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for j in tl.static_range(KTOP):                       # fixed slot order: deterministic
        o_a = o_t.to(tl.int64) * KTOP + j
        b_pos = tl.load(assign_to_sorted_ptr + o_a, mask=m_t, other=0)
        m_live = m_t & (b_pos < n_valid)
        b_y = tl.load(ys_ptr + b_pos.to(tl.int64)[:, None] * stride_ys + o_d[None, :],
                      mask=m_live[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        if HAS_W:
            b_w = tl.load(w_ptr + o_a, mask=m_live, other=0.0).to(tl.float32)
            b_y = b_y * b_w[:, None]
        acc += b_y
    tl.store(out_ptr + o_t.to(tl.int64)[:, None] * stride_o + o_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.jit(do_not_specialize=['A'])
def _weight_grad_kernel(dy_ptr, ys_ptr, dw_ptr, assign_to_sorted_ptr, offsets_ptr, A, D, E,
                        stride_dy, stride_ys, KTOP: tl.constexpr, BA: tl.constexpr,
                        BD: tl.constexpr):
    i_a = tl.program_id(0)
    o_a = i_a * BA + tl.arange(0, BA)
    m_a = o_a < A
    n_valid = tl.load(offsets_ptr + E)
    b_pos = tl.load(assign_to_sorted_ptr + o_a, mask=m_a, other=0)
    m_live = m_a & (b_pos < n_valid)
    o_tok = (o_a // KTOP).to(tl.int64)
    acc = tl.zeros((BA,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m = m_live[:, None] & (o_d < D)[None, :]
        b_dy = tl.load(dy_ptr + o_tok[:, None] * stride_dy + o_d[None, :], mask=m, other=0.0)
        b_y = tl.load(ys_ptr + b_pos.to(tl.int64)[:, None] * stride_ys + o_d[None, :], mask=m,
                      other=0.0)
        acc += tl.sum(b_dy.to(tl.float32) * b_y.to(tl.float32), axis=1)
    tl.store(dw_ptr + o_a, acc.to(dw_ptr.dtype.element_ty), mask=m_a)


def _blocks(rows_per_prog: int, d: int):
    if interpreting():
        return 4, 16
    return rows_per_prog, max(16, min(256, next_pow2(d)))


def gather(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``xs[p] = x[sorted_to_assign[p] // k]``: token rows in expert order, ``[A, d]``.

    The forward never calls this (the up projection gathers inside its A loads); it is the
    standalone step that notebooks/03_gather_scatter.ipynb derives.
    """
    A, D = routing.num_assignments, x.shape[1]
    out = new_empty((A, D), x.dtype, x.device)
    if A and D:
        BR, BD = _blocks(32, D)
        grid = (cdiv(A, BR), cdiv(D, BD))
        launch(_gather_kernel, grid, x, out, routing.sorted_to_assign, routing.offsets, A, D,
               routing.num_experts, x.stride(0), out.stride(0),
               KTOP=routing.k, BR=BR, BD=BD)
    return out


def combine(ys: torch.Tensor, routing: Routing, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``y[t] = sum_j weights[t, j] * ys[assign_to_sorted[t*k + j]]``, ``[T, d]`` (weights of 1 when
    None). Summed in slot order in fp32, so the result is deterministic."""
    T, D = routing.num_tokens, ys.shape[1]
    out = new_empty((T, D), ys.dtype, ys.device)
    if T and D:
        BT, BD = _blocks(16, D)
        grid = (cdiv(T, BT), cdiv(D, BD))
        launch(_combine_kernel, grid, ys, weights if weights is not None else ys, out,
               routing.assign_to_sorted, routing.offsets, T, D,
               routing.num_experts, ys.stride(0), out.stride(0), KTOP=routing.k,
               HAS_W=weights is not None, BT=BT, BD=BD)
    return out


def combine_weight_grad(dy: torch.Tensor, ys: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The gradient of the combine w.r.t. its weights: ``dw[t, j] = <dy[t], ys[assign_to_sorted[t*k+j]]>``,
    ``[T, k]`` (zero for a dropped assignment)."""
    A, D = routing.num_assignments, dy.shape[1]
    dw = new_empty((routing.num_tokens, routing.k), dy.dtype, dy.device)
    if A:
        BA, BD = _blocks(32, D)
        launch(_weight_grad_kernel, (cdiv(A, BA),), dy, ys, dw, routing.assign_to_sorted,
               routing.offsets, A, D, routing.num_experts,
               dy.stride(0), ys.stride(0), KTOP=routing.k,
               BA=BA, BD=BD)
    return dw
