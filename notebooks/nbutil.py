"""Set-up shared by the notebooks: the device, problem sizes, and deterministic figures.

Imported by every notebook (nbval runs them with notebooks/ as the working directory). Package
code lives in vmoe; this file holds only notebook plumbing.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

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

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

DEVICE = torch.device("cuda" if _HAS_CUDA else "cpu")
ON_GPU = DEVICE.type == "cuda"
if not ON_GPU:
    # A CPU BLAS may split a product over as many threads as the machine's load allows, and the
    # split changes the last bits; one thread keeps a re-run's figures byte-identical.
    torch.set_num_threads(1)
FIGURES = Path(__file__).resolve().parent.parent / "figures"

sns.set_theme(style="whitegrid", context="notebook")
plt.rcParams["svg.hashsalt"] = "vmoe"  # stable element ids, so a re-run leaves git clean
plt.rcParams["figure.dpi"] = 100


def sizes(cpu, gpu):
    """The CPU (interpreter, CI) size or the GPU size of a problem."""
    return gpu if ON_GPU else cpu


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


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
