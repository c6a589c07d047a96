"""Can a warp-specialized GEMM whose producer *gathers* its A rows with ``cp.async`` feed Hopper's
tensor cores as fast as one whose A arrives by TMA? (issue 16, the route that NOTES.md's session 7
proposes for up_proj, dH and the weight gradients.)

Triton 3.6's automatic warp specialization refuses a loop with pointer loads (session 7, s7.4),
so this probe writes the schedule by hand in Gluon (``triton.experimental.gluon``, shipped in
Triton 3.6): a persistent kernel, one producer partition (4 warps) that issues the A copies
(``cp.async`` rows gathered by an index, or a TMA box when ``GATHER`` is off) and the B copies
(TMA), and one consumer warpgroup (the default partition) that runs ``wgmma`` and the up_proj
epilogue, ``relu(acc)**2`` stored by TMA. The stage handshake is mbarriers: the producer's
threads each arrive on A's barrier when their own copies land (``cp.async.mbarrier.arrive.noinc``),
B's barrier counts the TMA bytes, and the consumer releases a stage once the wgmma that read it
has retired.

The problem is dense, not ragged: ``H = relu(x[idx] @ W)**2``, ``x`` [T, K], ``W`` [K, N] (every
size a multiple of the tile), so it isolates the schedule. Beside it, in one run on one card:
the same kernel with A by TMA from the pre-gathered rows (the gather's cost inside this
schedule), vmoe's shipped ``up_proj`` on one expert of width N (its row kernel, gathering by
token), and cuBLAS on the pre-gathered rows (the matmul alone).

    PYTHONPATH=. python results/probe_gluon.py [OUT.csv]      # on a Hopper GPU
    PYTHONPATH=/tmp/triton36:. python results/probe_gluon.py --compile   # sm_90 compile, no GPU

Not shipped: Gluon is experimental, has no interpreter (CI could not run it), and this kernel has
no ragged schedule, masks or backward.
"""
from __future__ import annotations

import csv
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

BM, BN, BK, STAGES = 128, 128, 64, 4
CONSUMER_WARPS, PRODUCER_WARPS = 4, 4


