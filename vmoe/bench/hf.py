"""transformers' experts backends in a transformers model: vmoe against grouped_mm, batched_mm and
eager, each as is and under torch.compile, one CSV per GPU.

Run as ``python -m vmoe.bench.hf --out results/hf/<gpu>.csv`` (``--help`` for the options);
``--smoke`` runs every provider once at tiny sizes, as the tests do (without a GPU, on the CPU in
the Triton interpreter). notebooks/10_hf.ipynb reads the CSVs back. Shape letters: see :mod:`vmoe.config`.

Two scopes (a row's ``scope``), on random-init Qwen3-MoE modules in the bench dtype (bf16):
    hf_layer  one ``Qwen3MoeDecoderLayer`` (RMSNorm, sdpa causal attention, the sparse MoE block:
              router, top-k, experts), batch x sequence = T tokens; modes ``fwd`` and ``fwdbwd``
              (the backward of ``(out * dy).sum()``, with the gradients of the input and every
              parameter).
    hf_train  a training step of a small Qwen3-MoE causal LM of ``--layers`` such layers: forward,
              the LM loss, backward and an AdamW step; mode ``step``.
Providers are experts implementations (``model.set_experts_implementation``); a ``_compiled``
suffix times ``torch.compile`` of the layer or of the model (default mode, not fullgraph: the
eager and batched_mm loops break graphs). Shapes (``--shapes``):
    qwen3-30b-a3b  Qwen3-30B-A3B's layer: T=16384 (4 x 4096), d=2048, 128 experts of 768, top-8,
                   32 query heads and 4 key-value heads of 128.
    small          T=2048 (2 x 1024), d=512, 64 experts of 256, top-8, 8 and 2 heads of 64.
batched_mm gathers every assignment's expert weights (T*k copies of ``[3I, d]``); where that
would not fit in the GPU's free memory (:func:`batched_mm_gap`) the row says so instead of
running out of memory.

Each row is checked before it is timed: ``rel_err`` is the relative error
(:func:`vmoe.testing.rel_err`) of the layer's output (and, for fwdbwd, of the input gradient),
or of the step's loss, against the ``eager`` provider run eagerly on the same weights and
inputs; ``ok`` is ``rel_err <= tolerance(dtype)``. The backends share the router, so they route
alike; a compiled router may round a near-tie differently, which shows as a larger error.
``tflops``: the layer's matmul FLOPs per second: the experts' ``2 * 3 d I`` per assignment
(x3 for forward+backward), the router's ``2 d E`` per token, the attention projections and the
causal attention scores; the step adds the LM head's ``2 d V`` per token. ``peak_mem_mb``:
the peak allocated during one call, above what was allocated before it (CUDA only).
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from vmoe.bench import report
from vmoe.bench.harness import QUANTILES, Timing, bench_quantiles
from vmoe.ops.utils.device import interpreting, reexec_with_interpreter
from vmoe.testing import rel_err, tolerance

SCOPES = ("hf_layer", "hf_train")
IMPLEMENTATIONS = ("vmoe", "grouped_mm", "batched_mm", "eager")
PROVIDERS = IMPLEMENTATIONS + tuple(f"{p}_compiled" for p in IMPLEMENTATIONS)
LAYER_MODES = ("fwd", "fwdbwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq: int
    d: int
    E: int
    f: int          # every expert's width (transformers' moe_intermediate_size)
    k: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 32768

    @property
    def T(self) -> int:
        return self.batch * self.seq

    def config(self, layers: int = 1):
        from transformers import Qwen3MoeConfig

        config = Qwen3MoeConfig(
            vocab_size=self.vocab, hidden_size=self.d, num_hidden_layers=layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim, intermediate_size=4 * self.d, moe_intermediate_size=self.f,
            num_experts=self.E, num_experts_per_tok=self.k, norm_topk_prob=True,
            max_position_embeddings=max(self.seq, 128))
        config._attn_implementation = "sdpa"
        return config

    def layer_flops(self, mode: str) -> float:
        """One decoder layer's matmul FLOPs (see the module docstring)."""
        T, d = self.T, self.d
        experts = 2 * 3 * d * self.f * T * self.k
        router = 2 * d * self.E * T
        proj = 2 * T * d * (2 * self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim)
        scores = 2 * 2 * T * self.seq * self.heads * self.head_dim / 2  # causal: half of QK^T, PV
        return (experts + router + proj + scores) * (3 if mode != "fwd" else 1)

    def step_flops(self, layers: int) -> float:
        return layers * self.layer_flops("step") + 3 * 2 * self.T * self.d * self.vocab


SHAPES = {
    "qwen3-30b-a3b": Shape("qwen3-30b-a3b", batch=4, seq=4096, d=2048, E=128, f=768, k=8,
                           heads=32, kv_heads=4, head_dim=128, vocab=32768),
    "small": Shape("small", batch=2, seq=1024, d=512, E=64, f=256, k=8, heads=8, kv_heads=2,
                   head_dim=64, vocab=32768),
}
SMOKE = Shape("smoke", batch=2, seq=8, d=32, E=4, f=16, k=2, heads=4, kv_heads=2, head_dim=8,
              vocab=64)


