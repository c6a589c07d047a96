"""vmoe/ops/utils/precompile.py and the dry launches of vmoe/ops/utils/launch.py.

On the CPU: the worker pool (forked processes, a shared job queue, failures and the timeout),
the settings, and that a dry launch picks the configs Triton's own autotuner would (its tuning
key, computed as ``Autotuner.run`` does, checked against a real autotuner under the
interpreter). On a GPU: a fresh layer's first call records its kernels, compiles them in
workers, runs no kernel while recording, changes no gradient, and gives the same outputs and
gradients as the float64 reference. The wall-clock effect is measured by
``vmoe.bench.probes.first_step``."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
import triton
import triton.language as tl

import vmoe
from vmoe import testing
from vmoe.ops.utils import launch, precompile
from vmoe.ops.utils.device import interpreting


def _touch(path):
    return lambda: open(path, "w").close()


def test_workers_run_every_job_once(tmp_path):
    jobs = [_touch(tmp_path / f"{i}") for i in range(13)]
    assert precompile.run_in_workers(jobs, workers=4) == 4
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == list(range(13))


def test_a_failing_job_ends_only_itself(tmp_path):
    def fail():
        raise RuntimeError("a compile error")
    jobs = [_touch(tmp_path / "a"), fail, _touch(tmp_path / "b"), _touch(tmp_path / "c")]
    # One worker takes every job in turn: the failure must not stop the jobs after it.
    assert precompile.run_in_workers(jobs, workers=1) == 0  # exits 1: one job failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_a_stuck_worker_is_killed_at_the_timeout(tmp_path):
    t = time.monotonic()
    clean = precompile.run_in_workers([lambda: time.sleep(60), _touch(tmp_path / "x")], workers=2,
                                      timeout_s=1.0)
    assert time.monotonic() - t < 30
    assert clean == 1 and (tmp_path / "x").exists()


def test_no_jobs_forks_nothing():
    assert precompile.run_in_workers([], workers=8) == 0


@pytest.mark.parametrize("raw,expected", [("0", 0), ("1", 1), ("6", 6)])
def test_worker_count_from_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv("VMOE_PRECOMPILE_WORKERS", raw)
    assert precompile._workers_from_env() == expected


@pytest.mark.parametrize("raw", ["many", "-2", "2.5"])
def test_bad_worker_counts_name_the_variable(monkeypatch, raw):
    monkeypatch.setenv("VMOE_PRECOMPILE_WORKERS", raw)
    with pytest.raises(ValueError, match="VMOE_PRECOMPILE_WORKERS"):
        precompile._workers_from_env()


def test_the_default_is_the_cores_up_to_16(monkeypatch):
    monkeypatch.delenv("VMOE_PRECOMPILE_WORKERS", raising=False)
    assert 1 <= precompile._workers_from_env() <= 16


@pytest.mark.skipif(not vmoe.ops.utils.device.interpreting(), reason="the interpreter's case")
def test_off_under_the_interpreter():
    assert not precompile.enabled()
    assert not precompile.applicable(torch.zeros(2, 2))


def test_this_triton_has_what_the_precompile_uses():
    # CI's Triton, like the GPU machine's 3.6: were the hook or the compile mode renamed, the
    # precompile would switch itself off silently, and this fails instead.
    assert precompile._triton_supports()


def test_signature_drops_only_the_token_count():
    a, b = torch.zeros(5, 8), torch.zeros(9, 8)
    assert precompile.signature(a, rows=True) == precompile.signature(b, rows=True)
    assert precompile.signature(a) != precompile.signature(b)
    assert precompile.signature(a, rows=True) != precompile.signature(a.t().contiguous().t(),
                                                                      rows=True)  # strides


@triton.jit
def _toy_kernel(x_ptr, n, N_KEY: tl.constexpr, BIG: tl.constexpr, B: tl.constexpr):
    o = tl.arange(0, B)
    tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) + 1, mask=o < n)


def _toy(prune=None):
    configs = [triton.Config({"B": 16}), triton.Config({"B": 32})]
    tuner = triton.autotune(configs, key=["N_KEY", "BIG"],
                            prune_configs_by={"early_config_prune": prune} if prune else None,
                            do_bench=lambda fn, quantiles: (fn(), [1.0, 1.0, 1.0])[1])(_toy_kernel)
    return triton.heuristics({"BIG": lambda a: a["n"] > 3})(tuner), tuner


@pytest.mark.skipif(not vmoe.ops.utils.device.interpreting(), reason="a CPU tensor launch")
@pytest.mark.parametrize("positional", [False, True], ids=["keywords", "positional"])
def test_tuning_key_is_the_autotuners_own(positional):
    kernel, tuner = _toy()
    x = torch.zeros(16)
    if positional:
        kernel[(1,)](x, 5, 7)
        args, named = (x, 5, 7), {"BIG": True}
    else:
        kernel[(1,)](x_ptr=x, n=5, N_KEY=7)
        args, named = (), {"x_ptr": x, "n": 5, "N_KEY": 7, "BIG": True}
    assert list(tuner.cache) == [launch.tuning_key(tuner, args, named)]
    # Known choice: the dry launch compiles that one config only.
    assert launch.candidates(tuner, args, named) == [tuner.cache[launch.tuning_key(tuner, args,
                                                                                    named)]]
    # Another key: every config the pruning keeps.
    other = {**named, "N_KEY": 8}
    assert launch.candidates(tuner, args, other) == tuner.configs


def test_candidates_apply_the_pruning():
    seen = {}

    def prune(configs, nargs, **kwargs):
        seen.update(nargs=dict(nargs), kwargs=kwargs)
        return configs[1:]
    _, tuner = _toy(prune)
    assert launch.candidates(tuner, (), {"n": 5, "N_KEY": 7, "BIG": True}) == tuner.configs[1:]
    assert seen["kwargs"] == {"n": 5, "N_KEY": 7, "BIG": True}
    assert tuner.nargs is None  # left as the autotuner leaves it between launches


def test_dry_launches_nest_restore_and_stay_on_their_thread():
    seen = []
    assert not launch.dry()
    with launch.dry_launches():
        with launch.dry_launches():
            assert launch.dry()
        assert launch.dry()
        # Another thread (an nn.DataParallel replica, say) keeps launching for real meanwhile.
        thread = threading.Thread(target=lambda: seen.append(launch.dry()))
        thread.start()
        thread.join()
    assert not launch.dry()
    assert seen == [False]


class _Info:
    def __init__(self, module):
        self.module, self.jit_function = module, object()


def _call(hook, module, data):
    return hook(key="k", repr="r", fn=_Info(module), compile={"specialization_data": data},
                is_manual_warmup=False, already_compiled=False)


def test_the_recording_hook_takes_only_dry_threads_vmoe_kernels():
    records, other = {}, []

    def dry_call(data):
        with launch.dry_launches():
            other.append(_call(hook, "vmoe.ops.routing", data))

    with precompile._recording(records) as hook:
        assert _call(hook, "vmoe.ops.routing", "a") is None  # not in dry_launches: compiles
        with launch.dry_launches():
            assert _call(hook, "vmoe.ops.routing", "b") is True  # recorded and skipped
            assert _call(hook, "my_package.kernels", "c") is None  # not vmoe's: compiles as usual
            # A thread outside dry_launches compiles and runs; one inside (the autograd thread
            # of a dry step's backward) is recorded.
            for target in (lambda: other.append(_call(hook, "vmoe.ops.routing", "d")),
                           lambda: dry_call("e")):
                thread = threading.Thread(target=target)
                thread.start()
                thread.join()
    assert other == [None, True]
    assert list(records) == ["b", "e"]


@pytest.mark.skipif(not interpreting(), reason="the layer's kernels on the CPU need TRITON_INTERPRET=1")
def test_the_backward_of_a_dry_forward_is_dry_on_any_thread(monkeypatch):
    """torch runs a CUDA backward on its own thread, outside the recording thread's
    dry_launches: the backward of a dry forward must stay dry there (launched for real, its
    kernels read the forward's uninitialised routing arrays). Here the backward runs on a
    thread of its own, as on a GPU."""
    cfg = vmoe.MoEConfig(n_embd=32, expert_sizes=[(2, 32), (2, 16), (2, 0)], num_active_experts=2,
                         activation="relu2", max_null_share=0.25)
    moe = vmoe.MoEMLP(cfg)
    x = torch.randn(24, 32, requires_grad=True)
    warmed, ran = [], []
    # Every launch is recorded instead of compiled (warm) or run (the direct path asks _hooked).
    monkeypatch.setattr(launch, "warm", lambda kernel, *a: warmed.append(threading.get_ident()))
    monkeypatch.setattr(launch, "_ENABLED", True)
    monkeypatch.setattr(launch, "_hooked", lambda: ran.append(threading.get_ident()) or True)

    def backward_launches(on_thread: bool) -> int:
        with launch.dry_launches():
            out, aux, _ = moe(x)
            loss = out.float().sum() + sum(v.float() for v in aux.values())
            n_forward = len(warmed)
            if not on_thread:
                loss.backward()
        if on_thread:
            thread = threading.Thread(target=loss.backward)
            thread.start()
            thread.join()
        return len(warmed) - n_forward

    same_thread = backward_launches(False)
    assert same_thread >= 3 and not ran  # the router's backward and the experts' GEMMs
    assert backward_launches(True) == same_thread
    assert not ran


gpu = pytest.mark.skipif(not torch.cuda.is_available() or not precompile.enabled(),
                         reason="compiles for a GPU in forked workers")


@gpu
def test_a_fresh_layer_precompiles_then_matches_the_reference(monkeypatch):
    # Widths no other test uses, so that nothing of this layer is compiled in this process yet;
    # a null expert too.
    cfg = vmoe.MoEConfig(n_embd=72, expert_sizes=[(2, 88), (3, 40), (1, 0)], num_active_experts=2,
                         activation="relu2")
    torch.manual_seed(0)
    moe = vmoe.MoEMLP(cfg).cuda()
    ref = vmoe.MoEMLP(dataclasses.replace(cfg, impl="reference")).cuda().double()
    ref.load_state_dict(moe.state_dict())
    stats, launched = [], []
    real_precompile, real_hooked = precompile.precompile, launch._hooked

    def counted(step, workers=None):
        grads = [p.grad for p in moe.parameters()]
        # Every launch that reaches the compiled kernel asks _hooked first.
        monkeypatch.setattr(launch, "_hooked", lambda: launched.append(1) or real_hooked())
        out = real_precompile(step, workers)
        monkeypatch.setattr(launch, "_hooked", real_hooked)
        assert [p.grad for p in moe.parameters()] == grads  # still None: nothing accumulated
        stats.append(out)
        return out
    monkeypatch.setattr(precompile, "precompile", counted)

    x = torch.randn(37, 72, device="cuda")
    dy = torch.randn(37, 72, device="cuda")
    xs = [x.clone().requires_grad_(), x.double().requires_grad_()]
    outs = []
    for layer, xi in zip((moe, ref), xs):
        y, aux, _ = layer(xi)
        (y.double() * dy).sum().backward()
        outs.append([y, xi.grad, *(p.grad for p in layer.parameters())])
    assert len(stats) == 1 and stats[0]["kernels"] > 0
    assert not launched
    names = ["y", "grad x"] + [f"grad {n}" for n, _ in moe.named_parameters()]
    for name, out, r in zip(names, *outs):
        testing.assert_close(name, out, r, torch.float32)
    moe(x.clone().requires_grad_())  # grad mode on, the same key: no second precompile
    assert len(stats) == 1
    with torch.no_grad():
        moe(x)  # a forward-only key: a second recording
    assert len(stats) == 2


@pytest.mark.skipif(not vmoe.ops.utils.device.interpreting(), reason="the kernel path on CPU tensors")
def test_the_layer_asks_once_per_kind_of_call(monkeypatch):
    calls = []
    monkeypatch.setattr(precompile, "applicable", lambda x: True)
    monkeypatch.setattr(precompile, "first_call", lambda key, fn, inputs, params: calls.append(key))
    moe = vmoe.MoEMLP(vmoe.MoEConfig(n_embd=16, expert_sizes=[(2, 8), (1, 4)], num_active_experts=2))
    x = torch.randn(5, 16)
    moe(x)
    moe(torch.randn(9, 16))  # another token count: the same kind
    assert len(calls) == 1
    with torch.no_grad():
        moe(x)
    moe(x.requires_grad_())
    assert len(calls) == 3
    # The full key names the layer's config and holds no token count.
    assert calls[0][:3] == ("MoEMLP", repr(moe.config), precompile.signature(torch.randn(9, 16), rows=True))
