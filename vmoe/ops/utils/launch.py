"""Kernel launches that go straight to the compiled kernel after the first call with the same key.

``kernel[grid](...)`` costs host time on every call: Triton binds the arguments, computes their
specialization (alignment, ``== 1``, dtypes), evaluates the heuristics, looks up the autotuner's
key and the JIT cache, and builds launch metadata; only then does its C launcher run. A vmoe
launch is fixed by its host values (sizes, strides, flags) and its tensors' dtypes and 16-byte
alignment, so :func:`launch` makes that walk once per such key, keeps the compiled kernel and the
full argument list (heuristic values, the chosen config, defaults), and afterwards calls the
compiled kernel's launcher with the new tensors put in their slots.

The key holds every non-tensor argument by value and every tensor as (dtype, pointer % 16):
exactly what Triton specializes on, or more. A callable grid is evaluated on every call (with the
first call's arguments as ``meta``; vmoe's grids read only host values and the config), because it
may depend on host values that are not kernel arguments.

The direct path is off under the interpreter, when a Triton launch hook is set (a profiler such as
proton wants to see every launch), and with ``VMOE_DIRECT_LAUNCH=0`` at import.
"""
from __future__ import annotations

import inspect
import os
import threading

import torch
from triton import knobs
from triton.runtime.autotuner import Autotuner, Heuristics

from vmoe.ops.utils.device import interpreting

_ENABLED = os.environ.get("VMOE_DIRECT_LAUNCH", "1") not in ("", "0") and not interpreting()
# A program that launched with ever-new host values (say, one float per step) would grow the cache
# without bound; past this many keys it starts over.
_MAX_ENTRIES = 4096
_CACHE: dict = {}
# Kernels whose wrappers this module cannot replay (say, a config with a pre_hook): always Triton's
# path.
_UNSUPPORTED = object()
# Inside :func:`dry_launches`, on its thread only: every launch is a warm-up (see
# :mod:`vmoe.ops.utils.precompile`). Per thread, because another thread's launches (nn.DataParallel
# runs replicas in threads) must run meanwhile.
_THREAD = threading.local()


def dry() -> bool:
    """Whether this thread is inside :class:`dry_launches`."""
    return getattr(_THREAD, "dry", False)


class _Direct:
    """One key's compiled kernel and its argument list, with the slots that take tensors."""

    __slots__ = ("run", "function", "packed", "template", "slots", "meta")

    def __init__(self, compiled, template: list, slots: tuple, meta: dict):
        self.run = compiled.run
        self.function = compiled.function
        self.packed = compiled.packed_metadata
        self.template = template
        self.slots = slots
        self.meta = meta

    def arguments(self, values: tuple) -> list:
        """The launcher's argument list for a call with this key, from the call's ``values``
        (positional, then keyword): the first call's list, with this call's tensors in their
        slots."""
        full = self.template.copy()
        for slot, i in self.slots:
            full[slot] = values[i]
        return full


def add_heuristics(heuristics: Heuristics, args: tuple, named: dict) -> None:
    """Put the values of ``heuristics`` into ``named`` as ``Heuristics.run`` does: in order, each
    seeing the positional ``args`` and the values before it."""
    positional = dict(zip(heuristics.arg_names, args))
    for name, heur in heuristics.values.items():
        named[name] = heur({**positional, **named})


def bound_arguments(kernel, args: tuple, kwargs: dict):
    """``(jit_function, {name: value})``: every parameter of ``kernel``'s innermost JITFunction
    (or the interpreter's function), in order, as Triton's own launch just bound them: positional
    and keyword arguments, the heuristics' values, the autotuner's last chosen config, then
    defaults. None when a wrapper is not one this module replays."""
    named = dict(kwargs)
    fn = kernel
    while isinstance(fn, (Heuristics, Autotuner)):
        if isinstance(fn, Heuristics):
            add_heuristics(fn, args, named)
        elif isinstance(fn, Autotuner):
            config = getattr(fn, "best_config", None)
            if config is None or config.pre_hook is not None:
                return None
            named.update(config.kwargs)
        fn = fn.fn
    if not hasattr(fn, "arg_names"):
        return None
    names = fn.arg_names
    if len(args) > len(names):
        return None
    bound = dict(zip(names, args))
    params = inspect.signature(fn.fn).parameters
    for name in names[len(args):]:
        if name in named:
            bound[name] = named[name]
        elif params[name].default is not params[name].empty:
            bound[name] = params[name].default
        else:
            return None
    return fn, bound


def launch_key(kernel, values: tuple, names: tuple, device: int) -> tuple:
    """What fixes a launch: the kernel, the device, the keyword ``names``, every host value of
    ``values`` (positional, then keyword arguments), and each tensor's dtype and pointer % 16."""
    return (kernel, device, names,
            *[(v.dtype, v.data_ptr() & 15) if isinstance(v, torch.Tensor) else v for v in values])


