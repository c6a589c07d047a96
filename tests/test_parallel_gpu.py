"""vmoe.parallel on 2 GPUs with NCCL: ExpertParallelMoEMLP against the full MoEMLP on every rank.

The GPU test is skipped unless ``torch.cuda.device_count() >= 2`` (CI has no GPU: it is collected
and skipped without starting a process; only the placement helper's check runs). It spawns one
process per GPU itself, as tests/test_parallel.py does on the CPU with gloo, and each process runs
every case in one NCCL process group. Every collective has a timeout, and a failing rank makes
torch.multiprocessing.spawn end the other, so a bug fails the test instead of hanging it.

The reference is the full layer on every rank, fed each rank's tokens as a separate batch: the
output and dx of rank r are those of ``moe(x_r)``, and the w1, w2 and router gradients of
``sum_r (moe(x_r) * dy_r).sum()``, which are the full layer's gradients on the concatenation of
every rank's tokens (each token's output depends on that token alone). Batch by batch rather than
concatenated, because the shard routes each rank's batch with exactly ``MoEMLP.route(x_r)``: a
concatenated batch runs the router's GEMM at another M, where cuBLAS may pick another kernel and
round a bf16 logit near a top-k tie the other way, which is no error of the shard. The shard's w1
and w2 gradients are compared with the full ones restricted to its experts, its router gradient
summed over the ranks (as DDP does) with the full router gradient.

Cases: relu2 and swiglu, bf16 and fp32, uniform and variable widths (one not a multiple of 16),
uneven token counts, a rank with no tokens, a [1, T, d] input, and both the width-balanced
placement and the naive contiguous split (experts 0..E/2-1 on rank 0). Tolerances: vmoe.testing.
"""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch

os.environ.setdefault("VMOE_POISON", "1")

import torch.distributed as dist  # noqa: E402

from vmoe import MoEConfig, MoEMLP  # noqa: E402
from vmoe.bench.parallel import contiguous_placement  # noqa: E402
from vmoe.parallel import ExpertParallelMoEMLP, place_experts  # noqa: E402
from vmoe.testing import DTYPE_IDS, assert_close, assert_shard_grads, spawn_ranks  # noqa: E402

WORLD = 2
needs_gpus = pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA GPUs (NCCL)")

UNIFORM = ((8, 256),)
VARIABLE = ((2, 384), (4, 192), (4, 100))  # 100: not a multiple of the block size

# (activation, router, expert_sizes, k, dtype, tokens per rank, placement, x as [1, T, d])
CASES = [
    ("relu2", "softmax", UNIFORM, 2, torch.bfloat16, [300, 517], "balanced", False),
    ("relu2", "sigmoid", VARIABLE, 4, torch.bfloat16, [0, 640], "balanced", False),
    ("relu2", "softmax", VARIABLE, 4, torch.float32, [517, 300], "contiguous", True),
    ("relu2", "sigmoid", UNIFORM, 2, torch.float32, [640, 0], "contiguous", False),
    ("swiglu", "sigmoid", UNIFORM, 2, torch.bfloat16, [129, 1], "contiguous", True),
    ("swiglu", "softmax", VARIABLE, 4, torch.bfloat16, [300, 517], "balanced", False),
    ("swiglu", "softmax", VARIABLE, 4, torch.float32, [0, 431], "contiguous", False),
    ("swiglu", "sigmoid", UNIFORM, 2, torch.float32, [517, 300], "balanced", True),
]


def _case_id(case) -> str:
    activation, router, sizes, k, dtype, tokens, placement, batch_dim = case
    widths = "+".join(f"{n}x{f}" for n, f in sizes)
    return (f"{activation}-{router}-{widths}-k{k}-{DTYPE_IDS[dtype]}-T{tokens[0]},{tokens[1]}"
            f"-{placement}" + ("-BSd" if batch_dim else ""))


def _check_case(rank, world, case):
    activation, router, sizes, k, dtype, tokens, placement_kind, batch_dim = case
    name = f"rank{rank} {_case_id(case)}"
    device = torch.device("cuda", rank)
    torch.manual_seed(1234)  # the same layer, tokens and output gradients on every rank
    cfg = MoEConfig(n_embd=256, expert_sizes=sizes, num_active_experts=k, activation=activation,
                    router=router)
    moe = MoEMLP(cfg).to(device, dtype)
    d = cfg.n_embd
    xs = [torch.randn(n, d).to(device, dtype) for n in tokens]
    dys = [torch.randn(n, d).to(device, dtype) for n in tokens]

    # The reference: the full layer on each rank's batch, gradients summed over the batches.
    out_ref = dx_ref = aux_ref = f_ref = None
    for r, (x_r, dy_r) in enumerate(zip(xs, dys)):
        x_r = x_r.clone().requires_grad_()
        out_r, aux_r, f_r = moe(x_r)
        if tokens[r]:
            out_r.backward(dy_r)
        if r == rank:
            out_ref, dx_ref, aux_ref, f_ref = out_r.detach(), x_r.grad, aux_r, f_r
    if dx_ref is None:
        dx_ref = torch.zeros_like(xs[rank])

    placement = (place_experts(cfg.expert_widths, world) if placement_kind == "balanced"
                 else contiguous_placement(cfg.num_experts, world))
    shard = ExpertParallelMoEMLP.from_moe(moe, placement=placement)
    assert shard.local_experts == placement[rank], name
    x = xs[rank].clone()
    if batch_dim:
        x = x[None]
    x.requires_grad_()
    out, aux, f_i = shard(x)
    assert out.shape == x.shape, name
    out.backward(dys[rank].reshape(out.shape))

    assert_close(f"{name} out", out.reshape(-1, d), out_ref, dtype)
    assert_close(f"{name} dx", x.grad.reshape(-1, d), dx_ref, dtype)
    assert_shard_grads(name, shard, moe, dtype, placement)
    if tokens[rank]:
        for key, value in aux_ref.items():
            assert_close(f"{name} {key}", aux[key].detach(), value.detach(), dtype)
    assert torch.equal(f_i, f_ref), f"{name} f_i: {f_i} != {f_ref}"

    full = shard.full_state_dict(dst=None)
    for key, value in full.items():
        assert torch.equal(value, moe.state_dict()[key]), f"{name} full_state_dict()[{key!r}]"


def _worker(rank, world, port):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timedelta(seconds=300),
                            device_id=torch.device("cuda", rank))
    try:
        for case in CASES:
            _check_case(rank, world, case)
    finally:
        dist.destroy_process_group()


@needs_gpus
def test_expert_parallel_nccl_matches_full_layer(monkeypatch):
    # Correctness, not speed: one kernel config each, no autotuning pass (the spawned processes
    # import vmoe after this is set; the variable is restored for the other tests).
    monkeypatch.setenv("VMOE_PIN_CONFIG", "1")
    spawn_ranks(_worker, WORLD)


def test_contiguous_placement():
    # The benchmark's naive split, which the GPU cases also take.
    assert contiguous_placement(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert contiguous_placement(10, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
