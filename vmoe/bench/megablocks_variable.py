"""hbfreed/megablocks-variable (a MegaBlocks fork with experts of different widths) as the expert-scope
provider ``megablocks_variable`` of :mod:`vmoe.bench`, and the commands that build and run it.

    python -m vmoe.bench.megablocks_variable build build/megablocks/megablocks-variable.tar.gz
    python -m vmoe.bench.megablocks_variable check
    python -m vmoe.bench.megablocks_variable bench OUT.csv [options of python -m vmoe.bench]

What is timed: the expert computation of the fork's variable-width layer, ``MoEMLP`` in its
``gpt_model.py`` (commit 93a1479), run on the routing and weights that the harness gives every
provider. :func:`megablocks_variable_moe` calls the layer's own methods in the order its ``forward``
calls them after the router's top-k:

1. ``_sort_tokens_by_expert``: the top-k ids cast to int32, CUB radix sort and histogram
   (``megablocks.ops.sort``, ``histogram``: the ``megablocks_ops`` extension);
2. ``_create_topology``: the counts rounded up to 128 rows per expert and summed
   (``megablocks.ops.round_up``, ``inclusive_cumsum``), read on the host (``padded_bins.tolist()``),
   then all six block-sparse index arrays built in one launch (``nanomoe_ops.build_topology``). The
   extension also binds the older ``indices_variable``, which the layer no longer calls;
3. ``megablocks.ops.padded_gather``: tokens copied to expert-sorted rows, each expert's rows padded
   with zeros to a multiple of 128;
4. ``stk.ops.sdd(x, w1, topo)``, the fork's fused ``relu_squared`` on the blocks, ``stk.ops.dsd(h, w2)``:
   stanford-stk 0.7.1's Triton kernels, behind the fork's wrappers that pass int32 block indices;
5. ``megablocks.ops.padded_scatter``: each token's k rows scaled by its weights and summed in fp32
   (one fused kernel for k > 1), with a gradient for the weights.

The weights are used as given: the fork's layer keeps ``w1 [d, F]`` and ``w2 [F, d]`` with expert e
owning columns / rows ``[o_e, o_e + f_e)``, the harness's layout, so nothing is converted. The layer
object is built once per (widths, k, device) for its per-expert block counts and offsets; its
router and its own weights are not used.

Restrictions, read from the fork's source:
    - every f_e a positive multiple of 128: ``MoEMLP`` asserts it; its block size is fixed at 128;
    - d a multiple of 128: stk's dsd tiles its output columns (d) by 128;
    - relu2 only: the activation of the fork's variable-width layer. Its gated MLP (``SparseGLU``)
      belongs to the uniform-width dMoE, with separate gate and up weights;
    - bf16 or fp16: stk's Triton dots take fp32 inputs at ``tl.dot``'s default TF32 precision;
    - at least 2 experts: megablocks' ``inclusive_cumsum`` squeezes a one-expert cumsum to a 0-d
      tensor, which ``_create_topology`` then indexes;
    - one host synchronization per forward (``padded_bins.tolist()``, to size the topology and the
      padded rows) and none in the backward. So it cannot be captured in a CUDA graph and is timed
      eagerly only. ``check`` counts the synchronizations with torch's sync debug mode.
    - Importing megablocks replaces ``stk.ops.sdd``, ``dsd`` and ``dds`` for the whole process by the
      fork's int32-index wrappers (``megablocks/stk_compat.py``). The ``stk`` provider
      (:func:`vmoe.bench.baselines.stk_moe`) already builds int32 indices, so for it the extra casts
      change nothing.

Building: the fork pins torch 2.12 and stanford-stk 0.7.1 in its metadata. :func:`build` compiles
its two CUDA extensions (``csrc/ops.cu`` and ``csrc/nanomoe_ops.cu``) in place with
``setup.py build_ext --inplace``, which reads neither pin, against the torch that runs it. The
built tree (default ``build/megablocks-variable``, or ``$VMOE_MEGABLOCKS_VARIABLE``) is put on
``sys.path`` when the provider is first used. stk must be importable on its own
(``pip install --no-deps`` its 0.7.1 wheel), and so must einops (``gpt_model.py`` imports it).

The GPU machine has no network, so ``build/megablocks/`` is prepared where there is one and carried:
``git archive --format=tar.gz -o build/megablocks/megablocks-variable.tar.gz 93a1479`` in a clone of
the fork, and ``pip wheel --no-deps -w build/megablocks stanford-stk==0.7.1`` (PyPI has only its sdist).

Shape letters: see :mod:`vmoe.config`.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

BLOCK = 128
ACTIVATIONS = ("relu2",)
DTYPES = (torch.bfloat16, torch.float16)
EXTENSIONS = ("megablocks_ops", "nanomoe_ops")
ROOT = Path(__file__).resolve().parents[2]
TARBALL = ROOT / "build" / "megablocks" / "megablocks-variable.tar.gz"
STAMP = ".vmoe-build-stamp"


def source_dir() -> Path:
    """Where the built fork lives: ``$VMOE_MEGABLOCKS_VARIABLE``, else ``build/megablocks-variable``."""
    return Path(os.environ.get("VMOE_MEGABLOCKS_VARIABLE") or ROOT / "build" / "megablocks-variable")


def applicability(cfg, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the fork's layer can compute ``cfg`` in ``dtype`` at all, and if not, why."""
    bad = sorted({f for f in cfg.widths if f <= 0 or f % BLOCK})
    if bad:
        return False, (f"megablocks_variable needs expert widths that are positive multiples of "
                       f"{BLOCK} (its block size), got {bad}")
    if cfg.d % BLOCK:
        return False, (f"megablocks_variable needs d to be a multiple of {BLOCK} (dsd's column tile), "
                       f"got {cfg.d}")
    if cfg.activation not in ACTIVATIONS:
        return False, (f"megablocks_variable computes relu2 only (its variable-width layer's "
                       f"relu_squared), got {cfg.activation}")
    if dtype not in DTYPES:
        return False, (f"megablocks_variable is measured in bf16 or fp16 (stk's dots run fp32 in "
                       f"TF32), got {str(dtype)[6:]}")
    if cfg.E < 2:
        return False, "megablocks_variable needs at least 2 experts (its cumsum squeezes one to 0-d)"
    return True, ""


