"""Tests of the benchmark harness: FLOP counting, applicability, the CSV it writes, the tables built
from it (the README's summary and results/README.md's full tables, checked against the committed
CSVs), and the baselines it times (against the float64 reference). No timing is asserted."""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from vmoe.bench import baselines, report
from vmoe.bench import harness as bench
from vmoe.config import gate_factor
from vmoe.testing import DEVICE, ON_GPU, rel_err, tolerance

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_COLUMNS = ["config", "provider", "mode", "scope", "ms_p50", "ms_p20", "ms_p80", "tflops", "rel_err",
                    "ok", "peak_mem_mb", "gpu", "torch", "triton", "vmoe_commit", "T", "d", "k", "E",
                    "widths", "activation", "dtype", "applicable", "reason", "timer"]


# Widths (4, 2, 6), d = 3; the routing below sends 3 assignments to expert 0, 2 to expert 1 and 3
# to expert 2, so sum_e n_e f_e = 3*4 + 2*2 + 3*6 = 34 and the forward costs 2 GEMMs * 2 * 34 * 3.
HAND_IDS = [[0, 2], [0, 1], [0, 2], [2, 1]]


@pytest.mark.parametrize("activation,mode,expected", [
    ("relu2", "fwd", 4 * 34 * 3),
    ("relu2", "fwdbwd", 3 * 4 * 34 * 3),
    ("swiglu", "fwd", (2 * 34 * 3) * 2 + 2 * 34 * 3),
    ("swiglu", "fwdbwd", 3 * ((2 * 34 * 3) * 2 + 2 * 34 * 3)),
])
def test_useful_flops_by_hand(activation, mode, expected):
    ids = torch.tensor(HAND_IDS)
    assert baselines.useful_flops(ids, (4, 2, 6), 3, activation, mode) == expected


def test_dense_width_matches_the_useful_work():
    # n = (2, 2): (2*104 + 2*20) / 4 = 62 -> the nearest multiple of 8 is 64.
    ids = torch.tensor([[0], [0], [1], [1]])
    assert baselines.dense_width(ids, (104, 20)) == 64
    # Never below 8, so the dense GEMMs keep aligned shapes.
    assert baselines.dense_width(torch.tensor(HAND_IDS), (4, 2, 6)) == 8


def test_config_sets():
    seed, large = bench.configs("seed"), bench.configs("large")
    assert len(seed) == 8 and len(large) == 8
    assert all((c.T, c.d, c.activation) == (4096, 256, "relu2") for c in seed)
    assert all((c.T, c.d, c.k) == (16384, 2048, 8) for c in large)
    assert {c.activation for c in large} == {"relu2", "swiglu"}
    every = bench.configs("all")
    assert [c.name for c in every] == [c.name for c in seed + large]
    assert len({c.name for c in every}) == len(every)
    quick = bench.configs("all", quick=True)
    assert 0 < len(quick) < len(every) and all(c in every for c in quick)
    mixed = next(c for c in seed if c.name == "seed-4x512+8x256+4x128-k2")
    assert mixed.widths == (512,) * 4 + (256,) * 8 + (128,) * 4 and mixed.E == 16


def _cfg(widths, d=256, activation="relu2"):
    sizes = tuple((1, f) for f in widths)
    return bench.BenchConfig("c", 64, d, 2, sizes, activation)


@pytest.mark.parametrize("widths,d,ok", [
    ((512, 256, 128), 256, True),
    ((768, 384), 2048, True),
    ((512, 100), 256, False),
    ((64, 64), 256, False),
    ((128, 256), 96, False),
], ids=["w512-256-128", "w768-384", "w100", "w64", "d96"])
def test_stk_applicability(widths, d, ok):
    applicable, reason = baselines.applicability("stk", _cfg(widths, d), torch.bfloat16)
    assert applicable is ok
    assert (reason == "") is ok
    if not ok:
        assert "128" in reason


def test_grouped_mm_applicability():
    assert baselines.applicability("grouped_mm", _cfg((16, 32), d=40), torch.bfloat16)[0]
    applicable, reason = baselines.applicability("grouped_mm", _cfg((16, 12), d=40), torch.bfloat16)
    assert not applicable and "12" in reason
    assert not baselines.applicability("grouped_mm", _cfg((16,), d=36), torch.bfloat16)[0]
    # 16 bytes is 4 fp32 elements.
    assert baselines.applicability("grouped_mm", _cfg((12,), d=36), torch.float32)[0]


def test_every_seed_and_large_config_runs_on_every_provider():
    for cfg in bench.configs("all"):
        for p in bench.PROVIDERS:
            applicable = baselines.applicability(p, cfg, torch.bfloat16)
            if p == "megablocks_variable" and cfg.activation == "swiglu":
                # The fork's variable-width layer computes relu2 only.
                assert not applicable[0] and "relu2" in applicable[1], cfg.name
                continue
            assert applicable == (True, ""), (p, cfg.name)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """The tiny config on this machine's device: vmoe, naive and dense measured, stk n/a."""
    out = tmp_path_factory.mktemp("bench") / "tiny.csv"
    cfgs = bench.configs("tiny", quick=True)
    rows = bench.run_sweep(cfgs, ["vmoe", "naive", "stk", "dense"], list(bench.MODES), DEVICE,
                           torch.bfloat16, bench.Timing(warmup_ms=1, rep_ms=5, cpu_reps=1), out=out,
                           log=lambda *_: None)
    return cfgs, rows, out


