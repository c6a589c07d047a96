"""Small helpers shared by the launchers: allocation, interpreter detection, problem-size limits."""
from __future__ import annotations

import os
import threading

import torch

INT32_MAX = 2**31 - 1


# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when vmoe is imported, so the value
# at import is the one that holds. A constant also keeps torch.compile from tracing os.environ.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETING


# Read once, at import, like TRITON_INTERPRET: an os.environ lookup per allocation cost about 1 µs,
# some 20-30 times per layer training step.
_POISONING = os.environ.get("VMOE_POISON", "0") not in ("", "0")


def poisoning() -> bool:
    """VMOE_POISON=1 (at import) fills fresh kernel outputs with NaN (floats) or -1 (ints), so a
    test catches any element a kernel forgot to write. Off by default: it costs a fill per
    allocation. Tests that must not count those fills patch ``vmoe.ops.utils.device._POISONING``."""
    return _POISONING


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """The integer in environment variable ``name`` (``default`` when unset or empty), or a
    ValueError that names the variable."""
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)  # host-ok: an environment string, not a tensor
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def checking() -> bool:
    """VMOE_CHECK=1 validates expert-id values, which costs a host synchronization."""
    return os.environ.get("VMOE_CHECK", "0") not in ("", "0")


def new_empty(shape, dtype, device) -> torch.Tensor:
    """torch.empty, or a poisoned tensor under VMOE_POISON=1."""
    if not poisoning():
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1). Plain Python: ``triton.next_power_of_2`` and
    ``triton.cdiv`` are constexpr functions whose host-side wrapper costs ~3.5 µs a call (Triton 3.8)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints (see :func:`next_pow2` for why not ``triton.cdiv``)."""
    return -(-a // b)


def dot_dtype_flag(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast tiles to fp32 before tl.dot: the interpreter's bf16 dot is wrong."""
    return interpreting() and dtype == torch.bfloat16


def check_triton_device(t: torch.Tensor, name: str = "x") -> None:
    if t.device.type == "cpu" and not interpreting():
        raise RuntimeError(f"{name} is on the CPU: the Triton kernels need a CUDA tensor, or "
                           "TRITON_INTERPRET=1 set before vmoe is imported; or use impl='reference'")


def reexec_with_interpreter(module: str, argv) -> None:
    """Re-run ``python -m module argv`` with TRITON_INTERPRET=1 when there is no GPU.

    Triton decides at decoration time whether a kernel is interpreted, so the variable must be set
    before vmoe is imported; a command-line entry point is already too late, hence the re-exec.
    """
    import sys

    if torch.cuda.is_available() or interpreting():
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


_DEVICE_INTS: dict = {}


def device_ints(values: tuple, device, dtype=torch.int32) -> torch.Tensor:
    """A tuple of host ints as a tensor on ``device``, cached: steady-state calls copy nothing
    (and a CUDA graph can capture a call that uses it, once it has been made outside the capture)."""
    key = (tuple(values), str(device), dtype)
    t = _DEVICE_INTS.get(key)
    if t is None:
        t = _make_ints(key[0], torch.device(device), dtype)
        _DEVICE_INTS[key] = t
    return t


def _make_ints(values: tuple, device: torch.device, dtype) -> torch.Tensor:
    if device.type != "cuda":
        return _new_ints(values, device, dtype)
    # CUDA graph trees (torch.compile's reduce-overhead) send every allocation of the thread that
    # warms up or records a graph to their private pool, and refuse to replay while a tensor there
    # is alive but not one of the graph's outputs: a cache entry first made inside a compiled step
    # (a run resumed from a checkpoint, with no eager call before it) would be one. A helper
    # thread allocates from the ordinary pool. Its copy is synchronous (pageable host memory), so
    # the values are on the device when the thread ends.
    made: list = []

    def make():
        try:
            made.append(_new_ints(values, device, dtype))
        except BaseException as exc:  # re-raised in the caller's thread
            made.append(exc)

    worker = threading.Thread(target=make, name="vmoe-device-ints")
    worker.start()
    worker.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def _new_ints(values: tuple, device: torch.device, dtype) -> torch.Tensor:
    # Outside any torch.func transform: under one, a new tensor would be a wrapper tied to that
    # transform's level, and the cache would hand it to every later call.
    with torch._C._DisableFuncTorch():
        return torch.tensor(values, dtype=dtype, device=device)
