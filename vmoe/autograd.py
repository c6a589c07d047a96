"""The autograd.Function behind :func:`vmoe.expert_mlp`, and the public function itself.

Saved for backward: x, topk_weights, w1, w2, the routing arrays, the pre-activation Z (ragged),
and the unweighted down-projection rows ys (for the gradient of the routing weights). H is not
saved: the backward's first GEMM recomputes it from Z in its epilogue and writes it weighted,
w * H, the operand of the W2 gradient. The weighted, sorted copy of dy is never written: the
kernels gather dy by token and scale it by the routing weight on load.
Derivation: notebooks/05_autograd.ipynb.

Nothing is saved when no gradient can be asked for (grad mode off, as under ``torch.no_grad()``
or ``torch.inference_mode()``, or no input requiring grad): Z and ys are then never kept.

The Function calls :mod:`vmoe.library`, which are PyTorch operators under ``torch.compile`` and plain
calls in eager mode; ``setup_context`` is separate from ``forward`` so that ``torch.func.grad``
can run it too. The backward is differentiable once: a second derivative raises.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch._C import _functions

from vmoe import library as ops
from vmoe import reference
from vmoe.config import IMPLS, check_expert_mlp_args, expand_sizes
from vmoe.ops.grouped_gemm import kernel_weight
from vmoe.ops.routing import Routing
from vmoe.ops.utils import launch, precompile
from vmoe.ops.utils.device import check_triton_device, interpreting

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def differentiable_once(backward):
    """``torch.autograd.function.once_differentiable``, also when the incoming gradient is a
    constant.

    The kernels' backward builds no graph. ``once_differentiable`` marks its gradients as not
    differentiable only when an incoming gradient requires grad; under ``create_graph=True`` with
    a constant incoming gradient (a gradient penalty: ``autograd.grad(y.sum(), x,
    create_graph=True)``) it hands back graph-less gradients, and the penalty's second derivative
    is silently dropped. Here every backward that runs with grad mode on (``create_graph=True``)
    returns gradients that raise when differentiated."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        # The node that raises takes the differentiable inputs too, so that a second backward
        # toward them reaches it (autograd.grad prunes nodes that lead nowhere it was asked for).
        inputs = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
        err_fn = _functions.DelayedError(
            b"vmoe's Triton kernels cannot differentiate twice: a second derivative (a backward "
            b"through a gradient taken with create_graph=True) is not supported; use impl='reference'",
            len(outputs) + len(inputs))

        def fake_requires_grad(g):
            if g is None:
                return None
            g = g.detach()
            g.requires_grad = True
            return g

        return err_fn(*[fake_requires_grad(g) for g in outputs], *inputs)[:len(outputs)]

    return wrapper


def _dry_forward() -> bool:
    """Whether a forward runs inside a precompile's recording (:mod:`vmoe.ops.utils.precompile`),
    for its backward to know: torch runs a CUDA backward on its own autograd thread, which does not
    see the recording thread's :func:`~vmoe.ops.utils.launch.dry` state; launched for real there,
    the backward's kernels would read the dry forward's uninitialised routing arrays. Never while
    torch.compile traces (no precompile then, and the thread-local state is not traceable)."""
    return not torch.compiler.is_compiling() and launch.dry()


def _dry_if(dry: bool, fn, *args):
    """``fn(*args)``, inside :class:`~vmoe.ops.utils.launch.dry_launches` where ``dry``."""
    if not dry:
        return fn(*args)
    with launch.dry_launches():
        return fn(*args)


class ExpertMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, topk_weights, w1, w2, counts, offsets, sorted_to_assign, assign_to_sorted,
                ragged_offsets, expert_widths, activation, save):
        return ops.expert_mlp_fwd(x, topk_weights, w1, w2, counts, offsets, sorted_to_assign,
                                  assign_to_sorted, ragged_offsets, expert_widths, activation, save)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, topk_weights, w1, w2, *routing, expert_widths, activation, _ = inputs
        _, z, ys = output
        ctx.mark_non_differentiable(z, ys)
        # Else autograd hands the backward zero-filled gradients for z and ys: two memsets of the
        # worst-case ragged buffer and of [A, d], for nothing.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, topk_weights, w1, w2, z, ys, *routing)
        ctx.expert_widths, ctx.activation = expert_widths, activation
        ctx.dry = _dry_forward()

    @staticmethod
    @differentiable_once
    def backward(ctx, dy, _dz, _dys):
        needs = tuple(ctx.needs_input_grad[:4])
        grads = _dry_if(ctx.dry, ops.expert_mlp_backward, dy.contiguous(), *ctx.saved_tensors,
                        ctx.expert_widths, ctx.activation, needs)
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 8


