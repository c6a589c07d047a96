"""Benchmark harness: vmoe against the other ways of computing a variable-width MoE, one CSV per GPU.

Run as ``python -m vmoe.bench`` (``--help`` for the options); ``notebooks/07_benchmarks.ipynb`` and the
README's results table read what it writes, through :func:`load_results`, :func:`speedup_table` and
:func:`markdown_table`. Shape letters: see :mod:`vmoe.config`.

Providers, all fed the same x, routing and weights:
    vmoe        :func:`vmoe.expert_mlp`, routing metadata (build_routing) included.
    naive       :func:`vmoe.reference.expert_mlp`, the per-expert Python loop, in the bench dtype.
    stk         the block-sparse baseline of the original work (MegaBlocks' dMoE, rebuilt): tokens
                sorted and padded to 128 rows per expert, the variable-width block-sparse topology
                built every call, ``stk.ops.sdd(x, w1) -> act -> stk.ops.dsd(h, w2)``, un-permuted
                and weighted. Torch ops do the routing (MegaBlocks' CUDA extension does not build on
                CUDA 13). Needs d and every f_e to be multiples of 128. Optional (``pip install
                .[bench]``).
    grouped_mm  ``torch._grouped_mm``: tokens sorted by expert, one grouped GEMM per group of
                equal-width experts for each projection, weighted sum back to tokens. It keeps its
                weights as one [n, d, g f] / [n, f, d] pair per width (copied from w1, w2 once).
                Needs 16-byte aligned strides (d and f_e multiples of 8 in bf16).
    dense       the ceiling: one balanced ``[T k, d] x [d, f_bar]`` MLP with the same useful FLOPs
                (f_bar = sum_e n_e f_e / (T k), rounded to a multiple of 8) and no routing at all.

Useful FLOPs, from the routing actually used (n_e assignments to expert e): the forward does two
GEMMs of ``2 n_e f_e d`` each, so ``4 d sum_e n_e f_e``; swiglu's up projection is twice as wide,
so 1.5 times that; forward+backward counts 3 times the forward. Padding (stk) and recomputation are
not useful work and are not counted.

Every provider's output (and, for fwdbwd, its gradients of x, topk_weights, w1 and w2) is compared
with the float64 reference before it is timed. ``rel_err`` is the largest ``||out - ref|| / ||ref||``
over those tensors (:func:`vmoe.testing.rel_err`; NaN if any output is not finite); a provider above
:func:`vmoe.testing.tolerance` for the dtype keeps its row with ``ok=False``.
Providers that cannot run a config get a row with ``applicable=False`` and the reason.
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from . import reference
from ._utils import interpreting, reexec_with_interpreter
from .baselines import (EXPERT_FNS, applicability, available_providers, dense_mlp, from_buckets,
                        grouped_mm_moe, to_buckets)
from .config import gate_factor
from .report import (COLUMNS, README_END, README_START, load_results, markdown_table,  # noqa: F401
                     regenerate, rewrite_readme, speedup_table, write_rows)
from .testing import rel_err, tolerance

PROVIDERS = ("vmoe", "vmoe_graph", "naive", "stk", "grouped_mm", "dense")
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

    @property
    def widths(self) -> tuple:
        return tuple(w for count, w in self.expert_sizes for _ in range(count))

    @property
    def E(self) -> int:
        return sum(count for count, _ in self.expert_sizes)

    @property
    def widths_str(self) -> str:
        return "+".join(f"{count}x{w}" for count, w in self.expert_sizes)


def _configs(prefix, T, d, k, sizes, activations, quick=(), tag_activation=True):
    out = []
    for act in activations:
        wstr = "+".join(f"{c}x{w}" for c, w in sizes)
        name = f"{prefix}-{wstr}-k{k}" + (f"-{act}" if tag_activation else "")
        out.append(BenchConfig(name, T, d, k, tuple(sizes), act, quick=(wstr, act) in quick))
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
    # Today's sizes: Qwen3-30B-A3B-like (128 x 768), OLMoE-like (64 x 1024), and variable-width
    # mixes of the same total width.
    T, d, k = 16384, 2048, 8
    table = [[(128, 768)], [(32, 1536), (32, 768), (64, 384)], [(64, 1024)],
             [(16, 2048), (16, 1024), (32, 512)]]
    quick = {("128x768", "relu2"), ("32x1536+32x768+64x384", "swiglu")}
    return [c for sizes in table for c in _configs("large", T, d, k, sizes, ["relu2", "swiglu"], quick)]


def _tiny_set():
    # Sized for the Triton interpreter on a CPU (tests, CI); not a benchmark.
    return _configs("tiny", 32, 32, 2, [(2, 32), (2, 16)], ["relu2", "swiglu"],
                    quick={("2x32+2x16", "relu2")})


CONFIG_SETS = {"seed": _seed_set, "large": _large_set, "tiny": _tiny_set}


def configs(selection: str = "all", quick: bool = False, match: str | None = None) -> list[BenchConfig]:
    """The configs of ``"seed"``, ``"large"``, ``"all"`` (both) or ``"tiny"``; only the quick subset
    if asked, and only names matching the regular expression ``match`` if given."""
    names = ["seed", "large"] if selection == "all" else [selection]
    out = [c for name in names for c in CONFIG_SETS[name]()]
    if match:
        out = [c for c in out if re.search(match, c.name)]
    return [c for c in out if c.quick] if quick else out


def _mlp_flops(sum_nf: float, d: int, activation: str, mode: str) -> float:
    flops = 4.0 * sum_nf * d * (1.5 if activation == "swiglu" else 1.0)
    return flops * (3.0 if mode == "fwdbwd" else 1.0)


def _sum_nf(topk_ids: torch.Tensor, widths) -> float:
    """sum_e n_e f_e for this routing, on the host (for the report, outside any timed region)."""
    ids = topk_ids.reshape(-1).long().cpu()  # host-ok: FLOP counting, not timed
    counts = torch.bincount(ids, minlength=len(widths))[:len(widths)]
    return float((counts.double() * torch.tensor(widths, dtype=torch.float64)).sum())


def useful_flops(topk_ids: torch.Tensor, widths, d: int, activation: str, mode: str = "fwd") -> float:
    """Useful FLOPs of one call for this routing: ``4 d sum_e n_e f_e`` for the forward (x1.5 for
    swiglu), x3 for forward+backward."""
    return _mlp_flops(_sum_nf(topk_ids, widths), d, activation, mode)


def dense_width(topk_ids: torch.Tensor, widths) -> int:
    """f_bar: the width of a balanced dense MLP over T k rows doing the same useful work, a multiple of 8."""
    T, k = topk_ids.shape
    mean = _sum_nf(topk_ids, widths) / (T * k)
    return max(8, 8 * round(mean / 8))



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
    """Seeded inputs: router logits -> top-k distinct experts, softmax over the k chosen logits
    (weights summing to 1); w1 ~ N(0, 1/d) and expert e's rows of w2 ~ N(0, 1/f_e), so the output
    is O(1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    T, d, k, widths = cfg.T, cfg.d, cfg.k, cfg.widths
    g, F = gate_factor(cfg.activation), sum(widths)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    logits = randn(T, cfg.E)
    top, ids = logits.topk(k, dim=-1)
    w = torch.softmax(top, dim=-1).to(dtype)
    x = randn(T, d).to(dtype)
    w1 = (randn(d, g * F) * d ** -0.5).to(dtype)
    row_scale = torch.repeat_interleave(torch.tensor(widths, dtype=torch.float32, device=device) ** -0.5,
                                        torch.tensor(widths, device=device))
    w2 = (randn(F, d) * row_scale[:, None]).to(dtype)
    dy = randn(T, d).to(dtype)
    inp = Inputs(x, ids, w, w1, w2, dy)
    if dense:
        fbar = dense_width(ids, widths)
        inp.dense = {"x": randn(T * k, d).to(dtype), "w1": (randn(d, g * fbar) * d ** -0.5).to(dtype),
                     "w2": (randn(fbar, d) * fbar ** -0.5).to(dtype), "dy": randn(T * k, d).to(dtype)}
        inp.dense_flops = _mlp_flops(float(T * k * fbar), d, cfg.activation, "fwd")
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


class _Case:
    """One provider on one config in one mode: its leaves, and a zero-argument call to time."""

    def __init__(self, provider: str, cfg: BenchConfig, inp: Inputs, mode: str):
        grad = mode == "fwdbwd"
        self.mode, self.provider, self.cfg = mode, provider, cfg

        def leaf(t):
            return t.detach().requires_grad_(grad)

        ids, widths, act = inp.ids, cfg.widths, cfg.activation
        self.dy = inp.dy
        self.flops = useful_flops(inp.ids, cfg.widths, cfg.d, cfg.activation, mode)
        if provider == "dense":
            src = inp.dense
            lv = self.leaves = {n: leaf(src[n]) for n in ("x", "w1", "w2")}
            self.dy = src["dy"]
            self.forward = lambda: dense_mlp(lv["x"], lv["w1"], lv["w2"], act)
            self.flops = inp.dense_flops * (3 if grad else 1)
        elif provider == "grouped_mm":
            buckets = to_buckets(inp.w1, inp.w2, widths, act)
            lv = self.leaves = {"x": leaf(inp.x), "w": leaf(inp.w)}
            for i, (b1, b2) in enumerate(buckets):
                lv[f"b1_{i}"], lv[f"b2_{i}"] = leaf(b1), leaf(b2)
            b1s = [lv[f"b1_{i}"] for i in range(len(buckets))]
            b2s = [lv[f"b2_{i}"] for i in range(len(buckets))]
            self.forward = lambda: grouped_mm_moe(lv["x"], ids, lv["w"], b1s, b2s, widths, act)
        else:
            lv = self.leaves = {n: leaf(getattr(inp, n)) for n in ("x", "w", "w1", "w2")}
            fn = EXPERT_FNS[provider]
            self.forward = lambda: fn(lv["x"], ids, lv["w"], lv["w1"], lv["w2"], widths, act)

    def clear_grads(self):
        for t in self.leaves.values():
            t.grad = None

    def __call__(self):
        if self.mode == "fwd":
            with torch.no_grad():
                return self.forward()
        self.forward().backward(self.dy)

    def grads(self) -> dict:
        """The gradients this provider produced, named and laid out as the reference's."""
        out = {n: t.grad for n, t in self.leaves.items() if t.grad is not None and n[:2] not in ("b1", "b2")}
        if self.provider == "grouped_mm":
            n = sum(1 for name in self.leaves if name.startswith("b1_"))
            # A bucket that no token reached takes no part in the graph: its gradient is zero.
            b1s, b2s = ([self.leaves[f"{b}_{i}"].grad if self.leaves[f"{b}_{i}"].grad is not None
                         else torch.zeros_like(self.leaves[f"{b}_{i}"]) for i in range(n)]
                        for b in ("b1", "b2"))
            out["w1"], out["w2"] = from_buckets(b1s, b2s, self.cfg.widths, self.cfg.activation)
        return out

    def errors(self, ref: dict) -> dict:
        """Relative errors of the output and of every gradient this provider produced."""
        self.clear_grads()
        with torch.set_grad_enabled(self.mode == "fwdbwd"):
            out = self.forward()
        errs = {"out": rel_err(out, ref["out"])}
        if self.mode == "fwdbwd":
            out.backward(self.dy)
            errs.update({n: rel_err(g, ref[n]) for n, g in self.grads().items()})
        self.clear_grads()
        return errs


class _GraphCase:
    """The vmoe case captured once in a CUDA graph and replayed: the launch-free time, and proof
    that the layer needs no host synchronization (capture fails on one)."""

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
        with torch.cuda.graph(self.graph):
            with torch.set_grad_enabled(self.mode == "fwdbwd"):
                self.out = case.forward()
                if self.mode == "fwdbwd":
                    self.out.backward(case.dy)
        self.grads = case.grads() if self.mode == "fwdbwd" else {}

    def __call__(self):
        self.graph.replay()

    def clear_grads(self):
        pass

    def errors(self, ref: dict) -> dict:
        """Relative errors of what a replay writes: the output and every captured gradient."""
        self.graph.replay()
        errs = {"out": rel_err(self.out, ref["out"])}
        errs.update({n: rel_err(g, ref[n]) for n, g in self.grads.items()})
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


def gpu_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def gpu_slug(name: str) -> str:
    """A short file name for a device: "NVIDIA H100 80GB HBM3" -> "h100", "cpu" -> "cpu"."""
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name.replace("NVIDIA", ""))
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def vmoe_commit() -> str:
    """``git rev-parse --short HEAD``, with "+dirty" when vmoe/ has uncommitted changes; else "unknown"."""
    if os.environ.get("VMOE_COMMIT"):  # a copy of the tree without its .git names its commit here
        return os.environ["VMOE_COMMIT"]
    here = Path(__file__).resolve().parent

    def git(*args):
        res = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        return res.stdout.strip() if res.returncode == 0 else None

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _base_row(cfg: BenchConfig, provider: str, mode: str, env: dict) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(env)
    row.update(config=cfg.name, provider=provider, mode=mode, T=cfg.T, d=cfg.d, k=cfg.k, E=cfg.E,
               widths=cfg.widths_str, activation=cfg.activation, applicable=True)
    for c in ("ms_p50", "ms_p20", "ms_p80", "tflops", "rel_err", "peak_mem_mb"):
        row[c] = float("nan")
    return row


