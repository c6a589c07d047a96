"""Train a small byte-level GPT whose every MLP is a :class:`vmoe.MoEMLP`, on :mod:`vmoe.train.data`'s corpus.

The question it serves: does a layer of experts of different widths, routed top-k, give
more width to the bytes that need it (code vs prose, letters vs punctuation), and what does that
buy at equal compute? So each evaluation logs, besides the validation bits per byte overall and
per domain, the realised width per token: the sum of the widths of the k experts a token was sent
to, averaged over tokens and layers (for ``uniform`` 8 x 768 and k=2 it is always 1536).

    python -m vmoe.train --config var5 --seed 0 --max-seconds 540 --resume

runs (or continues) ``results/runs/var5_s0``: ``ckpt.pt`` (written at every evaluation and when
``--max-seconds`` is reached, so a run spans several time-limited jobs) and ``log.csv`` (one row
per evaluation). ``results/runs/`` is scratch, ignored by git (a checkpoint of the d=384 configs
is about 390 MB: weights and AdamW's two moments in float32). ``python -m vmoe.train --collect``
concatenates every run's log into ``results/runs/train_<gpu>.csv``; ``--collect --results results``
writes ``results/train_<gpu>.csv``, the file to commit; ``--merge CSV... --results results`` adds
the runs of ``train_<gpu>.csv`` files that a GPU machine's job returned to it; ``--readme README.md``
rewrites the README's training table from the committed files (:mod:`vmoe.train.report`).

On a CPU, ``python -m vmoe.train --config tiny`` is the smoke run (about half a minute): it
re-executes itself under ``TRITON_INTERPRET=1``, so the MoE layers run the Triton kernels in
Triton's interpreter. The other configs are sized for a GPU; started on a CPU they warn.

A job may be killed at any moment (a time limit, a preemption) and ``--resume`` continues it:

- the corpus is checked when it is read (:func:`vmoe.train.data.read_corpus`: sizes and sha256
  against ``meta.json`` and the pinned values), and a checkpoint records the corpus' sha256, so a
  resume on another corpus is refused;
- an evaluation's row is appended to ``log.csv`` and made durable (fsync) before the checkpoint
  that records the evaluation is written, so no row is lost; rows past the checkpoint, and a last
  line cut short by a kill, are dropped on resume and written again;
- a checkpoint is written to a temporary file, made durable, and renamed over ``ckpt.pt``; the one
  it replaces stays as ``ckpt.prev.pt`` (so a run takes twice a checkpoint's disk), which a resume
  falls back to (with a warning) when ``ckpt.pt`` does not load.

Determinism: the training windows come from a CPU ``torch.Generator`` seeded by the seed, whose
state is checkpointed with the model, the optimizer, the global RNG states and the counters, and
evaluation reads fixed windows and no RNG; so a run resumed from a checkpoint takes the same steps
as one that never stopped (bitwise on the CPU; on a GPU as far as the kernels are deterministic).

``log.csv`` columns: ``train_loss`` is the mean cross-entropy in nats (aux losses excluded) over
the steps since the previous row, ``train_bpb`` the same in bits, the aux columns their means over
the same steps; ``val_bpb*`` are bits per byte on fixed validation windows, half prose and half
code; ``width*`` the realised width (overall, by domain, and by the token's own byte: whitespace
and ASCII punctuation vs ASCII letters); ``null_share`` the share of the k slots of a token and
layer that went to a null expert (width 0), over tokens and layers; ``expert_fwd_flops_per_token``
the experts' forward FLOPs per token summed over layers; ``wall_s`` and ``tokens_per_s`` count
training time only.

Host synchronisation happens only at evaluation and checkpoint boundaries: the training loss is
accumulated on the device, and the wall time of training (``wall_s``, evaluation excluded) is
measured between synchronisations at those boundaries.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import socket
import string
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vmoe.bench import report
from vmoe.bench.report import gpu_slug
from vmoe.config import gate_factor
from vmoe.ops.utils import precompile
from vmoe.ops.utils.device import interpreting, reexec_with_interpreter
from vmoe.train import report as train_report
from vmoe.train.data import DEFAULT_DIR as DEFAULT_DATA
from vmoe.train.data import DOMAINS, read_corpus
from vmoe.train.model import AUX_KEYS, CONFIGS, GPT, VOCAB, TrainConfig, resolve_config

DEFAULT_OUT = Path("results/runs")
CKPT, PREV_CKPT, LOG = "ckpt.pt", "ckpt.prev.pt", "log.csv"
# What a checkpoint holds (and "data_sha256", the corpus' {file: sha256}); one without any of
# these is damaged.
CKPT_KEYS = ("model", "optimizer", "data_rng", "cpu_rng", "cuda_rng", "state", "acc", "config", "seed")
# A lower bound on what a training step costs per token and MoE layer with the kernels in Triton's
# interpreter: measured 25-50 ms at the tiny config's width on 2 cores, more for wider layers. Only
# for the estimate in the GPU-sized warning.
INTERPRETER_S_PER_TOKEN_LAYER = 0.02
# Byte classes for the realised width: a token is classed by its own (input) byte, the one the
# router sees. Digits and non-ASCII bytes are in neither class.
PUNCT_BYTES = frozenset((string.punctuation + string.whitespace).encode())
LETTER_BYTES = frozenset(string.ascii_letters.encode())
WIDTH_CLASSES = ("all", "prose", "code", "punct", "letters")
LOG_COLUMNS = [
    "config", "seed", "step", "tokens", "wall_s", "train_loss", "train_bpb", "val_bpb", "val_bpb_prose",
    "val_bpb_code", "tokens_per_s", "width", "width_code", "width_prose", "width_punct", "width_letters",
    "width_by_layer", "null_share", "expert_fwd_flops_per_token", "lr", *AUX_KEYS, "expert_sizes", "k",
    "compute_loss_weight", "max_null_share", "n_embd", "n_layer", "total_tokens", "compile", "gpu",
    "host", "torch", "triton", "git_commit", "data_sha256",
]


def training_loss(cfg: TrainConfig, model: nn.Module, x, y):
    """``(loss to backpropagate, cross-entropy in nats, aux dict)``."""
    logits, aux = model(x)
    ce = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
    loss = (ce + cfg.z_loss_weight * aux["router_z_loss"] + cfg.lb_loss_weight * aux["load_balance_loss"]
            + cfg.compute_loss_weight * aux["compute_loss"])
    if "null_share_loss" in aux:  # only where the config bounds the null share
        loss = loss + cfg.null_share_loss_weight * aux["null_share_loss"]
    return loss, ce, aux


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at the end."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(cfg.total_steps - cfg.warmup_steps, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, decaying the matrices (and embeddings) but not the LayerNorms' gains and biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2),
                             fused=device.type == "cuda")


class ByteCorpus:
    """``train.bin`` and ``val.bin`` of a :mod:`vmoe.train.data` folder, held in host memory (10 MB;
    69 MB for the large corpus), checked by :func:`vmoe.train.data.read_corpus` as they are read."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.meta, blobs = read_corpus(self.data_dir)
        self.train = torch.frombuffer(bytearray(blobs["train"]), dtype=torch.uint8)
        self.val = torch.frombuffer(bytearray(blobs["val"]), dtype=torch.uint8)
        self.sha256s = {f"{split}.bin": self.meta[split]["sha256"] for split in ("train", "val")}
        self.sha256 = self.sha256s["train.bin"][:12]  # log.csv's data_sha256

    def batch(self, gen: torch.Generator, batch_size: int, seq_len: int, device: torch.device):
        """Random windows of ``seq_len + 1`` bytes of train.bin: ``(x, y)``, each ``[B, S]`` int64 on
        ``device``. Drawn on the host from ``gen``, so a seed gives the same batches on any device;
        copied from pinned memory without blocking (the caching host allocator keeps a pinned block
        until its copy is done)."""
        starts = torch.randint(len(self.train) - seq_len, (batch_size,), generator=gen)
        chunk = self.train[starts[:, None] + torch.arange(seq_len + 1)]             # [B, S+1] uint8
        if device.type == "cuda":
            chunk = chunk.pin_memory().to(device, non_blocking=True)
        chunk = chunk.long()
        return chunk[:, :-1], chunk[:, 1:]

    def eval_windows(self, eval_tokens: int, seq_len: int):
        """Fixed validation windows, half prose and half code, evenly spaced through each domain's
        byte range: ``(windows [N, S+1] uint8, domain [N] int64, index into DOMAINS)``."""
        n = max(eval_tokens // (len(DOMAINS) * seq_len), 1)
        windows, domain = [], []
        for i, name in enumerate(DOMAINS):
            lo, hi = self.meta["val"]["domains"][name]
            if hi - lo < seq_len + 1:
                continue  # an empty domain (a test corpus): its bpb is NaN
            starts = lo + torch.arange(n) * (hi - lo - seq_len - 1) // max(n - 1, 1)
            windows.append(self.val[starts[:, None] + torch.arange(seq_len + 1)])
            domain.append(torch.full((n,), i))
        if not windows:
            raise ValueError(f"val.bin has no domain of at least {seq_len + 1} bytes")
        return torch.cat(windows), torch.cat(domain)


@torch.no_grad()
def evaluate(model: GPT, windows, domain, device, batch_size: int, autocast) -> dict:
    """Validation bits per byte (overall, prose, code) and the realised expert width per token
    (see the module docstring) overall and per class of :data:`WIDTH_CLASSES`, and per layer.

    The topk ids come from each layer's own ``route`` on the layer's input, caught by a forward
    hook, so they are exactly the ones the layer used, and they index that layer's own widths
    (``mlp.config``), which differ from layer to layer and from ``model.cfg`` once the model is
    slimmed (:mod:`vmoe.slim`). Reads back to the host once, at the end.
    """
    was_training = model.training
    model.eval()
    ids: list[torch.Tensor] = []

    def catch(module, inputs, _output):
        ids.append(module.route(inputs[0].reshape(-1, module.config.n_embd)).topk_ids)

    layers = [blk.mlp for blk in model.blocks]
    hooks = [m.register_forward_hook(catch) for m in layers]
    widths = [torch.tensor(m.config.expert_widths, dtype=torch.float32, device=device) for m in layers]
    punct = torch.zeros(VOCAB, dtype=torch.bool)
    punct[list(PUNCT_BYTES)] = True
    letters = torch.zeros(VOCAB, dtype=torch.bool)
    letters[list(LETTER_BYTES)] = True
    punct, letters = punct.to(device), letters.to(device)
    C = len(WIDTH_CLASSES)
    ce_sum = torch.zeros(C, device=device)
    count = torch.zeros(C, device=device)
    width_sum = torch.zeros(len(layers), C, device=device)
    null_sum = torch.zeros((), device=device)
    try:
        for lo in range(0, len(windows), batch_size):
            chunk = windows[lo:lo + batch_size].to(device).long()
            dom = domain[lo:lo + batch_size].to(device)
            x, y = chunk[:, :-1], chunk[:, 1:]
            ids.clear()
            with autocast:
                logits, _ = model(x)
            ce = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1), reduction="none")
            dom_t = dom[:, None].expand_as(x).reshape(-1)
            xb = x.reshape(-1)
            masks = torch.stack([torch.ones_like(xb, dtype=torch.bool), dom_t == DOMAINS.index("prose"),
                                 dom_t == DOMAINS.index("code"), punct[xb], letters[xb]], 1).float()
            ce_sum += ce @ masks
            count += masks.sum(0)
            slot_widths = [w[t.long()] for w, t in zip(widths, ids)]                        # L x [T, k]
            width_sum += torch.stack([sw.sum(-1) for sw in slot_widths]) @ masks            # [L, C]
            null_sum += sum((sw == 0).float().mean(-1).sum() for sw in slot_widths)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    ce_sum, count, width_sum = ce_sum.cpu(), count.cpu(), width_sum.cpu()  # host-ok: eval boundary
    null_share = float(null_sum) / (float(count[0]) * len(layers))  # host-ok: eval boundary
    bpb = (ce_sum / count / math.log(2)).tolist()  # host-ok: already on the host
    per_layer = width_sum / count                                                      # [L, C]
    width = per_layer.mean(0).tolist()  # host-ok: already on the host
    cls = dict(zip(WIDTH_CLASSES, width))
    # Per assignment, an expert of width f does 2*d*(g*f) + 2*f*d forward FLOPs; linear in f, so
    # a layer's mean over assignments is that of its realised width.
    flops = sum(2 * m.config.n_embd * (gate_factor(m.config.activation) + 1) * w
                for m, w in zip(layers, per_layer[:, 0].tolist()))  # host-ok: already on the host
    return {
        "val_bpb": bpb[0], "val_bpb_prose": bpb[1], "val_bpb_code": bpb[2],
        "width": cls["all"], "width_prose": cls["prose"], "width_code": cls["code"],
        "width_punct": cls["punct"], "width_letters": cls["letters"],
        "width_by_layer": " ".join(f"{w:.1f}" for w in per_layer[:, 0].tolist()),  # host-ok: host
        "null_share": null_share,
        "expert_fwd_flops_per_token": flops,
    }


