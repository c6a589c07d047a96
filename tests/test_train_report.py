"""vmoe.train.report: the README's training table, from results/train_*.csv."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vmoe.train import report
from vmoe.train.loop import main

ROOT = Path(__file__).resolve().parents[1]
TOTAL = 1000


def _run(config, seed, bpbs, tps, *, n_embd=768, tokens=TOTAL, width=100.0, sizes="8x50", gpu="G"):
    """A run's rows: one per evaluation, the last at ``tokens``."""
    steps = len(bpbs)
    return pd.DataFrame({
        "config": config, "seed": seed, "gpu": gpu, "step": range(steps),
        "tokens": np.linspace(0, tokens, steps), "total_tokens": TOTAL, "val_bpb": bpbs,
        "tokens_per_s": tps, "width": width, "expert_sizes": sizes, "n_embd": n_embd})


def _table(markdown):
    return [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_interval_tokens_per_s_leaves_out_the_first_interval():
    # The first interval holds the compilation: a median over the others.
    run = pd.DataFrame({"tokens_per_s": [np.nan, 10.0, 300.0, 100.0, 200.0]})
    assert report.interval_tokens_per_s(run) == 200.0
    assert np.isnan(report.interval_tokens_per_s(pd.DataFrame({"tokens_per_s": [np.nan, 5.0]})))


def test_summary_rows_by_hand():
    df = pd.concat([
        _run("uniform_d768", 0, [3.0, 1.0], [np.nan, 1.0], width=3072.0, sizes="8x1536"),
        _run("uniform_d768", 1, [3.0, 2.0, 1.2], [np.nan, 5.0, 400e3], width=3072.0, sizes="8x1536"),
        _run("uniform_d768", 0, [3.0, 2.0, 1.2], [np.nan, 5.0, 200e3], width=3072.0, sizes="8x1536", gpu="H"),
        _run("var5_d768", 0, [3.0, 1.1, 0.99], [np.nan, 1.0, 330e3], width=2000.0, sizes="4x2560 4x512"),
        # Stopped short of its schedule, at another d, and a config outside the README's rows: not shown.
        _run("var23_d768", 0, [3.0, 0.5], [np.nan, 9e9], tokens=TOTAL // 2),
        _run("var5_d768", 1, [3.0, 0.1], [np.nan, 9e9], n_embd=384),
        _run("var5_cl0_d768", 0, [3.0, 0.1], [np.nan, 9e9]),
    ], ignore_index=True)
    rows = _table(report.summary_markdown(df))
    # uniform: seeds 0 (on G, no interval after the first: no tokens/s) and 1 on G, seed 0 on H.
    # bpb mean (1.0 + 1.2 + 1.2) / 3 = 1.1333; tokens/s mean of 400k and 200k (seed 0 on G has none).
    assert rows == [
        "| uniform_d768 | 8x1536 | 2 | 1.1333 (1.0000–1.2000) | – | 3072 | 300k | – |",
        "| var5_d768 | 4x2560 4x512 | 1 | 0.9900 | -12.65% | 2000 | 330k | +10% |",
    ]
    assert "Runs on G / H;" in report.summary_markdown(df)


def test_summary_without_d768_runs_says_so():
    text = report.summary_markdown(_run("var5", 0, [3.0, 1.0], [np.nan, 1.0], n_embd=384))
    assert text == "No finished d=768 run in `results/train_*.csv` yet."


def test_the_committed_readme_matches_the_committed_csvs():
    csvs = sorted((ROOT / "results").glob("train_*.csv"))
    df = pd.concat([pd.read_csv(p) for p in csvs], ignore_index=True)
    text = (ROOT / "README.md").read_text()
    start, end = text.index(report.README_START), text.index(report.README_END)
    block = text[start + len(report.README_START):end].strip()
    assert block == report.summary_markdown(df).strip(), \
        "README.md's training table is stale: run `python -m vmoe.train --readme README.md`"


def test_cli_rewrites_only_the_block_and_names_a_readme_without_one(tmp_path, capsys):
    _run("uniform_d768", 0, [3.0, 1.0, 1.0], [np.nan, 1.0, 2e3]).to_csv(tmp_path / "train_g.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"# r\n\nbefore\n{report.README_START}\nold\n{report.README_END}\nafter\n")
    main(["--readme", str(readme), "--results", str(tmp_path)])
    text = readme.read_text()
    assert text.startswith("# r\n\nbefore\n") and text.endswith(f"{report.README_END}\nafter\n")
    assert "| uniform_d768 | 8x50 | 1 | 1.0000 | – | 100 | 2k | – |" in text and "old" not in text
    main(["--readme", str(readme), "--results", str(tmp_path)])
    assert "unchanged: the training block" in capsys.readouterr().out
    bare = tmp_path / "BARE.md"
    bare.write_text("# no block\n")
    with pytest.raises(SystemExit) as err:
        main(["--readme", str(bare), "--results", str(tmp_path)])
    assert err.value.code == 2
    assert "BARE.md: no <!-- training:start -->" in capsys.readouterr().err
