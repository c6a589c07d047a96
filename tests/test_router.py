"""vmoe.ops.router against reference.route and reference.route_aux_losses (float64), MoEMLP.aux_losses,
and vmoe.ops.routing: ids, weights, statistics, losses, the block histogram, the Routing it starts,
and every gradient of the logits. See the table in vmoe/ops/router.py."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import triton

from vmoe import MoEConfig, MoEMLP, reference
from vmoe.autograd import route
from vmoe.ops.router import route_block_tokens, route_bwd, route_fwd, route_stats
from vmoe.ops.routing import (
    _block_histogram_kernel,
    build_routing,
    finish_routing,
    scatter_routing,
)
from vmoe.testing import DEVICE, assert_close

F32 = torch.float32
LOSSES = ("router_z_loss", "load_balance_loss", "compute_loss")

# (T, k, expert_sizes): several interpreter blocks of 4 tokens; E = 1; E = 7 and 12 (not powers of
# two); k = 3 (blocks of 12 assignments, not a power of two); k = E; two groups of equal width.
CASES = [
    (1, 1, [(1, 4)]),
    (13, 2, [(2, 8), (3, 4), (2, 2)]),
    (9, 3, [(4, 8), (8, 4)]),
    (6, 4, [(2, 4), (2, 4)]),
    (17, 2, [(4, 16), (8, 8), (4, 4)]),
]
ROUTER_NORM = [("sigmoid", False), ("sigmoid", True), ("softmax", False), ("softmax", True)]


def _id(case):
    T, k, sizes = case
    return f"T{T}-k{k}-E{sum(c for c, _ in sizes)}-g[" + ",".join(f"{c}x{w}" for c, w in sizes) + "]"


def _rn_id(rn):
    return f"{rn[0]}-{'norm' if rn[1] else 'nonorm'}"


def _widths(sizes):
    return tuple(w for c, w in sizes for _ in range(c))


def _groups(sizes):
    return tuple(c for c, _ in sizes)


def _layer(sizes, k, router, norm):
    cfg = MoEConfig(n_embd=4, expert_sizes=sizes, num_active_experts=k, router=router,
                    norm_topk_prob=norm, impl="reference")
    return MoEMLP(cfg).to(DEVICE)


def _sorted_ids(probs, k):
    return torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]


def _block_histogram(ids, E, block):
    """The per-block expert histogram of ids ([T, k]) by torch, in routing.py's layout."""
    flat = ids.reshape(-1).long().cpu()
    NB = max(triton.cdiv(flat.numel(), block), 1)
    out = torch.zeros(NB, E + 1, dtype=torch.int32)
    for b in range(NB):
        out[b] = torch.bincount(flat[b * block:(b + 1) * block], minlength=E + 1).int()
    return out


def check_forward(logits, k, router, norm, sizes, fp32_ties=False):
    """Every output of route() against the references. The ids must equal the stable descending
    sort of the fp32 P, and of the float64 P unless ``fp32_ties`` (P values equal in fp32 only,
    e.g. a saturated sigmoid); the float64 weights are taken at the fp32 ids."""
    T, E = logits.shape
    out = route(logits, k, router, norm, sizes)
    ids64, _, p64, lse64 = reference.route(logits.double(), k, router, norm)
    ids32 = _sorted_ids(reference.router_probs(logits, router), k)
    assert out.topk_ids.dtype == torch.int32 and out.topk_weights.dtype == F32
    assert torch.equal(out.topk_ids.long(), ids32), "ids != stable descending sort of P (fp32)"
    if not fp32_ties:
        assert torch.equal(ids32, ids64), "ids != stable descending sort of P (float64)"
    w64 = p64.gather(1, ids32)
    if norm:
        w64 = w64 / w64.sum(-1, keepdim=True)
    assert_close("topk_weights", out.topk_weights, w64, F32)
    assert_close("p_sum", out.p_sum, p64.sum(0), F32)
    assert_close("lse_sq_sum", out.lse_sq_sum, lse64.pow(2).sum(), F32)
    counts = torch.bincount(ids32.reshape(-1), minlength=E)
    assert torch.equal(out.routing.counts.long(), counts)
    assert_close("f_i", out.f_i, counts.double() / max(T * k, 1), F32)
    aux64 = reference.route_aux_losses(lse64, p64, counts, sizes)
    probs32 = reference.router_probs(logits, router)
    aux_layer = _layer(sizes, k, router, norm).aux_losses(logits, probs32, counts.float())
    for name in LOSSES:
        assert_close(f"{name} vs reference (float64)", out.aux[name], aux64[name], F32)
        assert_close(f"{name} vs MoEMLP.aux_losses", out.aux[name], aux_layer[name], F32)
    return out


