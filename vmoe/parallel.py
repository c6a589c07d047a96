"""Expert parallelism: each rank of a process group holds some experts of an :class:`vmoe.MoEMLP`,
and tokens travel to the ranks of their experts and back with ``all_to_all_single``.

Shape letters: see :mod:`vmoe.config`; also W ranks (world size), L experts on this rank, n chunks,
K slots per exchanged row, C capacity (rows per pair of ranks and chunk). The buffers and their
kernels: :mod:`vmoe.ops.exchange`; a worked example: notebooks/09_parallel.ipynb.

- :func:`place_experts`: which experts each rank holds, balanced by width (or by n_e * f_e).
- :class:`ExpertParallelMoEMLP`: one rank's shard of a full layer (:meth:`~ExpertParallelMoEMLP.from_moe`),
  whose ``forward`` returns what the full layer returns for this rank's tokens; its state-dict
  helpers save the shards back as the full layer's state dict, and load one into a shard.

One forward, on every rank (all ranks must call it, with the same config, even with 0 tokens):

  1. **Route** the local tokens with the replicated router, through the functions MoEMLP uses, so
     the ids, the weights, the aux losses and f_i are exactly those of ``moe(x_local)``.
  2. **Dispatch**: one row per (token, destination rank), not per assignment: token t goes once to
     each rank holding one of its k experts, with that rank's slots (local expert ids) and weights
     beside it in a ``[rows, 2K]`` side buffer. Which row goes where comes from vmoe's routing
     kernels run on the ``[T, W]`` destinations (:func:`vmoe.ops.exchange.plan_exchange`); one
     gather kernel writes the send buffer. The ``exchange`` mode decides the buffer sizes:

     - ``"sync"``: exactly the rows that travel. all_to_all_single takes its split sizes on the
       host, so the ``[W, n*W]`` row counts are all-gathered and read back once: the layer's one
       host synchronization.
     - ``"capacity"``: every rank sends C rows to every rank (per chunk), empty ones padded,
       ``C = min(TC, ceil(capacity_factor * TC * min(k, W) / W))`` for TC tokens per chunk (of
       ``max_tokens``, or of this call's tokens). No host read: the whole layer can be captured
       in a CUDA graph. A token sends at most one row to a rank, so C >= TC (``capacity_factor
       >= W / min(k, W)``) drops nothing; below it, the rows past C of a (destination, chunk)
       pair (in token order) are dropped: their slots add nothing, and their number is added to
       the ``dropped_rows`` buffer (or raises on every rank, with ``check_capacity=True`` or
       VMOE_CHECK=1, at the cost of an all_reduce and a host read).
  3. **Exchange** the rows and their side buffer (async all_to_all_single).
  4. **Local experts**: the receiver runs :func:`vmoe.expert_mlp` on the rows it received, with the
     received slots as topk_ids and weights. Slots of experts on other ranks name a null expert
     (id L, width 0) appended to the local widths, which vmoe's routing gives no rows, so the
     receiver's routing is built on the device like any other; each row comes out already
     weighted and summed over this rank's slots.
  5. **Return and combine**: the rows go back (the reverse exchange), and each token sums its
     ranks' rows in the fixed order of the ranks, in float32, with the shared expert's output
     added first (:func:`vmoe.ops.exchange.combine`): deterministic, no atomics.

**Overlap.** ``chunks=n`` splits the local tokens into n chunks and pipelines them: the exchange
of chunk c+1 is in flight while the experts of chunk c compute (the exchanges are issued with
``async_op=True`` and waited just before their rows are needed). A shared expert
(``shared_expert_width > 0``, replicated on every rank) runs on the local tokens while the first
exchange is in flight. In the backward, each exchange's reverse is issued by the node that waited
in the forward, and waited for by the node that issued it, so autograd runs the shared expert's
backward while the dispatch's reverse exchange is in flight.

Gradients follow from autograd through the exchanges: w1/w2 get the gradients of every rank's
tokens routed to the local experts, x_local the full layer's gradient, and the replicated router
and shared expert the local tokens' contribution (summed over ranks, as DDP or FSDP does for
replicated parameters, it is the full layer's). Every rank must run the backward, and the inputs
that require grad must be the same on every rank: the exchanges in the backward are collectives.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import astuple

import torch
import torch.distributed as dist
import torch.nn as nn

from vmoe.autograd import autocast_inputs, expert_mlp, use_triton
from vmoe.config import MoEConfig, column_offsets, gate_factor
from vmoe.layer import MoEMLP, add_router_state
from vmoe.ops import exchange as ex
from vmoe.ops.utils.device import cdiv, checking, device_ints

EXCHANGES = ("sync", "capacity")
PARTS = ("route", "dispatch", "send", "shared", "experts", "return", "combine")


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


class _Pending:
    """One exchange of a few tensors with the same split sizes, between its start and its wait; in
    the backward, the reverse exchange of their gradients.

    ``hooks`` (callables returning a context manager) wrap the exchange from its start to its wait,
    and ``forward_hooks`` the forward exchange only. With one rank there is nothing to exchange: the
    tensors pass through.
    """

    def __init__(self, group, world: int, send_splits, recv_splits, hooks=(), forward_hooks=()):
        self.group, self.world = group, world
        self.splits = (list(send_splits), list(recv_splits))
        self.hooks, self.forward_hooks = tuple(hooks), tuple(forward_hooks)
        self.works, self.inputs, self.outputs, self.stack = [], (), (), None

    def start(self, tensors, reverse: bool = False) -> tuple:
        send, recv = self.splits[::-1] if reverse else self.splits
        if self.world == 1:
            self.outputs = tuple(tensors)
            return self.outputs
        self.stack = contextlib.ExitStack()
        for hook in self.hooks + (() if reverse else self.forward_hooks):
            self.stack.enter_context(hook())
        # The inputs stay referenced until the wait: the exchange reads them asynchronously.
        self.inputs = tuple(t.contiguous() for t in tensors)
        self.outputs = tuple(t.new_empty((sum(recv),) + tuple(t.shape[1:])) for t in self.inputs)
        self.works = [dist.all_to_all_single(out, inp, recv, send, group=self.group, async_op=True)
                      for out, inp in zip(self.outputs, self.inputs)]
        return self.outputs

    def wait(self) -> tuple:
        for work in self.works:
            work.wait()
        if self.stack is not None:
            self.stack.close()
        self.works, self.inputs, self.stack = [], (), None
        outputs, self.outputs = self.outputs, ()
        return outputs


class ExchangeStart(torch.autograd.Function):
    """Start an exchange (``pending.start``); the outputs hold the received rows once
    :class:`ExchangeWait` has run. Backward: wait for the reverse exchange that
    :class:`ExchangeWait`'s backward started, and hand back its rows (the gradients of what was
    sent)."""

    @staticmethod
    def forward(ctx, pending: _Pending, *tensors):
        ctx.pending = pending
        return pending.start(tensors)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.pending.wait())


class ExchangeWait(torch.autograd.Function):
    """Wait for an exchange that :class:`ExchangeStart` started; the tensors pass through.
    Backward: start the reverse exchange of their gradients (waited for by
    :class:`ExchangeStart`'s backward), so that the nodes autograd runs in between overlap it."""

    @staticmethod
    def forward(ctx, pending: _Pending, *received):
        pending.wait()
        ctx.pending = pending
        return received

    @staticmethod
    def backward(ctx, *grads):
        # The gradients pass through to ExchangeStart's backward, which returns the reverse
        # exchange's rows (shaped like what was sent) once they have arrived.
        ctx.pending.start(grads, reverse=True)
        return (None, *grads)


class Dispatch(torch.autograd.Function):
    """The send buffers, chunk by chunk: ``(rows_0, side_0, rows_1, side_1, ...)``
    (:func:`vmoe.ops.exchange.dispatch`), differentiable w.r.t. x and the routing weights."""

    @staticmethod
    def forward(ctx, x2, topk_weights, topk_ids, plan: ex.ExchangePlan, triton_ok: bool):
        ctx.save_for_backward(topk_ids)
        ctx.plan, ctx.triton_ok, ctx.weights_dtype = plan, triton_ok, topk_weights.dtype
        sends = ex.dispatch(x2, topk_ids, topk_weights, plan, triton_ok)
        return tuple(t for pair in sends for t in pair)

    @staticmethod
    def backward(ctx, *grads):
        (topk_ids,) = ctx.saved_tensors
        plan, triton_ok = ctx.plan, ctx.triton_ok
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = ex.combine([g.contiguous() for g in grads[0::2]], plan, None, triton_ok)
        if ctx.needs_input_grad[1]:
            dw = ex.weight_grad(grads[1::2], topk_ids, plan, ctx.weights_dtype, triton_ok)
        return dx, dw, None, None, None


class Combine(torch.autograd.Function):
    """``base + sum over ranks`` of the returned rows (:func:`vmoe.ops.exchange.combine`), one
    ``[rows, d]`` tensor per chunk; its backward sends each row its token's gradient."""

    @staticmethod
    def forward(ctx, plan: ex.ExchangePlan, triton_ok: bool, base, *ys):
        ctx.plan, ctx.triton_ok = plan, triton_ok
        return ex.combine(ys, plan, base, triton_ok)

    @staticmethod
    def backward(ctx, dout):
        dout = dout.contiguous()
        d_ys = [rows for rows, _ in ex.dispatch(dout, None, None, ctx.plan, ctx.triton_ok)]
        return (None, None, dout if ctx.needs_input_grad[2] else None, *d_ys)


def config_digest(config: MoEConfig) -> int:
    """A hash of the config that is the same in every process (``hash()`` of a str is not)."""
    return zlib.crc32(repr(astuple(config)).encode())


def resolve_group(group=None, mesh_dim=None):
    """The process group of ``group``: a ``ProcessGroup`` (or None, the default group) as is, or
    one dimension of a ``DeviceMesh`` (``mesh_dim``, a name or an index; optional for a 1-D mesh)."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if mesh_dim is None and group.ndim != 1:
            raise ValueError(f"a {group.ndim}-D DeviceMesh needs mesh_dim, the dimension the experts "
                             f"are spread over (one of {group.mesh_dim_names})")
        return group.get_group(mesh_dim) if mesh_dim is not None else group.get_group()
    if mesh_dim is not None:
        raise ValueError(f"mesh_dim={mesh_dim!r} needs a DeviceMesh, got group={group!r}")
    return group


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
    """Where the group's small collectives (counts, digests) run: the current GPU for NCCL."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ExpertParallelMoEMLP(nn.Module):
    """This rank's shard of an :class:`vmoe.MoEMLP`; build it with :meth:`from_moe`.

    Args (keywords of :meth:`from_moe` and the constructor):
        group: a ``ProcessGroup`` (None: the default group) or a ``DeviceMesh``, with
            ``mesh_dim`` naming its dimension for a mesh of more than one.
        exchange: ``"sync"`` (exact buffers, one host read of the split sizes per call) or
            ``"capacity"`` (fixed buffers, no host read, CUDA-graph capturable; see the module
            docstring).
        capacity_factor: the capacity mode's C, relative to ``TC * min(k, W) / W`` rows per pair of
            ranks and chunk; ``W / min(k, W)`` or more drops nothing.
        max_tokens: the token count that sizes the capacity buffers, the same on every rank (the
            buffer sizes must agree without a host read); None: this call's tokens, which must
            then be the same on every rank.
        chunks: pipeline the exchange of chunk c+1 with the experts of chunk c (1: no split).
        check_capacity: raise (on every rank) when the capacity drops rows.

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
        shared_w1, shared_w2: ``[d, g*S]`` and ``[S, d]``, the shared expert (replicated), or None.
        shared_gate: ``nn.Linear(d, 1, bias=False)``, replicated, when ``config.shared_expert_gate``.
        dropped_rows: ``[]`` int64 buffer, the rows this rank's calls dropped in the capacity mode,
            summed over calls (reset it with ``.zero_()``); updated on the device, no host read.
        last_splits: ``(send, recv)``, the host split sizes of the last call, ``[chunk][rank]``.
        exchange_hook: None, or a callable that returns a context manager; each exchange (forward
            and backward; the rows and their side buffer together) runs inside one, from its
            start to its wait. ``python -m vmoe.bench.parallel`` times the exchanges with it.
        part_hook: None, or a callable ``part_hook(name)`` that returns a context manager around
            each part of the forward, ``name`` in :data:`PARTS` (``"send"`` and ``"return"`` from
            the start of an exchange to its wait); the benchmark's per-part timer.

    ``forward(x_local)`` takes ``[..., d]`` (the token count may differ between ranks, and be 0)
    and returns ``(out, aux_loss, f_i)`` as ``moe(x_local)`` would on the full layer: ``out`` has
    x_local's shape; ``aux_loss`` and ``f_i`` are computed from this rank's tokens only (the
    losses of :class:`vmoe.MoEMLP` over the local batch; average them over ranks, or weight by
    token count, as the training loop sees fit). Every rank of the group must call it.

    **With FSDP2** (``fully_shard``: ``torch.distributed.fsdp`` since torch 2.6, before it
    ``torch.distributed._composable.fsdp``) on the rest of the model, over the same ranks: the
    local experts are already split over the group, so FSDP must leave them alone (its
    ``ignored_params``), and it takes the replicated parameters (router, shared expert) like any
    other::

        mesh = init_device_mesh("cuda", (W,))
        block.mlp = ExpertParallelMoEMLP.from_moe(moe, group=mesh)      # in every block
        experts = {p for m in model.modules() if isinstance(m, ExpertParallelMoEMLP)
                   for p in m.expert_parameters()}
        for block in model.blocks:                                       # one FSDP unit a block
            fully_shard(block, mesh=mesh, ignored_params=experts)
        fully_shard(model, mesh=mesh, ignored_params=experts)
        # FSDP averages the gradients it reduces over the W ranks; the experts' gradients are
        # already sums over every rank's tokens. Scale them alike:
        for p in experts:
            p.register_hook(lambda g: g / W)

    FSDP's all-gathers and reduce-scatters and the layer's exchanges may share the group: every
    rank issues them in the same order. tests/test_parallel.py runs this recipe on gloo (CPU). On
    a 2-D mesh (dp, ep), pass ``group=mesh, mesh_dim="ep"``; the experts are then replicated over
    ``dp`` and their gradients need a reduction over it, which this recipe does not do (untested).
    """

    # The torch path's losses (impl="reference") read only the config.
    aux_losses = MoEMLP.aux_losses
    _add_null_share_loss = MoEMLP._add_null_share_loss
    # MoEMLP's router, on the local tokens, with this shard's w1 and w2 cast for its experts.
    route = MoEMLP.route
    shared_weight = MoEMLP.shared_weight

    def __init__(self, config: MoEConfig, local_experts, group=None, placement=None, *,
                 mesh_dim=None, exchange: str = "sync", capacity_factor: float = 1.0,
                 max_tokens: int | None = None, chunks: int = 1, check_capacity: bool = False):
        super().__init__()
        group = resolve_group(group, mesh_dim)
        rank, world = _world(group)
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an int >= 1, got {chunks!r}")
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 0):
            raise ValueError(f"max_tokens must be None or an int >= 0, got {max_tokens!r}")
        widths = config.expert_widths
        g = gate_factor(config.activation)
        d, E, S = config.n_embd, config.num_experts, config.shared_expert_width
        self.config, self.group, self.rank, self.world_size = config, group, rank, world
        self.exchange, self.capacity_factor, self.max_tokens = exchange, capacity_factor, max_tokens
        self.chunks, self.check_capacity = chunks, check_capacity
        self.local_experts = list(local_experts)
        placement = (place_experts(widths, world) if placement is None
                     else _check_placement(placement, widths, world))
        if self.local_experts != placement[rank]:
            raise ValueError(f"local_experts {self.local_experts} are not rank {rank}'s experts "
                             f"{placement[rank]} in the placement {placement}")
        self.placement = placement
        self.local_widths = tuple(widths[e] for e in self.local_experts)
        # The receiver's experts: the local ones, then a null one (id L) that the slots of other
        # ranks' experts name.
        self.recv_widths = self.local_widths + (0,)
        self._tables = ex.placement_tables(placement, widths)
        self.slots = ex.row_slots(config.num_active_experts, placement, widths)
        self.exchange_hook = None
        self.part_hook = None
        self.last_splits = None
        self.router = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(d, g * sum(self.local_widths)))
        self.w2 = nn.Parameter(torch.empty(sum(self.local_widths), d))
        if S:
            self.shared_w1 = nn.Parameter(torch.empty(d, g * S))
            self.shared_w2 = nn.Parameter(torch.empty(S, d))
        else:
            self.register_parameter("shared_w1", None)
            self.register_parameter("shared_w2", None)
        self.shared_gate = nn.Linear(d, 1, bias=False) if config.shared_expert_gate else None
        self.register_buffer("dropped_rows", torch.zeros((), dtype=torch.int64), persistent=False)
        add_router_state(self, config)

    @classmethod
    def from_moe(cls, moe: MoEMLP, group=None, placement=None, **options) -> "ExpertParallelMoEMLP":
        """This rank's shard of ``moe`` in ``group`` (a ProcessGroup, None for the default one, or
        a DeviceMesh with ``mesh_dim``).

        ``placement``: which experts each rank holds, ``world_size`` lists of global expert ids
        (every expert exactly once; the same on every rank); ``place_experts(widths, W)`` when
        None. ``options``: the constructor's keywords (``mesh_dim``, ``exchange``,
        ``capacity_factor``, ``max_tokens``, ``chunks``, ``check_capacity``). Collective: every
        rank calls it. Raises ValueError on every rank when the configs differ across ranks, or
        when there are more ranks than experts.
        """
        group = resolve_group(group, options.pop("mesh_dim", None))
        _world(group)
        _check_same_config(moe.config, group)
        if placement is None:
            placement = place_experts(moe.config.expert_widths, dist.get_world_size(group))
        placement = _check_placement(placement, moe.config.expert_widths, dist.get_world_size(group))
        shard = cls(moe.config, placement[dist.get_rank(group)], group, placement, **options)
        shard.to(device=moe.w1.device, dtype=moe.w1.dtype)
        shard.load_full_state_dict(moe.state_dict())
        return shard

    def expert_parameters(self) -> list:
        """The parameters split over the group (w1, w2): what data parallelism must not shard or
        reduce over the same ranks (FSDP2's ``ignored_params``)."""
        return [self.w1, self.w2]

    def capacity(self, num_tokens: int) -> int:
        """C, the rows each rank sends each rank per chunk in the capacity mode, for a call with
        ``num_tokens`` local tokens (see the module docstring)."""
        k, W = self.config.num_active_experts, self.world_size
        tokens = self.max_tokens if self.max_tokens is not None else num_tokens
        tc = cdiv(tokens, self.chunks)
        return min(tc, math.ceil(self.capacity_factor * tc * min(k, W) / W))

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
        """Copy the full layer's state dict (``router.weight``, ``w1``, ``w2``, and
        ``shared_gate.weight`` with a gate) into this shard: the router and the shared expert
        whole, the local experts' columns of w1 and rows of w2."""
        cfg = self.config
        g, F, S = gate_factor(cfg.activation), cfg.total_width, cfg.shared_expert_width
        self.router.weight.copy_(state_dict["router.weight"])
        w1, w2 = state_dict["w1"], state_dict["w2"]
        d = self.w1.shape[0]
        if tuple(w1.shape) != (d, g * (F + S)) or tuple(w2.shape) != (F + S, d):
            raise ValueError(f"state dict has w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)}; the "
                             f"config wants w1 {(d, g * (F + S))} and w2 {(F + S, d)}")
        for _, src, dst, n in self._column_blocks():
            self.w1[:, dst:dst + n].copy_(w1[:, src:src + n])
            self.w2[dst // g:(dst + n) // g].copy_(w2[src // g:(src + n) // g])
        if S:
            self.shared_w1.copy_(w1[:, g * F:])
            self.shared_w2.copy_(w2[F:])
        if self.shared_gate is not None:
            self.shared_gate.weight.copy_(state_dict["shared_gate.weight"])

    @torch.no_grad()
    def full_state_dict(self, dst: int | None = 0) -> dict | None:
        """The full layer's state dict, gathered from every rank's shard (collective).

        Returns it on rank ``dst`` (on every rank when ``dst`` is None) and None elsewhere. The
        router and the shared expert are this rank's copies (replicated). Shards are padded to the
        largest one for the all_gather, whose sizes every rank knows from the placement: no size
        exchange.
        """
        cfg = self.config
        g, d, S = gate_factor(cfg.activation), cfg.n_embd, cfg.shared_expert_width
        device = _collective_device(self.group)
        sizes = [sum(cfg.expert_widths[e] for e in experts) * d for experts in self.placement]
        n_max = max(sizes)
        mine = torch.zeros(2, g * n_max, dtype=self.w1.dtype, device=device)
        mine[0, :g * sizes[self.rank]] = self.w1.detach().t().reshape(-1).to(device)
        mine[1, :sizes[self.rank]] = self.w2.detach().reshape(-1).to(device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        if dst is not None and dst != self.rank:
            return None
        F = cfg.total_width
        w1 = torch.empty(d, g * (F + S), dtype=self.w1.dtype, device=self.w1.device)
        w2 = torch.empty(F + S, d, dtype=self.w2.dtype, device=self.w2.device)
        widths = cfg.expert_widths
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
        if S:
            w1[:, g * F:] = self.shared_w1.detach()
            w2[F:] = self.shared_w2.detach()
        out = {"router.weight": self.router.weight.detach().clone(), "w1": w1, "w2": w2}
        if self.shared_gate is not None:
            out["shared_gate.weight"] = self.shared_gate.weight.detach().clone()
        return out

    def _part(self, name: str):
        return self.part_hook(name) if self.part_hook is not None else contextlib.nullcontext()

    def _pending(self, send_splits, recv_splits, part: str) -> _Pending:
        hooks = [self.exchange_hook] if self.exchange_hook is not None else []
        part_hook = self.part_hook
        forward_hooks = [lambda: part_hook(part)] if part_hook is not None else []
        return _Pending(self.group, self.world_size, send_splits, recv_splits, hooks, forward_hooks)

    def plan(self, topk_ids: torch.Tensor, triton_ok: bool = True) -> ex.ExchangePlan:
        """The :class:`vmoe.ops.exchange.ExchangePlan` of this rank's ``topk_ids [T, k]``, with its
        split sizes (collective: in the sync mode, an all_gather of the row counts and the
        layer's one host read; in the capacity mode, none, and the dropped rows are counted)."""
        W, n, T = self.world_size, self.chunks, topk_ids.shape[0]
        device = topk_ids.device
        owner, local, null = (device_ints(t, device) for t in self._tables)
        capacity = self.capacity(T) if self.exchange == "capacity" else None
        plan = ex.plan_exchange(topk_ids, owner, local, null, world=W, chunks=n, slots=self.slots,
                                capacity=capacity, use_triton=triton_ok)
        counts = plan.routing.counts[:plan.bins]                     # [n*W] rows per bin
        if capacity is None:
            comm = _collective_device(self.group)
            table = torch.empty(W, plan.bins, dtype=torch.int64, device=comm)
            dist.all_gather(list(table.unbind(0)), counts.to(device=comm, dtype=torch.int64),
                            group=self.group)
            # The layer's one host sync: all_to_all_single takes its split sizes on the host.
            rows = table.tolist()  # host-ok: the split sizes of every exchange of the call
            plan.send_splits = [rows[self.rank][c * W:(c + 1) * W] for c in range(n)]
            plan.recv_splits = [[rows[s][c * W + self.rank] for s in range(W)] for c in range(n)]
        else:
            dropped = (counts.to(torch.int64) - capacity).clamp_min(0).sum()
            self.dropped_rows.add_(dropped.to(self.dropped_rows.device))
            if self.check_capacity or checking():
                self._raise_if_dropped(dropped, capacity)
        self.last_splits = (plan.send_splits, plan.recv_splits)
        return plan

    def _raise_if_dropped(self, dropped: torch.Tensor, capacity: int) -> None:
        """Raise on every rank when any rank dropped rows (an all_reduce and a host read)."""
        comm = _collective_device(self.group)
        total = dropped.to(device=comm, dtype=torch.int64).reshape(1)
        mine = total.clone()
        dist.all_reduce(total, group=self.group)
        n_total, n_mine = (int(v) for v in torch.cat([total, mine]).tolist())  # host-ok: check
        if n_total:
            raise RuntimeError(
                f"capacity overflow: {n_total} (token, rank) rows past the capacity C={capacity} "
                f"rows per pair of ranks and chunk ({n_mine} from rank {self.rank}); raise "
                f"capacity_factor (currently {self.capacity_factor}; "
                f"{self.world_size / min(self.config.num_active_experts, self.world_size):g} drops "
                "nothing) or max_tokens")

    def shared_expert(self, x2: torch.Tensor) -> torch.Tensor:
        """The shared expert on the local tokens ``[T, d]`` (weighted by its gate, if any), through
        :func:`vmoe.expert_mlp` as one expert of width S that every token gets."""
        cfg = self.config
        T = x2.shape[0]
        _, _, w1, w2 = autocast_inputs(x2, None, self.shared_w1, self.shared_w2)
        gate = self.shared_weight(x2)
        weight = x2.new_ones(T, 1) if gate is None else gate.to(x2.dtype)
        ids = torch.zeros(T, 1, dtype=torch.int32, device=x2.device)
        return expert_mlp(x2, ids, weight, w1, w2, (cfg.shared_expert_width,), cfg.activation,
                          impl=cfg.impl)

    def forward(self, x_local: torch.Tensor):
        cfg = self.config
        d, K, n = cfg.n_embd, self.slots, self.chunks
        if x_local.dim() < 1 or x_local.shape[-1] != d:
            raise ValueError(f"x must be [..., n_embd] with n_embd={d}, got shape "
                             f"{tuple(x_local.shape)}")
        shape = x_local.shape
        with self._part("route"):
            routed = self.route(x_local.reshape(-1, d))
        x2, w1, w2 = routed.x2, routed.w1, routed.w2
        triton_ok = use_triton(x2, cfg.impl)
        with self._part("dispatch"):
            plan = self.plan(routed.topk_ids, triton_ok)
            sends = Dispatch.apply(x2, routed.topk_weights, routed.topk_ids, plan, triton_ok)

        def send(c):
            pending = self._pending(plan.send_splits[c], plan.recv_splits[c], "send")
            return pending, ExchangeStart.apply(pending, sends[2 * c], sends[2 * c + 1])

        in_flight = {0: send(0)}
        shared, returns = None, []
        for c in range(n):
            if c + 1 < n:
                in_flight[c + 1] = send(c + 1)   # in flight while chunk c's experts compute
            if c == 0 and cfg.shared_expert_width:
                with self._part("shared"):
                    shared = self.shared_expert(x2)
            pending, received = in_flight.pop(c)
            x_recv, side = ExchangeWait.apply(pending, *received)
            with self._part("experts"):
                ids = side[:, :K].to(torch.int32)
                weights = side[:, K:].to(x_recv.dtype)
                y = expert_mlp(x_recv, ids, weights, w1, w2, self.recv_widths, cfg.activation,
                               impl=cfg.impl)                                # [rows, d], weighted
            back = self._pending(plan.recv_splits[c], plan.send_splits[c], "return")
            returns.append((back, ExchangeStart.apply(back, y)))
        ys = [ExchangeWait.apply(back, *y)[0] for back, y in returns]
        with self._part("combine"):
            out = Combine.apply(plan, triton_ok, shared, *ys)
        return out.reshape(shape), routed.aux, routed.f_i
