"""The providers that vmoe is timed against, and the layer-scope providers, all fed the same inputs.

Expert scope (``y = sum_j w[t, j] * MLP_e(x[t])`` for a given routing):
    vmoe        :func:`vmoe.expert_mlp`, routing metadata (build_routing) included.
    naive       :func:`vmoe.reference.expert_mlp`, the per-expert Python loop, in the bench dtype.
    stk         the block-sparse baseline of the original work (MegaBlocks' dMoE, rebuilt): tokens
                sorted and padded to 128 rows per expert, the variable-width block-sparse topology
                built every call, ``stk.ops.sdd(x, w1) -> act -> stk.ops.dsd(h, w2)``, un-permuted
                and weighted. Torch ops do the routing (MegaBlocks' CUDA extension does not build on
                CUDA 13). Needs d and every f_e to be multiples of 128. Optional (``pip install
                .[bench]``).
    megablocks_variable  hbfreed/megablocks-variable's variable-width layer (a MegaBlocks fork), its
                own routing ops, topology and stk sdd/dsd, on the same routing; eager only (one host
                synchronization per forward). Needs a build of its CUDA extensions: see
                :mod:`vmoe.bench.megablocks_variable`. Optional, timed only when asked for.
    grouped_mm  ``torch._grouped_mm``: tokens sorted by expert, one grouped GEMM per group of
                equal-width experts for each projection, weighted sum back to tokens. It keeps its
                weights as one [n, d, g f] / [n, f, d] pair per width (copied from w1, w2 once).
                Needs 16-byte aligned strides (d and f_e multiples of 8 in bf16).
    dense       the ceiling: one balanced ``[T k, d] x [d, f_bar]`` MLP with the same useful FLOPs
                (f_bar = sum_e n_e f_e / (T k), rounded to a multiple of 8) and no routing at all.
    <p>_graph   provider p captured in a CUDA graph by :mod:`vmoe.bench` and replayed (vmoe_graph,
                grouped_mm_graph, dense_graph): the GPU's time without the host's launches, which
                set the eager time of a small config. grouped_mm_graph reads its bucket row ranges
                on the host once, before the capture: a graph replays one routing, so they are fixed.

Layer scope (:func:`layer_provider`: ``out, aux, f_i = layer(x)``, as :class:`vmoe.MoEMLP` returns):
    vmoe           the MoEMLP itself, eager.
    vmoe_graph     the same, captured in a CUDA graph by :mod:`vmoe.bench` and replayed.
    vmoe_compiled  ``torch.compile(MoEMLP)``, default mode.
    grouped_mm     :func:`grouped_mm_layer`: the same layer in torch ops (router, top-k, the three
                   aux losses), the experts through grouped_mm above.
    grouped_mm_compiled  ``torch.compile`` of that layer, default mode: the baseline's own best.
    dense          dense above, plus the router GEMM.

Shape letters: see :mod:`vmoe.config`.
"""
from __future__ import annotations

from functools import cache

import torch

from vmoe import reference
from vmoe.autograd import expert_mlp
from vmoe.bench import megablocks_variable
from vmoe.config import MoEConfig, column_offsets, gate_factor
from vmoe.ops.utils.device import device_ints, interpreting

STK_BLOCK = 128


# Useful work: what every provider is credited with, whatever it computes on the way (see
# vmoe.bench); and the dense stand-in that does the same amount in one balanced MLP.


def mlp_flops(sum_nf: float, d: int, activation: str, mode: str) -> float:
    """The experts' useful FLOPs for ``sum_nf = sum_e n_e f_e``: ``4 d sum_nf`` forward (x1.5 for
    swiglu), x3 for forward+backward."""
    flops = 4.0 * sum_nf * d * (1.5 if activation == "swiglu" else 1.0)
    return flops * (3.0 if mode == "fwdbwd" else 1.0)


def _sum_nf(topk_ids: torch.Tensor, widths) -> float:
    """sum_e n_e f_e for this routing, on the host (for the report, outside any timed region)."""
    ids = topk_ids.reshape(-1).long().cpu()  # host-ok: FLOP counting, not timed
    counts = torch.bincount(ids, minlength=len(widths))[:len(widths)]
    return float((counts.double() * torch.tensor(widths, dtype=torch.float64)).sum())


