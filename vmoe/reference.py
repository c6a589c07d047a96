"""The naive per-expert loop: the oracle for every kernel, test and notebook.

Slow on purpose and written for reading. Every function here has a fast twin in another module
and a test that compares the two. Shape letters: see :mod:`vmoe.config`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vmoe.config import check_expert_mlp_args, expand_sizes, gate_factor

if TYPE_CHECKING:  # the exchange's torch twins take its plan; vmoe.ops.exchange imports this module
    from vmoe.ops.exchange import ExchangePlan


def act(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The expert activation. For ``"swiglu"`` z is ``[n, 2f]`` (gate, up) and the result ``[n, f]``."""
    if activation == "relu2":
        return torch.relu(z) ** 2
    if activation == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
    if activation == "silu":
        return z * torch.sigmoid(z)
    if activation == "swiglu":
        gate, up = z.chunk(2, dim=-1)
        return gate * torch.sigmoid(gate) * up
    raise ValueError(f"unknown activation {activation!r}")


def routing(topk_ids: torch.Tensor, num_experts: int, expert_widths=None):
    """Counts, offsets and the stable expert-sorted permutation, by sort + bincount + cumsum.

    Returns ``(counts [E], offsets [E+1], sorted_to_assign [T*k], assign_to_sorted [T*k])``, where
    assignment ``a = t*k + j`` is slot j of token t. ``counts`` are the assignments that chose
    each expert. Assignments that compute nothing, ids outside [0, E) and, given
    ``expert_widths``, the null experts' (width 0), own no sorted rows: they sort after
    ``offsets[E]``, in assignment order.
    """
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts)
    computed = counts.clone()
    key = torch.where(valid, flat, num_experts)
    if expert_widths is not None:
        null = torch.tensor([f == 0 for f in expert_widths], device=flat.device)
        computed[null] = 0
        key = torch.where(valid & null[flat.clamp(0, num_experts - 1)], num_experts, key)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(computed, 0)
    sorted_to_assign = torch.sort(key, stable=True).indices
    assign_to_sorted = torch.empty_like(sorted_to_assign)
    assign_to_sorted[sorted_to_assign] = torch.arange(flat.numel(), device=flat.device)
    return counts, offsets, sorted_to_assign, assign_to_sorted


def expert_mlp(x, topk_ids, topk_weights, w1, w2, expert_widths, activation="relu2"):
    """``y[t] = sum_j topk_weights[t, j] * act(x[t] @ W1_e) @ W2_e`` with ``e = topk_ids[t, j]``.

    One matmul pair per expert, in a Python loop. See :func:`vmoe.expert_mlp` for the argument
    contract; this function computes in the dtype of its inputs (pass float64 for an oracle).
    """
    widths = check_expert_mlp_args(x, topk_ids, topk_weights, w1, w2, expert_widths, activation)
    return expert_mlp_unchecked(x, topk_ids, topk_weights, w1, w2, widths, activation)


def expert_mlp_unchecked(x, topk_ids, topk_weights, w1, w2, expert_widths: tuple, activation: str):
    """:func:`expert_mlp` for arguments already checked (``vmoe.expert_mlp`` checks them once)."""
    if torch.compiler.is_compiling():
        return _expert_mlp_masked(x, topk_ids, topk_weights, w1, w2, expert_widths, activation)
    g = gate_factor(activation)
    y = torch.zeros_like(x)
    ids = topk_ids.long()
    offset = 0
    for e, f in enumerate(expert_widths):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() and f:  # a null expert (f = 0) adds exactly nothing
            h = act(x[tok] @ w1[:, g * offset: g * (offset + f)], activation)
            out = h @ w2[offset: offset + f]
            y.index_add_(0, tok, out * topk_weights[tok, slot].unsqueeze(-1))
        offset += f
    inputs = (x, topk_weights, w1, w2)
    if not y.requires_grad and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        # No expert received a token: the output is still a function of the inputs, with zero
        # gradients. Sums of empty slices are exact zeros that carry the graph (and, unlike
        # 0 * x, no NaN of x).
        y = y + sum(t[:0].sum() for t in inputs)
    return y


