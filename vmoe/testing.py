"""Helpers that every check in the repo shares: the tests, ``python -m vmoe.validate``, the
benchmark's check-before-timing, and the notebooks all import from here, so that "correct" means
one thing everywhere.

- :func:`rel_err`: ``||out - ref|| / ||ref||`` in float64.
- :data:`TOL` and :func:`tolerance`: the bound on that error, per dtype, each with its reason.
- :func:`assert_close`: the check with a message that prints the error and the max abs difference.
- :func:`random_ids`, :func:`make_inputs`: fresh random routing and problems, scaled to O(1).
- :func:`case_id`: readable test ids like ``T7-d40-w[7,33,100]-k2``.
- :data:`DEVICE`, :data:`ON_GPU`, :func:`sizes`: where the kernels run, and a problem size for it.
- :func:`spawn_ranks`: run a multi-process check (expert parallelism) on a free local port.
- :func:`capture_graph`: a step warmed up, then captured in a CUDA graph.
- :func:`tiny_hf_model`: a tiny random-init transformers MoE causal LM (needs transformers).

Without a GPU the kernels run in the Triton interpreter, which must be selected
(``TRITON_INTERPRET=1``) before vmoe is imported: tests/conftest.py and notebooks/nbutil.py do that
before importing this module.

Shape letters: see :mod:`vmoe.config`.
"""
from __future__ import annotations

import torch

from vmoe.config import ACTIVATIONS, gate_factor

# ||out - ref|| / ||ref|| against a float64 oracle, by the dtype the kernels compute in.
TOL = {
    # fp32 with IEEE dots (vmoe follows torch's allow_tf32, off by default): only summation order
    # differs from float64, so errors land near 1e-7; 1e-5 leaves room for long K loops.
    torch.float32: 1e-5,
    # fp16 keeps 11 bits; the intermediates Z and H are stored in fp16 between the two GEMMs.
    torch.float16: 5e-3,
    # bf16 keeps 8 bits, and its rounding of Z, H and ys compounds over two GEMMs and a combine
    # (measured: up to 6e-3 at d=2048); 4e-2 still fails any wrong index or missed tile, whose
    # error is O(1).
    torch.bfloat16: 4e-2,
}
# fp32 inputs whose dots run in TF32 (10-bit mantissa), when torch's allow_tf32 is on: the
# benchmark's baselines (cuBLAS) then round their inputs as vmoe's kernels do.
TOL_TF32 = 1e-3

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Every activation in fp32 and bf16, and fp16 for one plain and one gated activation: the case
# list the kernel tests sweep. fp16 takes bf16's code paths with other rounding, so two suffice.
ACT_DTYPES = ([(a, torch.float32) for a in ACTIVATIONS]
              + [(a, torch.bfloat16) for a in ACTIVATIONS]
              + [("relu2", torch.float16), ("swiglu", torch.float16)])
ACT_DTYPE_IDS = [f"{a}-{DTYPE_IDS[t]}" for a, t in ACT_DTYPES]

# Where the tests and notebooks run the kernels: the GPU if there is one, else the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def sizes(cpu, gpu, on_gpu: bool | None = None):
    """The interpreter (CPU, CI) size or the GPU size of a problem; ``on_gpu`` defaults to
    :data:`ON_GPU`."""
    return gpu if (ON_GPU if on_gpu is None else on_gpu) else cpu


