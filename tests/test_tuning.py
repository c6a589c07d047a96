"""The autotuner settings of vmoe/ops/utils/tuning.py: read and checked at import, applied to both GEMM
kernels.

On the CPU the kernels run in the interpreter with one config and no tuning; the wall-clock effect
(a second process's first step) is measured on a GPU by ``vmoe.bench.probes.first_step``."""
from __future__ import annotations

import pytest
from triton.runtime.autotuner import Autotuner

import vmoe.ops.grouped_gemm as gg
from vmoe.ops.utils import tuning
from vmoe.ops.utils.device import env_int


@pytest.mark.parametrize("raw,expected", [("", 7), ("1", 1), ("12", 12)])
def test_env_int(monkeypatch, raw, expected):
    monkeypatch.setenv("VMOE_X", raw)
    assert env_int("VMOE_X", 7) == expected


@pytest.mark.parametrize("raw", ["two", "0", "-1", "1.5"])
def test_env_int_refuses_bad_values_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("VMOE_X", raw)
    with pytest.raises(ValueError, match="VMOE_X"):
        env_int("VMOE_X", 7)


def test_gemm_kernels_cache_their_tuning_and_time_briefly():
    for kernel in (gg._rows_kernel, gg._wgrad_kernel):
        tuner = kernel.fn  # heuristics around the autotuner
        assert isinstance(tuner, Autotuner)
        # Results on disk everywhere but in the interpreter, where there is nothing to tune.
        assert tuner.cache_results == (not gg.interpreting())
        assert tuner._do_bench is tuning._bench


def test_short_timing_passes_the_quantiles(monkeypatch):
    monkeypatch.setattr(tuning, "interpreting", lambda: True)
    seen = {}

    def fake_do_bench(fn, warmup, rep, quantiles):
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        return [1.0, 0.9, 1.1]
    monkeypatch.setattr(tuning.triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(tuning, "TUNE_REP_MS", 25)
    assert tuning._bench(lambda: None, (0.5, 0.2, 0.8)) == [1.0, 0.9, 1.1]
    assert seen == {"warmup": 5, "rep": 25, "quantiles": (0.5, 0.2, 0.8)}


class _FakeEvent:
    """A CUDA event whose elapsed time is the kernel time the test chose."""
    ms = 1.0

    def __init__(self, enable_timing):
        pass

    def record(self):
        pass

    def elapsed_time(self, end):
        return _FakeEvent.ms


class _FakeDriver:
    flushes = 0

    def get_empty_cache_for_benchmark(self):
        return None

    def clear_cache(self, cache):
        _FakeDriver.flushes += 1


@pytest.mark.parametrize("kernel_ms,runs", [(0.002, 100), (1.0, 25), (40.0, 5)],
                         ids=["tiny-capped", "budget", "slow-floor"])
def test_timing_runs_are_capped_and_floored(monkeypatch, kernel_ms, runs):
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "TUNE_REP_MS", 25)
    monkeypatch.setattr(tuning, "MAX_REPS", 100)
    monkeypatch.setattr(tuning, "_driver", _FakeDriver)
    monkeypatch.setattr(tuning.torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(tuning.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(_FakeEvent, "ms", kernel_ms)
    monkeypatch.setattr(_FakeDriver, "flushes", 0)
    calls = []
    out = tuning._bench(lambda: calls.append(1), (0.5, 0.2, 0.8))
    assert out == pytest.approx([kernel_ms] * 3)
    # A first run, three to estimate, a fifth as many warm-ups as timed runs, the timed runs;
    # an L2 flush before each of the estimate's and the timed ones.
    assert len(calls) == 1 + 3 + max(1, runs // 5) + runs
    assert _FakeDriver.flushes == 3 + runs
