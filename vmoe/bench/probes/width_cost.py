"""What an expert layer costs per token as a function of its experts' widths, at notebook 08's
training sizes: d=384 or d=768, k=2, T = 64 x 256 tokens, bf16, one step = ``vmoe.expert_mlp``
forward + backward (x, topk_weights, w1, w2 all require grad). The time is the GPU's: the sum of
the kernels' times under torch.profiler, per step, over 10 steps (an eager step of this size is
host-bound, ~1.2 ms whatever the widths: the first run of this probe timed it with do_bench and
saw only that), with the slowest kernel named.

Written for two findings of the training batch of results/train_h200.csv: the uniform
control at width 610 trained 37% slower than uniform at 768 (610 is not a multiple of 16), and
var23 at a realised width of 958 trained only 2% faster than uniform while the uniform control at
928 was 12% faster. The routing is synthetic and fixed, so only the widths differ:

- ``uniform WxE``: every expert of width W, ids uniform over the 8 experts;
- ``var5`` / ``var23`` at ``wide_share`` p: each slot goes to one of the 4 wide experts with
  probability p, else to one of the 4 narrow ones, with p chosen so that the realised width
  k * (p * f_wide + (1 - p) * f_narrow) equals the training runs' mean (1243 and 958).

The ``d768`` cases are the d=768 study's (results/train_h100.csv): its uniform layer and the two uniform
controls, and var5_d768 / var23_d768 at the two seeds' mean realised width (2008 and 1281, where the
router puts 76% and 82% of the slots on the narrow experts) and evenly routed (the FLOPs of 8x1536).

    python -m vmoe.bench.probes.width_cost [OUT.csv] [CASE_REGEX]

(each case autotunes its kernels first, ~10 s; the CSV is rewritten after every case).

Prints, per case, the realised width, the step's GPU time, the experts' FLOPs (6 * 2 * d * width per
token: forward and backward of two GEMMs) and their rate.
"""
from __future__ import annotations

import csv
import re
import sys

import torch

from vmoe import expert_mlp
from vmoe.bench.probes.profiling import kernel_times

DEV, DT = "cuda", torch.bfloat16
T, K = 64 * 256, 2
STEPS = 10


def cases():
    """(name, d, widths, wide_share): wide_share None routes uniformly over the experts."""
    for w in (64, 128, 256, 464, 608, 610, 616, 624, 768, 1280, 1472):
        yield f"uniform {w}x8", 384, [w] * 8, None
    for name, wide, narrow, realised in (("var5", 1280, 256, 1243), ("var23", 1472, 64, 958)):
        p = (realised / K - narrow) / (wide - narrow)
        yield f"{name} p={p:.3f}", 384, [wide] * 4 + [narrow] * 4, p
        yield f"{name} even", 384, [wide] * 4 + [narrow] * 4, 0.5
    for w in (1536, 960, 720, 128):
        yield f"d768 uniform {w}x8", 768, [w] * 8, None
    for name, wide, narrow, realised in (("var5", 2560, 512, 2008), ("var23", 2944, 128, 1281)):
        p = (realised / K - narrow) / (wide - narrow)
        yield f"d768 {name} p={p:.3f}", 768, [wide] * 4 + [narrow] * 4, p
        yield f"d768 {name} even", 768, [wide] * 4 + [narrow] * 4, 0.5


def routing(widths, wide_share, gen):
    E = len(widths)
    if wide_share is None:
        return torch.randint(0, E, (T, K), generator=gen)
    wide = torch.rand(T, K, generator=gen) < wide_share
    slot = torch.randint(0, E // 2, (T, K), generator=gen)
    return torch.where(wide, slot, slot + E // 2)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else None
    pick = sys.argv[2] if len(sys.argv) > 2 else ""
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'case':22s} {'width':>7s} {'GPU ms':>7s} {'GFLOP':>7s} {'TFLOP/s':>8s}   slowest kernel ms")
    for name, D, widths, share in cases():
        if not re.search(pick, name):
            continue
        ids = routing(widths, share, gen).to(DEV)
        realised = float(torch.tensor(widths, device=DEV)[ids].sum(1).float().mean())
        F = sum(widths)
        x = torch.randn(T, D, device=DEV, dtype=DT, requires_grad=True)
        tw = torch.rand(T, K, device=DEV, dtype=DT, requires_grad=True)
        w1 = (torch.randn(D, F, device=DEV, dtype=DT) * D ** -0.5).requires_grad_()
        w2 = (torch.randn(F, D, device=DEV, dtype=DT) * F ** -0.5).requires_grad_()
        dy = torch.randn(T, D, device=DEV, dtype=DT)

        def step():
            for t in (x, tw, w1, w2):
                t.grad = None
            expert_mlp(x, ids, tw, w1, w2, widths).backward(dy)

        per_kernel = {k: us / 1e3 for k, us in kernel_times(step, STEPS, name_len=40).items()}
        ms = sum(per_kernel.values())
        top, top_ms = max(per_kernel.items(), key=lambda kv: kv[1])
        flops = 6 * 2 * D * realised * T
        rows.append({"case": name, "d": D, "widths": " ".join(map(str, widths)), "realised_width": realised,
                     "ms": ms, "gflop": flops / 1e9, "tflops": flops / ms / 1e9,
                     "top_kernel": top, "top_kernel_ms": top_ms, "gpu": torch.cuda.get_device_name()})
        print(f"{name:22s} {realised:7.0f} {ms:7.3f} {flops / 1e9:7.1f} {flops / ms / 1e9:8.1f}"
              f"   {top} {top_ms:.3f}")
        if out:
            with open(out, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)

if __name__ == "__main__":
    main()
