"""Expert parallelism: each rank of a process group holds some experts of an :class:`vmoe.MoEMLP`,
and tokens travel to the rank of their expert and back with ``all_to_all_single``.

Shape letters: see :mod:`vmoe.config`; also W ranks (world size), L experts on this rank, A = T*k
assignments of this rank's tokens, R rows received by this rank.

- :func:`place_experts`: which experts each rank holds, balanced by width (or by n_e * f_e).
- :class:`ExpertParallelMoEMLP`: one rank's shard of a full layer (:meth:`from_moe`), whose
  ``forward`` returns what the full layer returns for this rank's tokens; its state-dict helpers
  save the shards back as the full layer's state dict, and load one into a shard.

One forward, on every rank (all ranks must call it, with the same config, even with 0 tokens):

  1. Route the local tokens with the replicated router, through the functions MoEMLP uses (the
     fused router, or the torch path for ``impl="reference"``), so the ids, the weights, the aux
     losses and f_i are exactly those of ``moe(x_local)``.
  2. Sort the A assignments by destination (the owner rank of their expert, then that rank's
     local order); all-gather the [E] counts of every rank: ``[W, E]``. Its ``.tolist()`` is the
     one host synchronization of the layer: all_to_all_single takes its split sizes on the host.
  3. Exchange ``[A, d+1]`` rows (x[t] and the routing weight of the assignment) with
     all_to_all_single (:class:`AllToAll`, whose backward is the reverse exchange).
  4. Run the local experts on the R received rows through :func:`vmoe.expert_mlp` (k = 1, the
     received weight as topk_weights), so the down projection comes out weighted.
  5. Send the ``[R, d]`` results back (the reverse exchange) and sum them per token
     (``index_add``).

An assignment travels as its own row even when a token's k experts share a rank: simple, and the
exchanges cost k*d per token either way in the worst case. An assignment to a null expert (width
0) does not travel: it would come back as a row of zeros.

Gradients follow from autograd through the two exchanges: w1/w2 get the gradients of every rank's
tokens routed to the local experts, x_local the full layer's gradient, and the router the local
tokens' contribution (summed over ranks, as DDP does for replicated parameters, it is the full
layer's). Autograd must reach both exchanges on every rank: every rank runs backward, and the
router (or x) requires grad on every rank or on none.
"""
from __future__ import annotations

import contextlib
import zlib
from dataclasses import astuple

import torch
import torch.distributed as dist
import torch.nn as nn

from vmoe.autograd import expert_mlp
from vmoe.config import MoEConfig, column_offsets, gate_factor
from vmoe.layer import MoEMLP, add_router_state


def place_experts(expert_widths, world_size: int, token_counts=None) -> list[list[int]]:
    """Assign every expert to exactly one of ``world_size`` ranks, balancing the total cost per rank.

    The cost of expert e is its width f_e, or ``token_counts[e] * f_e`` (its FLOPs) when
    ``token_counts`` is given. Greedy longest-processing-time: experts by cost descending (ties to
    the lower id), each to the rank with the lowest total so far (ties to the lower rank). So the
    largest total is at most ``sum / world_size + max cost``. Experts of zero cost (zero width, or
    no tokens) come last, each to the rank holding the fewest experts (then the lightest), so that
    every rank gets an expert of nonzero width.

    Args:
        expert_widths: f_e, ints >= 0 (a sequence or a 1-D integer tensor).
        world_size: the number of ranks, 1 <= world_size <= the number of experts of nonzero width.
        token_counts: optional n_e per expert, ints >= 0, one per expert.

    Returns:
        ``world_size`` lists of global expert ids, each ascending.

    Example:
        >>> place_experts([7, 33, 1, 20, 16], 2)
        [[0, 1], [2, 3, 4]]
    """
    widths = _int_list(expert_widths, "expert_widths")
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"world_size must be an int, got {world_size!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    nonzero = sum(1 for w in widths if w > 0)
    if world_size > nonzero:
        raise ValueError(f"world_size={world_size} is larger than the number of experts of nonzero "
                         f"width ({nonzero} in {widths}): every rank needs an expert")
    costs = widths
    if token_counts is not None:
        counts = _int_list(token_counts, "token_counts")
        if len(counts) != len(widths):
            raise ValueError(f"token_counts must have one entry per expert ({len(widths)}), "
                             f"got {len(counts)}")
        costs = [n * w for n, w in zip(counts, widths)]
    loads = [0] * world_size
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    order = sorted(range(len(widths)), key=lambda e: (-costs[e], -widths[e], e))
    for e in order:
        if costs[e] > 0:
            r = min(range(world_size), key=lambda i: (loads[i], i))
        else:
            r = min(range(world_size), key=lambda i: (len(ranks[i]), loads[i], i))
        loads[r] += costs[e]
        ranks[r].append(e)
    return [sorted(r) for r in ranks]


