"""vmoe as a transformers experts backend (vmoe.hf), and the per-expert weight layout under it.

The per-expert layout (``w1 [E, d, g*f]``, ``w2 [E, f, d]`` for E experts of one width f, any dense
strides: a transformers ``gate_up_proj [E, 2I, d]`` and ``down_proj [E, d, I]``, f = I, seen
through ``.transpose(1, 2)``) is checked at the kernel level against vmoe.reference in float64,
outputs and every gradient, and the gradients must reach the parameters in their own layout. The
backend is then checked on tiny random-init transformers models built from their config classes
(no downloads): logits and every parameter gradient equal ``experts_implementation="eager"``.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vmoe import library as ops
from vmoe import reference
from vmoe.autograd import apply_experts
from vmoe.config import gate_factor
from vmoe.ops import grouped_gemm as gg
from vmoe.testing import DEVICE, HF_MODELS, assert_close, rel_err, tiny_hf_model

transformers = pytest.importorskip("transformers")
import vmoe.hf as hf  # noqa: E402  (needs transformers)

HF_TOL = 1e-4  # fp32: the model's logits and gradients against the eager experts loop

# --- the per-expert layout at the kernel level ------------------------------------------------

# (T, d, E, f, k, activation, layout, experts left empty): "hf" is a transformers parameter seen
# through a transposed view (unit stride along d), "flat" a contiguous [E, d, g*f] / [E, f, d]
# (transformers' is_transposed=True), "inner" the experts dimension inside ([d, E, g*f] permuted:
# addressable in place), "sliced" a non-dense slice (copied to contiguous first).
LAYOUT_CASES = [
    (9, 24, 4, 16, 2, "swiglu", "hf", ()),
    (9, 24, 4, 16, 2, "swiglu", "flat", ()),
    (9, 24, 4, 12, 2, "relu2", "hf", ()),
    (7, 20, 3, 10, 2, "gelu", "hf", ()),
    (7, 20, 3, 10, 2, "silu", "flat", ()),
    (8, 16, 4, 8, 2, "swiglu", "hf", (1,)),
    (5, 16, 3, 8, 3, "swiglu", "hf", ()),
    (1, 16, 4, 8, 2, "swiglu", "hf", ()),
    (0, 16, 4, 8, 2, "relu2", "hf", ()),
    (6, 16, 3, 8, 2, "swiglu", "inner", ()),
    (6, 16, 3, 8, 2, "swiglu", "sliced", ()),
]
LAYOUT_IDS = [f"T{T}-d{d}-E{E}-f{f}-k{k}-{a}-{lay}" + (f"-empty{list(em)}" if em else "")
              for T, d, E, f, k, a, lay, em in LAYOUT_CASES]
for _i, _c in enumerate(LAYOUT_CASES):
    if _c[4] == _c[2]:
        LAYOUT_IDS[_i] += "-k=E"


def _per_expert(E, d, f, g, layout, dtype=torch.float32):
    """Leaf parameters and the per-expert views of them: ``(params, w1 [E, d, g*f], w2 [E, f, d])``."""
    def randn(*shape, scale):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_()
    s1, s2 = d ** -0.5, f ** -0.5
    if layout == "hf":
        up, down = randn(E, g * f, d, scale=s1), randn(E, d, f, scale=s2)
        return (up, down), up.transpose(1, 2), down.transpose(1, 2)
    if layout == "flat":
        up, down = randn(E, d, g * f, scale=s1), randn(E, f, d, scale=s2)
        return (up, down), up, down
    if layout == "inner":
        up, down = randn(d, E, g * f, scale=s1), randn(f, E, d, scale=s2)
        return (up, down), up.permute(1, 0, 2), down.permute(1, 0, 2)
    up, down = randn(E, d, g * f + 3, scale=s1), randn(E, f, d + 5, scale=s2)
    return (up, down), up[:, :, :g * f], down[:, :, :d]


def _layout_problem(T, d, E, f, k, activation, layout, empty, dtype=torch.float32):
    live = torch.tensor([e for e in range(E) if e not in empty])
    if k == E:
        ids = torch.stack([torch.randperm(E) for _ in range(T)]) if T else torch.zeros(0, k)
    else:
        ids = live[torch.randint(0, len(live), (T, k))]
    ids = ids.long().to(DEVICE)
    x = torch.randn(T, d, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.rand(T, k, device=DEVICE) + 0.1).to(dtype).requires_grad_()
    params, w1, w2 = _per_expert(E, d, f, gate_factor(activation), layout, dtype)
    return x, ids, w, params, w1, w2


def _reference(x, ids, w, params, layout, E, d, f, activation, dy):
    """The float64 oracle on 2-D copies of the per-expert weights, and its gradients."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w, *params)]
    xr, wr, up, down = leaves
    _, w1, w2 = {"hf": (None, up.transpose(1, 2), down.transpose(1, 2)),
                 "flat": (None, up, down),
                 "inner": (None, up.permute(1, 0, 2), down.permute(1, 0, 2)),
                 "sliced": (None, up[:, :, :gate_factor(activation) * f], down[:, :, :d])}[layout]
    g = gate_factor(activation)
    y = reference.expert_mlp(xr, ids, wr, w1.permute(1, 0, 2).reshape(d, E * g * f),
                             w2.reshape(E * f, d), (f,) * E, activation)
    return y, torch.autograd.grad(y, leaves, dy.double(), allow_unused=True)


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=LAYOUT_IDS)
def test_per_expert_layout(case):
    T, d, E, f, k, activation, layout, empty = case
    x, ids, w, params, w1, w2 = _layout_problem(*case)
    widths = (f,) * E
    in_place = layout != "sliced"
    assert (gg.kernel_weight(w1, widths) is w1) == in_place
    assert (gg.kernel_weight(w2, widths) is w2) == in_place
    y = apply_experts(x, w, w1, w2, ops.routing(ids, widths), widths, activation)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, *params), dy)
    y_ref, grads_ref = _reference(x, ids, w, params, layout, E, d, f, activation, dy)
    assert_close("y", y, y_ref, torch.float32)
    for name, got, want in zip(("dx", "dw", "d_up", "d_down"), grads, grads_ref):
        assert_close(name, got, want, torch.float32)
    for p, grad in zip(params, grads[2:]):
        # The gradient reaches each parameter in the parameter's own layout (no copy into it).
        assert grad.shape == p.shape and (grad.stride() == p.stride() or layout == "sliced")
    for e in empty:  # an expert with no tokens gets a zero gradient, written, not left as is
        assert layout in ("hf", "flat")
        assert bool((grads[2][e] == 0).all()) and bool((grads[3][e] == 0).all())