def useful_flops(topk_ids: torch.Tensor, widths, d: int, activation: str, mode: str = "fwd") -> float:
    """Useful FLOPs of one call for this routing: ``4 d sum_e n_e f_e`` for the forward (x1.5 for
    swiglu), x3 for forward+backward."""
    return mlp_flops(_sum_nf(topk_ids, widths), d, activation, mode)


def dense_width(topk_ids: torch.Tensor, widths) -> int:
    """f_bar: the width of a balanced dense MLP over T k rows doing the same useful work, a multiple of 8."""
    T, k = topk_ids.shape
    mean = _sum_nf(topk_ids, widths) / (T * k)
    return max(8, 8 * round(mean / 8))


def add_dense_inputs(inp, cfg, ids, randn, dtype) -> None:
    """Give ``inp`` the dense stand-in's inputs (``dense``: x [T k, d], w1, w2, dy through an
    f_bar-wide MLP) and its useful forward FLOPs (``dense_flops``); ``randn(*shape)`` draws them."""
    T, d, k, g = cfg.T, cfg.d, cfg.k, gate_factor(cfg.activation)
    fbar = dense_width(ids, cfg.widths)
    inp.dense = {"x": randn(T * k, d).to(dtype), "w1": (randn(d, g * fbar) * d ** -0.5).to(dtype),
                 "w2": (randn(fbar, d) * fbar ** -0.5).to(dtype), "dy": randn(T * k, d).to(dtype)}
    inp.dense_flops = mlp_flops(float(T * k * fbar), d, cfg.activation, "fwd")


