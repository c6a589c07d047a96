"""The benchmark's results: the CSV rows it writes, and the tables and README block built from them.

:mod:`vmoe.bench` measures and calls :func:`write_rows`; ``notebooks/07_bench.ipynb`` and the
README read the CSV back through :func:`load_results`, :func:`speedup_table` and
:func:`markdown_table` (all re-exported by :mod:`vmoe.bench`). Nothing here needs a GPU or torch.
"""
from __future__ import annotations

import csv
import math
import os
import re
import subprocess
from pathlib import Path

COLUMNS = ["config", "provider", "mode", "scope", "ms_p50", "ms_p20", "ms_p80", "tflops", "rel_err",
           "ok", "peak_mem_mb", "gpu", "torch", "triton", "vmoe_commit", "T", "d", "k", "E", "widths",
           "activation", "dtype", "applicable", "reason", "timer"]
TEXT_COLUMNS = ("config", "provider", "mode", "scope", "gpu", "torch", "triton", "vmoe_commit", "widths",
                "activation", "dtype", "reason", "timer")
# A row is replaced, not duplicated, when the same measurement is taken again.
ROW_KEY = ("gpu", "dtype", "config", "provider", "mode", "scope")
# Rows written before the scope column existed all timed the expert computation alone.
DEFAULTS = {"scope": "expert"}

README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def gpu_slug(name: str) -> str:
    """A short file name for a device: "NVIDIA H100 80GB HBM3" -> "h100", "cpu" -> "cpu"."""
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name.replace("NVIDIA", ""))
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def gpu_name(device) -> str:
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def environment(device) -> dict:
    """What every measurement row records about where it ran: gpu, torch, triton, vmoe_commit."""
    import torch
    import triton

    return {"gpu": gpu_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "vmoe_commit": vmoe_commit()}


def vmoe_commit() -> str:
    """``git rev-parse --short HEAD``, with "+dirty" when vmoe/ has uncommitted changes; else "unknown"."""
    if os.environ.get("VMOE_COMMIT"):  # a copy of the tree without its .git names its commit here
        return os.environ["VMOE_COMMIT"]
    here = Path(__file__).resolve().parent

    def git(*args):
        res = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10,
                             check=False)
        return res.stdout.strip() if res.returncode == 0 else None

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def progress(total: int):
    """(tqdm bar or None, the function to log through) for a sweep of ``total`` measurements."""
    disable = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes", "on")
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None, print
    bar = tqdm(total=total, desc="vmoe.bench", unit="run", disable=disable, dynamic_ncols=True)
    return bar, bar.write


def summary(row: dict) -> str:
    """One line per measured row, for the sweep's log."""
    head = f"{row['config']:<40} {row['provider']:<13} {row['mode']:<6} {row['scope']:<6}"
    if row["applicable"] is False:
        return f"{head} n/a: {row['reason']}"
    if row["reason"].startswith("error"):
        return f"{head} {row['reason']}"
    ok = {True: "ok", False: "FAIL", "": "-"}[row["ok"]]
    return (f"{head} {row['ms_p50']:9.4f} ms {row['tflops']:8.2f} TFLOP/s  rel_err "
            f"{row['rel_err']:.1e} {ok}")


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_rows(path, rows: list[dict]) -> None:
    """Write ``rows`` into the CSV at ``path``, replacing rows with the same key and keeping the rest."""
    path = Path(path)
    kept = []
    if path.exists():
        with open(path, newline="") as fh:
            new_keys = {_key(r) for r in rows}
            kept = [r for r in csv.DictReader(fh) if _key(r) not in new_keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in kept:
            writer.writerow({c: r.get(c) or DEFAULTS.get(c, "") for c in COLUMNS})
        for r in rows:
            writer.writerow({c: _fmt(r[c]) for c in COLUMNS})
    os.replace(tmp, path)


def _key(row: dict) -> tuple:
    return tuple(str(row.get(c) or DEFAULTS.get(c, "")) for c in ROW_KEY)


def benchmark_csvs(folder) -> list:
    """The benchmark's CSVs in ``folder`` (``python -m vmoe.bench`` writes ``<gpu>.csv`` there):
    those whose header starts with the benchmark's columns, so that other measurements kept beside
    them (the training runs' ``train_<gpu>.csv``) are not read as benchmark rows."""
    from pathlib import Path

    out = []
    for path in sorted(Path(folder).glob("*.csv")):
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
        if {"config", "provider", "mode", "ms_p50"} <= set(header):
            out.append(path)
    return out


def load_results(path):
    """The CSV as a DataFrame, with ``ok`` and ``applicable`` as nullable booleans, and ``scope``
    ("expert" for rows written before the column existed)."""
    import pandas as pd

    # Text columns stay text: a commit such as 329e820 or a version such as 3.10 would otherwise
    # be read as a number (inf, 3.1).
    df = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})
    for c in ("ok", "applicable"):
        df[c] = df[c].map(_as_bool).astype("boolean")
    return _with_defaults(df)


