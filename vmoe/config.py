"""MoEConfig: the static description of a variable-width MoE layer, validated on construction.

Shape letters used across vmoe (see notebooks/01_reference.ipynb):
    T    tokens            d    model width (n_embd)
    E    experts           k    experts per token (num_active_experts)
    f_e  width of expert e F    total width, sum of f_e
    o_e  column offset of expert e, sum of f_j for j < e
    S    width of the shared (always-on) expert, 0 for none

A width of 0 is a null expert: it owns no columns, costs nothing, and adds exactly 0 to the
tokens routed to it (notebooks/06_layer.ipynb).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from functools import cached_property

ACTIVATIONS = ("relu2", "gelu", "silu", "swiglu")
ROUTERS = ("sigmoid", "softmax")
IMPLS = ("auto", "triton", "reference")


def expand_sizes(expert_sizes) -> tuple[int, ...]:
    """``[(count, width), ...]`` as one width per expert: ``[(2, 64), (1, 8)]`` -> ``(64, 64, 8)``."""
    return tuple(w for count, w in expert_sizes for _ in range(count))


@functools.lru_cache(maxsize=None)
def column_offsets(expert_widths: tuple) -> tuple[int, ...]:
    """``(o_0, ..., o_E)``: o_e = sum of f_j for j < e, the first row of w2 (column of w1, times g)
    that expert e owns; the last entry is F."""
    return tuple(itertools.accumulate(expert_widths, initial=0))


def gate_factor(activation: str) -> int:
    """How many w1 columns an expert owns per unit of width: 2 for gated activations, else 1."""
    return 2 if activation == "swiglu" else 1


def check_activation(activation) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def check_expert_widths(expert_widths) -> tuple[int, ...]:
    """Normalise ``expert_widths`` (a sequence of ints or a 1-D integer tensor) to a tuple of ints.

    The widths decide shapes and launch grids, so they are host-side facts. A tensor that lives on an
    accelerator is read back once here; keep widths as a Python sequence in hot loops.
    """
    import torch

    if isinstance(expert_widths, torch.Tensor):
        if expert_widths.dim() != 1 or expert_widths.is_floating_point() or expert_widths.is_complex():
            raise TypeError(
                f"expert_widths must be a 1-D integer tensor, got dim={expert_widths.dim()} "
                f"dtype={expert_widths.dtype}")
        widths = tuple(int(w) for w in expert_widths.tolist())  # host-ok: widths are static shapes
    else:
        try:
            widths = tuple(expert_widths)
        except TypeError:
            raise TypeError(f"expert_widths must be a sequence of ints or an int tensor, "
                            f"got {type(expert_widths).__name__}") from None
        for w in widths:
            if isinstance(w, bool) or not isinstance(w, int) and not hasattr(w, "__index__"):
                raise TypeError(f"expert_widths must hold ints, got {w!r} ({type(w).__name__})")
        widths = tuple(int(w) for w in widths)  # host-ok: widths are static shapes, read once
    if len(widths) == 0:
        raise ValueError("expert_widths must name at least one expert, got an empty sequence")
    bad = [w for w in widths if w < 0]
    if bad:
        raise ValueError(f"expert_widths must all be >= 0 (0 is a null expert), got {bad[0]} "
                         f"in {list(widths)}")
    if not any(widths):
        raise ValueError(f"expert_widths are all 0 (null experts): at least one expert must have "
                         f"a width >= 1, got {list(widths)}")
    return widths


@dataclass(frozen=True)
class MoEConfig:
    """Static configuration of an :class:`vmoe.MoEMLP`, validated on construction and frozen after
    (a layer's parameters are shaped by it; ``dataclasses.replace`` makes a new, checked one).

    Args:
        n_embd: model width d.
        expert_sizes: ``[(count, width), ...]``; experts are numbered in the order this expands,
            so ``[(4, 512), (8, 256)]`` is experts 0-3 of width 512 then 4-11 of width 256.
            Stored as a tuple of pairs. A width of 0 makes null experts: they keep their router
            logit and their place in the aux losses, but own no weights and add 0 to a token.
        num_active_experts: k, experts per token (top-k), 1 <= k <= E.
        activation: ``"relu2"`` (relu(z)**2), ``"gelu"`` (exact, erf), ``"silu"`` or ``"swiglu"``
            (gated: silu(gate) * up, so w1 has two columns per unit of width).
        router: ``"sigmoid"`` or ``"softmax"`` probabilities over the router logits.
        norm_topk_prob: renormalise the k selected probabilities to sum to 1.
        impl: ``"auto"`` (Triton on CUDA, and on CPU when TRITON_INTERPRET=1; the reference loop
            otherwise), ``"triton"`` or ``"reference"``.
        shared_expert_width: S, the width of an always-on expert that every token gets, stored
            after the routed experts (columns ``[g*F, g*(F+S))`` of w1, rows ``[F, F+S)`` of w2)
            and computed in the same launches; 0 for none.
        shared_expert_gate: scale the shared expert by ``sigmoid(shared_gate(x))`` (a
            ``Linear(d, 1)``, as Qwen2-MoE does) instead of 1.
        max_null_share: None, or a bound in (0, 1) on the fraction of slots that null experts
            take: the layer's aux losses then include ``null_share_loss``, which is 0 while the
            null experts' share of the assignments stays at or below the bound and, above it,
            pushes their router probability down (see :class:`vmoe.MoEMLP`). Needs a null expert.
            Load balancing runs within each width group, so without a bound nothing limits how
            many slots the null group takes.
    """

    n_embd: int = 768
    expert_sizes: tuple = ((4, 512), (8, 256), (4, 128))
    num_active_experts: int = 2
    activation: str = "relu2"
    router: str = "sigmoid"
    norm_topk_prob: bool = True
    impl: str = "auto"
    shared_expert_width: int = 0
    shared_expert_gate: bool = False
    max_null_share: float | None = None

    def __post_init__(self):
        if isinstance(self.n_embd, bool) or not isinstance(self.n_embd, int) or self.n_embd < 1:
            raise ValueError(f"n_embd must be an int >= 1, got {self.n_embd!r}")
        try:
            sizes = [tuple(s) for s in self.expert_sizes]
        except TypeError:
            raise TypeError(f"expert_sizes must be a list of (count, width) pairs, "
                            f"got {self.expert_sizes!r}") from None
        if not sizes:
            raise ValueError("expert_sizes must hold at least one (count, width) pair, got []")
        for s in sizes:
            if len(s) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in s):
                raise TypeError(f"expert_sizes entries must be (count, width) int pairs, got {s!r}")
            if s[0] < 1:
                raise ValueError(f"expert_sizes count must be >= 1, got {s[0]} in {s}")
            if s[1] < 0:
                raise ValueError(f"expert_sizes width must be >= 0 (0 is a null expert), "
                                 f"got {s[1]} in {s}")
        if not any(w for _, w in sizes):
            raise ValueError(f"expert_sizes has only null experts (width 0): at least one expert "
                             f"must have a width >= 1, got {sizes}")
        object.__setattr__(self, "expert_sizes", tuple(sizes))  # frozen: normalise once, here
        E = self.num_experts
        if (isinstance(self.num_active_experts, bool) or not isinstance(self.num_active_experts, int)
                or not 1 <= self.num_active_experts <= E):
            raise ValueError(f"num_active_experts must be an int in [1, {E}] (the number of experts), "
                             f"got {self.num_active_experts!r}")
        check_activation(self.activation)
        if not isinstance(self.norm_topk_prob, bool):
            raise TypeError(f"norm_topk_prob must be a bool, got {self.norm_topk_prob!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        S = self.shared_expert_width
        if isinstance(S, bool) or not isinstance(S, int) or S < 0:
            raise ValueError(f"shared_expert_width must be an int >= 0 (0 for none), got {S!r}")
        if not isinstance(self.shared_expert_gate, bool):
            raise TypeError(f"shared_expert_gate must be a bool, got {self.shared_expert_gate!r}")
        bound = self.max_null_share
        if bound is not None:
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < 1:
                raise ValueError(f"max_null_share must be None or a number in (0, 1), got {bound!r}")
            if not self.null_ranges:
                raise ValueError(f"max_null_share={bound} bounds the null experts' share, but "
                                 f"expert_sizes {self.expert_sizes} has no null expert (width 0)")
        if self.shared_expert_gate and S == 0:
            raise ValueError("shared_expert_gate=True needs a shared expert: set "
                             "shared_expert_width >= 1")

    @cached_property
    def null_ranges(self) -> tuple[tuple[int, int], ...]:
        """``((lo, hi), ...)``: the expert ids ``[lo, hi)`` of each group of null experts, in order."""
        out, lo = [], 0
        for count, width in self.expert_sizes:
            if width == 0:
                out.append((lo, lo + count))
            lo += count
        return tuple(out)

    @cached_property
    def expert_widths(self) -> tuple[int, ...]:
        """f_e for e = 0..E-1, in expansion order."""
        return expand_sizes(self.expert_sizes)

    @cached_property
    def num_experts(self) -> int:
        return len(self.expert_widths)

    @cached_property
    def total_width(self) -> int:
        """F = sum of f_e (the routed experts)."""
        return sum(count * w for count, w in self.expert_sizes)

    @cached_property
    def kernel_widths(self) -> tuple[int, ...]:
        """The widths the expert kernels run: the routed f_e, then S when there is a shared
        expert (expert id E, which every token gets as its slot k)."""
        S = self.shared_expert_width
        return self.expert_widths + ((S,) if S else ())


def check_routed_args(x, topk_ids, topk_weights, weights: dict) -> None:
    """The checks every expert computation shares: x ``[T, d]`` floating point, integer
    ``topk_ids [T, k]``, ``topk_weights`` of its shape, and ``weights`` (name: tensor) and
    ``topk_weights`` in x's dtype, everything on x's device. The weights' shapes are the caller's."""
    import torch

    for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights), *weights.items()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, d], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids must be [T, k] with T = x.shape[0] = {x.shape[0]}, "
                         f"got shape {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    for name, t in (*weights.items(), ("topk_weights", topk_weights)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    for name, t in (*weights.items(), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must match")


def check_expert_mlp_args(x, topk_ids, topk_weights, w1, w2, expert_widths, activation):
    """Validate the arguments of ``expert_mlp`` (both implementations); return the widths as a tuple.

    Checks shapes, dtypes and devices only: id *values* live on the device, and reading them back
    would be a host synchronization, so their range is checked only when VMOE_CHECK=1.
    """
    check_activation(activation)
    widths = check_expert_widths(expert_widths)
    check_routed_args(x, topk_ids, topk_weights, {"w1": w1, "w2": w2})
    d, F, g = x.shape[1], sum(widths), gate_factor(activation)
    if tuple(w1.shape) != (d, g * F):
        raise ValueError(f"w1 must be [d, {g}*F] = [{d}, {g * F}] for widths summing to F={F} "
                         f"and activation {activation!r}, got {tuple(w1.shape)}")
    if tuple(w2.shape) != (F, d):
        raise ValueError(f"w2 must be [F, d] = [{F}, {d}], got {tuple(w2.shape)}")
    return widths