def applicability(provider: str, cfg, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether ``provider`` can compute ``cfg`` at all, and if not, why (a shape constraint, not a bug)."""
    if provider == "megablocks_variable":
        return megablocks_variable.applicability(cfg, dtype)
    if provider == "stk":
        bad = sorted({f for f in cfg.widths if f % STK_BLOCK})
        if bad:
            return False, f"stk needs expert widths that are multiples of {STK_BLOCK}, got {bad}"
        if cfg.d % STK_BLOCK:
            return False, f"stk needs d to be a multiple of {STK_BLOCK} (dsd's column tile), got {cfg.d}"
    if provider in ("grouped_mm", "grouped_mm_compiled", "grouped_mm_graph"):
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


def base_provider(provider: str) -> str:
    """The provider that ``provider`` times: "grouped_mm_graph" -> "grouped_mm" (the replay of its
    calls from a CUDA graph); any other name is its own."""
    return provider.removesuffix("_graph")


def _sort_order(flat: torch.Tensor):
    """Stable expert-sorted order of the T k assignments and its inverse (on the device)."""
    order = torch.sort(flat, stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse


def _sort_and_unsort(ids: torch.Tensor, num_experts: int):
    """Stable expert-sorted order of the T k assignments, its inverse, and the counts (on the device)."""
    flat = ids.reshape(-1)
    order, inverse = _sort_order(flat)
    counts = torch.bincount(flat, minlength=num_experts)
    return flat, order, inverse, counts


def _weighted_sum(ys_assign: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # A gather back to assignment order and a sum over k, rather than index_add: deterministic, no
    # atomics, and the same combine that every provider here uses.
    T, k = w.shape
    return (ys_assign.view(T, k, -1) * w.unsqueeze(-1)).sum(1)


@cache
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


def to_buckets(w1, w2, widths, activation) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """w1 [d, g F] and w2 [F, d] as one ([n, d, g f], [n, f, d]) pair per width bucket (copies).

    grouped_mm keeps its weights in this layout, as a grouped-GEMM MoE would store them: views
    into the shared layout would make its backward scatter every bucket's gradient into a zeroed
    full-size w1, a cost the method itself does not have.
    """
    g, o = gate_factor(activation), column_offsets(tuple(widths))
    plan, _ = _bucket_plan(tuple(widths))
    return [(torch.stack([w1[:, g * o[e]:g * o[e + 1]] for e in es]),
             torch.stack([w2[o[e]:o[e + 1]] for e in es])) for _, es in plan]


def from_buckets(b1s, b2s, widths, activation):
    """The inverse of :func:`to_buckets` (for comparing gradients with the reference)."""
    g, o = gate_factor(activation), column_offsets(tuple(widths))
    plan, _ = _bucket_plan(tuple(widths))
    d = b1s[0].shape[1]
    w1 = b1s[0].new_empty(d, g * o[-1])
    w2 = b2s[0].new_empty(o[-1], d)
    for (_, es), b1, b2 in zip(plan, b1s, b2s):
        for i, e in enumerate(es):
            w1[:, g * o[e]:g * o[e + 1]] = b1[i]
            w2[o[e]:o[e + 1]] = b2[i]
    return w1, w2


def bucket_counts(ids: torch.Tensor, widths) -> tuple:
    """The rows of each expert in :func:`grouped_mm_moe`'s bucket-major order, read on the host:
    its ``fixed_counts`` for a routing that does not change (one captured in a CUDA graph)."""
    plan, _ = _bucket_plan(tuple(widths))
    counts = torch.bincount(ids.reshape(-1), minlength=len(widths)).tolist()  # host-ok: once, untimed
    return tuple(counts[e] for _, es in plan for e in es)


def grouped_mm_moe(x, ids, w, b1s, b2s, widths, activation, fixed_counts: tuple | None = None):
    """``fixed_counts`` (:func:`bucket_counts` of ``ids``) replaces the host's read of the counts,
    so that the call can be captured in a CUDA graph; without it the counts are read every call."""
    T, k = ids.shape
    d = x.shape[1]
    plan, rank = _bucket_plan(tuple(widths))
    key = device_ints(rank, ids.device, torch.int64)[ids.reshape(-1)]
    if fixed_counts is None:
        _, order, inverse, counts = _sort_and_unsort(key.view(T, k), len(widths))
        # The row range of each bucket must be known on the host to slice it: one synchronization.
        counts_host = counts.tolist()  # host-ok: the baseline's own design, timed as it is
    else:
        order, inverse = _sort_order(key)
        counts_host = list(fixed_counts)
        counts = device_ints(tuple(fixed_counts), ids.device, torch.int64)
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


@cache
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

    k = ids.shape[1]
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


EXPERT_FNS = {"vmoe": vmoe_moe, "naive": naive_moe, "stk": stk_moe,
              "megablocks_variable": megablocks_variable.megablocks_variable_moe}


def expert_provider(provider: str, inp, grad: bool, widths, activation):
    """``(leaves, forward, dy)`` of one expert-scope provider on the shared inputs ``inp``
    (:class:`vmoe.bench.Inputs`): ``forward()`` returns y; its leaves require grad if ``grad``.
    A ``<p>_graph`` provider gets p's forward, ready to be captured (:func:`base_provider`)."""

    def leaf(t):
        return t.detach().requires_grad_(grad)

    ids = inp.ids
    graph, provider = provider.endswith("_graph"), base_provider(provider)
    if provider == "dense":
        lv = {n: leaf(inp.dense[n]) for n in ("x", "w1", "w2")}
        return lv, lambda: dense_mlp(lv["x"], lv["w1"], lv["w2"], activation), inp.dense["dy"]
    if provider == "grouped_mm":
        buckets = to_buckets(inp.w1, inp.w2, widths, activation)
        lv = {"x": leaf(inp.x), "w": leaf(inp.w)}
        for i, (b1, b2) in enumerate(buckets):
            lv[f"b1_{i}"], lv[f"b2_{i}"] = leaf(b1), leaf(b2)
        b1s = [lv[f"b1_{i}"] for i in range(len(buckets))]
        b2s = [lv[f"b2_{i}"] for i in range(len(buckets))]
        fixed = bucket_counts(ids, widths) if graph else None
        return lv, lambda: grouped_mm_moe(lv["x"], ids, lv["w"], b1s, b2s, widths, activation,
                                          fixed_counts=fixed), inp.dy
    lv = {n: leaf(getattr(inp, n)) for n in ("x", "w", "w1", "w2")}
    fn = EXPERT_FNS[provider]
    return lv, lambda: fn(lv["x"], ids, lv["w"], lv["w1"], lv["w2"], widths, activation), inp.dy


def provider_grads(leaves: dict, widths, activation) -> dict:
    """The gradients in ``leaves`` by name, grouped_mm's per-bucket weights (``b1_i``, ``b2_i``) laid
    back out as w1 and w2, for comparing with the reference."""
    out = {n: t.grad for n, t in leaves.items() if t.grad is not None and n[:2] not in ("b1", "b2")}
    n = sum(1 for name in leaves if name.startswith("b1_"))
    if n:
        # A bucket that no token reached takes no part in the graph: its gradient is zero.
        b1s, b2s = ([leaves[f"{b}_{i}"].grad if leaves[f"{b}_{i}"].grad is not None
                     else torch.zeros_like(leaves[f"{b}_{i}"]) for i in range(n)] for b in ("b1", "b2"))
        out["w1"], out["w2"] = from_buckets(b1s, b2s, widths, activation)
    return out


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
        if p == "megablocks_variable":
            reason = megablocks_variable.unavailable(device)
            if reason:
                log(f"skipping {p}: {reason}")
                continue
        if p.endswith("_compiled") and device.type != "cuda":
            log(f"skipping {p}: torch.compile is measured on a GPU only")
            continue
        if p.endswith("_graph") and device.type != "cuda":
            log(f"skipping {p}: CUDA graphs need a GPU")
            continue
        if p in ("grouped_mm", "grouped_mm_compiled", "grouped_mm_graph"):
            reason = grouped_mm_unavailable(device, dtype)
            if reason:
                log(f"skipping {p}: {reason}")
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


def layer_provider(provider: str, moe, x: torch.Tensor, dense: dict | None = None):
    """``(leaves, forward)`` of one layer-scope provider of the layer ``moe`` on the input leaf ``x``.

    ``forward()`` returns ``(out, aux, f_i)`` as :class:`vmoe.MoEMLP` does (dense: ``f_i`` None and
    the router logits' mean as its only "aux"); ``leaves`` are the tensors a backward writes
    gradients into. Every provider has its own copy of the weights, so none shares state.
    """
    import copy

    cfg = moe.config

    def leaf(t):
        return t.detach().requires_grad_(x.requires_grad)

    if provider in ("vmoe", "vmoe_graph", "vmoe_compiled"):
        layer = copy.deepcopy(moe)
        fn = layer
        if provider == "vmoe_compiled":
            # A fresh cache per layer: across many configs dynamo would otherwise reach its
            # recompile limit and silently fall back to eager.
            torch._dynamo.reset()
            fn = torch.compile(layer)
        return {"x": x, "router": layer.router.weight, "w1": layer.w1, "w2": layer.w2}, lambda: fn(x)
    lv = {"x": x, "router": leaf(moe.router.weight)}
    if provider == "dense":
        lv.update({"xd": leaf(dense["x"]), "w1": leaf(dense["w1"]), "w2": leaf(dense["w2"])})

        def forward():
            logits = torch.nn.functional.linear(lv["x"], lv["router"]).float()
            return dense_mlp(lv["xd"], lv["w1"], lv["w2"], cfg.activation), {"router": logits.mean()}, None

        return lv, forward
    if provider not in ("grouped_mm", "grouped_mm_compiled"):
        raise ValueError(f"no layer-scope provider {provider!r}")
    buckets = to_buckets(moe.w1.detach(), moe.w2.detach(), cfg.expert_widths, cfg.activation)
    for i, (b1, b2) in enumerate(buckets):
        lv[f"b1_{i}"], lv[f"b2_{i}"] = leaf(b1), leaf(b2)
    b1s = [lv[f"b1_{i}"] for i in range(len(buckets))]
    b2s = [lv[f"b2_{i}"] for i in range(len(buckets))]
    layer = grouped_mm_layer
    if provider == "grouped_mm_compiled":
        torch._dynamo.reset()  # as for vmoe_compiled
        layer = torch.compile(grouped_mm_layer)
    return lv, lambda: layer(x, lv["router"], b1s, b2s, cfg)


def grouped_mm_layer(x, router_w, b1s, b2s, cfg: MoEConfig):
    """:class:`vmoe.MoEMLP`'s forward written in torch ops, its experts through :func:`grouped_mm_moe`
    (``b1s``, ``b2s`` from :func:`to_buckets`). Returns ``(out, aux, f_i)``."""
    T, E, k = x.shape[0], cfg.num_experts, cfg.num_active_experts
    logits = torch.nn.functional.linear(x, router_w).float()                 # [T, E]
    probs = reference.router_probs(logits, cfg.router)
    top, ids = probs.topk(k, dim=-1)
    if cfg.norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    out = grouped_mm_moe(x, ids, top.to(x.dtype), b1s, b2s, cfg.expert_widths, cfg.activation)
    counts = torch.bincount(ids.reshape(-1), minlength=E).float()
    widths = device_ints(cfg.expert_widths, logits.device, torch.float32)
    aux = reference.route_aux_losses(torch.logsumexp(logits, dim=-1), probs, counts, cfg.expert_sizes,
                                     widths)
    return out, aux, counts / max(T * k, 1)
