"""vmoe.MoEMLP: the default implementation against a copy running the reference loop, and the
auxiliary losses against a straightforward float64 transcription of the formulas in the class
docstring of vmoe/layer.py."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import vmoe.ops.utils.device
from vmoe import MoEConfig, MoEMLP, reference
from vmoe.testing import DEVICE, assert_close, sizes

AUX_KEYS = {"router_z_loss", "load_balance_loss", "compute_loss"}

# (id, config kwargs, input shape); n_embd is the input's last dim.
CASES = [
    ("BSd-sigmoid-norm-relu2", dict(expert_sizes=[(2, 16), (3, 8)], num_active_experts=2,
                                    activation="relu2", router="sigmoid", norm_topk_prob=True),
     (2, 5, 24)),
    ("Td-softmax-nonorm-swiglu", dict(expert_sizes=[(3, 12), (2, 5)], num_active_experts=2,
                                      activation="swiglu", router="softmax", norm_topk_prob=False),
     (11, 16)),
    ("Td-softmax-norm-gelu", dict(expert_sizes=[(2, 7), (2, 33), (2, 1)], num_active_experts=3,
                                  activation="gelu", router="softmax", norm_topk_prob=True),
     (9, 16)),
    ("BSd-sigmoid-nonorm-silu-k1", dict(expert_sizes=[(4, 9)], num_active_experts=1,
                                        activation="silu", router="sigmoid", norm_topk_prob=False),
     (3, 4, 16)),
    ("Td-sigmoid-norm-relu2-kE", dict(expert_sizes=[(2, 6), (1, 20)], num_active_experts=3,
                                      activation="relu2", router="sigmoid", norm_topk_prob=True),
     (6, 16)),
]
# Null experts (width 0) and the shared expert (issue: null and shared experts).
NULL_SHARED_CASES = [
    ("Td-sigmoid-norm-relu2-null", dict(expert_sizes=[(2, 16), (2, 8), (2, 0)],
                                        num_active_experts=2, activation="relu2", router="sigmoid",
                                        norm_topk_prob=True), (11, 16)),
    ("Td-softmax-norm-swiglu-null-shared-gate",
     dict(expert_sizes=[(2, 12), (3, 0)], num_active_experts=3, activation="swiglu",
          router="softmax", norm_topk_prob=True, shared_expert_width=10, shared_expert_gate=True),
     (9, 16)),
    ("BSd-sigmoid-nonorm-gelu-shared", dict(expert_sizes=[(3, 8)], num_active_experts=1,
                                            activation="gelu", router="sigmoid",
                                            norm_topk_prob=False, shared_expert_width=20),
     (2, 4, 16)),
    ("Td-softmax-norm-relu2-null-kE-shared-gate",
     dict(expert_sizes=[(1, 8), (2, 0)], num_active_experts=3, activation="relu2",
          router="softmax", norm_topk_prob=True, shared_expert_width=5, shared_expert_gate=True),
     (7, 16)),
]
CASES += NULL_SHARED_CASES
if DEVICE == "cuda":
    CASES.append(("BSd-softmax-norm-swiglu-gpu",
                  dict(expert_sizes=[(4, 512), (8, 256), (4, 128)], num_active_experts=2,
                       activation="swiglu", router="softmax", norm_topk_prob=True),
                  (4, 256, 384)))


def _pair(cfg_kwargs, n_embd, dtype=torch.float32):
    cfg = MoEConfig(n_embd=n_embd, **cfg_kwargs)
    layer = MoEMLP(cfg).to(DEVICE, dtype)
    ref = MoEMLP(dataclasses.replace(copy.deepcopy(cfg), impl="reference")).to(DEVICE, dtype)
    ref.load_state_dict(layer.state_dict())
    return layer, ref


def _forward_backward(layer, x, dout, coeffs):
    x = x.clone().requires_grad_()
    out, aux, f_i = layer(x)
    loss = (out.float() * dout).sum() + sum(c * aux[name] for name, c in coeffs.items())
    params = [layer.router.weight, layer.w1, layer.w2]
    if layer.shared_gate is not None:
        params.append(layer.shared_gate.weight)
    grads = torch.autograd.grad(loss, params + [x])
    return out, aux, f_i, grads


# Every configuration in fp32; bf16 on three of them, to keep the interpreter suite short.
MATCH_PARAMS = ([pytest.param(*c, torch.float32, id=f"{c[0]}-fp32") for c in CASES]
                + [pytest.param(*c, torch.bfloat16, id=f"{c[0]}-bf16")
                   for c in CASES[:2] + NULL_SHARED_CASES[1:2]])


@pytest.mark.parametrize("name,cfg_kwargs,shape,dtype", MATCH_PARAMS)
def test_matches_reference_layer(name, cfg_kwargs, shape, dtype):
    layer, ref = _pair(cfg_kwargs, shape[-1], dtype)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    dout = torch.randn(shape, device=DEVICE)
    coeffs = {"router_z_loss": 0.01, "load_balance_loss": 0.1, "compute_loss": 0.05}
    out, aux, f_i, grads = _forward_backward(layer, x, dout, coeffs)
    r_out, r_aux, r_f_i, r_grads = _forward_backward(ref, x, dout, coeffs)

    assert out.shape == x.shape and out.dtype == dtype
    assert set(aux) == AUX_KEYS and set(r_aux) == AUX_KEYS
    assert_close("out", out, r_out, dtype)
    # The fused router and the torch path must route identically: the counts behind f_i agree
    # exactly (f_i itself may differ in its last bit: n * (1/A) in the kernel, n / A in torch).
    A = x.numel() // x.shape[-1] * layer.config.num_active_experts
    assert torch.equal((f_i * A).round(), (r_f_i * A).round()), f"f_i {f_i.tolist()} != {r_f_i.tolist()}"
    assert_close("f_i", f_i, r_f_i, torch.float32, tol=1e-6)
    for key in AUX_KEYS:
        assert_close(key, aux[key], r_aux[key], torch.float32, tol=1e-6)
    names = ["router.weight", "w1", "w2"] + ["shared_gate.weight"] * (layer.shared_gate is not None)
    assert len(grads) == len(names) + 1
    for pname, g, r in zip(names + ["x"], grads, r_grads):
        assert_close(f"grad {pname}", g, r, dtype)


@pytest.mark.parametrize("name,cfg_kwargs,shape", CASES, ids=[c[0] for c in CASES])
def test_f_i(name, cfg_kwargs, shape):
    layer = MoEMLP(MoEConfig(n_embd=shape[-1], **cfg_kwargs)).to(DEVICE)
    with torch.no_grad():
        _, _, f_i = layer(torch.randn(shape, device=DEVICE))
    cfg = layer.config
    assert f_i.shape == (cfg.num_experts,)
    assert abs(float(f_i.sum()) - 1.0) < 1e-6, f"f_i sums to {float(f_i.sum())}"
    assert bool((f_i >= 0).all())
    T = math.prod(shape[:-1])
    counts = f_i * T * cfg.num_active_experts
    assert torch.allclose(counts, counts.round(), atol=1e-4), "f_i must be counts / (T*k)"


def _aux_by_hand(cfg, router_weight, x):
    """The docstring formulas of MoEMLP, in float64; also returns the counts n_e of the top-k."""
    x2 = x.reshape(-1, cfg.n_embd).double()
    logits = x2 @ router_weight.double().T                                 # [T, E]
    if cfg.router == "softmax":
        P = torch.softmax(logits, dim=-1)
    else:
        P = torch.sigmoid(logits)
    E, k = cfg.num_experts, cfg.num_active_experts
    ids = P.topk(k, dim=-1).indices
    n = torch.zeros(E, dtype=torch.float64, device=x.device)
    for e in ids.reshape(-1).tolist():
        n[e] += 1

    z_loss = (torch.logsumexp(logits, dim=-1) ** 2).mean()

    group_losses, start = [], 0
    p_mean = P.mean(0)
    for count, _ in cfg.expert_sizes:
        g = slice(start, start + count)
        f = n[g] / n[g].sum() if n[g].sum() > 0 else torch.zeros_like(n[g])
        p = p_mean[g] / p_mean[g].sum()
        group_losses.append(count * (f * p).sum())
        start += count
    lb_loss = sum(group_losses) / len(group_losses)

    widths = torch.tensor(cfg.expert_widths, dtype=torch.float64, device=x.device)
    compute_loss = (P * widths).sum(-1).mean() / widths.mean()
    return {"router_z_loss": z_loss, "load_balance_loss": lb_loss, "compute_loss": compute_loss}, n


@pytest.mark.parametrize("name,cfg_kwargs,shape", CASES, ids=[c[0] for c in CASES])
def test_aux_losses_by_hand(name, cfg_kwargs, shape):
    layer = MoEMLP(MoEConfig(n_embd=shape[-1], **cfg_kwargs)).to(DEVICE)
    x = torch.randn(shape, device=DEVICE)
    with torch.no_grad():
        _, aux, f_i = layer(x)
    expected, n = _aux_by_hand(layer.config, layer.router.weight, x)
    T = math.prod(shape[:-1])
    assert torch.equal((f_i.double() * T * layer.config.num_active_experts).round(), n), \
        "the layer's top-k differs from the float64 top-k (a near tie?)"
    for key in AUX_KEYS:
        assert_close(key, aux[key], expected[key], torch.float32)


def test_load_balance_is_one_when_balanced():
    """Uniform probabilities and equal counts: the switch-style loss is 1 (its docstring's
    'balanced' value), the z-loss log(E)^2 and the compute loss 1. Counts are set by hand, since
    top-k over tied probabilities would not split evenly."""
    layer = MoEMLP(MoEConfig(n_embd=8, expert_sizes=[(4, 8), (2, 4)], num_active_experts=2)).to(DEVICE)
    T, E = 12, 6
    logits = torch.zeros(T, E, device=DEVICE)
    probs = torch.softmax(logits, dim=-1)
    counts = torch.full((E,), 4.0, device=DEVICE)
    aux = layer.aux_losses(logits, probs, counts)
    assert abs(float(aux["load_balance_loss"]) - 1.0) < 1e-6
    assert abs(float(aux["router_z_loss"]) - math.log(E) ** 2) < 1e-5
    assert abs(float(aux["compute_loss"]) - 1.0) < 1e-6


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_aux_losses_differentiable(router):
    layer = MoEMLP(MoEConfig(n_embd=16, expert_sizes=[(3, 8), (2, 4)], num_active_experts=2,
                             router=router)).to(DEVICE)
    x = torch.randn(10, 16, device=DEVICE)
    _, aux, _ = layer(x)
    for key in sorted(AUX_KEYS):
        (g,) = torch.autograd.grad(aux[key], layer.router.weight, retain_graph=True)
        assert not torch.isnan(g).any(), f"{key}: NaN gradient"
        assert float(g.abs().max()) > 0, f"{key} has a zero gradient w.r.t. the router weight"
        # The gradient is the one of the by-hand formula (the counts are constants).
        w = layer.router.weight.detach().double().requires_grad_()
        expected, _ = _aux_by_hand(layer.config, w, x)
        (g_ref,) = torch.autograd.grad(expected[key], w)
        assert_close(f"d {key} / d router", g, g_ref, torch.float32)


def test_zero_tokens():
    layer = MoEMLP(MoEConfig(n_embd=16, expert_sizes=[(2, 8), (2, 4)], num_active_experts=2)).to(DEVICE)
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    out, aux, f_i = layer(x)
    assert out.shape == (0, 16)
    assert set(aux) == AUX_KEYS
    for key in AUX_KEYS:
        assert aux[key].item() == 0.0, key
    assert not torch.isnan(f_i).any()
    out.sum().backward()
    assert layer.w1.grad is not None and bool((layer.w1.grad == 0).all())
    assert layer.w2.grad is not None and bool((layer.w2.grad == 0).all())


def test_batched_equals_flat():
    layer = MoEMLP(MoEConfig(n_embd=16, expert_sizes=[(2, 8), (2, 5)], num_active_experts=2)).to(DEVICE)
    x = torch.randn(sizes(2, 4), 5, 16, device=DEVICE)
    with torch.no_grad():
        out3, aux3, f3 = layer(x)
        out2, aux2, f2 = layer(x.reshape(-1, 16))
    assert torch.equal(out3.reshape(-1, 16), out2)
    assert torch.equal(f3, f2)
    for key in AUX_KEYS:
        assert torch.equal(aux3[key], aux2[key])


def _gpu_activities(fn) -> list[str]:
    """Names of the GPU activities (kernels, memsets, copies) that ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA launches")
