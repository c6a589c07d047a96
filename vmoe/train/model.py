"""The small byte-level GPT of the training study: its configuration (:class:`TrainConfig`, the
registry :data:`CONFIGS`) and the model, whose every MLP is a :class:`vmoe.MoEMLP`.

:mod:`vmoe.train.loop` trains it on :mod:`vmoe.train.data`'s corpus.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from vmoe.config import MoEConfig
from vmoe.layer import MoEMLP

VOCAB = 256
AUX_KEYS = ("router_z_loss", "load_balance_loss", "compute_loss")


@dataclass(frozen=True)
class TrainConfig:
    """One training run's static description: the model, its MoE layers, the losses, the schedule.

    The aux losses are each averaged over the layers before weighting, so a weight means the same
    at any depth. ``total_tokens`` and ``eval_interval`` fix the schedule (steps, not seconds), so
    a run's result does not depend on how fast the machine was.
    """

    name: str = "uniform"
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    seq_len: int = 256
    expert_sizes: tuple = ((8, 768),)
    k: int = 2
    activation: str = "relu2"
    router: str = "softmax"
    norm_topk_prob: bool = True
    impl: str = "auto"
    z_loss_weight: float = 1e-3
    lb_loss_weight: float = 1e-2
    compute_loss_weight: float = 0.0
    # A bound on the null experts' share of slots (MoEConfig.max_null_share) and its loss's weight.
    max_null_share: float | None = None
    null_share_loss_weight: float = 1.0
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    total_tokens: int = 65_536_000
    eval_interval: int = 250
    eval_tokens: int = 262_144

    def moe_config(self) -> MoEConfig:
        return MoEConfig(n_embd=self.n_embd, expert_sizes=self.expert_sizes, num_active_experts=self.k,
                         activation=self.activation, router=self.router,
                         norm_topk_prob=self.norm_topk_prob, impl=self.impl,
                         max_null_share=self.max_null_share)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        return max(self.total_tokens // self.tokens_per_step, 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# The runs, at one size: d=384, 6 layers, 6 heads, 256 bytes of context, top-2 of 8 experts
# under a softmax router. Every variable config keeps the uniform one's mean expert width (768), so
# that evenly routed tokens cost the same (active width k * 768 = 1536 = 4d, a dense GPT's MLP).
_BASE = TrainConfig()
CONFIGS = {
    # The CPU smoke run: the MoE layers run the Triton kernels (in Triton's interpreter, where each
    # token of each layer costs milliseconds), so it is small enough for the whole run, evaluations
    # included, to take about half a minute on 2 cores.
    "tiny": TrainConfig(name="tiny", n_layer=2, n_head=2, n_embd=32, seq_len=16,
                        expert_sizes=((2, 48), (2, 16)), batch_size=2, lr=3e-3, min_lr=3e-4,
                        warmup_steps=2, total_tokens=6 * 2 * 16, eval_interval=3, eval_tokens=2 * 16),
    "uniform": replace(_BASE, name="uniform", expert_sizes=((8, 768),)),
    "var5": replace(_BASE, name="var5", expert_sizes=((4, 1280), (4, 256))),
    "var23": replace(_BASE, name="var23", expert_sizes=((4, 1472), (4, 64))),
    # The width is a placeholder: set it with --expert-width to a variable run's realised width / k.
    "uniform_realised": replace(_BASE, name="uniform_realised", expert_sizes=((8, 768),)),
    # Null experts (width 0) let a token skip an MLP (the original author's follow-up).
    "var5_null": replace(_BASE, name="var5_null", expert_sizes=((4, 1280), (4, 256), (4, 0))),
    # The same with the null share bounded at the write-up's 24% of slots.
    "var5_null_bound": replace(_BASE, name="var5_null_bound",
                               expert_sizes=((4, 1280), (4, 256), (4, 0)), max_null_share=0.24),
    # var5_cl0 is var5 under the name of the compute-loss pair (compute_loss weight 0 vs 0.01).
    "var5_cl0": replace(_BASE, name="var5_cl0", expert_sizes=((4, 1280), (4, 256)),
                        compute_loss_weight=0.0),
    "var5_cl": replace(_BASE, name="var5_cl", expert_sizes=((4, 1280), (4, 256)),
                       compute_loss_weight=0.01),
    "var23_cl": replace(_BASE, name="var23_cl", expert_sizes=((4, 1472), (4, 64)),
                        compute_loss_weight=0.01),
}


def at_d768(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` at the original work's model width: d=768, 12 heads, 12 layers, every expert twice as
    wide (so the active width stays 4d), 100 MiB of bytes (6400 steps of 16384), evaluated every
    400 steps; named ``<name>_d768``."""
    return replace(cfg, name=f"{cfg.name}_d768", n_embd=768, n_head=12, n_layer=12,
                   expert_sizes=tuple((n, 2 * w) for n, w in cfg.expert_sizes),
                   total_tokens=100 * 2**20, eval_interval=400)


