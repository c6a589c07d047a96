"""The first step of a fresh layer: every kernel it needs compiled at once, in worker processes.

On a cold Triton cache a layer's first forward and backward compile each kernel the moment it is
first launched, one after another: the seven forward and eleven backward launches, and for each
autotuned GEMM every candidate config before timing them (79 compiles, 46.7 s of a 52.2 s first
step on an H100; 7.0 s with this module: results/NOTES.md, "The first step and a new token
count"). A compile holds the GIL for most of its time, so threads do not overlap them; processes
do.

:func:`precompile` takes a step (a callable that runs the layer's forward and backward) and:

1. **Records** it: runs the step with every vmoe launch turned into a warm-up
   (:func:`vmoe.ops.utils.launch.dry_launches`) and Triton's ``jit_cache_hook`` set, so that each
   kernel (and, for a tuning miss, each candidate config) that would be compiled is recorded and
   skipped. No vmoe kernel is launched (torch's own operations in the step, such as the router's
   GEMM, run on whatever the tensors hold); the outputs are never read (vmoe's launches size their
   grids from host values only, so a step on uninitialised tensors takes the same path), and the
   gradients are returned, not accumulated, by the step the layer builds.
2. **Compiles** the recorded kernels in ``VMOE_PRECOMPILE_WORKERS`` forked processes into Triton's
   cache directory, and builds each one's C launcher there too (Triton builds those with the
   host's C compiler at a kernel's first launch). A worker only compiles: the target is fixed in
   the parent, and neither step touches a CUDA context (Triton loads a binary on the GPU at its
   first launch).
3. The real step then runs as always, and each compile it asks for is a load from the disk cache.

A worker that fails or runs past ``TIMEOUT_S`` is left behind: its kernels compile in the real
step, in-process, as they would without precompiling, so the worst case costs time, never results.
Off under the interpreter, without ``os.fork`` (not Linux), with a Triton older than 3.4 (no
``jit_cache_hook`` knob or asynchronous compile mode), with ``VMOE_PRECOMPILE_WORKERS=0`` or 1, and
while ``torch.compile`` traces or a CUDA graph captures.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import sys
import time
import warnings
from concurrent.futures import Executor, Future

import torch

from vmoe.ops.utils import launch as launch_mod
from vmoe.ops.utils.device import env_int, interpreting


def _workers_from_env() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return env_int("VMOE_PRECOMPILE_WORKERS", min(cores, 16), minimum=0)


WORKERS = _workers_from_env()
# A worker past this is killed; its kernels compile in-process in the real step.
TIMEOUT_S = 300.0


def _triton_supports() -> bool:
    """Whether this Triton has what the recording and the workers use: the ``jit_cache_hook``
    knob and the asynchronous compile mode (Triton 3.4 on)."""
    try:
        from triton import knobs
        from triton.runtime._async_compile import AsyncCompileMode  # noqa: F401
    except ImportError:
        return False
    return hasattr(knobs.runtime, "jit_cache_hook")


_SUPPORTED = _triton_supports()


def enabled() -> bool:
    """Whether :func:`precompile` forks workers here (see the module docstring)."""
    return WORKERS > 1 and _SUPPORTED and hasattr(os, "fork") and not interpreting()


def applicable(x: torch.Tensor) -> bool:
    """Whether a layer call on ``x`` may precompile: enabled, on a GPU, outside a torch.compile
    trace, a CUDA graph capture and another precompile's recording."""
    return (enabled() and x.is_cuda and not torch.compiler.is_compiling()
            and not launch_mod.dry() and not torch.cuda.is_current_stream_capturing())


