"""Expert parallelism on W GPUs against the full layer on one: step time, its parts, balance.

Run as (one CSV per GPU kind and world size; ``--help`` for the options)::

    torchrun --nproc_per_node 2 -m vmoe.bench.parallel          # -> results/parallel/<gpu>.csv
    torchrun --nproc_per_node 1 -m vmoe.bench.parallel          # -> results/parallel/<gpu>_world1.csv
    TRITON_INTERPRET=1 torchrun --nproc_per_node 2 -m vmoe.bench.parallel --smoke --out /tmp/x.csv

With one process (``--nproc_per_node 1``, or plain ``python -m``) the expert-parallel layer runs
on a group of one, where the exchanges move nothing: its rows against the full layer on the same
tokens (``overhead``) are the cost of the dispatch and the combine. ``notebooks/09_parallel.ipynb``
draws its figure from ``results/parallel/*.csv``, a folder of its own because ``results/*.csv`` are
vmoe.bench's (its ``--reproduce`` and notebook 07 read every one of them). Shape letters: see
:mod:`vmoe.config`; W ranks.

**Configs.** vmoe.bench's large relu2 configs of the same expert mixes (T = 16384 tokens per rank,
d = 2048, k = 8, bf16): ``128x768`` and ``32x1536+32x768+64x384``, as a MoEMLP with a softmax
router and renormalised top-k (vmoe.bench's layer scope). ``--smoke``: the same mixes at toy
sizes, in float32, meant for the CPU (gloo, Triton interpreter) to check the script end to end.

**What runs, in one process group, in this order:**

1. ``single``: the full :class:`vmoe.MoEMLP` on rank 0's GPU alone (the other ranks wait at a
   barrier), on W*T tokens (the global batch: every rank's tokens, concatenated) and on T tokens
   (one rank's batch). Rows with ``world_size`` 1.
2. For each placement (``--placements``: ``balanced``, :func:`vmoe.parallel.place_experts` by
   width, and ``contiguous``, experts in id order, E/W per rank: :func:`contiguous_placement`;
   with W = 1 they coincide and only ``balanced`` runs), each exchange mode (``--exchange``:
   ``sync`` and ``capacity``, with ``--capacity-factor``) and each ``--chunks``: an
   :class:`vmoe.parallel.ExpertParallelMoEMLP` shard per rank, each on its own T tokens. Before
   timing, each rank checks the shard's output against the full layer's on its tokens
   (``rel_err``, ``ok``, with :func:`vmoe.testing.tolerance`).

**Passes:** ``fwd`` (under no_grad) and ``fwdbwd`` (the backward of ``(out * dy).sum() +
sum(aux.values())``), as vmoe.bench's layer scope.

**Timing.** ``--warmup`` calls first (compilation, autotuning), then ``--iters`` timed steps, each
started from idle devices: ``torch.cuda.synchronize()``, a barrier (so the ranks start together),
a CUDA event before and one after the step on the current stream. ``ms`` is the median over the
steps, per rank; the aggregate row (``rank`` = ``all``) takes the max over the ranks of that
median (a step ends when the slowest rank ends) with the slowest rank's split. The one-GPU rows
use the same timer (without the barrier), so the two compare like with like. On the CPU the
events are ``time.perf_counter``.

**Parts of the forward.** The layer's ``part_hook`` records an event pair around each part of its
forward (:data:`vmoe.parallel.PARTS`): ``route_ms`` (the router), ``dispatch_ms`` (the plan of
which rows go where, the all_gather of the counts and their host read in the sync mode, and the
send buffer's gather), ``send_ms`` (the exchange of the rows, from its start to its wait),
``shared_ms`` (with ``--shared S``, the shared expert, which runs inside ``send_ms`` while the first
exchange is in flight), ``experts_ms`` (the local experts on the received rows), ``return_ms``
(the exchange back) and ``combine_ms`` (the sum per token); each is the sum over the chunks in a
step, median over the steps. With ``--chunks`` > 1 the parts overlap and no longer add up to the
step. An exchange
includes the wait for a slower peer: imbalance in compute shows up as exchange time on the
faster rank. ``exchange_ms`` is the time inside every exchange of the step (forward, and the
backward's reverse ones), from the layer's ``exchange_hook``; ``compute_ms`` is the rest of the
step. ``a2a_alone_ms`` times the same exchanges (the same split sizes and row widths) alone,
after a barrier, with nothing around them: the transfer itself. The hooks touch nothing but the
timing.

**Balance.** Per rank: ``experts`` held, their total width ``width_total`` (Σ f_e),
``recv_rows`` (rows received: one per token, of any rank, that chose one or more of this rank's
experts; W*C per chunk in the capacity mode), ``recv_assignments`` (the assignments those rows
carry to the local experts: the work) and ``sent_rows``; ``width_max_over_min`` and
``recv_max_over_min`` (of the assignments) over the ranks. ``dropped_rows``: rows past the
capacity, summed over the ranks, per step.

**Throughput.** ``tokens_per_s_per_gpu`` = tokens per GPU / ``ms``; ``tflops_per_gpu`` counts
the useful FLOPs of the GPU's own work (its experts on the assignments it received,
``(2g+2) d Σ n_e f_e`` with g = 2 for swiglu else 1, plus the router's ``2 T d E``; 3 times that
for fwdbwd), as vmoe.bench does. ``efficiency`` = tokens/s per GPU with W GPUs over tokens/s of the
full layer on one GPU at the same global batch (W*T tokens); ``efficiency_same_T`` over one GPU at
T tokens (the same work per GPU). Both are 1 for perfect scaling. ``overhead`` = ``ms`` over the
full layer's on T tokens: with W = 1, the price of the exchange machinery.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from vmoe import parallel
from vmoe.bench import report
from vmoe.bench.baselines import mlp_flops
from vmoe.bench.harness import BenchConfig, configs, gpu_name, gpu_slug
from vmoe.config import MoEConfig
from vmoe.layer import MoEMLP
from vmoe.ops.utils.device import interpreting, reexec_with_interpreter
from vmoe.testing import rel_err, tolerance

PASSES = ("fwd", "fwdbwd")
PLACEMENTS = ("balanced", "contiguous")
LARGE = r"^large-(128x768|32x1536\+32x768\+64x384)-k8-relu2$"
PART_COLUMNS = tuple(f"{part}_ms" for part in parallel.PARTS)
COLUMNS = ("config", "placement", "exchange", "chunks", "capacity_factor", "pass", "rank",
           "world_size", "T_per_gpu", "T_global", "d", "k", "E", "widths", "activation", "dtype",
           "shared_width", "experts", "width_total", "width_max_over_min", "recv_rows", "recv_assignments",
           "recv_max_over_min", "sent_rows", "dropped_rows", "ms", *PART_COLUMNS, "exchange_ms",
           "compute_ms", "a2a_alone_ms", "tokens_per_s_per_gpu", "tflops_per_gpu", "efficiency",
           "efficiency_same_T", "overhead", "rel_err", "ok", "iters", "timer", "gpu", "torch",
           "triton", "vmoe_commit")


def contiguous_placement(E: int, world: int) -> list[list[int]]:
    """The naive split: experts in id order, ``E // world`` per rank, the remainder to the last.

    Example:
        >>> contiguous_placement(10, 3)
        [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    """
    n = E // world
    return [list(range(r * n, E if r == world - 1 else (r + 1) * n)) for r in range(world)]


def smoke_configs() -> list[BenchConfig]:
    """The two expert mixes at toy sizes, for the interpreter (T per rank, d, k = 32, 16, 2)."""
    return [BenchConfig(f"smoke-{'+'.join(f'{n}x{f}' for n, f in sizes)}-k2-relu2", 32, 16, 2, sizes,
                        "relu2")
            for sizes in (((8, 24),), ((2, 48), (2, 24), (4, 12)))]


class _Clock:
    """CUDA events on the current stream, or ``time.perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.name = "cuda events, median" if self.cuda else "perf_counter (cpu), median"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # host-ok: the timer, outside vmoe


class _Marks:
    """A hook of the layer: a (name, start, end) mark triple around each region, while recording.
    As ``exchange_hook`` it is called with no argument (name ``exchange``); as ``part_hook``, with
    the part's name."""

    def __init__(self, clock: _Clock):
        self.clock, self.marks = clock, None

    @contextlib.contextmanager
    def __call__(self, name: str = "exchange"):
        start = self.clock.mark() if self.marks is not None else None
        yield
        if self.marks is not None and start is not None:
            self.marks.append((name, start, self.clock.mark()))

    def start(self) -> None:
        self.marks = []

    def stop(self) -> list:
        marks, self.marks = self.marks, None
        return marks


def _time_steps(step, clear, clock: _Clock, iters: int, warmup: int, barrier: bool,
                hooks: dict | None = None) -> dict:
    """Median ms of ``step``, and of each region the hooks mark (summed per step, by name)."""
    hooks = hooks or {}
    for _ in range(warmup):
        step()
        clear()
    marks, regions = [], {key: [] for key in hooks}
    for _ in range(iters):
        clock.sync()
        if barrier:
            dist.barrier()
        for hook in hooks.values():
            hook.start()
        start = clock.mark()
        step()
        end = clock.mark()
        marks.append((start, end))
        for key, hook in hooks.items():
            regions[key].append(hook.stop())
        clear()
    clock.sync()
    steps = [clock.ms(a, b) for a, b in marks]
    out = {"ms": statistics.median(steps)}
    if "exchange" in hooks:
        ex = [sum(clock.ms(a, b) for _, a, b in step_marks) for step_marks in regions["exchange"]]
        out["exchange_ms"] = statistics.median(ex)
        out["compute_ms"] = statistics.median(s - e for s, e in zip(steps, ex))
    if "parts" in hooks:
        for column in PART_COLUMNS:
            name = column[:-3]
            out[column] = statistics.median(
                sum(clock.ms(a, b) for n, a, b in step_marks if n == name)
                for step_marks in regions["parts"])
    return out


def _time_a2a_alone(shard, d: int, dtype, device, clock: _Clock, iters: int, warmup: int,
                    backward: bool) -> float:
    """Median ms of the layer's exchanges alone, with the split sizes of its last call: per chunk,
    the rows ``[S, d]`` and their side ``[S, 2K]`` (float32) out, ``[R, d]`` back; for the
    backward, the same in reverse."""
    if shard.world_size == 1:
        return 0.0
    K = shard.slots
    calls = []
    for send, recv in zip(*shard.last_splits):
        S, R = sum(send), sum(recv)
        rows = [torch.zeros(n, d, dtype=dtype, device=device) for n in (S, R, R, S)]
        side = [torch.zeros(n, 2 * K, dtype=torch.float32, device=device) for n in (S, R)]
        calls += [(rows[1], rows[0], recv, send), (side[1], side[0], recv, send),
                  (rows[3], rows[2], send, recv)]
        if backward:
            calls += [(rows[2], rows[3], recv, send), (rows[0], rows[1], send, recv),
                      (side[0], side[1], send, recv)]

    def step():
        for out, inp, out_splits, in_splits in calls:
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=shard.group)

    return _time_steps(step, lambda: None, clock, iters, warmup, barrier=True)["ms"]


