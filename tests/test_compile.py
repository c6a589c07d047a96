"""torch.compile: MoEMLP and expert_mlp trace with fullgraph=True and no graph break; forward, aux
losses and every gradient equal eager; a new token count does not recompile under dynamic shapes.

On the CPU (CI) the backend is aot_eager, which runs AOTAutograd's forward and backward graphs with
the operators' real implementations under the Triton interpreter. On a GPU the same checks run
with Inductor in its default, max-autotune-no-cudagraphs and reduce-overhead modes.
"""
from __future__ import annotations

import pytest
import torch

import vmoe
from vmoe import MoEConfig, MoEMLP
from vmoe.ops.utils import device as _utils
from vmoe.testing import DEVICE, ON_GPU, assert_close, make_inputs

BACKENDS = ([("inductor", "default"), ("inductor", "max-autotune-no-cudagraphs"),
             ("inductor", "reduce-overhead")] if ON_GPU else [("aot_eager", None)])
BACKEND_IDS = [f"{b}-{m}" for b, m in BACKENDS]

LAYERS = [
    dict(expert_sizes=[(2, 16), (2, 7)], activation="relu2", router="sigmoid"),
    dict(expert_sizes=[(1, 100), (2, 1), (1, 33)], activation="swiglu", router="softmax"),
    dict(expert_sizes=[(3, 12)], activation="gelu", router="softmax", norm_topk_prob=False),
    dict(expert_sizes=[(2, 12), (2, 0)], activation="swiglu", router="sigmoid",
         shared_expert_width=9, shared_expert_gate=True, max_null_share=0.1),
]
LAYER_IDS = ["relu2-sigmoid-w16x2+7x2", "swiglu-softmax-w100+1x2+33", "gelu-softmax-nonorm-w12x3",
             "swiglu-sigmoid-w12x2+null2-bound-shared9-gate"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(fn, backend, mode, **kw):
    return torch.compile(fn, backend=backend, mode=mode, fullgraph=True, **kw)


def _layer_step(moe, x, dy):
    """What a training loop does: forward, a loss from the output and the aux losses, backward."""
    out, aux, f_i = moe(x)
    loss = (out.float() * dy).sum() + sum(aux.values())
    loss.backward()
    return out.detach(), {k: v.detach() for k, v in aux.items()}, f_i.detach()


def _grads(moe, x):
    grads = {n: p.grad.detach().clone() for n, p in moe.named_parameters()}
    grads["x"] = x.grad.detach().clone()
    moe.zero_grad(set_to_none=True)
    x.grad = None
    return grads


@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_layer_has_no_graph_break(layer):
    moe = MoEMLP(MoEConfig(n_embd=16, num_active_experts=2, **layer)).to(DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    explanation = torch._dynamo.explain(moe)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend,mode", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_compiled_layer_equals_eager(layer, backend, mode):
    moe = MoEMLP(MoEConfig(n_embd=16, num_active_experts=2, **layer)).to(DEVICE)
    x = torch.randn(11, 16, device=DEVICE, requires_grad=True)
    dy = torch.randn(11, 16, device=DEVICE)
    out, aux, f_i = _layer_step(moe, x, dy)
    ref = _grads(moe, x)
    compiled = _compile(moe, backend, mode)
    for _ in range(2 if mode == "reduce-overhead" else 1):  # cudagraphs record on a later call
        c_out, c_aux, c_f = _layer_step(compiled, x, dy)
        got = _grads(moe, x)
    tol = 1e-5
    assert_close("out", c_out, out, torch.float32, tol)
    for name in aux:
        assert_close(name, c_aux[name], aux[name], torch.float32, tol)
    assert torch.equal(c_f, f_i)
    for name in ref:
        assert_close(f"grad {name}", got[name], ref[name], torch.float32, tol)


@pytest.mark.parametrize("backend,mode", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("activation", ["relu2", "swiglu", "silu"])
def test_compiled_expert_mlp_equals_eager(activation, backend, mode):
    widths = (7, 1, 20)
    x, ids, w, w1, w2 = make_inputs(9, 12, widths, 2, activation, torch.float32, DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, w, w1, w2)]

    def fn(x, ids, w, w1, w2):
        return vmoe.expert_mlp(x, ids, w, w1, w2, widths, activation)

    explanation = torch._dynamo.explain(fn)(*leaves[:1], ids, *leaves[1:])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    dy = torch.randn(9, 12, device=DEVICE)
    y = fn(leaves[0], ids, *leaves[1:])
    ref = torch.autograd.grad(y, leaves, dy)
    compiled = _compile(fn, backend, mode)
    for _ in range(2 if mode == "reduce-overhead" else 1):
        c_y = compiled(leaves[0], ids, *leaves[1:])
        got = torch.autograd.grad(c_y, leaves, dy)
    assert_close("y", c_y.detach(), y.detach(), torch.float32)
    for name, a, b in zip(("dx", "dw", "dw1", "dw2"), got, ref):
        assert_close(name, a, b, torch.float32)


def test_dynamic_token_count_does_not_recompile():
    """With dynamic=True, new token counts reuse the first graph."""
    moe = MoEMLP(MoEConfig(n_embd=16, expert_sizes=[(2, 16), (2, 7)], num_active_experts=2)).to(DEVICE)
    backend = "inductor" if ON_GPU else "aot_eager"
    compiled = torch.compile(moe, backend=backend, fullgraph=True, dynamic=True)
    counter = torch._dynamo.utils.counters
    counter.clear()
    for T in (5, 9, 13, 20):
        x = torch.randn(T, 16, device=DEVICE, requires_grad=True)
        out, aux, _ = compiled(x)
        (out.sum() + sum(aux.values())).backward()
        ref, ref_aux, _ = moe(x)
        assert_close(f"out T={T}", out.detach(), ref.detach(), torch.float32, 1e-5)
    assert counter["stats"]["unique_graphs"] == 1, dict(counter["stats"])


def _sgd_step(moe, opt, x):
    out, aux, _ = moe(x)
    loss = out.square().mean() + 0.01 * sum(aux.values())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _reduce_overhead_tracks_eager(cfg, compiled_first: bool):
    torch.manual_seed(0)
    eager = MoEMLP(cfg).to(DEVICE)
    compiled_moe = MoEMLP(cfg).to(DEVICE)
    compiled_moe.load_state_dict(eager.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=1e-2) for m in (eager, compiled_moe)]
    compiled_step = torch.compile(_sgd_step, mode="reduce-overhead")
    for i in range(6):
        x = torch.randn(256, 64, device=DEVICE)  # new tokens: new routing every step
        if compiled_first:
            got = compiled_step(compiled_moe, opts[1], x)
            want = _sgd_step(eager, opts[0], x)
        else:
            want = _sgd_step(eager, opts[0], x)
            got = compiled_step(compiled_moe, opts[1], x)
        assert_close(f"loss step {i}", got, want, torch.float32, 1e-4)
    for (name, p), q in zip(eager.named_parameters(), compiled_moe.parameters()):
        assert_close(name, q.detach(), p.detach(), torch.float32, 1e-4)


@pytest.mark.skipif(not ON_GPU, reason="reduce-overhead (CUDA graphs) needs a GPU")
def test_reduce_overhead_training_step_matches_eager():
    """A whole training step (forward, backward, optimizer) under mode="reduce-overhead", with
    routing that changes every step, tracks the same step run eagerly."""
    cfg = MoEConfig(n_embd=64, expert_sizes=[(2, 64), (4, 32), (2, 16)], num_active_experts=2)
    _reduce_overhead_tracks_eager(cfg, compiled_first=False)


@pytest.mark.skipif(not ON_GPU, reason="reduce-overhead (CUDA graphs) needs a GPU")
def test_reduce_overhead_first_use_of_device_constants():
    """The compiled step is the first to ask for vmoe's cached device constants (widths, column
    offsets), as in a training run resumed from a checkpoint: made inside CUDA graph trees' pool
    they would be live untracked allocations there, and the step would fail."""
    cfg = MoEConfig(n_embd=64, expert_sizes=[(3, 40), (2, 24), (2, 8)], num_active_experts=2,
                    router="softmax")
    _utils._DEVICE_INTS.clear()
    _reduce_overhead_tracks_eager(cfg, compiled_first=True)
