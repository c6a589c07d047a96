"""Where a layer's GPU time goes, kernel by kernel: torch.profiler over a few eager training steps
of ``MoEMLP`` (forward, ``(out * dy).sum() + sum(aux)``, backward), bf16.

Written for two questions of results/NOTES.md: the router's share of the large layer's forward, and
why null experts did not shorten the forward (both answered there, under "Layer").

    python -m vmoe.bench.probes.kernels [--match SUBSTRING] [--steps 10]

Prints, per config, each kernel's mean GPU time per step (µs) and its share of the step.
"""
from __future__ import annotations

import argparse

import torch

from vmoe import MoEConfig, MoEMLP
from vmoe.bench.probes.profiling import kernel_times, layer_steps

CONFIGS = [
    ("large-128x768-k8-relu2", 16384, 2048, dict(expert_sizes=[(128, 768)], num_active_experts=8)),
    ("null-24x384+24x128+16x0-k8", 16384, 768,
     dict(expert_sizes=[(24, 384), (24, 128), (16, 0)], num_active_experts=8, router="sigmoid")),
    ("no-null-24x384+24x128-k8", 16384, 768,
     dict(expert_sizes=[(24, 384), (24, 128)], num_active_experts=8, router="sigmoid")),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--match", default="")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    for name, T, d, kw in CONFIGS:
        if args.match not in name:
            continue
        torch.manual_seed(0)
        moe = MoEMLP(MoEConfig(n_embd=d, **kw)).to("cuda", torch.bfloat16)
        x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)

        _, step = layer_steps(moe, x, dy)

        per_kernel = kernel_times(step, args.steps)
        total = sum(per_kernel.values())
        print(f"\n{name}: {total:.0f} µs of GPU time per training step")
        for kernel, us in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
            print(f"  {us:9.1f} µs  {100 * us / total:5.1f}%  {kernel}")


if __name__ == "__main__":
    main()
