"""What the probes share: a layer's two timed calls, GPU time per call, and a host profile.

At the sizes the probes look at, an eager call is partly or wholly host-bound, so a wall-clock
timer (do_bench) measures the host; the kernels' own times (:func:`kernel_times`) do not.
"""
from __future__ import annotations

import cProfile
import pstats
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile


def layer_steps(module, x, dy):
    """``(forward, train_step)`` of a layer called as ``out, aux, _ = module(x)``: a no-grad
    forward, and a training step that backpropagates ``(out * dy).sum() + sum(aux)``."""
    def forward():
        with torch.no_grad():
            module(x)

    def train_step():
        out, aux, _ = module(x)
        ((out * dy).sum() + sum(aux.values())).backward()
    return forward, train_step


def kernel_times(fn, steps: int = 10, warmup: int = 3, name_len: int = 90) -> dict[str, float]:
    """µs of GPU time per call of ``fn``, per kernel name (cut to ``name_len`` characters), over
    ``steps`` calls after ``warmup`` calls (autotuning, caches)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()  # host-ok: the timer
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()  # host-ok: the timer
    per_kernel: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name[:name_len]] += e.time_range.elapsed_us() / steps
    return dict(per_kernel)


def print_host_profile(fn, calls: int, title: str, top: int = 22) -> None:
    """cProfile ``calls`` calls of ``fn`` (the device synchronized before and after, so the GPU's
    backlog lands outside), then print ``title`` and the ``top`` functions by own time."""
    torch.cuda.synchronize()  # host-ok: the timer
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        fn()
    profile.disable()
    torch.cuda.synchronize()  # host-ok: the timer
    print(title)
    pstats.Stats(profile).sort_stats("tottime").print_stats(top)
