"""The direct launch path (vmoe/ops/utils/launch.py): the argument list it replays must be the one Triton
binds, for every kernel a layer training step launches, with the new call's tensors in place.

On the CPU the kernels are interpreted and the direct path is off, so these tests check its pieces
(the binding, the slots, the key) against Triton's wrappers on recorded calls. On a GPU,
test_direct_path_is_taken_and_bitwise_equal runs the layer through the direct path and compares it
bitwise with Triton's path.
"""
from __future__ import annotations

import types

import pytest
import torch

import vmoe.ops.gather_scatter
import vmoe.ops.grouped_gemm
import vmoe.ops.router
import vmoe.ops.routing
from vmoe import MoEConfig, MoEMLP
from vmoe.ops.utils import launch as launch_mod
from vmoe.testing import DEVICE

_MODULES = ("gather_scatter", "grouped_gemm", "router", "routing")


@pytest.fixture
def recorded(monkeypatch):
    """Every launch made while the fixture is active, as (kernel, grid, args, kwargs), in order."""
    calls = []
    real = launch_mod.launch

    def record(kernel, grid, *args, **kwargs):
        calls.append((kernel, grid, args, kwargs))
        real(kernel, grid, *args, **kwargs)

    for name in _MODULES:
        monkeypatch.setattr(getattr(vmoe.ops, name), "launch", record)
    return calls


def _layer_step(moe, d, T, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float32).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(T, d, generator=g, dtype=torch.float32).to(DEVICE, dtype)
    out, aux, f_i = moe(x)
    ((out * dy).sum() + sum(aux.values())).backward()
    return out, aux, f_i, x.grad


def _moe(dtype, **kw):
    torch.manual_seed(0)
    cfg = MoEConfig(n_embd=32, expert_sizes=[(2, 48), (3, 16), (1, 0)], num_active_experts=2,
                    activation="swiglu", router="softmax", **kw)
    return MoEMLP(cfg).to(DEVICE, dtype)


def _two_steps(recorded, shared: bool, tokens: tuple) -> tuple[list, list]:
    """The launches of two training steps of one layer (with a gated shared expert if ``shared``),
    at ``tokens[0]`` then ``tokens[1]`` tokens, with new inputs each time."""
    kw = dict(shared_expert_width=24, shared_expert_gate=True) if shared else {}
    moe = _moe(torch.float32, **kw)
    _layer_step(moe, 32, tokens[0], torch.float32, seed=1)
    first = list(recorded)
    recorded.clear()
    _layer_step(moe, 32, tokens[1], torch.float32, seed=2)
    second = list(recorded)
    assert len(first) == len(second) >= 12
    return first, second


def _key(kernel, args, kwargs, device):
    return launch_mod.launch_key(kernel, (*args, *kwargs.values()), tuple(kwargs), device)


def _same(a, b) -> bool:
    return a is b if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else a == b


@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared-gated"])
def test_replayed_arguments_equal_triton_binding(recorded, shared):
    """Two training steps with new inputs: for each launch of the second, the first call's entry
    (same key) with the second call's tensors in their slots equals a fresh binding of the second
    call, value by value and tensor by tensor. Covers every kernel of the forward and backward,
    positional and keyword launches, heuristics, the autotuned config and defaults."""
    first, second = _two_steps(recorded, shared, (7, 7))
    kernels = set()
    for (k1, _, a1, kw1), (k2, _, a2, kw2) in zip(first, second):
        assert k1 is k2
        assert _key(k1, a1, kw1, -1) == _key(k2, a2, kw2, -1)
        fake = types.SimpleNamespace(run=None, function=None, packed_metadata=None)
        entry = launch_mod.direct_entry(k1, fake, a1, kw1)
        assert entry is not launch_mod._UNSUPPORTED, k1
        # The entry keeps none of the first call's tensors alive (CUDA graph trees refuse an
        # untracked allocation of their pool, and it would pin activations).
        assert not any(isinstance(v, torch.Tensor) for v in (*entry.template, *entry.meta.values()))
        fn, bound = launch_mod.bound_arguments(k2, a2, kw2)
        replay = entry.arguments((*a2, *kw2.values()))
        assert len(replay) == len(fn.arg_names) == len(bound)
        for name, got, want in zip(fn.arg_names, replay, bound.values()):
            assert _same(got, want), f"{fn.arg_names} {name}: {got!r} vs {want!r}"
        kernels.add(fn.arg_names[0] + str(len(fn.arg_names)))
    assert len(kernels) >= 8  # the step launched most of vmoe's kernels, not one of them many times


def test_bound_arguments_holds_heuristics_config_and_defaults(recorded):
    """The rows kernel is wrapped in heuristics and an autotuner: its binding carries the HAS_*
    flags computed from the None-ness of operands and the config's block shape."""
    _layer_step(_moe(torch.float32), 32, 5, torch.float32, seed=3)
    rows = [(k, a, kw) for k, _, a, kw in recorded if k is vmoe.ops.grouped_gemm._rows_kernel]
    assert rows
    for kernel, args, kwargs in rows:
        _, bound = launch_mod.bound_arguments(kernel, args, kwargs)
        assert bound["HAS_Z"] == (kwargs["z_ptr"] is not None)
        assert bound["HAS_SCALE"] == (kwargs["scale_ptr"] is not None)
        config = kernel.fn.best_config.kwargs
        assert {name: bound[name] for name in config} == config
        for name, value in kwargs.items():
            assert _same(bound[name], value)