# The study at d=768: every d=384 config but the smoke run, under the same name plus _d768.
CONFIGS.update({f"{name}_d768": at_d768(cfg) for name, cfg in list(CONFIGS.items())
                if name != "tiny"})


def resolve_config(name: str, expert_width: int | None = None, total_tokens: int | None = None
                   ) -> TrainConfig:
    """The registry's config ``name`` with the command line's overrides. ``expert_width`` sets every
    expert of a single-width config to that width and names the run ``<name>_w<width>``."""
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    cfg = CONFIGS[name]
    if expert_width is not None:
        if len(cfg.expert_sizes) != 1:
            raise ValueError(f"--expert-width applies to single-width configs; {name} has "
                             f"{cfg.expert_sizes}")
        count = cfg.expert_sizes[0][0]
        cfg = replace(cfg, name=f"{name}_w{expert_width}", expert_sizes=((count, expert_width),))
    elif name.startswith("uniform_realised"):
        raise ValueError(f"{name} needs --expert-width: a variable run's realised width / k")
    if total_tokens is not None:
        cfg = replace(cfg, total_tokens=total_tokens)
    cfg.moe_config()  # fail here, with MoEConfig's message, rather than after loading the data
    return cfg


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} must be a multiple of n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        B, S, d = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)        # [B, H, S, d/H]
        return self.proj(y.transpose(1, 2).reshape(B, S, d))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + moe(ln(x))."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MoEMLP(cfg.moe_config())

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        out, aux, _ = self.mlp(self.ln2(x))
        return x + out, aux


class GPT(nn.Module):
    """Byte-level GPT: 256 byte embeddings plus learned positions, ``n_layer`` blocks, a final
    LayerNorm and an untied head. ``forward(idx [B, S])`` returns ``(logits [B, S, 256], aux)``,
    aux the layers' auxiliary losses, each averaged over the layers."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(VOCAB, cfg.n_embd)
        self.pos = nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, VOCAB, bias=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """GPT-2's: std 0.02, and the residual projections (attention's, and the experts' w2 on
        top of MoEMLP's own init) scaled by 1/sqrt(2 n_layer), so the residual stream's variance
        does not grow with depth. The routers and w1 keep MoEMLP's init."""
        residual = (2 * self.cfg.n_layer) ** -0.5
        for emb in (self.tok, self.pos, self.head):
            nn.init.normal_(emb.weight, std=0.02)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=0.02)
            nn.init.normal_(blk.attn.proj.weight, std=0.02 * residual)
            blk.mlp.w2.mul_(residual)

    def forward(self, idx):
        S = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(S, device=idx.device))
        auxes = []
        for blk in self.blocks:
            x, aux = blk(x)
            auxes.append(aux)
        # AUX_KEYS, and null_share_loss where the config bounds the null share: every layer has
        # the same keys.
        aux = {key: torch.stack([a[key].float() for a in auxes]).mean() for key in auxes[0]}
        return self.head(self.ln_f(x)), aux