class RouteFunction(torch.autograd.Function):
    """The fused router (:mod:`vmoe.ops.router`). Saved: the logits, the ids and, for the loss
    gradients, counts and p_sum; P and the logsumexp are recomputed in the one backward launch.
    Differentiable outputs: topk_weights, p_sum, lse_sq_sum and the three losses."""

    @staticmethod
    def forward(logits, k, router, norm_topk_prob, expert_widths, group_sizes, weights_dtype):
        return ops.route(logits, k, router, norm_topk_prob, expert_widths, group_sizes,
                         weights_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, _, router, norm_topk_prob, expert_widths, group_sizes, _ = inputs
        p_sum, ids, f_i, counts, routing = output[1], output[6], output[7], output[8], output[9:]
        ctx.mark_non_differentiable(ids, f_i, counts, *routing)
        ctx.set_materialize_grads(False)  # a loss left out of the total costs the kernel nothing
        ctx.save_for_backward(logits, ids, counts, p_sum)
        ctx.config = (router, norm_topk_prob, tuple(expert_widths), tuple(group_sizes))
        ctx.dry = _dry_forward()

    @staticmethod
    @differentiable_once
    def backward(ctx, d_weights, d_p_sum, d_lse_sq_sum, d_z_loss, d_lb_loss, d_compute_loss, *_):
        logits, ids, counts, p_sum = ctx.saved_tensors
        d_logits = _dry_if(ctx.dry, ops.route_backward, logits, ids, d_weights, d_p_sum,
                           d_lse_sq_sum, d_z_loss, d_lb_loss, d_compute_loss, counts, p_sum,
                           *ctx.config)
        return d_logits, None, None, None, None, None, None


class RouterOutput(NamedTuple):
    topk_ids: torch.Tensor       # [T, k] int32
    topk_weights: torch.Tensor   # [T, k] fp32
    routing: Routing
    aux: dict                    # router_z_loss, load_balance_loss, compute_loss: [] fp32
    f_i: torch.Tensor            # [E] fp32
    p_sum: torch.Tensor          # [E] fp32
    lse_sq_sum: torch.Tensor     # [] fp32


def route(logits: torch.Tensor, k: int, router: str, norm_topk_prob: bool,
          expert_sizes) -> RouterOutput:
    """Everything :class:`vmoe.MoEMLP` needs from its router logits, in three launches
    (:mod:`vmoe.ops.router`).

    Args:
        logits: ``[T, E]`` router logits (any float dtype; computed in fp32).
        k: experts per token.
        router: ``"sigmoid"`` or ``"softmax"``.
        norm_topk_prob: divide the k chosen probabilities by their sum.
        expert_sizes: ``[(count, width), ...]`` as in :class:`vmoe.MoEConfig`; each pair is one
            load-balance group.

    Returns:
        :class:`RouterOutput`: ``topk_ids`` (ties to the lower expert id), ``topk_weights``, the
        :class:`vmoe.ops.routing.Routing` of the ids, ``aux`` (the three losses of
        ``MoEMLP.aux_losses``), ``f_i`` (fraction of assignments per expert), and the statistics
        ``p_sum`` and ``lse_sq_sum``. The weights, losses and statistics are differentiable
        w.r.t. the logits; the backward is one launch.

    Example::

        out = route(x @ w_router.T, 2, "softmax", True, [(4, 512), (8, 256)])
        y = expert_mlp(x, out.topk_ids, out.topk_weights, w1, w2, widths, routing=out.routing)
    """
    widths = expand_sizes(expert_sizes)
    groups = tuple(count for count, _ in expert_sizes)
    (weights, p_sum, lse_sq_sum, z_loss, lb_loss, compute_loss, ids, f_i,
     *routing) = apply_route(logits, k, router, norm_topk_prob, widths, groups, torch.float32)
    aux = {"router_z_loss": z_loss, "load_balance_loss": lb_loss, "compute_loss": compute_loss}
    return RouterOutput(ids, weights, Routing.from_tensors(routing, widths, k, logits.shape[0]),
                        aux, f_i, p_sum, lse_sq_sum)


def _eager_twin(function):
    """``function`` with ``ctx`` as forward's first argument: the same forward, setup and backward.

    ``autograd.Function.apply`` binds the signature of a forward that has a separate
    ``setup_context`` with ``inspect`` on every call (cProfile on the device's host attributed
    about 0.2 ms a call to it, profiler overhead included); eager calls outside torch.func need no
    such binding. torch.func
    (which requires ``setup_context``) and torch.compile get ``function`` itself."""

    def forward(ctx, *args):
        output = function.forward(*args)
        function.setup_context(ctx, args, output)
        return output

    return type(f"{function.__name__}Eager", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(function.backward),
                 "__doc__": _eager_twin.__doc__})


def _pick(function, eager_twin):
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function
    return eager_twin


_ExpertMLPEager = _eager_twin(ExpertMLPFunction)
_RouteEager = _eager_twin(RouteFunction)


def apply_route(*args):
    """``RouteFunction.apply``, through its eager twin outside torch.compile and torch.func."""
    return _pick(RouteFunction, _RouteEager).apply(*args)


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


def autocast_inputs(x, topk_weights, w1, w2):
    """Under ``torch.autocast``, the floating inputs in the autocast dtype, as ``nn.Linear`` takes
    them: the GEMMs run in that dtype, and float32 parameters get float32 gradients through the
    cast. Outside autocast, the inputs unchanged."""
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return x, topk_weights, w1, w2  # (a non-tensor x gets its error from the argument checks)
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in (x, topk_weights, w1, w2))


