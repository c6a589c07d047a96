"""What a fresh layer's first training steps cost in wall-clock time: the compiles and the tuning a
new user waits for before the first step returns.

Each case runs in its own process, seed layer 4x512+8x256+4x128, d=256, k=2, relu2, bf16, one
training step = ``MoEMLP`` forward and backward of ``y.sum() + aux losses``:

- ``cold``: a fresh Triton cache directory (nothing compiled, nothing tuned);
- ``warm``: a second process on the cache ``cold`` left (compiled kernels and, where vmoe caches
  them, tuning results on disk).

Per process, in order: the first step at T=4096, the second, and the first step at each of the
new token counts T=4000 (not a multiple of 16) and T=1000 (a smaller bucket of nothing: vmoe's
tuning keys hold no token count); each timed from the call to a device synchronize. Also the
number of Triton compiles (a compile served by the cache counts too) and their summed time, and
what the parallel compile before the first step (:mod:`vmoe.ops.utils.precompile`) recorded and
took. ``FIRST_STEP_PROFILE=PATH`` appends a cProfile of each process's first step to PATH.

    python -m vmoe.bench.probes.first_step OUT.csv [LABEL=PYTHONPATH ...]

Each ``LABEL=PATH`` runs the cases with ``PYTHONPATH=PATH`` (another checkout's vmoe, for an
A/B in one call on one card); by default one label, ``this``, the vmoe importable here. A label
may set environment variables for its processes: ``LABEL=PATH:VMOE_TUNE_REP=100``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

TOKENS = (4096, 4000, 1000)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def child() -> None:
    import torch
    import triton.compiler

    # A kernel's binder takes ``triton.compiler.compile`` when it is first built (Triton 3.6).
    compiles = {"n": 0, "s": 0.0}
    real_compile = triton.compiler.compile

    def counted(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real_compile(*args, **kwargs)
        finally:
            compiles["n"] += 1
            compiles["s"] += time.perf_counter() - t

    triton.compiler.compile = counted
    t_import = time.perf_counter()
    import vmoe
    t_import = time.perf_counter() - t_import

    torch.manual_seed(0)
    cfg = vmoe.MoEConfig(n_embd=256, expert_sizes=[(4, 512), (8, 256), (4, 128)],
                         num_active_experts=2, activation="relu2")
    moe = vmoe.MoEMLP(cfg).cuda().to(torch.bfloat16)

    def step(T: int) -> float:
        x = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        torch.cuda.synchronize()  # host-ok: the timer
        t = time.perf_counter()
        y, aux, _ = moe(x)
        (y.float().sum() + sum(aux.values())).backward()
        torch.cuda.synchronize()  # host-ok: the timer
        return time.perf_counter() - t

    profile = os.environ.get("FIRST_STEP_PROFILE")
    if profile:  # where the first step's time goes: cProfile's top functions, into that file
        import cProfile
        import pstats
        prof = cProfile.Profile()
        first = prof.runcall(step, TOKENS[0])
        with open(profile, "a") as f:
            f.write(f"# {os.environ.get('FIRST_STEP_CASE', '')}: first step {first:.3f} s\n")
            for order in ("cumulative", "tottime"):
                pstats.Stats(prof, stream=f).sort_stats(order).print_stats(35)
    else:
        first = step(TOKENS[0])
    out = {"import_s": t_import, "first_step_s": first, "second_step_s": step(TOKENS[0])}
    for T in TOKENS[1:]:
        out[f"first_step_T{T}_s"] = step(T)
    # The parallel compile before the first step (vmoe.ops.utils.precompile), where it ran.
    history = getattr(getattr(vmoe.ops.utils, "precompile", None), "HISTORY", [])
    out.update(precompiled=sum(h["kernels"] for h in history),
               precompile_record_s=sum(h["record_s"] for h in history),
               precompile_compile_s=sum(h["compile_s"] for h in history))
    out.update(compiles=compiles["n"], compile_sum_s=compiles["s"],
               gpu=torch.cuda.get_device_name(), triton=__import__("triton").__version__)
    print("RESULT " + json.dumps(out), flush=True)


def run_case(label: str, path: str, env_extra: dict, cache: str, process: str) -> dict:
    # The child runs in the cache directory, so that the current directory (first on a ``-c``
    # child's path) holds no vmoe, and PYTHONPATH alone picks the checkout.
    env = {**os.environ, "TRITON_CACHE_DIR": cache, "FIRST_STEP_CASE": f"{label} {process}", **env_extra,
           "PYTHONPATH": os.path.abspath(path or ROOT)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", f"import runpy; runpy.run_path({__file__!r}, "
                           "run_name='__child__')"], env=env, cwd=cache, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{label} {process}: the child failed (exit {proc.returncode})")
    row = {"label": label, "process": process, "process_wall_s": wall, **json.loads(line[0][7:])}
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)
    return row


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    out, specs = argv[0], argv[1:] or ["this="]
    rows = []
    for spec in specs:
        label, _, rest = spec.partition("=")
        path, *envs = rest.split(":")
        env_extra = dict(e.split("=", 1) for e in envs)
        with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:
            for process in ("cold", "warm"):
                rows.append(run_case(label, path, env_extra, cache, process))
    from vmoe.bench.report import write_csv  # the parent only: a child imports its own vmoe
    write_csv(out, rows)  # the header: every key, in first-seen order
    return 0


if __name__ == "__child__":
    child()
elif __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