_MODULES = None


def _modules() -> SimpleNamespace:
    """The fork's modules, imported from :func:`source_dir` (raises ImportError naming what is missing)."""
    global _MODULES
    if _MODULES is not None:
        return _MODULES
    src = str(source_dir())
    if Path(src).is_dir() and src not in sys.path:
        sys.path.insert(0, src)
    # The extensions first, by name: gpt_model swallows a missing nanomoe_ops and fails only at the
    # first call.
    import megablocks_ops  # noqa: F401
    import nanomoe_ops  # noqa: F401
    import stk

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grouped GEMM not available")
        import gpt_model
        import megablocks
        from megablocks import ops
        from megablocks.layers.relu_squared import relu_squared
    if not hasattr(gpt_model, "MoEMLP"):
        raise ImportError(f"the gpt_model imported from {gpt_model.__file__} has no MoEMLP: not "
                          f"megablocks-variable's")
    _MODULES = SimpleNamespace(stk=stk, megablocks=megablocks, ops=ops,
                               relu_squared=relu_squared, gpt_model=gpt_model)
    return _MODULES


def unavailable(device) -> str:
    """Why the provider cannot run on ``device`` here ("" if it can)."""
    try:
        _modules()
    except ImportError as exc:
        return (f"cannot import megablocks-variable from {source_dir()} ({exc}); build it on a GPU "
                f"machine with `python -m vmoe.bench.megablocks_variable build "
                f"build/megablocks/megablocks-variable.tar.gz` and install stanford-stk 0.7.1 "
                f"(`pip install --no-deps build/megablocks/stanford_stk-0.7.1-py3-none-any.whl`)")
    if torch.device(device).type != "cuda":
        return "its CUDA extensions need a GPU"
    return ""