def _make_moe(cfg: BenchConfig, device, dtype, seed: int, shared: int = 0) -> MoEMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        moe = MoEMLP(MoEConfig(n_embd=cfg.d, expert_sizes=list(cfg.expert_sizes), num_active_experts=cfg.k,
                               activation=cfg.activation, router="softmax", norm_topk_prob=True,
                               shared_expert_width=shared))
    return moe.to(device=device, dtype=dtype)


def _tokens(cfg: BenchConfig, rank: int, device, dtype, seed: int):
    """Rank ``rank``'s x and dy, [T, d] ~ N(0, 1): the same on every process that asks."""
    gen = torch.Generator(device=device).manual_seed(seed + 1000 * (rank + 1))
    x = torch.randn(cfg.T, cfg.d, generator=gen, device=device).to(dtype)
    dy = torch.randn(cfg.T, cfg.d, generator=gen, device=device).to(dtype)
    return x, dy


def _step(layer, x, dy, pass_: str):
    """(step, clear): one call of the layer as a training step makes it, and the reset after it."""
    x = x.detach().requires_grad_(pass_ == "fwdbwd")
    leaves = [x, *layer.parameters()]

    def step():
        if pass_ == "fwd":
            with torch.no_grad():
                layer(x)
            return
        out, aux, _ = layer(x)
        ((out * dy).sum() + sum(aux.values())).backward()

    def clear():
        for t in leaves:
            t.grad = None

    return step, clear


