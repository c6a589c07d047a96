"""Benchmark harness: vmoe against the other ways of computing a variable-width MoE, one CSV per GPU.

Run as ``python -m vmoe.bench`` (``--help`` for the options); ``notebooks/07_bench.ipynb``, the
README's summary and ``results/README.md``'s full tables read what it writes
(:mod:`vmoe.bench.report`, re-exported here). The providers are described in
:mod:`vmoe.bench.baselines`. Shape letters: see :mod:`vmoe.config`.

Config sets (``--configs``; a config's name starts with its set's name):
    seed    the original table: T = 4096, d = 256, relu2, top-2 or top-8.
    large   today's MoE sizes: T = 16384, d = 2048, top-8, relu2 and swiglu.
    widths  the balanced-routing width sweep: every expert receives exactly ``T k / E`` assignments,
            so the useful FLOPs follow the mean width, and the time's response to the width
            (:func:`vmoe.bench.report.elasticity_table`) is not blurred by the routing. relu2 at
            expert scope; by default vmoe, grouped_mm and dense, each replayed from a CUDA graph.
    tiny    interpreter-sized, for tests.

Two scopes (``--scope``; a CSV row's ``scope`` column):
    expert  the expert computation alone, for a given routing and given weights (the default).
    layer   the whole :class:`vmoe.MoEMLP` as a training loop calls it: ``out, aux, f_i = moe(x)``,
            and for fwdbwd the backward of ``(out * dy).sum() + sum(aux.values())``. softmax router,
            top-k renormalised, in the bench dtype.

Useful FLOPs, from the routing actually used (n_e assignments to expert e): the forward does two
GEMMs of ``2 n_e f_e d`` each, so ``4 d sum_e n_e f_e``; swiglu's up projection is twice as wide,
so 1.5 times that; the layer adds the router's ``2 T d E``; forward+backward counts 3 times the
forward. Padding (stk) and recomputation are not useful work and are not counted.

The check before timing compares, with :func:`vmoe.testing.rel_err` (NaN if any output is not
finite), against a float64 oracle:
    expert  ``out`` and, for fwdbwd, the gradients of x, topk_weights, w1 and w2, against
            :func:`vmoe.reference.expert_mlp` on the same routing.
    layer   ``out``, the three aux losses, ``f_i`` and, for fwdbwd, the gradients of x, the router
            weight, w1 and w2, against a float64 copy of the layer on the reference loop
            (impl="reference") that takes the top-k experts the layer's own router picks in the bench
            dtype: a near-tie may legitimately flip in bf16, which is no error of the kernels. The
            weights are recomputed in float64, the aux losses in float32 (as MoEMLP computes them).
            A provider whose router picks otherwise (torch.compile may round the logits differently)
            shows it in ``f_i`` and ``out``: ``ok=False`` with each error named, not a crash.
``rel_err`` is the largest error over those tensors; above :func:`vmoe.testing.tolerance` for the
dtype the row keeps ``ok=False`` and names each error. dense computes another function and is not
checked. Providers that cannot run a config get a row with ``applicable=False`` and the reason.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

from vmoe import reference
from vmoe.bench import baselines, report
from vmoe.config import MoEConfig, expand_sizes, gate_factor
from vmoe.layer import MoEMLP
from vmoe.ops.utils.device import interpreting, reexec_with_interpreter
from vmoe.reference import router_probs
from vmoe.testing import rel_err, tolerance

# notebooks/07_bench.ipynb and the tests read the results through vmoe.bench.
README_START, README_END, gpu_slug, gpu_name = (report.README_START, report.README_END, report.gpu_slug,
                                                report.gpu_name)
load_results, speedup_table, markdown_table = report.load_results, report.speedup_table, report.markdown_table
summary_table, summary_markdown = report.summary_table, report.summary_markdown
elasticity_table = report.elasticity_table

SCOPES = ("expert", "layer")
SCOPE_PROVIDERS = {"expert": ("vmoe", "vmoe_graph", "naive", "stk", "grouped_mm", "dense",
                              "grouped_mm_graph", "dense_graph", "megablocks_variable"),
                   "layer": ("vmoe", "vmoe_graph", "vmoe_compiled", "grouped_mm",
                             "grouped_mm_compiled", "dense")}
PROVIDERS = tuple(dict.fromkeys(SCOPE_PROVIDERS["expert"] + SCOPE_PROVIDERS["layer"]))
# Without --providers, a config set's own list, else every provider but the replayed baselines:
# beside eager vmoe the eager baselines are the comparison; the widths suite's small configs take
# tens of microseconds of GPU work, which only a replay shows. megablocks_variable runs only when
# named: it needs its own build (python -m vmoe.bench.megablocks_variable build).
SET_PROVIDERS = {"widths": ("vmoe_graph", "grouped_mm_graph", "dense_graph")}
DEFAULT_PROVIDERS = tuple(p for p in PROVIDERS
                          if p not in ("grouped_mm_graph", "dense_graph", "megablocks_variable"))
ROUTINGS = ("topk", "balanced")
MODES = ("fwd", "fwdbwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTILES = [0.5, 0.2, 0.8]


@dataclass(frozen=True)
class BenchConfig:
    name: str
    T: int
    d: int
    k: int
    expert_sizes: tuple      # ((count, width), ...), experts numbered in this order
    activation: str
    quick: bool = False      # part of the --quick subset
    routing: str = "topk"    # topk: softmax top-k of random logits; balanced: see balanced_ids
    widths: tuple = field(init=False)   # f_e, one per expert
    E: int = field(init=False)
    widths_str: str = field(init=False)  # "4x512+8x256", the CSV's widths column

    def __post_init__(self):
        widths = expand_sizes(self.expert_sizes)
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "E", len(widths))
        object.__setattr__(self, "widths_str", "+".join(f"{c}x{w}" for c, w in self.expert_sizes))
        if self.routing not in ROUTINGS:
            raise ValueError(f"{self.name}: routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.routing == "balanced":
            _check_balanced(self.T, self.k, self.E)


def _check_balanced(T: int, k: int, E: int) -> None:
    if k > E or (T * k) % E:
        raise ValueError(f"balanced routing needs k <= E and E to divide T k; got T={T}, k={k}, E={E}")


def balanced_ids(T: int, k: int, E: int, generator=None, device="cpu") -> torch.Tensor:
    """Top-k ids [T, k] (int64) in which every expert is chosen exactly ``T k / E`` times and no
    token picks an expert twice: assignment j of the flat table goes to expert ``j mod E``, so a
    token's k slots are k consecutive experts (distinct since k <= E); the tokens are then shuffled
    (seeded by ``generator``), so that an expert's rows lie spread over the batch as a router's do
    rather than every (E/k)-th token."""
    _check_balanced(T, k, E)
    ids = (torch.arange(T * k, device=device) % E).view(T, k)
    return ids[torch.randperm(T, generator=generator, device=device)]


def _configs(prefix, T, d, k, sizes, activations, quick=(), tag_activation=True, routing="topk"):
    out = []
    for act in activations:
        wstr = "+".join(f"{c}x{w}" for c, w in sizes)
        name = f"{prefix}-{wstr}-k{k}" + (f"-{act}" if tag_activation else "")
        out.append(BenchConfig(name, T, d, k, tuple(sizes), act, quick=(wstr, act) in quick,
                               routing=routing))
    return out


def _seed_set():
    # The original table: T = 8 x 512 tokens, d = 256, relu2.
    T, d = 8 * 512, 256
    table = [
        (2, [(8, 512)]), (2, [(4, 512), (4, 256)]), (2, [(16, 256)]),
        (2, [(4, 512), (8, 256), (4, 128)]),
        (8, [(64, 256)]), (8, [(16, 512), (32, 256), (16, 128)]), (8, [(128, 256)]),
        (8, [(32, 512), (64, 256), (32, 128)]),
    ]
    quick = {("4x512+8x256+4x128", "relu2"), ("32x512+64x256+32x128", "relu2")}
    return [c for k, sizes in table
            for c in _configs("seed", T, d, k, sizes, ["relu2"], quick, tag_activation=False)]


def _large_set():
    # The sizes of current MoE models: Qwen3-30B-A3B-like (128 x 768), OLMoE-like (64 x 1024), and
    # variable-width mixes of the same total width.
    T, d, k = 16384, 2048, 8
    table = [[(128, 768)], [(32, 1536), (32, 768), (64, 384)], [(64, 1024)],
             [(16, 2048), (16, 1024), (32, 512)]]
    quick = {("128x768", "relu2"), ("32x1536+32x768+64x384", "swiglu")}
    return [c for sizes in table for c in _configs("large", T, d, k, sizes, ["relu2", "swiglu"], quick)]


def _widths_set():
    # Balanced routing, relu2; at each d the widest uniform row is the reference of the elasticity.
    # d=384, top-2 of 8 is the training study's layer (notebook 08; T = 64 x 256 as in
    # probes/width_cost.py), 610 beside 616 a width that is not a multiple of 8 beside its neighbour
    # that is; d=768, top-2 of 8 a 4x, 2x and 1x MLP; d=2048, top-8 of 64 the large configs' size,
    # uniform and two mixes of mean width 512 and 256.
    # The quick subset keeps each d's reference and one narrower row.
    T = 16384
    table = [(384, 2, [[(8, 768)], [(8, 384)], [(8, 256)], [(8, 128)], [(8, 610)], [(8, 616)]],
              {"8x768", "8x610", "8x616"}),
             (768, 2, [[(8, 3072)], [(8, 1536)], [(8, 768)]], {"8x3072", "8x768"}),
             (2048, 8, [[(64, 1024)], [(64, 768)], [(64, 512)], [(64, 256)],
                        [(16, 1024), (16, 512), (32, 256)], [(16, 512), (16, 256), (32, 128)]],
              {"64x1024", "16x1024+16x512+32x256"})]
    return [c for d, k, mixes, quick in table for sizes in mixes
            for c in _configs(f"widths-d{d}", T, d, k, sizes, ["relu2"], {(w, "relu2") for w in quick},
                              tag_activation=False, routing="balanced")]


def _tiny_set():
    # Sized for the Triton interpreter on a CPU (tests, CI); not a benchmark.
    return _configs("tiny", 32, 32, 2, [(2, 32), (2, 16)], ["relu2", "swiglu"],
                    quick={("2x32+2x16", "relu2")})


CONFIG_SETS = {"seed": _seed_set, "large": _large_set, "widths": _widths_set, "tiny": _tiny_set}


def configs(selection: str = "all", quick: bool = False, match: str | None = None) -> list[BenchConfig]:
    """The configs of ``"seed"``, ``"large"``, ``"all"`` (those two), ``"widths"`` or ``"tiny"``;
    only the quick subset if asked, and only names matching the regular expression ``match`` if
    given."""
    names = ["seed", "large"] if selection == "all" else [selection]
    out = [c for name in names for c in CONFIG_SETS[name]()]
    if match:
        out = [c for c in out if re.search(match, c.name)]
    return [c for c in out if c.quick] if quick else out


@dataclass
class Inputs:
    """One config's inputs, shared by every provider: x, routing, weights, and dy for the backward."""

    x: torch.Tensor
    ids: torch.Tensor
    w: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    dy: torch.Tensor
    dense: dict | None = None      # x [T k, d], w1, w2, dy for the dense provider
    dense_flops: float = 0.0


