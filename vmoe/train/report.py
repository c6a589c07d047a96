"""The training study's summary in the README: one row per d=768 config of notebook 08's claims.

``python -m vmoe.train --readme README.md`` rewrites the block between :data:`README_START` and
:data:`README_END` from ``results/train_*.csv`` (``make reproduce`` runs it), and
``tests/test_train_report.py`` fails when the committed README no longer matches the committed CSVs.
Notebook 08 reads the same CSVs claim by claim, at d=384 and d=768.

A run is one (config, seed, GPU); only runs that reached their schedule's ``total_tokens`` count.
Its bpb is the final validation bpb, its realised width the final evaluation's, and its tokens/s
the median over its evaluation intervals after the first (:func:`interval_tokens_per_s`).
"""
from __future__ import annotations

import math
from pathlib import Path

from vmoe.bench.report import replace_block

README_START = "<!-- training:start -->"
README_END = "<!-- training:end -->"
BASELINE = "uniform_d768"
# The README's rows, in this order (the others are in notebook 08): uniform, the write-up's two
# mixes without and with its compute loss, the null-expert runs without and with the null bound, and
# the uniform controls at the mixes' realised widths.
README_CONFIGS = ("uniform_d768", "var5_d768", "var5_cl_d768", "var23_d768", "var23_cl_d768",
                  "var5_null_d768", "var5_null_bound_d768", "uniform_realised_d768_w960",
                  "uniform_realised_d768_w720")
RUN = ["config", "seed", "gpu"]


def interval_tokens_per_s(run) -> float:
    """A run's tokens/s: the median over its evaluation intervals after the first, because the
    first holds the compilation and autotuning; NaN with fewer than two intervals."""
    v = run["tokens_per_s"].dropna()
    return v.iloc[1:].median() if len(v) > 1 else math.nan


def finished_runs(df):
    """One row per run that reached its ``total_tokens``: its final evaluation, with ``tps``."""
    if df.empty:
        return df.assign(tps=[])
    df = df.sort_values([*RUN, "step"], kind="stable")
    final = df.groupby(RUN, sort=False).tail(1).set_index(RUN)
    final["tps"] = df.groupby(RUN, sort=False).apply(interval_tokens_per_s, include_groups=False)
    return final[final["tokens"] >= final["total_tokens"]].reset_index()


def _range(v, fmt: str) -> str:
    return fmt.format(v.mean()) + (f" ({fmt.format(v.min())}–{fmt.format(v.max())})" if len(v) > 1 else "")


def summary_markdown(df) -> str:
    """The README's table: :data:`README_CONFIGS` rows of the d=768 runs in ``df`` (the rows of
    ``results/train_*.csv``), bpb as mean (min–max over seeds) and Δ against :data:`BASELINE`."""
    runs = finished_runs(df[df["n_embd"] == 768]) if "n_embd" in df else finished_runs(df.iloc[:0])
    if runs.empty:
        return "No finished d=768 run in `results/train_*.csv` yet."
    base = runs[runs["config"] == BASELINE]
    lines = ["| config | experts | seeds | val bpb | Δ bpb | realised width | tokens/s | Δ tokens/s |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for name in README_CONFIGS:
        r = runs[runs["config"] == name]
        if r.empty:
            continue
        d_bpb = d_tps = "–"
        if not base.empty and name != BASELINE:
            d_bpb = f"{100 * (r['val_bpb'].mean() / base['val_bpb'].mean() - 1):+.2f}%"
            d_tps = f"{100 * (r['tps'].mean() / base['tps'].mean() - 1):+.0f}%"
        lines.append(f"| {name} | {r['expert_sizes'].iloc[0]} | {r['seed'].nunique()} | "
                     f"{_range(r['val_bpb'], '{:.4f}')} | {d_bpb} | {r['width'].mean():.0f} | "
                     f"{r['tps'].mean() / 1e3:.0f}k | {d_tps} |")
    gpus = " / ".join(sorted(runs["gpu"].astype(str).unique()))
    return "\n".join([f"Runs on {gpus}; `results/train_*.csv`, notebook 08 section 6.", "", *lines])


def regenerate(csv_paths, readme) -> bool:
    """Put :func:`summary_markdown` of ``csv_paths`` between ``readme``'s training markers.
    Returns whether the file changed."""
    import pandas as pd

    df = pd.concat([pd.read_csv(p) for p in csv_paths], ignore_index=True)
    path = Path(readme)
    text = path.read_text()
    new = replace_block(text, summary_markdown(df), README_START, README_END)
    if new is None:
        raise ValueError(f"{readme}: no {README_START} ... {README_END} block to rewrite")
    if new == text:
        return False
    path.write_text(new)
    return True
