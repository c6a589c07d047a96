"""MoEMLP: the router, top-k selection, the auxiliary losses, and the experts.

Derivation of the losses: notebooks/06_layer.ipynb. Shape letters: see :mod:`vmoe.config`.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn as nn

from vmoe import library as ops
from vmoe import reference
from vmoe.autograd import apply_experts, apply_route, autocast_inputs, use_triton
from vmoe.config import MoEConfig, column_offsets, gate_factor
from vmoe.ops.utils import precompile
from vmoe.ops.utils.device import device_ints


class Routed(NamedTuple):
    """What :meth:`MoEMLP.route` hands to the experts, for ``[T, d]`` tokens."""

    x2: torch.Tensor             # [T, d] in the experts' dtype (the autocast dtype under autocast)
    w1: torch.Tensor             # [d, g*(F+S)] in the experts' dtype
    w2: torch.Tensor             # [F+S, d] in the experts' dtype
    topk_ids: torch.Tensor       # [T, k]
    topk_weights: torch.Tensor   # [T, k] in the experts' dtype
    routing: tuple | None        # the five routing arrays (kernel path), None on the torch path
    counts: torch.Tensor         # [E] assignments per expert
    aux: dict                    # router_z_loss, load_balance_loss, compute_loss (and
                                 # null_share_loss with max_null_share): [] float32
    f_i: torch.Tensor            # [E] fraction of the T*k assignments per expert


def add_router_state(module: nn.Module, config: MoEConfig) -> None:
    """What :meth:`MoEMLP.route` reads besides the weights: the load-balance group sizes, one per
    ``(count, width)`` pair. The widths themselves are read from the config, never from a buffer,
    so that ``module.to(dtype)`` cannot round them."""
    module._group_sizes = tuple(count for count, _ in config.expert_sizes)


_warned_reference_on_cpu = False


def _warn_reference_on_cpu() -> None:
    """Say once that ``impl="auto"`` fell back to the per-expert loop on a CPU."""
    global _warned_reference_on_cpu
    if not _warned_reference_on_cpu:
        _warned_reference_on_cpu = True
        warnings.warn("vmoe: no GPU and TRITON_INTERPRET is not set, so MoEMLP runs the reference "
                      "per-expert loop (impl='auto' resolved to 'reference'). Set TRITON_INTERPRET=1 "
                      "before importing vmoe to run the Triton kernels in the interpreter, or pass "
                      "impl='reference' to choose the loop and silence this.", stacklevel=3)


class MoEMLP(nn.Module):
    """A Mixture-of-Experts MLP whose experts may have different widths.

    Attributes:
        router: ``nn.Linear(d, E, bias=False)``, one logit per expert, null experts included.
        w1: ``[d, g*(F+S)]`` expert up projections, expert e owning columns
            ``[g*o_e, g*(o_e+f_e))`` and the shared expert, if any, the last g*S.
        w2: ``[F+S, d]`` expert down projections, expert e owning rows ``[o_e, o_e+f_e)`` and the
            shared expert the last S.
        shared_gate: ``nn.Linear(d, 1, bias=False)`` when ``config.shared_expert_gate``, else None.

    The shared expert (``config.shared_expert_width`` S > 0) is one more ragged group of the same
    launches, expert id E, that every token gets with weight 1 or ``sigmoid(shared_gate(x))``. It
    takes no part in routing, counts, f_i or the aux losses.

    ``forward(x)`` takes ``[B, S, d]`` or ``[T, d]`` and returns ``(out, aux_loss, f_i)``:
        * ``out``: x's shape.
        * ``aux_loss``: a dict of scalar tensors, differentiable w.r.t. the router, with
          ``P`` the router probabilities ``[T, E]`` (sigmoid or softmax of the logits) and
          ``n_e`` the assignments per expert:

          - ``router_z_loss = mean_t(logsumexp_e(logits[t])^2)``: keeps the logits small.
          - ``load_balance_loss``: for each group g of equal-width experts, with
            ``f_i = n_i / sum_{j in g} n_j`` and ``p_i = mean_t P[t, i] / sum_{j in g} mean_t P[t, j]``,
            ``L_g = |g| * sum_{i in g} f_i * p_i`` (switch-style, 1 when balanced); the loss is
            the mean of L_g over the groups.
          - ``compute_loss = mean_t(sum_e P[t, e] * f_e) / mean_e(f_e)``: the expected width per
            unit of probability, relative to the mean width; it pushes tokens toward cheap experts.
          - ``null_share_loss``, only with ``config.max_null_share`` set: ``relu(s - bound) * p``,
            s the fraction of assignments to null experts and p their summed ``mean_t P``
            (:func:`vmoe.reference.null_share_loss`).
        * ``f_i``: ``[E]`` fraction of the T*k assignments that went to each expert (sums to 1).
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        d, E = config.n_embd, config.num_experts
        F = config.total_width + config.shared_expert_width
        g = gate_factor(config.activation)
        self.router = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(d, g * F))
        self.w2 = nn.Parameter(torch.empty(F, d))
        self.shared_gate = nn.Linear(d, 1, bias=False) if config.shared_expert_gate else None
        add_router_state(self, config)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        d = self.config.n_embd
        nn.init.normal_(self.w1, std=d ** -0.5)
        widths = self.config.kernel_widths
        for f, o in zip(widths, column_offsets(widths)):
            if f:  # a null expert owns no rows
                nn.init.normal_(self.w2[o:o + f], std=f ** -0.5)
        nn.init.normal_(self.router.weight, std=d ** -0.5)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=d ** -0.5)

    def forward(self, x: torch.Tensor):
        cfg = self.config
        if x.dim() not in (2, 3) or x.shape[-1] != cfg.n_embd:
            raise ValueError(f"x must be [B, S, n_embd] or [T, n_embd] with n_embd={cfg.n_embd}, "
                             f"got shape {tuple(x.shape)}")
        weight = self.router.weight
        if (x.dtype != weight.dtype and x.is_floating_point()
                and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"x has dtype {x.dtype} but the layer's parameters are {weight.dtype}: "
                            f"cast one to the other (x.to({weight.dtype}) or moe.to({x.dtype})), "
                            "or run under torch.autocast")
        if precompile.applicable(x) and use_triton(x, cfg.impl):
            self._precompile(x)
        shape = x.shape
        x2, w1, w2, topk_ids, topk_weights, routing, _, aux, f_i = self.route(
            x.reshape(-1, cfg.n_embd))
        S = cfg.shared_expert_width
        if routing is not None:
            if S:
                routing = ops.shared_slot(routing, cfg.expert_widths, S, cfg.num_active_experts)
                topk_weights = self.with_shared_weight(x2, topk_weights)
            out = apply_experts(x2, topk_weights, w1, w2, routing, cfg.kernel_widths,
                                cfg.activation)
        else:
            g, F = gate_factor(cfg.activation), cfg.total_width
            out = reference.expert_mlp_unchecked(x2, topk_ids, topk_weights, w1[:, :g * F],
                                                 w2[:F], cfg.expert_widths, cfg.activation)
            if S:
                out = out + reference.shared_expert(x2, w1[:, g * F:], w2[F:], cfg.activation,
                                                    self.shared_weight(x2))
        return out.reshape(shape), aux, f_i

    def _precompile(self, x: torch.Tensor) -> None:
        """Before this layer's first call of a kind (dtypes, strides, grad mode, autocast), its
        kernels compile in parallel (:mod:`vmoe.ops.utils.precompile`). The full key costs some
        10 µs of host time, so a call like the last one skips it."""
        quick = (x.dtype, x.device, x.requires_grad, torch.is_grad_enabled(),
                 torch.is_autocast_enabled(x.device.type), self.w1.dtype, self.w1.requires_grad,
                 self.router.weight.requires_grad)
        if quick == getattr(self, "_precompile_last", None):
            return
        self._precompile_last = quick
        params = tuple(self.parameters())
        key = ("MoEMLP", repr(self.config), precompile.signature(x.reshape(-1, x.shape[-1]), rows=True),
               *map(precompile.signature, params))
        precompile.first_call(key, self.forward, (x,), params)

    def shared_weight(self, x2: torch.Tensor) -> torch.Tensor | None:
        """``[T, 1]`` ``sigmoid(shared_gate(x))`` in the gate's output dtype (the experts' dtype,
        which the weights take anyway), or None without a gate (weight 1)."""
        if self.shared_gate is None:
            return None
        return torch.sigmoid(self.shared_gate(x2))

    def with_shared_weight(self, x2, topk_weights):
        """``[T, k+1]`` weights: slot k is the shared expert's, 1 or the gate."""
        gate = self.shared_weight(x2)
        gate = topk_weights.new_ones(x2.shape[0], 1) if gate is None else gate.to(topk_weights.dtype)
        return torch.cat([topk_weights, gate], 1)

    def route(self, x2: torch.Tensor) -> Routed:
        """The router on ``[T, d]`` tokens, as a :class:`Routed`, with x2, w1, w2 and the weights
        in the experts' dtype (the autocast dtype under autocast). On the kernel path, the fused
        router (:mod:`vmoe.ops.router`): probabilities, top-k, weights, counts, the five routing
        arrays and the aux losses in three launches, in float32 whatever the logits' dtype.
        Otherwise (``impl="reference"``, or no GPU and no interpreter) the same in torch ops,
        ``routing`` None: the oracle of the fused path, whose top-k ties may break differently
        (torch.topk promises no order; the fused router picks the lower id)."""
        cfg = self.config
        T, E, k = x2.shape[0], cfg.num_experts, cfg.num_active_experts
        logits = self.router(x2)                                           # [T, E]
        if use_triton(x2, cfg.impl):
            x2, _, w1, w2 = autocast_inputs(x2, None, self.w1, self.w2)
            (topk_weights, p_sum, _, z_loss, lb_loss, compute_loss, topk_ids, f_i,
             *routing) = apply_route(logits, k, cfg.router, cfg.norm_topk_prob, cfg.expert_widths,
                                     self._group_sizes, x2.dtype)
            aux = {"router_z_loss": z_loss, "load_balance_loss": lb_loss,
                   "compute_loss": compute_loss}
            self._add_null_share_loss(aux, lambda: p_sum / max(T, 1), f_i)
            return Routed(x2, w1, w2, topk_ids, topk_weights, routing, routing[0], aux, f_i)
        if cfg.impl == "auto":
            _warn_reference_on_cpu()
        logits = logits.float()
        probs = reference.router_probs(logits, cfg.router)
        topk_probs, topk_ids = probs.topk(k, dim=-1)
        if cfg.norm_topk_prob:
            topk_probs = topk_probs / topk_probs.sum(-1, keepdim=True)
        x2, topk_weights, w1, w2 = autocast_inputs(x2, topk_probs, self.w1, self.w2)
        counts = torch.zeros(E, device=x2.device).scatter_add_(
            0, topk_ids.reshape(-1), torch.ones(T * k, device=x2.device))
        aux = self.aux_losses(logits, probs, counts)
        f_i = counts / max(T * k, 1)
        self._add_null_share_loss(aux, lambda: probs.sum(0) / max(T, 1), f_i)
        return Routed(x2, w1, w2, topk_ids, topk_weights.to(x2.dtype), None, counts, aux, f_i)

    def _add_null_share_loss(self, aux: dict, p_mean, f_i: torch.Tensor) -> None:
        """``aux["null_share_loss"]`` when the config bounds the null share (float32, like the
        other losses); ``p_mean()`` gives the ``[E]`` mean probabilities, computed only then."""
        bound = self.config.max_null_share
        if bound is not None:
            aux["null_share_loss"] = reference.null_share_loss(p_mean().float(), f_i.float(),
                                                               self.config.null_ranges, bound)

    def aux_losses(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> dict:
        """The three auxiliary losses (see the class docstring) from ``[T, E]`` logits and
        probabilities and the ``[E]`` assignment counts, in float32 whatever the autocast state
        (:func:`vmoe.reference.route_aux_losses`), balanced over the groups the fused router
        reads (``_group_sizes``)."""
        logits, probs = logits.float(), probs.float()
        widths = None
        if not torch.compiler.is_compiling():  # a cached copy; under compile, a traced constant
            widths = device_ints(self.config.expert_widths, probs.device, torch.float32)
        return reference.route_aux_losses(torch.logsumexp(logits, dim=-1), probs, counts,
                                          self.config.expert_sizes, widths, self._group_sizes)