@pytest.mark.parametrize("activation,router,extra", [
    ("relu2", "sigmoid", {}), ("swiglu", "softmax", {}),
    ("swiglu", "softmax", dict(shared_expert_width=768, shared_expert_gate=True))],
    ids=["relu2-sigmoid", "swiglu-softmax", "swiglu-softmax-null-shared-gate"])
def test_launch_budget(activation, router, extra, monkeypatch):
    """The whole layer in a training step: at most 8 GPU launches in the forward and 12 in the
    backward (router GEMM, the fused router, the expert kernels, and their gradients). A gated
    shared expert may add 4 to the forward (the routing's extra slot, the gate's GEMM, its sigmoid,
    the weights' concatenation) and 6 to the backward (the gate's sigmoid, its two GEMMs, one
    split-K reduction, the add into dx, and the copy of the routed slots' weight gradient)."""
    monkeypatch.setattr(vmoe.ops.utils.device, "_POISONING", False)  # the tests' NaN fills are launches too
    sizes_ = [(4, 512), (8, 256), (4, 128)] + ([(4, 0)] if extra else [])
    cfg = MoEConfig(n_embd=256, expert_sizes=sizes_, num_active_experts=2,
                    activation=activation, router=router, **extra)
    moe = MoEMLP(cfg).to(DEVICE, torch.bfloat16)
    x = torch.randn(4096, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    for _ in range(2):  # warm up: autotuning, allocator, cached device constants
        out, aux, _ = moe(x)
        ((out * dy).sum() + sum(aux.values())).backward()
    moe.zero_grad(set_to_none=True)  # else the backward adds into .grad: launches of its own
    x.grad = None
    result = {}
    forward = _gpu_activities(lambda: result.update(zip(("out", "aux", "f_i"), moe(x))))
    # The layer's backward alone: the gradients arrive as given tensors, so no kernel of a loss
    # (a fill of ones, a multiply by dy) is counted.
    outputs = [result["out"], *result["aux"].values()]
    grads = [dy] + [torch.ones((), device=DEVICE) for _ in result["aux"]]
    backward = _gpu_activities(lambda: torch.autograd.backward(outputs, grads))
    print(f"\nforward {len(forward)} launches: {forward}\nbackward {len(backward)} launches: {backward}")
    assert len(forward) <= 8 + (4 if extra else 0), forward
    assert len(backward) <= 12 + (6 if extra else 0), backward


def test_backward_fills_no_zero_gradients(monkeypatch):
    """The layer's backward allocates no zero-filled gradient for its non-differentiable outputs
    (the ragged Z, the rows ys, the routing arrays): on a GPU each would be a memset launch, the
    one of Z as large as the worst-case ragged buffer. Counted at the aten level, so it runs on the
    CPU too. One step runs first: on a GPU the autotuner's first launch of each kernel benchmarks
    its configs, and Triton's benchmark clears the L2 cache with a ``zero_`` per repetition."""
    from torch.profiler import ProfilerActivity, profile

    # the tests' NaN fills are not the layer's
    monkeypatch.setattr(vmoe.ops.utils.device, "_POISONING", False)
    moe = MoEMLP(MoEConfig(n_embd=16, expert_sizes=[(2, 16), (2, 8)], num_active_experts=2))
    moe = moe.to(DEVICE)
    x = torch.randn(20, 16, device=DEVICE, requires_grad=True)

    def forward():
        out, aux, _ = moe(x)
        return [out, *aux.values()], [torch.randn_like(out)] + [torch.ones((), device=DEVICE)] * len(aux)

    torch.autograd.backward(*forward())  # tunes; the profiled step is what training repeats
    outputs, grads = forward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.autograd.backward(outputs, grads)
    fills = [e.name for e in prof.events()
             if e.name in ("aten::zeros", "aten::zeros_like", "aten::zero_", "aten::fill_")]
    assert fills == [], fills


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("activation,router,gate", [("swiglu", "softmax", True),
                                                    ("relu2", "sigmoid", False)],
                         ids=["swiglu-softmax-gate", "relu2-sigmoid-nogate"])
def test_null_and_shared_by_hand(activation, router, gate, impl):
    """The pinned semantics, token by token in float64: null experts add exactly nothing, the
    weights are normalised over all k choices (nulls included), and the shared expert adds
    ``gate * act(x @ w1[:, gF:]) @ w2[F:]`` with gate = sigmoid(shared_gate(x)) or 1."""
    cfg = MoEConfig(n_embd=16, expert_sizes=[(2, 6), (2, 0), (1, 9)], num_active_experts=3,
                    activation=activation, router=router, shared_expert_width=7,
                    shared_expert_gate=gate, impl=impl)
    dtype = torch.float64 if impl == "reference" else torch.float32
    layer = MoEMLP(cfg).to(DEVICE, dtype)
    x = torch.randn(10, 16, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        out, _, f_i = layer(x)
        xd = x.double()
        w1, w2 = layer.w1.double(), layer.w2.double()
        logits = xd @ layer.router.weight.double().T
        P = torch.softmax(logits, -1) if router == "softmax" else torch.sigmoid(logits)
        g, widths = (2 if activation == "swiglu" else 1), cfg.kernel_widths
        starts = [sum(widths[:e]) for e in range(len(widths))]
        expected = torch.zeros_like(xd)
        for t in range(10):
            top = P[t].topk(3).indices.tolist()
            for e in top:
                o, f = starts[e], widths[e]
                if f:
                    h = reference.act(xd[t:t + 1] @ w1[:, g * o:g * (o + f)], activation)
                    expected[t] += P[t, e] / P[t, top].sum() * (h @ w2[o:o + f])[0]
            o, f = starts[-1], widths[-1]
            h = reference.act(xd[t:t + 1] @ w1[:, g * o:], activation)
            scale = torch.sigmoid(xd[t] @ layer.shared_gate.weight.double()[0]) if gate else 1.0
            expected[t] += scale * (h @ w2[o:])[0]
    assert f_i.shape == (cfg.num_experts,), "f_i covers the routed experts only"
    # In float64 only the router's probabilities are rounded (MoEMLP computes them in fp32).
    assert_close("out", out, expected, dtype, tol=1e-6 if dtype == torch.float64 else None)


# The null-share bound (MoEConfig.max_null_share): a router that sends most slots to the null group.
NULL_BOUND = dict(expert_sizes=[(2, 16), (3, 0), (1, 8), (1, 0)], num_active_experts=2,
                  activation="relu2", router="softmax")


def _null_heavy_layer(bound, impl="auto", seed=0):
    torch.manual_seed(seed)
    layer = MoEMLP(MoEConfig(n_embd=16, max_null_share=bound, impl=impl, **NULL_BOUND)).to(DEVICE)
    with torch.no_grad():  # with _null_inputs' feature 0 at 2: the null logits rise by 3
        for lo, hi in layer.config.null_ranges:
            layer.router.weight[lo:hi, 0] += 1.5
    return layer


def _null_inputs(T):
    x = torch.randn(T, 16, device=DEVICE)
    x[:, 0] = 2.0
    return x


def _null_share_by_hand(cfg, router_weight, x, bound):
    """relu(s - bound) * p in float64: s the null share of the float64 top-k, p the null experts'
    summed mean softmax probability."""
    P = torch.softmax(x.double() @ router_weight.double().T, dim=-1)
    ids = P.topk(cfg.num_active_experts, dim=-1).indices
    null = [e for lo, hi in cfg.null_ranges for e in range(lo, hi)]
    share = torch.isin(ids, torch.tensor(null, device=ids.device)).double().mean()
    p = P.mean(0)[null].sum()
    return torch.relu(share - bound) * p, float(share)


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("bound", [0.1, 0.95], ids=["above-bound", "within-bound"])
def test_null_share_loss_by_hand(impl, bound):
    """The loss and its gradient w.r.t. the router weight against the float64 formula: positive
    with a gradient above the bound, exactly 0 with a zero gradient within it."""
    layer = _null_heavy_layer(bound, impl)
    x = _null_inputs(40)
    _, aux, f_i = layer(x)
    assert set(aux) == AUX_KEYS | {"null_share_loss"}
    assert aux["null_share_loss"].dtype == torch.float32
    w = layer.router.weight.detach().double().requires_grad_()
    expected, share = _null_share_by_hand(layer.config, w, x, bound)
    null = [e for lo, hi in layer.config.null_ranges for e in range(lo, hi)]
    assert abs(float(f_i[null].sum()) - share) < 1e-6, "the layer's top-k differs from float64's"
    assert_close("null_share_loss", aux["null_share_loss"], expected, torch.float32)
    (g,) = torch.autograd.grad(aux["null_share_loss"], layer.router.weight)
    (g_ref,) = torch.autograd.grad(expected, w)
    assert_close("d null_share_loss / d router", g, g_ref, torch.float32)
    if bound < share:
        assert float(aux["null_share_loss"].detach()) > 0 and float(g.abs().max()) > 0
    else:
        assert float(aux["null_share_loss"].detach()) == 0 and float(g.abs().max()) == 0


def test_null_share_loss_lowers_the_null_share():
    """A few SGD steps on the loss alone take the null experts' share down to the bound."""
    layer = _null_heavy_layer(0.25)
    x = _null_inputs(64)
    opt = torch.optim.SGD(layer.router.parameters(), lr=20.0)
    null = [e for lo, hi in layer.config.null_ranges for e in range(lo, hi)]
    shares = []
    for _ in range(30):
        _, aux, f_i = layer(x)
        shares.append(float(f_i[null].sum()))
        opt.zero_grad()
        aux["null_share_loss"].backward()
        opt.step()
    assert shares[0] > 0.5, f"the setup should start null-heavy, got {shares[0]:.2f}"
    assert shares[-1] <= 0.25 + 1 / 64, f"null share {shares[0]:.2f} -> {shares[-1]:.2f}"


def test_no_null_share_loss_without_a_bound():
    layer = MoEMLP(MoEConfig(n_embd=16, **NULL_BOUND)).to(DEVICE)
    _, aux, _ = layer(torch.randn(5, 16, device=DEVICE))
    assert set(aux) == AUX_KEYS


@pytest.mark.parametrize("bound,match", [(0, "max_null_share"), (1, "max_null_share"),
                                         (-0.1, "max_null_share"), ("0.2", "max_null_share"),
                                         (True, "max_null_share")])
def test_null_share_bound_is_checked(bound, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(n_embd=16, max_null_share=bound, **NULL_BOUND)


def test_null_share_bound_needs_a_null_expert():
    with pytest.raises(ValueError, match="no null expert"):
        MoEConfig(n_embd=16, expert_sizes=[(4, 8)], max_null_share=0.2)


def test_null_share_loss_with_zero_tokens():
    layer = _null_heavy_layer(0.2)
    _, aux, _ = layer(torch.randn(0, 16, device=DEVICE))
    assert float(aux["null_share_loss"].detach()) == 0.0
