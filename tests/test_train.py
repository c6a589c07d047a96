"""The training entry point on the CPU: the tiny config (``impl="reference"``) on a synthetic corpus.

What must hold for the GPU runs to mean anything: the model's shapes, that training lowers the
loss, that a run stopped and resumed takes bitwise the steps of one that never stopped, that the
log has its columns and the widths their definition, and that every named config constructs.
"""
from __future__ import annotations

import csv
import math
from dataclasses import replace

import pytest
import torch

from vmoe.train.data import write_corpus
from vmoe.train.loop import (
    AUX_KEYS,
    CONFIGS,
    GPT,
    LOG_COLUMNS,
    VOCAB,
    collect,
    lr_at,
    main,
    resolve_config,
    run_dir_for,
    train,
)

TINY = CONFIGS["tiny"]
PROSE = b"Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n"
CODE = b"def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's tensors are too small for intra-op threads, which on a busy 2-core runner
    cost several times the work (measured: 20 steps in 2.5 s on one thread, 4-20 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def corpus(tmp_path):
    """A small two-domain corpus in vmoe.train.data's format: repetitive, so a few steps can learn it."""
    data = tmp_path / "data"
    write_corpus(data, {
        "train": {"prose": {"p1": PROSE * 40, "p2": PROSE[::-1] * 10}, "code": {"c1": CODE * 60}},
        "val": {"prose": {"p3": PROSE * 8}, "code": {"c2": CODE * 10}},
    })
    return data


def read_log(run_dir):
    with (run_dir / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_forward_shapes():
    model = GPT(TINY)
    idx = torch.randint(VOCAB, (3, TINY.seq_len))
    logits, aux = model(idx)
    assert logits.shape == (3, TINY.seq_len, VOCAB)
    assert sorted(aux) == sorted(AUX_KEYS)
    for key, v in aux.items():
        assert v.dim() == 0 and torch.isfinite(v), (key, v)
    assert [type(b.mlp).__name__ for b in model.blocks] == ["MoEMLP"] * TINY.n_layer


def test_training_lowers_the_loss(corpus, tmp_path):
    run = train(TINY, seed=0, out=tmp_path / "runs", data_dir=corpus, device="cpu")
    rows = read_log(run)
    assert [int(r["step"]) for r in rows] == list(range(0, TINY.total_steps + 1, TINY.eval_interval))
    first, last = float(rows[0]["val_bpb"]), float(rows[-1]["val_bpb"])
    assert first > 7.0, first  # about log2(256) = 8 bits at initialisation
    assert last < first - 1.5, (first, last)
    assert float(rows[-1]["train_loss"]) < float(rows[1]["train_loss"])


def test_resume_is_bitwise(corpus, tmp_path):
    """A run stopped twice (mid-interval, then at an eval step) and resumed equals an unbroken one."""
    whole = train(TINY, seed=3, out=tmp_path / "a", data_dir=corpus, device="cpu")
    out = tmp_path / "b"
    train(TINY, seed=3, out=out, data_dir=corpus, device="cpu", max_steps=7)
    with pytest.raises(FileExistsError):
        train(TINY, seed=3, out=out, data_dir=corpus, device="cpu")
    train(TINY, seed=3, out=out, data_dir=corpus, device="cpu", max_steps=3, resume=True)
    parts = train(TINY, seed=3, out=out, data_dir=corpus, device="cpu", resume=True)
    a = torch.load(whole / "ckpt.pt", weights_only=True)
    b = torch.load(parts / "ckpt.pt", weights_only=True)
    assert a["state"]["step"] == b["state"]["step"] == TINY.total_steps
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in pa:
            assert torch.equal(pa[key], pb[key]), key
    assert torch.equal(a["data_rng"], b["data_rng"])
    rows_a, rows_b = read_log(whole), read_log(parts)
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        for col in ("step", "tokens", "train_loss", "val_bpb", "val_bpb_code", "width", "width_punct"):
            assert ra[col] == rb[col], (col, ra[col], rb[col])


def test_resume_rejects_another_config(corpus, tmp_path):
    train(TINY, seed=0, out=tmp_path, data_dir=corpus, device="cpu", max_steps=2)
    with pytest.raises(ValueError, match="another config"):
        train(replace(TINY, lr=1e-2), seed=0, out=tmp_path, data_dir=corpus, device="cpu", resume=True)


def test_log_columns_and_widths(corpus, tmp_path):
    """Every column is written; a uniform layer's realised width is k*w for every class of bytes,
    and a variable one's lies between k*min(f_e) and k*max(f_e)."""
    uniform = replace(TINY, name="tiny_uniform", expert_sizes=((4, 24),), total_tokens=5 * 8 * 32)
    run = train(uniform, seed=0, out=tmp_path, data_dir=corpus, device="cpu")
    with (run / "log.csv").open(newline="") as f:
        assert next(csv.reader(f)) == LOG_COLUMNS
    for row in read_log(run):
        for col in ("width", "width_code", "width_prose", "width_punct", "width_letters"):
            assert float(row[col]) == 2 * 24, (col, row[col])
        assert row["width_by_layer"] == "48.0 48.0"
        d, L = uniform.n_embd, uniform.n_layer
        assert float(row["expert_fwd_flops_per_token"]) == L * 4 * d * 48
        assert row["gpu"] == "cpu" and row["config"] == "tiny_uniform"
    last = read_log(run)[-1]
    assert math.isfinite(float(last["tokens_per_s"])) and float(last["tokens_per_s"]) > 0
    assert all(math.isfinite(float(last[c])) for c in ("val_bpb_prose", "val_bpb_code", "train_bpb"))

    var = read_log(train(replace(TINY, total_tokens=5 * 8 * 32), seed=1, out=tmp_path, data_dir=corpus,
                         device="cpu"))
    for row in var:
        for col in ("width", "width_code", "width_prose", "width_punct", "width_letters"):
            assert 2 * 16 <= float(row[col]) <= 2 * 48, (col, row[col])


def test_collect(corpus, tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        train(replace(TINY, total_tokens=5 * 8 * 32), seed=seed, out=runs, data_dir=corpus, device="cpu")
    df = collect(runs, results=tmp_path / "results")
    assert list(df.columns) == LOG_COLUMNS
    assert sorted(df["seed"].unique()) == [0, 1] and len(df) == 4
    assert (tmp_path / "results" / "train_cpu.csv").exists()


def test_lr_schedule():
    cfg = replace(TINY, warmup_steps=4, total_tokens=104 * TINY.tokens_per_step)
    assert lr_at(cfg, 0) == pytest.approx(cfg.lr / 4)
    assert lr_at(cfg, 3) == pytest.approx(cfg.lr)
    assert lr_at(cfg, 54) == pytest.approx((cfg.lr + cfg.min_lr) / 2)
    assert lr_at(cfg, cfg.total_steps) == pytest.approx(cfg.min_lr)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_registry_constructs(name):
    """Each named config builds its model (on the meta device: shapes, no memory). The variable
    configs keep the uniform one's mean width, so evenly routed tokens cost the same."""
    cfg = CONFIGS[name]
    assert cfg.name == name
    try:
        moe = cfg.moe_config()
    except ValueError as e:
        if name == "var5_null":
            pytest.skip(f"MoEConfig does not take width 0 yet: {e}")
        raise
    with torch.device("meta"):
        model = GPT(cfg)
    assert len(model.blocks) == cfg.n_layer
    if name != "tiny":
        widths = [w for w in moe.expert_widths if w > 0]
        assert sum(widths) / len(widths) == 768, widths
        assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.seq_len, cfg.k) == (384, 6, 6, 256, 2)
    assert CONFIGS["var5_cl"].compute_loss_weight > 0 == CONFIGS["var5_cl0"].compute_loss_weight


def test_resolve_config_overrides():
    with pytest.raises(ValueError, match="expert-width"):
        resolve_config("uniform_realised")
    cfg = resolve_config("uniform_realised", expert_width=640, total_tokens=1 << 20)
    assert cfg.name == "uniform_realised_w640" and cfg.expert_sizes == ((8, 640),)
    assert cfg.total_tokens == 1 << 20
    assert run_dir_for(cfg, 2, "runs").name == "uniform_realised_w640_s2"
    with pytest.raises(ValueError, match="single-width"):
        resolve_config("var5", expert_width=640)
    with pytest.raises(KeyError):
        resolve_config("nope")


def test_compile_flag_takes_a_mode_or_none(capsys):
    """``--compile`` alone is torch.compile's default mode; an unknown mode is refused by name."""
    with pytest.raises(SystemExit):
        main(["--config", "tiny", "--compile", "cudagraphs-please"])
    assert "--compile" in capsys.readouterr().err