def make_inputs(cfg: BenchConfig, device, dtype, seed: int = 0, dense: bool = True) -> Inputs:
    """Seeded inputs: router logits -> top-k distinct experts (or, for ``cfg.routing ==
    "balanced"``, :func:`balanced_ids` and k random logits), softmax over the k chosen logits
    (weights summing to 1); w1 ~ N(0, 1/d) and expert e's rows of w2 ~ N(0, 1/f_e), so the output
    is O(1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    T, d, k, widths = cfg.T, cfg.d, cfg.k, cfg.widths
    g, F = gate_factor(cfg.activation), sum(widths)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    if cfg.routing == "balanced":
        ids, top = balanced_ids(T, k, cfg.E, gen, device), randn(T, k)
    else:
        top, ids = randn(T, cfg.E).topk(k, dim=-1)
    w = torch.softmax(top, dim=-1).to(dtype)
    x = randn(T, d).to(dtype)
    w1 = (randn(d, g * F) * d ** -0.5).to(dtype)
    row_scale = torch.repeat_interleave(torch.tensor(widths, dtype=torch.float32, device=device) ** -0.5,
                                        torch.tensor(widths, device=device))
    w2 = (randn(F, d) * row_scale[:, None]).to(dtype)
    dy = randn(T, d).to(dtype)
    inp = Inputs(x, ids, w, w1, w2, dy)
    if dense:
        baselines.add_dense_inputs(inp, cfg, ids, randn, dtype)
    return inp


def reference_outputs(cfg: BenchConfig, inp: Inputs, grads: bool) -> dict:
    """The float64 oracle: ``out`` and, if asked, the gradients for dy (keys x, w, w1, w2)."""
    leaves = {n: getattr(inp, n).detach().double().requires_grad_(grads) for n in ("x", "w", "w1", "w2")}
    with torch.set_grad_enabled(grads):
        out = reference.expert_mlp(leaves["x"], inp.ids, leaves["w"], leaves["w1"], leaves["w2"],
                                   cfg.widths, cfg.activation)
    ref = {"out": out.detach()}
    if grads:
        out.backward(inp.dy.double())
        ref.update({n: t.grad for n, t in leaves.items()})
    return ref


@dataclass
class LayerInputs:
    """One config's layer (in the bench dtype), its input and dy, and the top-k experts its router
    picks for x (the routing every layer-scope provider computes, and the oracle takes)."""

    moe: MoEMLP
    x: torch.Tensor
    dy: torch.Tensor
    ids: torch.Tensor
    flops: float                   # useful forward FLOPs: the experts' and the router's
    dense: dict | None = None
    dense_flops: float = 0.0       # the dense MLP's and the router's


def make_layer_inputs(cfg: BenchConfig, device, dtype, seed: int = 0, dense: bool = True) -> LayerInputs:
    """A seeded :class:`vmoe.MoEMLP` (softmax router, renormalised top-k, its own initialisation),
    x and dy ~ N(0, 1)."""
    if cfg.routing != "topk":
        raise ValueError(f"{cfg.name}: the layer's router picks its own experts; {cfg.routing} routing "
                         f"is measured at expert scope only")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        moe = MoEMLP(MoEConfig(n_embd=cfg.d, expert_sizes=list(cfg.expert_sizes), num_active_experts=cfg.k,
                               activation=cfg.activation, router="softmax", norm_topk_prob=True))
    moe = moe.to(device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    x, dy = randn(cfg.T, cfg.d).to(dtype), randn(cfg.T, cfg.d).to(dtype)
    with torch.no_grad():  # as MoEMLP.forward selects
        probs = router_probs(moe.router(x).float(), moe.config.router)
        ids = probs.topk(cfg.k, dim=-1).indices
    router = 2.0 * cfg.T * cfg.d * cfg.E
    flops = baselines.useful_flops(ids, cfg.widths, cfg.d, cfg.activation) + router
    inp = LayerInputs(moe, x, dy, ids, flops)
    if dense:
        baselines.add_dense_inputs(inp, cfg, ids, randn, dtype)
        inp.dense_flops += router
    return inp


def layer_reference_outputs(cfg: BenchConfig, inp: LayerInputs, grads: bool) -> dict:
    """The float64 oracle at layer scope (see the module docstring): ``out``, ``aux`` (the three
    losses, by name), ``f_i`` and, if asked, the gradients of x, router, w1, w2."""
    moe = copy.deepcopy(inp.moe).double()
    x = inp.x.detach().double().requires_grad_(grads)
    with torch.set_grad_enabled(grads):
        # MoEMLP.forward on the reference path, with its top-k taken from inp.ids.
        logits = moe.router(x)
        probs = router_probs(logits, moe.config.router)
        w = probs.gather(1, inp.ids)
        if moe.config.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        out = reference.expert_mlp(x, inp.ids, w, moe.w1, moe.w2, cfg.widths, cfg.activation)
        counts = torch.bincount(inp.ids.reshape(-1), minlength=cfg.E).double()
        # aux_losses computes in float32 whatever the layer's dtype (its widths buffer is cast).
        aux = moe.aux_losses(logits.float(), probs.float(), counts.float())
    ref = {"out": out.detach(), "aux": _stack(aux).detach(), "f_i": counts / (cfg.T * cfg.k)}
    if grads:
        ((out * inp.dy.double()).sum() + sum(aux.values())).backward()
        ref.update(x=x.grad, router=moe.router.weight.grad, w1=moe.w1.grad, w2=moe.w2.grad)
    return ref


def _stack(aux: dict) -> torch.Tensor:
    return torch.stack([aux[n] for n in sorted(aux)])


class _Case:
    """One provider on one config in one mode at expert scope: its leaves, a forward, the backward a
    training step runs on its output, and a zero-argument call to time."""

    def __init__(self, provider: str, cfg: BenchConfig, inp: Inputs, mode: str):
        grad = mode == "fwdbwd"
        self.mode, self.widths, self.activation = mode, cfg.widths, cfg.activation
        dense = baselines.base_provider(provider) == "dense"
        self.flops = (inp.dense_flops * (3 if grad else 1) if dense
                      else baselines.useful_flops(inp.ids, cfg.widths, cfg.d, cfg.activation, mode))
        self.leaves, self.forward, self.dy = baselines.expert_provider(provider, inp, grad, cfg.widths,
                                                                      cfg.activation)

    def backward(self, out):
        out.backward(self.dy)

    def checked(self, out) -> dict:
        """The forward's outputs that the check compares, by the oracle's names."""
        return {"out": out}

    def clear_grads(self):
        for t in self.leaves.values():
            t.grad = None

    def __call__(self):
        if self.mode == "fwd":
            with torch.no_grad():
                return self.forward()
        self.backward(self.forward())

    def grads(self) -> dict:
        """The gradients this provider produced, named and laid out as the reference's."""
        return baselines.provider_grads(self.leaves, self.widths, self.activation)

    def errors(self, ref: dict) -> dict:
        """Relative errors of the checked outputs and of every gradient this provider produced."""
        self.clear_grads()
        with torch.set_grad_enabled(self.mode == "fwdbwd"):
            out = self.forward()
        errs = {n: rel_err(t, ref[n]) for n, t in self.checked(out).items()}
        if self.mode == "fwdbwd":
            self.backward(out)
            errs.update({n: rel_err(g, ref[n]) for n, g in self.grads().items()})
        self.clear_grads()
        return errs


