"""Validate every kernel against the naive loop on whatever device is present; print a table.

Run as ``python -m vmoe.validate``. Without a GPU the kernels run in the Triton interpreter on
small problems; with one, on CUDA at larger sizes. Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import sys

import torch

from vmoe import reference
from vmoe.autograd import expert_mlp
from vmoe.config import ACTIVATIONS, gate_factor
from vmoe.ops.gather_scatter import combine, gather
from vmoe.ops.grouped_gemm import down_proj, up_proj
from vmoe.ops.routing import build_routing
from vmoe.ops.utils.device import reexec_with_interpreter
from vmoe.testing import make_inputs, rel_err, tolerance


def _ragged_to_dense(flat, routing, cols_per_width):
    """Stack the ragged [n_e, g*f_e] blocks into sorted-row order, zero-padded, for comparison."""
    counts = routing.counts.tolist()  # host-ok: validation only
    starts = routing.ragged_offsets.tolist()  # host-ok: validation only
    width = cols_per_width * max(routing.expert_widths)
    out = torch.zeros(sum(counts), width, dtype=flat.dtype, device=flat.device)
    row = 0
    for e, (n, f) in enumerate(zip(counts, routing.expert_widths)):
        c = cols_per_width * f
        s = cols_per_width * starts[e]
        out[row:row + n, :c] = flat[s:s + n * c].view(n, c)
        row += n
    return out


def validate_case(T, d, k, widths, activation, dtype, device, gen):
    """Rows (kernel, rel_err, tol) for one problem."""
    E, g, tol = len(widths), gate_factor(activation), tolerance(dtype)
    x, ids, w, w1, w2 = make_inputs(T, d, widths, k, activation, dtype, device, generator=gen)
    rows = []
    r = build_routing(ids, tuple(widths))
    counts, offsets, s2a, a2s = reference.routing(ids, E)
    same = (torch.equal(r.counts.long(), counts) and torch.equal(r.offsets.long(), offsets)
            and torch.equal(r.sorted_to_assign.long(), s2a)
            and torch.equal(r.assign_to_sorted.long(), a2s))
    rows.append(("routing", 0.0 if same else float("inf"), 0.0))
    x64, w64, w1_64, w2_64 = (t.double() for t in (x, w, w1, w2))
    xs = gather(x, r)
    rows.append(("gather", rel_err(xs, reference.gather(x64, s2a // k)), 0.0))
    # The up projection per expert, in float64, in sorted-row order.
    h_ref, z_ref, ys_ref = [], [], []
    o = 0
    xs64 = xs.double()
    for e, f in enumerate(widths):
        rows_e = xs64[offsets[e]:offsets[e + 1]]
        z_e = rows_e @ w1_64[:, g * o:g * (o + f)]
        h_e = reference.act(z_e, activation)
        z_ref.append(torch.nn.functional.pad(z_e, (0, g * (max(widths) - f))))
        h_ref.append(torch.nn.functional.pad(h_e, (0, max(widths) - f)))
        ys_ref.append(h_e @ w2_64[o:o + f])
        o += f
    h, z = up_proj(x, w1, r, activation)
    rows.append(("up_proj z", rel_err(_ragged_to_dense(z, r, g), torch.cat(z_ref)), tol))
    rows.append(("up_proj h", rel_err(_ragged_to_dense(h, r, 1), torch.cat(h_ref)), tol))
    ys = down_proj(h, w2, r)
    rows.append(("down_proj", rel_err(ys, torch.cat(ys_ref)), tol))
    rows.append(("combine", rel_err(combine(ys, r, w.reshape(-1)),
                                    reference.combine(ys.double(), a2s, w64, k)), tol))
    leaves = [t.clone().requires_grad_() for t in (x, w, w1, w2)]
    y = expert_mlp(leaves[0], ids, leaves[1], leaves[2], leaves[3], widths, activation)
    dy = torch.randn(y.shape, generator=gen).to(device, dtype)
    y.backward(dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, w1, w2)]
    y64 = reference.expert_mlp(leaves64[0], ids, leaves64[1], leaves64[2], leaves64[3], widths,
                               activation)
    y64.backward(dy.double())
    rows.append(("expert_mlp y", rel_err(y, y64), tol))
    for name, a, b in zip(("dx", "dw", "dw1", "dw2"), leaves, leaves64):
        rows.append((f"expert_mlp {name}", rel_err(a.grad, b.grad), tol))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    reexec_with_interpreter("vmoe.validate", argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        cases = [(512, 256, 2, [512] * 4 + [256] * 8 + [128] * 4),
                 (300, 192, 4, [1, 7, 33, 100, 256, 64])]
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
    else:
        cases = [(12, 24, 2, [7, 33, 1, 20])]
        dtypes = [torch.float32, torch.bfloat16]
    gen = torch.Generator().manual_seed(0)
    print(f"device: {torch.cuda.get_device_name(device) if on_gpu else 'cpu (Triton interpreter)'}")
    print(f"{'case':<34} {'act':<7} {'dtype':<9} {'kernel':<16} {'rel err':>9}  result")
    failures = 0
    for T, d, k, widths in cases:
        tag = f"T{T}-d{d}-k{k}-E{len(widths)}-F{sum(widths)}"
        for activation in ACTIVATIONS:
            for dtype in dtypes:
                for kernel, err, tol in validate_case(T, d, k, widths, activation, dtype, device, gen):
                    ok = err <= tol
                    failures += not ok
                    print(f"{tag:<34} {activation:<7} {str(dtype)[6:]:<9} {kernel:<16} "
                          f"{err:9.1e}  {'PASS' if ok else 'FAIL'}")
    print(f"{failures} failed" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