def _counts(layer, x) -> list[int]:
    """n_e: this batch's assignments per expert, by the layer's own router."""
    with torch.no_grad():
        counts = layer.route(x.reshape(-1, x.shape[-1])).counts
    return counts.tolist()  # host-ok: the benchmark's bookkeeping, outside the timed steps


def _flops(cfg: BenchConfig, T: int, counts: list[int], experts, pass_: str) -> float:
    """The experts' useful FLOPs (as the benchmark counts them) plus the router GEMM's."""
    sum_nf = sum(counts[e] * cfg.widths[e] for e in experts)
    router = 2 * T * cfg.d * cfg.E * (3 if pass_ == "fwdbwd" else 1)
    return mlp_flops(sum_nf, cfg.d, cfg.activation, pass_) + router


def _ratio(values) -> float:
    return max(values) / min(values) if min(values) > 0 else float("inf")


def _free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_single(cfg: BenchConfig, world: int, device, dtype, clock: _Clock, iters: int, warmup: int,
                   seed: int, shared: int = 0) -> list[dict]:
    """The full layer on this GPU alone, on T and on W*T tokens (every rank's x, concatenated)."""
    rows = []
    moe = _make_moe(cfg, device, dtype, seed, shared)
    for n_ranks in sorted({1, world}):
        xs, dys = zip(*(_tokens(cfg, r, device, dtype, seed) for r in range(n_ranks)))
        x, dy = torch.cat(xs), torch.cat(dys)
        T = x.shape[0]
        counts = _counts(moe, x)
        for pass_ in PASSES:
            step, clear = _step(moe, x, dy, pass_)
            t = _time_steps(step, clear, clock, iters, warmup, barrier=False)
            rows.append(dict(placement="single", **{"pass": pass_}, rank="0", world_size=1, T_per_gpu=T,
                             T_global=T, experts=cfg.E, width_total=sum(cfg.widths), width_max_over_min=1.0,
                             recv_rows=T, recv_assignments=T * cfg.k, recv_max_over_min=1.0, sent_rows=0,
                             ms=t["ms"], exchange_ms=0.0, compute_ms=t["ms"],
                             tokens_per_s_per_gpu=T / t["ms"] * 1e3,
                             tflops_per_gpu=_flops(cfg, T, counts, range(cfg.E), pass_) / t["ms"] / 1e9))
        del xs, dys, x, dy
    del moe
    _free(device)
    return rows