@pytest.mark.parametrize("rn", ROUTER_NORM, ids=_rn_id)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_matches_reference(case, rn):
    T, k, sizes = case
    E = len(_widths(sizes))
    logits = torch.randn(T, E, device=DEVICE) * 2
    out = check_forward(logits, k, *rn, sizes)
    # Random logits have no ties, so torch.topk agrees too.
    probs = reference.router_probs(logits, rn[0])
    assert torch.equal(out.topk_ids.long(), probs.topk(k, dim=-1).indices)


def test_reference_aux_losses_match_layer():
    """reference.route_aux_losses (used for the float64 gradients) is MoEMLP.aux_losses."""
    sizes, k = [(2, 8), (3, 4), (2, 2)], 2
    logits = torch.randn(11, 7, device=DEVICE)
    for router in ("sigmoid", "softmax"):
        ids, _, probs, lse = reference.route(logits, k, router, True)
        counts = torch.bincount(ids.reshape(-1), minlength=7).float()
        ref = reference.route_aux_losses(lse, probs, counts, sizes)
        layer = _layer(sizes, k, router, True).aux_losses(logits, probs, counts)
        for name in LOSSES:
            assert torch.allclose(ref[name], layer[name], rtol=1e-6, atol=0), name


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
@pytest.mark.parametrize("kind", ["equal-rows", "pairs", "saturated"])
def test_ties_go_to_the_lower_id(kind, router):
    """Equal probabilities select the lower expert id: the stable descending sort of P."""
    T, E, k, sizes = 9, 7, 3, [(3, 8), (4, 4)]
    logits = torch.randn(T, E, device=DEVICE)
    if kind == "equal-rows":
        logits[:4] = 0.5                                    # every expert ties
    elif kind == "pairs":
        logits[:, 4] = logits[:, 1]                         # ties between 1 and 4, 2 and 6
        logits[:, 6] = logits[:, 2]
        logits[::2, 5] = logits[::2, 1]
    else:
        # P rounds to 1.0 in fp32 for every logit above ~17 under sigmoid; 40 and 60 also tie at
        # exp(.) overflow-free softmax only when equal, so give softmax exact duplicates.
        logits[:, [6, 2, 4]] = torch.tensor([60.0, 20.0, 40.0], device=DEVICE)
        if router == "softmax":
            logits[:, [6, 2, 4]] = 40.0
    out = check_forward(logits, k, router, True, sizes, fp32_ties=kind == "saturated")
    if kind == "equal-rows":
        assert out.topk_ids[:4].tolist() == [[0, 1, 2]] * 4
    if kind == "saturated":
        assert out.topk_ids.tolist() == [[2, 4, 6]] * T