def run_in_workers(jobs: list, workers: int, timeout_s: float = TIMEOUT_S) -> int:
    """Run each callable of ``jobs`` once, spread over ``workers`` forked processes that take the
    next job as they finish one. Returns how many workers exited cleanly; a job's exception
    ends nothing but that job (its worker exits 1 at the end), and workers still running after
    ``timeout_s`` are killed. The parent runs none of the jobs."""
    if not jobs:
        return 0
    workers = max(1, min(workers, len(jobs)))
    read_fd, write_fd = os.pipe()
    # Job indices as 4-byte records: a read of 4 bytes from a pipe is atomic, so two workers
    # never take the same job. The whole queue is written before any worker starts.
    os.write(write_fd, b"".join(struct.pack("<i", i) for i in range(len(jobs))))
    os.close(write_fd)
    pids = []
    with warnings.catch_warnings():
        # Python 3.12 warns that forking a threaded process may deadlock the child; a worker
        # takes no lock another thread could hold but the interpreter's own, and the timeout
        # bounds what a stuck worker costs.
        warnings.simplefilter("ignore", DeprecationWarning)
        for _ in range(workers):
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the worker
                code = 0
                try:
                    while len(record := os.read(read_fd, 4)) == 4:
                        try:
                            jobs[struct.unpack("<i", record)[0]]()
                        except Exception:  # the real step compiles it again and reports it
                            code = 1
                finally:
                    os._exit(code)  # no atexit handlers: they belong to the parent
            pids.append(pid)
    os.close(read_fd)
    clean, deadline = 0, time.monotonic() + timeout_s
    pending = set(pids)
    while pending:
        for pid in list(pending):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pending.discard(pid)
                clean += os.waitstatus_to_exitcode(status) == 0
        if pending and time.monotonic() > deadline:
            for pid in pending:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            break
        if pending:
            time.sleep(0.005)
    return clean


def _build_launcher(kernel) -> None:
    """Build (into the disk cache) the C launcher that Triton otherwise builds with the host's C
    compiler at a kernel's first launch: a third of a cold first step's time once the kernels
    themselves compile in parallel (results/NOTES.md). It loads no binary on the GPU."""
    from triton.runtime.driver import driver

    driver.active.launcher_cls(kernel.src, kernel.metadata)


class _Collect(Executor):
    """An executor for Triton's asynchronous compile mode that runs nothing: it keeps each
    compile callable, followed by its launcher's build, for :func:`run_in_workers`."""

    def __init__(self):
        self.jobs: list = []
        self.futures: list[Future] = []

    def submit(self, fn, /, *args, **kwargs):
        self.jobs.append(lambda: _build_launcher(fn(*args, **kwargs)))
        future = Future()
        self.futures.append(future)
        return future


class _Compiled(Exception):
    """What the parent's futures resolve to: the binary is in the disk cache, not in memory."""


@contextlib.contextmanager
def _recording(records: dict):
    """Triton's ``jit_cache_hook`` set to record each vmoe kernel that a thread in
    :class:`~vmoe.ops.utils.launch.dry_launches` would compile (its specialization, as
    ``JITFunction.preload`` reads it) and skip it: the recording thread's, and the autograd
    thread's that runs the dry step's CUDA backward. The hook is global: any other compile passes
    through to the hook that was there before, or compiles."""
    from triton import knobs

    previous = knobs.runtime.jit_cache_hook

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        if not launch_mod.dry() or not fn.module.startswith("vmoe."):
            return previous(key=key, repr=repr, fn=fn, compile=compile,
                            is_manual_warmup=is_manual_warmup,
                            already_compiled=already_compiled) if previous else None
        records.setdefault(compile["specialization_data"], fn.jit_function)
        return True  # skip the compile: the workers do it

    knobs.runtime.jit_cache_hook = hook
    try:
        yield hook
    finally:
        knobs.runtime.jit_cache_hook = previous


def record(step) -> dict:
    """``{specialization_data: JITFunction}``: what ``step()`` would compile, found by running it
    with launches turned into warm-ups (nothing runs on the GPU)."""
    records: dict = {}
    with _recording(records), launch_mod.dry_launches():
        step()
    return records


