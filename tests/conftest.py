"""Shared set-up for the vmoe tests: the device, seeding, problem builders and the dtype-aware check.

Without a GPU the kernels run in the Triton interpreter on CPU tensors. Triton decides at
decoration time whether a kernel is interpreted, so TRITON_INTERPRET must be set here, before any
test module imports triton or vmoe. VMOE_POISON=1 makes every kernel output start as NaN (-1 for
ints), so an element a kernel forgot to write fails the comparison instead of passing by luck.
"""
from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["VMOE_POISON"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

# ||out - ref|| / ||ref|| against a float64 oracle. vmoe computes fp32 with ieee dots unless torch's
# allow_tf32 is on, so fp32 is held to 1e-5; bf16 storage of the intermediates compounds, hence 4e-2.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed from a stable hash of the test id: reruns reproduce, and each case gets its own inputs."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return seed


def sizes(cpu, gpu):
    """The interpreter size or the GPU size of a problem."""
    return gpu if ON_GPU else cpu


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol=None):
    """Relative-error check in float64, with a dtype-dependent tolerance; NaN anywhere fails.

    When ref is exactly zero the relative error is meaningless, so out must be exactly zero too.
    """
    tol = TOL[dtype] if tol is None else tol
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    n_nan = int(torch.isnan(out).sum())
    assert n_nan == 0, f"{name}: {n_nan} NaN element(s) of {out.numel()} (unwritten or overflowed)"
    if out.numel() == 0:
        return
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    max_abs = float((o - r).abs().max())
    if float(r.norm()) == 0.0:
        assert max_abs == 0.0, f"{name}: reference is all zero but max abs diff is {max_abs:.3e}"
        return
    err = rel_err(o, r)
    assert err <= tol, (f"{name} ({DTYPE_IDS.get(dtype, dtype)}): rel err {err:.3e} > tol {tol:.0e}, "
                        f"max abs diff {max_abs:.3e}")


def case_id(T, d, widths, k, *extra) -> str:
    """Readable ids like ``T7-d40-w[7,33,100]-k2``."""
    parts = [f"T{T}", f"d{d}", "w[" + ",".join(str(w) for w in widths) + "]", f"k{k}"]
    return "-".join(parts + [str(e) for e in extra])


def random_ids(T: int, E: int, k: int, device=DEVICE) -> torch.Tensor:
    """[T, k] int64 ids, each row k distinct experts (what a top-k router produces)."""
    if T == 0:
        return torch.zeros(0, k, dtype=torch.long, device=device)
    return torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(device)


def make_inputs(T, d, widths, k, activation="relu2", dtype=torch.float32, device=DEVICE, ids=None):
    """x [T, d], topk_ids [T, k], topk_weights [T, k], w1 [d, g*F], w2 [F, d], scaled so that the
    output has O(1) entries whatever d and f_e are. Leaf tensors, not requiring grad."""
    from vmoe.config import gate_factor

    E, F, g = len(widths), sum(widths), gate_factor(activation)
    x = torch.randn(T, d)
    if ids is None:
        ids = random_ids(T, E, k, "cpu")
    weights = torch.rand(ids.shape) + 0.1
    w1 = torch.randn(d, g * F) / d ** 0.5
    w2 = torch.cat([torch.randn(f, d) / f ** 0.5 for f in widths])
    return (x.to(device, dtype), ids.to(device), weights.to(device, dtype), w1.to(device, dtype),
            w2.to(device, dtype))