def test_key_separates_what_triton_specializes_on():
    kernel = vmoe.ops.gather_scatter._combine_kernel
    base = torch.zeros(64, dtype=torch.float16)
    key = _key
    same = key(kernel, (base[:32],), {"n": 16}, 0)
    assert same == key(kernel, (torch.zeros(32, dtype=torch.float16),), {"n": 16}, 0)
    assert same != key(kernel, (base[1:33],), {"n": 16}, 0)          # 2-byte offset: not aligned
    assert same != key(kernel, (base[:32].float(),), {"n": 16}, 0)   # dtype
    assert same != key(kernel, (base[:32],), {"n": 17}, 0)           # a host value
    assert same != key(kernel, (base[:32],), {"m": 16}, 0)           # a keyword's name
    assert same != key(kernel, (base[:32],), {"n": 16}, 1)           # the device
    assert same != key(kernel, (None,), {"n": 16}, 0)                # an absent operand


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the direct path needs a GPU")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_direct_path_is_taken_and_bitwise_equal(monkeypatch, dtype):
    """Steps through Triton's path, then through the direct path, give the same bits (the kernels
    are deterministic), and after the first step every vmoe launch has a direct entry."""
    moe = _moe(dtype, shared_expert_width=24, shared_expert_gate=True)
    monkeypatch.setattr(launch_mod, "_ENABLED", False)
    ref = [_layer_step(moe, 32, 300, dtype, seed=s) for s in (4, 5)]
    ref_grads = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad(set_to_none=True)
    monkeypatch.setattr(launch_mod, "_ENABLED", True)
    launch_mod.clear_cache()
    got = [_layer_step(moe, 32, 300, dtype, seed=s) for s in (4, 5)]
    entries = list(launch_mod._CACHE.values())
    assert len(entries) >= 12
    assert all(isinstance(e, launch_mod._Direct) for e in entries)
    for (o1, a1, f1, dx1), (o2, a2, f2, dx2) in zip(ref, got):
        assert torch.equal(o1, o2) and torch.equal(f1, f2) and torch.equal(dx1, dx2)
        assert all(torch.equal(a1[n], a2[n]) for n in a1)
    for p, r in zip(moe.parameters(), ref_grads):
        assert torch.equal(p.grad, r)


def test_a_launch_hook_is_seen(monkeypatch):
    """An empty HookChain (Triton's default since 3.5) is no hook; one with a call, or a plain
    callable (older Triton), is, and sends every launch through Triton's path."""
    from triton import knobs
    chain = knobs.runtime.launch_enter_hook
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)
    assert not launch_mod._hooked()
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", print)
    assert launch_mod._hooked()
    if hasattr(chain, "calls"):
        empty = type(chain)()
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", empty)
        assert not launch_mod._hooked()
        empty.add(print)
        assert launch_mod._hooked()


def test_entry_lets_the_first_calls_tensors_go(recorded):
    """Once the first call's tensors are dropped by their owner, nothing in the cache entry holds
    them (checked by weak references)."""
    import gc
    import weakref
    _layer_step(_moe(torch.float32), 32, 5, torch.float32, seed=6)
    kernel, _, args, kwargs = recorded[0]
    fake = types.SimpleNamespace(run=None, function=None, packed_metadata=None)
    entry = launch_mod.direct_entry(kernel, fake, args, kwargs)
    refs = [weakref.ref(v) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    assert refs
    del args, kwargs
    recorded.clear()
    gc.collect()
    assert entry.slots and all(r() is None for r in refs)


def _unspecialized(kernel) -> set:
    """The names in ``kernel``'s ``@triton.jit(do_not_specialize=[...])``, read from its module's
    source (the interpreter's functions do not keep the list)."""
    import inspect
    import re
    fn = kernel
    while not inspect.isfunction(fn):
        fn = fn.fn
    source = inspect.getsource(inspect.getmodule(fn))
    found = re.search(r"@triton\.jit\(do_not_specialize=\[([^\]]*)\]\)\ndef " + fn.__name__ + r"\(",
                      source)
    return set(re.findall(r"'(\w+)'", found.group(1))) if found else set()


def _int_arguments(kernel, args, kwargs) -> dict:
    fn = kernel
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    named = {**dict(zip(fn.arg_names, args)), **kwargs}
    return {n: v for n, v in named.items() if isinstance(v, int) and not isinstance(v, bool)}


@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared-gated"])
def test_token_count_arguments_are_not_specialized(recorded, shared):
    """A new token count compiles nothing: every integer argument whose value changes with T
    (T, T*k, the number of token blocks, tile counts) is in its kernel's do_not_specialize, so
    Triton does not compile a new variant for its divisibility by 16 or its being 1. Two training
    steps at T=16 and T=37 launch the same kernels in the same order; each argument that differs
    must be listed."""
    first, second = _two_steps(recorded, shared, (16, 37))
    varying = 0
    for (k1, _, a1, kw1), (k2, _, a2, kw2) in zip(first, second):
        assert k1 is k2
        ints1, ints2 = _int_arguments(k1, a1, kw1), _int_arguments(k2, a2, kw2)
        changed = {n for n in ints1 if ints1[n] != ints2.get(n)}
        varying += bool(changed)
        missing = changed - _unspecialized(k1)
        assert not missing, f"{k1}: {sorted(missing)} change with T but are specialized"
    assert varying >= 5  # the routing, router and combine kernels all take a token count
