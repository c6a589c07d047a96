"""A/B host-time probe: eager expert_mlp and MoEMLP forward (no grad, and with grad) for one
vmoe (PYTHONPATH selects it), printed as one JSON line; run alternately for two versions in one
call, so that a busy host shows up as noise in both rather than as a difference. With --sync,
also runs one training step under torch.cuda.set_sync_debug_mode("error"), which raises on any
host synchronization."""
import json
import sys

import torch
from probe_before_after import host_and_total_us  # beside this file

import vmoe
from vmoe import MoEConfig, MoEMLP

tag, sync = sys.argv[1], "--sync" in sys.argv
T, d, k, sizes = 4096, 256, 2, [(4, 512), (8, 256), (4, 128)]
torch.manual_seed(0)
moe = MoEMLP(MoEConfig(n_embd=d, expert_sizes=sizes, num_active_experts=k, router="softmax"))
moe = moe.cuda().bfloat16()
widths = moe.config.expert_widths
x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
ids = torch.stack([torch.randperm(len(widths), device="cuda")[:k] for _ in range(T)])
w = torch.rand(T, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)


def expert():
    return vmoe.expert_mlp(x, ids, w, moe.w1, moe.w2, widths)


def layer():
    return moe(x)


def host_us(fn, grad):
    with torch.set_grad_enabled(grad):
        return host_and_total_us(fn, n=300)


row = {"tag": tag}
for name, fn in (("expert", expert), ("layer", layer)):
    for grad in (False, True):
        row[f"{name}_{'grad' if grad else 'nograd'}_host_total_us"] = host_us(fn, grad)
print(json.dumps(row), flush=True)
if sync:
    out, aux, _ = moe(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    out, aux, _ = moe(x)
    ones = [torch.ones((), device="cuda")] * 3
    torch.autograd.backward([out, *aux.values()], [torch.ones_like(out), *ones])
    y = expert()
    y.backward(torch.ones_like(y))
    torch.cuda.set_sync_debug_mode(0)
    print("no host synchronization in the layer's or expert_mlp's forward and backward")
