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

Why operators defined with ``torch.library.Library`` rather than ``triton_op``: the kernels are
autotuned with a pruning hook and a grid computed from the chosen block shape, and the forward is
three kernels whose intermediate buffers are sized for the worst routing; as one opaque op each,
Inductor has nothing to fuse across them anyway, and the fake implementations stay a few lines of
shape arithmetic. Autotuning runs on the first real call (or a CUDA-graph warm-up), never under
tracing. And why not ``torch.library.custom_op``: each call of one passes through Python wrappers
for autograd and an output-aliasing check before the implementation runs, about 21 µs a call on
this repo's CPU machine against 4.5 µs for a ``Library`` operator's dispatch (torch 2.13), and
far more in a compiled training step on the GPU host (``vmoe.bench.probes.layer_host``;
results/NOTES.md, "Host time"). The operators have no autograd kernel: they run inside vmoe's
autograd.Functions, which differentiate them.

Why eager code calls the implementations directly (:func:`dispatch`): even a ``Library``
operator's dispatch is host time an eager call need not pay; under ``torch.compile`` the graph
calls the operator. Both paths run the same implementation functions below, and one
``autograd.Function`` (:mod:`vmoe.autograd`) differentiates both.
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


_LIB = torch.library.Library("vmoe", "DEF")


def _tensors(n: int) -> str:
    return "(" + ", ".join(["Tensor"] * n) + ")"


# The routing arrays and the widths, as every operator after the routing takes them.
_ROUTING_ARGS = ("Tensor counts, Tensor offsets, Tensor sorted_to_assign, Tensor assign_to_sorted, "
                 "Tensor ragged_offsets, int[] expert_widths")


def _define(schema: str, impl, fake):
    """``torch.ops.vmoe.<name>.default`` for ``schema``, computed by ``impl`` on every backend and
    by ``fake`` on fake tensors. Registered with ``torch.library.Library`` rather than
    ``torch.library.custom_op``, whose Python autograd and aliasing-check wrappers cost more host
    time a call than vmoe's launches (see the module docstring). No autograd kernel: the
    operators run inside vmoe's autograd.Functions, below autograd."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"vmoe::{name}", fake, lib=_LIB)
    return getattr(torch.ops.vmoe, name).default


@_outside_transforms
def routing_impl(topk_ids: torch.Tensor, expert_widths: Sequence[int]):
    return build_routing(topk_ids, tuple(expert_widths)).tensors()


def _routing_fake(topk_ids, expert_widths):
    E, A, dev = len(expert_widths), topk_ids.numel(), topk_ids.device
    return (topk_ids.new_empty(E, dtype=torch.int32), topk_ids.new_empty(E + 1, dtype=torch.int32),
            torch.empty(A, dtype=torch.int32, device=dev), torch.empty(A, dtype=torch.int32, device=dev),
            topk_ids.new_empty(E + 1, dtype=torch.int64))


routing_op = _define("routing(Tensor topk_ids, int[] expert_widths) -> " + _tensors(5),
                     routing_impl, _routing_fake)


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


def _add_shared_slot_fake(counts, offsets, sorted_to_assign, assign_to_sorted, ragged_offsets,
                          expert_widths, shared_width, k):
    E, A = len(expert_widths), assign_to_sorted.shape[0] // k * (k + 1)
    return (counts.new_empty(E + 1), offsets.new_empty(E + 2), sorted_to_assign.new_empty(A),
            assign_to_sorted.new_empty(A), ragged_offsets.new_empty(E + 2))


add_shared_slot_op = _define(
    "add_shared_slot(" + _ROUTING_ARGS + ", int shared_width, int k) -> " + _tensors(5),
    add_shared_slot_impl, _add_shared_slot_fake)


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


def _expert_mlp_fake(x, topk_weights, w1, w2, counts, offsets, sorted_to_assign, assign_to_sorted,
                     ragged_offsets, expert_widths, activation, save):
    T, d = x.shape
    A = topk_weights.numel()
    if not save:
        return x.new_empty(T, d), x.new_empty(0), x.new_empty(0)
    z = x.new_empty(gate_factor(activation) * A * max(expert_widths))
    return x.new_empty(T, d), z, x.new_empty(A, d)


expert_mlp_op = _define(
    "expert_mlp(Tensor x, Tensor topk_weights, Tensor w1, Tensor w2, " + _ROUTING_ARGS
    + ", str activation, bool save) -> " + _tensors(3), expert_mlp_impl, _expert_mlp_fake)


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


def _expert_mlp_backward_fake(dy, x, topk_weights, w1, w2, z, ys, counts, offsets,
                              sorted_to_assign, assign_to_sorted, ragged_offsets, expert_widths,
                              activation, needs):
    # A per-expert 3-D weight's gradient keeps the weight's strides, as the kernels write it
    # (vmoe.ops.grouped_gemm._weight_grad_buffer); everything else is contiguous.
    return tuple((torch.empty_like(t) if t.dim() == 3 else t.new_empty(t.shape)) if need
                 else dy.new_empty(0) for t, need in zip((x, topk_weights, w1, w2), needs))


expert_mlp_backward_op = _define(
    "expert_mlp_backward(Tensor dy, Tensor x, Tensor topk_weights, Tensor w1, Tensor w2, Tensor z, "
    "Tensor ys, " + _ROUTING_ARGS + ", str activation, bool[] needs) -> " + _tensors(4),
    expert_mlp_backward_impl, _expert_mlp_backward_fake)


def expert_mlp_backward(*args):
    return dispatch(expert_mlp_backward_op, expert_mlp_backward_impl, *args)


route_impl = _outside_transforms(route_impl)
route_backward_impl = _outside_transforms(route_bwd)


def _route_fake(logits, k, router, norm_topk_prob, expert_widths, group_sizes, weights_dtype):
    T, E = logits.shape

    def new(*shape, dtype=torch.float32):
        return logits.new_empty(shape, dtype=dtype)

    i32 = torch.int32
    return (new(T, k, dtype=weights_dtype), new(E), new(), new(), new(), new(),
            new(T, k, dtype=i32), new(E),
            new(E, dtype=i32), new(E + 1, dtype=i32), new(T * k, dtype=i32),
            new(T * k, dtype=i32), new(E + 1, dtype=torch.int64))


route_op = _define(
    "route(Tensor logits, int k, str router, bool norm_topk_prob, int[] expert_widths, "
    "int[] group_sizes, ScalarType weights_dtype) -> " + _tensors(13), route_impl, _route_fake)


def route(*args):
    return dispatch(route_op, route_impl, *args)


def _route_backward_fake(logits, topk_ids, d_topk_weights, d_p_sum, d_lse_sq_sum, d_z_loss,
                         d_lb_loss, d_compute_loss, counts, p_sum, router, norm_topk_prob,
                         expert_widths, group_sizes):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


route_backward_op = _define(
    "route_backward(Tensor logits, Tensor topk_ids, Tensor? d_topk_weights, Tensor? d_p_sum, "
    "Tensor? d_lse_sq_sum, Tensor? d_z_loss, Tensor? d_lb_loss, Tensor? d_compute_loss, "
    "Tensor counts, Tensor p_sum, str router, bool norm_topk_prob, int[] expert_widths, "
    "int[] group_sizes) -> Tensor", route_backward_impl, _route_backward_fake)


def route_backward(*args):
    return dispatch(route_backward_op, route_backward_impl, *args)