def machine(device: torch.device) -> str:
    """The hostname, and on a GPU the GPU's UUID: tokens/s compare cleanly only between runs on one
    machine (two seeds of one config, on two machines of one GPU model, differed by 8%), and rented
    machines can share a hostname."""
    name = socket.gethostname()
    if device.type == "cuda":
        name += f" GPU-{torch.cuda.get_device_properties(device).uuid}"
    return name


def environment(device: torch.device) -> dict:
    """:func:`vmoe.bench.report.environment`, with the commit under log.csv's column name, and the
    machine (:func:`machine`) as ``host``."""
    env = report.environment(device)
    env["git_commit"] = env.pop("vmoe_commit")
    env["host"] = machine(device)
    return env


def _sync(device: torch.device) -> float:
    """A timestamp after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host-ok: only at evaluation and checkpoint boundaries
    return time.perf_counter()


def _append_log(path: Path, row: dict) -> None:
    """Append ``row`` (and the header, to a new file) in one write, flushed and fsynced: once this
    returns the row survives a kill; a kill during it leaves at most a partial last line, which
    :func:`_read_log` drops."""
    report.write_csv(path, [row], LOG_COLUMNS, append=True)


def _read_log(path: Path) -> tuple[list[dict], bool]:
    """``(rows, repaired)``: log.csv's whole rows, and whether anything else was dropped.

    A last line without its line end is what a job killed while appending leaves; its evaluation
    has no checkpoint yet (rows are durable before the checkpoint is written), so the resumed run
    evaluates it again. Any other line without every column or with a non-integer step is dropped
    with a warning that names it.
    """
    with path.open(newline="", errors="replace") as f:
        lines = f.read().splitlines(keepends=True)
    repaired = False
    if lines and not lines[-1].endswith("\n"):
        warnings.warn(f"{path}: dropped a partial last line, left by a job killed while writing it: "
                      f"{lines[-1][:60]!r}", stacklevel=3)
        lines.pop()
        repaired = True
    if not lines:
        return [], repaired
    header = next(csv.reader(lines[:1]))
    if header != LOG_COLUMNS:
        raise ValueError(f"{path} has other columns than this version of vmoe.train writes: move it "
                         f"away (or remove its run folder, {path.parent}) to start the run afresh")
    rows = []
    for n, fields in enumerate(csv.reader(lines[1:]), start=2):
        if len(fields) != len(LOG_COLUMNS) or not fields[LOG_COLUMNS.index("step")].isdigit():
            warnings.warn(f"{path}: dropped line {n}, which is not a whole row: {','.join(fields)[:60]!r}",
                          stacklevel=3)
            repaired = True
            continue
        rows.append(dict(zip(LOG_COLUMNS, fields)))
    return rows, repaired


def _write_log(path: Path, rows: list[dict]) -> None:
    """Replace log.csv with ``rows``: through a temporary file, fsynced, then renamed over it."""
    report.write_csv(path, rows, LOG_COLUMNS)


def _truncate_log(path: Path, after_step: int) -> None:
    """Keep the rows up to the checkpoint's step, and repair a partial last line: a job killed
    between a row and its checkpoint would otherwise log that evaluation twice after resuming."""
    if not path.exists():
        return
    rows, repaired = _read_log(path)
    keep = [r for r in rows if int(r["step"]) <= after_step]  # host-ok: CSV text
    if repaired or len(keep) != len(rows):
        _write_log(path, keep)


def _save_checkpoint(ck: dict, path: Path, prev: Path) -> None:
    """Write ``ck`` to ``path`` so that a kill at any moment leaves a checkpoint that loads: into a
    temporary file, fsynced, then renamed over ``path``; the checkpoint it replaces becomes
    ``prev``, the fallback of :func:`_load_checkpoint`."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(ck, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, prev)
    os.replace(tmp, path)
    report.fsync_dir(path.parent)


