"""vmoe.reference, the oracle of every other test, against independent transcriptions of its
docstrings: torch's own activations, and per-token loops over the definitions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vmoe import reference
from vmoe.config import ACTIVATIONS, gate_factor
from vmoe.testing import DEVICE, assert_close, case_id, make_inputs

F64 = torch.float64


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_act_matches_torch(activation):
    z = torch.randn(7, 10, dtype=F64, device=DEVICE) * 3
    if activation == "relu2":
        expected = F.relu(z) ** 2
    elif activation == "gelu":
        expected = F.gelu(z, approximate="none")
    elif activation == "silu":
        expected = F.silu(z)
    else:
        expected = F.silu(z[:, :5]) * z[:, 5:]
    assert_close(activation, reference.act(z, activation), expected, F64, tol=1e-14)


def test_act_rejects_unknown():
    with pytest.raises(ValueError, match="tanh"):
        reference.act(torch.zeros(2), "tanh")


def _expert_mlp_per_token(x, ids, w, w1, w2, widths, activation):
    """The docstring, literally: y[t] = sum_j w[t, j] * act(x[t] @ W1_e) @ W2_e."""
    g = gate_factor(activation)
    offsets = [sum(widths[:e]) for e in range(len(widths))]
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            o, f = offsets[e], widths[e]
            h = reference.act(x[t:t + 1] @ w1[:, g * o:g * (o + f)], activation)
            y[t] += w[t, j] * (h @ w2[o:o + f])[0]
    return y


CASES = [(9, 16, (7, 33, 1, 20), 2), (5, 8, (3,), 1), (6, 12, (4, 5, 6), 3),
         (9, 16, (7, 0, 33, 0, 20), 2)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES, ids=[case_id(*c) for c in CASES])
def test_expert_mlp_matches_per_token_loop(case, activation):
    T, d, widths, k = case
    args = make_inputs(T, d, widths, k, activation, F64, device=DEVICE)
    y = reference.expert_mlp(*args, widths, activation)
    assert_close("reference.expert_mlp", y, _expert_mlp_per_token(*args, widths, activation), F64,
                 tol=1e-12)


def test_expert_mlp_repeated_ids_and_zero_tokens():
    widths, d = (4, 6), 8
    x, _, _, w1, w2 = make_inputs(3, d, widths, 2, dtype=F64, device=DEVICE)
    ids = torch.tensor([[1, 1], [0, 1], [0, 0]], device=DEVICE)
    w = torch.rand(3, 2, dtype=F64, device=DEVICE)
    y = reference.expert_mlp(x, ids, w, w1, w2, widths)
    assert_close("repeated ids", y, _expert_mlp_per_token(x, ids, w, w1, w2, widths, "relu2"), F64,
                 tol=1e-12)
    x0, ids0, w0, _, _ = make_inputs(0, d, widths, 2, dtype=F64, device=DEVICE)
    assert reference.expert_mlp(x0, ids0, w0, w1, w2, widths).shape == (0, d)


@pytest.mark.parametrize("T,k,E", [(0, 2, 3), (1, 1, 1), (11, 3, 5), (20, 2, 7)],
                         ids=["T0", "T1-E1", "T11-k3-E5", "T20-k2-E7"])
def test_routing_definition(T, k, E):
    ids = torch.randint(0, E, (T, k), device=DEVICE)
    counts, offsets, s2a, a2s = reference.routing(ids, E)
    flat = ids.reshape(-1).tolist()
    assert counts.tolist() == [flat.count(e) for e in range(E)]
    assert offsets.tolist() == [sum(flat.count(j) for j in range(e)) for e in range(E + 1)]
    expected_order = [a for e in range(E) for a in range(T * k) if flat[a] == e]
    assert s2a.tolist() == expected_order
    assert [expected_order.index(a) for a in range(T * k)] == a2s.tolist()


def test_routing_definition_null_experts():
    widths, T, k = (3, 0, 5, 0), 9, 2
    ids = torch.randint(0, 4, (T, k), device=DEVICE)
    counts, offsets, s2a, a2s = reference.routing(ids, 4, widths)
    flat = ids.reshape(-1).tolist()
    assert counts.tolist() == [flat.count(e) for e in range(4)], "nulls keep their counts"
    live = [e for e in range(4) if widths[e]]
    computed = [flat.count(e) if widths[e] else 0 for e in range(4)]
    assert offsets.tolist() == [sum(computed[:e]) for e in range(5)]
    expected_order = ([a for e in live for a in range(T * k) if flat[a] == e]
                      + [a for a in range(T * k) if not widths[flat[a]]])
    assert s2a.tolist() == expected_order
    assert [expected_order.index(a) for a in range(T * k)] == a2s.tolist()


def test_shared_expert_definition():
    T, d, S = 5, 8, 6
    for activation in ACTIVATIONS:
        g = 2 if activation == "swiglu" else 1
        x = torch.randn(T, d, dtype=F64, device=DEVICE)
        w1s = torch.randn(d, g * S, dtype=F64, device=DEVICE)
        w2s = torch.randn(S, d, dtype=F64, device=DEVICE)
        gate = torch.rand(T, 1, dtype=F64, device=DEVICE)
        y = reference.shared_expert(x, w1s, w2s, activation, gate)
        for t in range(T):
            row = reference.act(x[t:t + 1] @ w1s, activation) @ w2s * gate[t]
            assert_close(f"shared {activation} t={t}", y[t:t + 1], row, F64, tol=1e-12)
        assert torch.equal(reference.shared_expert(x, w1s, w2s, activation),
                           reference.act(x @ w1s, activation) @ w2s)


def test_gather_and_combine_definitions():
    T, k, d = 6, 3, 5
    ids = torch.randint(0, 4, (T, k), device=DEVICE)
    _, _, s2a, a2s = reference.routing(ids, 4)
    x = torch.randn(T, d, dtype=F64, device=DEVICE)
    xs = reference.gather(x, s2a // k)
    for p in range(T * k):
        assert torch.equal(xs[p], x[int(s2a[p]) // k])
    ys = torch.randn(T * k, d, dtype=F64, device=DEVICE)
    w = torch.rand(T, k, dtype=F64, device=DEVICE)
    y = reference.combine(ys, a2s, w, k)
    y1 = reference.combine(ys, a2s, None, k)
    for t in range(T):
        expected = sum(w[t, j] * ys[int(a2s[t * k + j])] for j in range(k))
        assert_close(f"combine token {t}", y[t], expected, F64, tol=1e-14)
        assert_close(f"unweighted token {t}", y1[t], sum(ys[int(a2s[t * k + j])] for j in range(k)),
                     F64, tol=1e-14)


def test_router_probs():
    logits = torch.randn(4, 6, dtype=F64, device=DEVICE)
    assert_close("sigmoid", reference.router_probs(logits, "sigmoid"), 1 / (1 + torch.exp(-logits)),
                 F64, tol=1e-14)
    soft = reference.router_probs(logits, "softmax")
    assert_close("softmax", soft, logits.exp() / logits.exp().sum(-1, keepdim=True), F64, tol=1e-14)
    with pytest.raises(ValueError, match="router"):
        reference.router_probs(logits, "relu")
