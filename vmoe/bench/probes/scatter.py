r"""Launch 3 of the routing (``vmoe.ops.routing.scatter_routing``, the ``_scatter_kernel``) alone: its
time for T*k = 131k assignments, for the shipped kernel and (optionally) another version of it, and
whether both give the same bits.

A per-kernel profile of a training step (torch.profiler, H200; results/NOTES.md) found the scatter
kernel that ranked a block's assignments with a [BLOCK, BLOCK] comparison tile at 276-449 µs,
16-23% of a training step at d = 768, where moving 131k int32 twice takes a few µs. For each case,
both the block of ``build_routing`` (``_block_size``) and that of the fused router
(``route_block_tokens(E, k) * k``, 256 for these E at k = 8):

- ``p50``: ``triton.testing.do_bench`` median of one ``scatter_routing`` call, host work included
  (allocations and the launch; a kernel of a few µs is host-bound here);
- ``graph``: ``triton.testing.do_bench_cudagraph`` median of the same call, i.e. GPU time alone;
- GB/s from each: ids read once (A * their size) and two int32 arrays written (2 * A * 4 bytes);
- registers and spills of each compiled kernel;
- whether every array of the new Routing equals the old one bitwise (exit status 1 if not).

The other version ("old") is ``vmoe.ops._routing_before``, a copy of an earlier routing module made
by hand (not committed) before the run; for the comparison kernel, the parent of c36b6ac, with its
imports pointed at this tree's modules:

    git show c36b6ac^:vmoe/routing.py | sed 's/from \._utils /from vmoe.ops.utils.device /; \
        s/from \.launch /from vmoe.ops.utils.launch /' > vmoe/ops/_routing_before.py
    python -m vmoe.bench.probes.scatter
    python -m vmoe.bench.probes.scatter --cpu-smoke   # tiny sizes, Triton interpreter

Without that file it says so and times the shipped kernel alone. ``--cpu-smoke`` runs the same
code path at tiny sizes in the interpreter (no timings), to check the probe itself.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from vmoe.ops import routing as new
from vmoe.ops.router import route_block_tokens
from vmoe.ops.utils.device import cdiv, interpreting, next_pow2

# (name, T, k, widths)
CASES = [
    ("48+16null-24x384+24x128+16x0-k8", 16384, 8, (384,) * 24 + (128,) * 24 + (0,) * 16),
    ("128x768-k8", 16384, 8, (768,) * 128),
]
SMOKE_CASES = [
    ("smoke-3+2null-k2", 37, 2, (24, 0, 12, 0, 8)),
    ("smoke-6-k3", 21, 3, (16,) * 6),
]


def block_prefix(ids: torch.Tensor, E: int, block: int):
    """``(block_prefix [NB, E+1] int32, counts [E] int32)`` by torch: the scan that launch 2 (or
    the fused router's statistics kernel) hands to the scatter, ids outside [0, E) in column E."""
    flat = ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < E), flat, E)
    nb = max(cdiv(flat.numel(), block), 1)
    blocks = torch.arange(flat.numel(), device=ids.device) // block
    hist = torch.zeros(nb * (E + 1), dtype=torch.int64, device=ids.device)
    hist.index_add_(0, blocks * (E + 1) + key, torch.ones_like(key))
    hist = hist.view(nb, E + 1)
    return (hist.cumsum(0) - hist).int().contiguous(), hist[:, :E].sum(0).int()


def registers(module, ids, prefix, counts, block, widths) -> str:
    """Registers and spills of ``module``'s compiled scatter kernel at this launch's constants."""
    E, A = len(widths), ids.numel()
    dev = ids.device
    outs = (torch.empty(E + 1, dtype=torch.int32, device=dev),
            torch.empty(E + 1, dtype=torch.int64, device=dev),
            torch.empty(A, dtype=torch.int32, device=dev), torch.empty(A, dtype=torch.int32, device=dev))
    compiled = module._scatter_kernel[(prefix.shape[0],)](
        ids.reshape(-1), prefix, counts, torch.tensor(widths, dtype=torch.int32, device=dev), *outs,
        A, E, BLOCK=block, BLOCK_PAD=next_pow2(block), E1_PAD=next_pow2(E + 1))
    return f"regs={compiled.n_regs} spills={compiled.n_spills}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes in the Triton interpreter: checks the probe, times nothing")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if smoke and not interpreting():
        # Triton reads TRITON_INTERPRET when vmoe's kernels are decorated, i.e. when ``python -m``
        # imports vmoe before this module runs: run again with it set.
        os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]],
                  dict(os.environ, TRITON_INTERPRET="1"))
    if not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke for the interpreter check")
    device = "cpu" if smoke else "cuda"
    try:
        old = importlib.import_module("vmoe.ops._routing_before")
    except ModuleNotFoundError:
        old = None
        print("vmoe/ops/_routing_before.py is absent: the old kernel is not timed, nothing compared")
    if not smoke:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")

    torch.manual_seed(0)
    differ = []
    for name, T, k, widths in SMOKE_CASES if smoke else CASES:
        E = len(widths)
        # Distinct experts per token, as the router's top-k gives, in its int32.
        ids = torch.rand(T, E, device=device).topk(k, dim=1).indices.int()
        A = ids.numel()
        moved = A * ids.element_size() + 2 * A * 4
        for path, block in (("build_routing", new._block_size(next_pow2(E + 1))),
                            ("router", route_block_tokens(E, k) * k)):
            prefix, counts = block_prefix(ids, E, block)
            versions = {"new": new} if old is None else {"old": old, "new": new}
            results = {v: m.scatter_routing(ids, prefix, counts, block, widths).tensors()
                       for v, m in versions.items()}
            head = f"{name} T={T} A={A} via {path} (block {block}, {cdiv(A, block)} programs)"
            if old is not None:
                same = all(a.dtype == b.dtype and torch.equal(a, b)
                           for a, b in zip(results["old"], results["new"]))
                head += f": old and new {'bitwise equal' if same else 'DIFFER'}"
                if not same:
                    differ.append(f"{name} via {path}")
            print(head)
            if smoke:
                continue
            for v, m in versions.items():
                def call(m=m):
                    m.scatter_routing(ids, prefix, counts, block, widths)
                p50 = do_bench(call, return_mode="median") * 1e3           # µs
                graph = do_bench_cudagraph(call, return_mode="median") * 1e3
                print(f"  {v}: p50 {p50:8.1f} µs ({moved / p50 * 1e-3:7.1f} GB/s)   "
                      f"graph {graph:8.1f} µs ({moved / graph * 1e-3:7.1f} GB/s)   "
                      f"{registers(m, ids, prefix, counts, block, widths)}")
    if differ:
        sys.exit(f"old and new differ: {', '.join(differ)}")


if __name__ == "__main__":
    main()