def direct_entry(kernel, compiled, args: tuple, kwargs: dict):
    if compiled is None or not hasattr(compiled, "packed_metadata"):
        return _UNSUPPORTED
    found = bound_arguments(kernel, args, kwargs)
    if found is None:
        return _UNSUPPORTED
    fn, bound = found
    names = list(bound)
    position = {name: i for i, name in enumerate(names)}
    values = (*args, *kwargs.values())
    callers = (*fn.arg_names[:len(args)], *kwargs)
    slots = tuple((position[name], i) for i, name in enumerate(callers)
                  if isinstance(values[i], torch.Tensor))
    # Keep no tensor of the first call: it would live as long as the cache (under CUDA graph trees,
    # an allocation of the graph pool that no output tracks, which they refuse).
    bound = {name: None if isinstance(v, torch.Tensor) else v for name, v in bound.items()}
    return _Direct(compiled, list(bound.values()), slots, bound)


def _hooked() -> bool:
    """Whether a Triton launch hook is set. Since Triton 3.5 the knob is a HookChain, never None,
    and empty until something adds a hook."""
    hook = knobs.runtime.launch_enter_hook
    calls = getattr(hook, "calls", None)
    return len(calls) > 0 if calls is not None else hook is not None


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; from the second call with the same key on, the compiled
    kernel's launcher directly (see the module docstring)."""
    if dry():
        warm(kernel, grid, args, kwargs)
        return
    if not _ENABLED or _hooked():
        kernel[grid](*args, **kwargs)
        return
    device = torch.cuda.current_device()
    values = (*args, *kwargs.values())  # the key and the argument list both read them
    key = launch_key(kernel, values, tuple(kwargs), device)
    entry = _CACHE.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if hasattr(compiled, "result"):  # a future, where Triton compiles asynchronously
            compiled = compiled.result()
        if len(_CACHE) >= _MAX_ENTRIES:
            _CACHE.clear()
        _CACHE[key] = direct_entry(kernel, compiled, args, kwargs)
        return
    if entry is _UNSUPPORTED:
        kernel[grid](*args, **kwargs)
        return
    full = entry.arguments(values)
    if callable(grid):
        grid = grid(entry.meta)
    n = len(grid)
    entry.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
              torch._C._cuda_getCurrentRawStream(device), entry.function, entry.packed, None,
              None, None, *full)


class _TuningMiss(Exception):
    pass


def tuning_key(tuner: Autotuner, args: tuple, kwargs: dict) -> tuple:
    """The key under which ``tuner`` keeps its choice for a launch, computed as
    ``Autotuner.run`` does: the values of its ``key`` arguments, then the dtype of every argument
    that has one."""
    named = {k: v for k, v in {**dict(zip(tuner.arg_names, args)), **kwargs}.items()
             if k in tuner.arg_names}
    key = [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def candidates(tuner: Autotuner, args: tuple, kwargs: dict) -> list:
    """The configs a launch of ``tuner`` would compile: its choice where one is known (in memory
    or in the disk cache), else every config its pruning keeps."""
    if len(tuner.configs) <= 1:
        return tuner.configs[:1]
    key = tuning_key(tuner, args, kwargs)
    if key in tuner.cache:
        return [tuner.cache[key]]
    tuner.nargs = dict(zip(tuner.arg_names, args))
    try:
        pruned = tuner.prune_configs(kwargs)
    finally:
        tuner.nargs = None
    if tuner.cache_results:
        def miss():
            raise _TuningMiss
        try:
            # On a hit this stores the choice in tuner.cache, as the real launch would.
            if tuner.check_disk_cache(key, pruned, miss):
                return [tuner.cache[key]]
        except _TuningMiss:
            pass
    return pruned


def warm(kernel, grid, args: tuple, kwargs: dict) -> None:
    """What ``kernel[grid](*args, **kwargs)`` would compile, compiled (or, under Triton's
    ``jit_cache_hook``, offered to the hook) without launching: the heuristics evaluated as
    ``Heuristics.run`` does, and each of the autotuner's :func:`candidates` warmed up."""
    named, configs, fn = dict(kwargs), [None], kernel
    while isinstance(fn, (Heuristics, Autotuner)):
        if isinstance(fn, Heuristics):
            add_heuristics(fn, args, named)
        else:
            configs = candidates(fn, args, named)
        fn = fn.fn
    for config in configs:
        fn.warmup(*args, grid=grid, **named, **(config.all_kwargs() if config else {}))


class dry_launches:
    """``with dry_launches(): ...``: every :func:`launch` of this thread inside is :func:`warm`
    instead, and the direct path's cache is neither read nor filled.

    The state is the thread's own, and torch runs a CUDA backward on its own thread: vmoe's
    autograd Functions record ``dry()`` in their forward's context and enter ``dry_launches`` in
    their backward where it was set (:func:`vmoe.autograd._dry_forward`)."""

    def __enter__(self):
        self.previous = dry()
        _THREAD.dry = True
        return self

    def __exit__(self, *exc):
        _THREAD.dry = self.previous


def clear_cache() -> None:
    """Forget every key (the next launch of each goes through Triton again)."""
    _CACHE.clear()
