"""A prototype for issue 16: the down projection (ragged H @ w2, all operands through tensor
descriptors) as a persistent, warp-specialized kernel, against vmoe's own down_proj (pointer and
descriptor paths) on the large configs.

Triton 3.6 warp-specializes a Hopper loop (``tl.range(..., warp_specialize=True)``, 4 warps: one
producer warpgroup and consumer warpgroups, ``setmaxnreg``) only when every load in it is a
descriptor load and the loop body holds no tensor reduction: vmoe's in-register tile schedule
(``locate_tile``: sums over [E] tensors) fails the pass (``NVGPUWarpSpecialization``), in the loop
or in a loop before it (results/NOTES.md, session 7). So this prototype reads its tiles from a
schedule that :func:`vmoe.routing.tile_schedule` writes to memory first.

    PYTHONPATH=. python results/probe_ws.py [CONFIG_REGEX]
"""
from __future__ import annotations

import re
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from vmoe import bench
from vmoe import grouped_gemm as gg
from vmoe.routing import build_routing, tile_schedule

DEV, DT = "cuda", torch.bfloat16


@triton.jit
def ws_down(sched_ptr, a_ptr, b_ptr, c_ptr, cnt_ptr, off_ptr, rag_ptr, wid_ptr, woff_ptr, E, N,
            MAXT, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, E_PAD: tl.constexpr,
            WS: tl.constexpr, STORE_DESC: tl.constexpr):
    """ys[rows of e] = H_e @ W2_e (down_proj), tiles read from a schedule in memory ([MAXT, 3],
    -1 past the last tile)."""
    for t in tl.range(tl.program_id(0), MAXT, tl.num_programs(0), warp_specialize=WS):
        e = tl.load(sched_ptr + t * 3)
        if e >= 0:
            pm = tl.load(sched_ptr + t * 3 + 1)
            pn = tl.load(sched_ptr + t * 3 + 2)
            n_e = tl.load(cnt_ptr + e)
            off = tl.load(off_ptr + e)
            K = tl.multiple_of(tl.load(wid_ptr + e), 16)
            rag0 = tl.multiple_of(tl.load(rag_ptr + e), 16)
            o_col = tl.multiple_of(tl.load(woff_ptr + e).to(tl.int64), 16)
            a_desc = tl.make_tensor_descriptor(a_ptr + rag0, shape=[n_e, K], strides=[K, 1],
                                               block_shape=[BM, BK])
            b_desc = tl.make_tensor_descriptor(b_ptr + o_col * N, shape=[K, N], strides=[N, 1],
                                               block_shape=[BK, BN])
            acc = tl.zeros((BM, BN), tl.float32)
            for k0 in range(0, K, BK):
                acc = tl.dot(a_desc.load([pm * BM, k0]), b_desc.load([k0, pn * BN]), acc)
            if STORE_DESC:
                c_desc = tl.make_tensor_descriptor(c_ptr + off.to(tl.int64) * N, shape=[n_e, N],
                                                   strides=[N, 1], block_shape=[BM, BN])
                c_desc.store([pm * BM, pn * BN], acc.to(c_ptr.dtype.element_ty))
            else:
                o_m = pm * BM + tl.arange(0, BM)
                o_n = pn * BN + tl.arange(0, BN)
                tl.store(c_ptr + (off + o_m).to(tl.int64)[:, None] * N + o_n[None, :],
                         acc.to(c_ptr.dtype.element_ty),
                         mask=(o_m[:, None] < n_e) & (o_n[None, :] < N))


VARIANTS = ((True, 4, 3, False, 1), (True, 4, 4, False, 1), (True, 4, 3, True, 1),
            (True, 4, 4, True, 1), (True, 4, 3, False, 2), (False, 8, 4, False, 1),
            (False, 8, 4, True, 2))  # (WS, warps, stages, store by descriptor, programs per SM)


def probe(cfg, sms):
    inp = bench.make_inputs(cfg, DEV, DT, dense=False)
    r = build_routing(inp.ids, cfg.widths)
    h, _ = gg.up_proj(inp.x, inp.w1, r, cfg.activation, save_z=False)
    S = sum(n * f for n, f in zip(r.counts.tolist(), cfg.widths))  # host-ok: the probe's FLOPs
    flops = 2 * cfg.d * S
    ref = {}
    for mode in ("off", "only"):
        with gg.tma_mode(mode):
            ref[mode] = gg.down_proj(h, inp.w2, r)
            ms = do_bench(lambda: gg.down_proj(h, inp.w2, r))
            print(f"{cfg.name} down_proj tma={mode}: {ms:.4f} ms {flops / ms / 1e9:.0f} TFLOP/s",
                  flush=True)
    args = (r.counts, r.offsets, r.ragged_offsets, r.widths, gg.device_woffsets(cfg.widths, DEV))
    e_pad = triton.next_power_of_2(len(cfg.widths))
    for bm, bn in ((128, 128), (128, 256)):
        sched = tile_schedule(r, bm, bn, n_cols=cfg.d)
        ms_s = do_bench(lambda: tile_schedule(r, bm, bn, n_cols=cfg.d))
        for ws, nw, st, sd, per_sm in VARIANTS:
            out = torch.full_like(ref["off"], float("nan"))

            def run():
                ws_down[(per_sm * sms,)](sched, h, inp.w2, out, *args, len(cfg.widths), cfg.d,
                                         sched.shape[0], BM=bm, BN=bn, BK=64, E_PAD=e_pad, WS=ws,
                                         STORE_DESC=sd, num_warps=nw, num_stages=st)
            tag = f"  {bm}x{bn} ws={ws} warps={nw} stages={st} store_desc={sd} per_sm={per_sm}"
            try:
                run()
                same = torch.equal(out, ref["off"])
                ms = do_bench(run)
                print(f"{tag}: {ms:.4f} ms {flops / ms / 1e9:.0f} TFLOP/s "
                      f"(+ schedule {ms_s * 1e3:.1f} us) equal={same}", flush=True)
            except Exception as exc:  # noqa: BLE001 (a variant that fails to compile is a finding)
                print(f"{tag}: {type(exc).__name__} {str(exc).splitlines()[0][:120]}", flush=True)


def main():
    pat = sys.argv[1] if len(sys.argv) > 1 else "128x768-k8-relu2|64x1024-k8-swiglu"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gg._ensure_allocator()
    for cfg in bench.configs("large"):
        if re.search(pat, cfg.name):
            probe(cfg, sms)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