@pytest.mark.parametrize("k", [2, 3], ids=["k2", "k3"])
def test_block_histogram_is_routing_layout(k):
    """block_counts equal routing.py's histogram of the same ids for blocks of BT*k assignments
    (the kernel itself where BT*k is a power of two), and a Routing built from them equals
    build_routing(ids)."""
    T, sizes = 19, [(3, 8), (4, 4), (2, 2)]
    widths = _widths(sizes)
    E = len(widths)
    logits = torch.randn(T, E, device=DEVICE)
    ids, _, block_counts, _, _ = route_fwd(logits, k, "softmax", True)
    block = route_block_tokens(E, k) * k
    expected = _block_histogram(ids, E, block)
    assert torch.equal(block_counts.cpu(), expected)
    if block & (block - 1) == 0:
        via_kernel = torch.empty_like(block_counts)
        _block_histogram_kernel[(block_counts.shape[0],)](
            ids.reshape(-1), via_kernel, T * k, E, BLOCK=block, E1_PAD=triton.next_power_of_2(E + 1))
        assert torch.equal(block_counts, via_kernel)

    want = build_routing(ids, widths)
    for got in (finish_routing(ids, block_counts.clone(), block, widths),
                route(logits, k, "softmax", True, sizes).routing):
        for name in ("counts", "offsets", "sorted_to_assign", "assign_to_sorted", "ragged_offsets"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert got.k == k and got.num_tokens == T and got.expert_widths == widths


def test_stats_scan_matches_routing_scan():
    """route_stats's prefix and counts equal finish_routing's in-place scan of the same counts."""
    T, k, sizes = 30, 2, [(4, 8), (3, 4)]
    widths = _widths(sizes)
    logits = torch.randn(T, len(widths), device=DEVICE)
    ids, _, block_counts, p_partial, lse_partial = route_fwd(logits, k, "sigmoid", False)
    raw = block_counts.clone()
    prefix, counts, *_ = route_stats(block_counts, p_partial, lse_partial, T, k, widths,
                                     _groups(sizes))
    assert torch.equal(block_counts, raw), "route_stats must leave block_counts as it found them"
    assert torch.equal(prefix, raw.cumsum(0) - raw)
    assert counts.tolist() == raw.sum(0)[:-1].tolist()  # column E, the dropped ids: no total
    r = scatter_routing(ids, prefix, counts, route_block_tokens(len(widths), k) * k, widths)
    assert torch.equal(r.sorted_to_assign, build_routing(ids, widths).sorted_to_assign)


def _ref_losses_and_weights(logits64, ids, k, router, norm, sizes):
    """Float64 weights (at the kernel's ids), statistics and losses, differentiable."""
    probs = reference.router_probs(logits64, router)
    lse = torch.logsumexp(logits64, dim=-1)
    w = probs.gather(1, ids.long())
    if norm:
        w = w / w.sum(-1, keepdim=True)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=logits64.shape[1])
    aux = reference.route_aux_losses(lse, probs, counts, sizes)
    return w, probs.sum(0), lse.pow(2).sum(), aux


@pytest.mark.parametrize("rn", ROUTER_NORM, ids=_rn_id)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_backward_matches_autograd(case, rn):
    """d_logits of random weights of topk_weights and of the three losses, through route()."""
    T, k, sizes = case
    router, norm = rn
    E = len(_widths(sizes))
    logits = (torch.randn(T, E, device=DEVICE) * 2).requires_grad_()
    out = route(logits, k, router, norm, sizes)
    g_w = torch.randn(T, k, device=DEVICE)
    c = torch.randn(3, device=DEVICE)
    loss = (out.topk_weights * g_w).sum() + sum(c[i] * out.aux[n] for i, n in enumerate(LOSSES))
    (d_logits,) = torch.autograd.grad(loss, logits)

    logits64 = logits.detach().double().requires_grad_()
    w, _, _, aux = _ref_losses_and_weights(logits64, out.topk_ids, k, router, norm, sizes)
    loss64 = (w * g_w.double()).sum() + sum(c[i].double() * aux[n] for i, n in enumerate(LOSSES))
    (ref,) = torch.autograd.grad(loss64, logits64)
    assert_close("d_logits", d_logits, ref, F32)