def _expert_mlp_masked(x, topk_ids, topk_weights, w1, w2, expert_widths: tuple, activation: str):
    """:func:`expert_mlp_unchecked` with no data-dependent shape, for ``torch.compile(fullgraph=True)``:
    every expert runs on every token, and a token's result is scaled by the summed weight of its
    slots that chose the expert (0 for the others). E times the loop's FLOPs, and the same sums
    but for the order of additions."""
    g = gate_factor(activation)
    y = torch.zeros_like(x)
    ids = topk_ids.long()
    offset = 0
    for e, f in enumerate(expert_widths):
        if f:
            weight = (topk_weights * (ids == e).to(topk_weights.dtype)).sum(-1, keepdim=True)  # [T, 1]
            h = act(x @ w1[:, g * offset: g * (offset + f)], activation)
            y = y + (h @ w2[offset: offset + f]) * weight.to(x.dtype)
        offset += f
    return y


def shared_expert(x: torch.Tensor, w1_shared: torch.Tensor, w2_shared: torch.Tensor,
                  activation: str, gate: torch.Tensor | None = None) -> torch.Tensor:
    """The always-on expert, as a dense MLP: ``gate * act(x @ W1_s) @ W2_s`` (gate ``[T, 1]``, or
    1 when None), with ``W1_s = w1[:, g*F:]`` and ``W2_s = w2[F:]`` of a layer that has one."""
    y = act(x @ w1_shared, activation) @ w2_shared
    return y if gate is None else y * gate.to(y.dtype)


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x in the order of ``index``: ``x[index]``."""
    return x[index.long()]


def combine(ys: torch.Tensor, assign_to_sorted: torch.Tensor, weights: torch.Tensor | None, k: int):
    """``y[t] = sum_j weights[t, j] * ys[assign_to_sorted[t*k + j]]`` (weights of 1 when None)."""
    rows = ys[assign_to_sorted.long()].reshape(-1, k, ys.shape[-1])
    if weights is not None:
        rows = rows * weights.reshape(-1, k, 1).to(ys.dtype)
    return rows.sum(1)


def router_probs(logits: torch.Tensor, router: str) -> torch.Tensor:
    """P ``[T, E]`` from the router logits: sigmoid, or softmax over the experts."""
    if router == "sigmoid":
        return torch.sigmoid(logits)
    if router == "softmax":
        return F.softmax(logits, dim=-1)
    raise ValueError(f"unknown router {router!r}")


def route(logits: torch.Tensor, k: int, router: str, norm_topk_prob: bool):
    """The fused router of :mod:`vmoe.ops.router`, in torch ops, in the dtype of ``logits``.

    Returns ``(topk_ids [T, k] int64, topk_weights [T, k], probs [T, E], lse [T])``. The top-k is
    the first k of a stable descending sort of the probabilities, so ties go to the lower expert id
    and NaN ranks first (``torch.topk`` promises neither).
    """
    probs = router_probs(logits, router)
    lse = torch.logsumexp(logits, dim=-1)
    topk_ids = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
    topk_weights = probs.gather(1, topk_ids)
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
    return topk_ids, topk_weights, probs, lse


def route_aux_losses(lse: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor,
                     expert_sizes, widths: torch.Tensor | None = None, group_sizes=None) -> dict:
    """The three auxiliary losses of :class:`vmoe.MoEMLP` in the dtype of ``probs`` (float64 for
    an oracle), from the ``[T]`` logsumexp of the logits, the ``[T, E]`` probabilities and the
    ``[E]`` counts; ``expert_sizes`` is ``[(count, width), ...]``, one load-balance group a pair
    unless ``group_sizes`` (expert counts in expert order, summing to E) says otherwise.
    ``widths``, the ``[E]`` widths as floats on ``probs``' device, saves building them per call.

    No matrix products: under ``torch.autocast`` a matmul would run in the autocast dtype, and the
    losses are promised in the dtype of ``probs``."""
    if probs.shape[0] == 0:
        zero = probs.sum() * 0.0
        return {"router_z_loss": zero, "load_balance_loss": zero, "compute_loss": zero}
    z_loss = lse.pow(2).mean()
    p_mean = probs.mean(0)
    counts = counts.to(probs.dtype)
    if group_sizes is None:
        group_sizes = [count for count, _ in expert_sizes]
    group_losses, lo = [], 0
    for count in group_sizes:
        n, pm = counts[lo:lo + count], p_mean[lo:lo + count]
        f = n / n.sum().clamp_min(1.0)
        p = pm / pm.sum().clamp_min(1e-20)
        group_losses.append(count * (f * p).sum())
        lo += count
    if widths is None:
        widths = torch.tensor(expand_sizes(expert_sizes), device=probs.device)
    w = widths.to(probs.dtype)
    compute_loss = (probs * w).sum(-1).mean() / w.mean()
    return {"router_z_loss": z_loss, "load_balance_loss": torch.stack(group_losses).mean(),
            "compute_loss": compute_loss}


def null_share_loss(p_mean: torch.Tensor, f: torch.Tensor, null_ranges, bound: float
                    ) -> torch.Tensor:
    """``relu(s - bound) * p`` for ``MoEConfig.max_null_share``: ``s`` the null experts' share of
    the assignments (``f``, the ``[E]`` fractions, summed over the ``null_ranges``; no gradient) and
    ``p`` their summed mean router probability (from the ``[E]`` ``p_mean``). 0 while the share is
    within the bound; above it, the gradient lowers the null experts' probability in proportion to
    the excess, as the load-balance loss's f * p form does."""
    share = sum(f[lo:hi].sum() for lo, hi in null_ranges)
    p = sum(p_mean[lo:hi].sum() for lo, hi in null_ranges)
    return torch.relu(share.detach().to(p.dtype) - bound) * p


