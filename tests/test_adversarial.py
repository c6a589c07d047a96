"""vmoe.expert_mlp (impl="triton") under adversarial routing: the output and all four gradients,
against vmoe.reference.expert_mlp in float64.

Two halves. A named sweep of the routings a kernel gets wrong: all tokens to one expert, most
experts empty, per-expert counts at every row-tile boundary +-1, Zipf-skewed load, k = E, repeated
and out-of-range ids, widths 1 / 7 / 100 side by side, one expert, T = 0 and T = 1. Then a
hypothesis property test over small random problems, drawn from one seed so a failing example
names the whole problem in a line (``T5-d3-w[1,40]-k2-swiglu-repeats-seed7``).

Every expert that no token chose must get exactly zero dW1 and dW2: under VMOE_POISON=1 a weight
gradient tile the kernels skip stays NaN, and one they compute from stray rows is nonzero.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from vmoe import expert_mlp, reference
from vmoe.config import ACTIVATIONS, gate_factor
from vmoe.testing import DEVICE, DTYPE_IDS, assert_close, case_id, make_inputs, random_ids

NAMES = ("y", "dx", "dtopk_weights", "dw1", "dw2")
# The row block the interpreter pins (grouped_gemm._configs); test_autograd checks it is still 16.
BM = 16


def run_triton(x, ids, w, w1, w2, widths, activation, dy):
    leaves = [t.clone().requires_grad_() for t in (x, w, w1, w2)]
    y = expert_mlp(leaves[0], ids, leaves[1], leaves[2], leaves[3], widths, activation,
                   impl="triton")
    return (y.detach(), *torch.autograd.grad(y, leaves, dy))


def run_reference(x, ids, w, w1, w2, widths, activation, dy):
    leaves = [t.detach().double().requires_grad_() for t in (x, w, w1, w2)]
    y = reference.expert_mlp(leaves[0], ids, leaves[1], leaves[2], leaves[3], widths, activation)
    if not y.requires_grad:  # no assignment reached an expert (T = 0): every gradient is zero
        return (y.detach(), *(torch.zeros_like(t) for t in leaves))
    grads = torch.autograd.grad(y, leaves, dy.double(), allow_unused=True, materialize_grads=True)
    return (y.detach(), *grads)


def check(x, ids, w, w1, w2, widths, activation, dy, label=""):
    """Compare y and every gradient with the float64 reference; an empty expert's dW must be 0."""
    dtype = x.dtype
    out = run_triton(x, ids, w, w1, w2, widths, activation, dy)
    ref = run_reference(x, ids, w, w1, w2, widths, activation, dy)
    for name, o, r in zip(NAMES, out, ref):
        assert o is not None, f"{label} {name}: no gradient"
        assert o.dtype == dtype, f"{label} {name} has dtype {o.dtype}, expected {dtype}"
        assert_close(f"{label} {name}", o, r, dtype)
    g, chosen, o = gate_factor(activation), set(ids.reshape(-1).tolist()), 0
    for e, f in enumerate(widths):
        if e not in chosen:
            for name, t in (("dw1", out[3][:, g * o: g * (o + f)]), ("dw2", out[4][o: o + f])):
                assert bool((t == 0).all()), (f"{label} {name} of empty expert {e} (width {f}) "
                                              f"is not exactly zero: {t.flatten()[:4].tolist()}")
        o += f
    return out


def ids_from_counts(counts, k):
    """``[T, k]`` ids, T = sum(counts) / k, giving expert e exactly counts[e] assignments with the k
    ids of each row distinct, rows and slots shuffled.

    Lay the assignments out expert after expert and deal them into a ``[k, T]`` grid column-major:
    a run of at most T consecutive positions hits T distinct rows, so no row repeats an expert.
    """
    A = sum(counts)
    assert A % k == 0 and max(counts) <= A // k, (counts, k)
    T = A // k
    flat = torch.cat([torch.full((n,), e, dtype=torch.long) for e, n in enumerate(counts)])
    ids = flat.reshape(k, T).t()
    ids = ids[torch.randperm(T)]
    return torch.stack([row[torch.randperm(k)] for row in ids]) if T else ids


def zipf_ids(T, E, k, s=1.5):
    """Expert e with probability proportional to 1 / (e+1)^s, k distinct per row."""
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    return torch.multinomial(p.expand(T, E), k, replacement=False)


def rows_of(*rows):
    return lambda T, E, k: torch.tensor(rows, dtype=torch.long)


