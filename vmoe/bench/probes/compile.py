"""Compile vmoe's GEMM kernels for sm_90 on a machine with no GPU and report, per GEMM and
autotuning config, what the Hopper build holds: registers and spill bytes (Triton's own
``ptxas -v``), shared memory, copy-engine (``cp.async.bulk.tensor``) and ``cp.async`` copies,
``wgmma`` instructions, and whether Triton warp-specialized the kernel (``ttg.warp_specialize``
in TTGIR, ``setmaxnreg`` in PTX), or the compiler's first error line.

The register, spill and warp-specialization facts of results/NOTES.md ("Kernels") come from it.
It needs the device's Triton (3.6.0, which bundles ptxas) beside the CPU's own:

    pip install --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36:. python -m vmoe.bench.probes.compile [relu2|swiglu] [GEMM_REGEX]

The GEMMs are the six of ``expert_mlp`` (``ws_down_proj`` and ``ws_up_proj_bwd`` are the
warp-specialized kernel), at the large configs' specialization: bf16, every size and stride
divisible by 16, 128 experts.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vmoe.ops import grouped_gemm as gg

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
TARGET = GPUTarget("cuda", 90, 32)
# Integer arguments the launcher would specialize as divisible by 16 at the large configs.
DIVISIBLE = {"a_ptr", "b_ptr", "c_ptr", "z_ptr", "hw_ptr", "l_ptr", "r_ptr", "out_ptr", "K_FIXED",
             "N_FIXED", "K_MAX", "N_MAX", "M_FIXED", "M_MAX", "stride_am", "stride_be",
             "stride_bk", "stride_bn", "stride_cm", "stride_lm", "stride_rm", "stride_oe",
             "stride_om"}
ROUTING_PTRS = {"counts_ptr": "*i32", "offsets_ptr": "*i32", "ragged_offsets_ptr": "*i64",
                "widths_ptr": "*i32", "woffsets_ptr": "*i32", "sorted_to_assign_ptr": "*i32",
                "schedule_ptr": "*i32"}


def facts(fn, pointers: dict, constants: dict, num_warps: int, num_stages: int) -> str:
    """Compile ``fn`` (a JITFunction) with ``constants`` as constexprs, ``pointers`` typed, and
    every other argument an i32; return one line of facts or the error."""
    signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in fn.arg_names}
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE
             if n in signature and signature[n] != "constexpr"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    try:
        compiled = triton.compile(src, target=TARGET,
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as exc:  # noqa: BLE001 (a config that fails to compile is a finding)
        return f"FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return compiled_facts(compiled)


def compiled_facts(compiled) -> str:
    """One line of facts about a kernel compiled for sm_90 (``triton.compile``'s result)."""
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as fh:
        fh.write(ptx)
        fh.flush()
        report = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", fh.name, "-o", "/dev/null"],
                                capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", report)
    spills = re.findall(r"(\d+) bytes spill stores", report)
    return (f"regs {','.join(regs)} spill {','.join(spills)} smem {compiled.metadata.shared} "
            f"tma {ptx.count('cp.async.bulk.tensor')} "
            f"cp.async {ptx.count('cp.async.cg') + ptx.count('cp.async.ca')} "
            f"wgmma {ptx.count('wgmma.mma_async')} setmaxnreg {ptx.count('setmaxnreg')} "
            f"ws {compiled.asm['ttgir'].count('ttg.warp_specialize')}")


def gemms(activation: str) -> dict:
    """name -> (kernel, pointer types, constexprs, [(config kwargs, warps, stages)])."""
    g = 2 if activation == "swiglu" else 1
    act = gg.ACT_CODES[activation]
    bf16 = {n: "*bf16" for n in ("a_ptr", "b_ptr", "c_ptr", "z_ptr", "hw_ptr", "l_ptr", "r_ptr",
                                 "out_ptr")}
    pointers = {**ROUTING_PTRS, **bf16, "scale_ptr": "*fp32"}
    common = dict(KTOP=8, UPCAST=False, DOT_PREC="tf32", E_PAD=128, ALIGN=16, TMA_OK=gg.TMA_AUTO)
    # An absent operand is a None constexpr; a present one stays a typed pointer argument.
    absent = dict(z_ptr=None, scale_ptr=None, hw_ptr=None, HAS_Z=False, HAS_SCALE=False,
                  HAS_HW=False)
    rows = {
        "up_proj": dict(A_MODE=gg.GATHERED, C_MODE=gg.RAGGED, K_PER_WIDTH=0, N_PER_WIDTH=1,
                        EPI=gg.EPI_ACT, ACT=act, GATED=g == 2, G=g, B_TRANS=False,
                        scale_ptr=None, hw_ptr=None, HAS_Z=True, HAS_SCALE=False, HAS_HW=False),
        "down_proj": dict(A_MODE=gg.RAGGED, C_MODE=gg.SORTED, K_PER_WIDTH=1, N_PER_WIDTH=0,
                          EPI=gg.EPI_STORE, ACT=None, GATED=False, G=1, B_TRANS=False, **absent),
        "down_proj_bwd": dict(A_MODE=gg.GATHERED, C_MODE=gg.RAGGED, K_PER_WIDTH=0,
                              N_PER_WIDTH=1, EPI=gg.EPI_ACT_BWD, ACT=act, GATED=g == 2, G=g,
                              B_TRANS=True, HAS_Z=True, HAS_SCALE=True, HAS_HW=True),
        "up_proj_bwd": dict(A_MODE=gg.RAGGED, C_MODE=gg.SORTED, K_PER_WIDTH=g, N_PER_WIDTH=0,
                            EPI=gg.EPI_STORE, ACT=None, GATED=False, G=g, B_TRANS=True, **absent),
    }
    wgrads = {
        "w1_grad": dict(L_MODE=gg.GATHERED, R_MODE=gg.RAGGED, M_PER_WIDTH=0, N_PER_WIDTH=g, G=g,
                        HAS_SCALE=False, scale_ptr=None),
        "w2_grad": dict(L_MODE=gg.RAGGED, R_MODE=gg.GATHERED, M_PER_WIDTH=1, N_PER_WIDTH=0, G=1,
                        HAS_SCALE=False, scale_ptr=None),
    }

    def configs(table):
        return [(c.kwargs, c.num_warps, c.num_stages) for c in table]
    out = {}
    for name, spec in rows.items():
        out[name] = (gg._rows_kernel.fn.fn, pointers, {**common, **spec}, configs(gg.ROW_CONFIGS))
    for name, spec in wgrads.items():
        out[name] = (gg._wgrad_kernel.fn.fn, pointers, {**common, **spec},
                     configs(gg.WGRAD_CONFIGS))
    ws = dict(N_PER_WIDTH=0, UPCAST=False, DOT_PREC="tf32", ALIGN=16, BM=128, BN=256, BK=64,
              WS=True)
    out["ws_down_proj"] = (gg._rows_ws_kernel, pointers,
                           {**ws, "K_PER_WIDTH": 1, "G": 1, "B_TRANS": False}, [({}, 4, 3)])
    out["ws_up_proj_bwd"] = (gg._rows_ws_kernel, pointers,
                             {**ws, "K_PER_WIDTH": g, "G": g, "B_TRANS": True}, [({}, 4, 3)])
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    activation = argv[0] if argv else "relu2"
    pattern = argv[1] if len(argv) > 1 else "."
    print(f"triton {triton.__version__}, sm_90, {activation}")
    for name, (fn, pointers, constants, configs) in gemms(activation).items():
        if not re.search(pattern, name):
            continue
        for kwargs, warps, stages in configs:
            line = facts(fn, pointers, {**constants, **kwargs}, warps, stages)
            print(f"{name} {kwargs} warps={warps} stages={stages}: {line}", flush=True)


if __name__ == "__main__":
    main()
