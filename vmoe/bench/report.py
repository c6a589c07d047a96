"""The benchmark's results: the CSV rows it writes, and the tables and README blocks built from them.

:mod:`vmoe.bench` measures and calls :func:`write_rows`; ``notebooks/07_bench.ipynb`` and the
READMEs read the CSV back through :func:`load_results`, :func:`speedup_table`,
:func:`summary_table`, :func:`elasticity_table` and :func:`markdown_table` (all re-exported by
:mod:`vmoe.bench`). ``python -m vmoe.bench --reproduce`` puts :func:`summary_markdown` (one compact
table per GPU) in ``README.md`` and :func:`markdown_table` (every row) in ``results/README.md``.
The widths suite (configs ``widths-…``, balanced routing) has a table of its own, its elasticity;
the speedup tables and the summary leave it out.

:func:`write_csv` is vmoe's one CSV writer (one float format, ``\\n`` line ends), for the
benchmark's rows and any other measurement. Nothing here needs a GPU or torch.
"""
from __future__ import annotations

import csv
import io
import math
import numbers
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
# A CSV without the scope column holds rows of the expert computation alone.
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


FLOAT_FORMAT = "{:.6g}"  # 6 significant digits: far finer than the run-to-run noise of a timing


def _fmt(v) -> str:
    """A value as :func:`write_csv` writes it: floats with :data:`FLOAT_FORMAT` ("nan" for NaN),
    None as an empty cell, anything else (ints, bools, text) as ``str`` gives it."""
    if v is None:
        return ""
    if isinstance(v, (bool, numbers.Integral)) or not isinstance(v, numbers.Real):
        return str(v)
    v = float(v)
    return "nan" if math.isnan(v) else FLOAT_FORMAT.format(v)


