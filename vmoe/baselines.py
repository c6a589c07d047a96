"""The baselines that vmoe is timed against, each a function of the same inputs as vmoe's.

Used by :mod:`vmoe.bench` (which describes each provider in its docstring) and its tests.

    naive       :func:`vmoe.reference.expert_mlp` in the bench dtype.
    stk         the block-sparse dMoE of MegaBlocks, rebuilt on ``stk.ops.sdd``/``dsd``.
    grouped_mm  ``torch._grouped_mm``, one grouped GEMM per group of equal-width experts
                (:func:`to_buckets` gives its weight layout, :func:`from_buckets` the inverse).
    dense       one balanced MLP with the same useful FLOPs, no routing.

Shape letters: see :mod:`vmoe.config`.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from . import reference
from ._utils import device_ints, interpreting
from .autograd import expert_mlp
from .config import gate_factor

STK_BLOCK = 128


def applicability(provider: str, cfg, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether ``provider`` can compute ``cfg`` at all, and if not, why (a shape constraint, not a bug)."""
    if provider == "stk":
        bad = sorted({f for f in cfg.widths if f % STK_BLOCK})
        if bad:
            return False, f"stk needs expert widths that are multiples of {STK_BLOCK}, got {bad}"
        if cfg.d % STK_BLOCK:
            return False, f"stk needs d to be a multiple of {STK_BLOCK} (dsd's column tile), got {cfg.d}"
    if provider == "grouped_mm":
        size = torch.empty((), dtype=dtype).element_size()
        per = 16 // size
        bad = sorted({f for f in cfg.widths if (f * size) % 16})
        if bad or (cfg.d * size) % 16:
            what = f"widths {bad}" if bad else f"d={cfg.d}"
            return False, (f"torch._grouped_mm needs 16-byte aligned strides: d and every f_e a "
                           f"multiple of {per} in {str(dtype)[6:]}, got {what}")
    return True, ""


