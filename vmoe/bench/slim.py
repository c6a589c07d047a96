"""The slimming study: train a uniform MoE GPT, slim it to variable widths, compare.

    VMOE_PIN_CONFIG=1 python -m vmoe.bench.slim --data data    # one GPU; prints time estimates
    python -m vmoe.bench.slim --smoke                                  # CPU, tiny, < 1 min

Per seed, with :mod:`vmoe.train`'s model, data and loop:

1. ``uniform``: the training study's d=384, 6-layer GPT with 8 experts of width 768, top-2, trained
   by :func:`vmoe.train.loop.train` on ``--tokens`` bytes (its checkpoint lands in ``--out`` and
   is reused by a later run with the same settings).
2. Calibration: the inputs of every MoE layer over ``--calib-batches`` training batches, caught in
   one pass of the uniform model (:func:`vmoe.slim.layer_inputs`).
3. For each ``--budgets`` fraction of expert FLOPs and each ``--methods`` entry, a slimmed copy:
   ``slim`` (:func:`vmoe.slim.slim`, global greedy allocation, null experts allowed, one row per
   ``--criteria`` entry), ``uniform_prune`` (every expert cut to the same width by the same
   criterion), ``drop`` (whole experts made null, by score per FLOP) and ``drop_load`` (the
   least-loaded experts made null until the budget holds). Each is measured as is and after
   ``--ft-steps`` steps of fine-tuning (:func:`vmoe.slim.finetune`, the training loss, fresh
   batches); the uniform model gets the same fine-tune as a control.
4. ``scratch``: for each budget, the ``slim`` model's architecture (per-layer widths and the
   original load-balance group) freshly initialised and trained from scratch on the same batches,
   schedule and optimizer as the uniform run (``--tokens``), CUDA-graphed like it.

Every model is measured the same way: validation bits per byte overall and per domain
(:func:`vmoe.train.loop.evaluate`, the training study's fixed windows); the realised expert width
per token and its fraction of the uniform model's (from each layer's own routing on those
windows, per domain); and the MoE layers' time: one ``batch_size x seq_len`` validation batch's
inputs to every layer, forward + backward of all of them under bf16 autocast, by
``triton.testing.do_bench`` (wall clock, p50/p20/p80) and by the GPU's own kernel time
(:func:`vmoe.bench.probes.profiling.kernel_times`; at d=384 an eager step is partly host-bound, so
the wall clock understates what narrower experts save). On a CPU the timer is a median of
``time.perf_counter`` and there is no kernel time.

Writes ``<results>/<gpu>.csv`` (:data:`MODEL_COLUMNS`, one row per model) and
``<results>/<gpu>_experts.csv`` (:data:`EXPERT_COLUMNS`, one row per model, layer and expert: widths
before and after, calibration load and score, validation assignments from prose and from code), so
that notebooks/11_slim.ipynb can say which experts shrink and which domain routes to them. Rows of an
earlier run with the same key are replaced, others kept, so seeds can run in separate commands.
Both files are rewritten after every model, so a run cut short keeps what it measured;
``--max-seconds`` skips work that its estimate says would not finish in time.

Without ``VMOE_PIN_CONFIG=1`` every new set of expert widths autotunes each grouped GEMM over its
full config list (several seconds per layer shape, and slimmed layers all differ), which does not fit
the 10-minute budget; the CSV's ``pin_config`` column records the setting. Under ``--smoke`` the
layers take the torch path (``impl="reference"``), so the smoke run checks the study's plumbing,
not the kernels (tests/test_slim.py does that).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from vmoe.bench import report
from vmoe.config import gate_factor
from vmoe.slim import (
    SlimReport,
    channel_scores,
    finetune,
    fresh_like,
    layer_inputs,
    moe_layers,
    prune,
    slim_model,
)
from vmoe.train.data import DOMAINS, write_corpus
from vmoe.train.loop import CKPT, ByteCorpus, evaluate, lr_at, make_optimizer, train, training_loss
from vmoe.train.model import CONFIGS, GPT

MODEL_COLUMNS = [
    "seed", "method", "criterion", "budget", "finetune_steps", "val_bpb", "val_bpb_prose", "val_bpb_code",
    "width", "width_prose", "width_code", "flops_frac", "calib_flops_frac", "null_experts", "expert_params",
    "expert_ms_p50", "expert_ms_p20", "expert_ms_p80", "expert_gpu_ms", "timer", "widths", "train_tokens",
    "finetune_tokens", "calib_tokens", "n_layer", "n_embd", "k", "expert_sizes", "align", "pin_config",
    "gpu", "torch", "triton", "vmoe_commit", "data_sha256",
]
MODEL_KEY = ("gpu", "seed", "method", "criterion", "budget", "finetune_steps")
EXPERT_COLUMNS = [
    "seed", "method", "criterion", "budget", "layer", "expert", "width_before", "width", "calib_load",
    "score", "score_kept", "val_prose", "val_code", "gpu", "vmoe_commit",
]
EXPERT_KEY = ("gpu", "seed", "method", "criterion", "budget", "layer", "expert")
METHODS = ("slim", "uniform_prune", "drop", "drop_load")
# The slimmed models' calibration, fine-tune and timing batches come from their own generators, so
# none of them replays the training stream (seeded by the seed itself).
CALIB_SEED, FT_SEED, TIME_SEED = 1_000, 2_000, 3_000


class Clock:
    """Elapsed seconds since the start, printed with every note."""

    def __init__(self):
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def note(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {msg}", flush=True)


def _norm(v) -> str:
    """A CSV key cell, the same whether read back as text or held as a number."""
    try:
        return repr(float(v))
    except (TypeError, ValueError):
        return str(v)


class Table:
    """A CSV that keeps an earlier run's rows except those this run measures again."""

    def __init__(self, path: Path, columns: list, key: tuple):
        self.path, self.columns, self.key = path, columns, key
        self.old = []
        if path.exists():
            import csv

            with open(path, newline="") as fh:
                self.old = list(csv.DictReader(fh))
        self.rows = []

    def add(self, rows: list) -> None:
        self.rows += rows
        fresh = {tuple(_norm(r.get(c)) for c in self.key) for r in self.rows}
        kept = [r for r in self.old if tuple(_norm(r.get(c)) for c in self.key) not in fresh]
        report.write_csv(self.path, kept + self.rows, self.columns)