@functools.cache
def _layer(widths: tuple, k: int, device: str):
    """The fork's ``MoEMLP`` for these widths and k, for its routing buffers only.

    Its router and weights are never used, so it is built with n_embd = 1: the buffers that the
    routing methods read (block counts and offsets per expert) depend on the widths alone.
    """
    m = _modules()
    cfg = m.gpt_model.GPTConfig(n_embd=1, expert_sizes=[(1, f) for f in widths], num_active_experts=k)
    return m.gpt_model.MoEMLP(cfg).to(device)


def megablocks_variable_moe(x, ids, w, w1, w2, widths, activation):
    """``y[t] = sum_j w[t, j] * relu(x[t] @ W1_e)^2 @ W2_e`` through the fork's variable-width layer,
    for the given top-k ``ids`` [T, k] and weights ``w`` [T, k] (see the module docstring)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"megablocks_variable computes relu2 only, got activation={activation!r}")
    m = _modules()
    layer = _layer(tuple(widths), ids.shape[1], str(x.device))
    bin_ids, indices, tokens_per_expert = layer._sort_tokens_by_expert(ids.reshape(-1))
    padded_bins, topology, padded_tokens = layer._create_topology(x, tokens_per_expert)
    bins = m.ops.inclusive_cumsum(tokens_per_expert, 0).contiguous()
    xp = layer._gather_tokens(x, indices, bin_ids, bins, padded_bins, padded_tokens)
    h = m.relu_squared(m.stk.ops.sdd(xp, w1, topology))
    yp = m.stk.ops.dsd(h, w2)
    return layer._scatter_tokens(yp, indices, bin_ids, w.reshape(-1), bins, padded_bins)


# Building.


class BuildError(RuntimeError):
    pass


def _cuda_home() -> str | None:
    """The CUDA toolkit's root: torch guesses it from ``which nvcc`` without resolving links, which
    misses a wrapper or link in /usr/local/bin."""
    nvcc = shutil.which("nvcc")
    candidates = ([Path(os.path.realpath(nvcc)).parent.parent] if nvcc else []) + [Path("/usr/local/cuda")]
    return next((str(c) for c in candidates if (c / "include" / "cuda_runtime.h").exists()), None)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _built(out: Path) -> list[Path]:
    return [p for name in EXTENSIONS for p in sorted(out.glob(f"{name}*.so"))[:1]]


def _unpack(src: Path, out: Path) -> None:
    """The fork's sources into ``out`` (emptied first): from a tarball, or copied from a folder."""
    if out.exists():
        shutil.rmtree(out)
    if src.is_dir():
        shutil.copytree(src, out, ignore=shutil.ignore_patterns(".git", "build"))
        return
    out.mkdir(parents=True)
    with tarfile.open(src) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: refuse links out of `out`
            tar.extractall(out, filter="data")
        else:
            tar.extractall(out)
    # `git archive --prefix=name/` puts everything under one folder; the build wants setup.py on top.
    children = list(out.iterdir())
    if not (out / "setup.py").exists() and len(children) == 1 and (children[0] / "setup.py").exists():
        for p in children[0].iterdir():
            p.rename(out / p.name)
        children[0].rmdir()
    if not (out / "setup.py").exists():
        raise BuildError(f"{src} holds no setup.py (at its top or under one folder): not the fork's sources")


def _failure(log: Path, what: str) -> str:
    lines = log.read_text(errors="replace").splitlines()
    keys = ("error", "cuda_home", "no cuda")
    errors = [line for line in lines if any(k in line.lower() for k in keys) and "-Werror" not in line][:15]
    parts = [f"{what}; full log: {log}"]
    if errors:
        parts += ["first lines that name an error or CUDA_HOME:", *errors]
    parts += [f"last {min(40, len(lines))} lines of the log:", *lines[-40:]]
    return "\n".join(parts)


