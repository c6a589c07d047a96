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
uneven token counts, a rank with no tokens, a [1, T, d] input, both the width-balanced placement
and the naive contiguous split (experts 0..E/2-1 on rank 0), both exchange modes (the capacity
ones dropless: ``max_tokens`` is the larger rank's), chunked pipelining, and a shared expert with
and without its gate. Tolerances: vmoe.testing.

Two more checks: a capacity that drops rows counts them and, under ``check_capacity``, raises on
both ranks; and the capacity mode runs inside a CUDA graph (forward, and forward + backward),
whose replays on new tokens equal eager calls bit for bit.
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
from vmoe.testing import DTYPE_IDS, assert_close, capture_graph, spawn_ranks  # noqa: E402

WORLD = 2
needs_gpus = pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA GPUs (NCCL)")

UNIFORM = ((8, 256),)
VARIABLE = ((2, 384), (4, 192), (4, 100))  # 100: not a multiple of the block size

# (activation, router, expert_sizes, k, dtype, tokens per rank, placement, x as [1, T, d],
#  keywords: of from_moe, and "shared"/"gate" for the config's shared expert)
CASES = [
    ("relu2", "softmax", UNIFORM, 2, torch.bfloat16, [300, 517], "balanced", False, {}),
    ("relu2", "sigmoid", VARIABLE, 4, torch.bfloat16, [0, 640], "balanced", False, {}),
    ("relu2", "softmax", VARIABLE, 4, torch.float32, [517, 300], "contiguous", True, {}),
    ("relu2", "sigmoid", UNIFORM, 2, torch.float32, [640, 0], "contiguous", False, {}),
    ("swiglu", "sigmoid", UNIFORM, 2, torch.bfloat16, [129, 1], "contiguous", True, {}),
    ("swiglu", "softmax", VARIABLE, 4, torch.bfloat16, [300, 517], "balanced", False, {}),
    ("swiglu", "softmax", VARIABLE, 4, torch.float32, [0, 431], "contiguous", False, {}),
    ("swiglu", "sigmoid", UNIFORM, 2, torch.float32, [517, 300], "balanced", True, {}),
    ("relu2", "softmax", VARIABLE, 4, torch.bfloat16, [300, 517], "balanced", False,
     dict(exchange="capacity", max_tokens=517)),
    ("swiglu", "sigmoid", UNIFORM, 2, torch.float32, [517, 300], "contiguous", False,
     dict(exchange="capacity", max_tokens=517, chunks=3)),
    ("relu2", "sigmoid", VARIABLE, 4, torch.bfloat16, [640, 0], "balanced", True,
     dict(chunks=2, shared=256, gate=True)),
    ("swiglu", "softmax", VARIABLE, 4, torch.float32, [129, 431], "balanced", False,
     dict(exchange="capacity", max_tokens=431, chunks=2, shared=128)),
]


def _case_id(case) -> str:
    activation, router, sizes, k, dtype, tokens, placement, batch_dim, options = case
    widths = "+".join(f"{n}x{f}" for n, f in sizes)
    extra = "".join(f"-{key}{value}" for key, value in options.items())
    return (f"{activation}-{router}-{widths}-k{k}-{DTYPE_IDS[dtype]}-T{tokens[0]},{tokens[1]}"
            f"-{placement}" + ("-BSd" if batch_dim else "") + extra)


def _config(activation, router, sizes, k, options) -> MoEConfig:
    return MoEConfig(n_embd=256, expert_sizes=sizes, num_active_experts=k, activation=activation,
                     router=router, shared_expert_width=options.get("shared", 0),
                     shared_expert_gate=options.get("gate", False))


def _assert_grads(name, shard, moe, dtype):
    """The shard's gradients against the full layer's: w1/w2 restricted to the local experts,
    the replicated ones (router, shared expert) summed over the ranks."""
    expected = ExpertParallelMoEMLP(moe.config, shard.local_experts, shard.group,
                                    placement=shard.placement).to(shard.w1.device, dtype)
    expected.load_full_state_dict({key: p.grad for key, p in moe.named_parameters()})
    want = dict(expected.named_parameters())
    for key, p in shard.named_parameters():
        grad = p.grad.to(torch.float32, copy=True)
        if key not in ("w1", "w2"):
            dist.all_reduce(grad)
            key_name = f"d{key} summed over ranks"
        else:
            key_name = f"d{key} (local experts)"
        assert_close(f"{name} {key_name}", grad, want[key], dtype)


def _check_case(rank, world, case):
    activation, router, sizes, k, dtype, tokens, placement_kind, batch_dim, options = case
    options = dict(options)
    shared_options = {key: options.pop(key) for key in ("shared", "gate") if key in options}
    name = f"rank{rank} {_case_id(case)}"
    device = torch.device("cuda", rank)
    torch.manual_seed(1234)  # the same layer, tokens and output gradients on every rank
    cfg = _config(activation, router, sizes, k, shared_options)
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
    shard = ExpertParallelMoEMLP.from_moe(moe, placement=placement, **options)
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
    _assert_grads(name, shard, moe, dtype)
    if tokens[rank]:
        for key, value in aux_ref.items():
            assert_close(f"{name} {key}", aux[key].detach(), value.detach(), dtype)
    assert torch.equal(f_i, f_ref), f"{name} f_i: {f_i} != {f_ref}"
    assert int(shard.dropped_rows) == 0, f"{name}: a dropless case dropped rows"

    full = shard.full_state_dict(dst=None)
    for key, value in full.items():
        assert torch.equal(value, moe.state_dict()[key]), f"{name} full_state_dict()[{key!r}]"


def _check_overflow(rank, world):
    """A capacity below the traffic drops rows, counts them, and under check_capacity raises on
    every rank."""
    device = torch.device("cuda", rank)
    torch.manual_seed(5)
    moe = MoEMLP(_config("relu2", "softmax", VARIABLE, 4, {})).to(device, torch.bfloat16)
    x = torch.randn(512, moe.config.n_embd).to(device, torch.bfloat16)
    shard = ExpertParallelMoEMLP.from_moe(moe, exchange="capacity", capacity_factor=0.25)
    with torch.no_grad():
        shard(x)
    dropped = shard.dropped_rows.clone()
    dist.all_reduce(dropped)
    assert int(dropped) > 0, f"rank{rank}: capacity_factor=0.25 dropped nothing"
    shard.check_capacity = True
    with pytest.raises(RuntimeError, match="capacity overflow"):
        with torch.no_grad():
            shard(x)


def _check_graph(rank, world):
    """The capacity mode in a CUDA graph: forward, and forward + backward, captured once and
    replayed on new tokens written into the captured input, equal to eager calls."""
    device = torch.device("cuda", rank)
    torch.manual_seed(11)
    dtype = torch.bfloat16
    moe = MoEMLP(_config("swiglu", "softmax", VARIABLE, 4, dict(shared=128))).to(device, dtype)
    d, T = moe.config.n_embd, 256
    shard = ExpertParallelMoEMLP.from_moe(moe, exchange="capacity", chunks=2)
    params = list(shard.parameters())
    x_static = torch.randn(T, d, device=device, dtype=dtype)
    dy = torch.randn(T, d, device=device, dtype=dtype)

    def forward():
        with torch.no_grad():
            return shard(x_static)[0]

    def train_step():
        for p in params:
            p.grad = None
        x = x_static.detach().requires_grad_()
        out = shard(x)[0]
        out.backward(dy)
        return out, x

    for step, name in ((forward, "forward"), (train_step, "forward+backward")):
        graph, captured = capture_graph(step)
        grads = [p.grad for p in params]  # the graph rewrites these on replay
        for i in range(2):
            x_static.copy_(torch.randn(T, d, device=device, dtype=dtype))
            graph.replay()
            torch.cuda.synchronize()
            if name == "forward":
                got = [captured.clone()]
                want = [forward()]
            else:
                got = [t.clone() for t in [captured[0], captured[1].grad] + grads]
                out, x = train_step()
                want = [out.detach(), x.grad] + [p.grad for p in params]
            for j, (a, b) in enumerate(zip(got, want)):
                assert torch.equal(a, b), f"rank{rank} {name} replay {i}: output {j} differs from eager"


def _init(rank, world, port):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timedelta(seconds=300),
                            device_id=torch.device("cuda", rank))


def _worker(rank, world, port):
    _init(rank, world, port)
    try:
        for case in CASES:
            _check_case(rank, world, case)
        _check_overflow(rank, world)
    finally:
        dist.destroy_process_group()


def _graph_worker(rank, world, port):
    _init(rank, world, port)
    try:
        _check_graph(rank, world)
    finally:
        dist.destroy_process_group()


@needs_gpus
def test_expert_parallel_nccl_matches_full_layer(monkeypatch):
    # Correctness, not speed: one kernel config each, no autotuning pass (the spawned processes
    # import vmoe after this is set; the variable is restored for the other tests).
    monkeypatch.setenv("VMOE_PIN_CONFIG", "1")
    spawn_ranks(_worker, WORLD)


@needs_gpus
def test_capacity_mode_in_cuda_graph(monkeypatch):
    monkeypatch.setenv("VMOE_PIN_CONFIG", "1")
    spawn_ranks(_graph_worker, WORLD)


def test_contiguous_placement():
    # The benchmark's naive split, which the GPU cases also take.
    assert contiguous_placement(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert contiguous_placement(10, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
