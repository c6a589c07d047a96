"""Set-up shared by the notebooks: the device, problem sizes, checks, and deterministic figures.

Imported by every notebook (nbval runs them with notebooks/ as the working directory). Package
code lives in vmoe, and the device, sizes and rel_err come from vmoe.testing, as the tests' do;
this file holds only notebook plumbing and the plot helpers several notebooks share.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

from tqdm import TqdmWarning

# The interpreter must be chosen before triton is imported; without a GPU the kernels run on the
# CPU through it, which is how CI executes the notebooks.
try:
    import torch as _torch
    _HAS_CUDA = _torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# tqdm warns on stderr, which nbval compares, when ipywidgets is missing (transformers imports
# tqdm.auto); whether it is installed is no concern of the notebooks.
warnings.filterwarnings("ignore", category=TqdmWarning)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from vmoe import testing  # noqa: E402  (after TRITON_INTERPRET above)
from vmoe.testing import ON_GPU, rel_err, sizes  # noqa: E402, F401  (re-exported for the notebooks)

DEVICE = torch.device(testing.DEVICE)
if not ON_GPU:
    # A CPU BLAS may split a product over as many threads as the machine's load allows, and the
    # split changes the last bits; one thread keeps a re-run's figures byte-identical.
    torch.set_num_threads(1)
FIGURES = Path(__file__).resolve().parent.parent / "figures"

sns.set_theme(style="whitegrid", context="notebook")
plt.rcParams["svg.hashsalt"] = "vmoe"  # stable element ids, so a re-run leaves git clean
plt.rcParams["figure.dpi"] = 100


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Print a pass/fail line (never the raw error, which varies between machines)."""
    err = rel_err(out, ref)
    print(f"{name}: {'PASS' if err <= tol else 'FAIL'} (rel err < {tol:g})")
    assert err <= tol, f"{name}: rel err {err:.3e} > {tol:g}"


def savefig(fig, name: str) -> Path:
    """Write ``figures/<name>.svg`` byte-for-byte reproducibly (no date, fixed hash salt)."""
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / f"{name}.svg"
    fig.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight")
    return path


def show(fig, name: str) -> None:
    """Write ``figures/<name>.svg``, then show the figure inline as a PNG (nbval skips PNGs)."""
    from IPython.display import Image, display

    savefig(fig, name)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    display(Image(buf.getvalue()))


def exact(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """Print a pass/fail line for bitwise equality (integers, copies, fixed-order sums)."""
    out, ref = out.cpu(), ref.cpu()
    if not out.is_floating_point():
        out, ref = out.long(), ref.long()
    ok = out.shape == ref.shape and torch.equal(out, ref)
    print(f"{name}: {'PASS' if ok else 'FAIL'} (exact)")
    assert ok, name


GROUP_PALETTES = ("Blues", "Greens", "Oranges", "Purples", "Reds")


def expert_colors(expert_sizes) -> list:
    """One color per expert of ``expert_sizes`` ``[(count, width), ...]``: one hue per width group,
    one shade per expert, so the groups read at a glance."""
    colors = []
    for (count, _), name in zip(expert_sizes, GROUP_PALETTES):
        colors += sns.color_palette(name, count + 3)[2:2 + count]
    return colors


def group_edges(widths) -> list:
    """Column offsets where the width changes: the boundaries of the (count, width) groups."""
    o = np.concatenate([[0], np.cumsum(widths)])
    return [0] + [int(o[e]) for e in range(1, len(widths)) if widths[e] != widths[e - 1]] + [int(o[-1])]


def make_problem(T: int, d: int, widths, k: int, g: int = 1, seed: int = 0, dtype=torch.float64):
    """``[x, ids, weights, w1, w2]`` on DEVICE for ``expert_mlp``: k distinct experts per token from
    a softmax top-k over random logits, as in MoEMLP, with the k weights renormalised; ``g`` = 2
    gives w1 the gate and up halves of swiglu. Drawn on the CPU, so every device sees the same."""
    gen = torch.Generator().manual_seed(seed)
    E, F = len(widths), sum(widths)
    x = torch.randn(T, d, generator=gen, dtype=dtype)
    probs, ids = torch.randn(T, E, generator=gen).softmax(-1).topk(k, dim=-1)
    weights = (probs / probs.sum(-1, keepdim=True)).to(dtype)
    w1 = torch.randn(d, g * F, generator=gen, dtype=dtype) / d ** 0.5
    w2 = torch.randn(F, d, generator=gen, dtype=dtype) / F ** 0.5
    return [t.to(DEVICE) for t in (x, ids, weights, w1, w2)]


@contextlib.contextmanager
def count_triton_launches():
    """The names of the Triton kernels launched inside the block, in launch order."""
    launches = []
    launch = triton.runtime.jit.KernelInterface.__getitem__

    def counting(kernel, grid):
        fn = kernel.fn  # through the heuristics and autotuning wrappers, to the jitted function
        while not hasattr(fn, "__name__"):
            fn = fn.fn
        launches.append(fn.__name__)
        return launch(kernel, grid)

    triton.runtime.jit.KernelInterface.__getitem__ = counting
    try:
        yield launches
    finally:
        triton.runtime.jit.KernelInterface.__getitem__ = launch


def write_tidy(frame, name: str, float_format: str = "%.4g") -> Path:
    """``figures/<name>.csv``: the data a figure was drawn from, beside it, in a fixed float format
    so that a re-run is byte-identical."""
    path = FIGURES / f"{name}.csv"
    frame.to_csv(path, index=False, float_format=float_format, lineterminator="\n")
    return path
