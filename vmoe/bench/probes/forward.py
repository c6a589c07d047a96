"""Where the forward's time goes at the large configs: vmoe's expert forward as the benchmark times
it (``expert_mlp``, routing included) and each of its launches alone (the routing metadata, up_proj,
down_proj, the combine), beside the dense stand-in and its own parts (the two matmuls and the
activation's torch kernels), all timed with ``do_bench`` in one run on one card.

    python -m vmoe.bench.probes.forward OUT.csv [CONFIG_REGEX]   # CONFIG_REGEX default: relu2

The combine reads the [T k, d] rows ys once and writes [T, d]: a memory pass the dense stand-in
does not have (its [T k, d] output is the matmul's own store). Its byte floor is printed beside
it, at the device copy rate measured in the same run.
"""
from __future__ import annotations

import csv
import re
import sys

import torch
from triton.testing import do_bench

from vmoe.autograd import expert_mlp
from vmoe.bench import harness as bench
from vmoe.bench.baselines import _act
from vmoe.ops import grouped_gemm as gg
from vmoe.ops.gather_scatter import combine
from vmoe.ops.routing import build_routing

DEV, DT = "cuda", torch.bfloat16


def main():
    out = sys.argv[1]
    pat = sys.argv[2] if len(sys.argv) > 2 else "relu2"
    big = torch.empty(1 << 29, dtype=torch.uint8, device=DEV)  # 512 MiB
    copy_ms = do_bench(lambda: big.clone())
    tb_s = 2 * big.numel() / copy_ms / 1e9  # read + write
    print(f"device copy: {tb_s:.2f} TB/s", flush=True)
    rows = []
    for cfg in bench.configs("large"):
        if not re.search(pat, cfg.name):
            continue
        inp = bench.make_inputs(cfg, DEV, DT)
        act = cfg.activation
        r = build_routing(inp.ids, cfg.widths)
        h, _ = gg.up_proj(inp.x, inp.w1, r, act, save_z=False)
        ys = gg.down_proj(h, inp.w2, r)
        wflat = inp.w.reshape(-1)
        dx, dw1, dw2 = (inp.dense[n] for n in ("x", "w1", "w2"))
        z = dx @ dw1
        zh = _act(z, act)
        A, d = ys.shape
        parts = {
            "vmoe_forward": lambda: expert_mlp(inp.x, inp.ids, inp.w, inp.w1, inp.w2, cfg.widths,
                                               act, impl="triton"),
            "vmoe_routing": lambda: build_routing(inp.ids, cfg.widths),
            "vmoe_up_proj": lambda: gg.up_proj(inp.x, inp.w1, r, act, save_z=False),
            "vmoe_down_proj": lambda: gg.down_proj(h, inp.w2, r),
            "vmoe_combine": lambda: combine(ys, r, wflat),
            "dense_forward": lambda: _act(dx @ dw1, act) @ dw2,
            "dense_mm1": lambda: dx @ dw1,
            "dense_act": lambda: _act(z, act),
            "dense_mm2": lambda: zh @ dw2,
        }
        with torch.no_grad():
            for name, fn in parts.items():
                ms = do_bench(fn)
                row = dict(config=cfg.name, part=name, ms=round(ms, 4))
                if name == "vmoe_combine":
                    nbytes = (A * d + cfg.T * d) * ys.element_size()
                    row["floor_ms"] = round(nbytes / (tb_s * 1e9), 4)
                rows.append(row)
                print(row, flush=True)
        inp = r = h = ys = z = zh = parts = None  # free before the next config
        torch.cuda.empty_cache()
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["config", "part", "ms", "floor_ms"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
