"""The layer's expert computation is capturable in a CUDA graph: no host sync, no data-dependent
grid. Replaying with different routing written into the same input buffers must match eager."""
import pytest
import torch

import vmoe
from vmoe.testing import capture_graph, random_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _inputs(T, d, k, widths, dtype, gen):
    ids = random_ids(T, len(widths), k, "cuda", gen)
    w = torch.rand(T, k, generator=gen)
    return ids, w.to("cuda", dtype)


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_graph_replay_with_new_routing_matches_eager(activation):
    gen = torch.Generator().manual_seed(7)
    T, d, k, widths, dtype = 256, 128, 2, [256, 256, 128, 128, 64, 48], torch.bfloat16
    g = 2 if activation == "swiglu" else 1
    F = sum(widths)
    x = torch.randn(T, d, generator=gen).to("cuda", dtype).requires_grad_()
    w1 = (torch.randn(d, g * F, generator=gen) * d ** -0.5).to("cuda", dtype).requires_grad_()
    w2 = (torch.randn(F, d, generator=gen) * 0.05).to("cuda", dtype).requires_grad_()
    ids_buf, w_buf = _inputs(T, d, k, widths, dtype, gen)
    w_buf.requires_grad_()
    dy = torch.randn(T, d, generator=gen).to("cuda", dtype)

    def step():
        for t in (x, w_buf, w1, w2):
            t.grad = None
        y = vmoe.expert_mlp(x, ids_buf, w_buf, w1, w2, widths, activation)
        y.backward(dy)
        return y

    graph, y_static = capture_graph(step)
    grads_static = [t.grad for t in (x, w_buf, w1, w2)]  # the graph rewrites these on replay

    for _ in range(3):
        ids_new, w_new = _inputs(T, d, k, widths, dtype, gen)
        ids_buf.copy_(ids_new)
        with torch.no_grad():
            w_buf.copy_(w_new)
        graph.replay()
        torch.cuda.synchronize()
        got = [t.clone() for t in [y_static] + grads_static]
        want = [step().detach()] + [t.grad.clone() for t in (x, w_buf, w1, w2)]
        for name, a, b in zip(("y", "dx", "dw", "dw1", "dw2"), got, want):
            assert torch.equal(a, b), f"{name}: graph replay differs from eager"
