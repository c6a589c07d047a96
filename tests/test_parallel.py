"""vmoe.parallel: expert placement and the exchange's kernels (no processes), and the
expert-parallel layer on 2 and 3 CPU processes (gloo, Triton interpreter) against the full MoEMLP
run on every rank with all tokens: both exchange modes, chunked pipelining, a shared expert, null
experts, capacity overflow, and the FSDP2 recipe.

Each spawned process runs every case of its world size in one process group (a process costs a
few seconds of imports). Every collective has a 60 s timeout, and a failing rank makes
torch.multiprocessing.spawn end the others, so a bug fails the test instead of hanging CI.
"""
from __future__ import annotations

import copy
import os
import random
import sys
from datetime import timedelta

import pytest
import torch

# Spawned processes import this module before anything else: choose the interpreter first, as
# tests/conftest.py does in the parent (Triton reads it when vmoe's kernels are decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VMOE_POISON", "1")

import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from vmoe import MoEConfig, MoEMLP, reference  # noqa: E402
from vmoe.ops import exchange as ex  # noqa: E402
from vmoe.parallel import ExpertParallelMoEMLP, place_experts  # noqa: E402
from vmoe.testing import assert_close, random_ids, spawn_ranks  # noqa: E402

WIDTHS = [7, 33, 1, 20, 16]


# ---------------------------------------------------------------------------------------------
# place_experts


def _check_placement(placement, widths, world, costs=None):
    costs = widths if costs is None else costs
    assert len(placement) == world
    flat = [e for r in placement for e in r]
    assert sorted(flat) == list(range(len(widths))), f"every expert exactly once: {placement}"
    assert all(r == sorted(r) for r in placement), f"ids ascending: {placement}"
    assert all(any(widths[e] > 0 for e in r) for r in placement), f"a rank without work: {placement}"
    totals = [sum(costs[e] for e in r) for r in placement]
    assert max(totals) <= sum(costs) / world + max(costs), f"totals {totals} for {placement}"
    return totals


PLACEMENT_CASES = [
    (WIDTHS, 1), (WIDTHS, 2), (WIDTHS, 3), (WIDTHS, 5),
    ([512] * 4 + [256] * 8 + [128] * 4, 2), ([512] * 4 + [256] * 8 + [128] * 4, 4),
    ([64] * 8, 8), ([3, 0, 5, 0, 2], 3), ([1000, 1, 1, 1], 2),
]


@pytest.mark.parametrize("widths,world", PLACEMENT_CASES,
                         ids=[f"w{w}-W{n}".replace(" ", "") for w, n in PLACEMENT_CASES])
def test_place_experts_covers_and_balances(widths, world):
    _check_placement(place_experts(widths, world), widths, world)


@pytest.mark.parametrize("widths,world,ratio", [
    ([512] * 4 + [256] * 8 + [128] * 4, 2, 1.0), ([512] * 4 + [256] * 8 + [128] * 4, 4, 1.0),
    (WIDTHS, 2, 1.25), ([64] * 8, 4, 1.0), ([96, 80, 64, 48, 40, 32, 24, 16], 3, 1.25),
])
def test_place_experts_ratio_when_widths_allow(widths, world, ratio):
    totals = _check_placement(place_experts(widths, world), widths, world)
    assert max(totals) / min(totals) <= ratio, totals


def test_place_experts_random_widths_bound():
    rng = random.Random(0)
    for _ in range(200):
        E = rng.randint(1, 24)
        widths = [rng.randint(1, 300) for _ in range(E)]
        world = rng.randint(1, E)
        _check_placement(place_experts(widths, world), widths, world)


def test_place_experts_lpt_order():
    # 33 -> r0, 20 -> r1, 16 -> r1 (36), 7 -> r0 (40), 1 -> r1 (37); ties go to the lower rank.
    assert place_experts(WIDTHS, 2) == [[0, 1], [2, 3, 4]]
    assert place_experts([4, 4, 4, 4], 2) == [[0, 2], [1, 3]]
    assert place_experts(torch.tensor(WIDTHS), 2) == [[0, 1], [2, 3, 4]]