def _cost(item) -> tuple:
    """A guess at how long a recorded kernel takes to compile, for longest-first order (which
    shortens the last worker's tail): a longer source, then more warps and stages."""
    data, fn = item
    options = json.loads(data)["options"]
    return (len(fn.src), options.get("num_warps", 4) * options.get("num_stages", 1))


# One entry per precompile of this process: {"kernels", "record_s", "compile_s", "workers_ok"}.
HISTORY: list[dict] = []


def precompile(step, workers: int | None = None) -> dict:
    """Compile what ``step()`` would compile, in ``workers`` processes (default
    ``VMOE_PRECOMPILE_WORKERS``), into Triton's disk cache. Returns (and appends to
    :data:`HISTORY`) ``{"kernels": how many were recorded, "record_s", "compile_s": wall times,
    "workers_ok": workers that exited cleanly}``. ``step`` must be safe to run on uninitialised
    data: it reads no tensor on the host and changes no state (see the module docstring)."""
    from triton.runtime._async_compile import AsyncCompileMode

    t = time.perf_counter()
    workers = WORKERS if workers is None else workers
    records = sorted(record(step).items(), key=_cost, reverse=True)
    t_record = time.perf_counter() - t
    collect = _Collect()
    # preload rebuilds each compile as the launch would have made it; in the asynchronous
    # compile mode it hands the compile to the executor instead of running it.
    with AsyncCompileMode(collect, ignore_errors=True):
        for data, fn in records:
            fn.preload(data)
        ok = run_in_workers(collect.jobs, workers)
        # Nothing goes into the kernels' in-memory caches: the real step loads from disk what
        # it launches, and the candidates a cached tuning result makes unnecessary stay there.
        for future in collect.futures:
            future.set_exception(_Compiled())
    stats = {"kernels": len(records), "record_s": t_record,
             "compile_s": time.perf_counter() - t - t_record, "workers_ok": ok}
    HISTORY.append(stats)
    return stats


def signature(t: torch.Tensor, rows: bool = False) -> tuple:
    """What of a tensor can change the kernels a call compiles: dtype, device, shape (without the
    first dimension when ``rows``: the token count, which no kernel specializes on), strides
    (Triton specializes on a stride of 1 and on multiples of 16) and whether it requires grad."""
    return (t.dtype, t.device, tuple(t.shape[1:] if rows else t.shape), t.stride(), t.requires_grad)


def _float_tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() and out.requires_grad else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _float_tensors(o)]
    return []


_DONE: set = set()
_WARNED = [False]


def first_call(key: tuple, fn, inputs: tuple, params=()) -> None:
    """Before the first call with ``key``: precompile ``fn(*inputs)``'s forward and, where grad
    mode is on and something requires grad, its backward (the gradient of the sum of its
    floating-point outputs toward ``inputs`` and ``params``, returned and dropped: no ``.grad``
    changes). The key also holds grad mode and the autocast dtype. Callers check
    :func:`applicable` first. A failure warns once and leaves the kernels to compile as they
    launch."""
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    grad = torch.is_grad_enabled()
    key = (*key, grad, autocast)
    if key in _DONE:
        return
    _DONE.add(key)

    def step():
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        out = fn(*leaves)
        wrt = [t for t in (*leaves, *params) if t.requires_grad]
        loss = [t.float().sum() for t in _float_tensors(out)]
        if grad and wrt and loss:
            torch.autograd.grad(sum(loss), wrt, allow_unused=True)

    try:
        precompile(step)
    except Exception as e:  # a Triton without the hooks this uses, say: compile as usual
        if not _WARNED[0]:
            _WARNED[0] = True
            warnings.warn(f"vmoe: precompiling in worker processes failed ({e!r}); kernels "
                          "compile as they launch. VMOE_PRECOMPILE_WORKERS=0 turns it off.",
                          stacklevel=3)