def test_per_expert_rules():
    """Which 3-D weights the kernels take in place, and what they refuse."""
    widths = (8,) * 4
    base = torch.zeros(4, 16, 32)
    assert gg.per_expert_weight(base.transpose(1, 2), widths)         # [E, d, 2I] of [E, 2I, d]
    assert gg.per_expert_weight(base, widths)
    assert not gg.per_expert_weight(base, (8, 8, 8, 16))               # widths differ
    assert not gg.per_expert_weight(base, (8,) * 3)                     # E mismatch
    assert not gg.per_expert_weight(base[:, :, :30], widths)           # not dense
    assert not gg.per_expert_weight(torch.zeros(16, 32, 4).permute(2, 0, 1), widths)  # stride(0)=1
    assert not gg.per_expert_weight(torch.zeros(16, 32), widths)       # vmoe's own 2-D layout
    assert gg.uniform_width(widths) == 8 and gg.uniform_width((8, 0)) == 0


@pytest.mark.parametrize("layout", ["hf", "flat"])
def test_per_expert_layout_descriptor_path(layout, gemm_launches):
    """A weight read through a transposed view (last stride != 1) never takes the descriptor
    path; a contiguous per-expert weight does, and both stay correct (bf16 in the interpreter)."""
    seen = gemm_launches
    T, d, E, f, k = 9, 32, 4, 16, 2
    x, ids, w, params, w1, w2 = _layout_problem(T, d, E, f, k, "swiglu", layout, (),
                                                dtype=torch.bfloat16)
    with gg.tma_mode("only"):
        y = apply_experts(x, w, w1, w2, ops.routing(ids, (f,) * E), (f,) * E, "swiglu")
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, *params), dy)
    y_ref, grads_ref = _reference(x, ids, w, params, layout, E, d, f, "swiglu", dy)
    assert_close("y", y, y_ref, torch.bfloat16)
    for name, got, want in zip(("dx", "dw", "d_up", "d_down"), grads, grads_ref):
        assert_close(name, got, want, torch.bfloat16)
    rows = [ok for kernel, ok in seen if kernel is not gg._wgrad_kernel and ok is not None]
    if layout == "hf":
        assert rows and all(ok == gg.TMA_NO for ok in rows)
    else:
        assert any(kernel is gg._rows_ws_kernel for kernel, _ in seen) or \
            rows and all(ok == gg.TMA_ONLY for ok in rows)