def test_place_experts_token_counts():
    widths, counts = [10, 10, 10, 10], [100, 1, 1, 1]
    placement = place_experts(widths, 2, token_counts=counts)
    assert placement == [[0], [1, 2, 3]]
    _check_placement(placement, widths, 2, [n * f for n, f in zip(counts, widths)])
    # Experts without tokens still land on a rank, and every rank gets one.
    placement = place_experts(widths, 3, token_counts=[5, 0, 0, 0])
    _check_placement(placement, widths, 3, [50, 0, 0, 0])
    assert [0] in placement


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(expert_widths=WIDTHS, world_size=6), ValueError, "world_size=6"),
    (dict(expert_widths=[4, 0, 0], world_size=2), ValueError, "world_size=2.*nonzero width"),
    (dict(expert_widths=WIDTHS, world_size=0), ValueError, "world_size must be >= 1"),
    (dict(expert_widths=WIDTHS, world_size=2.0), TypeError, "world_size must be an int"),
    (dict(expert_widths=[3, -1, 2], world_size=2), ValueError, "expert_widths must all be >= 0"),
    (dict(expert_widths=[], world_size=1), ValueError, "at least one expert"),
    (dict(expert_widths=[3, 1.5], world_size=1), TypeError, "expert_widths must hold ints"),
    (dict(expert_widths=WIDTHS, world_size=2, token_counts=[1, 2]), ValueError,
     "one entry per expert \\(5\\), got 2"),
    (dict(expert_widths=WIDTHS, world_size=2, token_counts=[1, 2, 3, -4, 5]), ValueError,
     "token_counts must all be >= 0"),
], ids=["W>E", "W>nonzero", "W0", "W-float", "negative-width", "empty", "float-width",
        "counts-length", "negative-count"])
def test_place_experts_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        place_experts(**kwargs)


def test_shard_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    moe = MoEMLP(MoEConfig(n_embd=8, expert_sizes=((2, 4),), num_active_experts=1))
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoEMLP.from_moe(moe)


# ---------------------------------------------------------------------------------------------
# The exchange's kernels against their torch twins (one process: the plan needs no group)