def batch_stream(data: ByteCorpus, gen: torch.Generator, cfg, device):
    while True:
        yield data.batch(gen, cfg.batch_size, cfg.seq_len, device)


def autocast_for(device: torch.device):
    """The training loop's autocast: bf16 on a GPU, none on a CPU."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


@torch.no_grad()
def routing_counts(model, windows, domain, device, batch_size: int, autocast) -> torch.Tensor:
    """``[L, E, len(DOMAINS)]``: the assignments each layer's router makes to each expert, by the
    domain of the token, over the validation windows (each layer's own routing, under the same
    autocast as the evaluation)."""
    layers = [m for _, m in moe_layers(model)]
    E = layers[0].config.num_experts
    D = len(DOMAINS)
    counts = torch.zeros(len(layers), E * D, device=device)
    dom_now = {}

    def hook(i):
        def catch(module, inputs, _output):
            ids = module.route(inputs[0].reshape(-1, module.config.n_embd))[3]              # [T, k]
            dom = dom_now["t"][:, None].expand_as(ids)
            counts[i] += torch.bincount((ids.long() * D + dom).reshape(-1), minlength=E * D).float()
        return catch

    hooks = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(windows), batch_size):
            chunk = windows[lo:lo + batch_size].to(device).long()
            dom_now["t"] = domain[lo:lo + batch_size].to(device)[:, None].expand(
                -1, chunk.shape[1] - 1).reshape(-1)
            with autocast():
                model(chunk[:, :-1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return counts.reshape(len(layers), E, D).cpu()  # host-ok: the study reads the counts once


def expert_time(model, x_batch: torch.Tensor, device: torch.device, autocast) -> dict:
    """The MoE layers' forward + backward on their inputs for ``x_batch`` (the model's own
    routing): do_bench p50/p20/p80 and the GPU's kernel time, in ms (CPU: a perf_counter median)."""
    inputs = layer_inputs(model, [x_batch])
    layers = moe_layers(model)
    xs = [inputs[name].detach().clone().requires_grad_() for name, _ in layers]
    gen = torch.Generator().manual_seed(TIME_SEED)
    dys = [torch.randn(x.shape, generator=gen).to(device) for x in xs]
    params = [p for _, m in layers for p in m.parameters()]

    def step():
        for t in xs + params:  # fresh gradients, as a training step has: no accumulation kernels
            t.grad = None
        total = 0.0
        with autocast():
            for (_, layer), x, dy in zip(layers, xs, dys):
                out, aux, _ = layer(x)
                total = total + (out.float() * dy).sum() + sum(aux.values())
        total.backward()

    step()  # autotuning and first launches, outside the timing
    if device.type != "cuda":
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(times)
        return {"expert_ms_p50": ms, "expert_ms_p20": min(times), "expert_ms_p80": max(times),
                "expert_gpu_ms": float("nan"), "timer": "perf_counter"}
    import triton.testing

    from vmoe.bench.probes.profiling import kernel_times

    p50, p20, p80 = triton.testing.do_bench(step, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    gpu = sum(kernel_times(step, steps=10, warmup=1).values()) / 1e3
    return {"expert_ms_p50": p50, "expert_ms_p20": p20, "expert_ms_p80": p80, "expert_gpu_ms": gpu,
            "timer": "do_bench"}


def drop_by_load(model, inputs: dict, budget: float, align: int):
    """A copy of ``model`` whose least-loaded experts (calibration assignments, ties to the higher
    id) are made null, per layer, until the kept FLOPs are at most ``budget`` of the layer's;
    returns it and ``{name: SlimReport}`` (criterion "load", allocation "drop")."""
    new = copy.deepcopy(model)
    reports = {}
    for name, layer in moe_layers(model):
        stats = channel_scores(layer, inputs[name], "act_w2")
        n, f = stats.counts, layer.config.expert_widths
        total = sum(a * w for a, w in zip(n, f))
        kept_flops, keep = total, set(range(len(f)))
        for e in sorted(range(len(f)), key=lambda e: (n[e], -e)):
            if kept_flops <= budget * total or len(keep) == 1:
                break
            keep.discard(e)
            kept_flops -= n[e] * f[e]
        kept = tuple(torch.arange(f[e] if e in keep else 0) for e in range(len(f)))
        slimmed = prune(layer, kept)
        parent, _, child = name.rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, child, slimmed)
        widths = slimmed.config.expert_widths
        reports[name] = SlimReport(
            criterion="load", budget=budget, budget_kind="flops", allocation="drop", align=align,
            widths_before=f, widths=widths, kept=kept, scores=stats.scores, counts=n,
            tokens=stats.tokens, flops_fraction=kept_flops / total, params_fraction=sum(widths) / sum(f))
    return new, reports