def _load_checkpoint(run_dir: Path) -> tuple[dict, Path] | None:
    """``(checkpoint, its path)``: ``ckpt.pt``, or, when that is missing or does not load,
    ``ckpt.prev.pt`` with a warning naming both; None when the run has neither.

    A file that ``torch.load`` refuses, or whose dict lacks one of :data:`CKPT_KEYS`, is damaged
    (a disk filled up, a copy cut short). A damaged ``ckpt.pt`` that the previous one stands in for
    is renamed ``ckpt.pt.damaged``, so that the next checkpoint does not rotate it into
    ``ckpt.prev.pt``; when no file loads, the error names them and the fix.
    """
    path, prev = run_dir / CKPT, run_dir / PREV_CKPT
    failed = []
    for candidate in (path, prev):
        if not candidate.exists():
            continue
        try:
            ck = torch.load(candidate, map_location="cpu", weights_only=True)
            missing = [k for k in CKPT_KEYS if k not in ck] if isinstance(ck, dict) else ["a dict"]
            if missing:
                raise ValueError(f"it lacks {', '.join(missing)}")
        except Exception as e:  # torch.load raises EOFError, RuntimeError, UnpicklingError, ...
            first_line = (str(e).splitlines() or [""])[0]
            failed.append(f"{candidate} does not load ({type(e).__name__}: {first_line})")
            continue
        if candidate == prev:
            why = f"{path} is missing"
            if failed:
                damaged = path.with_name(path.name + ".damaged")
                os.replace(path, damaged)
                why = f"{failed[0]} (kept as {damaged})"
            warnings.warn(f"{why}; resuming from the previous checkpoint {prev} (step "
                          f"{ck['state']['step']}) instead", stacklevel=3)
        return ck, candidate
    if failed:
        raise ValueError("no checkpoint of this run loads:\n  " + "\n  ".join(failed) + "\n"
                         f"--resume cannot continue it: remove {run_dir} to start the run afresh (or "
                         f"pass another --out)")
    return None


