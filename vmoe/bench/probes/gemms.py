"""The tensor-descriptor (TMA) path of the grouped GEMMs against the pointer path, per GEMM, on the
large configs: each of the six GEMMs of ``expert_mlp``'s forward and backward timed with
``do_bench`` under each mode of ``tma_mode`` named on the command line (default: "off", the pointer
kernels, and "auto", what users get; each autotuned over its own configs), the outputs compared
with the first mode's, and cuBLAS on the same FLOPs beside them.

    python -m vmoe.bench.probes.gemms OUT.csv [CONFIG_REGEX] [MODE ...]

(CONFIG_REGEX default: ``128x768-k8-relu2|32x1536.*swiglu``; the CSV is rewritten after every GEMM.)

FLOPs count the useful work: 2 * d * sum_e n_e f_e per GEMM (times g where the GEMM spans both
swiglu halves). The cuBLAS line for a row GEMM is ``[A, d] @ [d, g f_bar]`` (or its mirror) and
for a weight gradient ``[d, A] @ [A, g f_bar]``, f_bar the mean width per assignment.
"""
from __future__ import annotations

import csv
import re
import sys

import torch
from triton.testing import do_bench

from vmoe.bench import harness as bench
from vmoe.config import gate_factor
from vmoe.ops import grouped_gemm as gg
from vmoe.ops.routing import build_routing
from vmoe.testing import rel_err

DEV, DT = "cuda", torch.bfloat16


def gemms(inp, r, act):
    """name -> (callable, output picker, FLOP factor, used-length factor of a ragged output) for
    the six GEMMs, on fixed inputs."""
    g = gate_factor(act)
    tw = inp.w
    h, z = gg.up_proj(inp.x, inp.w1, r, act)
    dz, hw = gg.down_proj_bwd(inp.dy, tw, inp.w2, z, r, act, weighted_h=True)
    return {
        "up_proj": (lambda: gg.up_proj(inp.x, inp.w1, r, act), lambda o: o[0], g, 1),
        "down_proj": (lambda: gg.down_proj(h, inp.w2, r), lambda o: o, 1, 0),
        "down_proj_bwd": (lambda: gg.down_proj_bwd(inp.dy, tw, inp.w2, z, r, act, weighted_h=True),
                          lambda o: o[0], 1, g),
        "up_proj_bwd": (lambda: gg.up_proj_bwd(dz, inp.w1, r, act), lambda o: o, g, 0),
        "w2_grad": (lambda: gg.w2_grad(hw, inp.dy, None, inp.w2, r), lambda o: o, 1, 0),
        "w1_grad": (lambda: gg.w1_grad(inp.x, dz, inp.w1, r, act), lambda o: o, g, 0),
    }


def used(t, n):
    # Ragged outputs are sized for the worst routing: compare only the used prefix.
    return t.reshape(-1)[:n] if t.dim() == 1 else t


def main():
    out = sys.argv[1]
    pat = sys.argv[2] if len(sys.argv) > 2 else "128x768-k8-relu2|32x1536.*swiglu"
    modes = sys.argv[3:] or ["off", "auto"]
    rows = []
    for cfg in bench.configs("large") + bench.configs("tiny"):
        if not re.search(pat, cfg.name):
            continue
        inp = bench.make_inputs(cfg, DEV, DT, dense=False)
        r = build_routing(inp.ids, cfg.widths)
        counts = r.counts.tolist()  # host-ok: the probe's FLOP count
        S = sum(n * f for n, f in zip(counts, cfg.widths))
        g, A, d = gate_factor(cfg.activation), cfg.T * cfg.k, cfg.d
        fbar = -(-S // (A * 64)) * 64  # a width cuBLAS runs at full rate
        x2 = torch.randn(A, d, device=DEV, dtype=DT)
        wb = torch.randn(d, g * fbar, device=DEV, dtype=DT)
        cub_row = do_bench(lambda: x2 @ wb)
        cub_wg = do_bench(lambda: x2.t() @ torch.empty(A, g * fbar, device=DEV, dtype=DT))
        outs = {}
        for mode in modes:
            with gg.tma_mode(mode):
                for name, (fn, pick, gm, gu) in gemms(inp, r, cfg.activation).items():
                    outs[(mode, name)] = used(pick(fn()), gu * S).clone()
                    ms = do_bench(fn)
                    flops = 2 * d * gm * S
                    cub = cub_wg if name.startswith("w") else cub_row
                    row = dict(config=cfg.name, gemm=name, mode=mode, ms=round(ms, 4),
                               tflops=round(flops / ms / 1e9, 1),
                               cublas_tflops=round(2 * A * d * g * fbar / cub / 1e9, 1))
                    if mode != modes[0]:
                        first = outs[(modes[0], name)]
                        row["rel_vs_first"] = f"{rel_err(outs[(mode, name)], first):.2e}"
                        row["speedup"] = round(rows_by(rows, cfg.name, name, modes[0])["ms"] / ms, 3)
                    rows.append(row)
                    print(row, flush=True)
                    write(out, rows)
        del inp, r, outs
        torch.cuda.empty_cache()


def rows_by(rows, config, gemm, mode):
    return next(x for x in rows if x["config"] == config and x["gemm"] == gemm and x["mode"] == mode)


def write(path, rows):
    cols = ["config", "gemm", "mode", "ms", "tflops", "cublas_tflops", "speedup", "rel_vs_first"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