def _with_defaults(df):
    """``df`` with the columns an older CSV lacks filled in (scope: expert)."""
    missing = {c: v for c, v in DEFAULTS.items() if c not in df.columns or df[c].isna().any()}
    if not missing:
        return df
    df = df.copy()
    for c, v in missing.items():
        df[c] = df[c].fillna(v) if c in df.columns else v
    return df


def _as_bool(v):
    if isinstance(v, str):
        return {"true": True, "false": False}.get(v.strip().lower())
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    try:
        import pandas as pd
        if v is pd.NA:
            return None
    except ImportError:
        pass
    return bool(v)


SPEEDUP_COLUMNS = ["vmoe_ms", "vmoe_tflops", "vmoe_over_dense", "stk_over_vmoe",
                   "grouped_mm_over_vmoe", "naive_over_vmoe"]


def speedup_table(df, scope: str = "expert"):
    """Per (gpu, dtype, config, mode) of one scope: vmoe's p50 ms and TFLOP/s, vmoe time / dense time
    (1 is the ceiling), and each other provider's time / vmoe time (above 1: vmoe is faster).

    Only rows that ran and passed their check count; a missing or failed provider gives NaN.
    """
    import pandas as pd

    df = _with_defaults(df)
    df = df[df["scope"] == scope]
    keys = ["gpu", "dtype", "config", "mode"]
    ok = df["ok"].map(_as_bool).map(lambda v: v is not False)
    ran = df["applicable"].map(_as_bool).map(lambda v: v is not False) & df["ms_p50"].notna()
    good = df[ok & ran]
    order = df[keys].drop_duplicates()
    ms = good.pivot_table(index=keys, columns="provider", values="ms_p50", aggfunc="min")
    tf = good.pivot_table(index=keys, columns="provider", values="tflops", aggfunc="max")
    ms = ms.reindex(pd.MultiIndex.from_frame(order))
    tf = tf.reindex(ms.index)

    def col(frame, name):
        return frame[name] if name in frame.columns else pd.Series(float("nan"), index=frame.index)

    vmoe = col(ms, "vmoe")
    out = pd.DataFrame(index=ms.index)
    out["vmoe_ms"] = vmoe
    out["vmoe_tflops"] = col(tf, "vmoe")
    out["vmoe_over_dense"] = vmoe / col(ms, "dense")
    for p in ("stk", "grouped_mm", "naive"):
        out[f"{p}_over_vmoe"] = col(ms, p) / vmoe
    return out.reset_index()[keys + SPEEDUP_COLUMNS]


INTRO = ("`fwd` is the forward, `fwdbwd` forward + backward. vmoe ÷ dense is vmoe's time over "
         "a dense MLP with the same useful FLOPs (1.00× is the ceiling); X ÷ vmoe is X's time "
         "over vmoe's (above 1: vmoe is faster).")
GRAPH_NOTE = ("vmoe graph ms is the same computation captured in a CUDA graph and replayed "
              "(no launch overhead); – where not measured.")
LAYER_INTRO = ("Layer scope: the whole `MoEMLP` as a training step calls it (router, top-k, aux losses, "
               "experts; fwdbwd also backpropagates `(out*dy).sum() + sum(aux)`). grouped_mm is the same "
               "layer in torch ops, dense a dense MLP of the same useful FLOPs plus the router GEMM; "
               "vmoe compiled ms is `torch.compile(MoEMLP)`, and grouped_mm compiled the grouped_mm layer "
               "under `torch.compile` (both default mode).")
# (header, format, cell) per column; ``cell(r, extra)`` reads a speedup-table row and the other
# providers' times.
_EXPERT_COLS = [("vmoe ms", "{:.3f}", lambda r, x: r.vmoe_ms),
                ("vmoe graph ms", "{:.3f}", lambda r, x: x["vmoe_graph"]),
                ("vmoe TFLOP/s", "{:.1f}", lambda r, x: r.vmoe_tflops),
                ("vmoe ÷ dense", "{:.2f}×", lambda r, x: r.vmoe_over_dense),
                ("stk ÷ vmoe", "{:.2f}×", lambda r, x: r.stk_over_vmoe),
                ("grouped_mm ÷ vmoe", "{:.2f}×", lambda r, x: r.grouped_mm_over_vmoe),
                ("naive ÷ vmoe", "{:.2f}×", lambda r, x: r.naive_over_vmoe)]