def measure_parallel(cfg: BenchConfig, placement_name: str, mode: dict, rank: int, world: int, device,
                     dtype, clock: _Clock, iters: int, warmup: int, seed: int,
                     shared: int = 0) -> list[dict]:
    """This rank's measurements of one placement and exchange ``mode`` (``exchange``, ``chunks``,
    ``capacity_factor``), gathered to every rank: one dict per (pass, rank)."""
    placement = (parallel.place_experts(cfg.widths, world) if placement_name == "balanced"
                 else contiguous_placement(cfg.E, world))
    moe = _make_moe(cfg, device, dtype, seed, shared)
    for p in moe.parameters():  # identical on every rank by seeding; made certain
        dist.broadcast(p.data, src=0)
    options = dict(exchange=mode["exchange"], chunks=mode["chunks"])
    if mode["exchange"] == "capacity":
        options["capacity_factor"] = mode["capacity_factor"]
    shard = parallel.ExpertParallelMoEMLP.from_moe(moe, placement=placement, **options)
    x, dy = _tokens(cfg, rank, device, dtype, seed)
    with torch.no_grad():
        err = rel_err(shard(x)[0], moe(x)[0])
    del moe
    _free(device)

    counts = [None] * world
    dist.all_gather_object(counts, _counts(shard, x))
    n_e = [sum(row[e] for row in counts) for e in range(cfg.E)]
    mine = []
    for pass_ in PASSES:
        step, clear = _step(shard, x, dy, pass_)
        hooks = {"exchange": _Marks(clock), "parts": _Marks(clock)}
        shard.exchange_hook, shard.part_hook = hooks["exchange"], hooks["parts"]
        shard.dropped_rows.zero_()
        t = _time_steps(step, clear, clock, iters, warmup, barrier=True, hooks=hooks)
        shard.exchange_hook = shard.part_hook = None
        send, recv = shard.last_splits
        steps = max(1, iters + warmup)
        t["a2a_alone_ms"] = _time_a2a_alone(shard, cfg.d, dtype, device, clock, iters, warmup,
                                            backward=pass_ == "fwdbwd")
        mine.append(dict(t, **{"pass": pass_}, rank=rank, experts=len(placement[rank]),
                         width_total=sum(cfg.widths[e] for e in placement[rank]),
                         recv_rows=sum(map(sum, recv)),
                         recv_assignments=sum(n_e[e] for e in placement[rank]),
                         sent_rows=sum(map(sum, send)),
                         dropped_rows=int(shard.dropped_rows) / steps,  # host-ok: after timing
                         rel_err=err, ok=err <= tolerance(dtype),
                         tflops_per_gpu=_flops(cfg, cfg.T, n_e, placement[rank], pass_) / t["ms"] / 1e9))
    del shard, x, dy
    _free(device)
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return [row for per_rank in gathered for row in per_rank]


