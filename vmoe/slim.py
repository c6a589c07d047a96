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

:func:`slim_model` slims every :class:`~vmoe.MoEMLP` of a model from one calibration pass,
:func:`slim_hf` every experts module of a transformers MoE model (into its variable-width twin,
:func:`vmoe.hf.to_variable_width`), and :func:`finetune` is a short, generic training loop for
afterwards. The two model-wide ones take ``budget_scope`` (:data:`BUDGET_SCOPES`): one budget per
layer, or one for all the layers' experts together.
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
# Which experts share a budget, when a model has several MoE layers. "layer": each layer keeps
# ``budget`` of its own cost, so every layer shrinks by the same fraction and none can be emptied.
# "model": every layer's experts compete for one budget of the whole model's expert cost, so
# width moves to the layers whose channels score more per unit of cost. Scores of different
# layers are norms of what channels add to a residual stream whose scale changes with depth, so
# comparing them is a heuristic that "layer" avoids; it is the default.
BUDGET_SCOPES = ("layer", "model")
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


def _check_max_tokens(max_tokens) -> None:
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise ValueError(f"max_tokens must be an int >= 1 or None, got {max_tokens!r}")


def _sampled_rows(n: int, max_tokens, seed) -> torch.Tensor | None:
    """Which of ``n`` calibration tokens to score: None (all of them) if ``max_tokens`` is None or
    at least ``n``, else ``max_tokens`` ascending row indices, drawn without replacement by a
    generator seeded with ``seed`` (the global RNG is not touched)."""
    _check_max_tokens(max_tokens)
    if max_tokens is None or n <= max_tokens:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_tokens].sort().values


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
    pick = _sampled_rows(x.shape[0], max_tokens, seed)
    if pick is not None:
        x = x[pick.to(x.device)]
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
    widths, offsets = cfg.expert_widths, column_offsets(cfg.expert_widths)
    g = gate_factor(cfg.activation)
    w1, w2 = moe.w1.detach(), moe.w2.detach()

    def expert_w1(e):                                                       # [d, g*f_e]
        return w1[:, g * offsets[e]: g * (offsets[e] + widths[e])]

    def expert_w2(e):                                                       # [f_e, d]
        return w2[offsets[e]: offsets[e] + widths[e]]

    routed = moe.route(x)
    ids = routed.topk_ids.long()
    counts = torch.bincount(ids.reshape(-1), minlength=cfg.num_experts)
    counts = tuple(int(n) for n in counts.tolist())  # host-ok: offline, once per call
    sums = (None if criterion == "weight" else
            _activation_sums(x, ids, routed.topk_weights, expert_w1, widths, cfg.activation))
    return _finish_scores(criterion, sums, counts, x.shape[0], expert_w1, expert_w2, widths,
                          cfg.activation)


def _activation_sums(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     expert_w1: Callable[[int], torch.Tensor], widths: Sequence[int],
                     activation: str) -> list[torch.Tensor]:
    """Per expert e, ``sum over the assignments (t, slot) to e of topk_weights[t, slot] *
    |act(x_t W1_e)|``: ``[f_e]`` float64 on x's device, computed in float64. ``x [T, d]``,
    ``topk_ids``/``topk_weights [T, k]`` (ids outside ``[0, E)`` count for no expert),
    ``expert_w1(e)`` expert e's ``[d, g*f_e]`` columns (gate, then up). Sums over disjoint token
    sets add up, so a calibration pass may hand its tokens over in any number of calls."""
    x64, weights = x.double(), topk_weights.double()
    sums = []
    for e in range(len(widths)):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        h = reference.act(x64[tok] @ expert_w1(e).double(), activation)      # [n_e, f_e]
        sums.append(weights[tok, slot] @ h.abs())                             # [f_e]
    return sums