_LAYER_COLS = (_EXPERT_COLS[:2] + [("vmoe compiled ms", "{:.3f}", lambda r, x: x["vmoe_compiled"])]
               + _EXPERT_COLS[2:4] + _EXPERT_COLS[5:6]
               + [("grouped_mm compiled ÷ vmoe compiled", "{:.2f}×",
                   lambda r, x: x["grouped_mm_compiled"] / x["vmoe_compiled"])])


def _table(df, scope: str, cols) -> list[str]:
    """The markdown lines of one scope's table; ``df`` holds one GPU's rows."""
    passed = df[(df["scope"] == scope) & df["ok"].map(_as_bool).map(lambda v: v is True)]
    # The CUDA-graph replay and the compiled layer, where measured: they have no speedup column.
    extra = {p: {(r.dtype, r.config, r.mode): r.ms_p50
                 for r in passed[passed["provider"] == p].itertuples(index=False)}
             for p in ("vmoe_graph", "vmoe_compiled", "grouped_mm_compiled")}
    lines = ["| config | mode | " + " | ".join(h for h, _, _ in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for r in speedup_table(df, scope).itertuples(index=False):
        x = {p: float(t.get((r.dtype, r.config, r.mode), float("nan"))) for p, t in extra.items()}
        lines.append("| " + " | ".join([r.config, r.mode] + [_num(cell(r, x), f) for _, f, cell in cols])
                     + " |")
    return lines


def _notes(rows, prefix: str = "") -> list[str]:
    notes = []
    failed = rows[rows["ok"].map(_as_bool).map(lambda v: v is False)
                  & rows["applicable"].map(_as_bool).map(lambda v: v is not False)]
    for r in failed.itertuples(index=False):
        notes.append(f"{prefix}{r.provider} on {r.config} ({r.mode}) is left out: {r.reason}")
    na = rows[rows["applicable"].map(_as_bool).map(lambda v: v is False)]
    for provider, reasons in na.groupby("provider", sort=False)["reason"]:
        notes.append(f"{prefix}{provider} n/a on {len(reasons)} row(s): {reasons.iloc[0]}")
    return notes


def markdown_table(df) -> str:
    """The README's results: per GPU, naming the GPU and versions, a markdown table of the expert
    computation and, where measured, one of the whole layer; all from the CSV."""
    import pandas as pd

    df = _with_defaults(df)
    parts = []
    for gpu in pd.unique(df["gpu"]):
        rows = df[df["gpu"] == gpu]
        versions = ", ".join(f"{c} {'/'.join(str(v) for v in pd.unique(rows[c]))}"
                             for c in ("torch", "triton", "vmoe_commit"))
        dtypes = "/".join(str(v) for v in pd.unique(rows["dtype"]))
        timers = "/".join(str(v) for v in pd.unique(rows["timer"].dropna()))
        lines = [f"Measured on **{gpu}** ({dtypes}; {versions}; timer: {timers}, median). " + INTRO, "",
                 GRAPH_NOTE, ""]
        expert, layer = rows[rows["scope"] == "expert"], rows[rows["scope"] == "layer"]
        if len(expert):
            lines += _table(rows, "expert", _EXPERT_COLS)
        if len(layer):
            lines += ["", LAYER_INTRO, ""] + _table(rows, "layer", _LAYER_COLS)
        notes = _notes(expert) + _notes(layer, "layer scope: ")
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _num(v, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def rewrite_readme(path, block: str) -> bool:
    """Replace what lies between the results markers in ``path`` (appending the markers if absent).

    Returns whether the file changed; an unchanged file is not written.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    fenced = f"{README_START}\n{block.strip()}\n{README_END}"
    start, end = text.find(README_START), text.find(README_END)
    if start >= 0 and end > start:
        new = text[:start] + fenced + text[end + len(README_END):]
    else:
        new = text.rstrip("\n") + ("\n\n" if text else "") + "## Results\n\n" + fenced + "\n"
    if new == text:
        return False
    path.write_text(new)
    return True


def regenerate(csv_paths, readme) -> None:
    """Print the markdown tables of ``csv_paths``; if ``readme`` is given, put them in its results block."""
    try:
        import pandas as pd
    except ImportError:
        print("pandas is not installed: the tables cannot be regenerated here (run "
              "`python -m vmoe.bench --from-csv CSV` where it is)")
        return
    df = pd.concat([load_results(p) for p in csv_paths], ignore_index=True)
    md = markdown_table(df)
    print(md)
    if readme:
        if rewrite_readme(readme, md):
            print(f"rewrote the results block of {readme}")
        else:
            print(f"unchanged: the results block of {readme} already matches the CSV")
