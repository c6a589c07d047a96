"""Slimming: turn a trained MoE layer into one whose experts have different widths.

Derivation, pictures and a worked example: notebooks/11_slim.ipynb. Shape letters: see
:mod:`vmoe.config`; here ``n_e`` is the number of calibration assignments (token, slot) that the
layer's own router sends to expert e, ``w_e`` the width expert e keeps, and channel j of expert e
is intermediate unit j of its MLP: columns ``g*o_e + j`` (and, gated, ``g*o_e + f_e + j``) of w1
and row ``o_e + j`` of w2.

Three steps, each a public function, and :func:`slim` doing all three:

1. :func:`channel_scores`: one pass over calibration tokens through the layer's router gives a
   score per channel of every expert (:data:`CRITERIA`) and n_e.
2. :func:`choose_widths`: which channels each expert keeps under a budget (:data:`BUDGET_KINDS`,
   :data:`ALLOCATIONS`), in aligned blocks.
3. :func:`prune`: a new layer holding exactly those channels, router and shared expert copied, so
   routing stays as trained.

:func:`slim_model` slims every :class:`~vmoe.MoEMLP` of a model from one calibration pass, and
:func:`finetune` is a short, generic training loop for afterwards.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from vmoe import reference
from vmoe.config import MoEConfig, column_offsets, gate_factor
from vmoe.layer import MoEMLP

# How a channel is scored; h_tj is channel j's activation for token t, omega_t the routing weight
# of the slot that sent t to the expert, and the sums run over the assignments to the expert, / T.
CRITERIA = {
    # The mean norm of what the channel adds to the output: sum_t omega_t |h_tj| * ||w2 row j|| / T.
    "act_w2": "routing-weighted activation magnitude times the down-projection row norm",
    # The same without the row norm: what the channel computes, not what it contributes.
    "act": "routing-weighted activation magnitude",
    # Data-free: ||w2 row j|| times the norm of each of its w1 columns (gate and up, for swiglu:
    # the gated product scales with both).
    "weight": "w1 column norm(s) times w2 row norm (no data)",
}
# What the budget is a fraction of. "flops": sum_e n_e * f_e, the routed experts' forward (and
# backward) FLOPs on the calibration tokens, each assignment to e costing 2*d*(g+1)*f_e: experts
# that receive more tokens cost more per channel. "params": sum_e f_e, the routed experts'
# parameters, each channel owning (g+1)*d. The router and the shared expert are never counted.
BUDGET_KINDS = ("flops", "params")
# How the budget is spread. "global": greedily over every expert's aligned blocks of channels in
# descending score / cost. "uniform": every expert keeps the same fraction of its width (the
# criterion still picks which channels). "drop": whole experts are kept or made null, greedily
# by total score / cost.
ALLOCATIONS = ("global", "uniform", "drop")
# The load-balance groups of the slimmed layer: "original" keeps the groups the layer was trained
# with (a SlimMoEMLP), "widths" makes a plain MoEMLP whose groups are runs of equal width.
GROUPS = ("original", "widths")


class SlimMoEMLP(MoEMLP):
    """A :class:`~vmoe.MoEMLP` whose load-balance groups are given, not read from its config.

    MoEMLP balances load within each ``(count, width)`` pair of ``config.expert_sizes``. A slimmed
    layer's widths differ from expert to expert, and a group of one expert has a constant
    load-balance loss (``f_i = p_i = 1``, so ``L_g = 1``): with groups made from its widths, the
    layer would lose load balancing altogether. This subclass keeps the groups the layer was
    trained with, ``balance_groups`` (expert counts, in expert order, summing to E), on both
    paths: the fused router and :meth:`~vmoe.MoEMLP.aux_losses` (the torch path) read them from
    ``_group_sizes``. Everything else, the parameters
    and their state_dict keys included, is MoEMLP's; loading the state_dict into
    ``MoEMLP(config)`` gives the same function with width groups.
    """

    def __init__(self, config: MoEConfig, balance_groups: Sequence[int]):
        super().__init__(config)
        groups = tuple(balance_groups)
        if (not groups or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in groups)
                or sum(groups) != config.num_experts):
            raise ValueError(f"balance_groups must be ints >= 1 summing to E = {config.num_experts}, "
                             f"got {list(groups)}")
        self.balance_groups = groups
        self._group_sizes = groups  # what MoEMLP.route hands the fused router

    def extra_repr(self) -> str:
        return f"balance_groups={list(self.balance_groups)}"


@dataclasses.dataclass(frozen=True)
class ChannelScores:
    """What one calibration pass measures (:func:`channel_scores`)."""

    criterion: str
    scores: tuple      # per expert, [f_e] float64 on the CPU
    counts: tuple      # n_e: calibration assignments routed to expert e
    tokens: int        # T, the calibration tokens


@dataclasses.dataclass(frozen=True)
class SlimReport:
    """What :func:`slim` chose and why. ``kept[e]`` are expert e's kept channels (indices within the
    expert, ascending), ``scores[e]`` its ``[f_e]`` channel scores, ``counts[e]`` its n_e.
    ``flops_fraction`` = sum_e n_e w_e / sum_e n_e f_e and ``params_fraction`` = sum_e w_e / sum_e f_e
    are what the new layer keeps; ``achieved`` is the one ``budget_kind`` names."""

    criterion: str
    budget: float
    budget_kind: str
    allocation: str
    align: int
    widths_before: tuple
    widths: tuple
    kept: tuple
    scores: tuple
    counts: tuple
    tokens: int
    flops_fraction: float
    params_fraction: float

    @property
    def achieved(self) -> float:
        return self.flops_fraction if self.budget_kind == "flops" else self.params_fraction

    def experts(self) -> list[dict]:
        """One dict per expert: widths before and after, n_e, the total score and the share of it
        the kept channels hold."""
        rows = []
        for e, (f, w, s, k) in enumerate(zip(self.widths_before, self.widths, self.scores, self.kept)):
            total, kept = float(s.sum()), float(s[k].sum())  # host-ok: the scores live on the host
            rows.append({"expert": e, "width_before": f, "width": w, "load": self.counts[e],
                         "score": total, "score_kept": kept / total if total > 0 else 0.0})
        return rows

    def __str__(self) -> str:
        head = (f"slim {self.criterion}/{self.allocation}: budget {self.budget:g} of {self.budget_kind}, "
                f"achieved {self.achieved:.4f} (flops {self.flops_fraction:.4f}, params "
                f"{self.params_fraction:.4f}) on {self.tokens} tokens")
        lines = [head, "expert  width  ->  kept   load   score kept"]
        for r in self.experts():
            lines.append(f"{r['expert']:>6} {r['width_before']:>6} -> {r['width']:>5} {r['load']:>6} "
                         f"{r['score_kept']:>12.3f}")
        return "\n".join(lines)


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _check_budget(budget) -> float:
    # A Python number (a tensor is not a numbers.Real); NaN fails the comparison too.
    if (isinstance(budget, bool) or not isinstance(budget, numbers.Real)
            or not 0.0 < float(budget) <= 1.0):  # host-ok: a Python number
        raise ValueError(f"budget must be a number in (0, 1], the fraction of the experts' cost to keep, "
                         f"got {budget!r}")
    return float(budget)  # host-ok: a Python number


def _check_align(align) -> int:
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be an int >= 1 (widths are kept in multiples of it), got {align!r}")
    return align


def _check_layer(moe) -> MoEMLP:
    if not isinstance(moe, MoEMLP):
        raise TypeError(f"moe must be a vmoe.MoEMLP, got {type(moe).__name__}")
    return moe


def _calibration_tokens(moe: MoEMLP, calibration_x, max_tokens, seed) -> torch.Tensor:
    """``calibration_x`` as ``[T, d]`` on the layer's device, checked; at most ``max_tokens`` rows,
    sampled without replacement by a generator seeded with ``seed`` (kept in their order)."""
    d = moe.config.n_embd
    dtype = moe.router.weight.dtype
    if not isinstance(calibration_x, torch.Tensor):
        raise TypeError(f"calibration_x must be a torch.Tensor [T, d] or [B, S, d], "
                        f"got {type(calibration_x).__name__}")
    if calibration_x.dim() not in (2, 3) or calibration_x.shape[-1] != d:
        raise ValueError(f"calibration_x must be [T, n_embd] or [B, S, n_embd] with n_embd={d}, "
                         f"got shape {tuple(calibration_x.shape)}")
    if calibration_x.dtype != dtype:
        raise TypeError(f"calibration_x has dtype {calibration_x.dtype} but the layer's parameters are "
                        f"{dtype}: cast one to the other")
    x = calibration_x.detach().reshape(-1, d)
    if x.shape[0] == 0:
        raise ValueError("calibration_x is empty: slimming needs at least one calibration token")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1 or None, got {max_tokens!r}")
        if x.shape[0] > max_tokens:
            pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]
            x = x[pick.sort().values.to(x.device)]
    x = x.to(moe.router.weight.device)
    if not bool(torch.isfinite(x).all()):  # host-ok: slimming is offline, one check per call
        raise ValueError("calibration_x holds NaN or Inf")
    return x


@torch.no_grad()
def channel_scores(moe: MoEMLP, calibration_x: torch.Tensor, criterion: str = "act_w2", *,
                   max_tokens: int | None = None, seed: int = 0) -> ChannelScores:
    """Score every channel of every routed expert of ``moe`` on calibration tokens, in one pass.

    The tokens go through the layer's own router (:meth:`vmoe.MoEMLP.route`), so the assignments
    and their weights are the trained ones; each expert's activations ``h = act(x W1_e)`` are then
    computed in float64 for the tokens routed to it. See :data:`CRITERIA` for the scores; the
    activation criteria are means over the T calibration tokens, so an expert that receives more
    tokens scores higher. ``[B, S, d]`` input is flattened; ``max_tokens`` caps T by a seeded
    sample. Null experts (f_e = 0) get an empty score vector.
    """
    _check_layer(moe)
    _check_choice("criterion", criterion, CRITERIA)
    x = _calibration_tokens(moe, calibration_x, max_tokens, seed)
    cfg = moe.config
    g, widths = gate_factor(cfg.activation), cfg.expert_widths
    offsets = column_offsets(widths)
    routed = moe.route(x)
    ids = routed.topk_ids.long()
    counts = torch.bincount(ids.reshape(-1), minlength=cfg.num_experts)
    counts = tuple(int(n) for n in counts.tolist())  # host-ok: offline, once per call
    w1, w2 = moe.w1.detach().double(), moe.w2.detach().double()
    x64, weights = x.double(), routed.topk_weights.double()
    T = x.shape[0]
    scores = []
    for e, f in enumerate(widths):
        o = offsets[e]
        w1_e, w2_e = w1[:, g * o: g * (o + f)], w2[o: o + f]                    # [d, g*f], [f, d]
        if criterion == "weight":
            col_norms = w1_e.norm(dim=0).reshape(g, f)                          # gate (, up) per channel
            s = col_norms.prod(0) * w2_e.norm(dim=1)
        else:
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            h = reference.act(x64[tok] @ w1_e, cfg.activation)                  # [n_e, f]
            s = (weights[tok, slot] @ h.abs()) / T                              # [f]
            if criterion == "act_w2":
                s = s * w2_e.norm(dim=1)
        scores.append(s.cpu())  # host-ok: offline, the scores are returned on the host
    if not all(bool(torch.isfinite(s).all()) for s in scores):  # host-ok: offline check
        raise ValueError("the channel scores are not finite: the layer's weights hold NaN or Inf")
    return ChannelScores(criterion, tuple(scores), counts, T)


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """Channel indices by descending score, ties broken by the lower index."""
    return torch.sort(scores, descending=True, stable=True).indices


def choose_widths(scores: Sequence[torch.Tensor], units: Sequence[int], budget: float, *,
                  align: int = 8, allow_null: bool = False, allocation: str = "global"
                  ) -> tuple[tuple[int, ...], tuple[torch.Tensor, ...]]:
    """Which channels each expert keeps: ``(widths, kept)``, ``kept[e]`` ascending indices.

    Args:
        scores: per expert, ``[f_e]`` channel scores (higher is more important).
        units: per expert, the cost of one channel (an int >= 0; n_e for a FLOPs budget, 1 for a
            parameter budget). The budget is ``floor(budget * sum_e units_e * f_e)`` in these units.
        budget: in (0, 1]. At 1 every channel is kept.
        align: kept widths are multiples of ``align``, or 0, or the full f_e.
        allow_null: whether an expert may keep 0 channels; if not, each expert with f_e > 0 keeps
            at least ``min(align, f_e)``, its best channels, whatever they cost.
        allocation: see :data:`ALLOCATIONS`.

    Within an expert, channels are kept best first (ties to the lower index), so the cost of an
    expert's channel is the same for all of them and a block of ``align`` channels is the unit.
    ``"global"`` takes blocks in descending (sum of their scores) / cost, ties to the lower
    expert then block, skipping any that no longer fits and closing its expert; a block of cost 0
    and positive score is free and taken first. A block whose scores are all 0 (channels never
    active on the calibration tokens, or an expert no token reaches) is never bought. The kept
    cost is at most the budget and, unless every remaining block scores 0, less than one block
    below it. ``"uniform"`` gives each expert ``round(budget * f_e / align) * align`` channels.
    ``"drop"`` treats each expert as one block (needs ``allow_null``).
    """
    budget = _check_budget(budget)
    align = _check_align(align)
    _check_choice("allocation", allocation, ALLOCATIONS)
    if len(scores) != len(units):
        raise ValueError(f"scores and units must have one entry per expert, got {len(scores)} and "
                         f"{len(units)}")
    if any(isinstance(u, bool) or not isinstance(u, int) or u < 0 for u in units):
        raise ValueError(f"units must be ints >= 0, got {list(units)}")
    if allocation == "drop" and not allow_null:
        raise ValueError("allocation='drop' makes null experts: pass allow_null=True")
    widths_before = tuple(s.numel() for s in scores)
    ranked = [_ranked(s.double()) for s in scores]
    if budget >= 1.0:
        widths = widths_before
    elif allocation == "uniform":
        widths = []
        for f in widths_before:
            w = min(math.floor(budget * f / align + 0.5) * align, f)
            widths.append(min(align, f) if w == 0 and not allow_null else w)
        widths = tuple(widths)
    else:
        block = None if allocation == "drop" else align
        widths = _greedy(scores, ranked, units, budget, block, allow_null)
    kept = tuple(r[:w].sort().values for r, w in zip(ranked, widths))
    return widths, kept


def _greedy(scores, ranked, units, budget: float, block, allow_null: bool) -> tuple[int, ...]:
    """The "global" (``block`` channels at a time) and "drop" (``block`` None: whole experts)
    allocations of :func:`choose_widths`."""
    total = sum(u * s.numel() for u, s in zip(units, scores))
    cap = math.floor(budget * total + 1e-9)
    widths = [0] * len(scores)
    spent = 0
    candidates = []
    for e, (s, r, u) in enumerate(zip(scores, ranked, units)):
        f = s.numel()
        ordered = s.double()[r].tolist()  # host-ok: scores live on the host
        step = f if block is None else block
        for b, lo in enumerate(range(0, f, max(step, 1))):
            hi = min(lo + step, f)
            value, cost = math.fsum(ordered[lo:hi]), u * (hi - lo)
            if b == 0 and not allow_null:
                widths[e], spent = hi, spent + cost  # the forced minimum
                continue
            if value > 0:
                ratio = math.inf if cost == 0 else value / cost
                candidates.append((-ratio, e, b, hi, cost))
    if spent > cap:
        raise ValueError(f"budget={budget:g} is below what keeping min(align, f_e) channels of every "
                         f"expert costs ({spent / total:.4g} of the total): pass allow_null=True or a "
                         f"larger budget")
    closed = set()
    for _, e, b, hi, cost in sorted(candidates):
        if e in closed:
            continue
        if spent + cost > cap:
            closed.add(e)  # its later blocks come after this one
            continue
        widths[e], spent = hi, spent + cost
    if not any(widths):
        cheapest = min((c[4] for c in candidates), default=0)
        raise ValueError(f"budget={budget:g} keeps no expert: the cheapest block costs "
                         f"{cheapest / max(total, 1):.4g} of the total")
    return tuple(widths)


def expert_sizes_of(widths: Sequence[int]) -> tuple:
    """``[(count, width), ...]`` for per-expert widths: runs of equal neighbours merged."""
    sizes = []
    for w in widths:
        if sizes and sizes[-1][1] == w:
            sizes[-1] = (sizes[-1][0] + 1, w)
        else:
            sizes.append((1, w))
    return tuple(sizes)


@torch.no_grad()
def prune(moe: MoEMLP, kept: Sequence[torch.Tensor], groups: str = "original") -> MoEMLP:
    """A new layer whose expert e holds exactly channels ``kept[e]`` (indices within expert e,
    ascending) of ``moe``'s expert e, in their original order; the router, the shared expert and
    its gate are copied unchanged, on the same device and dtype. ``groups``: see :data:`GROUPS`
    (``"original"`` gives a :class:`SlimMoEMLP`). Leaves the global RNG as it was."""
    _check_layer(moe)
    _check_choice("groups", groups, GROUPS)
    cfg = moe.config
    widths_before = cfg.expert_widths
    if len(kept) != cfg.num_experts:
        raise ValueError(f"kept must hold one index tensor per expert ({cfg.num_experts}), got {len(kept)}")
    g, offsets = gate_factor(cfg.activation), column_offsets(widths_before)
    dev = moe.w1.device
    cols, rows, widths = [], [], []
    for e, idx in enumerate(kept):
        idx = torch.as_tensor(idx).long().cpu()  # host-ok: slimming is offline; indices go to the host
        f = widths_before[e]
        if idx.dim() != 1 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= f)) or (  # host-ok
                idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):  # host-ok: host indices
            raise ValueError(f"kept[{e}] must be ascending distinct channel indices in [0, {f}), "
                             f"got {idx.tolist()}")  # host-ok: an error message
        o = offsets[e]
        rows.append(o + idx)
        cols += [g * o + half * f + idx for half in range(g)]  # gate then up, as reference.act reads
        widths.append(idx.numel())
    if not any(widths):
        raise ValueError("kept keeps no channel of any expert: at least one expert needs a width >= 1")
    F, S = cfg.total_width, cfg.shared_expert_width
    rows.append(torch.arange(F, F + S))
    cols.append(torch.arange(g * F, g * (F + S)))
    new_cfg = dataclasses.replace(cfg, expert_sizes=expert_sizes_of(widths))
    with torch.random.fork_rng(devices=[]):  # the init below is overwritten; spare the caller's RNG
        new = (SlimMoEMLP(new_cfg, moe._group_sizes) if groups == "original" else MoEMLP(new_cfg))
    new = new.to(device=dev, dtype=moe.w1.dtype)
    new.w1.copy_(moe.w1[:, torch.cat(cols).to(dev)])
    new.w2.copy_(moe.w2[torch.cat(rows).to(dev)])
    new.router.weight.copy_(moe.router.weight)
    if moe.shared_gate is not None:
        new.shared_gate.weight.copy_(moe.shared_gate.weight)
    new.train(moe.training)
    return new


def slim(moe: MoEMLP, calibration_x: torch.Tensor, budget: float, *, criterion: str = "act_w2",
         budget_kind: str = "flops", allocation: str = "global", align: int = 8,
         allow_null: bool = False, groups: str = "original", max_tokens: int | None = None,
         seed: int = 0) -> tuple[MoEMLP, SlimReport]:
    """Slim a trained MoE layer to a variable-width one under a budget; returns ``(new, report)``.

    Args:
        moe: the :class:`~vmoe.MoEMLP` to slim (left unchanged).
        calibration_x: ``[T, d]`` or ``[B, S, d]`` inputs of the layer, in its parameters' dtype
            (moved to its device). One pass through its router scores every channel.
        budget: in (0, 1], the fraction of ``budget_kind`` to keep. 1 copies the layer.
        criterion: how channels are scored, one of :data:`CRITERIA`.
        budget_kind: ``"flops"`` (sum over the calibration assignments of the routed expert's
            width: an expert that receives more tokens costs more) or ``"params"``;
            see :data:`BUDGET_KINDS`.
        allocation: ``"global"`` (the greedy of :func:`choose_widths`), ``"uniform"`` (every
            expert cut to the same fraction) or ``"drop"`` (whole experts made null).
        align: kept widths are multiples of ``align`` (or 0, or an expert's full width). The kept
            cost is, for "global", at most the budget and less than one block of ``align``
            channels of one expert below it (unless only never-active channels are left); for
            "uniform", within half a block per expert of it; for "drop", at most the budget.
        allow_null: let an expert keep width 0: a null expert, which keeps its router logit (so
            tokens routed there get nothing from it) and computes nothing.
        groups: the load-balance groups of the new layer. ``"original"`` (default): the groups
            ``moe`` was trained with, in a :class:`SlimMoEMLP`, so fine-tuning balances load as
            training did. ``"widths"``: a plain MoEMLP whose config groups runs of equal width;
            since widths mostly differ, most groups hold one expert, whose load-balance loss is
            the constant 1, and the layer's balancing fades (all of it when all widths differ).
        max_tokens, seed: use at most ``max_tokens`` calibration tokens, sampled with ``seed``.

    The new layer's ``config.expert_sizes`` lists the widths as consecutive ``(count, width)``
    pairs, equal neighbours merged (:func:`expert_sizes_of`). Deterministic: the same inputs give
    the same layer and report (ties go to the lower channel index, then expert).

    Example::

        new, report = vmoe.slim.slim(moe, x_calib, 0.5, allow_null=True)
        print(report)            # per-expert widths, loads, kept score share, achieved fraction
    """
    _check_layer(moe)
    budget = _check_budget(budget)
    _check_choice("budget_kind", budget_kind, BUDGET_KINDS)
    _check_choice("allocation", allocation, ALLOCATIONS)
    _check_choice("groups", groups, GROUPS)
    align = _check_align(align)
    stats = channel_scores(moe, calibration_x, criterion, max_tokens=max_tokens, seed=seed)
    widths_before = moe.config.expert_widths
    if budget_kind == "flops":
        units = stats.counts
        if sum(n * f for n, f in zip(units, widths_before)) == 0:
            raise ValueError("no calibration token reaches an expert of width > 0, so the FLOPs "
                             "budget is undefined: pass more calibration_x or budget_kind='params'")
    else:
        units = (1,) * len(widths_before)
    widths, kept = choose_widths(stats.scores, units, budget, align=align, allow_null=allow_null,
                                 allocation=allocation)
    new = prune(moe, kept, groups)
    n = stats.counts
    flops = sum(a * w for a, w in zip(n, widths)) / max(sum(a * f for a, f in zip(n, widths_before)), 1)
    report = SlimReport(criterion=criterion, budget=budget, budget_kind=budget_kind, allocation=allocation,
                        align=align, widths_before=widths_before, widths=widths, kept=kept,
                        scores=stats.scores, counts=stats.counts, tokens=stats.tokens,
                        flops_fraction=flops, params_fraction=sum(widths) / sum(widths_before))
    return new, report


def moe_layers(model: nn.Module) -> list[tuple[str, MoEMLP]]:
    """``(name, layer)`` for every :class:`~vmoe.MoEMLP` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEMLP)]