def _finish_scores(criterion: str, sums, counts: Sequence[int], tokens: int,
                   expert_w1: Callable[[int], torch.Tensor], expert_w2: Callable[[int], torch.Tensor],
                   widths: Sequence[int], activation: str) -> ChannelScores:
    """The :class:`ChannelScores` of one layer under ``criterion`` from its
    :func:`_activation_sums` over ``tokens`` calibration tokens (None for ``"weight"``, which
    needs no data), n_e (``counts``) and its experts' weights (``expert_w2(e)``: ``[f_e, d]``)."""
    g = gate_factor(activation)
    scores = []
    for e, f in enumerate(widths):
        w2_e = expert_w2(e).double()
        if criterion == "weight":
            col_norms = expert_w1(e).double().norm(dim=0).reshape(g, f)      # gate (, up) per channel
            s = col_norms.prod(0) * w2_e.norm(dim=1)
        else:
            s = sums[e] / tokens
            if criterion == "act_w2":
                s = s * w2_e.norm(dim=1)
        scores.append(s.cpu())  # host-ok: offline, the scores are returned on the host
    if not all(bool(torch.isfinite(s).all()) for s in scores):  # host-ok: offline check
        raise ValueError("the channel scores are not finite: the layer's weights hold NaN or Inf")
    return ChannelScores(criterion, tuple(scores), tuple(counts), tokens)


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


def check_kept(kept: Sequence, widths: Sequence[int]) -> list[torch.Tensor]:
    """``kept`` (per expert, the indices of the channels it keeps) as int64 tensors on the host,
    checked against the experts' widths: one entry per expert, each ascending distinct indices in
    ``[0, f_e)``, and some expert keeping a channel. :func:`prune` and
    :func:`vmoe.hf.to_variable_width` read their ``kept`` through it."""
    if len(kept) != len(widths):
        raise ValueError(f"kept must hold one index tensor per expert ({len(widths)}), got {len(kept)}")
    out = []
    for e, (idx, f) in enumerate(zip(kept, widths)):
        idx = torch.as_tensor(idx).long().cpu()  # host-ok: slimming is offline; indices go to the host
        if idx.dim() != 1 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= f)) or (  # host-ok
                idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):  # host-ok: host indices
            raise ValueError(f"kept[{e}] must be ascending distinct channel indices in [0, {f}), "
                             f"got {idx.tolist()}")  # host-ok: an error message
        out.append(idx)
    if not any(idx.numel() for idx in out):
        raise ValueError("kept keeps no channel of any expert: at least one expert needs a width >= 1")
    return out


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
    kept = check_kept(kept, widths_before)
    g, offsets = gate_factor(cfg.activation), column_offsets(widths_before)
    dev = moe.w1.device
    cols, rows = [], []
    for e, idx in enumerate(kept):
        o, f = offsets[e], widths_before[e]
        rows.append(o + idx)
        cols += [g * o + half * f + idx for half in range(g)]  # gate then up, as reference.act reads
    F, S = cfg.total_width, cfg.shared_expert_width
    rows.append(torch.arange(F, F + S))
    cols.append(torch.arange(g * F, g * (F + S)))
    new_cfg = dataclasses.replace(cfg, expert_sizes=expert_sizes_of([idx.numel() for idx in kept]))
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


def _check_options(budget, budget_kind, allocation, align, budget_scope="layer", groups="original"):
    """The checked ``(budget, align)``, after the choices of :func:`slim`, :func:`slim_model` and
    :func:`slim_hf` are checked too: before any calibration pass, so a bad argument fails fast."""
    budget = _check_budget(budget)
    _check_choice("budget_kind", budget_kind, BUDGET_KINDS)
    _check_choice("allocation", allocation, ALLOCATIONS)
    _check_choice("budget_scope", budget_scope, BUDGET_SCOPES)
    _check_choice("groups", groups, GROUPS)
    return budget, _check_align(align)