def measure(cfg: BenchConfig, provider: str, mode: str, inp: Inputs, ref: dict | None, device,
            dtype, timing: Timing, env: dict, log=print) -> dict:
    """One CSV row: check against the float64 reference, then time. Errors become rows, not crashes."""
    row = _base_row(cfg, provider, mode, env)
    ok_shape, why = applicability(provider, cfg, dtype)
    if not ok_shape:
        row.update(applicable=False, reason=why)
        return row
    try:
        case = _Case(provider, cfg, inp, mode)
        if provider == "vmoe_graph":
            case = _GraphCase(case, device)
        if provider == "dense":
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
                log(f"CHECK FAILED {cfg.name} {provider} {mode}: {detail}")
        ms, peak, timer = _time_case(case, device, timing)
        row.update(ms_p50=ms[0], ms_p20=ms[1], ms_p80=ms[2], peak_mem_mb=peak, timer=timer,
                   tflops=case.flops / (ms[0] * 1e-3) / 1e12)
    except Exception as exc:  # one provider's failure must not lose the rest of the sweep
        msg = str(exc).splitlines()[0][:300] if str(exc) else ""
        row.update(ok=False, reason=f"error: {type(exc).__name__}: {msg}")
        log(f"ERROR {cfg.name} {provider} {mode}: {type(exc).__name__}: {msg}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _progress(total: int):
    disable = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes", "on")
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None, print
    bar = tqdm(total=total, desc="vmoe.bench", unit="run", disable=disable, dynamic_ncols=True)
    return bar, bar.write


def run_sweep(cfgs, providers, modes, device, dtype, timing: Timing, out=None, seed: int = 0,
              log=None) -> list[dict]:
    """Check and time every (config, provider, mode); rows are written to ``out`` as they come."""
    device = torch.device(device)
    env = {"gpu": gpu_name(device), "torch": torch.__version__, "triton": triton.__version__,
           "vmoe_commit": vmoe_commit(), "dtype": str(dtype)[6:]}
    bar, write = _progress(len(cfgs) * len(providers) * len(modes))
    log = log or write
    rows = []
    try:
        for cfg in cfgs:
            inp = make_inputs(cfg, device, dtype, seed, dense="dense" in providers)
            ref = None
            if any(p != "dense" for p in providers):
                ref = reference_outputs(cfg, inp, grads="fwdbwd" in modes)
            for provider in providers:
                for mode in modes:
                    if bar is not None:
                        bar.set_postfix_str(f"{cfg.name} {provider} {mode}")
                    row = measure(cfg, provider, mode, inp, ref, device, dtype, timing, env, log)
                    rows.append(row)
                    if out is not None:
                        write_rows(out, rows)
                    log(_summary(row))
                    if bar is not None:
                        bar.update()
            del inp, ref
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if bar is not None:
            bar.close()
    return rows


def _summary(row: dict) -> str:
    head = f"{row['config']:<40} {row['provider']:<10} {row['mode']:<6}"
    if row["applicable"] is False:
        return f"{head} n/a: {row['reason']}"
    if row["reason"].startswith("error"):
        return f"{head} {row['reason']}"
    ok = {True: "ok", False: "FAIL", "": "-"}[row["ok"]]
    return (f"{head} {row['ms_p50']:9.4f} ms {row['tflops']:8.2f} TFLOP/s  rel_err "
            f"{row['rel_err']:.1e} {ok}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m vmoe.bench",
                                     description="Check, then time, vmoe against the other providers.")
    parser.add_argument("--configs", choices=["seed", "large", "all", "tiny"], default="all",
                        help="seed: the original 8 configs; large: today's sizes; all: both "
                             "(tiny: interpreter-sized, for tests)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                        help="default: every provider that can run here")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="CSV path (default results/<gpu>.csv); rows with the same "
                                      "gpu/dtype/config/provider/mode are replaced, others kept")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, a subset of configs")
    parser.add_argument("--match", help="only configs whose name matches this regular expression "
                                        "(to split a sweep over several runs into one CSV)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readme", help="rewrite the results block of this README from the CSV")
    parser.add_argument("--from-csv", dest="from_csv", help="measure nothing: regenerate the tables "
                                                            "from this CSV")
    parser.add_argument("--reproduce", action="store_true",
                        help="measure nothing: rewrite README.md's results block from results/*.csv")
    args = parser.parse_args(argv)

    if args.from_csv:
        regenerate([args.from_csv], args.readme)
        return 0
    if args.reproduce:
        csvs = sorted(Path("results").glob("*.csv"))
        if not csvs:
            print("no results/*.csv yet: run `python -m vmoe.bench` on a GPU first")
            return 0
        regenerate(csvs, args.readme or "README.md")
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
    providers = available_providers(args.providers, device, dtype)
    timing = Timing.quick() if args.quick else Timing()
    print(f"device {gpu_name(device)}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.dtype}; {len(cfgs)} configs x {providers} x {args.modes} -> {out}")
    rows = run_sweep(cfgs, providers, args.modes, device, dtype, timing, out=out, seed=args.seed)
    bad = [r for r in rows if r["ok"] is False]
    print(f"{len(rows)} rows written to {out}; {len(bad)} failed the check or raised")
    if args.readme:
        regenerate([out], args.readme)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
