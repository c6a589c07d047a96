"""Null and shared experts at layer scope, on the GPU.

Run as ``python -m vmoe.bench.probes.null_shared OUT.csv [N_SHARED_CASES]`` (N_SHARED_CASES: how
many of the two shared cases below to run, default both). bf16, one training step = forward,
``(out * dy).sum() + sum(aux)``, backward; ``do_bench`` medians, and the GPU's own time per call
(torch.profiler's kernel sum).

- ``null``: the original author's follow-up layer, 24x384 + 24x128 + 16 null experts, sigmoid
  top-8, relu2, d=768, against the same layer without the nulls (k=8 over the 48 real experts).
  FLOPs are counted from the realised counts (the null slots cost none).
- ``shared``: Qwen2-MoE-like (60x1408 top-4, softmax, swiglu, shared 5632 with a sigmoid gate,
  d=2048) and Nemotron-H-like (128x1856 top-6, sigmoid, relu2, shared 3712 without gate,
  d=2688): vmoe's shared expert in the routed launches, against the routed vmoe layer plus the
  shared expert as a separate dense MLP in torch (cuBLAS), which is how their code computes it.
"""
import csv
import dataclasses
import sys

import torch
import torch.nn.functional as F
import triton.testing

from vmoe import MoEConfig, MoEMLP, reference
from vmoe.bench.probes.profiling import kernel_times, layer_steps
from vmoe.config import gate_factor

DEV, DT = "cuda", torch.bfloat16
torch.manual_seed(0)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def gpu_ms(fn, n=10):
    """Milliseconds of GPU kernel time per call (torch.profiler's sum over the kernels): at these
    sizes an eager step is partly host-bound, and do_bench's wall time mixes in the host's speed."""
    return sum(kernel_times(fn, n, warmup=1).values()) / 1e3


class SeparateShared(torch.nn.Module):
    """The routed vmoe layer plus the shared expert as its own dense MLP (torch ops)."""

    def __init__(self, layer: MoEMLP):
        super().__init__()
        cfg = layer.config
        self.routed = MoEMLP(dataclasses.replace(cfg, shared_expert_width=0,
                                                 shared_expert_gate=False))
        g, F_ = gate_factor(cfg.activation), cfg.total_width
        with torch.no_grad():
            self.routed.router.weight.copy_(layer.router.weight)
            self.routed.w1.copy_(layer.w1[:, :g * F_])
            self.routed.w2.copy_(layer.w2[:F_])
        self.w1s = torch.nn.Parameter(layer.w1[:, g * F_:].detach().t().contiguous())  # [gS, d]
        self.w2s = torch.nn.Parameter(layer.w2[F_:].detach().t().contiguous())         # [d, S]
        self.gate = layer.shared_gate
        self.activation = cfg.activation

    def forward(self, x):
        out, aux, f_i = self.routed(x)
        y = F.linear(reference.act(F.linear(x, self.w1s), self.activation), self.w2s)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x))
        return out + y, aux, f_i


def realised_tflops(layer, x, ms):
    cfg = layer.config
    with torch.no_grad():
        _, _, f_i = layer(x)
    T, g, d = x.shape[0], gate_factor(cfg.activation), cfg.n_embd
    counts = f_i.double() * T * cfg.num_active_experts
    widths = torch.tensor(cfg.expert_widths, dtype=torch.float64, device=x.device)
    width_sum = float((counts * widths).sum()) + T * cfg.shared_expert_width
    flops = 2 * d * (g + 1) * width_sum
    null_frac = float(counts[widths == 0].sum() / counts.sum())
    return flops / ms / 1e9, flops, null_frac


def main(out_path):
    rows = []
    name = torch.cuda.get_device_name()

    def record(case, variant, layer, x, dy, flops_layer=None):
        fwd, train = layer_steps(layer, x, dy)
        t_f, t_t = bench(fwd), bench(train)
        g_f, g_t = gpu_ms(fwd), gpu_ms(train)
        tf, flops, null_frac = realised_tflops(flops_layer or layer, x, g_f)
        rows.append(dict(gpu=name, case=case, variant=variant, T=x.shape[0], fwd_ms=round(t_f, 4),
                         train_ms=round(t_t, 4), fwd_gpu_ms=round(g_f, 4), train_gpu_ms=round(g_t, 4),
                         fwd_gpu_tflops=round(tf, 1), null_frac=round(null_frac, 3)))
        print(rows[-1], flush=True)

    # Null experts.
    T, d = 16384, 768
    x = torch.randn(T, d, device=DEV, dtype=DT)
    dy = torch.randn_like(x)
    base = dict(n_embd=d, num_active_experts=8, router="sigmoid", activation="relu2")
    with_null = MoEMLP(MoEConfig(expert_sizes=[(24, 384), (24, 128), (16, 0)], **base)).to(DEV, DT)
    no_null = MoEMLP(MoEConfig(expert_sizes=[(24, 384), (24, 128)], **base)).to(DEV, DT)
    record("null-24x384+24x128+16x0-k8", "vmoe-null", with_null, x, dy)
    record("null-24x384+24x128+16x0-k8", "vmoe-no-null-k8", no_null, x, dy)

    # Shared experts.
    for case, T, d, kw in [
        ("qwen2-60x1408-k4+shared5632-gate", 8192, 2048,
         dict(expert_sizes=[(60, 1408)], num_active_experts=4, router="softmax",
              activation="swiglu", shared_expert_width=5632, shared_expert_gate=True)),
        ("nemotronh-128x1856-k6+shared3712", 8192, 2688,
         dict(expert_sizes=[(128, 1856)], num_active_experts=6, router="sigmoid",
              activation="relu2", shared_expert_width=3712))][:int(sys.argv[2]) if len(sys.argv) > 2 else 2]:
        x = torch.randn(T, d, device=DEV, dtype=DT)
        dy = torch.randn_like(x)
        fused = MoEMLP(MoEConfig(n_embd=d, **kw)).to(DEV, DT)
        separate = SeparateShared(fused).to(DEV, DT)
        with torch.no_grad():  # the same function, checked before timing
            a, b = fused(x)[0].float(), separate(x)[0].float()
            err = float((a - b).norm() / b.norm())
        print(f"{case}: fused vs separate rel err {err:.2e}", flush=True)
        assert err < 4e-2, err
        record(case, "vmoe-fused-shared", fused, x, dy)
        record(case, "vmoe-routed+dense-shared", separate, x, dy, flops_layer=fused)
        with open(out_path, "w", newline="") as f:  # after each case: a timeout keeps the rest
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    with open(out_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "null_shared.csv")