def _choose(stats: dict, channel_costs: dict, budget: float, *, budget_scope: str, budget_kind: str,
            allocation: str, align: int, allow_null: bool) -> dict:
    """``{name: SlimReport}`` for the layers whose :class:`ChannelScores` ``stats`` holds, each
    layer under its own budget (``budget_scope="layer"``) or all of them under one ("model").

    ``channel_costs[name]`` is what one channel of that layer costs relative to the others (its
    ``(g+1)*d``: the parameters it owns, and its FLOPs per assignment / 2), so that layers of
    different shapes compete by what they cost; a layer's unit (:func:`choose_widths`) is its
    n_e (FLOPs) or 1 (parameters) times that cost.
    """
    scopes = [[name] for name in stats] if budget_scope == "layer" else [list(stats)]
    reports = {}
    for names in scopes:
        scores, units = [], []
        for name in names:
            st = stats[name]
            per_channel = st.counts if budget_kind == "flops" else (1,) * len(st.scores)
            scores += st.scores
            units += [u * channel_costs[name] for u in per_channel]
        if budget_kind == "flops" and sum(u * s.numel() for u, s in zip(units, scores)) == 0:
            raise ValueError("no calibration token reaches an expert of width > 0, so the FLOPs "
                             "budget is undefined: pass more calibration tokens or budget_kind='params'")
        widths, kept = choose_widths(scores, units, budget, align=align, allow_null=allow_null,
                                     allocation=allocation)
        start = 0
        for name in names:
            st = stats[name]
            stop = start + len(st.scores)
            if not any(widths[start:stop]):
                hint = " or budget_scope='layer' (one budget per layer)" if len(names) > 1 else ""
                raise ValueError(f"budget={budget:g} keeps no channel of {name or 'the layer'}: pass a "
                                 f"larger budget{hint}")
            reports[name] = _report(st, budget, budget_kind, allocation, align,
                                    widths[start:stop], kept[start:stop])
            start = stop
    return reports


def _report(stats: ChannelScores, budget: float, budget_kind: str, allocation: str, align: int,
            widths: tuple, kept: tuple) -> SlimReport:
    """The :class:`SlimReport` of one layer: what it keeps of its own FLOPs and parameters."""
    before = tuple(s.numel() for s in stats.scores)
    n = stats.counts
    flops = sum(a * w for a, w in zip(n, widths)) / max(sum(a * f for a, f in zip(n, before)), 1)
    return SlimReport(criterion=stats.criterion, budget=budget, budget_kind=budget_kind,
                      allocation=allocation, align=align, widths_before=before, widths=widths,
                      kept=kept, scores=stats.scores, counts=stats.counts, tokens=stats.tokens,
                      flops_fraction=flops, params_fraction=sum(widths) / sum(before))


def _channel_cost(activation: str, d: int) -> int:
    """What one channel of an expert costs, relative to the other layers' channels: its (g+1)*d
    weights, and half its forward FLOPs per assignment."""
    return (gate_factor(activation) + 1) * d


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
    budget, align = _check_options(budget, budget_kind, allocation, align, groups=groups)
    stats = channel_scores(moe, calibration_x, criterion, max_tokens=max_tokens, seed=seed)
    report = _choose({"": stats}, {"": 1}, budget, budget_scope="layer", budget_kind=budget_kind,
                     allocation=allocation, align=align, allow_null=allow_null)[""]
    return prune(moe, report.kept, groups), report


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
               inputs: dict | None = None, criterion: str = "act_w2", budget_kind: str = "flops",
               budget_scope: str = "layer", allocation: str = "global", align: int = 8,
               allow_null: bool = False, groups: str = "original", max_tokens: int | None = None,
               seed: int = 0) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with every MoEMLP slimmed as :func:`slim` slims one (the keyword
    arguments are its own), to ``budget`` of each layer's cost or, with ``budget_scope="model"``,
    of all the layers' cost together (:data:`BUDGET_SCOPES`); returns ``(new_model, {name:
    SlimReport})``, each report with its layer's own achieved fractions.

    The layers' inputs come from one pass of the original model over ``batches``
    (:func:`layer_inputs`; ``run(model, batch)`` calls it, default ``model(batch)``), or from
    ``inputs`` when given (``{name: [T, d]}``, e.g. what :func:`layer_inputs` returned, so that
    several budgets share one pass). ``model`` is left unchanged.
    """
    budget, align = _check_options(budget, budget_kind, allocation, align, budget_scope, groups)
    _check_choice("criterion", criterion, CRITERIA)
    if inputs is None:
        inputs = layer_inputs(model, batches, run)
    layers = moe_layers(model)
    stats = {name: channel_scores(layer, inputs[name].to(layer.router.weight.dtype), criterion,
                                  max_tokens=max_tokens, seed=seed) for name, layer in layers}
    costs = {name: _channel_cost(layer.config.activation, layer.config.n_embd) for name, layer in layers}
    reports = _choose(stats, costs, budget, budget_scope=budget_scope, budget_kind=budget_kind,
                      allocation=allocation, align=align, allow_null=allow_null)
    new = copy.deepcopy(model)
    for name, layer in layers:
        parent, _, child = name.rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, child,
                prune(layer, reports[name].kept, groups))
    return new, reports


def _check_input_ids(model: nn.Module, calibration_input_ids) -> torch.Tensor:
    """``calibration_input_ids`` checked (``[B, S]`` integer token ids within the model's
    vocabulary, at least one) and on the model's device."""
    if not isinstance(calibration_input_ids, torch.Tensor):
        raise TypeError(f"calibration_input_ids must be a torch.Tensor of token ids [B, S], "
                        f"got {type(calibration_input_ids).__name__}")
    ids = calibration_input_ids
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"calibration_input_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"calibration_input_ids must be [B, S] token ids (equal-length windows), "
                         f"got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("calibration_input_ids is empty: slimming needs at least one calibration token")
    vocab = model.get_input_embeddings().num_embeddings
    lo, hi = int(ids.min()), int(ids.max())  # host-ok: slimming is offline, one check per call
    if lo < 0 or hi >= vocab:
        raise ValueError(f"calibration_input_ids must be token ids in [0, {vocab}) (the model's "
                         f"vocabulary), got ids from {lo} to {hi}")
    return ids.to(next(model.parameters()).device)


