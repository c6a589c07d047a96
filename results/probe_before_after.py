"""Before/after probe for one GPU session: eager times of ``expert_mlp`` (expert scope) and of the
whole ``MoEMLP`` in a training step (layer scope), for whichever vmoe ``PYTHONPATH`` selects.

Run once per package version in the same call, on the same card, with ``VMOE_PIN_CONFIG=1`` so
that both versions run the same block shapes (a refactor's effect, not the autotuner's luck):

    VMOE_PIN_CONFIG=1 PYTHONPATH=old python results/probe_before_after.py --tag before
    VMOE_PIN_CONFIG=1 python results/probe_before_after.py --tag after

Prints one JSON object per measurement (``do_bench`` medians in ms), and the host time per
eager forward from ``time.perf_counter`` over 200 calls with no synchronization inside.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from triton.testing import do_bench

import vmoe
from vmoe import MoEConfig, MoEMLP

CONFIGS = [
    ("seed-8x512-k2", 4096, 256, 2, [(8, 512)], "relu2"),
    ("seed-4x512+8x256+4x128-k2", 4096, 256, 2, [(4, 512), (8, 256), (4, 128)], "relu2"),
    ("seed-64x256-k8", 4096, 256, 8, [(64, 256)], "relu2"),
    ("seed-32x512+64x256+32x128-k8", 4096, 256, 8, [(32, 512), (64, 256), (32, 128)], "relu2"),
    ("large-128x768-k8-relu2", 16384, 2048, 8, [(128, 768)], "relu2"),
    ("large-32x1536+32x768+64x384-k8-swiglu", 16384, 2048, 8, [(32, 1536), (32, 768), (64, 384)],
     "swiglu"),
]


def host_and_total_us(fn, n=200):
    """Microseconds per call of ``fn``: on the host alone (no synchronization inside the loop), and
    until the GPU has finished too."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - t) / n * 1e6
    return round(host, 1), round(total, 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", required=True)
    parser.add_argument("--match", default="")
    args = parser.parse_args()
    dev = "cuda"
    for name, T, d, k, sizes, act in CONFIGS:
        if args.match not in name:
            continue
        torch.manual_seed(0)
        cfg = MoEConfig(n_embd=d, expert_sizes=sizes, num_active_experts=k, activation=act,
                        router="softmax")
        moe = MoEMLP(cfg).to(dev, torch.bfloat16)
        x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        ones = [torch.ones((), device=dev) for _ in range(3)]

        def layer_fwd():
            return moe(x)

        def layer_fwdbwd():
            out, aux, _ = moe(x)
            torch.autograd.backward([out, *aux.values()], [dy, *ones])

        widths = cfg.expert_widths
        ids = torch.stack([torch.randperm(len(widths), device=dev)[:k] for _ in range(T)])
        w = torch.softmax(torch.randn(T, k, device=dev), -1).to(torch.bfloat16).requires_grad_()

        def expert_fwd():
            return vmoe.expert_mlp(x, ids, w, moe.w1, moe.w2, widths, act)

        def expert_fwdbwd():
            vmoe.expert_mlp(x, ids, w, moe.w1, moe.w2, widths, act).backward(dy)

        for scope, mode, fn in [("expert", "fwd", expert_fwd), ("expert", "fwdbwd", expert_fwdbwd),
                                ("layer", "fwd", layer_fwd), ("layer", "fwdbwd", layer_fwdbwd)]:
            ms = do_bench(fn, warmup=25, rep=200, grad_to_none=[x, w, *moe.parameters()],
                          return_mode="median")
            row = {"tag": args.tag, "config": name, "scope": scope, "mode": mode,
                   "ms": round(ms, 4)}
            if mode == "fwd":
                with torch.no_grad():
                    row["host_us_nograd"] = host_and_total_us(fn)[0]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
