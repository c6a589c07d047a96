"""The autotuner settings of vmoe/ops/utils/tuning.py: read and checked at import, applied to both GEMM
kernels.

On the CPU the kernels run in the interpreter with one config and no tuning; the wall-clock effect
(a second process's first step) is measured on a GPU by ``vmoe.bench.probes.first_step``."""
from __future__ import annotations

import pytest
from triton.runtime.autotuner import Autotuner

import vmoe.ops.grouped_gemm as gg
from vmoe.ops.utils import tuning


@pytest.mark.parametrize("raw,expected", [("", 7), ("1", 1), ("12", 12)])
def test_env_int(monkeypatch, raw, expected):
    monkeypatch.setenv("VMOE_X", raw)
    assert tuning._env_int("VMOE_X", 7) == expected


@pytest.mark.parametrize("raw", ["two", "0", "-1", "1.5"])
def test_env_int_refuses_bad_values_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("VMOE_X", raw)
    with pytest.raises(ValueError, match="VMOE_X"):
        tuning._env_int("VMOE_X", 7)


def test_gemm_kernels_cache_their_tuning_and_time_briefly():
    for kernel in (gg._rows_kernel, gg._wgrad_kernel):
        tuner = kernel.fn  # heuristics around the autotuner
        assert isinstance(tuner, Autotuner)
        # Results on disk everywhere but in the interpreter, where there is nothing to tune.
        assert tuner.cache_results == (not gg.interpreting())
        assert tuner._do_bench is tuning._bench


def test_short_timing_passes_the_quantiles(monkeypatch):
    seen = {}

    def fake_do_bench(fn, warmup, rep, quantiles):
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        return [1.0, 0.9, 1.1]
    monkeypatch.setattr(tuning.triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(tuning, "TUNE_REP_MS", 25)
    assert tuning._bench(lambda: None, (0.5, 0.2, 0.8)) == [1.0, 0.9, 1.1]
    assert seen == {"warmup": 5, "rep": 25, "quantiles": (0.5, 0.2, 0.8)}