def _base_row(shape: Shape, provider: str, mode: str, scope: str, env: dict, dtype) -> dict:
    row = dict.fromkeys(report.COLUMNS, "")
    row.update(env)
    row.update(config=f"{shape.name}-T{shape.T}", provider=provider, mode=mode, scope=scope,
               T=shape.T, d=shape.d, k=shape.k, E=shape.E, widths=f"{shape.E}x{shape.f}",
               activation="swiglu", dtype=str(dtype).replace("torch.", ""), applicable=True)
    for c in ("ms_p50", "ms_p20", "ms_p80", "tflops", "rel_err", "peak_mem_mb"):
        row[c] = float("nan")
    return row


def batched_mm_gap(shape: Shape, dtype, device, layers: int = 1) -> str:
    """Why batched_mm cannot run this shape here ("" if it can): each layer gathers T*k copies
    of an expert's ``[3I, d]`` weights forward, and as many weight gradients backward; more than
    half the free memory is taken as out of reach (the products and the rest of the model need
    room too)."""
    if device.type != "cuda":
        return ""
    need = layers * 2 * shape.T * shape.k * 3 * shape.f * shape.d * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.5 * free:
        return (f"batched_mm would gather {need / 2**30:.0f} GiB of expert weights (T*k copies "
                f"a layer, and their gradients), more than half the {free / 2**30:.0f} GiB free")
    return ""


class _Case:
    """One provider's callable and what it is checked and timed on."""

    def __init__(self, fn, leaves, outputs):
        self.fn, self.leaves, self.outputs = fn, leaves, outputs

    def __call__(self):
        return self.fn()


def _layer_case(shape: Shape, layer, provider: str, mode: str, hidden, pe, dy) -> _Case:
    impl, compiled = provider.removesuffix("_compiled"), provider.endswith("_compiled")
    layer = copy.deepcopy(layer)
    layer.mlp.experts.config._experts_implementation = impl
    call = torch.compile(layer) if compiled else layer
    x = hidden.detach().clone().requires_grad_(mode == "fwdbwd")
    leaves = [x, *layer.parameters()] if mode == "fwdbwd" else []

    def fwd():
        with torch.no_grad():
            return call(x, position_embeddings=pe)

    def fwdbwd():
        out = call(x, position_embeddings=pe)
        out.backward(dy)
        return out

    def outputs():
        out = fwd() if mode == "fwd" else fwdbwd()
        result = {"out": out.detach().float()}
        if mode == "fwdbwd":
            result["dx"] = x.grad.detach().float()
            for t in leaves:
                t.grad = None
        return result

    return _Case(fwd if mode == "fwd" else fwdbwd, leaves, outputs)


def _train_case(model, provider: str, ids) -> _Case:
    impl, compiled = provider.removesuffix("_compiled"), provider.endswith("_compiled")
    model = copy.deepcopy(model)
    model.set_experts_implementation(impl)
    call = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = call(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def outputs():
        # The first step's loss, from the shared initial weights; the weights then move on.
        return {"loss": step().detach().float().reshape(1)}

    return _Case(step, [], outputs)


def _time(case: _Case, device, timing: Timing) -> tuple[list[float], float, str]:
    """(p50/p20/p80 ms, peak MB above what was allocated before the call, timer name)."""
    import time

    if device.type == "cuda":
        case()
        torch.cuda.synchronize(device)  # host-ok: the timer, outside vmoe
        ms = bench_quantiles(case, case.leaves, timing)
        torch.cuda.synchronize(device)  # host-ok: the timer, outside vmoe
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        case()
        torch.cuda.synchronize(device)  # host-ok: the timer, outside vmoe
        return ms, (torch.cuda.max_memory_allocated(device) - base) / 2**20, "do_bench"
    times = []
    for _ in range(max(1, timing.cpu_reps)):
        t0 = time.perf_counter()
        case()
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times, dtype=torch.float64)
    timer = "perf_counter (cpu" + (", Triton interpreter)" if interpreting() else ")")
    return [float(torch.quantile(t, q)) for q in QUANTILES], float("nan"), timer


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _measure(row: dict, make, reference: dict | None, flops: float, device, dtype, timing: Timing,
             log) -> tuple[dict, dict | None]:
    """Check, then time, one provider; an error becomes the row's reason. Returns the row and the
    provider's outputs (the reference, when this is the eager provider)."""
    outputs = None
    try:
        case = make()
        outputs = case.outputs()  # (compiles, for the _compiled providers)
        if reference is not None:
            errs = {n: rel_err(outputs[n], reference[n]) for n in reference}
            err = max(errs.values())
            row["rel_err"] = err
            row["ok"] = err <= tolerance(dtype)
            if not row["ok"]:
                row["reason"] = f"rel err above {tolerance(dtype):g}: " + ", ".join(
                    f"{n} {v:.2e}" for n, v in errs.items())
        ms, peak, timer = _time(case, device, timing)
        row.update(ms_p50=ms[0], ms_p20=ms[1], ms_p80=ms[2], peak_mem_mb=peak, timer=timer,
                   tflops=flops / (ms[0] * 1e-3) / 1e12)
    except Exception as exc:  # noqa: BLE001 (one provider's failure must not lose the sweep)
        row.update(ok=False, reason=f"error: {_first_line(exc)}")
    log(report.summary(row))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, outputs


