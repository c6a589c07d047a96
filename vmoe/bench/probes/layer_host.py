"""The small layer's time per call where the host decides it: eager, ``torch.compile`` in its default
mode and ``mode="reduce-overhead"``, forward (no grad) and a training step (forward and backward of
``y.sum() + aux losses``), then a cProfile of the eager and the compiled step.

Seed layer 4x512+8x256+4x128, d=256, k=2, relu2, bf16, T=4096: its GPU work replays in about
0.04 ms forward, so each timing here is the host's. A timing is the mean over 200 calls after 30
warm-up calls, from a device synchronize to a device synchronize (the host runs ahead of the GPU,
so the GPU's time shows only where it is longer).

    python -m vmoe.bench.probes.layer_host [LABEL]
    PYTHONPATH=OTHER_TREE python vmoe/bench/probes/layer_host.py [LABEL]   # another checkout

Prints one ``mode what ms`` line per case, then the profiles (22 costliest functions by own time).
It imports nothing but ``vmoe`` itself, so that run as a file it measures whichever checkout
``PYTHONPATH`` selects (an A/B of two versions in one call, on one host).
"""
import cProfile
import pstats
import sys
import time

import torch

import vmoe

T, D = 4096, 256
SIZES = [(4, 512), (8, 256), (4, 128)]
CALLS, WARMUP = 200, 30


def main():
    label = sys.argv[1] if len(sys.argv) > 1 else ""
    torch.manual_seed(0)
    cfg = vmoe.MoEConfig(n_embd=D, expert_sizes=SIZES, num_active_experts=2, activation="relu2")
    moe = vmoe.MoEMLP(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def fwd(f):
        with torch.no_grad():
            f(x)

    def step(f):
        y, aux, _ = f(x)
        (y.float().sum() + sum(aux.values())).backward()

    layers = {"eager": moe, "compiled": torch.compile(moe),
              "reduce-overhead": torch.compile(moe, mode="reduce-overhead")}
    print(f"{label} {torch.cuda.get_device_name()} torch {torch.__version__}")
    for mode, f in layers.items():
        for what, fn in (("fwd", fwd), ("step", step)):
            for _ in range(WARMUP):
                fn(f)
            torch.cuda.synchronize()  # host-ok: the timer
            t = time.perf_counter()
            for _ in range(CALLS):
                fn(f)
            torch.cuda.synchronize()  # host-ok: the timer
            print(f"{mode:16s} {what:5s} {(time.perf_counter() - t) / CALLS * 1e3:.3f} ms",
                  flush=True)
    for mode in ("eager", "compiled"):
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(CALLS):
            step(layers[mode])
        profile.disable()
        torch.cuda.synchronize()  # host-ok: the timer
        print(f"--- cProfile, {CALLS} {mode} steps")
        pstats.Stats(profile).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
