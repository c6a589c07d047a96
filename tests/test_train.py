"""The training entry point on the CPU, on a synthetic corpus.

What must hold for the GPU runs to mean anything: the model's shapes, that training lowers the
loss, that a run stopped and resumed takes bitwise the steps of one that never stopped, that the
log has its columns and the widths their definition, and that every named config constructs.
And for a newcomer on a CPU: that ``python -m vmoe.train --config tiny`` runs the Triton kernels
(re-executing itself under the interpreter), logs no "nan" for the first row, and that a GPU-sized
config warns; ``--collect`` writes nowhere git tracks unless told to.

Most tests train :data:`TINY`: the tiny config's model with the per-expert reference loop (the
kernels have their own tests, and the interpreter costs tens of milliseconds per token) and
enough tokens to learn the synthetic corpus.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import vmoe.layer
import vmoe.train.loop as loop
from vmoe.config import gate_factor
from vmoe.ops.utils.device import interpreting
from vmoe.train.data import write_corpus
from vmoe.train.loop import (
    AUX_KEYS,
    CONFIGS,
    GPT,
    LOG_COLUMNS,
    VOCAB,
    ByteCorpus,
    collect,
    gpu_sized_warning,
    lr_at,
    main,
    resolve_config,
    run_dir_for,
    train,
    training_loss,
    warm_kernels,
)

TINY = replace(CONFIGS["tiny"], impl="reference", seq_len=32, batch_size=8, total_tokens=20 * 8 * 32,
               eval_interval=5, eval_tokens=4 * 32)
ROOT = Path(__file__).resolve().parents[1]
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


def test_no_checkpoints_writes_the_log_only(corpus, tmp_path):
    """``checkpoints=False`` (``--no-checkpoints``): the log of a whole run, no checkpoint file, and the
    same rows as a run that wrote its checkpoints."""
    with_ck = train(TINY, seed=4, out=tmp_path / "a", data_dir=corpus, device="cpu")
    run = train(TINY, seed=4, out=tmp_path / "b", data_dir=corpus, device="cpu", checkpoints=False)
    assert (with_ck / "ckpt.pt").exists()
    assert sorted(p.name for p in run.iterdir()) == ["log.csv"]
    rows_a, rows_b = read_log(with_ck), read_log(run)
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]
    assert [r["val_bpb"] for r in rows_b] == [r["val_bpb"] for r in rows_a]


def test_warm_kernels_changes_nothing_of_the_run(corpus):
    """The eager warm-up step before a compiled run leaves no gradient and no parameter change, and
    draws nothing from the global RNG."""
    torch.manual_seed(0)
    model = GPT(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    warm_kernels(TINY, model, ByteCorpus(corpus), torch.device("cpu"), contextlib.nullcontext())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


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
        assert row["host"] == socket.gethostname()
    last = read_log(run)[-1]
    assert math.isfinite(float(last["tokens_per_s"])) and float(last["tokens_per_s"]) > 0
    assert all(math.isfinite(float(last[c])) for c in ("val_bpb_prose", "val_bpb_code", "train_bpb"))

    var = read_log(train(replace(TINY, total_tokens=5 * 8 * 32), seed=1, out=tmp_path, data_dir=corpus,
                         device="cpu"))
    for row in var:
        for col in ("width", "width_code", "width_prose", "width_punct", "width_letters"):
            assert 2 * 16 <= float(row[col]) <= 2 * 48, (col, row[col])
        assert float(row["null_share"]) == 0.0

    # One non-null width (48) beside null experts: every non-null slot adds 48, so the realised
    # width is exactly k * 48 * (1 - null_share).
    null = replace(TINY, name="tiny_null", expert_sizes=((2, 48), (2, 0)), total_tokens=5 * 8 * 32)
    rows = read_log(train(null, seed=2, out=tmp_path, data_dir=corpus, device="cpu"))
    shares = [float(row["null_share"]) for row in rows]
    assert any(0 < v < 1 for v in shares), shares
    for row, share in zip(rows, shares):
        assert float(row["width"]) == pytest.approx(2 * 48 * (1 - share), rel=1e-5), row


def test_machine_names_the_gpu_beside_the_hostname(monkeypatch):
    # Rented GPU machines can share a hostname; the GPU's UUID tells them apart.
    assert loop.machine(torch.device("cpu")) == socket.gethostname()
    seen = []

    def props(device):
        seen.append(device)
        return type("Props", (), {"uuid": "3f2a-77"})()

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    assert loop.machine(torch.device("cuda", 1)) == f"{socket.gethostname()} GPU-3f2a-77"
    assert seen == [torch.device("cuda", 1)]


def test_widths_of_a_slimmed_model(corpus):
    """The width columns read each layer's own widths: a slimmed GPT's layers differ from each
    other and from its config. The expected widths come from each layer's forward output f_i
    (the fraction of assignments per expert): k * sum_e f_i[e] * w_e per token."""
    from vmoe.slim import slim_model

    torch.manual_seed(0)
    model = GPT(TINY)
    data = loop.ByteCorpus(corpus)
    windows, domain = data.eval_windows(TINY.eval_tokens, TINY.seq_len)
    slimmed, _ = slim_model(model, [windows[:, :-1].long()], 0.4, align=8, allow_null=True)
    layer_widths = [blk.mlp.config.expert_widths for blk in slimmed.blocks]
    assert len(set(layer_widths)) == TINY.n_layer and TINY.moe_config().expert_widths not in layer_widths
    seen = [[] for _ in slimmed.blocks]  # per layer: (tokens, f_i) of each forward
    hooks = [blk.mlp.register_forward_hook(lambda m, args, out, i=i: seen[i].append(
        (args[0].numel() // TINY.n_embd, out[2].detach().double()))) for i, blk in enumerate(slimmed.blocks)]
    row = loop.evaluate(slimmed, windows, domain, torch.device("cpu"), TINY.batch_size,
                        contextlib.nullcontext())
    for h in hooks:
        h.remove()
    want = []
    for calls, widths in zip(seen, layer_widths):
        w = torch.tensor(widths, dtype=torch.float64)
        want.append(sum(n * TINY.k * float(f_i @ w) for n, f_i in calls) / sum(n for n, _ in calls))
    assert row["width_by_layer"] == " ".join(f"{w:.1f}" for w in want)
    assert math.isclose(row["width"], sum(want) / len(want), rel_tol=1e-5)
    per_width = 2 * TINY.n_embd * (gate_factor(TINY.activation) + 1)  # forward FLOPs per unit of width
    assert math.isclose(row["expert_fwd_flops_per_token"], per_width * sum(want), rel_tol=1e-5)
    for col in ("width_code", "width_prose", "width_punct", "width_letters"):
        assert TINY.k * min(min(w) for w in layer_widths) <= row[col] <= TINY.k * max(map(max, layer_widths))


def test_collect(corpus, tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        train(replace(TINY, total_tokens=5 * 8 * 32), seed=seed, out=runs, data_dir=corpus, device="cpu")
    df = collect(runs, results=tmp_path / "results")
    assert list(df.columns) == LOG_COLUMNS
    assert sorted(df["seed"].unique()) == [0, 1] and len(df) == 4
    assert (tmp_path / "results" / "train_cpu.csv").exists()


def test_collect_keeps_the_other_runs_of_the_file(corpus, tmp_path):
    """Collecting a new batch into an existing train_<gpu>.csv replaces the runs it has logs of and
    keeps the others, including rows from before the n_embd / n_layer columns existed."""
    import pandas as pd
    results = tmp_path / "results"
    results.mkdir()
    old_columns = [c for c in LOG_COLUMNS if c not in ("n_embd", "n_layer", "max_null_share")]
    old = pd.DataFrame([{**{c: None for c in old_columns}, "config": "older", "seed": 5, "step": 0,
                         "val_bpb": 1.5, "gpu": "cpu"},
                        {**{c: None for c in old_columns}, "config": TINY.name, "seed": 0,
                         "step": 0, "val_bpb": 99.0, "gpu": "cpu"}])
    old.to_csv(results / "train_cpu.csv", index=False)
    runs = tmp_path / "runs"
    train(replace(TINY, total_tokens=5 * 8 * 32), seed=0, out=runs, data_dir=corpus, device="cpu")
    collect(runs, results=results)
    merged = pd.read_csv(results / "train_cpu.csv")
    assert list(merged.columns) == LOG_COLUMNS
    older = merged[merged["config"] == "older"]
    assert len(older) == 1 and older["val_bpb"].item() == 1.5 and older["n_embd"].isna().all()
    mine = merged[merged["config"] == TINY.name]
    assert len(mine) == 2 and 99.0 not in mine["val_bpb"].tolist()  # the stale run replaced
    assert (mine["n_embd"] == TINY.n_embd).all() and (mine["n_layer"] == TINY.n_layer).all()


def test_merge_adds_a_machines_collected_runs(corpus, tmp_path, capsys):
    """``--merge``: the train_<gpu>.csv a GPU job returned joins the committed one as a collect
    would (its runs replace the same config and seed; the others stay); a CSV that is not a
    collected log, or no --results, is refused."""
    import pandas as pd
    returned = tmp_path / "job"
    runs = tmp_path / "runs"
    train(replace(TINY, total_tokens=5 * 8 * 32), seed=1, out=runs, data_dir=corpus, device="cpu")
    collect(runs, results=returned)
    results = tmp_path / "results"
    results.mkdir()
    pd.DataFrame([{"config": "older", "seed": 0, "step": 0, "val_bpb": 1.5, "gpu": "cpu"},
                  {"config": TINY.name, "seed": 1, "step": 0, "val_bpb": 99.0, "gpu": "cpu"}]
                 ).to_csv(results / "train_cpu.csv", index=False)
    main(["--merge", str(returned / "train_cpu.csv"), "--results", str(results)])
    assert "1 runs" in capsys.readouterr().out
    merged = pd.read_csv(results / "train_cpu.csv")
    assert merged[merged["config"] == "older"]["val_bpb"].tolist() == [1.5]
    mine = merged[merged["config"] == TINY.name]
    assert mine["step"].tolist() == [0, 5] and 99.0 not in mine["val_bpb"].tolist()
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit):
        main(["--merge", str(tmp_path / "other.csv"), "--results", str(results)])
    assert "no config, seed, step, gpu column" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--merge", str(returned / "train_cpu.csv")])
    assert "--merge needs --results" in capsys.readouterr().err


def test_collect_writes_where_git_does_not_track_unless_told(corpus, tmp_path, monkeypatch):
    """``--collect`` alone writes beside the runs (results/runs/, ignored by git); the committed
    results/train_<gpu>.csv takes an explicit ``--results results``."""
    monkeypatch.chdir(tmp_path)
    train(replace(TINY, total_tokens=5 * 8 * 32), seed=0, out=Path("results/runs"), data_dir=corpus,
          device="cpu")
    main(["--collect"])
    assert (tmp_path / "results" / "runs" / "train_cpu.csv").exists()
    assert not (tmp_path / "results" / "train_cpu.csv").exists()
    main(["--collect", "--results", "results"])
    assert (tmp_path / "results" / "train_cpu.csv").exists()


def test_first_row_and_line_have_no_nan(corpus, tmp_path, capsys):
    """Step 0 has no training behind it: its train loss, lr, aux losses and tokens/s are empty
    cells, and its progress line gives no tokens/s (rather than "nan tokens/s")."""
    run = train(replace(TINY, total_tokens=5 * 8 * 32), seed=0, out=tmp_path, data_dir=corpus, device="cpu")
    first, second = read_log(run)
    for col in ("train_loss", "train_bpb", "tokens_per_s", "lr", *AUX_KEYS):
        assert first[col] == "", (col, first[col])
        assert math.isfinite(float(second[col])), (col, second[col])
    assert math.isfinite(float(first["val_bpb"]))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "step 0/5" in text and "step 5/5" in text
    assert "nan" not in text.lower(), text
    assert "tokens/s" in text.split("step 5/5")[1]


def test_gpu_sized_config_warns_on_the_cpu(corpus, tmp_path):
    """Every config but tiny is sized for a GPU: on the CPU, train() warns once (before reading
    anything) that it takes hours; tiny, and any config on a GPU, does not."""
    for name in CONFIGS:
        warning = gpu_sized_warning(CONFIGS[name], torch.device("cpu"))
        assert (warning is None) == (name == "tiny"), (name, warning)
        assert gpu_sized_warning(CONFIGS[name], torch.device("cuda")) is None
    assert "hours" in gpu_sized_warning(CONFIGS["var5"], torch.device("cpu"))
    assert gpu_sized_warning(TINY, torch.device("cpu")) is None
    big = replace(TINY, total_tokens=10**9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(big, seed=0, out=tmp_path, data_dir=corpus, device="cpu", max_steps=0)
    said = [str(w.message) for w in caught if "sized for a GPU" in str(w.message)]
    assert len(said) == 1 and "hours" in said[0] and "--config tiny" in said[0], said


def test_cli_on_a_cpu_reexecs_under_the_interpreter(monkeypatch, corpus, tmp_path):
    """Without a GPU and without TRITON_INTERPRET, ``python -m vmoe.train`` re-runs itself with
    TRITON_INTERPRET=1 (so that the kernels run), passing its arguments on."""
    calls = []

    class Reexec(Exception):
        pass

    def fake_reexec(module, argv):
        calls.append((module, list(argv)))
        raise Reexec

    monkeypatch.setattr(loop, "interpreting", lambda: False)
    monkeypatch.setattr(loop, "reexec_with_interpreter", fake_reexec)
    monkeypatch.setattr(loop.torch.cuda, "is_available", lambda: False)
    argv = ["--config", "tiny", "--data", str(corpus), "--out", str(tmp_path), "--max-steps", "0"]
    with pytest.raises(Reexec):
        main(argv)
    assert calls == [("vmoe.train", argv)]
    main(["--collect", "--out", str(tmp_path)])  # no model, no kernels: no re-exec
    assert len(calls) == 1


@pytest.mark.skipif(not interpreting() or torch.cuda.is_available(),
                    reason="the tiny config's kernels on the CPU need TRITON_INTERPRET=1 at import")
def test_tiny_config_runs_the_kernels(monkeypatch, corpus, tmp_path, capsys):
    """The shipped tiny config, through the command line, on the CPU: every MoE layer takes the
    Triton path (in the interpreter), and the run leaves a log row and a checkpoint."""
    chose = []
    real = vmoe.layer.use_triton

    def spy(x, impl="auto"):
        chose.append(real(x, impl))
        return chose[-1]

    monkeypatch.setattr(vmoe.layer, "use_triton", spy)
    main(["--config", "tiny", "--data", str(corpus), "--out", str(tmp_path), "--max-steps", "1"])
    assert chose and all(chose), chose
    run = run_dir_for(CONFIGS["tiny"], 0, tmp_path)
    assert [r["step"] for r in read_log(run)] == ["0"]
    assert torch.load(run / "ckpt.pt", weights_only=True)["state"]["step"] == 1
    assert "nan" not in capsys.readouterr().out.lower()


def test_cli_smoke_run_without_the_interpreter_set(corpus, tmp_path):
    """What a newcomer types on a CPU, TRITON_INTERPRET unset: the command re-executes itself under
    the interpreter (the MoE layers never fall back to the reference loop), exits 0, and prints no
    "nan"."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VMOE_POISON")}
    env.update(TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "vmoe.train", "--config", "tiny", "--data", str(corpus),
                           "--out", str(tmp_path), "--max-steps", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "re-running under TRITON_INTERPRET=1" in proc.stderr
    assert "resolved to 'reference'" not in proc.stderr
    assert "step 0/" in proc.stdout and "nan" not in (proc.stdout + proc.stderr).lower()


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
    moe = cfg.moe_config()
    with torch.device("meta"):
        model = GPT(cfg)
    assert len(model.blocks) == cfg.n_layer
    if name != "tiny":
        # Active width 4d at either scale: k * mean width = 2 * 2d.
        d = 768 if name.endswith("_d768") else 384
        widths = [w for w in moe.expert_widths if w > 0]
        assert sum(widths) / len(widths) == 2 * d, widths
        shape = (768, 12, 12) if d == 768 else (384, 6, 6)
        assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.seq_len, cfg.k) == (*shape, 256, 2)
        if d == 768:
            base = CONFIGS[name[:-len("_d768")]]
            assert cfg.total_tokens >= 100_000_000
            assert (cfg.max_null_share, cfg.compute_loss_weight) == (base.max_null_share,
                                                                     base.compute_loss_weight)
    assert CONFIGS["var5_cl"].compute_loss_weight > 0 == CONFIGS["var5_cl0"].compute_loss_weight
    assert CONFIGS["var5_null_bound"].max_null_share == 0.24


def test_null_share_loss_enters_the_training_loss():
    """A config with a null-share bound: the model's aux carries null_share_loss (averaged over the
    layers like the others) and the training loss adds it at its weight."""
    cfg = replace(TINY, expert_sizes=((2, 48), (2, 16), (2, 0)), max_null_share=0.01,
                  null_share_loss_weight=3.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(VOCAB, (2, cfg.seq_len))
    y = torch.randint(VOCAB, (2, cfg.seq_len))
    loss, ce, aux = training_loss(cfg, model, x, y)
    assert sorted(aux) == sorted((*AUX_KEYS, "null_share_loss"))
    assert float(aux["null_share_loss"].detach()) > 0  # a bound of 1%: random routing exceeds it
    expected = (ce + cfg.z_loss_weight * aux["router_z_loss"]
                + cfg.lb_loss_weight * aux["load_balance_loss"]
                + cfg.compute_loss_weight * aux["compute_loss"] + 3.0 * aux["null_share_loss"])
    assert torch.allclose(loss, expected)


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