def run(shapes, providers, scopes, layer_modes, layers: int, device, dtype, timing: Timing,
        out: Path, seed: int = 0, log=print) -> list[dict]:
    """Every (shape, scope, mode, provider) row, the eager provider first (the reference),
    written to ``out`` after each shape."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import (
        Qwen3MoeDecoderLayer,
        Qwen3MoeForCausalLM,
        Qwen3MoeRotaryEmbedding,
    )

    import vmoe.hf  # noqa: F401  (registers "vmoe")

    env = report.environment(device)
    ordered = ["eager"] + [p for p in providers if p != "eager"]
    rows = []
    for shape in shapes:
        shape_rows = []
        if "hf_layer" in scopes:
            torch.manual_seed(seed)
            config = shape.config()
            layer = Qwen3MoeDecoderLayer(config, layer_idx=0).to(device, dtype)
            for p in layer.parameters():  # transformers' init: N(0, 0.02), RMSNorm weights 1
                if p.dim() > 1:
                    torch.nn.init.normal_(p, std=0.02)
            gen = torch.Generator(device="cpu").manual_seed(seed)
            hidden = torch.randn(shape.batch, shape.seq, shape.d, generator=gen).to(device, dtype)
            dy = torch.randn(hidden.shape, generator=gen).to(device, dtype)
            positions = torch.arange(shape.seq, device=device)[None].expand(shape.batch, -1)
            pe = Qwen3MoeRotaryEmbedding(config).to(device)(hidden, positions)
            gap = batched_mm_gap(shape, dtype, device)
            for mode in layer_modes:
                reference = None
                for provider in ordered:
                    row = _base_row(shape, provider, mode, "hf_layer", env, dtype)
                    if provider.startswith("batched_mm") and gap:
                        row.update(applicable=False, reason=gap)
                        shape_rows.append(row)
                        log(report.summary(row))
                        continue
                    row, outputs = _measure(
                        row, lambda: _layer_case(shape, layer, provider, mode, hidden, pe, dy),
                        reference, shape.layer_flops(mode), device, dtype, timing, log)
                    if provider == "eager":
                        reference = outputs
                    shape_rows.append(row)
                    torch._dynamo.reset()
            del layer
        if "hf_train" in scopes:
            torch.manual_seed(seed)
            model = Qwen3MoeForCausalLM(shape.config(layers)).to(device, dtype)
            gen = torch.Generator(device="cpu").manual_seed(seed)
            ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(device)
            gap = batched_mm_gap(shape, dtype, device, layers)
            reference = None
            for provider in ordered:
                row = _base_row(shape, provider, "step", "hf_train", env, dtype)
                row["config"] += f"-L{layers}"
                if provider.startswith("batched_mm") and gap:
                    row.update(applicable=False, reason=gap)
                    shape_rows.append(row)
                    log(report.summary(row))
                    continue
                row, outputs = _measure(row, lambda: _train_case(model, provider, ids), reference,
                                        shape.step_flops(layers), device, dtype, timing, log)
                if provider == "eager":
                    reference = outputs
                shape_rows.append(row)
                torch._dynamo.reset()
            del model
        report.write_rows(out, shape_rows)
        rows += shape_rows
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m vmoe.bench.hf", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="CSV path (default results/hf/<gpu>.csv); rows with the same "
                                      "gpu/dtype/config/provider/mode/scope are replaced")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    parser.add_argument("--modes", nargs="+", choices=LAYER_MODES, default=list(LAYER_MODES),
                        help="the hf_layer modes (hf_train times a whole step)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the hf_train model")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, fp32, the providers without torch.compile (without a GPU, on "
                             "the CPU in the Triton interpreter): checks that every path runs")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not interpreting():
        reexec_with_interpreter("vmoe.bench.hf", argv)
        parser.error("the CPU run needs TRITON_INTERPRET=1 before vmoe is imported")
    shapes = [SHAPES[s] for s in args.shapes]
    providers, dtype, timing = args.providers, DTYPES[args.dtype], Timing.quick() if args.quick \
        else Timing()
    if args.smoke:
        shapes, dtype, timing = [SMOKE], torch.float32, Timing(cpu_reps=1)
        providers = [p for p in providers if not p.endswith("_compiled")]
    out = Path(args.out) if args.out else \
        Path("results") / "hf" / f"{report.gpu_slug(report.gpu_name(device))}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"device {report.gpu_name(device)}, torch {torch.__version__}, triton "
          f"{triton.__version__}, {dtype}; {[s.name for s in shapes]} x {args.scopes} x "
          f"{providers} -> {out}")
    rows = run(shapes, providers, args.scopes, args.modes, args.layers, device, dtype, timing, out,
               seed=args.seed)
    bad = [r for r in rows if r["ok"] is False]
    print(f"{len(rows)} rows written to {out}; {len(bad)} failed the check or raised")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