def test_descriptor_eligibility_needs_unit_last_stride():
    w = torch.zeros(32, 48, device=DEVICE, dtype=torch.bfloat16)
    if not gg.tma_eligible(torch.device(DEVICE), torch.bfloat16, (8, 16), 32, [(w, 48)]):
        pytest.skip("no descriptor path on this device")
    assert not gg.tma_eligible(torch.device(DEVICE), torch.bfloat16, (8, 16), 32, [(w.t(), 32)])


@pytest.mark.parametrize("needs", [(True, True, True, True), (False, False, True, True)],
                         ids=["all", "weights"])
def test_opcheck_per_expert_backward(needs):
    """The operators' fake implementations give a per-expert weight's gradient its strides."""
    T, d, E, f, k = 7, 16, 3, 8, 2
    x, ids, w, params, w1, w2 = _layout_problem(T, d, E, f, k, "swiglu", "hf", ())
    x, w, w1, w2 = (t.detach() for t in (x, w, w1, w2))
    routing = ops.routing(ids, (f,) * E)
    _, z, ys = ops.expert_mlp_impl(x, w, w1, w2, *routing, (f,) * E, "swiglu", True)
    torch.library.opcheck(ops.expert_mlp_op, (x, w, w1, w2, *routing, (f,) * E, "swiglu", False))
    torch.library.opcheck(ops.expert_mlp_backward_op,
                          (torch.randn_like(x), x, w, w1, w2, z, ys, *routing, (f,) * E, "swiglu",
                           needs))


# --- transformers models ----------------------------------------------------------------------

def _step(model, ids, implementation):
    """Logits and every parameter's gradient of the LM loss, with the given experts backend."""
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", HF_MODELS)
def test_model_equals_eager(name):
    model = tiny_hf_model(name)
    ids = torch.randint(0, 64, (2, 7), device=DEVICE)
    logits_ref, grads_ref = _step(model, ids, "eager")
    logits, grads = _step(model, ids, hf.NAME)
    assert model.config._experts_implementation == hf.NAME
    errs = {"logits": rel_err(logits, logits_ref)}
    errs.update({n: rel_err(grads[n], grads_ref[n]) for n in grads_ref})
    bad = {n: e for n, e in errs.items() if not e <= HF_TOL}
    assert not bad, f"{name}: rel err above {HF_TOL}: {bad}"
    experts = [n for n in grads if "experts" in n]
    assert experts and all(grads[n].is_contiguous() for n in experts)


def test_save_and_load_round_trip(tmp_path):
    """A model trained a step on vmoe saves and loads as an ordinary transformers checkpoint, with
    either backend."""
    model = tiny_hf_model("qwen3_moe")
    ids = torch.randint(0, 64, (2, 7), device=DEVICE)
    model.set_experts_implementation(hf.NAME)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    for impl in (hf.NAME, "eager"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, experts_implementation=impl).to(DEVICE)
        assert loaded.config._experts_implementation == impl
        with torch.no_grad():
            assert rel_err(loaded(ids).logits, logits) <= HF_TOL, impl