def write_csv(path, rows, columns=None, *, append: bool = False) -> None:
    """Write ``rows`` (dicts) to the CSV at ``path``: vmoe's one CSV writer.

    ``columns`` is the header, in order; a row's other keys are left out and its missing ones are
    empty cells. Without it the header is every key of ``rows`` in first-seen order (or, when
    appending, the file's own header). Floats get :data:`FLOAT_FORMAT`, lines end in ``\\n``.

    ``append=False`` replaces the file atomically: written beside it, fsynced, renamed over it (the
    rename fsynced too, through the folder).
    ``append=True`` adds the rows to its end (the header first if the file is new or empty) in one
    write, fsynced: once this returns the rows survive a kill, and a kill during it leaves at most
    a partial last line. A file whose header differs from ``columns`` raises ``ValueError`` rather
    than being misaligned.
    """
    path = Path(path)
    rows = list(rows)
    existing = None
    if append and path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as fh:
            existing = next(csv.reader(fh), [])
    if columns is None:
        columns = existing or list(dict.fromkeys(k for r in rows for k in r))
    columns = list(columns)
    if existing is not None and existing != columns:
        raise ValueError(f"cannot append to {path}: its columns are {existing}, the rows' are {columns}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    if existing is None:
        writer.writeheader()
    writer.writerows({c: _fmt(r.get(c)) for c in columns} for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path if append else path.with_name(path.name + ".tmp")
    with open(target, "a" if append else "w", newline="") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    if not append:
        os.replace(target, path)
        fsync_dir(path.parent)


def fsync_dir(folder) -> None:
    """Make a rename in ``folder`` durable; nothing where a folder cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_rows(path, rows: list[dict]) -> None:
    """Write the benchmark's ``rows`` into the CSV at ``path`` (:data:`COLUMNS`), replacing rows with
    the same :data:`ROW_KEY` and keeping the rest."""
    path = Path(path)
    kept = []
    if path.exists():
        with open(path, newline="") as fh:
            new_keys = {_key(r) for r in rows}
            kept = [r for r in csv.DictReader(fh) if _key(r) not in new_keys]
    kept = [{c: r.get(c) or DEFAULTS.get(c, "") for c in COLUMNS} for r in kept]
    write_csv(path, kept + list(rows), COLUMNS)


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
    ("expert" where a CSV has no such column)."""
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


SUMMARY_COLUMNS = ["vmoe_ms", "vmoe_graph_ms", "vmoe_tflops", "vmoe_over_dense", "stk_over_vmoe",
                   "grouped_mm_over_vmoe"]
SCOPE_ORDER = ("expert", "layer")


def family(config: str) -> str:
    """A config's family, its name up to the first "-": "seed-8x512-k2" -> "seed"."""
    return str(config).split("-", 1)[0]


WIDTHS_FAMILY = "widths"


def _split_widths(df):
    """(rows of every other family, rows of the widths suite)."""
    suite = df["config"].map(family) == WIDTHS_FAMILY
    return df[~suite], df[suite]


def mean_width(widths: str) -> float:
    """The mean expert width of a widths column, "16x1024+16x512+32x256" -> 512.0: under balanced
    routing every expert gets the same rows, so this is also the mean width per assignment."""
    groups = [tuple(int(v) for v in g.split("x")) for g in str(widths).split("+")]
    return sum(c * w for c, w in groups) / sum(c for c, _ in groups)


def _uniform_width(widths: str) -> float:
    """The width of a uniform widths column ("64x1024" -> 1024); NaN for a mix."""
    return float(str(widths).split("x")[1]) if "+" not in str(widths) else float("nan")


ELASTICITY_KEYS = ["gpu", "dtype", "scope", "provider", "mode", "T", "d", "k"]
ELASTICITY_COLUMNS = ["gpu", "dtype", "scope", "d", "T", "k", "E", "config", "widths", "mean_width",
                      "provider", "mode", "ms", "gflop", "tflops", "reference", "time_ratio",
                      "flop_ratio", "elasticity"]


def elasticity_table(df):
    """The widths suite's rows that ran and passed their check (dense: ran), one per
    (gpu, dtype, scope, config, provider, mode), with ``mean_width`` (:func:`mean_width`),
    ``gflop`` (the row's useful FLOPs, TFLOP/s x ms), ``reference`` (the widest uniform config of
    the same gpu, dtype, scope, provider, mode, T, d and k), ``time_ratio`` and ``flop_ratio``
    (this row's over the reference's) and ``elasticity = time_ratio / flop_ratio``: 1 where the
    time shrinks in proportion to the FLOPs, above 1 where a narrower expert loses throughput
    (it equals the reference's TFLOP/s over this row's). NaN where the reference did not run.
    An empty frame with these columns where the CSV has no such rows.
    """
    import pandas as pd

    _, suite = _split_widths(_with_defaults(df))
    ok = suite["ok"].map(_as_bool).map(lambda v: v is not False)
    ran = suite["applicable"].map(_as_bool).map(lambda v: v is not False) & suite["ms_p50"].notna()
    rows = suite[ok & ran]
    if rows.empty:
        return pd.DataFrame(columns=ELASTICITY_COLUMNS)
    out = rows.assign(ms=rows["ms_p50"].astype(float), tflops=rows["tflops"].astype(float),
                      mean_width=rows["widths"].map(mean_width))
    out["gflop"] = out["tflops"] * out["ms"]
    # The reference is the widest uniform config of each group among every row of the suite, so
    # that where it did not run (or failed) the group has no elasticity rather than another one.
    uniform = suite.assign(uniform=suite["widths"].map(_uniform_width)).dropna(subset=["uniform"])
    ref = (uniform.sort_values("uniform", ascending=False, kind="stable")
           .drop_duplicates(ELASTICITY_KEYS)[ELASTICITY_KEYS + ["config"]]
           .rename(columns={"config": "reference"}))
    timed = out[ELASTICITY_KEYS + ["config", "ms", "gflop"]].rename(
        columns={"config": "reference", "ms": "ref_ms", "gflop": "ref_gflop"})
    out = out.merge(ref, on=ELASTICITY_KEYS, how="left").merge(timed, on=ELASTICITY_KEYS + ["reference"],
                                                               how="left")
    out["time_ratio"] = out["ms"] / out["ref_ms"]
    out["flop_ratio"] = out["gflop"] / out["ref_gflop"]
    out["elasticity"] = out["time_ratio"] / out["flop_ratio"]
    return out[ELASTICITY_COLUMNS].reset_index(drop=True)


def summary_table(df):
    """Per (gpu, dtype, scope, family, mode): ``configs``, how many of the family's configs vmoe ran;
    ``vmoe_commit``, the commits of those vmoe rows ("/"-joined); and for each of
    :data:`SUMMARY_COLUMNS` its ``<column>_min`` and ``<column>_max`` over them (NaN where none
    has it). The columns are :func:`speedup_table`'s, with ``vmoe_graph_ms``, the CUDA-graph
    replay's p50, beside them; only rows that passed their check count. The widths suite is left
    out: its measure is :func:`elasticity_table`.
    """
    import pandas as pd

    df, _ = _split_widths(_with_defaults(df))
    keys = ["gpu", "dtype", "scope", "config", "mode"]
    scopes = sorted(pd.unique(df["scope"]), key=lambda s: (s not in SCOPE_ORDER, SCOPE_ORDER.index(s)
                                                           if s in SCOPE_ORDER else 0))
    per_config = []
    for scope in scopes:
        t = speedup_table(df, scope)
        t.insert(2, "scope", scope)
        per_config.append(t)
    t = pd.concat(per_config, ignore_index=True)
    t = t[t["vmoe_ms"].notna()]
    passed = df[df["ok"].map(_as_bool).map(lambda v: v is True)]
    index = pd.MultiIndex.from_frame(t[keys])
    graph = passed[passed["provider"] == "vmoe_graph"].groupby(keys)["ms_p50"].min()
    t["vmoe_graph_ms"] = graph.reindex(index).to_numpy()
    commit = passed[passed["provider"] == "vmoe"].groupby(keys)["vmoe_commit"].first()
    t["vmoe_commit"] = commit.reindex(index).to_numpy()
    t["family"] = t["config"].map(family)
    groups = t.groupby(["gpu", "dtype", "scope", "family", "mode"], sort=False)
    out = groups.agg(configs=("config", "nunique"),
                     vmoe_commit=("vmoe_commit", lambda c: "/".join(str(v) for v in pd.unique(c.dropna()))),
                     **{f"{c}_{f}": (c, f) for c in SUMMARY_COLUMNS for f in ("min", "max")})
    return out.reset_index()


SUMMARY_INTRO = ("Each row sums up one family of configs at one scope (`expert`: the expert computation on a "
                 "given routing; `layer`: the whole `MoEMLP`, router and aux losses included) and mode "
                 "(`fwd` forward, `fwdbwd` forward + backward); a cell is the range over the family's "
                 "configs, and `results/README.md` has every row. vmoe ms is the median of one eager call, "
                 "vmoe graph ms the same calls replayed from a CUDA graph, with no host launch cost; "
                 "TFLOP/s counts useful FLOPs only. "
                 "vmoe ÷ dense is vmoe's time over a dense MLP with the same useful FLOPs (plus the router "
                 "GEMM at layer scope): 1.00× would match it. stk ÷ vmoe and grouped_mm ÷ vmoe are that "
                 "baseline's time over vmoe's: above 1, vmoe is faster.")
# (header, format, suffix, column) per range column of the summary.
_SUMMARY_COLS = [("vmoe ms", "{:.3f}", "", "vmoe_ms"), ("vmoe graph ms", "{:.3f}", "", "vmoe_graph_ms"),
                 ("vmoe TFLOP/s", "{:.1f}", "", "vmoe_tflops"),
                 ("vmoe ÷ dense", "{:.2f}", "×", "vmoe_over_dense"),
                 ("stk ÷ vmoe", "{:.2f}", "×", "stk_over_vmoe"),
                 ("grouped_mm ÷ vmoe", "{:.2f}", "×", "grouped_mm_over_vmoe")]


def _range(lo, hi, fmt: str, suffix: str) -> str:
    """"lo–hi" with the suffix once ("13.60–35.91×"), one value where both print alike, "–" for none."""
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return "–"
    a, b = fmt.format(lo), fmt.format(hi)
    return (a if a == b else f"{a}–{b}") + suffix


def _card(rows) -> str:
    """"**gpu** (dtypes; torch …, triton …; timer: …, median)" for one GPU's rows."""
    import pandas as pd

    versions = ", ".join(f"{c} {'/'.join(str(v) for v in pd.unique(rows[c]))}" for c in ("torch", "triton"))
    dtypes = "/".join(str(v) for v in pd.unique(rows["dtype"]))
    timers = "/".join(str(v) for v in pd.unique(rows["timer"].dropna()))
    return f"**{pd.unique(rows['gpu'])[0]}** ({dtypes}; {versions}; timer: {timers}, median)"


def summary_markdown(df) -> str:
    """README.md's results: :data:`SUMMARY_INTRO`, then per GPU its name and versions and one
    compact table of :func:`summary_table`'s ranges; all from the CSV."""
    import pandas as pd

    df, _ = _split_widths(_with_defaults(df))
    table = summary_table(df)
    parts = [SUMMARY_INTRO]
    header = ["configs", "scope", "mode", "vmoe commit"] + [h for h, *_ in _SUMMARY_COLS]
    for gpu in pd.unique(df["gpu"]):
        lines = [_card(df[df["gpu"] == gpu]), "", "| " + " | ".join(header) + " |",
                 "|---|---|---|---|" + "---:|" * len(_SUMMARY_COLS)]
        for r in table[table["gpu"] == gpu].itertuples(index=False):
            cells = [f"{r.family} ({r.configs})", r.scope, r.mode, r.vmoe_commit]
            cells += [_range(getattr(r, f"{c}_min"), getattr(r, f"{c}_max"), f, sfx)
                      for _, f, sfx, c in _SUMMARY_COLS]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


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


WIDTHS_INTRO = ("The width sweep (`widths-` configs, `make bench-widths`): relu², expert scope, balanced "
                "routing (every expert receives exactly T·k/E of the assignments), so the useful FLOPs "
                "follow the mean width f̄. A `_graph` provider is the calls replayed from a CUDA graph: "
                "the GPU's time without the host's launches. Elasticity is a row's time over that of the "
                "widest uniform config of the same d, provider and mode, divided by its FLOPs over that "
                "config's: 1.00 means the time shrinks in proportion to the FLOPs, above 1 a narrower "
                "expert loses throughput.")
WIDTHS_PROVIDER_ORDER = ("vmoe_graph", "vmoe", "grouped_mm_graph", "grouped_mm", "dense_graph", "dense")


def _widths_table(suite) -> list[str]:
    """The markdown lines of the widths suite's table (one GPU's rows): per config and mode, each
    provider's median ms and elasticity."""
    import pandas as pd

    el = elasticity_table(suite)
    present = list(pd.unique(suite["provider"]))
    providers = ([p for p in WIDTHS_PROVIDER_ORDER if p in present]
                 + [p for p in present if p not in WIDTHS_PROVIDER_ORDER])
    cells = {(r.config, r.mode, r.provider): (r.ms, r.elasticity) for r in el.itertuples(index=False)}
    modes = sorted(pd.unique(suite["mode"]), key=lambda m: (m != "fwd", m))
    lines = ["| config | f̄ | mode | " + " | ".join(f"{p} ms | {p} elasticity" for p in providers) + " |",
             "|---|---:|---|" + "---:|---:|" * len(providers)]
    configs = suite.drop_duplicates("config")[["config", "widths"]]
    for config, widths in configs.itertuples(index=False):
        for mode in modes:
            row = [config, f"{mean_width(widths):g}", mode]
            for p in providers:
                ms, el_ = cells.get((config, mode, p), (float("nan"), float("nan")))
                row += [_num(ms, "{:.3f}"), _num(el_, "{:.2f}")]
            lines.append("| " + " | ".join(row) + " |")
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
    """The full tables (``results/README.md``): per GPU, naming the GPU and versions, a markdown
    table of every config of the expert computation, where measured one of the whole layer and
    one of the widths suite (:func:`elasticity_table`); all from the CSV."""
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
        main, suite = _split_widths(rows)
        expert, layer = main[main["scope"] == "expert"], main[main["scope"] == "layer"]
        if len(expert):
            lines += _table(main, "expert", _EXPERT_COLS)
        if len(layer):
            lines += ["", LAYER_INTRO, ""] + _table(main, "layer", _LAYER_COLS)
        if len(suite):
            lines += ([""] if lines[-1] else []) + [WIDTHS_INTRO, ""] + _widths_table(suite)
        notes = _notes(expert) + _notes(layer, "layer scope: ") + _notes(suite, "widths: ")
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _num(v, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def replace_block(text: str, block: str, start_marker: str, end_marker: str) -> str | None:
    """``text`` with what lies between the two markers replaced by ``block``; None without them."""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        return None
    return text[:start] + f"{start_marker}\n{block.strip()}\n{end_marker}" + text[end + len(end_marker):]


def rewrite_readme(path, block: str) -> bool:
    """Replace what lies between the results markers in ``path`` (appending the markers if absent).

    Returns whether the file changed; an unchanged file is not written.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    new = replace_block(text, block, README_START, README_END)
    if new is None:
        fenced = f"{README_START}\n{block.strip()}\n{README_END}"
        new = text.rstrip("\n") + ("\n\n" if text else "") + "## Results\n\n" + fenced + "\n"
    if new == text:
        return False
    path.write_text(new)
    return True


def regenerate(csv_paths, readme=None, tables=None) -> None:
    """Print the summary of ``csv_paths`` (:func:`summary_markdown`) and put it in the results block
    of ``readme``; put the full tables (:func:`markdown_table`) in that of ``tables``, or print them
    when no ``tables`` file is given. Either file is left alone when ``None``."""
    try:
        import pandas as pd
    except ImportError:
        print("pandas is not installed: the tables cannot be regenerated here (run "
              "`python -m vmoe.bench --from-csv CSV` where it is)")
        return
    df = pd.concat([load_results(p) for p in csv_paths], ignore_index=True)
    summary, full = summary_markdown(df), markdown_table(df)
    print(summary if tables else summary + "\n\n" + full)
    for path, block in ((readme, summary), (tables, full)):
        if not path:
            continue
        if rewrite_readme(path, block):
            print(f"rewrote the results block of {path}")
        else:
            print(f"unchanged: the results block of {path} already matches the CSV")