def check_routing(routing, topk_ids: torch.Tensor, expert_widths: tuple) -> None:
    """A ``routing=`` argument must have been built for these ids and widths (host facts only:
    checking the ids themselves would be a host synchronization)."""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a vmoe.ops.routing.Routing from build_routing, "
                        f"got {type(routing).__name__}")
    T, k = topk_ids.shape
    if (routing.num_tokens, routing.k) != (T, k):
        raise ValueError(f"routing was built for topk_ids of shape [{routing.num_tokens}, "
                         f"{routing.k}], but topk_ids has shape [{T}, {k}]")
    if tuple(routing.expert_widths) != tuple(expert_widths):
        raise ValueError(f"routing was built for expert_widths {list(routing.expert_widths)}, "
                         f"got {list(expert_widths)}")
    if routing.counts.device != topk_ids.device:
        raise ValueError(f"routing is on {routing.counts.device} but topk_ids is on "
                         f"{topk_ids.device}; they must match")


def apply_experts(x, topk_weights, w1, w2, routing_tensors, expert_widths: tuple,
                  activation: str) -> torch.Tensor:
    """The kernel path of :func:`expert_mlp`, from checked inputs and the routing arrays
    (:func:`vmoe.library.routing`). w1 and w2 may also be per-expert ``[E, d, g*I]`` and
    ``[E, I, d]`` for experts of one width (:mod:`vmoe.hf`), read in place whatever their strides
    (:func:`vmoe.ops.grouped_gemm.kernel_weight`); everything else is made contiguous."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the Triton kernels take {KERNEL_DTYPES} "
                        "(use impl='reference' for others)")
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, topk_weights, w1, w2))
    function = _pick(ExpertMLPFunction, _ExpertMLPEager)
    widths = tuple(expert_widths)
    y, _, _ = function.apply(x.contiguous(), topk_weights.contiguous(), kernel_weight(w1, widths),
                             kernel_weight(w2, widths), *routing_tensors, widths, activation, save)
    return y


def precompile_experts(x, topk_ids, topk_weights, w1, w2, widths: tuple, activation: str) -> None:
    """Before the first kernel-path call of its kind, compile the routing, the experts'
    forward and their backward in parallel (:func:`vmoe.ops.utils.precompile.first_call`)."""
    if not precompile.applicable(x):
        return
    sig = precompile.signature
    key = ("experts", widths, activation, tuple(topk_ids.shape[1:]), topk_ids.dtype,
           sig(x, rows=True), sig(topk_weights, rows=True), sig(w1), sig(w2))
    precompile.first_call(
        key, lambda x, w, a, b: apply_experts(x, w, a, b, ops.routing(topk_ids, widths), widths,
                                              activation),
        (x, topk_weights, w1, w2))


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
            outside ``[0, E)``, whatever their width, are dropped, or raise under VMOE_CHECK=1
            (a host sync).
        topk_weights: ``[T, k]``, x's dtype.
        w1: ``[d, g*F]`` with g = 2 for swiglu, else 1.  w2: ``[F, d]``.
        expert_widths: f_e for each expert, a sequence of ints or an int tensor. A width of 0 is
            a null expert: it owns no columns, gets no GEMM tile, and its slots add exactly 0
            (their weight gradient is 0). At least one width must be >= 1.
        activation: ``"relu2"``, ``"gelu"``, ``"silu"`` or ``"swiglu"``.
        impl: ``"auto"`` (Triton on CUDA, or on CPU under TRITON_INTERPRET=1; else the reference
            loop), ``"triton"`` or ``"reference"``.
        routing: metadata already built by :func:`vmoe.ops.routing.build_routing` for these ids and
            widths (checked against their shapes).

    Under ``torch.autocast``, x, topk_weights, w1 and w2 are cast to the autocast dtype first, as
    ``nn.Linear`` does. Works under ``torch.compile`` (fullgraph), CUDA graphs and
    ``torch.func.grad``; a second derivative raises.

    Returns:
        y ``[T, d]`` in x's dtype (the autocast dtype under autocast).

    Example:
        >>> y = expert_mlp(x, ids, weights, w1, w2, [512] * 4 + [256] * 8)
    """
    x, topk_weights, w1, w2 = autocast_inputs(x, topk_weights, w1, w2)
    widths = check_expert_mlp_args(x, topk_ids, topk_weights, w1, w2, expert_widths, activation)
    if not use_triton(x, impl):
        return reference.expert_mlp_unchecked(x, topk_ids, topk_weights, w1, w2, widths, activation)
    precompile_experts(x, topk_ids, topk_weights, w1, w2, widths, activation)
    if routing is None:
        routing_tensors = ops.routing(topk_ids, widths)
    else:
        check_routing(routing, topk_ids, widths)
        routing_tensors = routing.tensors()
    return apply_experts(x, topk_weights, w1, w2, routing_tensors, widths, activation)
