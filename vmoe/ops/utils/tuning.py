"""Autotuning that a machine pays for once, not once per process.

A fresh layer's first training step autotunes six row GEMMs and two weight-gradient GEMMs, each over
up to 14 candidate configs: Triton compiles every candidate, then times each with ``do_bench``'s
25 ms of warm-up and 100 ms of repetitions. Compiled kernels persist in Triton's cache directory,
but by default the autotuner keeps its choice in memory only, so every new process would time
every candidate again (9.0 s of a warm process's first step on an H100, results/NOTES.md, "The
first step and a new token count"). :func:`autotune` changes two things and leaves the choice
itself to Triton's :class:`~triton.runtime.autotuner.Autotuner`:

- **Results on disk.** ``cache_results=True``: the timings of each tuning key are stored in Triton's
  cache directory (``TRITON_CACHE_DIR``, default ``~/.triton/cache``) beside the compiled kernels,
  keyed by Triton's version, the GPU target (architecture and ptxas: an H100 and an H200 share
  them), the kernel's source, the key and the candidates. A second process reads the choice and
  loads one compiled config instead of tuning.
- **Shorter timing.** Each candidate runs for ``VMOE_TUNE_REP`` ms (25 by default, against
  ``do_bench``'s 100) and never more than ``VMOE_TUNE_MAX_REPS`` times (:data:`MAX_REPS`, 100):
  the candidates differ by far more than the spread of that many runs, and a run of a small
  kernel costs more in L2 flush than in the kernel.

On a cold cache, a layer's first call compiles every candidate before any is timed, in worker
processes (:mod:`vmoe.ops.utils.precompile`). Under the interpreter there is one config and
nothing is tuned or cached.
"""
from __future__ import annotations

import torch
import triton

from vmoe.ops.utils.device import env_int, interpreting

TUNE_REP_MS = env_int("VMOE_TUNE_REP", 25)


# A candidate is timed over at most this many runs (and at least MIN_REPS): the median of 100 runs
# ranks configs that differ by a few percent, and a run of a microsecond kernel costs about 0.1 ms
# of L2 flush, so a time budget alone (do_bench's) spends 25 ms on some 200 runs of each.
MAX_REPS = env_int("VMOE_TUNE_MAX_REPS", 100)
MIN_REPS = 5


def _driver():
    return triton.runtime.driver.active


def _bench(fn, quantiles):
    """``do_bench``'s measurement (the L2 flushed before each run, a pair of events around each)
    over ``clamp(VMOE_TUNE_REP / estimate, MIN_REPS, MAX_REPS)`` runs after a fifth as many
    warm-up runs; the quantiles of the run times in ms. Under the interpreter, ``do_bench``
    itself."""
    if interpreting():
        return triton.testing.do_bench(fn, warmup=max(1, TUNE_REP_MS // 5), rep=TUNE_REP_MS,
                                       quantiles=quantiles)
    driver = _driver()
    cache = driver.get_empty_cache_for_benchmark()

    def timed(n):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for start, end in zip(starts, ends):
            driver.clear_cache(cache)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()  # host-ok: the timer
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]

    fn()  # the first run loads the kernel
    estimate = max(sum(timed(3)) / 3, 1e-4)
    n = int(min(MAX_REPS, max(MIN_REPS, TUNE_REP_MS / estimate)))  # host-ok: host floats
    for _ in range(max(1, n // 5)):
        fn()
    times = torch.tensor(timed(n))  # host floats: a CPU tensor
    return torch.quantile(times, torch.tensor(quantiles, dtype=times.dtype)).tolist()  # host-ok: CPU


def autotune(configs, key, prune):
    """``triton.autotune(configs, key, prune_configs_by={"early_config_prune": prune})`` with its
    results cached on disk and shorter timings (see the module docstring)."""
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           do_bench=_bench, cache_results=not interpreting())