@pytest.mark.parametrize("rn", ROUTER_NORM, ids=_rn_id)
def test_backward_from_statistics(rn):
    """route_bwd from the gradients of topk_weights, p_sum and lse_sq_sum (no losses), and from
    each alone, against float64 autograd."""
    router, norm = rn
    T, k, sizes = 11, 3, [(4, 8), (3, 4)]
    widths = _widths(sizes)
    E = len(widths)
    logits = torch.randn(T, E, device=DEVICE) * 2
    ids, *_ = route_fwd(logits, k, router, norm)
    g_w, g_p = torch.randn(T, k, device=DEVICE), torch.randn(E, device=DEVICE)
    g_l = torch.randn((), device=DEVICE)
    logits64 = logits.double().requires_grad_()
    w, p_sum, lse_sq_sum, _ = _ref_losses_and_weights(logits64, ids, k, router, norm, sizes)
    for name, args, loss in [
        ("all", (g_w, g_p, g_l), (w * g_w.double()).sum() + (p_sum * g_p.double()).sum()
         + lse_sq_sum * g_l.double()),
        ("weights", (g_w, None, None), (w * g_w.double()).sum()),
        ("p_sum", (None, g_p, None), (p_sum * g_p.double()).sum()),
        ("lse_sq_sum", (None, None, g_l), lse_sq_sum * g_l.double()),
    ]:
        (ref,) = torch.autograd.grad(loss, logits64, retain_graph=True)
        got = route_bwd(logits, ids, *args, d_z_loss=None, d_lb_loss=None, d_compute_loss=None,
                        counts=None, p_sum=None, router=router, norm_topk_prob=norm,
                        expert_widths=widths, group_sizes=_groups(sizes))
        assert_close(f"d_logits from {name}", got, ref, F32)


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_backward_of_each_loss_alone(router):
    """Each loss is its own tensor, so its gradient reaches the kernel alone (no zero-filled
    [3] gradient); each alone must match."""
    T, k, sizes = 10, 2, [(2, 8), (3, 4), (2, 2)]
    logits = (torch.randn(T, 7, device=DEVICE) * 2).requires_grad_()
    out = route(logits, k, router, False, sizes)
    logits64 = logits.detach().double().requires_grad_()
    _, _, _, aux = _ref_losses_and_weights(logits64, out.topk_ids, k, router, False, sizes)
    for name in LOSSES:
        (got,) = torch.autograd.grad(out.aux[name] * 3.0, logits, retain_graph=True)
        (ref,) = torch.autograd.grad(aux[name] * 3.0, logits64, retain_graph=True)
        assert_close(f"d_logits of {name}", got, ref, F32)


def test_backward_of_expanded_gradients():
    """Sums hand the backward stride-0 gradients; they must read as the full tensors they stand for."""
    sizes, k = [(3, 8), (4, 4)], 2
    logits = torch.randn(10, 7, device=DEVICE).requires_grad_()
    out = route(logits, k, "softmax", True, sizes)
    loss = out.topk_weights.sum() * 0.5 + out.p_sum.sum() * 2.0 + out.lse_sq_sum * 0.1
    (d_logits,) = torch.autograd.grad(loss, logits)
    logits64 = logits.detach().double().requires_grad_()
    w, p_sum, lse_sq_sum, _ = _ref_losses_and_weights(logits64, out.topk_ids, k, "softmax", True,
                                                      sizes)
    ref_loss = w.sum() * 0.5 + p_sum.sum() * 2.0 + lse_sq_sum * 0.1
    (ref,) = torch.autograd.grad(ref_loss, logits64)
    assert_close("d_logits", d_logits, ref, F32)


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_zero_tokens(router):
    sizes = [(2, 8), (3, 4)]
    logits = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    out = route(logits, 2, router, True, sizes)
    assert out.topk_ids.shape == (0, 2) and out.topk_weights.shape == (0, 2)
    assert out.routing.counts.tolist() == [0] * 5 and out.routing.sorted_to_assign.numel() == 0
    assert out.p_sum.tolist() == [0.0] * 5 and out.f_i.tolist() == [0.0] * 5
    assert float(out.lse_sq_sum.detach()) == 0.0
    for name in LOSSES:
        assert float(out.aux[name].detach()) == 0.0, name
    loss = sum(out.aux.values()) + out.topk_weights.sum()
    (d,) = torch.autograd.grad(loss, logits)
    assert d.shape == (0, 5)


