"""vmoe's kernels as PyTorch operators, ``torch.ops.vmoe.*``, so that ``torch.compile`` sees each as
one opaque node with a known output shape, and never traces into Triton's launcher or autotuner.

=====================  =================================================================
operator               what it computes
=====================  =================================================================
``vmoe::routing``      ``(counts, offsets, sorted_to_assign, assign_to_sorted,
                       ragged_offsets)`` of ``topk_ids`` (:func:`vmoe.ops.routing.build_routing`)
``vmoe::add_shared_    the routing arrays with one more slot per token, for the shared
slot``                 expert (:func:`vmoe.ops.routing.add_shared_slot`)
``vmoe::expert_mlp``   ``(y, z, ys)``: the forward of :func:`vmoe.expert_mlp` from the
                       routing arrays; z (ragged pre-activation) and ys (unweighted rows)
                       are what the backward needs, empty when ``save`` is False
``vmoe::expert_mlp_    ``(dx, dw, dw1, dw2)`` from dy and the saved tensors; a gradient
backward``             not asked for in ``needs`` comes back empty
``vmoe::route``        the fused router (:func:`vmoe.ops.router.route_impl`): top-k weights and
                       ids, aux-loss statistics and losses, f_i, and the routing arrays
``vmoe::route_         ``d_logits`` from the gradients of the router's differentiable outputs
backward``             (any may be None) (:func:`vmoe.ops.router.route_bwd`)
=====================  =================================================================

Routing metadata crosses the boundary as its five tensors plus host ints (the widths; k and T are
read off the shapes), never as a Python object.

w1 and w2 are vmoe's ``[d, g*F]`` and ``[F, d]``, or, for experts of one width, per-expert
``[E, d, g*I]`` and ``[E, I, d]`` with the strides they come with (a transformers experts
module's parameters seen through a transposed view, :mod:`vmoe.hf`); the weight gradients of
``vmoe::expert_mlp_backward`` have the weights' shapes, and a per-expert weight's strides.

Why ``torch.library.custom_op`` rather than ``triton_op``: the kernels are autotuned with a
pruning hook and a grid computed from the chosen block shape, and the forward is three kernels
whose intermediate buffers are sized for the worst routing; as one opaque op each, Inductor has
nothing to fuse across them anyway, and the fake implementations stay a few lines of shape
arithmetic. Autotuning runs on the first real call (or a CUDA-graph warm-up), never under tracing.

Why eager code calls the implementations directly (:func:`dispatch`): a custom op's dispatch costs
about 50 µs of host time a call (measured on this repo's CPU machine, torch 2.14), more than
vmoe's own launches; under ``torch.compile`` the graph calls the op directly and pays no
dispatch. Both paths run the same implementation functions below, and one ``autograd.Function``
(:mod:`vmoe.autograd`) differentiates both.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vmoe.config import gate_factor
from vmoe.ops.gather_scatter import combine, combine_weight_grad
from vmoe.ops.grouped_gemm import down_proj, down_proj_bwd, up_proj, up_proj_bwd, w1_grad, w2_grad
from vmoe.ops.router import route_bwd, route_impl
from vmoe.ops.routing import Routing, add_shared_slot, build_routing


def dispatch(op, impl, *args):
    """``op(*args)`` under torch.compile's tracing, ``impl(*args)`` otherwise (see the module
    docstring); the two compute the same thing."""
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


def _plain(t):
    """The plain tensor under torch.func.grad's wrappers (anything else unchanged). The kernels
    read raw storage, which a wrapper does not have; the values are the same at every grad level.
    Under vmap a wrapper stands for a batch, which one launch does not compute: an error."""
    functorch = torch._C._functorch
    while isinstance(t, torch.Tensor) and functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            raise RuntimeError("vmoe's kernels do not support torch.vmap: call them per batch "
                               "element, or flatten the batch into the token dimension")
        t = functorch.get_unwrapped(t)
    return t


def _outside_transforms(impl):
    """Run ``impl`` on plain tensors with torch.func's transforms switched off, so that what it
    allocates is plain too (gradients flow through the autograd.Function around it)."""
    def run(*args):
        if not torch._C._are_functorch_transforms_active():
            return impl(*args)  # the common case, at no cost
        with torch._C._DisableFuncTorch():
            return impl(*(_plain(a) for a in args))
    run.__name__ = run.__qualname__ = impl.__name__
    return run


@_outside_transforms
def routing_impl(topk_ids: torch.Tensor, expert_widths: Sequence[int]):
    return build_routing(topk_ids, tuple(expert_widths)).tensors()


@torch.library.custom_op("vmoe::routing", mutates_args=())
def routing_op(topk_ids: torch.Tensor, expert_widths: Sequence[int]) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return routing_impl(topk_ids, expert_widths)


@routing_op.register_fake
def _(topk_ids, expert_widths):
    E, A, dev = len(expert_widths), topk_ids.numel(), topk_ids.device
    return (topk_ids.new_empty(E, dtype=torch.int32), topk_ids.new_empty(E + 1, dtype=torch.int32),
            torch.empty(A, dtype=torch.int32, device=dev), torch.empty(A, dtype=torch.int32, device=dev),
            topk_ids.new_empty(E + 1, dtype=torch.int64))


def routing(topk_ids: torch.Tensor, expert_widths: Sequence[int]) -> tuple:
    """The routing arrays of ``topk_ids``: through the operator when compiling, directly otherwise."""
    return dispatch(routing_op, routing_impl, topk_ids, tuple(expert_widths))


@_outside_transforms
def add_shared_slot_impl(counts, offsets, sorted_to_assign, assign_to_sorted, ragged_offsets,
                         expert_widths: Sequence[int], shared_width: int, k: int):
    T = assign_to_sorted.shape[0] // k
    r = Routing.from_tensors((counts, offsets, sorted_to_assign, assign_to_sorted, ragged_offsets),
                             tuple(expert_widths), k, T)
    return add_shared_slot(r, shared_width).tensors()


@torch.library.custom_op("vmoe::add_shared_slot", mutates_args=())
def add_shared_slot_op(counts: torch.Tensor, offsets: torch.Tensor, sorted_to_assign: torch.Tensor,
                       assign_to_sorted: torch.Tensor, ragged_offsets: torch.Tensor,
                       expert_widths: Sequence[int], shared_width: int, k: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_shared_slot_impl(counts, offsets, sorted_to_assign, assign_to_sorted, ragged_offsets,
                                expert_widths, shared_width, k)


@add_shared_slot_op.register_fake
def _(counts, offsets, sorted_to_assign, assign_to_sorted, ragged_offsets, expert_widths,
      shared_width, k):
    E, A = len(expert_widths), assign_to_sorted.shape[0] // k * (k + 1)
    return (counts.new_empty(E + 1), offsets.new_empty(E + 2), sorted_to_assign.new_empty(A),
            assign_to_sorted.new_empty(A), ragged_offsets.new_empty(E + 2))


def shared_slot(routing_tensors, expert_widths: Sequence[int], shared_width: int, k: int) -> tuple:
    """The routing arrays of the routed ids plus the shared expert's slot (id E, every token):
    through the operator when compiling, directly otherwise."""
    return dispatch(add_shared_slot_op, add_shared_slot_impl, *routing_tensors, tuple(expert_widths),
                    shared_width, k)


@_outside_transforms
def expert_mlp_impl(x, topk_weights, w1, w2, counts, offsets, sorted_to_assign, assign_to_sorted,
                    ragged_offsets, expert_widths: Sequence[int], activation: str, save: bool):
    r = Routing.from_tensors((counts, offsets, sorted_to_assign, assign_to_sorted, ragged_offsets),
                             expert_widths, topk_weights.shape[1], x.shape[0])
    h, z = up_proj(x, w1, r, activation, save_z=save)
    ys = down_proj(h, w2, r)
    y = combine(ys, r, topk_weights.reshape(-1))
    if not save:
        # Inference: nothing is kept for a backward that will not come.
        z, ys = x.new_empty(0), x.new_empty(0)
    return y, z, ys


@torch.library.custom_op("vmoe::expert_mlp", mutates_args=())
def expert_mlp_op(x: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  counts: torch.Tensor, offsets: torch.Tensor, sorted_to_assign: torch.Tensor,
                  assign_to_sorted: torch.Tensor, ragged_offsets: torch.Tensor,
                  expert_widths: Sequence[int], activation: str, save: bool) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    return expert_mlp_impl(x, topk_weights, w1, w2, counts, offsets, sorted_to_assign,
                           assign_to_sorted, ragged_offsets, expert_widths, activation, save)


@expert_mlp_op.register_fake
def _(x, topk_weights, w1, w2, counts, offsets, sorted_to_assign, assign_to_sorted,
      ragged_offsets, expert_widths, activation, save):
    T, d = x.shape
    A = topk_weights.numel()
    if not save:
        return x.new_empty(T, d), x.new_empty(0), x.new_empty(0)
    z = x.new_empty(gate_factor(activation) * A * max(expert_widths))
    return x.new_empty(T, d), z, x.new_empty(A, d)


def expert_mlp_fwd(*args):
    return dispatch(expert_mlp_op, expert_mlp_impl, *args)


@_outside_transforms
def expert_mlp_backward_impl(dy, x, topk_weights, w1, w2, z, ys, counts, offsets, sorted_to_assign,
                             assign_to_sorted, ragged_offsets, expert_widths: Sequence[int],
                             activation: str, needs: Sequence[bool]):
    """Gradients of x, topk_weights, w1 and w2, each only where ``needs`` asks (else empty)."""
    r = Routing.from_tensors((counts, offsets, sorted_to_assign, assign_to_sorted, ragged_offsets),
                             expert_widths, topk_weights.shape[1], x.shape[0])
    need_x, need_w, need_w1, need_w2 = needs
    d_x = d_w = d_w1 = d_w2 = None
    if need_w:
        d_w = combine_weight_grad(dy, ys, r)
    if need_x or need_w1 or need_w2:
        if need_w2:
            dz, hw = down_proj_bwd(dy, topk_weights, w2, z, r, activation, weighted_h=True)
            d_w2 = w2_grad(hw, dy, None, w2, r)
            del hw
        else:
            dz = down_proj_bwd(dy, topk_weights, w2, z, r, activation)
        if need_x:
            d_x = combine(up_proj_bwd(dz, w1, r, activation), r)
        if need_w1:
            d_w1 = w1_grad(x, dz, w1, r, activation)
    # Distinct empty tensors: an operator's outputs may not alias one another.
    return tuple(dy.new_empty(0) if g is None else g for g in (d_x, d_w, d_w1, d_w2))


@torch.library.custom_op("vmoe::expert_mlp_backward", mutates_args=())
def expert_mlp_backward_op(dy: torch.Tensor, x: torch.Tensor, topk_weights: torch.Tensor,
                           w1: torch.Tensor, w2: torch.Tensor, z: torch.Tensor, ys: torch.Tensor,
                           counts: torch.Tensor, offsets: torch.Tensor,
                           sorted_to_assign: torch.Tensor, assign_to_sorted: torch.Tensor,
                           ragged_offsets: torch.Tensor, expert_widths: Sequence[int],
                           activation: str, needs: Sequence[bool]) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return expert_mlp_backward_impl(dy, x, topk_weights, w1, w2, z, ys, counts, offsets,
                                    sorted_to_assign, assign_to_sorted, ragged_offsets,
                                    expert_widths, activation, needs)


@expert_mlp_backward_op.register_fake
def _(dy, x, topk_weights, w1, w2, z, ys, counts, offsets, sorted_to_assign, assign_to_sorted,
      ragged_offsets, expert_widths, activation, needs):
    # A per-expert 3-D weight's gradient keeps the weight's strides, as the kernels write it
    # (vmoe.ops.grouped_gemm._weight_grad_buffer); everything else is contiguous.
    return tuple((torch.empty_like(t) if t.dim() == 3 else t.new_empty(t.shape)) if need
                 else dy.new_empty(0) for t, need in zip((x, topk_weights, w1, w2), needs))


def expert_mlp_backward(*args):
    return dispatch(expert_mlp_backward_op, expert_mlp_backward_impl, *args)


route_impl = _outside_transforms(route_impl)
route_backward_impl = _outside_transforms(route_bwd)


@torch.library.custom_op("vmoe::route", mutates_args=())
def route_op(logits: torch.Tensor, k: int, router: str, norm_topk_prob: bool,
             expert_widths: Sequence[int], group_sizes: Sequence[int],
             weights_dtype: torch.dtype) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor]:
    return route_impl(logits, k, router, norm_topk_prob, expert_widths, group_sizes,
                      weights_dtype)


@route_op.register_fake
def _(logits, k, router, norm_topk_prob, expert_widths, group_sizes, weights_dtype):
    T, E = logits.shape

    def new(*shape, dtype=torch.float32):
        return logits.new_empty(shape, dtype=dtype)

    i32 = torch.int32
    return (new(T, k, dtype=weights_dtype), new(E), new(), new(), new(), new(),
            new(T, k, dtype=i32), new(E),
            new(E, dtype=i32), new(E + 1, dtype=i32), new(T * k, dtype=i32),
            new(T * k, dtype=i32), new(E + 1, dtype=torch.int64))


def route(*args):
    return dispatch(route_op, route_impl, *args)


@torch.library.custom_op("vmoe::route_backward", mutates_args=())
def route_backward_op(logits: torch.Tensor, topk_ids: torch.Tensor,
                      d_topk_weights: torch.Tensor | None, d_p_sum: torch.Tensor | None,
                      d_lse_sq_sum: torch.Tensor | None, d_z_loss: torch.Tensor | None,
                      d_lb_loss: torch.Tensor | None, d_compute_loss: torch.Tensor | None,
                      counts: torch.Tensor, p_sum: torch.Tensor, router: str, norm_topk_prob: bool,
                      expert_widths: Sequence[int], group_sizes: Sequence[int]) -> torch.Tensor:
    return route_backward_impl(logits, topk_ids, d_topk_weights, d_p_sum, d_lse_sq_sum, d_z_loss,
                               d_lb_loss, d_compute_loss, counts, p_sum, router, norm_topk_prob,
                               expert_widths, group_sizes)


@route_backward_op.register_fake
def _(logits, topk_ids, d_topk_weights, d_p_sum, d_lse_sq_sum, d_z_loss, d_lb_loss,
      d_compute_loss, counts, p_sum, router, norm_topk_prob, expert_widths, group_sizes):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def route_backward(*args):
    return dispatch(route_backward_op, route_backward_impl, *args)