# The expert-parallel exchange (:mod:`vmoe.ops.exchange`), index by index; ``plan`` is its
# :class:`~vmoe.ops.exchange.ExchangePlan`.

def exchange_destinations(topk_ids: torch.Tensor, owner: torch.Tensor, world: int,
                       chunk_tokens: int, bins: int) -> torch.Tensor:
    """``dest [T, W]`` of :mod:`vmoe.ops.exchange` (the bin of each (token, rank) pair, or ``bins``
    where the token sends nothing there), in torch ops."""
    T, E = topk_ids.shape[0], owner.shape[0]
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < E)
    own = torch.where(valid, owner.long()[ids.clamp(0, E - 1)], -1)                  # [T, k]
    q = torch.arange(world, device=ids.device)
    hit = (own[:, :, None] == q).any(1)                                              # [T, W]
    chunk = torch.arange(T, device=ids.device) // chunk_tokens
    return torch.where(hit, chunk[:, None] * world + q, bins).to(torch.int32)


def exchange_pair_rows(plan: ExchangePlan, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, has_row)``, each ``[t1 - t0, W]``: the row of each (token, rank) pair of chunk c's
    tokens in its send buffer, and whether it has one (0 where not)."""
    r, W = plan.routing, plan.world
    t0, t1 = plan.tokens(c)
    device = r.offsets.device
    q = torch.arange(W, device=device)
    pos = r.assign_to_sorted.long()[torch.arange(t0, t1, device=device)[:, None] * W + q]
    offsets = r.offsets.long()
    has = pos < offsets[plan.bins]
    if plan.capacity is not None:
        i = pos - offsets[c * W + q]
        has = has & (i < plan.capacity)
        row = q * plan.capacity + i
    else:
        row = pos - offsets[c * W]
    return torch.where(has, row, 0), has


def exchange_row_pairs(plan: ExchangePlan, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token, destination, live)``, each ``[rows]``: the pair each row of chunk c's send buffer
    carries (token 0 and ``live`` False for an empty row)."""
    r, W, rows = plan.routing, plan.world, plan.rows(c)
    device = r.offsets.device
    offsets = r.offsets.long()
    p = torch.arange(rows, device=device)
    if plan.capacity is not None:
        b = c * W + p // plan.capacity
        i = p % plan.capacity
        live = i < offsets[b + 1] - offsets[b]
        pos = offsets[b] + i
        q = p // plan.capacity
    else:
        live = torch.ones(rows, dtype=torch.bool, device=device)
        pos = offsets[c * W] + p
    s2a = r.sorted_to_assign.long()
    a = torch.where(live, s2a[torch.where(live, pos, 0)], 0) if s2a.numel() else p * 0
    if plan.capacity is None:
        q = a % W
    return a // W, q, live


