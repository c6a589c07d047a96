"""The autograd.Function behind :func:`vmoe.expert_mlp`, and the public function itself.

Saved for backward: x, topk_weights, w1, w2, the routing metadata, the pre-activation Z (ragged),
and the unweighted down-projection rows ys (for the gradient of the routing weights). H is not
saved: the backward's first GEMM recomputes it from Z in its epilogue and writes it weighted,
w * H, the operand of the W2 gradient. The weighted, sorted copy of dy is never written: the
kernels gather dy by token and scale it by the routing weight on load. Derivation: notebooks/05_backward.ipynb.
"""
from __future__ import annotations

import torch

from . import reference
from ._utils import check_triton_device, interpreting
from .config import IMPLS, check_expert_mlp_args
from .gather_scatter import combine, combine_weight_grad
from .grouped_gemm import down_proj, down_proj_bwd, up_proj, up_proj_bwd, w1_grad, w2_grad
from .routing import Routing, build_routing


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ExpertMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, w1, w2, routing: Routing, activation: str):
        needs_grad = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 3))
        h, z = up_proj(x, w1, routing, activation, save_z=needs_grad)
        ys = down_proj(h, w2, routing)
        y = combine(ys, routing, topk_weights.reshape(-1))
        ctx.routing, ctx.activation = routing, activation
        if needs_grad:
            ctx.save_for_backward(x, topk_weights, w1, w2, z, ys)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, topk_weights, w1, w2, z, ys = ctx.saved_tensors
        routing, activation = ctx.routing, ctx.activation
        dy = dy.contiguous()
        d_x = d_w = d_w1 = d_w2 = None
        if ctx.needs_input_grad[1]:
            d_w = combine_weight_grad(dy, ys, routing)
        if any(ctx.needs_input_grad[i] for i in (0, 2, 3)):
            if ctx.needs_input_grad[3]:
                dz, hw = down_proj_bwd(dy, topk_weights, w2, z, routing, activation,
                                       weighted_h=True)
                d_w2 = w2_grad(hw, dy, None, w2, routing)
                del hw
            else:
                dz = down_proj_bwd(dy, topk_weights, w2, z, routing, activation)
            if ctx.needs_input_grad[0]:
                d_x = combine(up_proj_bwd(dz, w1, routing, activation), routing)
            if ctx.needs_input_grad[2]:
                d_w1 = w1_grad(x, dz, w1, routing, activation)
        return d_x, d_w, d_w1, d_w2, None, None


def use_triton(x: torch.Tensor, impl: str = "auto") -> bool:
    """Whether ``impl`` resolves to the Triton kernels for a tensor on x's device."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    if impl == "triton":
        check_triton_device(x)
        return True
    return x.device.type == "cuda" or interpreting()


def expert_mlp(x, topk_ids, topk_weights, w1, w2, expert_widths, activation="relu2", *,
               impl="auto", routing: Routing | None = None):
    """The expert computation of a variable-width MoE layer, differentiable w.r.t. x,
    topk_weights, w1 and w2.

    ``y[t] = sum_j topk_weights[t, j] * act(x[t] @ W1_e) @ W2_e`` with ``e = topk_ids[t, j]``, where
    expert e owns columns ``[o_e, o_e + f_e)`` of w1 (``[2 o_e, 2 o_e + 2 f_e)`` for swiglu: gate,
    then up) and rows ``[o_e, o_e + f_e)`` of w2, ``o_e = sum_{j<e} f_j``.

    Args:
        x: ``[T, d]`` float32, float16 or bfloat16.
        topk_ids: ``[T, k]`` any integer dtype; a repeated id in a row contributes twice. Ids
            outside ``[0, E)`` are dropped, or raise under VMOE_CHECK=1 (a host sync).
        topk_weights: ``[T, k]``, x's dtype.
        w1: ``[d, g*F]`` with g = 2 for swiglu, else 1.  w2: ``[F, d]``.
        expert_widths: f_e for each expert, a sequence of ints or an int tensor.
        activation: ``"relu2"``, ``"gelu"``, ``"silu"`` or ``"swiglu"``.
        impl: ``"auto"`` (Triton on CUDA, or on CPU under TRITON_INTERPRET=1; else the reference
            loop), ``"triton"`` or ``"reference"``.
        routing: metadata already built by :func:`vmoe.routing.build_routing` for these ids.

    Returns:
        y ``[T, d]`` in x's dtype.

    Example:
        >>> y = expert_mlp(x, ids, weights, w1, w2, [512] * 4 + [256] * 8)
    """
    widths = check_expert_mlp_args(x, topk_ids, topk_weights, w1, w2, expert_widths, activation)
    if not use_triton(x, impl):
        return reference.expert_mlp(x, topk_ids, topk_weights, w1, w2, widths, activation)
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the Triton kernels take {KERNEL_DTYPES} "
                        "(use impl='reference' for others)")
    if routing is None:
        routing = build_routing(topk_ids, widths)
    return ExpertMLPFunction.apply(x.contiguous(), topk_weights.contiguous(), w1.contiguous(),
                                   w2.contiguous(), routing, activation)