def tolerance(dtype: torch.dtype) -> float:
    """The rel_err bound for results computed in ``dtype`` (see :data:`TOL`)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return TOL_TF32
    return TOL[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN when out holds a NaN or an Inf."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    if not bool(torch.isfinite(out).all()):  # host-ok: checking, never on a hot path
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))  # host-ok: checking


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol=None):
    """Relative-error check in float64, with a dtype-dependent tolerance; NaN anywhere fails.

    When ref is exactly zero the relative error is meaningless, so out must be exactly zero too.
    """
    tol = tolerance(dtype) if tol is None else tol
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    n_nan = int(torch.isnan(out).sum())  # host-ok: checking
    assert n_nan == 0, f"{name}: {n_nan} NaN element(s) of {out.numel()} (unwritten or overflowed)"
    if out.numel() == 0:
        return
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()  # host-ok: checking
    max_abs = float((o - r).abs().max())
    if float(r.norm()) == 0.0:
        assert max_abs == 0.0, f"{name}: reference is all zero but max abs diff is {max_abs:.3e}"
        return
    err = rel_err(o, r)
    assert err <= tol, (f"{name} ({DTYPE_IDS.get(dtype, dtype)}): rel err {err:.3e} > tol {tol:.0e}, "
                        f"max abs diff {max_abs:.3e}")


def case_id(T, d, widths, k, *extra) -> str:
    """Readable ids like ``T7-d40-w[7,33,100]-k2``."""
    parts = [f"T{T}", f"d{d}", "w[" + ",".join(str(w) for w in widths) + "]", f"k{k}"]
    return "-".join(parts + [str(e) for e in extra])


def random_ids(T: int, E: int, k: int, device="cpu", generator=None) -> torch.Tensor:
    """``[T, k]`` int64 ids, each row k distinct experts (what a top-k router produces)."""
    if T == 0:
        return torch.zeros(0, k, dtype=torch.long, device=device)
    return torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(T)]).to(device)


def make_inputs(T, d, widths, k, activation="relu2", dtype=torch.float32, device="cpu", ids=None,
                generator=None):
    """``x [T, d], topk_ids [T, k], topk_weights [T, k], w1 [d, g*F], w2 [F, d]``, scaled so that
    the output has O(1) entries whatever d and f_e are. Leaf tensors, not requiring grad."""
    E, F, g = len(widths), sum(widths), gate_factor(activation)
    x = torch.randn(T, d, generator=generator)
    if ids is None:
        ids = random_ids(T, E, k, "cpu", generator)
    weights = torch.rand(ids.shape, generator=generator) + 0.1
    w1 = torch.randn(d, g * F, generator=generator) / d ** 0.5
    w2 = torch.cat([torch.randn(f, d, generator=generator) / max(f, 1) ** 0.5 for f in widths])
    return (x.to(device, dtype), ids.to(device), weights.to(device, dtype), w1.to(device, dtype),
            w2.to(device, dtype))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, world: int, *args) -> None:
    """``worker(rank, world, port, *args)`` in ``world`` processes (``torch.multiprocessing.spawn``)
    that rendezvous on a free local port; a failing rank ends the others and raises here.

    The port is free when chosen but released before rank 0 binds it: if another process took it
    in between, the spawn is tried once more on a new one (any other failure is the check's)."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(worker, args=(world, _free_port(), *args), nprocs=world, join=True)
    except mp.ProcessRaisedException as e:
        if "address already in use" not in str(e).lower():
            raise
        mp.spawn(worker, args=(world, _free_port(), *args), nprocs=world, join=True)


def capture_graph(step, warmup: int = 2):
    """``(graph, result)``: ``step()`` run ``warmup`` times on a side stream (autotuning and
    compilation happen there, not during capture), then captured in a CUDA graph; ``result`` is
    what the captured call returned, the tensors that ``graph.replay()`` rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    return graph, result


# The transformers MoE causal LMs the vmoe.hf checks build, by model type.
HF_MODELS = ("qwen3_moe", "olmoe", "mixtral", "qwen2_moe", "deepseek_v3")


def tiny_hf_model(name: str, device=DEVICE):
    """A tiny random-init transformers MoE causal LM of model type ``name`` (:data:`HF_MODELS`),
    built from its config class (no download), in eval mode on ``device``: vocabulary 64, d=32,
    2 layers, 4 experts of width 16, top-2 (Qwen2-MoE adds a shared expert of 16)."""
    import transformers  # an optional dependency: only the vmoe.hf checks need it

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  initializer_range=0.2)
    if name == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=16,
                                             head_dim=8, norm_topk_prob=True)
        cls = transformers.Qwen3MoeForCausalLM
    elif name == "olmoe":
        config = transformers.OlmoeConfig(**common, intermediate_size=16)
        cls = transformers.OlmoeForCausalLM
    elif name == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=16, head_dim=8)
        cls = transformers.MixtralForCausalLM
    elif name == "deepseek_v3":
        common.pop("num_experts")
        common["num_key_value_heads"] = 4  # multi-head latent attention: one key per head
        config = transformers.DeepseekV3Config(**common, n_routed_experts=4, intermediate_size=64,
                                               moe_intermediate_size=16, n_group=1, topk_group=1,
                                               first_k_dense_replace=0, q_lora_rank=None,
                                               kv_lora_rank=16, qk_rope_head_dim=8,
                                               qk_nope_head_dim=8, v_head_dim=8)
        cls = transformers.DeepseekV3ForCausalLM
    elif name == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=16)
        cls = transformers.Qwen2MoeForCausalLM
    else:
        raise ValueError(f"name must be one of {HF_MODELS}, got {name!r}")
    return cls(config).to(device).eval()