def exchange_dispatch(x, topk_ids, topk_weights, plan: ExchangePlan, c: int, buf, side) -> None:
    """:func:`vmoe.ops.exchange.dispatch` of chunk c into ``buf`` and ``side``, in torch ops."""
    t, q, live = exchange_row_pairs(plan, c)
    if x.shape[0] == 0:  # an empty row is all there is (capacity mode)
        buf.zero_()
        t, live = t * 0, live & False
    else:
        buf.copy_(torch.where(live[:, None], x[t], 0))
    if side is None:
        return
    K, E = plan.slots, plan.owner.shape[0]
    n = buf.shape[0]
    slot_ids = plan.null_id.long()[q][:, None].repeat(1, K).to(side.dtype)        # [rows, K]
    slot_w = torch.zeros(n, K, dtype=side.dtype, device=side.device)
    if x.shape[0]:
        ids = topk_ids.long()[t]                                                   # [rows, k]
        on = live[:, None] & (ids >= 0) & (ids < E)
        ids = ids.clamp(0, E - 1)
        on = on & (plan.owner.long()[ids] == q[:, None])
        local, weights = plan.local_index.long()[ids], topk_weights[t]
        cnt = torch.zeros(n, dtype=torch.long, device=side.device)
        for j in range(plan.k):      # slots packed first, in slot order, as the kernel does
            put = on[:, j] & (cnt < K)
            col = cnt.clamp(max=K - 1)[:, None]
            slot_ids.scatter_(1, col, torch.where(put[:, None], local[:, j:j + 1].to(side.dtype),
                                                  slot_ids.gather(1, col)))
            slot_w.scatter_(1, col, torch.where(put[:, None], weights[:, j:j + 1].to(side.dtype),
                                                slot_w.gather(1, col)))
            cnt += put.long()
    side.copy_(torch.cat([slot_ids, slot_w], 1))


def exchange_combine(y, plan: ExchangePlan, c: int, base, out) -> None:
    """:func:`vmoe.ops.exchange.combine` of chunk c into ``out``, in torch ops."""
    t0, t1 = plan.tokens(c)
    row, has = exchange_pair_rows(plan, c)
    acc_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    acc = (base[t0:t1].to(acc_dtype) if base is not None
           else torch.zeros(t1 - t0, y.shape[1], dtype=acc_dtype, device=y.device))
    for q in range(plan.world):                                  # fixed rank order
        if y.shape[0]:
            acc = acc + torch.where(has[:, q:q + 1], y[row[:, q]].to(acc_dtype), 0)
    out[t0:t1] = acc.to(out.dtype)


def exchange_weight_grad(dside, topk_ids, plan: ExchangePlan, c: int, dw) -> None:
    """:func:`vmoe.ops.exchange.weight_grad` of chunk c into ``dw``, in torch ops."""
    t0, t1 = plan.tokens(c)
    K, E, W = plan.slots, plan.owner.shape[0], plan.world
    row, has = exchange_pair_rows(plan, c)
    ids = topk_ids.long()[t0:t1]
    own = torch.where((ids >= 0) & (ids < E), plan.owner.long()[ids.clamp(0, E - 1)], -1)
    cnt = torch.zeros(t1 - t0, W, dtype=torch.long, device=dw.device)
    n = torch.arange(t1 - t0, device=dw.device)
    for j in range(plan.k):
        q = own[:, j].clamp_min(0)
        slot = cnt[n, q]
        cnt[n, q] += (own[:, j] >= 0).long()
        ok = (own[:, j] >= 0) & (slot < K) & has[n, q]
        grad = (dside[row[n, q], K + slot.clamp(max=K - 1)] if dside.shape[0]
                else torch.zeros(t1 - t0, dtype=dside.dtype, device=dside.device))
        dw[t0:t1, j] = torch.where(ok, grad, 0).to(dw.dtype)
