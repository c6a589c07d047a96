"""vmoe's own host time per layer call, with every Triton launch replaced by a no-op: what the
package's Python costs around its kernels (argument checks, allocation, routing metadata,
autograd), apart from Triton's launcher and from the GPU. Runs on any CPU, no GPU needed.

    PYTHONPATH=. python results/probe_host_stub.py [fwd|step]   # the optional argument: cProfile

Small sizes (T=64, d=32, 4x32+8x16+4x8, k=2), so that the torch ops left on the CPU (the router
GEMM and the autograd bookkeeping of a training step) cost little; the Python overhead does not
depend on the sizes. Prints µs per call for a no-grad forward and a training step.
"""
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before vmoe is imported: CPU tensors take the kernel path

import cProfile  # noqa: E402
import pstats  # noqa: E402

import torch  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

import vmoe.gather_scatter  # noqa: E402
import vmoe.grouped_gemm  # noqa: E402
import vmoe.router  # noqa: E402
import vmoe.routing  # noqa: E402
from vmoe import MoEConfig, MoEMLP  # noqa: E402

launches = []


class NoLaunch:
    """Stands in for a kernel: ``kernel[grid](...)`` records the launch and does nothing."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append(self.name)


for module in (vmoe.grouped_gemm, vmoe.routing, vmoe.gather_scatter, vmoe.router):
    for name, value in list(vars(module).items()):
        if isinstance(value, KernelInterface) and name.endswith("_kernel"):
            setattr(module, name, NoLaunch(name))

torch.set_num_threads(1)
moe = MoEMLP(MoEConfig(n_embd=32, expert_sizes=[(4, 32), (8, 16), (4, 8)], num_active_experts=2,
                       impl="triton"))
x = torch.randn(64, 32, requires_grad=True)
dy = torch.randn(64, 32)
ones = [torch.ones(()) for _ in range(3)]


def fwd():
    with torch.no_grad():
        moe(x)


def step():
    out, aux, _ = moe(x)
    torch.autograd.backward([out, *aux.values()], [dy, *ones])


for fn in (fwd, step):
    for _ in range(50):
        fn()
    launches.clear()
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t) / n * 1e6
    print(f"{fn.__name__}: {us:.1f} µs a call, {len(launches) / n:.0f} vmoe launches a call")

if len(sys.argv) > 1:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(500):
        {"fwd": fwd, "step": step}[sys.argv[1]]()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)