def build(src=TARBALL, out_dir=None, arch: str = "9.0", jobs: int | None = None) -> Path:
    """Unpack the fork (a tarball, or a source folder) into ``out_dir`` (default :func:`source_dir`)
    and compile its CUDA extensions in place: ``TORCH_CUDA_ARCH_LIST=arch MAX_JOBS=jobs python
    setup.py build_ext --inplace``. A tarball already built there (same sha256) is not rebuilt.
    Returns the built folder; raises :class:`BuildError` with the compiler's errors and the log's tail."""
    src, out = Path(src), Path(out_dir) if out_dir else source_dir()
    if not src.exists():
        raise BuildError(f"src: {src} does not exist (the fork's tarball or source folder)")
    stamp = f"{_digest(src)} {torch.__version__}" if src.is_file() else None
    if stamp and (out / STAMP).exists() and (out / STAMP).read_text() == stamp and len(_built(out)) == 2:
        print(f"megablocks-variable already built in {out} from {src.name} for torch {torch.__version__}")
        return out
    _unpack(src, out)
    # Its [project] table only restates setup.py's metadata with the torch 2.12 pin, and setuptools
    # validates it on every setup.py run (warning that it will stop accepting its license table).
    if (out / "pyproject.toml").exists():
        (out / "pyproject.toml").rename(out / "pyproject.toml.orig")
    env = dict(os.environ)
    env.setdefault("TORCH_CUDA_ARCH_LIST", arch)
    env.setdefault("MAX_JOBS", str(jobs or os.cpu_count() or 1))
    if not env.get("CUDA_HOME") and _cuda_home():
        env["CUDA_HOME"] = _cuda_home()
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    print(f"building megablocks-variable in {out}: TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} "
          f"MAX_JOBS={env['MAX_JOBS']} CUDA_HOME={env.get('CUDA_HOME', '(torch guesses)')} "
          f"{' '.join(cmd[1:])} (torch {torch.__version__})", flush=True)
    log = out / "build.log"
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=out, env=env, stdout=fh, stderr=subprocess.STDOUT,
                            check=False).returncode
    if rc:
        raise BuildError(_failure(log, f"`{' '.join(cmd[1:])}` failed with exit status {rc}"))
    missing = [n for n in EXTENSIONS if not list(out.glob(f"{n}*.so"))]
    if missing:
        # setup.py skips the extensions, with only a warning, for a CPU torch or without CUDA_HOME.
        raise BuildError(_failure(log, f"setup.py succeeded but built no {', '.join(missing)} "
                                       f"(torch {torch.__version__}, CUDA_HOME {env.get('CUDA_HOME')})"))
    probe = f"import sys; sys.path.insert(0, {str(out)!r}); import torch, " + ", ".join(EXTENSIONS)
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    if res.returncode:
        raise BuildError(f"built {', '.join(p.name for p in _built(out))} but importing them fails:\n"
                         f"{res.stderr.strip()[-3000:]}")
    if stamp:
        (out / STAMP).write_text(stamp)
    print("built " + ", ".join(p.name for p in _built(out)))
    return out


# The commands run on the GPU machine.


def _check_configs():
    from vmoe.bench.harness import BenchConfig

    # Mixed widths with one expert left empty; the uniform d=768 layer; k = 1 (the scatter's copy
    # path rather than its fused top-k sum) with T not a multiple of 128.
    return [(BenchConfig("check-d256-2x128+2x256+2x384-k2", 512, 256, 2, ((2, 128), (2, 256), (2, 384)),
                         "relu2"), 1),
            (BenchConfig("check-d768-8x768-k2", 1024, 768, 2, ((8, 768),), "relu2"), None),
            (BenchConfig("check-d128-3x128+1x256-k1", 300, 128, 1, ((3, 128), (1, 256)), "relu2"), None)]