class _LayerCase(_Case):
    """One provider at layer scope: ``out, aux, f_i = layer(x)``; fwdbwd backpropagates
    ``(out * dy).sum() + sum(aux.values())``, as a training step does."""

    def __init__(self, provider: str, cfg: BenchConfig, inp: LayerInputs, mode: str):
        grad = mode == "fwdbwd"
        self.mode, self.widths, self.activation = mode, cfg.widths, cfg.activation
        x = inp.x.detach().requires_grad_(grad)
        self.leaves, self.forward = baselines.layer_provider(provider, inp.moe, x, inp.dense)
        dense = provider == "dense"
        self.dy = inp.dense["dy"] if dense else inp.dy
        self.flops = (inp.dense_flops if dense else inp.flops) * (3 if grad else 1)

    def backward(self, out):
        y, aux, _ = out
        ((y * self.dy).sum() + sum(aux.values())).backward()

    def checked(self, out) -> dict:
        y, aux, f_i = out
        return {"out": y, "aux": _stack(aux), "f_i": f_i}


class _GraphCase:
    """A case captured once in a CUDA graph and replayed: the launch-free time, and for vmoe proof
    that it needs no host synchronization (capture fails on one)."""

    def __init__(self, case: _Case, device):
        self.case, self.mode, self.flops = case, case.mode, case.flops
        self.leaves = {}  # replays rewrite the captured gradients; nothing to reset between them
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compile and autotune outside the capture
                case.clear_grads()
                case()
        torch.cuda.current_stream(device).wait_stream(side)
        case.clear_grads()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.set_grad_enabled(self.mode == "fwdbwd"):
            self.out = case.forward()
            if self.mode == "fwdbwd":
                case.backward(self.out)

    def __call__(self):
        self.graph.replay()

    def clear_grads(self):
        pass

    def errors(self, ref: dict) -> dict:
        """Relative errors of what a replay writes: the checked outputs and every captured gradient."""
        self.graph.replay()
        errs = {n: rel_err(t, ref[n]) for n, t in self.case.checked(self.out).items()}
        # Read after the replay: grads() may copy (grouped_mm lays its buckets back out as w1, w2).
        grads = self.case.grads() if self.mode == "fwdbwd" else {}
        errs.update({n: rel_err(g, ref[n]) for n, g in grads.items()})
        return errs