# How transformers calls an experts module: forward(hidden_states [T, d], top_k_index [T, k],
# top_k_weights [T, k]), after its router.
_EXPERTS_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


class _ExpertsTally:
    """What one transformers experts module receives in :func:`slim_hf`'s calibration pass, added
    up call by call: n_e, the tokens and the :func:`_activation_sums`."""

    def __init__(self, layout, module: nn.Module, criterion: str):
        self.w1, self.w2 = (w.detach() for w in layout.weights(module))    # [E, d, g*I], [E, I, d]
        self.activation, self.criterion = layout.activation, criterion
        E = self.w1.shape[0]
        self.widths = (self.w2.shape[1],) * E
        self.counts = torch.zeros(E, dtype=torch.long, device=self.w1.device)
        self.tokens, self.sums = 0, None

    def expert_w1(self, e: int) -> torch.Tensor:                             # [d, g*I]
        return self.w1[e]

    def expert_w2(self, e: int) -> torch.Tensor:                             # [I, d]
        return self.w2[e]

    @property
    def channel_cost(self) -> int:
        return _channel_cost(self.activation, self.w1.shape[1])

    def add(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        E = len(self.widths)
        topk_ids = topk_ids.long()
        live = topk_ids[(topk_ids >= 0) & (topk_ids < E)]  # the expert-parallel sentinel E counts for none
        self.counts += torch.bincount(live, minlength=E)
        self.tokens += x.shape[0]
        if self.criterion != "weight":
            sums = _activation_sums(x, topk_ids, topk_weights, self.expert_w1, self.widths,
                                    self.activation)
            self.sums = sums if self.sums is None else [a + b for a, b in zip(self.sums, sums)]

    def scores(self, path: str) -> ChannelScores:
        if self.tokens == 0:
            raise ValueError(f"{path} received no token in the calibration pass: slim_hf needs every "
                             "experts module to run in the model's forward")
        counts = tuple(int(n) for n in self.counts.tolist())  # host-ok: offline, once per layer
        return _finish_scores(self.criterion, self.sums, counts, self.tokens, self.expert_w1,
                              self.expert_w2, self.widths, self.activation)


@torch.no_grad()
def slim_hf(model, calibration_input_ids: torch.Tensor, budget: float, *, criterion: str = "act_w2",
            budget_kind: str = "flops", budget_scope: str = "layer", allocation: str = "global",
            align: int = 8, allow_null: bool = False, max_tokens: int | None = None,
            seed: int = 0) -> tuple[nn.Module, dict]:
    """Slim a transformers MoE causal LM (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral, ...; experts of
    one width) into its variable-width twin; returns ``(new_model, {experts path: SlimReport})``.

    One forward pass of ``model`` (in eval mode, no grad) over ``calibration_input_ids`` (``[B,
    S]`` token ids: equal-length windows of text, as calibration sets are cut) scores every
    channel of every experts module, hooked where the model's own router hands them their tokens,
    top-k ids and routing weights: so routing is exactly the model's, whatever its router. The
    statistics are accumulated in the hooks (as :func:`channel_scores` computes them), so the
    layers' inputs are never stored. Then the widths are chosen as :func:`slim_model` chooses
    them (the keyword arguments are its own; ``budget_scope`` says whether each layer keeps
    ``budget`` of its own cost or all layers share one budget, :data:`BUDGET_SCOPES`), and
    :func:`vmoe.hf.to_variable_width` builds the new model from the kept channels: experts of
    different widths (:class:`vmoe.hf.VariableWidthExperts`, vmoe's kernels), a null expert for
    each width 0, every other weight (routers included, so every expert keeps its router logit)
    copied. It saves and loads with ``save_pretrained`` / ``from_pretrained`` after ``import
    vmoe.hf``. ``max_tokens`` scores a sample of the calibration tokens (the same positions in
    every layer) drawn with ``seed``; nothing else draws randomness, so the result is
    deterministic. Load-balance groups are transformers' own (its router loss spans all
    experts), so there is no ``groups``. ``model`` is left unchanged.

    Example::

        import vmoe.hf
        from vmoe.slim import slim_hf
        new, reports = slim_hf(model, calib_ids, 0.5, allow_null=True)
        new.save_pretrained(path)          # AutoModelForCausalLM.from_pretrained(path) loads it
    """
    from vmoe import hf  # transformers is an optional dependency

    budget, align = _check_options(budget, budget_kind, allocation, align, budget_scope)
    _check_choice("criterion", criterion, CRITERIA)
    _check_max_tokens(max_tokens)
    if not isinstance(model, nn.Module) or not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    found = hf.experts_modules(model)
    if not found:
        raise ValueError(f"model ({type(model).__name__}) holds no transformers experts module "
                         "(@use_experts_implementation) of experts of one width")
    ids = _check_input_ids(model, calibration_input_ids)
    rows = _sampled_rows(ids.numel(), max_tokens, seed)
    rows = None if rows is None else rows.to(ids.device)
    tallies = {path: _ExpertsTally(hf.experts_layout(module, where=f"{type(model).__name__}.{path}"),
                                   module, criterion) for path, module in found}

    def catch(path):
        def hook(module, args, kwargs):
            call = dict(zip(_EXPERTS_ARGS, args), **kwargs)
            x, topk_ids, topk_weights = (call[name] for name in _EXPERTS_ARGS)
            if x.shape[0] != ids.numel():
                raise ValueError(f"{path} received {x.shape[0]} tokens for {ids.numel()} calibration "
                                 "tokens: slim_hf needs experts that see every token once per pass")
            if rows is not None:
                x, topk_ids, topk_weights = x[rows], topk_ids[rows], topk_weights[rows]
            tallies[path].add(x, topk_ids, topk_weights)
        return hook

    handles = [module.register_forward_pre_hook(catch(path), with_kwargs=True) for path, module in found]
    was_training = model.training
    model.eval()  # dropout off: the pass measures the model as it will run
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats = {path: tally.scores(path) for path, tally in tallies.items()}
    costs = {path: tally.channel_cost for path, tally in tallies.items()}
    reports = _choose(stats, costs, budget, budget_scope=budget_scope, budget_kind=budget_kind,
                      allocation=allocation, align=align, allow_null=allow_null)
    new = hf.to_variable_width(model, kept={path: r.kept for path, r in reports.items()})
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