def test_sentinel_ids_add_nothing():
    """Expert-parallel sentinels (ids >= E) contribute nothing and get no routing gradient."""
    model = tiny_hf_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    experts._is_expert_parallel = True
    E, T, k = experts.num_experts, 6, 2
    x = torch.randn(T, 32, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, E, (T, k), device=DEVICE)
    sentinel = torch.zeros(T, k, dtype=torch.bool, device=DEVICE)
    sentinel[0, 1] = sentinel[3, 0] = sentinel[5, 1] = True
    ids = torch.where(sentinel, torch.full_like(ids, E), ids)
    ids[5, 1] = E + 3
    w = (torch.rand(T, k, device=DEVICE) + 0.1).requires_grad_()
    model.set_experts_implementation(hf.NAME)
    y = experts(x, ids, w)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    # The oracle: the same slots pointed at expert 0 with weight 0.
    model.set_experts_implementation("eager")
    w_ref = w.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = experts(x_ref, torch.where(sentinel, 0, ids), torch.where(sentinel, 0.0, w_ref))
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x_ref, w_ref), dy)
    assert_close("y", y, y_ref, torch.float32)
    assert_close("dx", dx, dx_ref, torch.float32)
    assert_close("dw (live slots)", dw[~sentinel], dw_ref[~sentinel], torch.float32)
    assert bool((dw[sentinel] == 0).all())


def test_unsupported_variant_raises_when_chosen():
    """gpt-oss (biases, interleaved gate/up, clamped SwiGLU) is refused when "vmoe" is chosen,
    naming the model class and each missing feature; the model keeps its implementation."""
    config = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=16,
                                       num_local_experts=4, num_experts_per_tok=2,
                                       num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8)
    model = transformers.GptOssForCausalLM(config)
    before = model.config._experts_implementation
    with pytest.raises(hf.UnsupportedExperts, match="GptOssForCausalLM") as info:
        model.set_experts_implementation(hf.NAME)
    for feature in ("GptOssExperts", "has_bias=True", "is_concatenated=False", "custom gate"):
        assert feature in str(info.value)
    assert model.config._experts_implementation == before
    config._experts_implementation = hf.NAME
    with pytest.raises(hf.UnsupportedExperts, match="GptOss"):
        transformers.GptOssForCausalLM(config)


def _synthetic(flags, act, E=4, d=32, f=16):
    """A transformers experts module of any decorator flags and activation, with random weights."""
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(**flags)
    class SyntheticExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, self.act_fn = E, ACT2FN[act]
            g = 2 if flags.get("has_gate", True) else 1
            up = (E, d, g * f) if flags.get("is_transposed") else (E, g * f, d)
            down = (E, f, d) if flags.get("is_transposed") else (E, d, f)
            name = "gate_up_proj" if g == 2 else "up_proj"
            setattr(self, name, torch.nn.Parameter(torch.randn(*up) * d ** -0.5))
            self.down_proj = torch.nn.Parameter(torch.randn(*down) * f ** -0.5)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the registry dispatches, never this forward")

    config = transformers.PretrainedConfig()
    config._experts_implementation = hf.NAME
    return SyntheticExperts(config).to(DEVICE)


@pytest.mark.parametrize("flags,act", [
    (dict(is_transposed=True), "silu"),
    (dict(has_gate=False), "relu2"),
    (dict(has_gate=False, is_transposed=True), "gelu"),
    (dict(has_gate=False), "silu"),
], ids=["gated-transposed-silu", "ungated-relu2", "ungated-transposed-gelu", "ungated-silu"])
def test_layouts_and_activations_equal_batched_mm(flags, act):
    """The decorator's other layouts, against transformers' own batched_mm backend."""
    from transformers.integrations.moe import batched_mm_experts_forward

    experts = _synthetic(flags, act)
    x = torch.randn(7, 32, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, 4, (7, 2), device=DEVICE)
    w = torch.rand(7, 2, device=DEVICE, requires_grad=True)
    leaves = [x, w, *experts.parameters()]
    y = experts(x, ids, w)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    y_ref = batched_mm_experts_forward(experts, x, ids, w)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    assert_close("y", y, y_ref, torch.float32, tol=HF_TOL)
    for i, (got, want) in enumerate(zip(grads, grads_ref)):
        assert_close(f"grad {i}", got, want, torch.float32, tol=HF_TOL)