@dataclass
class Timing:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_reps: int = 5

    @classmethod
    def quick(cls):
        return cls(warmup_ms=5.0, rep_ms=20.0, cpu_reps=2)


def bench_quantiles(fn, grad_to_none, timing: Timing, do_bench=None) -> list[float]:
    """p50, p20, p80 in ms from ``triton.testing.do_bench``, whichever way this triton returns them."""
    if do_bench is None:
        from triton.testing import do_bench
    params = inspect.signature(do_bench).parameters
    kw = {"warmup": timing.warmup_ms, "rep": timing.rep_ms, "grad_to_none": grad_to_none}
    if "quantiles" in params:
        return [float(v) for v in do_bench(fn, quantiles=QUANTILES, **kw)]
    times = torch.tensor(do_bench(fn, return_mode="all", **kw), dtype=torch.float64)
    return [float(torch.quantile(times, q)) for q in QUANTILES]


def _time_case(case: _Case, device, timing: Timing) -> tuple[list[float], float, str]:
    """(p50/p20/p80 ms, peak MB above the inputs, timer name)."""
    if device.type == "cuda":
        case()
        torch.cuda.synchronize(device)  # host-ok: the timer, outside vmoe
        ms = bench_quantiles(case, list(case.leaves.values()), timing)
        case.clear_grads()
        torch.cuda.synchronize(device)  # host-ok: the timer, outside vmoe
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        case()
        torch.cuda.synchronize(device)  # host-ok: the timer, outside vmoe
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        case.clear_grads()
        return ms, peak, "do_bench"
    times = []
    for _ in range(max(1, timing.cpu_reps)):
        case.clear_grads()
        t0 = time.perf_counter()
        case()
        times.append((time.perf_counter() - t0) * 1e3)
    case.clear_grads()
    t = torch.tensor(times, dtype=torch.float64)
    timer = "perf_counter (cpu" + (", Triton interpreter)" if interpreting() else ")")
    return [float(torch.quantile(t, q)) for q in QUANTILES], float("nan"), timer