def _check_placement(placement, widths, world: int) -> list[list[int]]:
    """``placement`` as lists of ints, checked: ``world`` ranks, every expert of ``widths`` on
    exactly one, and an expert of nonzero width on every rank (as :func:`place_experts` ensures)."""
    out = [list(r) for r in placement]
    if len(out) != world:
        raise ValueError(f"placement must have one list of experts per rank ({world}), got {len(out)}")
    flat = sorted(e for r in out for e in r)
    if flat != list(range(len(widths))):
        raise ValueError(f"placement must hold every expert 0..{len(widths) - 1} exactly once, got {out}")
    if any(not any(widths[e] > 0 for e in r) for r in out):
        raise ValueError(f"every rank needs an expert of nonzero width, got {out} for widths {widths}")
    return out


def _int_list(values, name: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.is_floating_point() or values.is_complex():
            raise TypeError(f"{name} must be a 1-D integer tensor, got dim={values.dim()} "
                            f"dtype={values.dtype}")
        values = values.tolist()  # host-ok: placement is a host decision, made once
    try:
        out = list(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}") from None
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must hold ints, got {v!r} ({type(v).__name__})")
        if v < 0:
            raise ValueError(f"{name} must all be >= 0, got {v} in {out}")
    if not out:
        raise ValueError(f"{name} must name at least one expert, got an empty sequence")
    return out


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of the rows of x, differentiable: the backward is the reverse exchange.

    ``send_splits[r]`` rows of x go to rank r; ``recv_splits[r]`` rows come from rank r.
    ``hook``, when not None, is called with no argument around each exchange, forward and
    backward, and returns the context manager the exchange runs in (the parallel benchmark's
    timer: :attr:`ExpertParallelMoEMLP.exchange_hook`).
    """

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, hook=None):
        ctx.splits, ctx.group, ctx.hook = (send_splits, recv_splits), group, hook
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        with hook() if hook is not None else contextlib.nullcontext():
            dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, dy):
        send_splits, recv_splits = ctx.splits
        dx = dy.new_empty((sum(send_splits),) + tuple(dy.shape[1:]))
        with ctx.hook() if ctx.hook is not None else contextlib.nullcontext():
            dist.all_to_all_single(dx, dy.contiguous(), send_splits, recv_splits, group=ctx.group)
        return dx, None, None, None, None


def config_digest(config: MoEConfig) -> int:
    """A hash of the config that is the same in every process (``hash()`` of a str is not)."""
    return zlib.crc32(repr(astuple(config)).encode())


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ExpertParallelMoEMLP needs torch.distributed initialised "
                           "(dist.init_process_group) before it is built")
    return dist.get_rank(group), dist.get_world_size(group)


def _check_same_config(config: MoEConfig, group) -> None:
    """All-gather the config digest and raise on every rank when one differs (never hangs: every
    rank takes part in the one collective, then all raise together)."""
    world = dist.get_world_size(group)
    device = _collective_device(group)
    mine = torch.tensor([config_digest(config)], dtype=torch.int64, device=device)
    all_digests = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(all_digests, mine, group=group)
    digests = [int(t.item()) for t in all_digests]  # host-ok: once, when the shard is built
    if len(set(digests)) != 1:
        bad = [r for r, h in enumerate(digests) if h != digests[0]]
        raise ValueError(f"the MoEConfig differs across ranks (ranks {bad} differ from rank 0; "
                         f"digests {digests}); this rank's config is {config}")


def _collective_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class ExpertParallelMoEMLP(nn.Module):
    """This rank's shard of an :class:`vmoe.MoEMLP`; build it with :meth:`from_moe`.

    Attributes:
        config: the full layer's :class:`vmoe.MoEConfig`.
        placement: every rank's global expert ids, ``place_experts(widths, W)`` unless another
            placement was given (the same one on every rank: it orders the exchanges).
        local_experts: this rank's global expert ids: ``placement[rank]``.
        local_widths: their widths.
        router: ``nn.Linear(d, E, bias=False)``, replicated (a copy of the full layer's).
        w1: ``[d, g * sum(local_widths)]``: the full w1's column block of each local expert
            (``g*f_e`` columns; for swiglu gate then up, as in MoEMLP), in ``local_experts`` order.
        w2: ``[sum(local_widths), d]``: their rows of the full w2, in the same order.
        exchange_hook: None, or a callable that returns a context manager; each of the layer's
            ``all_to_all_single`` exchanges (two forward, two backward) runs inside one. For
            instruments: ``python -m vmoe.bench.parallel`` times the exchanges with it.

    ``forward(x_local)`` takes ``[..., d]`` (the token count may differ between ranks, and be 0)
    and returns ``(out, aux_loss, f_i)`` as ``moe(x_local)`` would on the full layer: ``out`` has
    x_local's shape; ``aux_loss`` and ``f_i`` are computed from this rank's tokens only (the
    losses of :class:`vmoe.MoEMLP` over the local batch; average them over ranks, or weight by
    token count, as the training loop sees fit). Every rank of the group must call it.
    """

    # The torch path's losses (impl="reference") read only the config.
    aux_losses = MoEMLP.aux_losses
    # MoEMLP's router, on the local tokens, with this shard's w1 and w2 cast for its experts.
    route = MoEMLP.route

    def __init__(self, config: MoEConfig, local_experts, group=None, placement=None):
        super().__init__()
        if config.shared_expert_width:
            raise NotImplementedError(
                f"ExpertParallelMoEMLP does not shard a layer with a shared expert yet "
                f"(shared_expert_width={config.shared_expert_width}); null experts are supported")
        rank, world = _world(group)
        widths = config.expert_widths
        g = gate_factor(config.activation)
        d, E = config.n_embd, config.num_experts
        self.config, self.group, self.rank, self.world_size = config, group, rank, world
        self.local_experts = list(local_experts)
        placement = (place_experts(widths, world) if placement is None
                     else _check_placement(placement, widths, world))
        if self.local_experts != placement[rank]:
            raise ValueError(f"local_experts {self.local_experts} are not rank {rank}'s experts "
                             f"{placement[rank]} in the placement {placement}")
        self.local_widths = tuple(widths[e] for e in self.local_experts)
        self.exchange_hook = None
        self.router = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(d, g * sum(self.local_widths)))
        self.w2 = nn.Parameter(torch.empty(sum(self.local_widths), d))
        position = [0] * E
        # Sort key of an assignment: its owner rank, then the expert's local index there. A null
        # expert's assignments stay home (their rows would come back as zeros): they sort last
        # and are not sent.
        for i, e in enumerate(e for experts in placement for e in experts):
            position[e] = i if widths[e] else E
        self.register_buffer("expert_live", torch.tensor([f > 0 for f in widths]),
                             persistent=False)
        self.placement = placement
        self.register_buffer("expert_position", torch.tensor(position), persistent=False)
        self.register_buffer("local_ids", torch.tensor(self.local_experts, dtype=torch.long),
                             persistent=False)
        add_router_state(self, config)

    @classmethod
    def from_moe(cls, moe: MoEMLP, group=None, placement=None) -> "ExpertParallelMoEMLP":
        """This rank's shard of ``moe`` in ``group`` (the default process group when None).

        ``placement``: which experts each rank holds, ``world_size`` lists of global expert ids
        (every expert exactly once; the same on every rank); ``place_experts(widths, W)`` when
        None. Collective: every rank calls it. Raises ValueError on every rank when the configs
        differ across ranks, or when there are more ranks than experts.
        """
        _world(group)
        _check_same_config(moe.config, group)
        if placement is None:
            placement = place_experts(moe.config.expert_widths, dist.get_world_size(group))
        placement = _check_placement(placement, moe.config.expert_widths, dist.get_world_size(group))
        shard = cls(moe.config, placement[dist.get_rank(group)], group, placement)
        shard.to(device=moe.w1.device, dtype=moe.w1.dtype)
        shard.load_full_state_dict(moe.state_dict())
        return shard

    def _column_blocks(self):
        """``(global column offset, local column offset, columns)`` of each local expert's w1
        block; rows of w2 are the same divided by g."""
        widths, g = self.config.expert_widths, gate_factor(self.config.activation)
        offsets = column_offsets(widths)
        local = 0
        for e in self.local_experts:
            yield e, g * offsets[e], g * local, g * widths[e]
            local += widths[e]

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict) -> None:
        """Copy the full layer's state dict (``router.weight``, ``w1``, ``w2``) into this shard:
        the router whole, and the local experts' columns of w1 and rows of w2."""
        g = gate_factor(self.config.activation)
        self.router.weight.copy_(state_dict["router.weight"])
        w1, w2 = state_dict["w1"], state_dict["w2"]
        full = (self.w1.shape[0], g * self.config.total_width)
        if tuple(w1.shape) != full or tuple(w2.shape) != (full[1] // g, full[0]):
            raise ValueError(f"state dict has w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)}; the "
                             f"config wants w1 {full} and w2 {(full[1] // g, full[0])}")
        for _, src, dst, n in self._column_blocks():
            self.w1[:, dst:dst + n].copy_(w1[:, src:src + n])
            self.w2[dst // g:(dst + n) // g].copy_(w2[src // g:(src + n) // g])

    @torch.no_grad()
    def full_state_dict(self, dst: int | None = 0) -> dict | None:
        """The full layer's state dict, gathered from every rank's shard (collective).

        Returns it on rank ``dst`` (on every rank when ``dst`` is None) and None elsewhere. The
        router is this rank's copy (replicated). Shards are padded to the largest one for the
        all_gather, whose sizes every rank knows from the placement: no size exchange.
        """
        g, d = gate_factor(self.config.activation), self.config.n_embd
        device = _collective_device(self.group)
        sizes = [sum(self.config.expert_widths[e] for e in experts) * d for experts in self.placement]
        n_max = max(sizes)
        mine = torch.zeros(2, g * n_max, dtype=self.w1.dtype, device=device)
        mine[0, :g * sizes[self.rank]] = self.w1.detach().t().reshape(-1).to(device)
        mine[1, :sizes[self.rank]] = self.w2.detach().reshape(-1).to(device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        if dst is not None and dst != self.rank:
            return None
        F = self.config.total_width
        w1 = torch.empty(d, g * F, dtype=self.w1.dtype, device=self.w1.device)
        w2 = torch.empty(F, d, dtype=self.w2.dtype, device=self.w2.device)
        widths = self.config.expert_widths
        offsets = column_offsets(widths)
        for r, experts in enumerate(self.placement):
            cols = gathered[r][0, :g * sizes[r]].reshape(-1, d).to(w1.device)   # [g*F_r, d]
            rows = gathered[r][1, :sizes[r]].reshape(-1, d).to(w2.device)       # [F_r, d]
            local = 0
            for e in experts:
                f = widths[e]
                w1[:, g * offsets[e]:g * (offsets[e] + f)] = cols[g * local:g * (local + f)].t()
                w2[offsets[e]:offsets[e] + f] = rows[local:local + f]
                local += f
        return {"router.weight": self.router.weight.detach().clone(), "w1": w1, "w2": w2}

    def forward(self, x_local: torch.Tensor):
        cfg = self.config
        d, E, k, W = cfg.n_embd, cfg.num_experts, cfg.num_active_experts, self.world_size
        if x_local.dim() < 1 or x_local.shape[-1] != d:
            raise ValueError(f"x must be [..., n_embd] with n_embd={d}, got shape "
                             f"{tuple(x_local.shape)}")
        shape = x_local.shape
        routed = self.route(x_local.reshape(-1, d))
        x2, w1, w2, counts = routed.x2, routed.w1, routed.w2, routed.counts
        topk_ids, topk_weights, aux, f_i = routed.topk_ids, routed.topk_weights, routed.aux, routed.f_i
        T, device = x2.shape[0], x2.device

        # Destination order: owner rank, then local expert index there (stable: token order).
        ids = topk_ids.reshape(-1).long()                                   # [A]
        send_order = torch.argsort(self.expert_position[ids], stable=True)  # [A] -> assignment
        send_tokens = torch.div(send_order, k, rounding_mode="floor")       # [A] -> token

        comm = _collective_device(self.group)
        mine = (counts * self.expert_live).to(device=comm, dtype=torch.int64)   # nulls: 0
        all_counts = torch.empty(W, E, dtype=torch.int64, device=comm)
        dist.all_gather(list(all_counts.unbind(0)), mine, group=self.group)
        # The layer's one host sync: all_to_all_single takes its split sizes on the host.
        table = all_counts.tolist()  # host-ok: the split sizes of the two exchanges
        send_splits = [sum(table[self.rank][e] for e in experts) for experts in self.placement]
        recv_splits = [sum(row[e] for e in self.local_experts) for row in table]
        n_send = sum(send_splits)                 # A minus the null experts' assignments
        send_order, send_tokens = send_order[:n_send], send_tokens[:n_send]

        payload = torch.cat([x2[send_tokens],
                             topk_weights.reshape(-1)[send_order].to(x2.dtype)[:, None]], dim=1)
        received = AllToAll.apply(payload, send_splits, recv_splits, self.group,
                                  self.exchange_hook)                     # [R, d+1]
        x_recv, w_recv = received[:, :d], received[:, d:]
        # Rows from each source arrive in local expert order: their local ids follow the table.
        L = len(self.local_experts)
        reps = all_counts.to(device)[:, self.local_ids.to(device)].reshape(-1)   # [W*L]
        local_ids = torch.repeat_interleave(torch.arange(L, device=device).repeat(W), reps,
                                            output_size=sum(recv_splits))[:, None]  # [R, 1]
        y_recv = expert_mlp(x_recv, local_ids, w_recv, w1, w2, self.local_widths, cfg.activation,
                            impl=cfg.impl)                                    # [R, d], weighted
        y_back = AllToAll.apply(y_recv, recv_splits, send_splits, self.group,
                                self.exchange_hook)                       # [A, d]
        out = torch.zeros(T, d, dtype=y_back.dtype, device=device).index_add(0, send_tokens, y_back)
        return out.reshape(shape), aux, f_i
