"""vmoe.parallel: expert placement (no processes), and the expert-parallel layer on 2 and 3 CPU
processes (gloo, Triton interpreter) against the full MoEMLP run on every rank with all tokens.

Each spawned process runs every case of its world size in one process group (a process costs a
few seconds of imports). Every collective has a 60 s timeout, and a failing rank makes
torch.multiprocessing.spawn end the others, so a bug fails the test instead of hanging CI.
"""
from __future__ import annotations

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

from vmoe import MoEConfig, MoEMLP  # noqa: E402
from vmoe.parallel import AllToAll, ExpertParallelMoEMLP, place_experts  # noqa: E402
from vmoe.testing import assert_close, assert_shard_grads, spawn_ranks  # noqa: E402

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
# The layer on several processes


def _config(activation, router="sigmoid", widths=WIDTHS, k=2, impl="auto"):
    return MoEConfig(n_embd=16, expert_sizes=tuple((1, w) for w in widths), num_active_experts=k,
                     activation=activation, router=router, impl=impl)


def _check_layer(rank, world, activation, router, widths, tokens, batch_dim, impl="auto"):
    """The shard against the full layer on the concatenation of every rank's tokens."""
    torch.manual_seed(1234)  # the same layer and tokens on every rank
    moe = MoEMLP(_config(activation, router, widths, impl=impl))
    d = moe.config.n_embd
    xs = [torch.randn(n, d) for n in tokens]
    dys = [torch.randn(n, d) for n in tokens]
    x_all = torch.cat(xs).requires_grad_()
    out_all, _, _ = moe(x_all)
    out_all.backward(torch.cat(dys))
    lo, hi = sum(tokens[:rank]), sum(tokens[:rank + 1])
    with torch.no_grad():
        _, aux_ref, f_ref = moe(xs[rank])

    shard = ExpertParallelMoEMLP.from_moe(moe)
    assert shard.local_experts == place_experts(widths, world)[rank]
    x = xs[rank].clone()
    if batch_dim:
        x = x[None]
    x.requires_grad_()
    sent, exchange = [], AllToAll.apply
    AllToAll.apply = lambda rows, *a: sent.append(rows.shape[0]) or exchange(rows, *a)
    try:
        out, aux, f_i = shard(x)
    finally:
        AllToAll.apply = exchange
    assert out.shape == x.shape
    out.backward(dys[rank].reshape(out.shape))
    # Only assignments to experts of nonzero width travel.
    with torch.no_grad():
        ids = moe.route(xs[rank])[3]
    assert sent[0] == int((torch.tensor(widths)[ids.long()] > 0).sum()), (sent, ids)

    dt = torch.float32
    name = f"rank{rank}/{world}-{activation}-{router}-{impl}-T{tokens}"
    assert_close(f"{name} out", out.reshape(-1, d), out_all[lo:hi], dt)
    assert_close(f"{name} dx", x.grad.reshape(-1, d), x_all.grad[lo:hi], dt)
    assert_shard_grads(name, shard, moe, dt)
    for key, value in aux_ref.items():
        assert_close(f"{name} {key}", aux[key].detach(), value, dt)
    assert torch.equal(f_i, f_ref), f"{name} f_i: {f_i} != {f_ref}"

    full = shard.full_state_dict(dst=None)
    for key, value in moe.state_dict().items():
        assert torch.equal(full[key], value), f"{name} full_state_dict()[{key!r}]"
    on_rank0 = shard.full_state_dict(dst=0)
    assert (on_rank0 is None) == (rank != 0)


def _check_bad_inputs(rank, world):
    shared = MoEMLP(MoEConfig(n_embd=16, expert_sizes=((4, 8),), shared_expert_width=8))
    with pytest.raises(NotImplementedError, match="shared_expert_width=8"):
        ExpertParallelMoEMLP.from_moe(shared)
    # Configs that differ across ranks: every rank raises (one all_gather, then all compare).
    activation = "swiglu" if rank == world - 1 else "relu2"
    with pytest.raises(ValueError, match="MoEConfig differs across ranks"):
        ExpertParallelMoEMLP.from_moe(MoEMLP(_config(activation)))
    if world > 2:
        with pytest.raises(ValueError, match=f"world_size={world} is larger"):
            ExpertParallelMoEMLP.from_moe(MoEMLP(_config("relu2", widths=[8, 4], k=1)))


# (activation, router, widths, tokens per rank, x as [1, T, d][, impl]) per world size. Tokens are
# uneven, and one rank of the 3 has none; impl="reference" takes MoEMLP's torch routing path.
# Placements: WIDTHS on 2 ranks [[0, 1], [2, 3, 4]], SHUFFLED on 2 [[1, 2], [0, 3, 4]], WIDTHS on 3
# [[1], [2, 3], [0, 4]]: local experts not contiguous in the full layer, so a send order by global
# id instead of by owner rank fails.
SHUFFLED = [20, 7, 33, 1, 16]
LAYER_CASES = {
    2: [("relu2", "sigmoid", WIDTHS, [5, 2], False), ("swiglu", "softmax", SHUFFLED, [3, 6], True),
        ("gelu", "softmax", SHUFFLED, [4, 1], False, "reference"),
        ("relu2", "softmax", [7, 0, 33, 0, 16], [4, 3], False)],   # null experts
    3: [("swiglu", "sigmoid", WIDTHS, [4, 0, 5], False),
        ("relu2", "softmax", WIDTHS, [0, 3, 2], True),
        ("swiglu", "softmax", [0, 12, 0, 5, 9, 0], [3, 5, 0], False)],   # null experts
}


def _worker(rank, world, port):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if sys.platform == "linux":  # gloo's own sockets on loopback, whatever the hostname resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for case in LAYER_CASES[world]:
            _check_layer(rank, world, *case)
        _check_bad_inputs(rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3], ids=["W2", "W3"])
def test_expert_parallel_matches_full_layer(world):
    spawn_ranks(_worker, world)