@pytest.mark.parametrize("flags,act,feature", [
    (dict(), "gelu", "a gelu gate"),
    (dict(), "gelu_pytorch_tanh", "GELUTanh"),
    (dict(has_gate=False), "gelu_new", "NewGELUActivation"),
    (dict(has_bias=True), "silu", "has_bias=True"),
], ids=["gelu-gate", "tanh-gelu-gate", "tanh-gelu", "bias"])
def test_unsupported_experts_raise_on_call(flags, act, feature):
    """Without a model to check at selection, the first call refuses."""
    experts = _synthetic(flags, act)
    with pytest.raises(hf.UnsupportedExperts, match="SyntheticExperts") as info:
        experts(torch.randn(3, 32, device=DEVICE), torch.zeros(3, 2, dtype=torch.long,
                                                                  device=DEVICE),
                torch.ones(3, 2, device=DEVICE))
    assert feature in str(info.value)


def test_bad_inputs_raise():
    experts = _synthetic(dict(), "silu")
    x, ids, w = (torch.randn(3, 32, device=DEVICE), torch.zeros(3, 2, dtype=torch.long, device=DEVICE),
                 torch.ones(3, 2, device=DEVICE))
    with pytest.raises(ValueError, match=r"x must be \[T, d\]"):
        experts(x[None], ids, w)
    with pytest.raises(TypeError, match="integer tensor"):
        experts(x, ids.float(), w)
    with pytest.raises(ValueError, match=r"topk_ids must be \[T, k\]"):
        experts(x, ids[:2], w)
    with pytest.raises(ValueError, match="w1 must be"):
        experts(x[:, :16], ids, w)
    with pytest.raises(ValueError, match="topk_weights must have"):
        experts(x, ids, w[:, :1])


def test_compile_fullgraph():
    """The experts call traces with fullgraph=True (aot_eager on the CPU, Inductor on a GPU) and
    computes what eager computes, gradients included."""
    torch._dynamo.reset()
    model = tiny_hf_model("qwen3_moe")
    model.set_experts_implementation(hf.NAME)
    experts = model.model.layers[0].mlp.experts
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(experts, backend=backend, fullgraph=True)
    x = torch.randn(6, 32, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, 4, (6, 2), device=DEVICE)
    w = torch.rand(6, 2, device=DEVICE, requires_grad=True)
    leaves = [x, w, experts.gate_up_proj, experts.down_proj]
    y = compiled(x, ids, w)
    grads = torch.autograd.grad(y.square().sum(), leaves)
    y_ref = experts(x, ids, w)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), leaves)
    assert_close("y", y, y_ref, torch.float32)
    for i, (got, want) in enumerate(zip(grads, grads_ref)):
        assert_close(f"grad {i}", got, want, torch.float32)
    torch._dynamo.reset()


