"""Where the host time of an eager ``expert_mlp`` forward goes: cProfile over 300 no-grad calls
(seed config 4x512+8x256+4x128, T=4096, d=256, k=2, bf16). Prints LABEL, then the 22 costliest
functions by their own time.

    python -m vmoe.bench.probes.host [LABEL]
    PYTHONPATH=OTHER_TREE python vmoe/bench/probes/host.py [LABEL]   # the vmoe of another checkout

It imports nothing of vmoe but ``vmoe.expert_mlp``, so run as a file it profiles whichever vmoe
``PYTHONPATH`` selects (an A/B of two versions in one call, on one host).
"""
import cProfile
import pstats
import sys

import torch

import vmoe

T, d, k = 4096, 256, 2
widths = (512,) * 4 + (256,) * 8 + (128,) * 4


def main():
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(len(widths), device="cuda")[:k] for _ in range(T)])
    w = torch.rand(T, k, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(d, sum(widths), device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(sum(widths), d, device="cuda", dtype=torch.bfloat16)

    def forward():
        with torch.no_grad():
            vmoe.expert_mlp(x, ids, w, w1, w2, widths)

    for _ in range(20):
        forward()
    torch.cuda.synchronize()  # host-ok: the timer
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(300):
        forward()
    profile.disable()
    torch.cuda.synchronize()  # host-ok: the timer
    print(sys.argv[1] if len(sys.argv) > 1 else "")
    pstats.Stats(profile).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