def constant(e):
    return lambda T, E, k: torch.full((T, k), e if e >= 0 else E + e, dtype=torch.long)


def from_counts(*counts):
    return lambda T, E, k: ids_from_counts(counts, k)


def only_experts(*experts):
    """Every row a shuffle of k of ``experts``: the other experts stay empty."""
    chosen = torch.tensor(experts)
    return lambda T, E, k: torch.stack([chosen[torch.randperm(len(experts))[:k]] for _ in range(T)])


def with_repeats(T, E, k):
    """Ids drawn with replacement, plus one row that is a single expert k times."""
    ids = torch.randint(0, E, (T, k))
    ids[T // 2] = E // 2
    return ids


def signed_weights(w):
    """Some routing weights exactly 0, some negative: the combine must not assume w > 0."""
    w = w.clone()
    w.view(-1)[::3] = 0
    w.view(-1)[1::3] *= -1
    return w


W3 = (1, 7, 100)
W5 = (7, 33, 1, 20, 12)
# Widths 1..100 around the 16-column tiles, for the experts the boundary counts land on.
W8 = (7, 16, 17, 1, 33, 100, 5, 15)
W12 = (5, 9, 17, 3, 12, 1, 40, 16, 2, 33, 8, 6)

# (name, T, d, widths, k, activation, dtype, ids builder (T, E, k) -> [T, k] or None, options)
CASES = [
    # One expert takes every token, across one to three row tiles; the middle one is 1 wide.
    ("all-to-first", 33, 16, W5, 1, "relu2", torch.float32, constant(0), {}),
    ("all-to-middle", 31, 16, W5, 1, "gelu", torch.float32, constant(2), {}),
    ("all-to-last", 32, 16, W5, 1, "silu", torch.bfloat16, constant(-1), {}),
    ("all-to-middle-k1", 17, 24, W5, 1, "swiglu", torch.float32, constant(1), {}),
    # 10 of 12 experts empty, including the first and the last.
    ("empty-10-of-12", 20, 16, W12, 2, "swiglu", torch.float32, only_experts(4, 9), {}),
    ("empty-11-of-12", 24, 16, W12, 1, "relu2", torch.bfloat16, only_experts(6), {}),
    ("empty-10-of-12-edges", 18, 8, W12, 1, "gelu", torch.float32, only_experts(0, 11), {}),
    # Counts at every tile boundary +-1, one per expert, and T*k = 160 sorted rows.
    ("counts-15-16-17-31-32-33-1-15", 40, 16, W8, 4, "relu2", torch.float32,
     from_counts(15, 16, 17, 31, 32, 33, 1, 15), {}),
    ("counts-33-32-31-1-17-16-15-15", 40, 12, W8, 4, "swiglu", torch.bfloat16,
     from_counts(33, 32, 31, 1, 17, 16, 15, 15), {}),
    ("counts-1-16-0-15-17-31-32-8", 40, 16, W8, 3, "silu", torch.float32,
     from_counts(1, 16, 0, 15, 17, 31, 32, 8), {}),
    ("counts-31-1-k1", 32, 16, (100, 7), 1, "gelu", torch.float32, from_counts(31, 1), {}),
    ("counts-16-17-k1", 33, 20, (1, 33), 1, "swiglu", torch.float32, from_counts(16, 17), {}),
    # Zipf-skewed load over 8 experts.
    ("zipf-1.5", 40, 16, W8, 3, "gelu", torch.float32, lambda T, E, k: zipf_ids(T, E, k), {}),
    ("zipf-1.5", 40, 16, tuple(reversed(W8)), 2, "swiglu", torch.bfloat16,
     lambda T, E, k: zipf_ids(T, E, k), {}),
    # k = E: every token to every expert.
    ("k-equals-E", 12, 16, W5, 5, "silu", torch.float32, None, {}),
    ("k-equals-E", 9, 16, W3, 3, "swiglu", torch.bfloat16, None, {}),
    # Repeated ids contribute twice; k may then exceed E.
    ("repeated-ids", 10, 16, W5, 4, "relu2", torch.float32, with_repeats, {}),
    ("repeated-ids", 10, 16, W5, 3, "gelu", torch.bfloat16, with_repeats, {}),
    ("repeated-ids-k-gt-E", 7, 16, (7, 33), 5, "swiglu", torch.float32, with_repeats, {}),
    ("same-expert-every-slot", 17, 16, W3, 3, "relu2", torch.float32, constant(2), {}),
    # Ids outside [0, E) are dropped (the docstring's contract): the reference loop ignores them.
    ("out-of-range-ids", 6, 16, W3, 3, "silu", torch.float32,
     rows_of([0, -1, 2], [3, 1, 1], [-5, 100, 2], [2, 0, 1], [3, 3, 3], [1, -1, 0]), {}),
    # Widths 1, 7, 100 side by side, and a single expert.
    ("widths-1-7-100", 24, 32, W3 * 2, 2, "swiglu", torch.float32, None, {}),
    ("widths-1-7-100", 24, 32, W3 * 2, 3, "relu2", torch.bfloat16, None, {}),
    ("single-expert", 17, 16, (1,), 1, "gelu", torch.float32, None, {}),
    ("single-expert", 20, 16, (100,), 1, "swiglu", torch.bfloat16, None, {}),
    ("single-expert-repeated", 9, 16, (7,), 3, "relu2", torch.float32, constant(0), {}),
    # T = 1 and T = 0.
    ("T1", 1, 16, W3, 2, "relu2", torch.float32, None, {}),
    ("T1", 1, 16, W3, 3, "swiglu", torch.bfloat16, None, {}),
    ("T0", 0, 16, W3, 2, "gelu", torch.float32, None, {}),
    ("T0", 0, 16, W3, 1, "swiglu", torch.bfloat16, None, {}),
    # Routing weights of 0 and of either sign; ids as int32.
    ("signed-weights", 20, 16, W5, 2, "silu", torch.float32, None, {"weights": signed_weights}),
    ("int32-ids", 20, 16, W5, 2, "relu2", torch.float32, None, {"ids_dtype": torch.int32}),
]


def _case_ids():
    return [f"{name}-{case_id(T, d, widths, k)}-{act}-{DTYPE_IDS[dtype]}"
            for name, T, d, widths, k, act, dtype, _, _ in CASES]


@pytest.mark.parametrize("name,T,d,widths,k,activation,dtype,make_ids,options", CASES,
                         ids=_case_ids())
def test_adversarial_routing(name, T, d, widths, k, activation, dtype, make_ids, options):
    ids = make_ids(T, len(widths), k) if make_ids is not None else None
    x, ids, w, w1, w2 = make_inputs(T, d, widths, k, activation, dtype, DEVICE, ids=ids)
    assert ids.shape == (T, k)
    ids = ids.to(options.get("ids_dtype", ids.dtype))
    w = options.get("weights", lambda w: w)(w)
    dy = torch.randn(T, d).to(DEVICE, dtype)
    check(x, ids, w, w1, w2, widths, activation, dy, label=name)


def test_count_builder():
    """ids_from_counts gives exactly the counts asked for, with distinct ids in every row."""
    counts = (15, 16, 17, 31, 32, 33, 1, 15)
    ids = ids_from_counts(counts, 4)
    assert ids.shape == (40, 4)
    assert torch.bincount(ids.reshape(-1), minlength=8).tolist() == list(counts)
    assert all(len(set(row)) == 4 for row in ids.tolist())
    assert BM - 1 in counts and BM + 1 in counts and 2 * BM + 1 in counts


@dataclasses.dataclass(frozen=True)
class Problem:
    T: int
    d: int
    widths: tuple
    k: int
    activation: str
    repeats: bool
    seed: int

    def __repr__(self):
        return case_id(self.T, self.d, self.widths, self.k, self.activation,
                       "repeats" if self.repeats else "distinct", f"seed{self.seed}")


@st.composite
def problems(draw):
    widths = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=6)))
    return Problem(T=draw(st.integers(0, 24)), d=draw(st.integers(1, 24)), widths=widths,
                   k=draw(st.integers(1, len(widths))),
                   activation=draw(st.sampled_from(ACTIVATIONS)),
                   repeats=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 32 - 1)))


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_expert_mlp_property(p):
    g = torch.Generator().manual_seed(p.seed)
    E = len(p.widths)
    if p.repeats:
        ids = torch.randint(0, E, (p.T, p.k), generator=g)
    else:
        ids = random_ids(p.T, E, p.k, generator=g)
    x, ids, w, w1, w2 = make_inputs(p.T, p.d, p.widths, p.k, p.activation, torch.float32, DEVICE,
                                    ids=ids, generator=g)
    dy = torch.randn(p.T, p.d, generator=g).to(DEVICE)
    counts = torch.bincount(ids.reshape(-1).cpu(), minlength=E).tolist()
    note(f"problem {p!r}; assignments per expert {counts}")
    check(x, ids, w, w1, w2, p.widths, p.activation, dy, label=repr(p))
