"""vmoe.ops.utils.device: the host-side integer helpers equal Triton's (which they replace on the launch path
because Triton's are constexpr functions with a costly host wrapper)."""
from __future__ import annotations

import triton

from vmoe.ops.utils.device import cdiv, next_pow2


def test_next_pow2_equals_triton():
    for n in range(0, 5000):
        assert next_pow2(n) == triton.next_power_of_2(max(n, 1)), n
    assert next_pow2(2**40 + 1) == 2**41


def test_cdiv_equals_triton():
    for a in range(0, 700):
        for b in (1, 2, 3, 7, 16, 128, 256):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert cdiv(2**33 + 1, 2**32) == 3
