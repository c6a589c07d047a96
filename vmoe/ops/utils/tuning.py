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
- **Shorter timing.** ``VMOE_TUNE_REP`` ms of repetitions after a fifth of that of warm-up (25 ms
  by default, against ``do_bench``'s 100): the candidates differ by far more than the spread of
  25 ms of repetitions of a kernel that runs microseconds to milliseconds.

What it does not change: a cold cache still compiles every candidate, one after another. Handing
them to Triton's asynchronous compile mode on a thread pool saved nothing measurable (the compile
holds the GIL for most of its time); a process pool would need each worker to rebuild the launch's
arguments. Under the interpreter there is one config and nothing is tuned or cached.
"""
from __future__ import annotations

import os

import triton

from vmoe.ops.utils.device import interpreting


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)  # host-ok: an environment string, not a tensor
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


TUNE_REP_MS = _env_int("VMOE_TUNE_REP", 25)


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=max(1, TUNE_REP_MS // 5), rep=TUNE_REP_MS,
                                   quantiles=quantiles)


def autotune(configs, key, prune):
    """``triton.autotune(configs, key, prune_configs_by={"early_config_prune": prune})`` with its
    results cached on disk and shorter timings (see the module docstring)."""
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           do_bench=_bench, cache_results=not interpreting())
