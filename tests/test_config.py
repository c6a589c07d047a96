"""Bad arguments raise ValueError or TypeError whose message names the argument."""
from __future__ import annotations

import pytest
import torch

from vmoe import MoEConfig, MoEMLP, expert_mlp, reference
from vmoe.testing import DEVICE, make_inputs

WIDTHS = (7, 33, 1)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(expert_sizes=[]), ValueError, "expert_sizes"),
    (dict(expert_sizes=[(0, 8)]), ValueError, "expert_sizes count"),
    (dict(expert_sizes=[(2, 8), (-1, 4)]), ValueError, "expert_sizes count"),
    (dict(expert_sizes=[(2, 0)]), ValueError, "expert_sizes has only null experts"),
    (dict(expert_sizes=[(2, 0), (1, 0)]), ValueError, "expert_sizes has only null experts"),
    (dict(expert_sizes=[(2, 8), (1, -3)]), ValueError, "expert_sizes width"),
    (dict(expert_sizes=[(2, 8.0)]), TypeError, "expert_sizes"),
    (dict(expert_sizes=[(2, 8, 1)]), TypeError, "expert_sizes"),
    (dict(expert_sizes=8), TypeError, "expert_sizes"),
    (dict(expert_sizes=[(2, 8)], num_active_experts=0), ValueError, "num_active_experts"),
    (dict(expert_sizes=[(2, 8)], num_active_experts=3), ValueError, "num_active_experts"),
    (dict(expert_sizes=[(2, 8)], num_active_experts=1.0), ValueError, "num_active_experts"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(activation="ReLU2"), ValueError, "activation"),
    (dict(router="relu"), ValueError, "router"),
    (dict(impl="cuda"), ValueError, "impl"),
    (dict(n_embd=0), ValueError, "n_embd"),
    (dict(shared_expert_width=-1), ValueError, "shared_expert_width"),
    (dict(shared_expert_width=8.0), ValueError, "shared_expert_width"),
    (dict(shared_expert_width=True), ValueError, "shared_expert_width"),
    (dict(shared_expert_gate=True), ValueError, "shared_expert_gate"),
    (dict(shared_expert_width=8, shared_expert_gate=1), TypeError, "shared_expert_gate"),
], ids=["sizes-empty", "count-0", "count-neg", "all-null", "all-null-2", "width-neg", "width-float", "triple",
        "not-a-list", "k-0", "k-gt-E", "k-float", "activation", "activation-case", "router", "impl",
        "n_embd-0", "shared-neg", "shared-float", "shared-bool", "gate-without-shared",
        "gate-int"])
def test_config_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MoEConfig(**{"n_embd": 16, **kwargs})


def test_config_accepts_and_expands():
    cfg = MoEConfig(n_embd=16, expert_sizes=[(2, 8), (3, 4)], num_active_experts=5)
    assert cfg.expert_widths == (8, 8, 4, 4, 4) == cfg.kernel_widths
    assert cfg.num_experts == 5 and cfg.total_width == 28


def test_config_null_and_shared_experts():
    cfg = MoEConfig(n_embd=16, expert_sizes=[(2, 8), (3, 0)], num_active_experts=5,
                    shared_expert_width=12, shared_expert_gate=True)
    assert cfg.expert_widths == (8, 8, 0, 0, 0) and cfg.num_experts == 5
    assert cfg.total_width == 16 and cfg.kernel_widths == (8, 8, 0, 0, 0, 12)
    layer = MoEMLP(cfg)
    assert tuple(layer.w1.shape) == (16, 28) and tuple(layer.w2.shape) == (28, 16)
    assert tuple(layer.router.weight.shape) == (5, 16)
    assert tuple(layer.shared_gate.weight.shape) == (1, 16)
    swiglu = MoEMLP(MoEConfig(n_embd=16, expert_sizes=[(2, 8), (1, 0)], activation="swiglu",
                              shared_expert_width=4))
    assert tuple(swiglu.w1.shape) == (16, 2 * 20) and swiglu.shared_gate is None


def test_layer_rejects_wrong_last_dim():
    layer = MoEMLP(MoEConfig(n_embd=16, expert_sizes=[(2, 8)], num_active_experts=1)).to(DEVICE)
    with pytest.raises(ValueError, match="n_embd"):
        layer(torch.randn(3, 15, device=DEVICE))
    with pytest.raises(ValueError, match="n_embd"):
        layer(torch.randn(2, 3, 17, device=DEVICE))
    with pytest.raises(ValueError, match="n_embd"):
        layer(torch.randn(16, device=DEVICE))


def _inputs(activation="relu2"):
    return list(make_inputs(5, 16, WIDTHS, 2, activation, device=DEVICE))