def test_single_expert():
    """E = 1, k = 1: every token goes to expert 0 with weight 1 (normalised) or P."""
    logits = torch.randn(6, 1, device=DEVICE).requires_grad_()
    for router in ("sigmoid", "softmax"):
        out = check_forward(logits.detach(), 1, router, True, [(1, 4)])
        assert out.topk_ids.tolist() == [[0]] * 6 and out.topk_weights.tolist() == [[1.0]] * 6


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
@pytest.mark.parametrize("norm", [False, True], ids=["nonorm", "norm"])
def test_nan_logit_propagates_to_its_row(router, norm):
    """A NaN logit ranks first, as in torch.sort: under sigmoid the row's first id is the NaN
    expert (its weight NaN; every weight NaN when normalised); under softmax the whole row of P
    is NaN, so the ids are 0..k-1 and every weight is NaN. Other rows are untouched."""
    T, E, k = 9, 7, 3
    logits = torch.randn(T, E, device=DEVICE)
    logits[5, 4] = float("nan")
    ids, w, *_ = route_fwd(logits, k, router, norm)
    ref_ids, ref_w, _, _ = reference.route(logits.double(), k, router, norm)
    assert torch.equal(ids.long(), ref_ids), "ids != torch.sort of P with NaN first"
    rows = [t for t in range(T) if t != 5]
    assert_close("weights of the other rows", w[rows], ref_w[rows], F32)
    if router == "sigmoid":
        assert int(ids[5, 0]) == 4
        nan_slots = [0, 1, 2] if norm else [0]
    else:
        assert ids[5].tolist() == [0, 1, 2]
        nan_slots = [0, 1, 2]
    assert torch.isnan(w[5]).tolist() == [j in nan_slots for j in range(k)]


def test_bf16_logits_and_strided_rows():
    """Logits in bf16, and a row-strided view, compute in fp32; d_logits comes back in bf16."""
    sizes, k = [(3, 8), (4, 4)], 2
    base = torch.randn(10, 9, device=DEVICE)
    view = base[:, 1:8]                                        # row stride 9
    out = check_forward(view, k, "softmax", True, sizes)
    assert out.topk_ids.shape == (10, 2)
    logits = view.to(torch.bfloat16).requires_grad_()
    out = route(logits, k, "sigmoid", False, sizes)
    out.aux["router_z_loss"].backward()
    assert logits.grad.dtype == torch.bfloat16
    ref = logits.detach().double().requires_grad_()
    torch.logsumexp(ref, -1).pow(2).mean().backward()
    assert_close("d_logits (bf16)", logits.grad, ref.grad, torch.bfloat16)


def test_argument_errors():
    logits = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="k must be"):
        route_fwd(logits, 4, "softmax", True)
    with pytest.raises(ValueError, match="router"):
        route_fwd(logits, 1, "relu", True)
    with pytest.raises(ValueError, match="expert_widths"):
        route(logits, 1, "softmax", True, [(2, 4)])
    _, _, block_counts, p_partial, lse_partial = route_fwd(logits, 1, "softmax", True)
    with pytest.raises(ValueError, match="group_sizes"):
        route_stats(block_counts, p_partial, lse_partial, 4, 1, (4, 4, 4), (2,))


def test_no_host_sync_in_router():
    """router.py's launch paths read nothing back from the device."""
    src = Path(__file__).resolve().parent.parent.joinpath("vmoe", "ops", "router.py").read_text()
    pattern = re.compile(r"\.(item|tolist|cpu|numpy)\(|synchronize\(|\.nonzero\(")
    bad = [line for line in src.splitlines() if pattern.search(line) and "host-ok" not in line]
    assert not bad, f"host synchronization in router.py: {bad}"