def measure(model, ctx: dict) -> dict:
    """Quality, realised width (overall and per domain) and expert time of ``model``."""
    device, autocast = ctx["device"], ctx["autocast"]
    cfg = ctx["cfg"]
    ev = evaluate(model, ctx["windows"], ctx["domain"], device, cfg.batch_size, autocast())
    counts = routing_counts(model, ctx["windows"], ctx["domain"], device, cfg.batch_size, autocast)
    layers = [m for _, m in moe_layers(model)]
    widths = torch.tensor([m.config.expert_widths for m in layers], dtype=torch.float64)   # [L, E]
    tokens = counts.sum(1).double() / cfg.k                                                 # [L, D]
    per_domain = (widths[:, :, None] * counts.double()).sum(1) / tokens                     # [L, D]
    overall = (widths[:, :, None] * counts.double()).sum((1, 2)) / tokens.sum(1)            # [L]
    full = cfg.k * max(w for _, w in cfg.expert_sizes)
    g = gate_factor(cfg.activation)
    row = {"val_bpb": ev["val_bpb"], "val_bpb_prose": ev["val_bpb_prose"], "val_bpb_code": ev["val_bpb_code"],
           "width": float(overall.mean()), "flops_frac": float(overall.mean()) / full,
           **{f"width_{d}": float(per_domain[:, i].mean()) for i, d in enumerate(DOMAINS)},
           "null_experts": int((widths == 0).sum()),
           "expert_params": int(sum((g + 1) * m.config.n_embd * m.config.total_width for m in layers)),
           "widths": ";".join(" ".join(str(w) for w in m.config.expert_widths) for m in layers)}
    row.update(expert_time(model, ctx["time_batch"], device, autocast))
    row["_counts"] = counts
    return row