@torch.no_grad()
def layer_inputs(model: nn.Module, batches: Iterable, run: Callable | None = None) -> dict:
    """``{name: [T, d] inputs}`` of every MoEMLP of ``model`` over ``batches``, caught by forward
    pre-hooks while ``run(model, batch)`` (default ``model(batch)``) runs each batch, no grad."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) holds no vmoe.MoEMLP")
    caught = {name: [] for name, _ in layers}

    def hook(name):
        def catch(module, args):
            caught[name].append(args[0].detach().reshape(-1, module.config.n_embd))
        return catch

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers]
    try:
        for batch in batches:
            (run or (lambda m, b: m(b)))(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not any(caught.values()):
        raise ValueError("batches is empty: no calibration token reached the model")
    return {name: torch.cat(xs) for name, xs in caught.items()}


def slim_model(model: nn.Module, batches: Iterable, budget: float, *, run: Callable | None = None,
               inputs: dict | None = None, **kwargs) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with every MoEMLP slimmed by :func:`slim` (``**kwargs`` are its keyword
    arguments), each to ``budget`` of its own cost; returns ``(new_model, {name: SlimReport})``.

    The layers' inputs come from one pass of the original model over ``batches``
    (:func:`layer_inputs`; ``run(model, batch)`` calls it, default ``model(batch)``), or from
    ``inputs`` when given (``{name: [T, d]}``, e.g. what :func:`layer_inputs` returned, so that
    several budgets share one pass). ``model`` is left unchanged.
    """
    if inputs is None:
        inputs = layer_inputs(model, batches, run)
    new = copy.deepcopy(model)
    reports = {}
    for name, layer in moe_layers(model):
        slimmed, reports[name] = slim(layer, inputs[name].to(layer.router.weight.dtype), budget, **kwargs)
        parent, _, child = name.rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, child, slimmed)
    return new, reports