def test_autocast():
    """Under autocast an fp32 model's experts compute in the autocast dtype, as eager's
    ``F.linear`` does, and return the hidden states' dtype; the fp32 parameters get fp32
    gradients."""
    model = tiny_hf_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(6, 32, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, 4, (6, 2), device=DEVICE)
    w = torch.rand(6, 2, device=DEVICE, requires_grad=True)
    dtype = torch.bfloat16
    leaves = [x, w, experts.gate_up_proj, experts.down_proj]
    results = {}
    for impl in ("eager", hf.NAME):
        model.set_experts_implementation(impl)
        with torch.autocast(DEVICE, dtype=dtype):
            y = experts(x, ids, w.to(dtype))
        results[impl] = (y, torch.autograd.grad(y.float().square().sum(), leaves))
    (y, grads), (y_ref, grads_ref) = results[hf.NAME], results["eager"]
    assert y.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert_close("y", y, y_ref, dtype)
    for i, (got, want) in enumerate(zip(grads, grads_ref)):
        assert_close(f"grad {i}", got, want, dtype)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_replay():
    """The experts call, forward and backward, captured once and replayed on new routing."""
    model = tiny_hf_model("qwen3_moe").to(torch.bfloat16)
    model.set_experts_implementation(hf.NAME)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(64, 32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 4, (64, 2), device=DEVICE)
    w = torch.rand(64, 2, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(64, 32, device=DEVICE, dtype=torch.bfloat16)
    leaves = [x, w, experts.gate_up_proj, experts.down_proj]

    def step():
        for t in leaves:
            t.grad = None
        y = experts(x, ids, w)
        y.backward(dy)
        return y

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # autotuning and compilation, outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    grads_static = [t.grad for t in leaves]
    for _ in range(2):
        ids.copy_(torch.randint(0, 4, (64, 2), device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        got = [t.clone() for t in [y_static, *grads_static]]
        want = [step().detach(), *(t.grad.clone() for t in leaves)]
        for name, a, b in zip(("y", "dx", "dw", "d_up", "d_down"), got, want):
            assert torch.equal(a, b), f"{name}: graph replay differs from eager"


# --- variable widths --------------------------------------------------------------------------

def test_uniform_to_variable_width_is_the_same_model():
    model = tiny_hf_model("qwen3_moe")
    ids = torch.randint(0, 64, (2, 7), device=DEVICE)
    model.set_experts_implementation("eager")
    variable = hf.to_variable_width(model)
    assert variable.config.model_type == "vmoe_qwen3_moe"
    assert isinstance(variable.model.layers[0].mlp.experts, hf.VariableWidthExperts)
    with torch.no_grad():
        assert rel_err(variable(ids).logits, model(ids).logits) <= HF_TOL


def test_variable_width_model_round_trip(tmp_path):
    cls = hf.variable_width_class(transformers.Qwen3MoeForCausalLM)
    config = cls.config_class(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                              num_experts_per_tok=2, initializer_range=0.2,
                              vmoe_expert_widths=[[8, 24, 0, 16], [16, 16, 8, 4]])
    model = cls(config).to(DEVICE)
    experts = model.model.layers[1].mlp.experts
    assert experts.expert_widths == (16, 16, 8, 4) and tuple(experts.w1.shape) == (32, 2 * 44)
    assert float(experts.w1.detach().std()) > 0.1  # initialized like the experts it replaces
    ids = torch.randint(0, 64, (2, 7), device=DEVICE)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # The experts against the naive loop.
    x = torch.randn(5, 32, device=DEVICE)
    topk = torch.randint(0, 4, (5, 2), device=DEVICE)
    w = torch.rand(5, 2, device=DEVICE)
    with torch.no_grad():
        assert_close("experts", experts(x, topk, w),
                     reference.expert_mlp(x.double(), topk, w.double(), experts.w1.double(),
                                          experts.w2.double(), experts.expert_widths, "swiglu"),
                     torch.float32)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).to(DEVICE)
    assert type(loaded) is cls
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # Without vmoe.hf, transformers does not know the model type and refuses to load it.
    code = ("import transformers\n"
            f"transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode != 0 and "vmoe_qwen3_moe" in res.stderr, res.stderr[-2000:]


# --- the benchmark's CPU smoke run ------------------------------------------------------------

def test_bench_smoke(tmp_path):
    from vmoe.bench import hf as bench_hf

    out = tmp_path / "cpu.csv"
    assert bench_hf.main(["--smoke", "--out", str(out)]) == 0
    import csv
    rows = list(csv.DictReader(open(out)))
    assert {r["provider"] for r in rows} >= {"vmoe", "eager", "grouped_mm", "batched_mm"}
    assert {r["scope"] for r in rows} == {"hf_layer", "hf_train"}
    ok = [r for r in rows if r["applicable"] == "True"]
    assert ok and all(r["ok"] in ("True", "") for r in ok), [r for r in ok if r["ok"] == "False"]