def _syncs(fn) -> int:
    """How many synchronizing CUDA calls torch's sync debug mode reports while ``fn()`` runs."""
    torch.cuda.synchronize()  # host-ok: not timed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(c.message) for c in caught)


def check(dtype: torch.dtype = torch.bfloat16) -> int:
    """Compare :func:`megablocks_variable_moe` (output and every gradient) with the float64
    reference on small configs, and count its host synchronizations. Returns 0 if all pass."""
    from vmoe.bench import harness as bench
    from vmoe.testing import tolerance

    reason = unavailable("cuda")
    if reason:
        print(f"megablocks_variable: {reason}")
        return 1
    m = _modules()
    device = torch.device("cuda")
    print(f"megablocks-variable from {Path(m.gpt_model.__file__).parent}; stk from "
          f"{Path(m.stk.__file__).parent}; torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(device)}, {str(dtype)[6:]}")
    failed = 0
    for cfg, empty in _check_configs():
        inp = bench.make_inputs(cfg, device, dtype, dense=False)
        if empty is not None:
            others = [e for e in range(cfg.E) if e != empty]
            inp.ids = torch.tensor([[others[(t + j) % len(others)] for j in range(cfg.k)]
                                    for t in range(cfg.T)], device=device)
        ref = bench.reference_outputs(cfg, inp, grads=True)
        case = bench._Case("megablocks_variable", cfg, inp, "fwdbwd")
        errs = case.errors(ref)
        bad = {n: v for n, v in errs.items() if not v <= tolerance(dtype)}
        failed += bool(bad)
        with torch.no_grad():
            fwd_syncs = _syncs(case.forward)
        out = case.forward()
        bwd_syncs = _syncs(lambda: case.backward(out))
        case.clear_grads()
        print(f"{cfg.name}: rel_err " + ", ".join(f"{n} {v:.2e}" for n, v in errs.items())
              + f" (tolerance {tolerance(dtype):g}){' FAILED' if bad else ''}; host syncs: forward "
              f"{fwd_syncs}, backward {bwd_syncs}", flush=True)
    return 1 if failed else 0


BENCH_ARGS = ("--configs", "widths", "--quick", "--providers", "vmoe", "megablocks_variable", "vmoe_graph",
              "stk", "dense_graph")


def bench(out_csv, harness_args=None) -> int:
    """``python -m vmoe.bench --out out_csv`` with ``harness_args`` (default :data:`BENCH_ARGS`: the
    quick widths suite, eager vmoe and megablocks_variable side by side, the stk baseline, and
    vmoe and dense replayed from CUDA graphs)."""
    from vmoe.bench import harness

    reason = unavailable("cuda")
    if reason:
        print(f"megablocks_variable: {reason}")
        return 1
    return harness.main(["--out", str(out_csv), *(harness_args or BENCH_ARGS)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmoe.bench.megablocks_variable",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="unpack the fork and compile its CUDA extensions in place")
    b.add_argument("src", nargs="?", default=str(TARBALL),
                   help=f"tarball or source folder (default {TARBALL})")
    b.add_argument("--out", help="where to build (default $VMOE_MEGABLOCKS_VARIABLE, else "
                                 "build/megablocks-variable)")
    b.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST, unless already set (default 9.0)")
    b.add_argument("--jobs", type=int, help="MAX_JOBS, unless already set (default: the CPU count)")
    sub.add_parser("check", help="compare with the float64 reference in bf16, count host syncs")
    t = sub.add_parser("bench", help="time it beside vmoe with python -m vmoe.bench")
    t.add_argument("out_csv")
    t.add_argument("harness_args", nargs=argparse.REMAINDER,
                   help=f"options for python -m vmoe.bench, replacing {' '.join(BENCH_ARGS)}")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            build(args.src, args.out, args.arch, args.jobs)
        except BuildError as exc:
            print(f"BUILD FAILED: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "check":
        return check()
    return bench(args.out_csv, args.harness_args)


if __name__ == "__main__":
    sys.exit(main())
