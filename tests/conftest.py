"""Set-up shared by the vmoe tests: the interpreter, poisoning, seeding and the device fixture.

Without a GPU the kernels run in the Triton interpreter on CPU tensors. Triton decides at
decoration time whether a kernel is interpreted, so TRITON_INTERPRET must be set here, before any
test module imports triton or vmoe. VMOE_POISON=1 makes every kernel output start as NaN (-1 for
ints), so an element a kernel forgot to write fails the comparison instead of passing by luck.

The helpers (tolerances, assert_close, problem builders, DEVICE, sizes) live in vmoe.testing, which
the validation command and the notebooks share; test modules import them from there.
"""
from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["VMOE_POISON"] = "1"

import pytest  # noqa: E402

from vmoe.testing import DEVICE  # noqa: E402  (after the environment above)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed from a stable hash of the test id: reruns reproduce, and each case gets its own inputs."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def gemm_launches(monkeypatch):
    """Every launch of a grouped-GEMM kernel while the test runs: (kernel, the TMA_OK code it was
    given)."""
    from vmoe.ops import grouped_gemm as gg

    seen = []
    real = gg.launch

    def spy(kernel, grid, *args, **kwargs):
        seen.append((kernel, kwargs.get("TMA_OK")))
        return real(kernel, grid, *args, **kwargs)
    monkeypatch.setattr(gg, "launch", spy)
    return seen