def run_dir_for(cfg: TrainConfig, seed: int, out: Path = DEFAULT_OUT) -> Path:
    return Path(out) / f"{cfg.name}_s{seed}"


def _check_same_corpus(ck: dict, path: Path, data: ByteCorpus, log_path: Path) -> None:
    """Refuse to resume a checkpoint on another corpus than it was trained on: its ``data_sha256``
    or, for a checkpoint without one, the ``data_sha256`` column of the run's log."""
    if "data_sha256" in ck:
        trained_on, other = ck["data_sha256"], ck["data_sha256"] != data.sha256s
    else:
        logged = {r["data_sha256"] for r in _read_log(log_path)[0]} if log_path.exists() else set()
        trained_on, other = sorted(logged), not logged <= {data.sha256}
    if other:
        raise ValueError(f"{path} was trained on another corpus than the one in {data.data_dir}:\n  "
                         f"{trained_on}\nnot\n  {data.sha256s}\nresume with the corpus it was "
                         f"trained on (--data), or remove {path.parent} to start the run afresh")


def gpu_sized_warning(cfg: TrainConfig, device: torch.device) -> str | None:
    """The warning for a run that a CPU would take hours over, or None."""
    if device.type != "cpu":
        return None
    hours = cfg.total_tokens * cfg.n_layer * INTERPRETER_S_PER_TOKEN_LAYER / 3600
    if hours < 0.25:
        return None
    return (f"{cfg.name} is sized for a GPU ({cfg.total_steps:,} steps of {cfg.tokens_per_step:,} tokens, "
            f"d={cfg.n_embd}, {cfg.n_layer} layers): on this CPU, with the MoE layers in Triton's "
            f"interpreter, it takes hours (at least ~{hours:,.0f} h). `--config tiny` is the CPU "
            f"smoke run; --max-steps stops earlier.")


