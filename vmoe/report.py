"""The benchmark's results: the CSV rows it writes, and the tables and README block built from them.

:mod:`vmoe.bench` measures and calls :func:`write_rows`; ``notebooks/07_benchmarks.ipynb`` and the
README read the CSV back through :func:`load_results`, :func:`speedup_table` and
:func:`markdown_table` (all re-exported by :mod:`vmoe.bench`). Nothing here needs a GPU or torch.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

COLUMNS = ["config", "provider", "mode", "ms_p50", "ms_p20", "ms_p80", "tflops", "rel_err", "ok",
           "peak_mem_mb", "gpu", "torch", "triton", "vmoe_commit", "T", "d", "k", "E", "widths",
           "activation", "dtype", "applicable", "reason", "timer"]
TEXT_COLUMNS = ("config", "provider", "mode", "gpu", "torch", "triton", "vmoe_commit", "widths",
                "activation", "dtype", "reason", "timer")
# A row is replaced, not duplicated, when the same measurement is taken again.
ROW_KEY = ("gpu", "dtype", "config", "provider", "mode")

README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"

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
            new_keys = {tuple(str(r[c]) for c in ROW_KEY) for r in rows}
            for r in csv.DictReader(fh):
                if tuple(r.get(c, "") for c in ROW_KEY) not in new_keys:
                    kept.append(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in kept:
            writer.writerow({c: r.get(c, "") for c in COLUMNS})
        for r in rows:
            writer.writerow({c: _fmt(r[c]) for c in COLUMNS})
    os.replace(tmp, path)


def load_results(path):
    """The CSV as a DataFrame, with ``ok`` and ``applicable`` as nullable booleans."""
    import pandas as pd

    # Text columns stay text: a commit such as 329e820 or a version such as 3.10 would otherwise
    # be read as a number (inf, 3.1).
    df = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})
    for c in ("ok", "applicable"):
        df[c] = df[c].map(_as_bool).astype("boolean")
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


def speedup_table(df):
    """Per (gpu, dtype, config, mode): vmoe's p50 ms and TFLOP/s, vmoe time / dense time (1 is the
    ceiling), and each other provider's time / vmoe time (above 1: vmoe is faster).

    Only rows that ran and passed their check count; a missing or failed provider gives NaN.
    """
    import pandas as pd

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


def markdown_table(df) -> str:
    """The README's results: one markdown table per GPU, naming the GPU and versions, from the CSV."""
    import pandas as pd

    table = speedup_table(df)
    # The CUDA-graph replay of vmoe, where it was measured: the launch-free time.
    passed = df[df["provider"].eq("vmoe_graph") & df["ok"].map(_as_bool).map(lambda v: v is True)]
    graph_ms = {(r.gpu, r.dtype, r.config, r.mode): r.ms_p50 for r in passed.itertuples(index=False)}
    parts = []
    for gpu, sub in table.groupby("gpu", sort=False):
        rows = df[df["gpu"] == gpu]
        versions = ", ".join(f"{c} {'/'.join(str(v) for v in pd.unique(rows[c]))}"
                             for c in ("torch", "triton", "vmoe_commit"))
        dtypes = "/".join(str(v) for v in pd.unique(rows["dtype"]))
        timers = "/".join(str(v) for v in pd.unique(rows["timer"].dropna()))
        lines = [f"Measured on **{gpu}** ({dtypes}; {versions}; timer: {timers}, median). "
                 "`fwd` is the forward, `fwdbwd` forward + backward. vmoe ÷ dense is vmoe's time over "
                 "a dense MLP with the same useful FLOPs (1.00× is the ceiling); X ÷ vmoe is X's time "
                 "over vmoe's (above 1: vmoe is faster).", "",
                 "vmoe graph ms is the same computation captured in a CUDA graph and replayed "
                 "(no launch overhead); – where not measured.", "",
                 "| config | mode | vmoe ms | vmoe graph ms | vmoe TFLOP/s | vmoe ÷ dense | "
                 "stk ÷ vmoe | grouped_mm ÷ vmoe | naive ÷ vmoe |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sub.itertuples(index=False):
            g = graph_ms.get((r.gpu, r.dtype, r.config, r.mode), float("nan"))
            cells = [r.config, r.mode, _num(r.vmoe_ms, "{:.3f}"), _num(float(g), "{:.3f}"),
                     _num(r.vmoe_tflops, "{:.1f}"),
                     _num(r.vmoe_over_dense, "{:.2f}×"), _num(r.stk_over_vmoe, "{:.2f}×"),
                     _num(r.grouped_mm_over_vmoe, "{:.2f}×"), _num(r.naive_over_vmoe, "{:.2f}×")]
            lines.append("| " + " | ".join(cells) + " |")
        notes = []
        failed = rows[rows["ok"].map(_as_bool).map(lambda v: v is False)
                      & rows["applicable"].map(_as_bool).map(lambda v: v is not False)]
        for r in failed.itertuples(index=False):
            notes.append(f"{r.provider} on {r.config} ({r.mode}) is left out: {r.reason}")
        na = rows[rows["applicable"].map(_as_bool).map(lambda v: v is False)]
        for provider, reasons in na.groupby("provider", sort=False)["reason"]:
            notes.append(f"{provider} n/a on {len(reasons)} row(s): {reasons.iloc[0]}")
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
    """Print the markdown tables of ``csv_paths`` and, if ``readme`` is given, put them in its results block."""
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