def parallel_rows(cfg: BenchConfig, placement_name: str, mode: dict, per_rank: list[dict], world: int,
                  single: list[dict]) -> list[dict]:
    """CSV rows of one placement and mode: one per (pass, rank) and one per pass over the ranks
    (``all``)."""
    baseline = {(r["pass"], r["T_global"]): r for r in single}
    rows = []
    for pass_ in PASSES:
        ranks = [r for r in per_rank if r["pass"] == pass_]
        slowest = max(ranks, key=lambda r: r["ms"])
        total = dict(slowest, rank="all", width_total=max(r["width_total"] for r in ranks),
                     recv_rows=max(r["recv_rows"] for r in ranks),
                     recv_assignments=max(r["recv_assignments"] for r in ranks),
                     dropped_rows=sum(r["dropped_rows"] for r in ranks),
                     a2a_alone_ms=max(r["a2a_alone_ms"] for r in ranks),
                     rel_err=max(r["rel_err"] for r in ranks), ok=all(r["ok"] for r in ranks),
                     tflops_per_gpu=statistics.mean(r["tflops_per_gpu"] * r["ms"] for r in ranks)
                     / slowest["ms"])
        same_T = baseline[(pass_, cfg.T)]
        for r in ranks + [total]:
            tps = cfg.T / r["ms"] * 1e3
            rows.append(dict(r, placement=placement_name, **mode, rank=str(r["rank"]), world_size=world,
                             T_per_gpu=cfg.T, T_global=world * cfg.T,
                             width_max_over_min=_ratio([q["width_total"] for q in ranks]),
                             recv_max_over_min=_ratio([q["recv_assignments"] for q in ranks]),
                             tokens_per_s_per_gpu=tps,
                             efficiency=tps / baseline[(pass_, world * cfg.T)]["tokens_per_s_per_gpu"],
                             efficiency_same_T=tps / same_T["tokens_per_s_per_gpu"],
                             overhead=r["ms"] / same_T["ms"]))
    return rows


def _summary(row: dict) -> str:
    where = row["placement"]
    if where != "single":
        where += f"/{row['exchange']}/n{row['chunks']}"
    parts = ""
    if where != "single":
        parts = ", fwd parts " + " ".join(f"{c[:-3]} {row[c]:.3f}" for c in PART_COLUMNS)
        parts += f", exchange {row['exchange_ms']:.3f} ms"
    eff = f", efficiency {row['efficiency']:.2f}" if row.get("efficiency", "") != "" else ""
    over = f", overhead {row['overhead']:.2f}" if row.get("overhead", "") != "" else ""
    return (f"{row['config']} {where:24s} {row['pass']:6s} rank {row['rank']:3s} "
            f"W={row['world_size']} T/gpu={row['T_per_gpu']}: {row['ms']:.3f} ms{parts}, "
            f"{row['tokens_per_s_per_gpu'] / 1e6:.2f} Mtok/s/gpu, {row['tflops_per_gpu']:.0f} TFLOP/s"
            f"{eff}{over}")


def _init(device_kind: str) -> tuple[int, int, torch.device]:
    """(rank, world, device) and a process group: torchrun's, or a group of one."""
    env = os.environ
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))  # host-ok: torchrun's strings
    local = int(env.get("LOCAL_RANK", 0))  # host-ok: torchrun's string
    if device_kind == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if device.type == "cpu" and sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on loopback, as the tests
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timedelta(minutes=10), **kwargs)
    else:  # plain python -m: the layer still needs a group, of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return rank, world, device