def _plan(T, k, widths, placement, chunks, capacity, use_triton, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E, W = len(widths), len(placement)
    ids = random_ids(T, E, k, generator=gen).to(torch.int32)
    owner, local, null = (torch.tensor(t, dtype=torch.int32)
                          for t in ex.placement_tables(placement, widths))
    plan = ex.plan_exchange(ids, owner, local, null, world=W, chunks=chunks,
                            slots=ex.row_slots(k, placement, widths), capacity=capacity,
                            use_triton=use_triton)
    if capacity is None:  # what the layer's all_gather would give a rank that sends these rows
        counts = plan.routing.counts[:plan.bins].tolist()
        plan.send_splits = [counts[c * W:(c + 1) * W] for c in range(chunks)]
    return plan, ids


# (T, k, widths, placement, chunks, capacity): three ranks, one null expert, a token count that
# the chunks do not divide, bins that overflow a capacity of 2, and no tokens at all.
EXCHANGE_CASES = [
    (7, 2, [7, 33, 0, 20, 16], [[1], [2, 3], [0, 4]], 1, None),
    (11, 3, [7, 33, 0, 20, 16], [[1], [2, 3], [0, 4]], 3, None),
    (11, 3, [7, 33, 0, 20, 16], [[1], [2, 3], [0, 4]], 2, 2),
    (9, 2, [5, 5, 5, 5], [[0, 1, 2, 3]], 2, 5),
    (0, 2, [5, 5, 5, 5], [[0, 2], [1, 3]], 2, 3),
]


@pytest.mark.parametrize("T,k,widths,placement,chunks,capacity", EXCHANGE_CASES,
                         ids=[f"T{c[0]}-k{c[1]}-W{len(c[3])}-n{c[4]}-C{c[5]}" for c in EXCHANGE_CASES])
def test_exchange_kernels_match_torch(T, k, widths, placement, chunks, capacity):
    """Plan, dispatch (rows and side), combine (with a base) and the weight gradient: the Triton
    kernels equal their torch twins exactly, and the rows carry what the module docstring says."""
    gen = torch.Generator().manual_seed(1)
    d, W, K = 6, len(placement), ex.row_slots(k, placement, widths)
    x = torch.randn(T, d, generator=gen)
    got, want = (_plan(T, k, widths, placement, chunks, capacity, use) for use in (True, False))
    (plan, ids), (plan_t, _) = got, want
    for name in ("counts", "offsets", "sorted_to_assign", "assign_to_sorted"):
        a, b = getattr(plan.routing, name), getattr(plan_t.routing, name)
        assert torch.equal(a.long()[:b.numel()], b.long()), name
    plan_t.send_splits = plan.send_splits
    weights = torch.rand(T, k, generator=gen)
    sends = ex.dispatch(x, ids, weights, plan)
    sends_t = ex.dispatch(x, ids, weights, plan_t, use_triton=False)
    for c, ((rows, side), (rows_t, side_t)) in enumerate(zip(sends, sends_t)):
        assert torch.equal(rows, rows_t) and torch.equal(side, side_t), f"chunk {c}"
        token, q, live = reference.exchange_row_pairs(plan, c)
        for p in range(rows.shape[0]):
            if not live[p]:
                assert not rows[p].any() and (side[p, :K] == plan.null_id[q[p]]).all()
                continue
            t, r = int(token[p]), int(q[p])
            assert torch.equal(rows[p], x[t])
            mine = [(placement[r].index(int(e)), float(w)) for e, w in zip(ids[t], weights[t])
                    if int(e) in placement[r] and widths[int(e)]]
            assert mine, f"row {p} of chunk {c} carries token {t}, which has no slot on rank {r}"
            assert side[p, :len(mine)].tolist() == [float(i) for i, _ in mine]
            assert torch.allclose(side[p, K:K + len(mine)], torch.tensor([w for _, w in mine]))
            assert (side[p, len(mine):K] == plan.null_id[r]).all()
    ys = [torch.randn(rows.shape[0], d, generator=gen) for rows, _ in sends]
    base = torch.randn(T, d, generator=gen)
    out = ex.combine(ys, plan, base)
    assert torch.equal(out, ex.combine(ys, plan_t, base, use_triton=False))
    # Each token: base plus its rows, in rank order; the rows that were dropped add nothing.
    for c in range(chunks):
        t0, t1 = plan.tokens(c)
        row, has = reference.exchange_pair_rows(plan, c)
        expect = base[t0:t1] + sum(torch.where(has[:, q:q + 1], ys[c][row[:, q]], 0)
                                   for q in range(W)) if ys[c].shape[0] else base[t0:t1]
        assert torch.allclose(out[t0:t1], expect, atol=1e-6)
    dsides = [torch.randn(side.shape, generator=gen) for _, side in sends]
    dw = ex.weight_grad(dsides, ids, plan, torch.float32)
    assert torch.equal(dw, ex.weight_grad(dsides, ids, plan_t, torch.float32, use_triton=False))
    if capacity is not None:  # a slot whose row was dropped gets no gradient
        assert plan.rows(0) == W * capacity


# ---------------------------------------------------------------------------------------------
# The layer on several processes


def _config(activation, router="sigmoid", widths=WIDTHS, k=2, impl="auto", shared=0, gate=False,
            null_bound=None):
    return MoEConfig(n_embd=16, expert_sizes=tuple((1, w) for w in widths), num_active_experts=k,
                     activation=activation, router=router, impl=impl, shared_expert_width=shared,
                     shared_expert_gate=gate, max_null_share=null_bound)


def _assert_grads(name, shard, moe, dtype):
    """The shard's gradients against the full layer's: w1/w2 restricted to the local experts,
    the replicated ones (router, shared expert) summed over ranks."""
    grads = {key: p.grad for key, p in moe.named_parameters()}
    expected = ExpertParallelMoEMLP(moe.config, shard.local_experts, shard.group,
                                    placement=shard.placement)
    expected.load_full_state_dict(grads)
    assert_close(f"{name} dw1 (local experts)", shard.w1.grad, expected.w1, dtype)
    assert_close(f"{name} dw2 (local experts)", shard.w2.grad, expected.w2, dtype)
    for key, p in shard.named_parameters():
        if key in ("w1", "w2"):
            continue
        summed = p.grad.clone()
        dist.all_reduce(summed, group=shard.group)
        assert_close(f"{name} d{key} summed over ranks", summed,
                     dict(expected.named_parameters())[key], dtype)


def _check_layer(rank, world, activation, router, widths, tokens, batch_dim, impl="auto",
                 shared=0, gate=False, state_dict=False, null_bound=None, **options):
    """The shard against the full layer on the concatenation of every rank's tokens."""
    torch.manual_seed(1234)  # the same layer and tokens on every rank
    moe = MoEMLP(_config(activation, router, widths, impl=impl, shared=shared, gate=gate,
                         null_bound=null_bound))
    d = moe.config.n_embd
    xs = [torch.randn(n, d) for n in tokens]
    dys = [torch.randn(n, d) for n in tokens]
    x_all = torch.cat(xs).requires_grad_()
    out_all, _, _ = moe(x_all)
    out_all.backward(torch.cat(dys))
    lo, hi = sum(tokens[:rank]), sum(tokens[:rank + 1])
    with torch.no_grad():
        _, aux_ref, f_ref = moe(xs[rank])
        ids = moe.route(xs[rank])[3]

    shard = ExpertParallelMoEMLP.from_moe(moe, **options)
    assert shard.local_experts == place_experts(widths, world)[rank]
    x = xs[rank].clone()
    if batch_dim:
        x = x[None]
    x.requires_grad_()
    out, aux, f_i = shard(x)
    assert out.shape == x.shape
    out.backward(dys[rank].reshape(out.shape))

    name = f"rank{rank}/{world}-{activation}-{router}-{impl}-T{tokens}-S{shared}-{options}"
    # One row per (token, rank holding one of its experts of nonzero width); in the capacity
    # mode every split is C.
    send, recv = shard.last_splits
    if options.get("exchange") == "capacity":
        C = shard.capacity(tokens[rank])
        assert send == recv == [[C] * world] * shard.chunks, (name, send, recv)
        assert int(shard.dropped_rows) == 0, name
    else:
        owner = torch.tensor(ex.placement_tables(shard.placement, widths)[0])
        pairs = sum(len({int(o) for o in owner[row.long()] if o >= 0}) for row in ids)
        assert sum(map(sum, send)) == pairs, (name, send, ids)

    dt = torch.float32
    assert_close(f"{name} out", out.reshape(-1, d), out_all[lo:hi], dt)
    assert_close(f"{name} dx", x.grad.reshape(-1, d), x_all.grad[lo:hi], dt)
    _assert_grads(name, shard, moe, dt)
    for key, value in aux_ref.items():
        assert_close(f"{name} {key}", aux[key].detach(), value, dt)
    assert torch.equal(f_i, f_ref), f"{name} f_i: {f_i} != {f_ref}"

    if state_dict:
        full = shard.full_state_dict(dst=None)
        for key, value in moe.state_dict().items():
            assert torch.equal(full[key], value), f"{name} full_state_dict()[{key!r}]"
        on_rank0 = shard.full_state_dict(dst=0)
        assert (on_rank0 is None) == (rank != 0)


def _check_capacity_overflow(rank, world):
    """Past the capacity, the rows after the first C of a (destination, chunk) pair are dropped:
    the output is the full layer's with their slots removed, and they are counted; with
    check_capacity every rank raises."""
    torch.manual_seed(99)
    tokens, d, k = [6, 5], 16, 2
    moe = MoEMLP(_config("relu2", "softmax", SHUFFLED, k=k))
    xs = [torch.randn(n, d) for n in tokens]
    shard = ExpertParallelMoEMLP.from_moe(moe, exchange="capacity", capacity_factor=0.5,
                                          max_tokens=6, chunks=2)
    C, TC = shard.capacity(tokens[rank]), -(-tokens[rank] // 2)
    assert C == 2
    x = xs[rank].clone().requires_grad_()
    out, _, _ = shard(x)
    x_ref = xs[rank].clone().requires_grad_()
    routed = moe.route(x_ref)
    ids = routed.topk_ids.long()
    owner = torch.tensor(ex.placement_tables(shard.placement, SHUFFLED)[0])
    kept, dropped = ids.clone(), 0
    for c in range(2):
        t0, t1 = c * TC, min((c + 1) * TC, tokens[rank])
        for q in range(world):
            pairs = [t for t in range(t0, t1) if (owner[ids[t]] == q).any()]
            dropped += max(0, len(pairs) - C)
            for t in pairs[C:]:
                kept[t] = torch.where(owner[ids[t]] == q, -1, kept[t])
    ref = reference.expert_mlp(routed.x2, kept, routed.topk_weights, routed.w1, routed.w2,
                               SHUFFLED, "relu2")
    assert_close(f"rank{rank} capacity overflow out", out, ref, torch.float32)
    assert int(shard.dropped_rows) == dropped, (int(shard.dropped_rows), dropped)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    assert_close(f"rank{rank} capacity overflow dx", x.grad, x_ref.grad, torch.float32)
    counts = [None] * world
    dist.all_gather_object(counts, dropped)
    assert sum(counts) > 0, "the case must overflow somewhere"
    shard.check_capacity = True
    with pytest.raises(RuntimeError, match=f"capacity overflow: {sum(counts)} "):
        shard(xs[rank])


def _check_fsdp(rank, world):
    """The FSDP2 recipe of ExpertParallelMoEMLP's docstring: a model around the shard, sharded
    with fully_shard except for the experts, whose gradients are scaled by 1/W; every gradient
    is 1/W of the full model's on every rank's tokens (FSDP averages over the ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(7)
    tokens, d = [4, 3], 16
    moe = MoEMLP(_config("relu2", "softmax", WIDTHS, shared=8, gate=True))
    full = nn.Sequential(nn.Linear(d, d), _First(moe), nn.Linear(d, d))
    xs = [torch.randn(n, d) for n in tokens]
    dys = [torch.randn(n, d) for n in tokens]
    full(torch.cat(xs)).backward(torch.cat(dys))

    mesh = init_device_mesh("cpu", (world,))
    ep = ExpertParallelMoEMLP.from_moe(moe, group=mesh, exchange="capacity", max_tokens=4)
    model = nn.Sequential(copy.deepcopy(full[0]), _First(ep), copy.deepcopy(full[2]))
    experts = set(ep.expert_parameters())
    for p in experts:
        p.register_hook(lambda g: g / world)
    fully_shard(model[1], mesh=mesh, ignored_params=experts)
    fully_shard(model, mesh=mesh, ignored_params=experts)
    model.zero_grad()
    model(xs[rank]).backward(dys[rank])

    def grad(p):
        g = p.grad
        return (g.full_tensor() if isinstance(g, DTensor) else g) * world

    dt = torch.float32
    for i in (0, 2):
        for (key, p), q in zip(model[i].named_parameters(), full[i].parameters()):
            assert_close(f"rank{rank} fsdp [{i}].{key}", grad(p), q.grad, dt)
    expected = ExpertParallelMoEMLP(moe.config, ep.local_experts, ep.group, placement=ep.placement)
    expected.load_full_state_dict({key: p.grad for key, p in moe.named_parameters()})
    for key, p in ep.named_parameters():
        assert_close(f"rank{rank} fsdp ep.{key}", grad(p), dict(expected.named_parameters())[key], dt)


class _First(nn.Module):
    """The layer's output alone, for nn.Sequential."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0]


def _check_bad_inputs(rank, world):
    # Configs that differ across ranks: every rank raises (one all_gather, then all compare).
    activation = "swiglu" if rank == world - 1 else "relu2"
    with pytest.raises(ValueError, match="MoEConfig differs across ranks"):
        ExpertParallelMoEMLP.from_moe(MoEMLP(_config(activation)))
    moe = MoEMLP(_config("relu2"))
    for options, match in [(dict(exchange="nccl"), "exchange must be one of"),
                           (dict(chunks=0), "chunks must be an int >= 1"),
                           (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
                           (dict(max_tokens=-1), "max_tokens must be None or an int"),
                           (dict(mesh_dim="ep"), "mesh_dim='ep' needs a DeviceMesh")]:
        with pytest.raises(ValueError, match=match):
            ExpertParallelMoEMLP.from_moe(moe, **options)
    if world > 2:
        with pytest.raises(ValueError, match=f"world_size={world} is larger"):
            ExpertParallelMoEMLP.from_moe(MoEMLP(_config("relu2", widths=[8, 4], k=1)))


# (activation, router, widths, tokens per rank, x as [1, T, d], keywords) per world size. Tokens
# are uneven, and one rank of the 3 has none; impl="reference" takes MoEMLP's torch routing path
# and the exchange's torch twins. Placements: WIDTHS on 2 ranks [[0, 1], [2, 3, 4]], SHUFFLED on 2
# [[1, 2], [0, 3, 4]], WIDTHS on 3 [[1], [2, 3], [0, 4]]: local experts not contiguous in the full
# layer, so a send order by global id instead of by owner rank fails. The capacity cases are
# dropless: max_tokens, the largest rank's, sizes them, and capacity_factor >= W / min(k, W).
SHUFFLED = [20, 7, 33, 1, 16]
LAYER_CASES = {
    2: [("relu2", "sigmoid", WIDTHS, [5, 2], False, dict(state_dict=True)),
        ("swiglu", "softmax", SHUFFLED, [3, 6], True,
         dict(exchange="capacity", max_tokens=6, chunks=2)),
        ("gelu", "softmax", SHUFFLED, [4, 1], False, dict(impl="reference", chunks=2)),
        ("relu2", "softmax", [7, 0, 33, 0, 16], [4, 3], False,          # null experts, bounded
         dict(exchange="capacity", max_tokens=4, null_bound=0.05)),
        ("swiglu", "sigmoid", WIDTHS, [5, 3], False,                     # gated shared expert
         dict(shared=8, gate=True, state_dict=True)),
        ("relu2", "softmax", WIDTHS, [2, 4], False,
         dict(shared=6, impl="reference", exchange="capacity", max_tokens=4))],
    3: [("swiglu", "sigmoid", WIDTHS, [4, 0, 5], False, dict(state_dict=True)),
        ("relu2", "softmax", WIDTHS, [0, 3, 2], True,
         dict(exchange="capacity", capacity_factor=1.5, max_tokens=3, chunks=2)),
        ("swiglu", "softmax", [0, 12, 0, 5, 9, 0], [3, 5, 0], False,    # null experts, shared
         dict(shared=4, gate=True, chunks=2))],
}


def _worker(rank, world, port):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if sys.platform == "linux":  # gloo's own sockets on loopback, whatever the hostname resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for *case, options in LAYER_CASES[world]:
            _check_layer(rank, world, *case, **options)
        if world == 2:
            _check_capacity_overflow(rank, world)
            _check_fsdp(rank, world)
        _check_bad_inputs(rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3], ids=["W2", "W3"])
def test_expert_parallel_matches_full_layer(world):
    spawn_ranks(_worker, world)