def _base_row(cfg: BenchConfig, provider: str, mode: str, env: dict, scope: str = "expert") -> dict:
    row = dict.fromkeys(report.COLUMNS, "")
    row.update(env)
    row.update(config=cfg.name, provider=provider, mode=mode, scope=scope, T=cfg.T, d=cfg.d, k=cfg.k,
               E=cfg.E, widths=cfg.widths_str, activation=cfg.activation, applicable=True)
    for c in ("ms_p50", "ms_p20", "ms_p80", "tflops", "rel_err", "peak_mem_mb"):
        row[c] = float("nan")
    return row


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def measure(cfg: BenchConfig, provider: str, mode: str, inp, ref: dict | None, device, dtype,
            timing: Timing, env: dict, log=print, scope: str = "expert") -> dict:
    """One CSV row: check against the float64 reference, then time. Errors become rows, not crashes.

    ``inp`` and ``ref`` come from :func:`make_inputs` and :func:`reference_outputs` at expert scope,
    from :func:`make_layer_inputs` and :func:`layer_reference_outputs` at layer scope.
    """
    row = _base_row(cfg, provider, mode, env, scope)
    ok_shape, why = baselines.applicability(provider, cfg, dtype)
    if not ok_shape:
        row.update(applicable=False, reason=why)
        return row
    try:
        case = (_Case if scope == "expert" else _LayerCase)(provider, cfg, inp, mode)
        if provider.endswith("_compiled"):
            try:
                case()  # compiles
            except Exception as exc:  # noqa: BLE001 (torch.compile raises anything; the row says what)
                row.update(applicable=False, reason=f"torch.compile raised {_first_line(exc)}")
                log(f"skipping {provider} on {cfg.name} {mode}: {row['reason']}")
                return row
        if provider.endswith("_graph"):
            case = _GraphCase(case, device)
        if baselines.base_provider(provider) == "dense":
            row["reason"] = "not checked: a stand-in with the same FLOPs, not the same function"
        else:
            errs = case.errors(ref)
            err = max(errs.values())
            if any(math.isnan(v) for v in errs.values()):
                err = float("nan")
            row["rel_err"] = err
            row["ok"] = err <= tolerance(dtype)
            if not row["ok"]:
                detail = ", ".join(f"{n} {v:.2e}" for n, v in errs.items())
                row["reason"] = f"rel err above {tolerance(dtype):g}: {detail}"
                log(f"CHECK FAILED {cfg.name} {provider} {mode} {scope}: {detail}")
        ms, peak, timer = _time_case(case, device, timing)
        row.update(ms_p50=ms[0], ms_p20=ms[1], ms_p80=ms[2], peak_mem_mb=peak, timer=timer,
                   tflops=case.flops / (ms[0] * 1e-3) / 1e12)
    except Exception as exc:  # noqa: BLE001 (one provider's failure must not lose the rest of the sweep)
        row.update(ok=False, reason=f"error: {_first_line(exc)}")
        log(f"ERROR {cfg.name} {provider} {mode} {scope}: {_first_line(exc)}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _scope_inputs(scope: str, cfg: BenchConfig, providers, modes, device, dtype, seed: int):
    """(inputs, float64 reference or None if only dense runs) of one config at one scope."""
    make, oracle = ((make_inputs, reference_outputs) if scope == "expert"
                    else (make_layer_inputs, layer_reference_outputs))
    dense = [baselines.base_provider(p) == "dense" for p in providers]
    inp = make(cfg, device, dtype, seed, dense=any(dense))
    checked = not all(dense)
    return inp, oracle(cfg, inp, grads="fwdbwd" in modes) if checked else None


def run_sweep(cfgs, providers, modes, device, dtype, timing: Timing, out=None, seed: int = 0,
              log=None, scopes=("expert",)) -> list[dict]:
    """Check and time every (config, scope, provider, mode); rows are written to ``out`` as they
    come. Each scope runs the requested providers it has (:data:`SCOPE_PROVIDERS`)."""
    device = torch.device(device)
    env = {**report.environment(device), "dtype": str(dtype)[6:]}
    plan = [(s, [p for p in providers if p in SCOPE_PROVIDERS[s]]) for s in scopes]
    bar, write = report.progress(len(cfgs) * len(modes) * sum(len(ps) for _, ps in plan))
    log = log or write
    rows = []
    try:
        for cfg in cfgs:
            for scope, scope_providers in plan:
                if not scope_providers:
                    continue
                inp, ref = _scope_inputs(scope, cfg, scope_providers, modes, device, dtype, seed)
                for provider in scope_providers:
                    for mode in modes:
                        if bar is not None:
                            bar.set_postfix_str(f"{cfg.name} {provider} {mode} {scope}")
                        row = measure(cfg, provider, mode, inp, ref, device, dtype, timing, env, log, scope)
                        rows.append(row)
                        if out is not None:
                            report.write_rows(out, rows)
                        log(report.summary(row))
                        if bar is not None:
                            bar.update()
                del inp, ref
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        if bar is not None:
            bar.close()
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m vmoe.bench",
                                     description="Check, then time, vmoe against the other providers.")
    parser.add_argument("--configs", choices=["seed", "large", "all", "widths", "tiny"], default="all",
                        help="seed: the original 8 configs; large: T=16384, d=2048, k=8; all: both; "
                             "widths: the balanced-routing width sweep (expert scope; by default "
                             "vmoe, grouped_mm and dense replayed from CUDA graphs) "
                             "(tiny: interpreter-sized, for tests)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS,
                        help="default: every provider of the scope(s) that can run here but the "
                             "replayed baselines (grouped_mm_graph, dense_graph); for --configs "
                             "widths: vmoe_graph grouped_mm_graph dense_graph")
    parser.add_argument("--scope", choices=["expert", "layer", "both"], default="expert",
                        help="expert: the expert computation alone; layer: the whole MoEMLP (router, "
                             "aux losses, experts) as a training step calls it; both")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="CSV path (default results/<gpu>.csv); rows with the same "
                                      "gpu/dtype/config/provider/mode/scope are replaced, others kept")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, a subset of configs")
    parser.add_argument("--match", help="only configs whose name matches this regular expression "
                                        "(to split a sweep over several runs into one CSV)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readme", help="rewrite the results block of this README with the CSV's summary")
    parser.add_argument("--tables", help="rewrite the results block of this file with the CSV's full tables")
    parser.add_argument("--from-csv", dest="from_csv", help="measure nothing: regenerate the tables "
                                                            "from this CSV")
    parser.add_argument("--reproduce", action="store_true",
                        help="measure nothing: rewrite the results blocks of README.md (the summary) "
                             "and results/README.md (the full tables) from results/*.csv")
    args = parser.parse_args(argv)

    if args.from_csv:
        report.regenerate([args.from_csv], args.readme, args.tables)
        return 0
    if args.reproduce:
        csvs = report.benchmark_csvs("results")
        if not csvs:
            print("no results/*.csv yet: run `python -m vmoe.bench` on a GPU first")
            return 0
        report.regenerate(csvs, args.readme or "README.md", args.tables or "results/README.md")
        return 0
    device = torch.device(args.device)
    if device.type == "cpu" and not interpreting():
        if not torch.cuda.is_available():
            print("no GPU: re-running under TRITON_INTERPRET=1 (the timings measure the interpreter)")
        reexec_with_interpreter("vmoe.bench", argv)
        parser.error("--device cpu on a machine with a GPU: set TRITON_INTERPRET=1 for this run (Triton "
                     "chooses the interpreter when vmoe is imported)")
    dtype = DTYPES[args.dtype]
    out = Path(args.out) if args.out else Path("results") / f"{gpu_slug(gpu_name(device))}.csv"
    cfgs = configs(args.configs, quick=args.quick, match=args.match)
    if not cfgs:
        parser.error(f"no config of {args.configs!r} matches {args.match!r}"
                     + (" in --quick" if args.quick else ""))
    scopes = SCOPES if args.scope == "both" else (args.scope,)
    if "layer" in scopes and any(c.routing != "topk" for c in cfgs):
        parser.error(f"--configs {args.configs} routes at expert scope only: the layer's router "
                     f"picks its own experts")
    defaults = SET_PROVIDERS.get(args.configs, DEFAULT_PROVIDERS)
    requested = [p for p in args.providers or defaults if any(p in SCOPE_PROVIDERS[s] for s in scopes)]
    for p in sorted(set(args.providers or ()) - set(requested)):
        print(f"skipping {p}: not measured at {args.scope} scope")
    providers = baselines.available_providers(requested, device, dtype)
    timing = Timing.quick() if args.quick else Timing()
    print(f"device {gpu_name(device)}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.dtype}; {len(cfgs)} configs x {scopes} x {providers} x {args.modes} -> {out}")
    rows = run_sweep(cfgs, providers, args.modes, device, dtype, timing, out=out, seed=args.seed,
                     scopes=scopes)
    bad = [r for r in rows if r["ok"] is False]
    print(f"{len(rows)} rows written to {out}; {len(bad)} failed the check or raised")
    if args.readme or args.tables:
        report.regenerate([out], args.readme, args.tables)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