def _list(kind, choices=None):
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            expected = choices or kind.__name__
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {expected}, "
                                             f"got {text!r}")
        return values
    return parse


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node W -m vmoe.bench.parallel",
                                     description="Time ExpertParallelMoEMLP on W GPUs against the full "
                                                 "layer on one, by placement and exchange mode.")
    parser.add_argument("--out", help="CSV path (default results/parallel/<gpu>.csv, or "
                                      "<gpu>_world1.csv for one process); overwritten")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes in float32, for the CPU (gloo, Triton interpreter)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 20; smoke 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; smoke 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--placements", type=_list(str, PLACEMENTS), default=list(PLACEMENTS),
                        help="comma-separated, of %(default)s")
    parser.add_argument("--exchange", type=_list(str, parallel.EXCHANGES), default=list(parallel.EXCHANGES),
                        help="exchange modes, comma-separated, of %(default)s")
    parser.add_argument("--chunks", type=_list(int), default=[1],
                        help="pipeline chunks, comma-separated (default 1)")
    parser.add_argument("--capacity-factor", type=float, default=1.0,
                        help="the capacity mode's factor (default 1.0: dropless when k >= W)")
    parser.add_argument("--shared", type=int, default=0,
                        help="width of a shared expert added to every config (default 0: none)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        reexec_with_interpreter("vmoe.bench.parallel", argv)  # no GPU: the interpreter, on the CPU
    device_kind = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    if device_kind == "cpu" and not args.smoke:
        parser.error("no GPU (or TRITON_INTERPRET=1): only --smoke runs on the CPU")
    iters = args.iters or (1 if args.smoke else 20)
    warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 3)
    cfgs = smoke_configs() if args.smoke else configs("large", match=LARGE)
    dtype = torch.float32 if args.smoke else torch.bfloat16

    rank, world, device = _init(device_kind)
    clock = _Clock(device)
    slug = gpu_slug(gpu_name(device)) + ("_world1" if world == 1 else "")
    out = Path(args.out) if args.out else Path("results") / "parallel" / f"{slug}.csv"
    env = {**report.environment(device), "dtype": str(dtype)[6:], "iters": iters, "timer": clock.name}
    log = print if rank == 0 else (lambda *a, **k: None)
    placements = args.placements if world > 1 else ["balanced"]  # one rank: the two coincide
    modes = [dict(exchange=e, chunks=n, capacity_factor=args.capacity_factor if e == "capacity" else "")
             for e in args.exchange for n in args.chunks]
    log(f"{env['gpu']} x {world}, torch {env['torch']}, triton {env['triton']}, {env['dtype']}, "
        f"{iters} timed steps after {warmup}; {[c.name for c in cfgs]}; {placements} x {modes} -> {out}")
    rows, start = [], time.perf_counter()
    try:
        for cfg in cfgs:
            common = dict(env, config=cfg.name, d=cfg.d, k=cfg.k, E=cfg.E, widths=cfg.widths_str,
                          activation=cfg.activation, shared_width=args.shared)
            single = []
            if rank == 0:
                single = measure_single(cfg, world, device, dtype, clock, iters, warmup, args.seed,
                                        args.shared)
                for row in single:
                    rows.append(dict(common, **row))
                    log(_summary(rows[-1]))
                report.write_csv(out, rows, COLUMNS)
                log(f"{cfg.name} single: done at {time.perf_counter() - start:.0f} s")
            dist.barrier()
            for name in placements:
                for mode in modes:
                    per_rank = measure_parallel(cfg, name, mode, rank, world, device, dtype, clock, iters,
                                                warmup, args.seed, args.shared)
                    if rank == 0:
                        for row in parallel_rows(cfg, name, mode, per_rank, world, single):
                            rows.append(dict(common, **row))
                            log(_summary(rows[-1]))
                        report.write_csv(out, rows, COLUMNS)
                    log(f"{cfg.name} {name} {mode}: done at {time.perf_counter() - start:.0f} s")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    bad = [r for r in rows if r.get("ok") is False]
    log(f"{len(rows)} rows written to {out}; {len(bad)} failed the check against the full layer")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
