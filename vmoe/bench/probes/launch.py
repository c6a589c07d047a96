"""Host time of the eager layer with and without vmoe's direct launch path (:mod:`vmoe.ops.utils.launch`).

For one seed config (T=4096, d=256, bf16) the GPU work of a forward is ~50 µs, so an eager call's
wall time is host time. Three alternating pairs of: 300 no-grad forwards and 200 training steps,
timed with perf_counter around the loop (synchronized at both ends), direct path off then on.
Then Triton's launch against the direct one for a single kernel (the combine, 2000 launches), and
a cProfile of 300 forwards on the direct path (where the rest of the host time goes).

    python -m vmoe.bench.probes.launch
"""
from __future__ import annotations

import time

import torch

from vmoe import MoEConfig, MoEMLP
from vmoe.bench.probes.profiling import layer_steps, print_host_profile
from vmoe.ops.gather_scatter import combine
from vmoe.ops.routing import build_routing
from vmoe.ops.utils import launch as launch_mod

CONFIGS = {
    "seed-4x512+8x256+4x128-k2": dict(expert_sizes=[(4, 512), (8, 256), (4, 128)],
                                      num_active_experts=2),
    "seed-32x512+64x256+32x128-k8": dict(expert_sizes=[(32, 512), (64, 256), (32, 128)],
                                         num_active_experts=8),
}
T, d = 4096, 256


def _timed(fn, n):
    torch.cuda.synchronize()  # host-ok: the timer
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()  # host-ok: the timer
    return (time.perf_counter() - t0) / n * 1e6


def main():
    for name, kw in CONFIGS.items():
        torch.manual_seed(0)
        moe = MoEMLP(MoEConfig(n_embd=d, **kw)).to("cuda", torch.bfloat16)
        x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)

        forward, step = layer_steps(moe, x, dy)

        for enabled in (False, True):
            launch_mod._ENABLED = enabled
            for _ in range(5):
                forward()
                step()
        rows = []
        for pair in range(3):
            for enabled in (False, True):
                launch_mod._ENABLED = enabled
                rows.append((enabled, _timed(forward, 300), _timed(step, 200)))
        print(f"\n{name}: host µs per call (300 no-grad forwards, 200 training steps)")
        for enabled, f, s in rows:
            print(f"  direct={'on ' if enabled else 'off'}  forward {f:7.1f}  training step {s:7.1f}")
        launch_mod._ENABLED = True
        print(f"  cache entries: {len(launch_mod._CACHE)}, direct: "
              f"{sum(isinstance(e, launch_mod._Direct) for e in launch_mod._CACHE.values())}")

    # One kernel alone: Triton's launch path against the direct one.
    routing = build_routing(torch.randint(0, 16, (T, 2), device="cuda", dtype=torch.int32),
                                 tuple([512] * 4 + [256] * 8 + [128] * 4))
    ys = torch.randn(T * 2, d, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, 2, device="cuda", dtype=torch.bfloat16)
    for enabled in (False, True, False, True):
        launch_mod._ENABLED = enabled
        us = _timed(lambda: combine(ys, routing, w), 2000)
        print(f"combine(): direct={'on ' if enabled else 'off'} {us:6.1f} µs a call")

    launch_mod._ENABLED = True
    name, kw = next(iter(CONFIGS.items()))
    moe = MoEMLP(MoEConfig(n_embd=d, **kw)).to("cuda", torch.bfloat16)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(10):
            moe(x)
        print_host_profile(lambda: moe(x), 300,
                           f"\ncProfile, 300 no-grad forwards of {name}, direct path on", top=25)


if __name__ == "__main__":
    main()