def _progress(total: int, initial: int, desc: str):
    disable = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes", "on")
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=disable, dynamic_ncols=True)


def train(cfg: TrainConfig, seed: int, out: Path = DEFAULT_OUT, data_dir: Path = DEFAULT_DATA,
          max_seconds: float | None = None, max_steps: int | None = None, resume: bool = False,
          compile: bool | str = False, device: str | torch.device | None = None,
          checkpoints: bool = True) -> Path:
    """Train (or, with ``resume``, continue) ``cfg`` with ``seed``; returns the run's folder.

    Stops at ``cfg.total_steps``, or after ``max_steps`` steps or ``max_seconds`` seconds of this
    call (checked between steps, on the host), with a checkpoint either way. ``resume`` with no
    checkpoint starts afresh, so a job script can always pass it; without ``resume`` an existing
    checkpoint is an error rather than overwritten. ``compile``: False (eager), True or a
    ``torch.compile`` mode; "reduce-overhead" replays each step as CUDA graphs, which takes the
    host's launch time out of tokens/s at this model size. ``checkpoints=False`` writes none (for
    a machine whose disk does not outlive the job: a d=768 checkpoint is about 3 GB, and writing
    one at each of its 17 evaluations costs about a minute); the log is written either way.

    Refuses (ValueError, naming the file and the fix) a corpus that is damaged or not the pinned
    one, a checkpoint of another config, seed or corpus, and a run whose checkpoints all fail to
    load; see the module docstring for what a killed job leaves and how a resume repairs it.
    """
    started = time.monotonic()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = run_dir_for(cfg, seed, out)
    ckpt_path, prev_path, log_path = run_dir / CKPT, run_dir / PREV_CKPT, run_dir / LOG
    if not resume:
        for path in (ckpt_path, prev_path):
            if path.exists():
                raise FileExistsError(f"{path} exists: pass --resume to continue it, or remove {run_dir}")
    warning = gpu_sized_warning(cfg, device)
    if warning:
        warnings.warn(warning, stacklevel=2)
    data = ByteCorpus(data_dir)
    windows, domain = data.eval_windows(cfg.eval_tokens, cfg.seq_len)
    run_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")

    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    opt = make_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(seed)
    st = {"step": 0, "tokens": 0, "wall": 0.0, "last_eval": -1, "tokens_at_eval": 0, "wall_at_eval": 0.0,
          "n_acc": 0}
    acc = torch.zeros(1 + len(AUX_KEYS), device=device)  # ce and aux sums since the last evaluation
    loaded = _load_checkpoint(run_dir) if resume else None
    if loaded is not None:
        ck, path = loaded
        if ck["config"] != cfg.to_json() or ck["seed"] != seed:
            raise ValueError(f"{path} was written by another config or seed:\n  {ck['config']} "
                             f"seed {ck['seed']}\nnot\n  {cfg.to_json()} seed {seed}")
        _check_same_corpus(ck, path, data, log_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["data_rng"])
        torch.set_rng_state(ck["cpu_rng"])
        if device.type == "cuda" and ck["cuda_rng"] is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        st = ck["state"]
        acc = ck["acc"].to(device)
        _truncate_log(log_path, st["step"])
    else:
        _truncate_log(log_path, -1)  # no checkpoint: rows left by an earlier attempt are not this run's

    def save():
        if not checkpoints:
            return
        acc_host = acc.cpu()  # host-ok: checkpoints are written at boundaries only
        _save_checkpoint({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "data_rng": gen.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "state": dict(st), "acc": acc_host, "config": cfg.to_json(), "seed": seed,
            "data_sha256": data.sha256s}, ckpt_path, prev_path)

    mode = "default" if compile is True else compile or None
    env = {**environment(device), "data_sha256": data.sha256, "compile": mode or False}
    step_model = torch.compile(model, mode=mode) if mode else model
    graphs = mode is not None and "reduce-overhead" in mode
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    if mode and device.type == "cuda" and precompile.enabled():
        warm_kernels(cfg, model, data, device, autocast)
    total, steps_here = cfg.total_steps, 0
    bar = _progress(total, st["step"], f"{cfg.name} s{seed}")
    t0 = _sync(device)
    while True:
        step = st["step"]
        if (step % cfg.eval_interval == 0 or step == total) and st["last_eval"] != step:
            st["wall"] += _sync(device) - t0
            row = evaluate(model, windows, domain, device, cfg.batch_size, autocast)
            means = (acc / max(st["n_acc"], 1)).tolist()  # host-ok: evaluation boundary
            seg_wall = st["wall"] - st["wall_at_eval"]
            trained = st["n_acc"] > 0  # the first row (step 0) has no training behind it
            # Undefined values (no training steps since the last row) are empty cells, not "nan".
            row.update({
                "config": cfg.name, "seed": seed, "step": step, "tokens": st["tokens"],
                "wall_s": round(st["wall"], 3),
                "train_loss": means[0] if trained else None,
                "train_bpb": means[0] / math.log(2) if trained else None,
                "tokens_per_s": (st["tokens"] - st["tokens_at_eval"]) / seg_wall
                if st["tokens"] > st["tokens_at_eval"] and seg_wall > 0 else None,
                "lr": lr_at(cfg, step - 1) if step else None,
                **{key: means[1 + i] if trained else None for i, key in enumerate(AUX_KEYS)},
                "expert_sizes": " ".join(f"{c}x{w}" for c, w in cfg.expert_sizes), "k": cfg.k,
                "compute_loss_weight": cfg.compute_loss_weight, "max_null_share": cfg.max_null_share,
                "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "total_tokens": cfg.total_tokens, **env})
            acc.zero_()
            st.update(last_eval=step, tokens_at_eval=st["tokens"], wall_at_eval=st["wall"], n_acc=0)
            # The row first: once the checkpoint records this evaluation, a resume never repeats it.
            _append_log(log_path, row)
            save()
            speed = "" if row["tokens_per_s"] is None else f", {row['tokens_per_s']:,.0f} tokens/s"
            bar.write(f"{cfg.name} s{seed} step {step}/{total}: val bpb {row['val_bpb']:.4f} (prose "
                      f"{row['val_bpb_prose']:.4f}, code {row['val_bpb_code']:.4f}), width "
                      f"{row['width']:.1f} (code {row['width_code']:.1f}, prose {row['width_prose']:.1f})"
                      f"{speed}")
            t0 = _sync(device)
        if step >= total:
            break
        if ((max_steps is not None and steps_here >= max_steps)
                or (max_seconds is not None and time.monotonic() - started >= max_seconds)):
            st["wall"] += _sync(device) - t0
            save()
            bar.write(f"{cfg.name} s{seed}: stopped at step {step}/{total}; --resume continues")
            break
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = data.batch(gen, cfg.batch_size, cfg.seq_len, device)
        if graphs:  # a new iteration: the last step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss, ce, aux = training_loss(cfg, step_model, x, y)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc += torch.stack([ce.detach(), *(aux[key].detach() for key in AUX_KEYS)])
        st["step"] += 1
        st["tokens"] += cfg.tokens_per_step
        st["n_acc"] += 1
        steps_here += 1
        bar.update(1)
    bar.close()
    return run_dir


def warm_kernels(cfg: TrainConfig, model: nn.Module, data: "ByteCorpus", device: torch.device,
                 autocast) -> None:
    """One eager forward and backward of ``model`` on a batch outside the run's data stream, its
    gradients dropped. Inside a torch.compile trace a layer compiles its Triton kernels one by one
    as they first launch (about a minute for a cold cache); eager, its first call compiles them in
    parallel (:mod:`vmoe.ops.utils.precompile`) and tunes them, into the caches the compiled step
    then reads. Changes no parameter, optimizer state or RNG stream of the run. Only where the
    precompile is on (:func:`vmoe.ops.utils.precompile.enabled`): without it the step would
    compile the same kernels one by one, as the trace does."""
    x, y = data.batch(torch.Generator().manual_seed(0), cfg.batch_size, cfg.seq_len, device)
    with autocast:
        loss, _, _ = training_loss(cfg, model, x, y)
    loss.backward()
    model.zero_grad(set_to_none=True)


def collect(out: Path = DEFAULT_OUT, results: Path | None = None):
    """Every run's ``log.csv`` under ``out`` in one DataFrame; with ``results``, also written to
    ``results/train_<gpu>.csv``, one file per GPU (as the benchmark's CSVs are). A run already in
    that file (same config and seed) is replaced by its log; the file's other runs are kept, with
    empty cells in columns their logs did not have, so that batches collected on different
    machines add up."""
    import pandas as pd

    logs = sorted(Path(out).glob(f"*/{LOG}"))
    if not logs:
        return pd.DataFrame(columns=LOG_COLUMNS)
    df = pd.concat([pd.read_csv(p) for p in logs], ignore_index=True)
    if results is not None:
        write_results(df, results)
    return df


def merge(csvs, results: Path):
    """The runs of collected ``train_<gpu>.csv`` files (those a GPU machine's job returned) added
    to ``results/train_<gpu>.csv`` as :func:`collect` adds logs: each run replaces the same config
    and seed there. Returns the merged rows."""
    import pandas as pd

    df = pd.concat([pd.read_csv(p) for p in csvs], ignore_index=True)
    missing = [c for c in ("config", "seed", "step", "gpu") if c not in df]
    if missing:
        raise ValueError(f"{', '.join(map(str, csvs))}: no {', '.join(missing)} column; "
                         "expected train_<gpu>.csv files written by --collect")
    write_results(df, results)
    return df


def write_results(df, results: Path) -> None:
    """``df``'s runs into ``results/train_<gpu>.csv``, replacing the same (config, seed) there."""
    import pandas as pd

    Path(results).mkdir(parents=True, exist_ok=True)
    for gpu, part in df.groupby("gpu"):
        path = Path(results) / f"train_{gpu_slug(str(gpu))}.csv"
        if path.exists():
            old = pd.read_csv(path)
            runs = set(zip(part["config"], part["seed"]))
            keep = [(c, s) not in runs for c, s in zip(old["config"], old["seed"])]
            part = pd.concat([old[keep], part], ignore_index=True)
        part = part.sort_values(["config", "seed", "step"], kind="stable")
        columns = list(dict.fromkeys([*LOG_COLUMNS, *part.columns]))
        part = part.reindex(columns=columns)
        rows = part.astype(object).where(part.notna(), None).to_dict("records")  # NaN: empty
        report.write_csv(path, rows, columns)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), help="a named config of CONFIGS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="runs folder (default results/runs)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus folder (default data; "
                        "data_large holds the large corpus: python -m vmoe.train.data --corpus large)")
    parser.add_argument("--max-seconds", type=float, help="stop (with a checkpoint) after this many "
                        "seconds of this job; leave room for the last checkpoint's write")
    parser.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps")
    parser.add_argument("--resume", action="store_true", help="continue the run's checkpoint if any")
    parser.add_argument("--expert-width", type=int, help="every expert's width (single-width configs; "
                        "for uniform_realised: a variable run's realised `width` / k)")
    parser.add_argument("--total-tokens", type=int, help="override the config's training tokens")
    parser.add_argument("--compile", nargs="?", const="default", default=False, metavar="MODE",
                        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="torch.compile the model's training step (MODE default: default; "
                        "reduce-overhead: CUDA graphs)")
    parser.add_argument("--no-checkpoints", action="store_true",
                        help="write no checkpoint (a machine whose disk does not outlive the job)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--collect", action="store_true",
                        help="only concatenate the runs' logs under --out into train_<gpu>.csv")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="CSV",
                        help="only add these collected train_<gpu>.csv files' runs to --results")
    parser.add_argument("--readme", type=Path, metavar="README",
                        help="only rewrite README's training table from <--results>/train_*.csv")
    parser.add_argument("--results", type=Path,
                        help="where --collect writes train_<gpu>.csv (default: the --out folder, which git "
                        "ignores; `--results results` writes the committed results/train_<gpu>.csv)")
    args = parser.parse_args(argv)
    if args.readme:
        csvs = sorted(Path(args.results or "results").glob("train_*.csv"))
        try:
            changed = train_report.regenerate(csvs, args.readme)
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
        print(f"{'rewrote' if changed else 'unchanged:'} the training block of {args.readme} "
              f"({len(csvs)} CSVs)")
        return
    if args.merge:
        if args.results is None:
            parser.error("--merge needs --results (the folder of the train_<gpu>.csv to add to)")
        try:
            df = merge(args.merge, args.results)
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
        n_runs = df.groupby(["config", "seed"]).ngroups
        print(f"{n_runs} runs ({len(df)} rows) -> {args.results}/train_<gpu>.csv")
        return
    if args.collect:
        dest = args.results or args.out
        df = collect(args.out, dest)
        print(f"{len(df)} rows from {df['config'].nunique() if len(df) else 0} configs"
              + (f" -> {dest}/train_<gpu>.csv" if len(df) else ""))
        return
    if args.config is None:
        parser.error("--config is required (or --collect)")
    try:
        cfg = resolve_config(args.config, args.expert_width, args.total_tokens)
    except (KeyError, ValueError) as e:
        parser.error(str(e))
    on_cpu = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cpu"
    if on_cpu and cfg.impl != "reference" and not torch.cuda.is_available() and not interpreting():
        # Triton picks the interpreter when vmoe is imported, which has happened by now.
        print("no GPU: re-running under TRITON_INTERPRET=1, so that the MoE layers run the Triton "
              "kernels in Triton's interpreter", file=sys.stderr)
        reexec_with_interpreter("vmoe.train", sys.argv[1:] if argv is None else list(argv))
    try:
        run_dir = train(cfg, args.seed, out=args.out, data_dir=args.data, max_seconds=args.max_seconds,
                        max_steps=args.max_steps, resume=args.resume, compile=args.compile,
                        device=args.device, checkpoints=not args.no_checkpoints)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(f"{run_dir}: see {LOG}")


if __name__ == "__main__":
    main()