def expert_rows(base: dict, model, counts: torch.Tensor, reports: dict | None) -> list:
    """One row per layer and expert: widths, calibration load and score (from the layer's
    :class:`vmoe.slim.SlimReport`, if any), validation assignments by domain."""
    rows = []
    for i, (name, layer) in enumerate(moe_layers(model)):
        rep = (reports or {}).get(name)
        by_expert = rep.experts() if rep is not None else None
        for e, w in enumerate(layer.config.expert_widths):
            row = {**base, "layer": i, "expert": e, "width": w,
                   **{f"val_{d}": int(counts[i, e, j]) for j, d in enumerate(DOMAINS)}}
            if by_expert is not None:
                r = by_expert[e]
                row.update(width_before=r["width_before"], calib_load=r["load"], score=r["score"],
                           score_kept=r["score_kept"])
            rows.append(row)
    return rows


def scratch_twin(slimmed, cfg, seed: int, device):
    """``slimmed``'s architecture, freshly initialised as :class:`vmoe.train.model.GPT` initialises
    (its residual scaling of w2 included), from the training run's seed."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    for blk, src in zip(model.blocks, slimmed.blocks):
        blk.mlp = fresh_like(src.mlp)
        with torch.no_grad():
            blk.mlp.w2.mul_((2 * cfg.n_layer) ** -0.5)  # GPT._init_weights' residual scaling
    return model.to(device)


def smoke_corpus(folder: Path) -> Path:
    """A small two-domain corpus from this repository's own text: README.md (prose) and vmoe's
    modules (code), split by :func:`vmoe.train.data.write_corpus` as the real one is."""
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_bytes() if (root / "README.md").exists() else b"prose " * 4000
    paras = [p for p in readme.split(b"\n\n") if p.strip()]
    prose = {f"p{i:03d}": p + b"\n\n" for i, p in enumerate(paras)}
    code = {p.name: p.read_bytes() for p in sorted((root / "vmoe").glob("*.py"))}

    def split(docs):
        names = sorted(docs)
        val = {n: docs[n] for n in names[::5]}
        return {n: docs[n] for n in names if n not in val}, val

    (p_train, p_val), (c_train, c_val) = split(prose), split(code)
    write_corpus(folder, {"train": {"prose": p_train, "code": c_train},
                          "val": {"prose": p_val, "code": c_val}})
    return folder


def study_config(args):
    """The uniform model's TrainConfig: the training study's, on ``--tokens`` bytes, evaluated at
    the start and the end only (or the tiny one, under ``--smoke``)."""
    if args.smoke:  # the torch path (impl="reference"): the interpreter would take minutes
        base = replace(CONFIGS["uniform"], name="slim_smoke_uniform", n_layer=2, n_head=2, n_embd=32,
                       seq_len=32, expert_sizes=((4, 32),), batch_size=8, lr=3e-3, min_lr=3e-4,
                       warmup_steps=2, impl="reference")
    else:
        base = replace(CONFIGS["uniform"], name="slim_uniform")
    base = replace(base, total_tokens=args.tokens or base.total_tokens,
                   eval_tokens=args.eval_tokens or base.eval_tokens)
    return replace(base, eval_interval=base.total_steps)


def run_seed(seed: int, args, ctx: dict, models: Table, experts: Table, clock: Clock) -> None:
    cfg, data, device = ctx["cfg"], ctx["data"], ctx["device"]
    env = ctx["env"]
    ft_steps = args.ft_steps
    common = {"seed": seed, "train_tokens": cfg.total_tokens, "calib_tokens": ctx["calib_tokens"],
              "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "k": cfg.k, "align": args.align,
              "pin_config": ctx["pin_config"], "data_sha256": data.sha256, **env,
              "expert_sizes": " ".join(f"{c}x{w}" for c, w in cfg.expert_sizes)}
    t0 = clock.elapsed()
    run_dir = train(cfg, seed, out=args.out, data_dir=args.data, resume=True, compile=ctx["compile"],
                    device=device)
    ck = torch.load(run_dir / CKPT, map_location="cpu", weights_only=True)
    model = GPT(cfg).to(device)
    model.load_state_dict(ck["model"])
    ctx["train_s"] = clock.elapsed() - t0
    clock.note(f"seed {seed}: uniform trained ({ck['state']['step']} steps) in {ctx['train_s']:.0f} s")

    calib_gen = torch.Generator().manual_seed(CALIB_SEED + seed)
    calib = [data.batch(calib_gen, cfg.batch_size, cfg.seq_len, device)[0] for _ in range(args.calib_batches)]
    inputs = layer_inputs(model, calib)

    def record(method, criterion, budget, steps, m, reports):
        row = measure(m, ctx)
        counts = row.pop("_counts")
        key = {"seed": seed, "method": method, "criterion": criterion, "budget": budget}
        fractions = [r.flops_fraction for r in (reports or {}).values()]
        models.add([{**common, **key, **row, "finetune_steps": steps,
                     "finetune_tokens": steps * cfg.tokens_per_step,
                     "calib_flops_frac": statistics.fmean(fractions) if fractions else 1.0}])
        if steps == 0:
            experts.add([{**r, "gpu": env["gpu"], "vmoe_commit": env["vmoe_commit"]}
                         for r in expert_rows(key, m, counts, reports)])
        clock.note(f"  {method:<13} {criterion:<7} budget {budget:<5g} ft {steps:<4d} val bpb "
                   f"{row['val_bpb']:.4f} (prose {row['val_bpb_prose']:.4f}, code {row['val_bpb_code']:.4f}) "
                   f"flops {row['flops_frac']:.3f} expert {row['expert_ms_p50']:.3f} ms "
                   f"(GPU {row['expert_gpu_ms']:.3f} ms)")

    warmup = max(1, ft_steps // 10)  # AdamW's moments start at 0: ramp up rather than jolt the model

    def tuned(m):
        m = copy.deepcopy(m)
        if ft_steps:
            gen = torch.Generator().manual_seed(FT_SEED + seed)
            finetune(m, batch_stream(data, gen, cfg, device), ft_steps,
                     lambda mm, b: training_loss(cfg, mm, *b)[0],
                     lr=lambda s: args.ft_lr * min(1.0, (s + 1) / warmup) * (1 - s / ft_steps),
                     optimizer=make_optimizer(m, cfg, device), grad_clip=cfg.grad_clip,
                     autocast=ctx["autocast"])
        return m

    record("uniform", "-", 1.0, 0, model, None)
    if ft_steps:
        record("uniform", "-", 1.0, ft_steps, tuned(model), None)

    slim_archs = {}
    per_budget = None
    for i, budget in enumerate(args.budgets):
        if per_budget is not None and clock.elapsed() + per_budget > args.max_seconds:
            clock.note(f"budget {budget}: skipped, ~{per_budget:.0f} s would pass --max-seconds")
            continue
        t_b = clock.elapsed()
        variants = []
        for method in args.methods:
            if method == "slim":
                for crit in args.criteria:
                    variants.append((method, crit, dict(criterion=crit, allocation="global",
                                                        allow_null=True)))
            elif method == "uniform_prune":
                variants.append((method, args.criteria[0], dict(criterion=args.criteria[0],
                                                                allocation="uniform")))
            elif method == "drop":
                variants.append((method, args.criteria[0], dict(criterion=args.criteria[0],
                                                                allocation="drop", allow_null=True)))
            else:
                variants.append((method, "load", None))
        for method, crit, kw in variants:
            if kw is None:
                slimmed, reports = drop_by_load(model, inputs, budget, args.align)
            else:
                slimmed, reports = slim_model(model, None, budget, inputs=inputs, align=args.align, **kw)
            if method == "slim" and crit == args.criteria[0]:
                slim_archs[budget] = slimmed
            record(method, crit, budget, 0, slimmed, reports)
            if ft_steps:
                record(method, crit, budget, ft_steps, tuned(slimmed), reports)
        per_budget = clock.elapsed() - t_b
        left = len(args.budgets) - i - 1
        scratch = 0 if args.no_scratch else len(args.budgets)
        estimate = left * per_budget + scratch * ctx["train_s"]
        clock.note(f"budget {budget}: {per_budget:.0f} s; {left} budget(s) left, then {scratch} "
                   f"scratch run(s) of ~{ctx['train_s']:.0f} s: about {estimate:.0f} s more")

    if args.no_scratch:
        return
    for budget, arch in slim_archs.items():
        if clock.elapsed() + ctx["train_s"] + 10 > args.max_seconds:
            clock.note(f"scratch at budget {budget}: skipped, ~{ctx['train_s']:.0f} s would pass "
                       f"--max-seconds")
            continue
        t_s = clock.elapsed()
        scratch = scratch_twin(arch, cfg, seed, device)
        gen = torch.Generator().manual_seed(seed)  # the uniform run's batches, in its order
        finetune(scratch, batch_stream(data, gen, cfg, device), cfg.total_steps,
                 lambda mm, b: training_loss(cfg, mm, *b)[0], lr=lambda s: lr_at(cfg, s),
                 optimizer=make_optimizer(scratch, cfg, device), grad_clip=cfg.grad_clip,
                 autocast=ctx["autocast"], compile=ctx["compile"])
        clock.note(f"scratch at budget {budget} trained in {clock.elapsed() - t_s:.0f} s")
        record("scratch", args.criteria[0], budget, 0, scratch, None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data"), help="corpus folder (python -m "
                        "vmoe.train.data builds it); under --smoke a missing one is synthesised")
    parser.add_argument("--out", type=Path, help="training runs folder (default results/runs/slim; "
                        "--smoke: a temporary folder)")
    parser.add_argument("--results", type=Path, help="where <gpu>.csv goes (default results/slim; "
                        "--smoke: a temporary folder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5, 0.35],
                        help="fractions of expert FLOPs to keep")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--criteria", nargs="+", default=["act_w2"],
                        choices=["act_w2", "act", "weight"], help="slim's criteria (the first also "
                        "drives uniform_prune, drop and the scratch architecture)")
    parser.add_argument("--tokens", type=int, help="training bytes of the uniform and scratch models "
                        "(default 8,388,608; --smoke: 80 tiny steps)")
    parser.add_argument("--eval-tokens", type=int, help="validation bytes (default the study's 262,144)")
    parser.add_argument("--calib-batches", type=int, help="calibration batches (default 4; --smoke 2)")
    parser.add_argument("--ft-steps", type=int, help="fine-tune steps (default 50; --smoke 3; 0: none)")
    parser.add_argument("--ft-lr", type=float, default=3e-4,
                        help="fine-tune peak lr (warm-up over a tenth of the steps, then linear decay to 0)")
    parser.add_argument("--align", type=int, default=8)
    parser.add_argument("--no-scratch", action="store_true", help="skip the from-scratch models")
    parser.add_argument("--compile", default=None, choices=["none", "default", "reduce-overhead"],
                        help="torch.compile mode of the uniform and scratch training (default: "
                        "reduce-overhead on a GPU, none on a CPU)")
    parser.add_argument("--max-seconds", type=float, default=560.0,
                        help="skip work whose estimate would end past this many seconds")
    parser.add_argument("--smoke", action="store_true", help="CPU-sized: the tiny model, a few steps")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)

    clock = Clock()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    tmp = None
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="vmoe_slim_smoke_"))
        args.tokens = args.tokens or 80 * 8 * 32
        args.eval_tokens = args.eval_tokens or 8 * 2 * 32
        args.calib_batches = args.calib_batches or 2
        args.ft_steps = 3 if args.ft_steps is None else args.ft_steps
        args.out = args.out or tmp / "runs"
        args.results = args.results or tmp / "results"
        if not (args.data / "meta.json").exists():
            args.data = smoke_corpus(tmp / "data")
            clock.note(f"smoke: synthesised a corpus in {args.data}")
    else:
        args.tokens = args.tokens or 8_388_608
        args.calib_batches = args.calib_batches or 4
        args.ft_steps = 50 if args.ft_steps is None else args.ft_steps
        args.out = args.out or Path("results/runs/slim")
        args.results = args.results or Path("results/slim")
    if "slim" not in args.methods:
        args.no_scratch = True
    compile_mode = args.compile or ("reduce-overhead" if device.type == "cuda" else "none")
    pin = os.environ.get("VMOE_PIN_CONFIG", "0") not in ("", "0")
    if device.type == "cuda" and not pin:
        clock.note("VMOE_PIN_CONFIG is not set: every new width set autotunes its GEMMs, which may "
                   "take minutes; --max-seconds will skip what does not fit")

    cfg = study_config(args)
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # the tiny model's tensors are too small for intra-op threads
    data = ByteCorpus(args.data)
    windows, domain = data.eval_windows(cfg.eval_tokens, cfg.seq_len)
    # Evenly spaced over the windows, which hold prose then code, so the timed batch mixes both.
    pick = torch.linspace(0, len(windows) - 1, min(cfg.batch_size, len(windows))).long()
    time_batch = windows[pick, :-1].to(device).long()
    env = report.environment(device)
    ctx = {"cfg": cfg, "data": data, "device": device, "windows": windows, "domain": domain,
           "autocast": autocast_for(device), "compile": False if compile_mode == "none" else compile_mode,
           "time_batch": time_batch, "env": env, "pin_config": pin,
           "calib_tokens": args.calib_batches * cfg.tokens_per_step}
    slug = report.gpu_slug(env["gpu"])
    models = Table(args.results / f"{slug}.csv", MODEL_COLUMNS, MODEL_KEY)
    experts = Table(args.results / f"{slug}_experts.csv", EXPERT_COLUMNS, EXPERT_KEY)
    clock.note(f"{env['gpu']}: {cfg.n_layer} layers, d={cfg.n_embd}, experts {cfg.expert_sizes}, "
               f"{cfg.total_steps} steps of {cfg.tokens_per_step} tokens; budgets {args.budgets}, "
               f"methods {args.methods}, fine-tune {args.ft_steps} steps, seeds {args.seeds}")
    per_seed = None
    for seed in args.seeds:
        if per_seed is not None and clock.elapsed() + per_seed > args.max_seconds:
            clock.note(f"seed {seed}: skipped, ~{per_seed:.0f} s would pass --max-seconds")
            continue
        t_seed = clock.elapsed()
        run_seed(seed, args, ctx, models, experts, clock)
        per_seed = clock.elapsed() - t_seed
        clock.note(f"seed {seed} done in {per_seed:.0f} s")
    clock.note(f"wrote {models.path} ({len(models.rows)} rows) and {experts.path} ({len(experts.rows)} rows)")
    return models.path


if __name__ == "__main__":
    main()