@gluon.jit
def _producer(x_ptr, idx_ptr, x_desc, w_desc, a_bufs, b_bufs, a_ready, b_ready, empty,
              M, N, K, stride_x, GATHER: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
              BK: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr):
    # 16-byte vectors along K, one row of BK per 8 threads: each thread's copies are whole
    # 16-byte chunks of a gathered row, the unit cp.async moves.
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    rows_layout: gl.constexpr = gl.SliceLayout(1, layout)
    cols = gl.arange(0, BK, layout=gl.SliceLayout(0, layout))
    tiles_n = N // BN
    it = 0
    for tile in range(gl.program_id(0), (M // BM) * tiles_n, gl.num_programs(0)):
        off_m = (tile // tiles_n) * BM
        off_n = (tile % tiles_n) * BN
        if GATHER:
            rows = gl.load(idx_ptr + off_m + gl.arange(0, BM, layout=rows_layout)).to(gl.int64)
            row_ptrs = x_ptr + rows[:, None] * stride_x + cols[None, :]
        for ks in range(K // BK):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # stage free (first lap: free)
            mbarrier.expect(b_ready.index(s), w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [ks * BK, off_n], b_ready.index(s), b_bufs.index(s))
            if GATHER:
                async_copy.async_copy_global_to_shared(a_bufs.index(s), row_ptrs + ks * BK)
                # Each thread arrives once its own copies have landed (no increment: the
                # barrier was initialised with one arrival per producer thread).
                async_copy.mbarrier_arrive(a_ready.index(s), increment_count=False)
            else:
                mbarrier.expect(a_ready.index(s), x_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(x_desc, [off_m, ks * BK], a_ready.index(s),
                                                a_bufs.index(s))
            it += 1


@gluon.jit
def _consumer(h_desc, a_bufs, b_bufs, c_smem, a_ready, b_ready, empty, M, N, K,
              GATHER: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
              STAGES: gl.constexpr, WARPS: gl.constexpr):
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                         instr_shape=[16, BN, 16])
    tiles_n = N // BN
    it = 0
    for tile in range(gl.program_id(0), (M // BM) * tiles_n, gl.num_programs(0)):
        off_m = (tile // tiles_n) * BM
        off_n = (tile % tiles_n) * BN
        acc = gl.zeros((BM, BN), gl.float32, acc_layout)
        for ks in range(K // BK):
            s = it % STAGES
            phase = (it // STAGES) & 1
            mbarrier.wait(a_ready.index(s), phase)
            mbarrier.wait(b_ready.index(s), phase)
            if GATHER:
                # cp.async wrote A through the generic proxy; wgmma reads through the async one.
                fence_async_shared()
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, is_async=True)
            # Keep one wgmma in flight: the previous one has retired, so its stage is free.
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=ks > 0)
            it += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
        h = gl.maximum(acc, 0.0)
        tma.store_wait(0)  # the previous tile's store has left c_smem
        c_smem.store((h * h).to(h_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(h_desc, [off_m, off_n], c_smem)
    tma.store_wait(0)


@gluon.jit
def up_proj_ws_kernel(x_ptr, idx_ptr, w_ptr, h_ptr, M, N, K, stride_x, stride_w, stride_h,
                      GATHER: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                      STAGES: gl.constexpr, PRODUCER_WARPS: gl.constexpr,
                      a_layout: gl.constexpr, b_layout: gl.constexpr, c_layout: gl.constexpr,
                      num_warps: gl.constexpr):
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    # Descriptors made in the kernel (one global-scratch allocation per program), so every
    # argument is a pointer or an integer.
    x_desc = tma.make_tensor_descriptor(x_ptr, [M, K], [stride_x, 1], [BM, BK], a_layout)
    w_desc = tma.make_tensor_descriptor(w_ptr, [K, N], [stride_w, 1], [BK, BN], b_layout)
    h_desc = tma.make_tensor_descriptor(h_ptr, [M, N], [stride_h, 1], [BM, BN], c_layout)
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], a_layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES, BK, BN], b_layout)
    c_smem = gl.allocate_shared_memory(dtype, [BM, BN], c_layout)
    a_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    b_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(a_ready.index(i), count=PRODUCER_WARPS * 32 if GATHER else 1)
        mbarrier.init(b_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    fence_async_shared()
    gl.warp_specialize([
        (_consumer, (h_desc, a_bufs, b_bufs, c_smem, a_ready, b_ready, empty, M, N, K, GATHER,
                     BM, BN, BK, STAGES, num_warps)),
        (_producer, (x_ptr, idx_ptr, x_desc, w_desc, a_bufs, b_bufs, a_ready, b_ready, empty,
                     M, N, K, stride_x, GATHER, BM, BN, BK, STAGES, PRODUCER_WARPS)),
    ], [PRODUCER_WARPS], [88])


def layouts(dtype=gl.bfloat16):
    return (gl.NVMMASharedLayout.get_default_for([BM, BK], dtype),
            gl.NVMMASharedLayout.get_default_for([BK, BN], dtype),
            gl.NVMMASharedLayout.get_default_for([BM, BN], dtype))


def up_proj_ws(x, idx, w, gather=True):
    """``relu(x[idx] @ w)**2`` (gather) or ``relu(x @ w)**2`` (x already in row order)."""
    M = idx.shape[0] if gather else x.shape[0]
    K, N = w.shape
    assert M % BM == 0 and N % BN == 0 and K % BK == 0, (M, N, K)
    h = torch.empty(M, N, dtype=x.dtype, device=x.device)
    programs = torch.cuda.get_device_properties(x.device).multi_processor_count
    up_proj_ws_kernel[(programs,)](x, idx, w, h, M, N, K, x.stride(0), w.stride(0), h.stride(0),
                                   gather, BM, BN, BK, STAGES, PRODUCER_WARPS, *layouts(),
                                   num_warps=CONSUMER_WARPS)
    return h


def compile_only():
    """Compile both variants for sm_90 on this machine (no GPU): registers, spills, the copies
    (``results/probe_compile.py``'s facts line)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from results.probe_compile import compiled_facts

    names = up_proj_ws_kernel.arg_names
    for gather in (True, False):
        consts = dict(GATHER=gather, BM=BM, BN=BN, BK=BK, STAGES=STAGES,
                      PRODUCER_WARPS=PRODUCER_WARPS, num_warps=CONSUMER_WARPS,
                      **dict(zip(("a_layout", "b_layout", "c_layout"), layouts())))
        sig = {n: "constexpr" if n in consts else
               {"x_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16", "idx_ptr": "*i32"}.get(n, "i32")
               for n in names}
        # Every size and stride divisible by 16, as at the probe's shapes (without it the
        # cp.async copies cannot be 16 bytes and the lowering fails).
        attrs = {(names.index(n),): [["tt.divisibility", 16]]
                 for n in ("x_ptr", "w_ptr", "h_ptr", "idx_ptr", "M", "N", "K", "stride_x",
                           "stride_w", "stride_h")}
        compiled = triton.compile(GluonASTSource(up_proj_ws_kernel, sig, consts, attrs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=CONSUMER_WARPS))
        print(f"gather={gather}: {compiled_facts(compiled)}, "
              f"noinc arrivals {compiled.asm['ptx'].count('arrive.noinc')}")


def main(out=None):
    from triton.testing import do_bench

    from vmoe import grouped_gemm as gg
    from vmoe.routing import build_routing
    from vmoe.testing import rel_err

    gg._ensure_allocator()  # the in-kernel descriptors' scratch, as vmoe's own kernels get it
    torch.manual_seed(0)
    rows = []
    # (T*k assignments, d, width): the large configs' up_proj, as one dense expert.
    for M, K, N in [(131072, 2048, 768), (131072, 2048, 1536)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(K, N, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        perm = torch.randperm(M, device="cuda", dtype=torch.int32)
        xs = x[perm.long()].contiguous()
        ref = torch.relu(xs.double() @ w.double()) ** 2
        flops = 2 * M * N * K
        ident = torch.arange(M, device="cuda", dtype=torch.int32)
        routing = build_routing(torch.zeros(M, 1, dtype=torch.int32, device="cuda"), (N,))
        # The real layout: 128 experts of width N, M/128 random tokens each (the same FLOPs).
        E = 128
        ids = (perm % E).view(M, 1)
        routing_e = build_routing(ids, (N,) * E)
        w_e = torch.randn(K, E * N, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        cases = {
            "gluon_ws_gather": lambda: up_proj_ws(x, perm, w, gather=True),
            "gluon_ws_gather_identity": lambda: up_proj_ws(xs, ident, w, gather=True),
            "gluon_ws_tma_presorted": lambda: up_proj_ws(xs, perm, w, gather=False),
            "vmoe_up_proj": lambda: gg.up_proj(xs, w, routing, "relu2", save_z=False)[0].view(M, N),
            "vmoe_up_proj_128_experts": lambda: gg.up_proj(x, w_e, routing_e, "relu2",
                                                           save_z=False)[0],
            "cublas_mm_presorted": lambda: xs @ w,
        }
        for name, fn in cases.items():
            got = fn()
            if name == "vmoe_up_proj_128_experts":
                err = max(rel_err(got[e * (M // E) * N:(e + 1) * (M // E) * N].view(-1, N).double(),
                                  torch.relu(x[torch.nonzero(perm % E == e).squeeze(1)].double()
                                             @ w_e[:, e * N:(e + 1) * N].double()) ** 2)
                          for e in (0, E // 2, E - 1))
            else:
                err = rel_err(got.double() if name != "cublas_mm_presorted"
                              else torch.relu(got.double()) ** 2, ref)
            ms = do_bench(fn, warmup=50, rep=300)
            row = dict(M=M, K=K, N=N, kernel=name, ms=round(ms, 4),
                       tflops=round(flops / ms / 1e9, 1), rel_err=f"{err:.2e}")
            rows.append(row)
            print(row, flush=True)
    if out:
        with open(out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    if "--compile" in sys.argv:
        compile_only()
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else None)