def fresh_like(moe: MoEMLP) -> MoEMLP:
    """A freshly initialised layer with ``moe``'s architecture (its config and load-balance
    groups), on its device and dtype: the from-scratch twin of a slimmed layer."""
    _check_layer(moe)
    if isinstance(moe, SlimMoEMLP):
        new = SlimMoEMLP(moe.config, moe.balance_groups)
    else:
        new = MoEMLP(moe.config)
    return new.to(device=moe.w1.device, dtype=moe.w1.dtype)


def finetune(model: nn.Module, batches: Iterable, steps: int, loss_fn: Callable, *,
             lr: float | Callable[[int], float] = 1e-4, optimizer: torch.optim.Optimizer | None = None,
             grad_clip: float | None = 1.0, autocast: Callable | None = None,
             compile: bool | str = False) -> torch.Tensor:
    """Train ``model`` in place for ``steps`` steps; returns the ``[steps]`` losses, detached, on
    the loss's device (read them when convenient: the loop itself never syncs).

    Each step takes the next batch of ``batches``, computes ``loss_fn(step_model, batch)`` (a
    scalar; ``step_model`` is ``model`` or its ``torch.compile``), back-propagates it, clips the
    gradient norm to ``grad_clip`` (None: no clipping) and steps ``optimizer`` (default: AdamW
    without weight decay over the parameters that require grad). ``lr`` is a float or a function
    of the step, set on every parameter group before the step. ``autocast``: a function returning
    a context manager entered around the forward (e.g. ``lambda: torch.autocast("cuda",
    torch.bfloat16)``). ``compile``: False, True or a ``torch.compile`` mode; under
    "reduce-overhead" each step is marked as a new CUDA-graph iteration.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr if isinstance(lr, numbers.Real) else lr(0),
                                      weight_decay=0.0)
    mode = "default" if compile is True else compile or None
    step_model = torch.compile(model, mode=mode) if mode else model
    graphs = mode is not None and "reduce-overhead" in mode
    params = [p for group in optimizer.param_groups for p in group["params"]]
    was_training = model.training
    model.train()
    losses = []
    it = iter(batches)
    try:
        for step in range(steps):
            rate = lr(step) if callable(lr) else lr
            for group in optimizer.param_groups:
                group["lr"] = rate
            batch = next(it)
            if graphs:  # a new iteration: the last step's graph outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with (autocast() if autocast is not None else contextlib.nullcontext()):
                loss = loss_fn(step_model, batch)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float().clone())  # a CUDA graph reuses its output buffer
    finally:
        model.train(was_training)
    return torch.stack(losses) if losses else torch.zeros(0)