def test_csv_has_exactly_the_columns(tiny_sweep):
    _, rows, out = tiny_sweep
    with open(out, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        body = list(reader)
    assert header == EXPECTED_COLUMNS
    assert len(body) == len(rows) == 4 * len(bench.MODES)


def test_tiny_sweep_checks_and_counts(tiny_sweep):
    cfgs, _, out = tiny_sweep
    df = report.load_results(out)
    for provider in ("vmoe", "naive"):
        sub = df[df.provider == provider]
        assert len(sub) == 2 and sub.ok.all() and sub.applicable.all(), sub[["mode", "rel_err", "reason"]]
    vmoe = df[df.provider == "vmoe"]
    assert (vmoe.rel_err < 3e-2).all(), vmoe.rel_err.tolist()
    assert (vmoe.ms_p50 > 0).all() and (vmoe.ms_p20 <= vmoe.ms_p80).all()
    # TFLOP/s comes from the routing actually used, recomputed here from the same seed.
    cfg = cfgs[0]
    ids = bench.make_inputs(cfg, torch.device(DEVICE), torch.bfloat16, dense=False).ids
    for r in vmoe.itertuples():
        flops = baselines.useful_flops(ids, cfg.widths, cfg.d, cfg.activation, r.mode)
        assert math.isclose(r.tflops * 1e12 * r.ms_p50 * 1e-3, flops, rel_tol=1e-4)
    dense = df[df.provider == "dense"]
    assert dense.applicable.all() and dense.rel_err.isna().all() and (dense.ms_p50 > 0).all()
    stk = df[df.provider == "stk"]
    assert len(stk) == 2 and (~stk.applicable).all() and stk.ms_p50.isna().all()
    assert stk.reason.str.contains("multiples of 128").all()
    if not ON_GPU:
        assert df.timer.dropna().str.startswith("perf_counter").all()


def test_write_rows_replaces_the_same_measurement(tmp_path):
    cfg = bench.configs("tiny")[0]
    env = {"gpu": "G", "torch": "t", "triton": "tr", "vmoe_commit": "c", "dtype": "bfloat16"}
    first = bench._base_row(cfg, "vmoe", "fwd", env)
    first.update(ms_p50=2.0, ok=True)
    other = bench._base_row(cfg, "naive", "fwd", env)
    other.update(ms_p50=5.0, ok=False)
    path = tmp_path / "r.csv"
    report.write_rows(path, [first, other])
    again = dict(first, ms_p50=1.0)
    report.write_rows(path, [again])
    df = report.load_results(path)
    assert sorted(df.provider) == ["naive", "vmoe"]
    assert df.set_index("provider").ms_p50["vmoe"] == 1.0
    assert str(df.ok.dtype) == "boolean" and df.set_index("provider").ok["naive"] == False  # noqa: E712


def test_text_columns_stay_text(tmp_path):
    # A short commit hash of digits and one "e" reads as a float (329e820 -> inf) unless kept as text.
    cfg = bench.configs("tiny")[0]
    env = {"gpu": "G", "torch": "2.10", "triton": "3.10", "vmoe_commit": "329e820", "dtype": "bfloat16"}
    row = bench._base_row(cfg, "vmoe", "fwd", env)
    row.update(ms_p50=2.0, ok=True)
    path = tmp_path / "r.csv"
    report.write_rows(path, [row])
    got = report.load_results(path).iloc[0]
    assert (got.vmoe_commit, got.torch, got.triton) == ("329e820", "2.10", "3.10")
    assert got.ms_p50 == 2.0


def _synthetic():
    """Two configs x one mode, with hand-picked times; stk fails its check on the second config and
    grouped_mm does not apply to it."""
    rows = []
    ms = {"cfg-a": {"vmoe": 1.0, "dense": 0.5, "stk": 3.0, "grouped_mm": 2.0, "naive": 10.0},
          "cfg-b": {"vmoe": 4.0, "dense": 2.0, "stk": 6.0, "grouped_mm": None, "naive": 20.0}}
    for config, per in ms.items():
        for provider, t in per.items():
            row = {"gpu": "Test GPU 9000", "dtype": "bfloat16", "config": config, "mode": "fwd",
                   "provider": provider, "ms_p50": t if t is not None else float("nan"),
                   "tflops": 100.0 / t if t else float("nan"), "ok": True, "applicable": True,
                   "reason": "", "torch": "2.x", "triton": "3.x", "vmoe_commit": "abc1234",
                   "timer": "do_bench"}
            if provider == "dense":
                row["ok"] = float("nan")
            if provider == "grouped_mm" and t is None:
                row.update(applicable=False, ok=float("nan"), reason="not aligned")
            if config == "cfg-b" and provider == "stk":
                row.update(ok=False, reason="rel err above 0.05")
            rows.append(row)
    return pd.DataFrame(rows), ms


def test_speedup_table_ratios():
    df, ms = _synthetic()
    table = report.speedup_table(df).set_index("config")
    a = ms["cfg-a"]
    assert table.loc["cfg-a", "vmoe_ms"] == a["vmoe"]
    assert table.loc["cfg-a", "vmoe_tflops"] == 100.0 / a["vmoe"]
    assert table.loc["cfg-a", "vmoe_over_dense"] == pytest.approx(a["vmoe"] / a["dense"])
    for p in ("stk", "grouped_mm", "naive"):
        assert table.loc["cfg-a", f"{p}_over_vmoe"] == pytest.approx(a[p] / a["vmoe"])
    b = ms["cfg-b"]
    assert table.loc["cfg-b", "naive_over_vmoe"] == pytest.approx(b["naive"] / b["vmoe"])
    # A provider that failed its check or does not apply has no speed worth comparing.
    assert math.isnan(table.loc["cfg-b", "stk_over_vmoe"])
    assert math.isnan(table.loc["cfg-b", "grouped_mm_over_vmoe"])
    assert list(table.index) == ["cfg-a", "cfg-b"]


def test_markdown_table_names_the_gpu_and_the_ratios():
    df, ms = _synthetic()
    md = report.markdown_table(df)
    assert "Test GPU 9000" in md and "abc1234" in md
    rows = [line for line in md.splitlines() if line.startswith("| cfg-")]
    assert len(rows) == 2
    a = ms["cfg-a"]
    cells_a = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells_a[:2] == ["cfg-a", "fwd"]
    assert float(cells_a[2]) == a["vmoe"]
    assert cells_a[3] == "–"  # no vmoe_graph rows in this frame
    assert float(cells_a[5].rstrip("×")) == pytest.approx(a["vmoe"] / a["dense"], abs=5e-3)
    assert float(cells_a[6].rstrip("×")) == pytest.approx(a["stk"] / a["vmoe"], abs=5e-3)
    cells_b = [c.strip() for c in rows[1].strip("|").split("|")]
    assert cells_b[6] == cells_b[7] == "–"
    assert "stk on cfg-b (fwd) is left out" in md
    assert "grouped_mm n/a" in md


def _regenerate(tmp_path, readme_text: str):
    """Write the synthetic CSV and a README, run ``--from-csv --readme``; return the README path."""
    df, _ = _synthetic()
    path = tmp_path / "results.csv"
    df.to_csv(path, index=False)
    readme = tmp_path / "README.md"
    readme.write_text(readme_text)
    assert bench.main(["--from-csv", str(path), "--readme", str(readme)]) == 0
    return readme


def test_readme_block_is_regenerated(tmp_path):
    readme = _regenerate(tmp_path, f"# vmoe\n\nintro\n\n{report.README_START}\nold table\n"
                                   f"{report.README_END}\n\nafter\n")
    text = readme.read_text()
    assert "old table" not in text and "Test GPU 9000" in text
    assert text.startswith("# vmoe\n\nintro\n\n") and text.endswith("\n\nafter\n")
    bare = tmp_path / "BARE.md"
    bare.write_text("# x\n")
    report.rewrite_readme(bare, "table")
    assert bare.read_text() == f"# x\n\n## Results\n\n{report.README_START}\ntable\n{report.README_END}\n"


def test_an_unchanged_readme_says_so(tmp_path, capsys):
    readme = _regenerate(tmp_path, f"# vmoe\n\n{report.README_START}\nold table\n{report.README_END}\n")
    assert "rewrote the results block" in capsys.readouterr().out
    text, mtime = readme.read_text(), readme.stat().st_mtime_ns
    assert bench.main(["--from-csv", str(tmp_path / "results.csv"), "--readme", str(readme)]) == 0
    printed = capsys.readouterr().out
    assert "unchanged" in printed and "rewrote" not in printed
    assert readme.read_text() == text and readme.stat().st_mtime_ns == mtime


def test_reproduce_says_unchanged_on_a_second_run(tmp_path, monkeypatch, capsys):
    df, _ = _synthetic()
    (tmp_path / "results").mkdir()
    df.to_csv(tmp_path / "results" / "test.csv", index=False)
    (tmp_path / "README.md").write_text(f"# r\n{report.README_START}\n{report.README_END}\n")
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--reproduce"]) == 0
    assert "rewrote the results block of README.md" in capsys.readouterr().out
    assert bench.main(["--reproduce"]) == 0
    printed = capsys.readouterr().out
    assert "unchanged" in printed and "rewrote" not in printed


def test_bench_quantiles_with_either_do_bench_signature():
    def new_style(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        return [2.0, 1.0, 3.0] if quantiles == bench.QUANTILES else None

    def old_style(fn, warmup=25, rep=100, grad_to_none=None, return_mode="mean"):
        assert return_mode == "all"
        return [float(v) for v in range(1, 11)]

    timing = bench.Timing()
    assert bench.bench_quantiles(None, None, timing, do_bench=new_style) == [2.0, 1.0, 3.0]
    expected = [float(torch.quantile(torch.arange(1, 11, dtype=torch.float64), q)) for q in bench.QUANTILES]
    assert bench.bench_quantiles(None, None, timing, do_bench=old_style) == expected


@pytest.mark.parametrize("name,slug", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"), ("cpu", "cpu")])
def test_gpu_slug(name, slug):
    assert bench.gpu_slug(name) == slug


def test_write_csv_format_and_columns(tmp_path):
    path = tmp_path / "sub" / "x.csv"
    rows = [{"b": 1 / 3, "a": 7, "flag": True, "none": None, "nan": float("nan"), "extra": "dropped"},
            {"a": 1234567.0, "b": "text, with a comma"}]
    report.write_csv(path, rows, ["a", "b", "flag", "none", "nan"])
    raw = path.read_bytes()
    assert b"\r" not in raw and not (tmp_path / "sub" / "x.csv.tmp").exists()
    assert raw.decode().splitlines() == [
        "a,b,flag,none,nan",
        "7,0.333333,True,,nan",             # 6 significant digits; None is an empty cell
        '1.23457e+06,"text, with a comma",,,',  # a missing key is empty; text is quoted as csv does
    ]
    # Without columns: every key, in first-seen order.
    report.write_csv(path, [{"x": 1}, {"y": 2.5, "x": 3}])
    assert path.read_text() == "x,y\n1,\n3,2.5\n"


def test_write_csv_appends_under_one_header(tmp_path):
    path = tmp_path / "log.csv"
    report.write_csv(path, [{"step": 0, "loss": 2.0}], ["step", "loss"], append=True)
    report.write_csv(path, [{"step": 5, "loss": 1.25}, {"step": 10, "loss": 1.0}], ["step", "loss"],
                     append=True)
    report.write_csv(path, [{"step": 15, "loss": 0.5}], append=True)  # the file's own header
    assert path.read_text() == "step,loss\n0,2\n5,1.25\n10,1\n15,0.5\n"
    with pytest.raises(ValueError, match="cannot append"):
        report.write_csv(path, [{"loss": 1.0, "step": 20}], ["loss", "step"], append=True)
    assert path.read_text().count("\n") == 5
    # Without append the file is replaced.
    report.write_csv(path, [{"step": 1, "loss": 3.0}], ["step", "loss"])
    assert path.read_text() == "step,loss\n1,3\n"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _span(cell: str) -> tuple[float, float]:
    """"1.000–4.000×" -> (1.0, 4.0); "2.50" -> (2.5, 2.5)."""
    lo, _, hi = cell.rstrip("×").partition("–")
    return float(lo), float(hi or lo)


def test_summary_table_ranges_over_a_family():
    df, ms = _synthetic()
    graph = df[(df["provider"] == "vmoe")].assign(provider="vmoe_graph", ok=True)
    graph["ms_p50"] = graph["ms_p50"] / 10
    t = report.summary_table(pd.concat([df, graph], ignore_index=True))
    assert len(t) == 1
    r = t.iloc[0]
    a, b = ms["cfg-a"], ms["cfg-b"]
    assert (r.gpu, r.scope, r.family, r["mode"], r.configs, r.vmoe_commit) == (
        "Test GPU 9000", "expert", "cfg", "fwd", 2, "abc1234")
    assert (r.vmoe_ms_min, r.vmoe_ms_max) == (a["vmoe"], b["vmoe"])
    assert (r.vmoe_graph_ms_min, r.vmoe_graph_ms_max) == (a["vmoe"] / 10, b["vmoe"] / 10)
    assert r.vmoe_over_dense_min == r.vmoe_over_dense_max == 2.0
    # stk failed its check on cfg-b and grouped_mm does not apply to it: cfg-a alone gives their range.
    assert r.stk_over_vmoe_min == r.stk_over_vmoe_max == a["stk"] / a["vmoe"]
    assert r.grouped_mm_over_vmoe_min == r.grouped_mm_over_vmoe_max == a["grouped_mm"] / a["vmoe"]
    md = report.summary_markdown(df)
    assert md.startswith(report.SUMMARY_INTRO) and "**Test GPU 9000**" in md
    (row,) = [line for line in md.splitlines() if line.startswith("| cfg (2) |")]
    cells = _cells(row)
    assert cells[:4] == ["cfg (2)", "expert", "fwd", "abc1234"]
    assert _span(cells[4]) == (1.0, 4.0) and cells[5] == "–"
    assert cells[7] == "2.00×" and cells[8] == "3.00×" and cells[9] == "2.00×"


def _committed_results():
    csvs = report.benchmark_csvs(ROOT / "results")
    assert csvs, "no benchmark CSV under results/"
    return pd.concat([report.load_results(p) for p in csvs], ignore_index=True)


def _block(path: Path) -> str:
    text = path.read_text()
    start, end = text.index(report.README_START), text.index(report.README_END)
    return text[start + len(report.README_START):end].strip()


def test_readmes_are_regenerated_from_the_committed_csvs():
    """`python -m vmoe.bench --reproduce` has run since the CSVs last changed."""
    df = _committed_results()
    stale = "stale: run `python -m vmoe.bench --reproduce`"
    assert _block(ROOT / "README.md") == report.summary_markdown(df).strip(), "README.md is " + stale
    assert _block(ROOT / "results" / "README.md") == report.markdown_table(df).strip(), \
        "results/README.md is " + stale


def test_readme_summary_rows_match_the_csv():
    """Each summary row of README.md, recomputed from the raw CSV rows with pandas alone."""
    df = _committed_results()
    df = df[df["ok"].fillna(True).astype(bool) & df["ms_p50"].notna()]
    readme = _block(ROOT / "README.md")
    gpu = None
    checked = set()
    for line in readme.splitlines():
        if line.startswith("**"):
            gpu = line[2:line.index("**", 2)]
            continue
        if not line.startswith("| ") or line.startswith("| configs"):
            continue
        fam_n, scope, mode, commit, vmoe_ms, graph_ms, _, over_dense, _, gmm_over = _cells(line)
        fam, n = fam_n.split(" (")
        rows = df[(df["gpu"] == gpu) & (df["scope"] == scope) & (df["mode"] == mode)
                  & df["config"].str.startswith(fam + "-")]
        ms = rows.pivot_table(index="config", columns="provider", values="ms_p50", aggfunc="min")
        assert int(n.rstrip(")")) == ms["vmoe"].notna().sum(), line
        assert commit == "/".join(pd.unique(rows[rows["provider"] == "vmoe"]["vmoe_commit"])), line
        assert _span(vmoe_ms) == pytest.approx((ms["vmoe"].min(), ms["vmoe"].max()), abs=5e-4), line
        if "vmoe_graph" in ms:
            assert _span(graph_ms) == pytest.approx((ms["vmoe_graph"].min(), ms["vmoe_graph"].max()),
                                                    abs=5e-4), line
        else:
            assert graph_ms == "–", line
        ratio = ms["vmoe"] / ms["dense"]
        assert _span(over_dense) == pytest.approx((ratio.min(), ratio.max()), abs=5e-3), line
        ratio = (ms["grouped_mm"] / ms["vmoe"]).dropna()
        assert _span(gmm_over) == pytest.approx((ratio.min(), ratio.max()), abs=5e-3), line
        checked.add((gpu, fam, scope, mode))
    # Every (gpu, family, scope, mode) of the CSVs has its row.
    expected = {(g, c.split("-")[0], s, m) for g, c, s, m in
                df[df["provider"] == "vmoe"][["gpu", "config", "scope", "mode"]].itertuples(index=False)}
    assert checked == expected


def _check_provider(provider, cfg, dtype, ids=None, tol=None):
    inp = bench.make_inputs(cfg, torch.device(DEVICE), dtype, dense=False)
    if ids is not None:
        inp.ids = ids.to(DEVICE)
    ref = bench.reference_outputs(cfg, inp, grads=True)
    errs = bench._Case(provider, cfg, inp, "fwdbwd").errors(ref)
    assert set(errs) == {"out", "x", "w", "w1", "w2"}
    tol = tolerance(dtype) if tol is None else tol
    assert all(v <= tol for v in errs.values()), errs


def _ids_leaving_expert_empty(T, k, E, empty):
    """Each token's k distinct experts, cycling through all experts but ``empty``."""
    others = [e for e in range(E) if e != empty]
    return torch.tensor([[others[(t + j) % len(others)] for j in range(k)] for t in range(T)])


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_grouped_mm_provider(activation):
    dtype = torch.bfloat16
    reason = baselines.grouped_mm_unavailable(torch.device(DEVICE), dtype)
    if reason:
        pytest.skip(reason)
    # Equal widths that are not neighbours (16 at experts 0 and 2) and an empty expert (3).
    cfg = bench.BenchConfig("g", 24, 32, 2, ((1, 16), (1, 32), (1, 16), (1, 8)), activation)
    _check_provider("grouped_mm", cfg, dtype, _ids_leaving_expert_empty(24, 2, 4, empty=3))


def test_stk_topology_is_the_block_diagonal_of_each_expert():
    stk = pytest.importorskip("stk")
    B = baselines.STK_BLOCK
    widths, padded = (256, 128, 384), torch.tensor([2 * B, 0, B])
    R = int(padded.sum()) // B
    nnz = 2 * 2 + 0 * 1 + 1 * 3
    topo, _, _, _ = baselines.stk_topology(padded, R, nnz, widths, 1, "cpu")
    dense = stk.ops.to_dense(stk.Matrix(topo.size(), torch.ones(nnz, B, B), topo.row_indices,
                                        topo.column_indices, topo.offsets))
    expected = torch.zeros(R * B, sum(widths))
    expected[:2 * B, :256] = 1           # expert 0: two row blocks, columns [0, 256)
    expected[2 * B:, 384:] = 1           # expert 2: one row block, columns [384, 768); expert 1 empty
    assert torch.equal(dense, expected)
    col_t, off_t, block_t = stk.matrix._transpose(topo.size(), torch.empty(nnz, B, B), topo.row_indices,
                                                  topo.column_indices, topo.offsets)
    assert torch.equal(topo.offsets_t, off_t)
    # Within a block column the order of blocks is free; the pairs (row, block) must agree.
    pairs = sorted(zip(topo.column_indices_t.tolist(), topo.block_offsets_t.tolist()))
    assert pairs == sorted(zip(col_t.tolist(), block_t.tolist()))


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_stk_provider(activation):
    pytest.importorskip("stk")
    # The interpreter's bf16 dot is not exact, so on the CPU stk is checked in fp32.
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    cfg = bench.BenchConfig("s", 48, 128, 2, ((1, 128), (1, 256), (1, 128), (1, 128)), activation)
    assert gate_factor(activation) * sum(cfg.widths) % baselines.STK_BLOCK == 0
    _check_provider("stk", cfg, dtype, _ids_leaving_expert_empty(48, 2, 4, empty=2))


def test_stk_block_indices_past_256():
    """A block at row 300 and column 260: with int16 indices stk's sdd wraps (Triton >= 3.2)."""
    stk = pytest.importorskip("stk")
    B = baselines.STK_BLOCK
    topo, _, _, _ = baselines.stk_topology(torch.tensor([B, 0]), 1, 1, (B, B), 1, "cpu")
    assert topo.row_indices.dtype == topo.column_indices.dtype == torch.int32
    assert topo.column_indices_t.dtype == torch.int32
    r, c = 300, 260
    one = torch.tensor([0], dtype=torch.int32)
    block = stk.Matrix(((r + 1) * B, (c + 1) * B), torch.empty(1, B, B, device="meta"),
                       torch.tensor([r], dtype=torch.int32), torch.tensor([c], dtype=torch.int32),
                       torch.cat([torch.zeros(r + 1, dtype=torch.int32), one + 1]),
                       torch.tensor([r], dtype=torch.int32),
                       torch.cat([torch.zeros(c + 1, dtype=torch.int32), one + 1]), one)
    x = torch.randn((r + 1) * B, 32)
    w = torch.randn(32, (c + 1) * B)
    out = stk.ops.sdd(x, w, block).data[0]
    ref = x[r * B:(r + 1) * B].double() @ w[:, c * B:(c + 1) * B].double()
    assert rel_err(out, ref) < 1e-5


def test_reproduce_rewrites_the_readme_from_every_results_csv(tmp_path, monkeypatch):
    df, _ = _synthetic()
    (tmp_path / "results").mkdir()
    df.to_csv(tmp_path / "results" / "test.csv", index=False)
    other = df.assign(gpu="Other GPU 1")
    other.to_csv(tmp_path / "results" / "other.csv", index=False)
    (tmp_path / "README.md").write_text(f"# r\n{report.README_START}\n{report.README_END}\n")
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--reproduce"]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "Test GPU 9000" in text and "Other GPU 1" in text
    # README.md gets the summary, one table per GPU; results/README.md every row.
    assert text.count("| configs | scope | mode |") == 2 and "| cfg-a |" not in text
    tables = (tmp_path / "results" / "README.md").read_text()
    assert tables.count("| cfg-a | fwd |") == 2 and "Other GPU 1" in tables


def test_markdown_table_shows_the_graph_replay_time():
    df, ms = _synthetic()
    row = df[(df["provider"] == "vmoe") & (df["config"] == "cfg-a")].iloc[[0]].copy()
    row["provider"], row["ms_p50"], row["ok"] = "vmoe_graph", ms["cfg-a"]["vmoe"] / 4, True
    md = report.markdown_table(pd.concat([df, row], ignore_index=True))
    line = next(x for x in md.splitlines() if x.startswith("| cfg-a"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert float(cells[3]) == pytest.approx(ms["cfg-a"]["vmoe"] / 4, abs=5e-4)


def test_bench_keeps_the_names_the_notebook_uses():
    # notebooks/07_bench.ipynb reads the results through vmoe.bench.
    for name in ("load_results", "speedup_table", "markdown_table", "summary_table", "summary_markdown",
                 "README_START", "README_END"):
        assert getattr(bench, name) is getattr(report, name), name
    assert callable(bench.gpu_slug) and callable(bench.gpu_name) and callable(bench.main)
    assert bench.MODES == ("fwd", "fwdbwd")


def test_scope_column_round_trips(tmp_path):
    cfg = bench.configs("tiny")[0]
    env = {"gpu": "G", "torch": "t", "triton": "tr", "vmoe_commit": "c", "dtype": "bfloat16"}
    expert = dict(bench._base_row(cfg, "vmoe", "fwd", env), ms_p50=1.0, ok=True)
    layer = dict(bench._base_row(cfg, "vmoe", "fwd", env, scope="layer"), ms_p50=3.0, ok=True)
    path = tmp_path / "r.csv"
    report.write_rows(path, [expert, layer])
    # The same measurement at the other scope is another row, not a replacement.
    report.write_rows(path, [dict(layer, ms_p50=2.0)])
    df = report.load_results(path).set_index("scope")
    assert sorted(df.index) == ["expert", "layer"]
    assert df.ms_p50["expert"] == 1.0 and df.ms_p50["layer"] == 2.0


def test_an_old_csv_without_the_scope_column_loads_as_expert(tmp_path):
    old_columns = [c for c in report.COLUMNS if c != "scope"]
    path = tmp_path / "old.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=old_columns)
        writer.writeheader()
        for provider, ms in (("vmoe", 1.0), ("naive", 9.0)):
            writer.writerow({c: "" for c in old_columns} | {
                "config": "c", "provider": provider, "mode": "fwd", "ms_p50": ms, "ok": "True",
                "applicable": "True", "gpu": "G", "dtype": "bfloat16"})
    df = report.load_results(path)
    assert list(df.scope) == ["expert", "expert"]
    assert report.speedup_table(df).naive_over_vmoe.tolist() == [9.0]
    # Rewriting the file keeps the old rows as expert rows, and a new expert row replaces its twin.
    row = {c: "" for c in report.COLUMNS} | {"config": "c", "provider": "vmoe", "mode": "fwd",
                                            "scope": "expert", "ms_p50": 2.0, "ok": True,
                                            "applicable": True, "gpu": "G", "dtype": "bfloat16"}
    report.write_rows(path, [row])
    df = report.load_results(path).set_index("provider")
    assert list(df.scope) == ["expert", "expert"] and df.ms_p50["vmoe"] == 2.0


def test_markdown_table_adds_a_layer_table_and_keeps_the_expert_one():
    df, ms = _synthetic()
    layer = df[df["provider"].isin(["vmoe", "grouped_mm", "dense"])].assign(scope="layer")
    layer["ms_p50"] = layer["ms_p50"] * 2
    compiled = layer[layer["provider"].isin(["vmoe", "grouped_mm"])].copy()
    compiled["provider"] = compiled["provider"] + "_compiled"
    compiled["ms_p50"] = compiled["ms_p50"] * 0.5
    both = pd.concat([df.assign(scope="expert"), layer, compiled], ignore_index=True)
    md, expert_only = report.markdown_table(both), report.markdown_table(df)
    head, _, tail = md.partition("Layer scope:")
    assert tail, md
    for line in expert_only.splitlines():
        if line.startswith("| cfg-"):
            assert line in head
    header = next(x for x in tail.splitlines() if x.startswith("| config"))
    names = [c.strip() for c in header.strip("|").split("|")]
    line = next(x for x in tail.splitlines() if x.startswith("| cfg-a"))
    cells = dict(zip(names, (c.strip() for c in line.strip("|").split("|"))))
    a = ms["cfg-a"]
    assert float(cells["vmoe ms"]) == 2 * a["vmoe"]
    assert float(cells["vmoe compiled ms"]) == a["vmoe"]
    assert float(cells["grouped_mm ÷ vmoe"].rstrip("×")) == pytest.approx(a["grouped_mm"] / a["vmoe"])
    assert (float(cells["grouped_mm compiled ÷ vmoe compiled"].rstrip("×"))
            == pytest.approx(a["grouped_mm"] / a["vmoe"], abs=5e-3))


LAYER_CFG = [bench.BenchConfig("layer", 24, 32, 2, ((1, 16), (1, 32), (1, 16), (1, 8)), act)
             for act in ("relu2", "swiglu")]


@pytest.mark.parametrize("provider", ["vmoe", "grouped_mm"])
@pytest.mark.parametrize("cfg", LAYER_CFG, ids=lambda c: c.activation)
def test_layer_scope_provider_passes_its_check(cfg, provider):
    dtype = torch.bfloat16
    if provider == "grouped_mm":
        reason = baselines.grouped_mm_unavailable(torch.device(DEVICE), dtype)
        if reason:
            pytest.skip(reason)
    inp = bench.make_layer_inputs(cfg, torch.device(DEVICE), dtype, dense=False)
    ref = bench.layer_reference_outputs(cfg, inp, grads=True)
    errs = bench._LayerCase(provider, cfg, inp, "fwdbwd").errors(ref)
    assert set(errs) == {"out", "aux", "f_i", "x", "router", "w1", "w2"}
    assert all(v <= tolerance(dtype) for v in errs.values()), errs
    fwd = bench._LayerCase(provider, cfg, inp, "fwd").errors(ref)
    assert set(fwd) == {"out", "aux", "f_i"} and all(v <= tolerance(dtype) for v in fwd.values()), fwd


def test_layer_oracle_is_the_reference_layer_on_its_own_routing():
    """With the float64 layer's own top-k, the oracle is MoEMLP(impl="reference").forward."""
    import dataclasses

    from vmoe.reference import router_probs

    cfg = LAYER_CFG[1]
    inp = bench.make_layer_inputs(cfg, torch.device(DEVICE), torch.float64, dense=False)
    moe = inp.moe
    moe.config = dataclasses.replace(moe.config, impl="reference")
    with torch.no_grad():
        out, aux, f_i = moe(inp.x)
        inp.ids = router_probs(moe.router(inp.x).float(), "softmax").topk(cfg.k, dim=-1).indices
    ref = bench.layer_reference_outputs(cfg, inp, grads=False)
    # MoEMLP routes in float32 (logits.float()), the oracle in float64: equal to ~1e-7.
    assert rel_err(out, ref["out"]) < 1e-5
    assert rel_err(torch.stack([aux[n] for n in sorted(aux)]), ref["aux"]) < 1e-5
    assert rel_err(f_i, ref["f_i"]) < 1e-6


def test_scope_layer_cli_writes_layer_rows(tmp_path):
    out = tmp_path / "layer.csv"
    # fwd only, to keep the interpreter's time down: the fwdbwd check is tested above.
    status = bench.main(["--configs", "tiny", "--quick", "--scope", "layer", "--modes", "fwd",
                         "--device", DEVICE, "--out", str(out)])
    df = report.load_results(out)
    assert status == 0 and len(df) > 0, df[["provider", "mode", "reason"]]
    assert (df.scope == "layer").all()
    assert set(df.provider) >= {"vmoe", "dense"} and set(df["mode"]) == {"fwd"}
    vmoe = df[df.provider == "vmoe"]
    assert vmoe.ok.all() and (vmoe.rel_err < tolerance(torch.bfloat16)).all()
    # Layer FLOPs: the experts' and the router's 2 T d E.
    cfg = bench.configs("tiny", quick=True)[0]
    inp = bench.make_layer_inputs(cfg, torch.device(DEVICE), torch.bfloat16, dense=False)
    for r in vmoe.itertuples():
        flops = (baselines.useful_flops(inp.ids, cfg.widths, cfg.d, cfg.activation, r.mode)
                 + 2 * cfg.T * cfg.d * cfg.E)
        assert math.isclose(r.tflops * 1e12 * r.ms_p50 * 1e-3, flops, rel_tol=1e-4)


@pytest.mark.parametrize("provider", ["vmoe_compiled", "grouped_mm_compiled"])
def test_compiled_providers_are_gpu_only(provider):
    logged = []
    kept = baselines.available_providers([provider, "vmoe"], torch.device("cpu"), torch.bfloat16,
                                         log=logged.append)
    assert kept == ["vmoe"]
    assert logged and provider in logged[0] and "GPU" in logged[0]


# The widths suite: balanced routing, and the elasticity against the widest uniform config.


def test_widths_config_set():
    cfgs = bench.configs("widths")
    by_d = {}
    for c in cfgs:
        by_d.setdefault(c.d, []).append(c)
    assert sorted(by_d) == [384, 768, 2048]
    assert all(c.routing == "balanced" and c.activation == "relu2" and c.T == 16384 for c in cfgs)
    assert len({c.name for c in cfgs}) == len(cfgs) == 15
    means = {d: [report.mean_width(c.widths_str) for c in cs] for d, cs in by_d.items()}
    assert means == {384: [768, 384, 256, 128, 610, 616], 768: [3072, 1536, 768],
                     2048: [1024, 768, 512, 256, 512, 256]}
    assert {(c.k, c.E) for c in by_d[384] + by_d[768]} == {(2, 8)}
    assert {(c.k, c.E) for c in by_d[2048]} == {(8, 64)}
    # The sets "all" stands for are unchanged; the suite's names say their d (8x768 is at two).
    assert not any(c.routing == "balanced" for c in bench.configs("all"))
    assert {"widths-d384-8x768-k2", "widths-d768-8x768-k2"} <= {c.name for c in cfgs}
    # The quick subset keeps each d's reference, the widest uniform config.
    quick = bench.configs("widths", quick=True)
    for d, cs in by_d.items():
        widest = max((c for c in cs if len(c.expert_sizes) == 1), key=lambda c: c.widths[0])
        assert widest in quick and any(c.d == d and c is not widest for c in quick)


@pytest.mark.parametrize("T,k,E", [(16384, 2, 8), (16384, 8, 64), (12, 3, 4), (5, 2, 10), (6, 4, 4),
                                   (1, 1, 1)], ids=lambda v: str(v))
def test_balanced_ids_give_every_expert_the_same_count(T, k, E):
    ids = bench.balanced_ids(T, k, E, torch.Generator().manual_seed(0))
    assert ids.shape == (T, k) and ids.dtype == torch.int64
    assert torch.bincount(ids.reshape(-1), minlength=E).tolist() == [T * k // E] * E
    # No token picks an expert twice.
    assert (ids.sort(dim=1).values.diff(dim=1) != 0).all()
    again = bench.balanced_ids(T, k, E, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)


def test_balanced_ids_are_shuffled_by_the_seed():
    a = bench.balanced_ids(64, 2, 8, torch.Generator().manual_seed(0))
    b = bench.balanced_ids(64, 2, 8, torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)
    assert not torch.equal(a, (torch.arange(128) % 8).view(64, 2))


@pytest.mark.parametrize("T,k,E", [(5, 2, 4), (4, 3, 2)], ids=["E-not-dividing-Tk", "k-above-E"])
def test_balanced_routing_refuses_what_cannot_balance(T, k, E):
    with pytest.raises(ValueError, match="balanced routing"):
        bench.BenchConfig("c", T, 16, k, ((E, 16),), "relu2", routing="balanced")


def test_balanced_inputs_have_exact_flops():
    cfg = bench.BenchConfig("widths-d16-2x32+2x16-k2", 12, 16, 2, ((2, 32), (2, 16)), "relu2",
                            routing="balanced")
    inp = bench.make_inputs(cfg, torch.device("cpu"), torch.bfloat16)
    assert torch.bincount(inp.ids.reshape(-1), minlength=cfg.E).tolist() == [6] * 4
    # sum_e n_e f_e = T k x mean width: 24 x 24.
    assert baselines.useful_flops(inp.ids, cfg.widths, cfg.d, "relu2") == 4 * 16 * 24 * 24
    assert baselines.dense_width(inp.ids, cfg.widths) == 24
    w = inp.w.float()
    assert torch.allclose(w.sum(-1), torch.ones(cfg.T), atol=1e-2) and (w > 0).all()
    with pytest.raises(ValueError, match="expert scope only"):
        bench.make_layer_inputs(cfg, torch.device("cpu"), torch.bfloat16)


def _widths_rows():
    """A synthetic widths suite: d=64 with the widest uniform row at 1 ms, a half-width row at
    0.6 ms (elasticity 0.6 / 0.5 = 1.2), a mix of mean 256 at 0.7 ms (1.4), a row that failed its
    check; grouped_mm with no reference row; and one seed row that is not part of the suite."""
    rows = []

    def add(config, widths, provider, ms, gflop, **extra):
        rows.append({"gpu": "Test GPU 9000", "dtype": "bfloat16", "scope": "expert", "config": config,
                     "provider": provider, "mode": "fwd", "T": 128, "d": 64, "k": 2, "E": 4,
                     "widths": widths, "ms_p50": ms, "tflops": gflop / ms, "ok": True,
                     "applicable": True, "reason": "", "torch": "2.x", "triton": "3.x",
                     "vmoe_commit": "abc1234", "timer": "do_bench", **extra})

    add("widths-d64-4x512-k2", "4x512", "vmoe_graph", 1.0, 8.0)
    add("widths-d64-4x256-k2", "4x256", "vmoe_graph", 0.6, 4.0)
    add("widths-d64-2x384+2x128-k2", "2x384+2x128", "vmoe_graph", 0.7, 4.0)
    add("widths-d64-4x128-k2", "4x128", "vmoe_graph", 0.5, 2.0, ok=False, reason="rel err above 0.05")
    add("widths-d64-4x256-k2", "4x256", "grouped_mm_graph", 2.0, 4.0)
    add("widths-d64-4x512-k2", "4x512", "grouped_mm_graph", float("nan"), float("nan"),
        applicable=False, ok=float("nan"), reason="not aligned")
    add("seed-4x512-k2", "4x512", "vmoe_graph", 0.1, 8.0)
    return pd.DataFrame(rows)


def test_elasticity_by_hand():
    table = report.elasticity_table(_widths_rows()).set_index(["config", "provider"])
    assert list(table.columns) == [c for c in report.ELASTICITY_COLUMNS if c not in ("config", "provider")]
    ref = table.loc[("widths-d64-4x512-k2", "vmoe_graph")]
    assert (ref.time_ratio, ref.flop_ratio, ref.elasticity) == (1.0, 1.0, 1.0)
    half = table.loc[("widths-d64-4x256-k2", "vmoe_graph")]
    assert half.reference == "widths-d64-4x512-k2" and half.mean_width == 256
    assert half.gflop == pytest.approx(4.0) and half.flop_ratio == pytest.approx(0.5)
    assert half.time_ratio == pytest.approx(0.6) and half.elasticity == pytest.approx(1.2)
    mix = table.loc[("widths-d64-2x384+2x128-k2", "vmoe_graph")]
    assert mix.mean_width == 256 and mix.elasticity == pytest.approx(1.4)
    # A row that failed its check is not timed; without its reference a provider has no elasticity.
    assert ("widths-d64-4x128-k2", "vmoe_graph") not in table.index
    assert math.isnan(table.loc[("widths-d64-4x256-k2", "grouped_mm_graph")].elasticity)
    assert not any(c.startswith("seed-") for c, _ in table.index)


def test_elasticity_references_are_per_d_and_mode():
    df = _widths_rows()
    other = df[df["provider"] == "vmoe_graph"].assign(d=128, mode="fwdbwd")
    gflop = other["tflops"] * other["ms_p50"]
    other["ms_p50"] = other["ms_p50"] * 3
    other.loc[other["config"] == "widths-d64-4x512-k2", "ms_p50"] = 1.5
    other["tflops"] = gflop / other["ms_p50"]
    other["config"] = other["config"].str.replace("d64", "d128")
    table = report.elasticity_table(pd.concat([df, other], ignore_index=True))
    big = table[table["d"] == 128].set_index("config")
    assert set(big["reference"]) == {"widths-d128-4x512-k2"}
    assert big.loc["widths-d128-4x256-k2", "elasticity"] == pytest.approx((1.8 / 1.5) / 0.5)
    small = table[table["d"] == 64].set_index(["config", "provider"])
    assert small.loc[("widths-d64-4x256-k2", "vmoe_graph"), "elasticity"] == pytest.approx(1.2)


def test_elasticity_of_a_csv_without_the_suite_is_empty():
    df, _ = _synthetic()
    table = report.elasticity_table(df)
    assert table.empty and list(table.columns) == report.ELASTICITY_COLUMNS


def test_markdown_table_gives_the_widths_suite_its_own_table():
    df, _ = _synthetic()
    both = pd.concat([df.assign(scope="expert"), _widths_rows()], ignore_index=True)
    md = report.markdown_table(both)
    head, _, tail = md.partition(report.WIDTHS_INTRO)
    assert tail and "| widths-" not in head and "| seed-4x512-k2 |" in head
    header = next(x for x in tail.splitlines() if x.startswith("| config"))
    names = [c.strip() for c in header.strip("|").split("|")]
    assert names[:3] == ["config", "f̄", "mode"]
    assert names[3:] == ["vmoe_graph ms", "vmoe_graph elasticity", "grouped_mm_graph ms",
                         "grouped_mm_graph elasticity"]
    line = next(x for x in tail.splitlines() if x.startswith("| widths-d64-4x256-k2"))
    cells = dict(zip(names, (c.strip() for c in line.strip("|").split("|"))))
    assert cells["f̄"] == "256" and cells["vmoe_graph ms"] == "0.600"
    assert cells["vmoe_graph elasticity"] == "1.20" and cells["grouped_mm_graph elasticity"] == "–"
    assert "widths: grouped_mm_graph n/a on 1 row(s): not aligned" in md
    # The README's summary is the other families'.
    assert "widths" not in set(report.summary_table(both)["family"])
    assert report.summary_markdown(both) == report.summary_markdown(df.assign(scope="expert"))


def test_replayed_providers_are_gpu_only():
    logged = []
    kept = baselines.available_providers(["vmoe", "vmoe_graph", "grouped_mm_graph", "dense_graph"],
                                         torch.device("cpu"), torch.bfloat16, log=logged.append)
    assert kept == ["vmoe"] and len(logged) == 3 and all("CUDA graphs" in m for m in logged)
    assert baselines.base_provider("grouped_mm_graph") == "grouped_mm"
    assert baselines.base_provider("dense") == "dense"
    assert not baselines.applicability("grouped_mm_graph", _cfg((610,), d=384), torch.bfloat16)[0]


def test_grouped_mm_with_fixed_counts_matches_the_host_read():
    # Widths in two buckets, one expert (2) never chosen: the counts a capture bakes in must be
    # in the bucket-major order the call slices by.
    widths, d, dtype = (32, 16, 32, 16), 24, torch.bfloat16
    if baselines.grouped_mm_unavailable(torch.device(DEVICE), dtype):
        pytest.skip("torch._grouped_mm cannot run here")
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[0, 1], [3, 0], [1, 3], [0, 3], [1, 0]])
    x = torch.randn(5, d, generator=gen).to(DEVICE, dtype)
    w = torch.rand(5, 2, generator=gen).to(DEVICE, dtype)
    w1 = torch.randn(d, sum(widths), generator=gen).to(DEVICE, dtype)
    w2 = torch.randn(sum(widths), d, generator=gen).to(DEVICE, dtype)
    b = baselines.to_buckets(w1, w2, widths, "relu2")
    b1s, b2s = [p[0] for p in b], [p[1] for p in b]
    ids = ids.to(DEVICE)
    fixed = baselines.bucket_counts(ids, widths)
    assert fixed == (4, 0, 3, 3)  # experts 0, 2 (width 32), then 1, 3 (width 16)
    out = baselines.grouped_mm_moe(x, ids, w, b1s, b2s, widths, "relu2")
    again = baselines.grouped_mm_moe(x, ids, w, b1s, b2s, widths, "relu2", fixed_counts=fixed)
    assert torch.equal(out, again)


def test_widths_suite_runs_at_a_tiny_size():
    """The suite's machinery on this device at a tiny size: balanced configs of one d, eager
    providers (the replayed ones need a GPU), rows that pass, and their elasticity."""
    sizes = [((4, 32),), ((4, 16),), ((2, 32), (2, 8))]
    cfgs = [bench.BenchConfig(f"widths-d32-{'+'.join(f'{c}x{w}' for c, w in s)}-k2", 16, 32, 2, s,
                              "relu2", routing="balanced") for s in sizes]
    providers = baselines.available_providers(["vmoe", "grouped_mm", "dense"], torch.device(DEVICE),
                                              torch.bfloat16, log=lambda *_: None)
    rows = bench.run_sweep(cfgs, providers, ["fwd"], DEVICE, torch.bfloat16,
                           bench.Timing(warmup_ms=1, rep_ms=5, cpu_reps=1), log=lambda *_: None)
    assert len(rows) == len(cfgs) * len(providers)
    assert all(r["ok"] is not False and r["applicable"] for r in rows), [r["reason"] for r in rows]
    table = report.elasticity_table(pd.DataFrame(rows)).set_index(["config", "provider"])
    assert len(table) == len(rows)
    assert set(table["reference"]) == {"widths-d32-4x32-k2"}
    for p in providers:
        assert table.loc[("widths-d32-4x32-k2", p), "elasticity"] == pytest.approx(1.0)
        assert math.isfinite(table.loc[("widths-d32-4x16-k2", p), "elasticity"])
    # FLOPs in proportion to the mean width: the routing is exactly balanced.
    assert table.loc[("widths-d32-4x16-k2", "vmoe"), "flop_ratio"] == pytest.approx(0.5)
    assert table.loc[("widths-d32-2x32+2x8-k2", "vmoe"), "flop_ratio"] == pytest.approx(20 / 32)


def test_widths_cli_refuses_the_layer_scope(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--configs", "widths", "--scope", "layer", "--device", DEVICE])
    assert "expert scope only" in capsys.readouterr().err


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("provider", ["vmoe_graph", "grouped_mm_graph", "dense_graph"])
def test_replayed_provider_on_a_balanced_config(provider):
    cfg = bench.BenchConfig("widths-d64-4x64+4x32-k2", 64, 64, 2, ((4, 64), (4, 32)), "relu2",
                            routing="balanced")
    device, dtype = torch.device(DEVICE), torch.bfloat16
    if not baselines.available_providers([provider], device, dtype, log=lambda *_: None):
        pytest.skip(f"{provider} cannot run here")
    inp = bench.make_inputs(cfg, device, dtype)
    ref = bench.reference_outputs(cfg, inp, grads=True)
    env = {"gpu": "G", "torch": "t", "triton": "tr", "vmoe_commit": "c", "dtype": "bfloat16"}
    for mode in bench.MODES:
        row = bench.measure(cfg, provider, mode, inp, ref, device, dtype,
                            bench.Timing(warmup_ms=1, rep_ms=5), env, log=lambda *_: None)
        assert row["applicable"] and row["ms_p50"] > 0, row["reason"]
        if provider == "dense_graph":
            assert row["ok"] == "" and row["reason"].startswith("not checked")
        else:
            assert row["ok"] is True, row["reason"]


def test_megablocks_variable_is_skipped_when_not_importable(monkeypatch, tmp_path):
    from vmoe.bench import megablocks_variable

    monkeypatch.setenv("VMOE_MEGABLOCKS_VARIABLE", str(tmp_path))   # an empty folder: nothing built
    monkeypatch.setattr(megablocks_variable, "_MODULES", None)
    for name in ("megablocks_ops", "nanomoe_ops", "megablocks", "gpt_model"):
        monkeypatch.setitem(sys.modules, name, None)   # None in sys.modules: import fails
    logs = []
    kept = baselines.available_providers(["vmoe", "megablocks_variable"], torch.device("cpu"), torch.bfloat16,
                                         log=logs.append)
    assert kept == ["vmoe"]
    assert len(logs) == 1 and logs[0].startswith("skipping megablocks_variable: cannot import")
    assert str(tmp_path) in logs[0] and "python -m vmoe.bench.megablocks_variable build" in logs[0]
    # Optional: run only when named, never by default.
    assert "megablocks_variable" in bench.PROVIDERS and "megablocks_variable" not in bench.DEFAULT_PROVIDERS


@pytest.mark.parametrize("widths,d,activation,dtype,needle", [
    ((256, 128), 256, "relu2", torch.bfloat16, None),
    ((256, 100, 64), 256, "relu2", torch.bfloat16, "[64, 100]"),
    ((256, 128), 96, "relu2", torch.bfloat16, "96"),
    ((256, 128), 256, "swiglu", torch.bfloat16, "swiglu"),
    ((256, 128), 256, "relu2", torch.float32, "float32"),
    ((256,), 256, "relu2", torch.bfloat16, "2 experts"),
], ids=["ok", "w100-w64", "d96", "swiglu", "fp32", "E1"])
def test_megablocks_variable_applicability(widths, d, activation, dtype, needle):
    applicable, reason = baselines.applicability("megablocks_variable", _cfg(widths, d, activation), dtype)
    assert applicable is (needle is None)
    assert (needle or "") in reason and (reason == "") is applicable


def test_megablocks_variable_provider():
    device = torch.device(DEVICE)
    if not baselines.available_providers(["megablocks_variable"], device, torch.bfloat16,
                                         log=lambda *_: None):
        pytest.skip("megablocks-variable is not built here (python -m vmoe.bench.megablocks_variable build)")
    # T not a multiple of 128 (padded rows) and expert 1 left empty.
    cfg = bench.BenchConfig("m", 300, 128, 2, ((1, 128), (1, 256), (2, 128)), "relu2")
    _check_provider("megablocks_variable", cfg, torch.bfloat16, _ids_leaving_expert_empty(300, 2, 4, empty=1))
