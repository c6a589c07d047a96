"""``python -m vmoe.train.batch``: run specs, the budget rule, and a batch end to end on the CPU."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmoe.train.batch import fits, parse_run
from vmoe.train.data import write_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_parse_run():
    assert parse_run("var5_d768@0") == ("var5_d768", None, 0)
    assert parse_run("uniform_realised_d768:1240@2") == ("uniform_realised_d768", 1240, 2)
    for bad, what in [("var5_d768", "config\\[:expert_width\\]@seed"), ("var5@x", "@seed"),
                      ("nope@0", "unknown config 'nope'"), ("uniform:wide@1", "expert_width 'wide'")]:
        with pytest.raises(ValueError, match=what):
            parse_run(bad)


def test_fits_keeps_room_for_the_longest_run():
    assert fits(0.0, [], 10.0) and fits(500.0, [300.0], None)
    assert fits(100.0, [100.0, 200.0], 300.0)
    assert not fits(100.0, [100.0, 200.0], 299.0)


def test_batch_runs_skips_and_collects(tmp_path):
    """Two tiny runs under a budget that only the first can start in: the second is reported as
    skipped, and the collected CSV holds the first run's rows only."""
    data = tmp_path / "data"
    text = b"def f(x):\n    return x\n" * 50
    write_corpus(data, {"train": {"prose": {"p": b"Thou art more lovely. " * 60}, "code": {"c": text}},
                        "val": {"prose": {"p": b"Shall I compare thee? " * 10}, "code": {"c": text[:400]}}})
    env = {k: v for k, v in os.environ.items() if k != "VMOE_POISON"}
    env.update(TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "vmoe.train.batch", "tiny@0", "tiny@1", "--budget-s", "0.001", "--data",
         str(data), "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res"), "--",
         "--max-steps", "0", "--no-checkpoints"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "batch: tiny@0 exited 0" in proc.stdout and "batch: tiny@1 skipped" in proc.stdout
    (csv_path,) = (tmp_path / "res").glob("train_*.csv")
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["config"], r["seed"], r["step"]) for r in rows] == [("tiny", "0", "0")]
    assert not list((tmp_path / "runs").rglob("ckpt*.pt"))