def _act(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation in the fewest torch kernels, for the providers built from torch ops."""
    if activation == "relu2":
        return torch.relu(z).square()
    if activation == "swiglu":
        gate, up = z.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    return reference.act(z, activation)


def vmoe_moe(x, ids, w, w1, w2, widths, activation):
    return expert_mlp(x, ids, w, w1, w2, widths, activation, impl="triton")


def naive_moe(x, ids, w, w1, w2, widths, activation):
    return reference.expert_mlp(x, ids, w, w1, w2, widths, activation)


def dense_mlp(x, w1, w2, activation):
    return _act(x @ w1, activation) @ w2


def _sort_and_unsort(ids: torch.Tensor, num_experts: int):
    """Stable expert-sorted order of the T k assignments, its inverse, and the counts (on the device)."""
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=num_experts)
    return flat, order, inverse, counts


def _weighted_sum(ys_assign: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # A gather back to assignment order and a sum over k, rather than index_add: deterministic, no
    # atomics, and the same combine that every provider here uses.
    T, k = w.shape
    return (ys_assign.view(T, k, -1) * w.unsqueeze(-1)).sum(1)


@lru_cache(maxsize=None)
def _bucket_plan(widths: tuple):
    """Experts grouped by width: [(f, experts)], and each expert's rank in bucket-major order."""
    buckets = {}
    for e, f in enumerate(widths):
        buckets.setdefault(f, []).append(e)
    plan = [(f, tuple(es)) for f, es in buckets.items()]
    rank = [0] * len(widths)
    for r, e in enumerate(e for _, es in plan for e in es):
        rank[e] = r
    return plan, tuple(rank)


def _column_offsets(widths) -> list[int]:
    """o_e for e = 0..E: expert e owns rows [o_e, o_(e+1)) of w2."""
    out = [0]
    for f in widths:
        out.append(out[-1] + f)
    return out


def to_buckets(w1, w2, widths, activation) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """w1 [d, g F] and w2 [F, d] as one ([n, d, g f], [n, f, d]) pair per width bucket (copies).

    grouped_mm keeps its weights in this layout, as a grouped-GEMM MoE would store them: views
    into the shared layout would make its backward scatter every bucket's gradient into a zeroed
    full-size w1, a cost the method itself does not have.
    """
    g, o = gate_factor(activation), _column_offsets(widths)
    plan, _ = _bucket_plan(tuple(widths))
    return [(torch.stack([w1[:, g * o[e]:g * o[e + 1]] for e in es]),
             torch.stack([w2[o[e]:o[e + 1]] for e in es])) for _, es in plan]


def from_buckets(b1s, b2s, widths, activation):
    """The inverse of :func:`to_buckets` (for comparing gradients with the reference)."""
    g, o = gate_factor(activation), _column_offsets(widths)
    plan, _ = _bucket_plan(tuple(widths))
    d = b1s[0].shape[1]
    w1 = b1s[0].new_empty(d, g * o[-1])
    w2 = b2s[0].new_empty(o[-1], d)
    for (_, es), b1, b2 in zip(plan, b1s, b2s):
        for i, e in enumerate(es):
            w1[:, g * o[e]:g * o[e + 1]] = b1[i]
            w2[o[e]:o[e + 1]] = b2[i]
    return w1, w2


def grouped_mm_moe(x, ids, w, b1s, b2s, widths, activation):
    T, k = ids.shape
    d = x.shape[1]
    plan, rank = _bucket_plan(tuple(widths))
    key = device_ints(rank, ids.device, torch.int64)[ids.reshape(-1)]
    _, order, inverse, counts = _sort_and_unsort(key.view(T, k), len(widths))
    # The row range of each bucket must be known on the host to slice it: one synchronization.
    counts_host = counts.tolist()  # host-ok: the baseline's own design, timed as it is
    xs = x[order // k]
    outs, row, pos = [], 0, 0
    for (_, experts), b1, b2 in zip(plan, b1s, b2s):
        n = len(experts)
        rows = sum(counts_host[pos:pos + n])
        offs = torch.cumsum(counts[pos:pos + n], 0, dtype=torch.int32)
        pos += n
        if rows == 0:
            continue
        h = _act(torch._grouped_mm(xs[row:row + rows], b1, offs=offs), activation)
        outs.append(torch._grouped_mm(h, b2, offs=offs))
        row += rows
    ys = torch.cat(outs) if outs else x.new_zeros(0, d)
    return _weighted_sum(ys[inverse], w)


@lru_cache(maxsize=None)
def stk_topology(padded_rows: torch.Tensor, R: int, nnz: int, widths: tuple, g: int, device):
    """The block-sparse [P, g F] topology: expert e's row blocks hold its g f_e / 128 column blocks.

    Mirrors MegaBlocks' ``dMoE.topology`` (BCSR with the transposed index for the backward), for
    experts of different widths; the data is a meta tensor, only its shape is read.
    """
    import stk

    B = STK_BLOCK
    cols = device_ints(tuple(g * f // B for f in widths), device, torch.int64)
    col_start = torch.cumsum(cols, 0) - cols
    row_expert = torch.repeat_interleave(torch.arange(len(widths), device=device), padded_rows // B,
                                         output_size=R)
    per_row = cols[row_expert]
    offsets = torch.zeros(R + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(per_row, 0)
    row_indices = torch.repeat_interleave(torch.arange(R, device=device), per_row, output_size=nnz)
    j = torch.arange(nnz, device=device) - offsets[row_indices]
    column_indices = col_start[row_expert][row_indices] + j
    n_cols = g * sum(widths) // B
    order = torch.sort(column_indices, stable=True).indices
    offsets_t = torch.zeros(n_cols + 1, dtype=torch.int32, device=device)
    offsets_t[1:] = torch.cumsum(torch.bincount(column_indices, minlength=n_cols), 0)
    data = torch.empty(nnz, B, B, device="meta")
    # int32 block indices where MegaBlocks uses int16: since Triton 3.2 an int16 index times a
    # constexpr block size stays int16 in stk's sdd kernel and wraps from block 256 on (32768 rows
    # or columns), which every config here reaches (stanford-futuredata/stk PR #17).
    i32 = torch.int32
    topo = stk.Matrix((R * B, n_cols * B), data, row_indices.to(i32), column_indices.to(i32),
                      offsets, row_indices[order].to(i32), offsets_t, order.to(i32))
    return topo, row_indices, offsets, per_row


def stk_moe(x, ids, w, w1, w2, widths, activation):
    import stk

    T, k = ids.shape
    d, B, g = x.shape[1], STK_BLOCK, gate_factor(activation)
    E = len(widths)
    flat, order, inverse, counts = _sort_and_unsort(ids, E)
    padded = (counts + B - 1) // B * B
    start = torch.cumsum(counts, 0) - counts
    padded_start = torch.cumsum(padded, 0) - padded
    # The padded row counts size the buffers, as in MegaBlocks' padded_gather: one synchronization.
    padded_host = padded.tolist()  # host-ok: the baseline's own design, timed as it is
    P = sum(padded_host)
    R = P // B

    def nnz(cols_per_width):
        return sum(p // B * (cols_per_width * f // B) for p, f in zip(padded_host, widths))

    expert_of_sorted = flat[order]
    rank = torch.arange(order.numel(), device=x.device) - start[expert_of_sorted]
    row_of_sorted = padded_start[expert_of_sorted] + rank
    xp = x.new_zeros(P, d).index_copy(0, row_of_sorted, x[order // k])
    topo, _, _, _ = stk_topology(padded, R, nnz(g), tuple(widths), g, x.device)
    z = stk.ops.sdd(xp, w1, topo)
    if g == 1:
        h = stk.Matrix(topo.size(), _act(z.data, activation), topo.row_indices, topo.column_indices,
                       topo.offsets, topo.column_indices_t, topo.offsets_t, topo.block_offsets_t)
    else:
        # swiglu: one sdd over the [gate | up] columns of each expert, then pair block j of the gate
        # half with block j of the up half of the same row; h has the F-wide topology.
        h_topo, h_rows, h_offsets, h_per_row = stk_topology(padded, R, nnz(1), tuple(widths), 1,
                                                             x.device)
        i = torch.arange(h_rows.numel(), device=x.device)
        gate = 2 * h_offsets[h_rows].long() + (i - h_offsets[h_rows])
        up = gate + h_per_row[h_rows]
        data = torch.nn.functional.silu(z.data[gate]) * z.data[up]
        h = stk.Matrix(h_topo.size(), data, h_topo.row_indices, h_topo.column_indices,
                       h_topo.offsets, h_topo.column_indices_t, h_topo.offsets_t,
                       h_topo.block_offsets_t)
    yp = stk.ops.dsd(h, w2)
    return _weighted_sum(yp[row_of_sorted[inverse]], w)


EXPERT_FNS = {"vmoe": vmoe_moe, "vmoe_graph": vmoe_moe, "naive": naive_moe, "stk": stk_moe}


def available_providers(requested, device, dtype, log=print) -> list[str]:
    """The requested providers that can run here; each one left out is announced through ``log``."""
    out = []
    for p in requested:
        if p == "stk":
            try:
                import stk  # noqa: F401
            except ImportError as exc:
                log(f"skipping stk: cannot import it ({exc}); install the optional extra with "
                    f"`pip install --no-deps .whl/stanford_stk-0.7.1-py3-none-any.whl` "
                    f"or `pip install '.[bench]'`")
                continue
            if device.type != "cuda" and not interpreting():
                log("skipping stk: its Triton kernels need CUDA or TRITON_INTERPRET=1")
                continue
        if p == "vmoe_graph" and device.type != "cuda":
            log("skipping vmoe_graph: CUDA graphs need a GPU")
            continue
        if p == "grouped_mm":
            reason = grouped_mm_unavailable(device, dtype)
            if reason:
                log(f"skipping grouped_mm: {reason}")
                continue
        out.append(p)
    return out


def grouped_mm_unavailable(device, dtype) -> str:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        a = torch.randn(16, 32, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(2, 32, 16, device=device, dtype=dtype, requires_grad=True)
        out = torch._grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
        out.backward(torch.randn_like(out))
    except (RuntimeError, NotImplementedError) as exc:
        return f"torch._grouped_mm fails on {device.type} in {str(dtype)[6:]}: {str(exc).splitlines()[0]}"
    return ""