# Each case: (argument index to replace, how to build the bad value, exception, message pattern).
# Indices: 0 x, 1 topk_ids, 2 topk_weights, 3 w1, 4 w2.
BAD_ARGS = {
    "x-1d": (0, lambda a: a[0][0], ValueError, "x must be"),
    "x-int": (0, lambda a: a[0].long(), TypeError, "x must be"),
    "x-not-tensor": (0, lambda a: a[0].tolist(), TypeError, "x must be"),
    "ids-float": (1, lambda a: a[1].float(), TypeError, "topk_ids"),
    "ids-bool": (1, lambda a: a[1] > 0, TypeError, "topk_ids"),
    "ids-rows": (1, lambda a: a[1][:4], ValueError, "topk_ids"),
    "ids-1d": (1, lambda a: a[1][:, 0], ValueError, "topk_ids"),
    "weights-shape": (2, lambda a: a[2][:, :1], ValueError, "topk_weights"),
    "weights-dtype": (2, lambda a: a[2].half(), TypeError, "topk_weights"),
    "w1-dtype": (3, lambda a: a[3].to(torch.bfloat16), TypeError, "w1"),
    "w2-dtype": (4, lambda a: a[4].half(), TypeError, "w2"),
    "w1-cols": (3, lambda a: a[3][:, :-1], ValueError, "w1"),
    "w1-rows": (3, lambda a: a[3][:-1], ValueError, "w1"),
    "w2-rows": (4, lambda a: torch.cat([a[4], a[4][:1]]), ValueError, "w2"),
    "w2-cols": (4, lambda a: a[4][:, :-1], ValueError, "w2"),
    "w1-meta": (3, lambda a: a[3].to("meta"), ValueError, "w1"),
    "w2-meta": (4, lambda a: a[4].to("meta"), ValueError, "w2"),
    "weights-meta": (2, lambda a: a[2].to("meta"), ValueError, "topk_weights"),
    "ids-meta": (1, lambda a: a[1].to("meta"), ValueError, "topk_ids"),
}


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("case", list(BAD_ARGS), ids=list(BAD_ARGS))
def test_expert_mlp_rejects(case, impl):
    index, make_bad, exc, match = BAD_ARGS[case]
    args = _inputs()
    args[index] = make_bad(args)
    with pytest.raises(exc, match=match):
        expert_mlp(*args, WIDTHS, "relu2", impl=impl)


@pytest.mark.skipif(DEVICE != "cuda", reason="a CPU/CUDA mismatch needs a GPU (the meta cases cover CPU)")
@pytest.mark.parametrize("index,name", [(1, "topk_ids"), (2, "topk_weights"), (3, "w1"), (4, "w2")])
def test_expert_mlp_rejects_cpu_cuda_mix(index, name):
    args = _inputs()
    args[index] = args[index].cpu()
    with pytest.raises(ValueError, match=name):
        expert_mlp(*args, WIDTHS, "relu2")


def test_swiglu_needs_two_columns_per_width():
    x, ids, w, w1, w2 = _inputs("relu2")
    with pytest.raises(ValueError, match="w1"):
        expert_mlp(x, ids, w, w1, w2, WIDTHS, "swiglu")
    x, ids, w, w1, w2 = _inputs("swiglu")
    with pytest.raises(ValueError, match="w1"):
        expert_mlp(x, ids, w, w1, w2, WIDTHS, "relu2")


@pytest.mark.parametrize("widths,exc", [
    ((), ValueError), ((0, 0, 0), ValueError), ((7, -2, 1), ValueError),
    ((7.0, 33, 1), TypeError), ((True, 33, 1), TypeError), (7, TypeError),
    (torch.tensor([7.0, 33.0, 1.0]), TypeError), (torch.tensor([[7, 33, 1]]), TypeError),
    (torch.tensor([0, 0, 0]), ValueError), (torch.tensor([], dtype=torch.long), ValueError),
], ids=["empty", "all-null", "negative", "float", "bool", "int", "float-tensor", "2d-tensor",
        "zero-tensor", "empty-tensor"])
def test_expert_widths_rejected(widths, exc):
    args = _inputs()
    with pytest.raises(exc, match="expert_widths"):
        expert_mlp(*args, widths, "relu2")
    with pytest.raises(exc, match="expert_widths"):
        reference.expert_mlp(*args, widths, "relu2")


@pytest.mark.parametrize("activation", ["tanh", None, "SWIGLU"])
def test_expert_mlp_rejects_activation(activation):
    with pytest.raises(ValueError, match="activation"):
        expert_mlp(*_inputs(), WIDTHS, activation)


def test_expert_mlp_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        expert_mlp(*_inputs(), WIDTHS, "relu2", impl="refrence")


def test_triton_path_rejects_float64():
    # The kernels accumulate in fp32 and tl.dot has no float64 path: refuse rather than be wrong.
    x, ids, w, w1, w2 = (t.double() if t.is_floating_point() else t for t in _inputs())
    with pytest.raises(TypeError, match="x has dtype"):
        expert_mlp(x, ids, w, w1, w2, WIDTHS, "relu2", impl="triton")
