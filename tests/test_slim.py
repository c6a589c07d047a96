"""vmoe.slim: scores against a float64 transcription of their formulas, the chosen channels against
the new layer's weights, the budget arithmetic, null experts, the slimmed layer against
vmoe.reference.expert_mlp (outputs and gradients), load-balance groups, determinism and errors.
The same for slim_hf on tiny random-init transformers models (no downloads), whose twins must also
equal the original at budget 1 and survive save_pretrained / from_pretrained."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vmoe import MoEConfig, MoEMLP, reference
from vmoe.config import column_offsets, gate_factor
from vmoe.slim import (
    SlimMoEMLP,
    choose_widths,
    finetune,
    fresh_like,
    layer_inputs,
    moe_layers,
    prune,
    slim,
    slim_hf,
    slim_model,
)
from vmoe.testing import DEVICE, assert_close, case_id, tiny_hf_model

# (T, config kwargs): the two activation families, a plain and a gated one, on uniform and
# two-group layers; the gated case also has a gated shared expert, which slimming copies.
LAYERS = [
    (64, dict(n_embd=16, expert_sizes=[(4, 32)], num_active_experts=2, activation="relu2",
              router="sigmoid")),
    (48, dict(n_embd=16, expert_sizes=[(2, 24), (2, 16)], num_active_experts=2, activation="swiglu",
              router="softmax", shared_expert_width=8, shared_expert_gate=True)),
]


def _id(T, kw):
    cfg = MoEConfig(**kw)
    extra = [cfg.activation, cfg.router] + (["shared"] if cfg.shared_expert_width else [])
    return case_id(T, cfg.n_embd, cfg.expert_widths, cfg.num_active_experts, *extra)


LAYER_IDS = [_id(T, kw) for T, kw in LAYERS]


def _layer(T, kw, seed=0):
    """A fresh layer and T calibration tokens, both seeded."""
    torch.manual_seed(seed)
    layer = MoEMLP(MoEConfig(**kw)).to(DEVICE)
    x = torch.randn(T, kw["n_embd"], generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    return layer, x


def _routing64(layer, x):
    """The layer's own top-k ids and weights on x, the weights in float64."""
    with torch.no_grad():
        r = layer.route(x)
    return r.topk_ids.long(), r.topk_weights.double()


def _expert_blocks(cfg, kept):
    """w1 columns and w2 rows of kept channels, transcribed from the layout in vmoe/layer.py."""
    g, o = gate_factor(cfg.activation), column_offsets(cfg.expert_widths)
    cols, rows = [], []
    for e, idx in enumerate(kept):
        f = cfg.expert_widths[e]
        for half in range(g):  # gate columns, then up columns
            cols += [g * o[e] + half * f + int(j) for j in idx]
        rows += [o[e] + int(j) for j in idx]
    F, S = cfg.total_width, cfg.shared_expert_width
    return cols + list(range(g * F, g * (F + S))), rows + list(range(F, F + S))


@pytest.mark.parametrize("T,kw", LAYERS, ids=LAYER_IDS)
def test_budget_one_copies_the_layer(T, kw):
    layer, x = _layer(T, kw)
    new, report = slim(layer, x, 1.0)
    assert new.config == layer.config and report.widths == layer.config.expert_widths
    assert report.achieved == 1.0
    for (name, p), (name2, q) in zip(layer.named_parameters(), new.named_parameters()):
        assert name == name2 and torch.equal(p, q), name
    with torch.no_grad():
        out, aux, f_i = layer(x)
        out2, aux2, f_i2 = new(x)
    assert torch.equal(out, out2) and torch.equal(f_i, f_i2)
    for key in aux:
        assert torch.equal(aux[key], aux2[key]), key


@pytest.mark.parametrize("criterion", ["act_w2", "act", "weight"])
@pytest.mark.parametrize("T,kw", LAYERS, ids=LAYER_IDS)
def test_scores_and_kept_channels(T, kw, criterion):
    """The scores are the criterion's formula; each expert keeps its best channels; the new
    layer's weights are exactly those channels' columns and rows, in their original order."""
    layer, x = _layer(T, kw)
    new, report = slim(layer, x, 0.5, criterion=criterion, allow_null=True)
    cfg = layer.config
    g, o = gate_factor(cfg.activation), column_offsets(cfg.expert_widths)
    ids, weights = _routing64(layer, x)
    w1, w2, x64 = layer.w1.detach().double(), layer.w2.detach().double(), x.double()
    for e, f in enumerate(cfg.expert_widths):
        w1_e, w2_e = w1[:, g * o[e]: g * (o[e] + f)], w2[o[e]: o[e] + f]
        if criterion == "weight":
            want = w2_e.norm(dim=1)
            for half in range(g):
                want = want * w1_e[:, half * f:(half + 1) * f].norm(dim=0)
        else:
            want = torch.zeros(f, dtype=torch.float64, device=x.device)
            for t in range(x.shape[0]):
                for slot in range(cfg.num_active_experts):
                    if int(ids[t, slot]) == e:
                        h = reference.act(x64[t:t + 1] @ w1_e, cfg.activation)[0]
                        want += weights[t, slot] * h.abs()
            want = want / x.shape[0] * (w2_e.norm(dim=1) if criterion == "act_w2" else 1.0)
        assert_close(f"scores[{e}]", report.scores[e], want.cpu(), torch.float64, tol=1e-12)
        kept, s = report.kept[e], report.scores[e]
        assert kept.numel() == report.widths[e] and bool((kept[1:] > kept[:-1]).all())
        dropped = torch.tensor(sorted(set(range(f)) - set(kept.tolist())), dtype=torch.long)
        if kept.numel() and dropped.numel():  # the best channels, ties to the lower index
            worst_kept, best_dropped = s[kept].min(), s[dropped].max()
            assert worst_kept >= best_dropped
            if worst_kept == best_dropped:
                assert kept[s[kept] == worst_kept].max() < dropped[s[dropped] == best_dropped].min()
    cols, rows = _expert_blocks(cfg, report.kept)
    assert new.config.expert_widths == report.widths
    assert torch.equal(new.w1, layer.w1[:, cols]) and torch.equal(new.w2, layer.w2[rows])
    assert torch.equal(new.router.weight, layer.router.weight)
    if layer.shared_gate is not None:
        assert torch.equal(new.shared_gate.weight, layer.shared_gate.weight)


BUDGET_CASES = [(b, kind, alloc) for b in (0.75, 0.5, 0.35) for kind in ("flops", "params")
                for alloc in ("global", "uniform")]


@pytest.mark.parametrize("budget,kind,allocation", BUDGET_CASES,
                         ids=[f"b{b}-{k}-{a}" for b, k, a in BUDGET_CASES])
def test_budget_within_one_block_per_expert(budget, kind, allocation):
    T, kw = LAYERS[0]
    layer, x = _layer(T, dict(kw, impl="reference"))
    new, report = slim(layer, x, budget, budget_kind=kind, allocation=allocation, align=8)
    ids, _ = _routing64(layer, x)
    n = torch.bincount(ids.reshape(-1).cpu(), minlength=layer.config.num_experts).tolist()
    f = layer.config.expert_widths
    units = n if kind == "flops" else [1] * len(f)
    total = sum(u * fe for u, fe in zip(units, f))
    kept = sum(u * w for u, w in zip(units, report.widths)) / total
    slack = sum(8 * u for u in units) / total  # one block of 8 channels per expert
    assert math.isclose(kept, report.achieved, rel_tol=1e-12)
    assert budget - slack <= kept <= budget + (slack if allocation == "uniform" else 0.0)
    assert all(w % 8 == 0 and 8 <= w <= fe for w, fe in zip(report.widths, f))
    if allocation == "uniform":
        assert len(set(report.widths)) == 1


def test_null_experts_at_a_low_budget():
    T, kw = LAYERS[0]
    layer, x = _layer(T, kw)
    new, report = slim(layer, x, 0.15, allow_null=True)
    assert 0 in report.widths and any(report.widths)
    assert new.config.expert_widths == report.widths
    _, strict = slim(layer, x, 0.3, allow_null=False)  # 8 of 32 channels each is the floor, 0.25
    assert min(strict.widths) == 8
    with pytest.raises(ValueError, match="allow_null=True or a larger budget"):
        slim(layer, x, 0.15, allow_null=False)


def test_an_expert_no_token_reaches_becomes_null():
    T, kw = LAYERS[1]
    layer, x = _layer(T, dict(kw, impl="reference"))
    x[:, 0] = x[:, 0].abs() + 5
    with torch.no_grad():  # expert 3's logit is -x[:, 0] <= -5, far below the others' O(1)
        layer.router.weight[:, 0] = 0
        layer.router.weight[3] = 0
        layer.router.weight[3, 0] = -1
    ids, _ = _routing64(layer, x)
    assert not bool((ids == 3).any())
    _, report = slim(layer, x, 0.9, allow_null=True)
    assert report.widths[3] == 0 and report.counts[3] == 0
    _, report = slim(layer, x, 0.9, allow_null=False)  # its scores all tie at 0: the first 8
    assert report.widths[3] == 8 and report.kept[3].tolist() == list(range(8))


def test_drop_makes_whole_experts_null():
    T, kw = LAYERS[0]
    layer, x = _layer(T, dict(kw, impl="reference"))
    _, report = slim(layer, x, 0.6, allocation="drop", allow_null=True)
    assert set(report.widths) == {0, 32} and 0.35 < report.achieved <= 0.6


@pytest.mark.parametrize("groups", ["original", "widths"])
@pytest.mark.parametrize("T,kw", LAYERS, ids=LAYER_IDS)
def test_forward_and_gradients_match_the_reference(T, kw, groups):
    """The slimmed layer (Triton path) against vmoe.reference.expert_mlp in float64 on the kept
    weights, and its gradients against a float64 copy on the reference path."""
    layer, x = _layer(T, kw)
    new, report = slim(layer, x, 0.2, allow_null=True, groups=groups)
    assert type(new) is (SlimMoEMLP if groups == "original" else MoEMLP)
    assert 0 in report.widths and any(report.widths)  # null experts among the slimmed ones
    cfg = new.config
    g, F = gate_factor(cfg.activation), cfg.total_width
    x = x.clone().requires_grad_()
    out, aux, _ = new(x)
    ids, weights = _routing64(new, x.detach())
    w1, w2, x64 = new.w1.detach().double(), new.w2.detach().double(), x.detach().double()
    want = reference.expert_mlp(x64, ids, weights, w1[:, :g * F], w2[:F], cfg.expert_widths,
                                cfg.activation)
    if cfg.shared_expert_width:
        gate = torch.sigmoid(x64 @ new.shared_gate.weight.detach().double().T)
        want = want + reference.shared_expert(x64, w1[:, g * F:], w2[F:], cfg.activation, gate)
    assert_close("out", out, want, torch.float32)

    ref = (SlimMoEMLP(dataclasses.replace(cfg, impl="reference"), new.balance_groups)
           if groups == "original" else MoEMLP(dataclasses.replace(cfg, impl="reference")))
    ref = ref.to(DEVICE, torch.float64)
    ref.load_state_dict(new.state_dict())
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    x_ref = x.detach().double().requires_grad_()
    out_ref, aux_ref, _ = ref(x_ref)
    params = [new.router.weight, new.w1, new.w2]
    params_ref = [ref.router.weight, ref.w1, ref.w2]
    grads = torch.autograd.grad((out * dy).sum() + sum(aux.values()), params + [x])
    grads_ref = torch.autograd.grad((out_ref * dy.double()).sum() + sum(aux_ref.values()),
                                    params_ref + [x_ref])
    for name, a, b in zip(["router", "w1", "w2", "x"], grads, grads_ref):
        assert float(a.abs().sum()) > 0, f"no gradient reaches {name}"
        assert_close(f"grad {name}", a, b, torch.float32)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_original_groups_keep_load_balancing(impl):
    """Same router, same routing: with the original groups the slimmed layer's load-balance loss
    is the original's; with width groups, here all of one expert, it is the constant 1."""
    T, kw = LAYERS[0]
    layer, x = _layer(T, dict(kw, impl=impl))
    kept = [torch.arange(w) for w in (8, 16, 24, 32)]
    keep, lose = prune(layer, kept, groups="original"), prune(layer, kept, groups="widths")
    assert keep.balance_groups == (4,) and lose.config.expert_sizes == ((1, 8), (1, 16), (1, 24), (1, 32))
    with torch.no_grad():
        _, aux, _ = layer(x)
        _, aux_keep, _ = keep(x)
        _, aux_lose, _ = lose(x)
    assert float(aux["load_balance_loss"]) != 1.0
    for key in ("load_balance_loss", "router_z_loss"):
        assert_close(f"{key}, original groups", aux_keep[key], aux[key], torch.float32)
    assert_close("load balance, groups of one", aux_lose["load_balance_loss"],
                 torch.ones_like(aux_lose["load_balance_loss"]), torch.float32)


def test_deterministic():
    T, kw = LAYERS[1]
    layer, x = _layer(T, dict(kw, impl="reference"))
    x = torch.cat([x, x, x])  # three times the tokens, so that max_tokens samples
    runs = [slim(layer, x, 0.5, allow_null=True, max_tokens=T, seed=3) for _ in range(2)]
    torch.manual_seed(123)  # a different global RNG state changes nothing
    runs.append(slim(layer, x, 0.5, allow_null=True, max_tokens=T, seed=3))
    (a, ra), *others = runs
    for b, rb in others:
        assert ra.widths == rb.widths and ra.counts == rb.counts
        assert all(torch.equal(p, q) for p, q in zip(ra.kept + ra.scores, rb.kept + rb.scores))
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    _, rc = slim(layer, x, 0.5, allow_null=True, max_tokens=T, seed=4)
    assert rc.counts != ra.counts or not all(torch.equal(p, q) for p, q in zip(ra.scores, rc.scores))


def test_choose_widths_breaks_ties_by_index():
    scores = [torch.ones(16), torch.ones(16)]
    widths, kept = choose_widths(scores, [1, 1], 0.5, align=8, allow_null=True)
    assert widths == (16, 0) and kept[0].tolist() == list(range(16))


BAD = [
    ("budget-0", dict(budget=0.0), ValueError, "budget must be a number in \\(0, 1\\]"),
    ("budget-1.5", dict(budget=1.5), ValueError, "budget"),
    ("budget-nan", dict(budget=float("nan")), ValueError, "budget"),
    ("budget-negative", dict(budget=-0.5), ValueError, "budget"),
    ("budget-bool", dict(budget=True), ValueError, "budget"),
    ("calibration-last-dim", dict(x=lambda x: x[:, :8]), ValueError, "calibration_x must be .*n_embd=16"),
    ("calibration-1d", dict(x=lambda x: x[0]), ValueError, "calibration_x"),
    ("calibration-dtype", dict(x=lambda x: x.double()), TypeError, "calibration_x has dtype"),
    ("calibration-empty", dict(x=lambda x: x[:0]), ValueError, "calibration_x is empty"),
    ("calibration-nan", dict(x=lambda x: x * float("nan")), ValueError, "calibration_x holds NaN"),
    ("calibration-not-tensor", dict(x=lambda x: x.tolist()), TypeError, "calibration_x must be"),
    ("not-a-layer", dict(layer=lambda m: torch.nn.Linear(16, 16)), TypeError, "moe must be a vmoe.MoEMLP"),
    ("criterion", dict(criterion="magnitude"), ValueError, "criterion must be one of"),
    ("budget-kind", dict(budget_kind="bytes"), ValueError, "budget_kind must be one of"),
    ("allocation", dict(allocation="random"), ValueError, "allocation must be one of"),
    ("groups", dict(groups="none"), ValueError, "groups must be one of"),
    ("align-0", dict(align=0), ValueError, "align must be an int >= 1"),
    ("drop-without-null", dict(allocation="drop"), ValueError, "allow_null=True"),
    ("budget-below-minimum", dict(budget=0.05, align=16), ValueError, "below what keeping"),
    ("max-tokens-0", dict(max_tokens=0), ValueError, "max_tokens"),
]


@pytest.mark.parametrize("name,change,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(name, change, exc, match):
    T, kw = LAYERS[0]
    layer, x = _layer(T, dict(kw, impl="reference"))
    change = dict(change)
    layer = change.pop("layer", lambda m: m)(layer)
    x = change.pop("x", lambda t: t)(x)
    budget = change.pop("budget", 0.5)
    with pytest.raises(exc, match=match):
        slim(layer, x, budget, **change)


def test_prune_rejects_bad_kept():
    T, kw = LAYERS[0]
    layer, _ = _layer(T, dict(kw, impl="reference"))
    good = [torch.arange(8)] * 4
    with pytest.raises(ValueError, match="one index tensor per expert"):
        prune(layer, good[:3])
    with pytest.raises(ValueError, match=r"kept\[1\] must be ascending"):
        prune(layer, [torch.arange(8), torch.tensor([3, 2]), torch.arange(8), torch.arange(8)])
    with pytest.raises(ValueError, match=r"kept\[2\] must be ascending distinct .* in \[0, 32\)"):
        prune(layer, [torch.arange(8), torch.arange(8), torch.tensor([31, 32]), torch.arange(8)])
    with pytest.raises(ValueError, match="keeps no channel"):
        prune(layer, [torch.arange(0)] * 4)


class _Stack(torch.nn.Module):
    """Two MoE layers with residuals and a linear read-out: the smallest model slim_model walks."""

    def __init__(self, kw):
        super().__init__()
        self.blocks = torch.nn.ModuleList(MoEMLP(MoEConfig(**kw)) for _ in range(2))
        self.head = torch.nn.Linear(kw["n_embd"], 1)

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)[0]
        return self.head(x)


def test_slim_model_and_finetune():
    T, kw = LAYERS[0]
    torch.manual_seed(0)
    model = _Stack(dict(kw, impl="reference")).to(DEVICE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 16, generator=gen).to(DEVICE) for _ in range(3)]
    new, reports = slim_model(model, batches, 0.5, allow_null=True)
    assert set(reports) == {"blocks.0", "blocks.1"}
    for i, blk in enumerate(new.blocks):
        assert isinstance(blk, SlimMoEMLP) and blk.config.expert_widths == reports[f"blocks.{i}"].widths
        assert reports[f"blocks.{i}"].tokens == 48
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    # layer 1's calibration inputs are the original layer 0's outputs (one pass of the original)
    _, direct = slim(model.blocks[1], torch.cat([b + model.blocks[0](b)[0] for b in batches]).detach(),
                     0.5, allow_null=True)
    assert direct.widths == reports["blocks.1"].widths

    target = torch.randn(16, 1, generator=gen).to(DEVICE)

    def loss_fn(m, batch):
        return (m(batch) - target).pow(2).mean()

    w2 = new.blocks[0].w2.detach().clone()
    losses = finetune(new, iter([batches[0]] * 6), 6, loss_fn, lr=1e-2)
    assert losses.shape == (6,) and bool(torch.isfinite(losses).all())
    assert float(losses[-1]) < float(losses[0])
    assert not torch.equal(w2, new.blocks[0].w2)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        finetune(new, iter(batches), -1, loss_fn)


def test_fresh_like_keeps_the_architecture():
    T, kw = LAYERS[1]
    layer, x = _layer(T, dict(kw, impl="reference"))
    new, _ = slim(layer, x, 0.5, allow_null=True)
    twin = fresh_like(new)
    assert type(twin) is SlimMoEMLP and twin.config == new.config
    assert twin.balance_groups == new.balance_groups == (2, 2)
    assert all(p.shape == q.shape for p, q in zip(twin.parameters(), new.parameters()))
    assert not torch.equal(twin.w1, new.w1)


def test_original_null_experts_stay_null():
    T, kw = 32, dict(n_embd=16, expert_sizes=[(2, 16), (1, 0)], num_active_experts=2, activation="swiglu",
                     router="softmax", impl="reference")
    layer, x = _layer(T, kw)
    for criterion in ("act_w2", "weight"):
        new, report = slim(layer, x, 0.5, criterion=criterion, allow_null=False)
        assert report.widths == (8, 8, 0) and report.scores[2].numel() == 0
        with torch.no_grad():
            out, _, _ = new(x)
        assert bool(torch.isfinite(out).all())


def test_slim_model_one_budget_for_all_layers():
    """budget_scope="model": the layers' experts compete for one budget of the model's expert
    FLOPs, kept within one block per expert below it; each report keeps its layer's own fraction."""
    T, kw = LAYERS[0]
    torch.manual_seed(0)
    model = _Stack(dict(kw, impl="reference")).to(DEVICE)
    batches = [torch.randn(16, 16, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i in range(3)]
    inputs = layer_inputs(model, batches)
    new, reports = slim_model(model, None, 0.5, inputs=inputs, budget_scope="model", allow_null=True)
    n = [c for r in reports.values() for c in r.counts]
    kept = sum(c * w for c, w in zip(n, [w for r in reports.values() for w in r.widths]))
    total = sum(c * f for c, f in zip(n, [f for r in reports.values() for f in r.widths_before]))
    assert 0.5 - sum(8 * c for c in n) / total <= kept / total <= 0.5
    assert len({r.flops_fraction for r in reports.values()}) > 1  # the layers got different shares
    for name, layer in moe_layers(new):
        assert layer.config.expert_widths == reports[name].widths
    _, per_layer = slim_model(model, None, 0.5, inputs=inputs, allow_null=True)
    for name, r in per_layer.items():  # the default, each layer to its own budget
        _, alone = slim(model.get_submodule(name), inputs[name], 0.5, allow_null=True)
        assert r.flops_fraction <= 0.5 and r.widths == alone.widths
    with torch.no_grad():  # every act_w2 score of layer 1 is 0: no block of it is ever bought
        model.blocks[1].w2.zero_()
    with pytest.raises(ValueError, match="keeps no channel of blocks.1: .* or budget_scope='layer'"):
        slim_model(model, None, 0.5, inputs=inputs, budget_scope="model", allow_null=True)


# --- transformers models (vmoe.slim.slim_hf) ---------------------------------------------------

HF_SLIM_MODELS = ["qwen3_moe", "olmoe", "mixtral"]


@pytest.fixture
def hf():
    pytest.importorskip("transformers")
    import vmoe.hf

    return vmoe.hf


def _calibration_ids(B=2, S=12, seed=1):
    return torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _hf_block_inputs(model, ids, paths):
    """``{experts path: [T, d]}``: the input of the MoE block around each experts module, caught
    by a pre-hook on the block (the experts module's parent) in one forward of ``model``."""
    caught = {}
    handles = [model.get_submodule(p.rpartition(".")[0]).register_forward_pre_hook(
        lambda m, args, p=p: caught.__setitem__(p, args[0].reshape(-1, args[0].shape[-1]))) for p in paths]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return caught


def _hf_scores_by_formula(model, path, x):
    """act_w2 scores of the experts module at ``path`` on its block's input ``x``, transcribed in
    float64 from transformers' layout: routing by the block's own router, gate rows [0, I) and up
    rows [I, 2I) of gate_up_proj[e], w2 row j = column j of down_proj[e]."""
    block = model.get_submodule(path.rpartition(".")[0])
    with torch.no_grad():
        _, weights, ids = block.gate(x)
    up, down = block.experts.gate_up_proj.detach().double(), block.experts.down_proj.detach().double()
    E, f = down.shape[0], down.shape[2]
    x64, out = x.double(), []
    for e in range(E):
        omega = (weights.double() * (ids == e)).sum(1)                          # [T]
        h = torch.nn.functional.silu(x64 @ up[e, :f].T) * (x64 @ up[e, f:].T)    # [T, I]
        out.append((omega[:, None] * h.abs()).sum(0) / x.shape[0] * down[e].norm(dim=0))
    return out


@pytest.mark.parametrize("name", HF_SLIM_MODELS)
def test_hf_budget_one_is_the_same_model(hf, name):
    model = tiny_hf_model(name)
    ids = _calibration_ids()
    new, reports = slim_hf(model, ids, 1.0)
    assert type(new) is hf.variable_width_class(type(model))
    assert list(reports) == [path for path, _ in hf.experts_modules(model)]
    assert all(r.widths == r.widths_before == (16,) * 4 and r.achieved == 1.0 for r in reports.values())
    new.set_experts_implementation(hf.NAME)
    assert new.config._experts_implementation == hf.NAME
    with torch.no_grad():
        assert_close("logits", new(ids).logits, model(ids).logits, torch.float32)


@pytest.mark.parametrize("name", HF_SLIM_MODELS)
def test_hf_scores_and_kept_channels(hf, name):
    """The scores are the act_w2 formula on the model's own routing; each expert keeps its best
    channels; the new experts' weights are exactly those channels' gate, up and down weights, in
    their original order; every other weight is copied."""
    model = tiny_hf_model(name)
    ids = _calibration_ids()
    new, reports = slim_hf(model, ids, 0.5, align=4, allow_null=True)
    inputs = _hf_block_inputs(model, ids, list(reports))
    for path, r in reports.items():
        want = _hf_scores_by_formula(model, path, inputs[path])
        for e, s in enumerate(r.scores):
            assert_close(f"{path} scores[{e}]", s, want[e].cpu(), torch.float64, tol=1e-10)
            kept, dropped = r.kept[e], torch.tensor(sorted(set(range(16)) - set(r.kept[e].tolist())))
            if kept.numel() and dropped.numel():
                assert s[kept].min() >= s[dropped].max()
        old, slimmed = model.get_submodule(path), new.get_submodule(path)
        assert slimmed.expert_widths == r.widths
        o = column_offsets(r.widths)
        for e, k in enumerate(r.kept):
            w, k = r.widths[e], k.to(DEVICE)
            gate, up = old.gate_up_proj[e, k], old.gate_up_proj[e, 16 + k]          # [w, d]
            assert torch.equal(slimmed.w1[:, 2 * o[e]: 2 * o[e] + w], gate.T)
            assert torch.equal(slimmed.w1[:, 2 * o[e] + w: 2 * (o[e] + w)], up.T)
            assert torch.equal(slimmed.w2[o[e]: o[e] + w], old.down_proj[e][:, k].T)
    others = {n: p for n, p in model.state_dict().items() if ".experts." not in n}
    new_state = new.state_dict()
    assert all(torch.equal(new_state[n], p) for n, p in others.items())


HF_BUDGETS = [(b, kind, scope) for b in (0.7, 0.4) for kind in ("flops", "params")
              for scope in ("layer", "model")]


@pytest.mark.parametrize("budget,kind,scope", HF_BUDGETS, ids=[f"b{b}-{k}-{s}" for b, k, s in HF_BUDGETS])
def test_hf_budget_within_one_block_per_expert(hf, budget, kind, scope):
    """The experts' kept cost over the whole model: at most the budget, less than one block of
    ``align`` channels per expert below it."""
    model = tiny_hf_model("qwen3_moe")
    ids = _calibration_ids()
    _, reports = slim_hf(model, ids, budget, budget_kind=kind, budget_scope=scope, align=4,
                         allow_null=True)
    T, k = ids.numel(), model.config.num_experts_per_tok
    assert all(sum(r.counts) == T * k and r.tokens == T for r in reports.values())
    units = [n if kind == "flops" else 1 for r in reports.values() for n in r.counts]
    widths = [w for r in reports.values() for w in r.widths]
    total = sum(u * 16 for u in units)
    kept = sum(u * w for u, w in zip(units, widths)) / total
    assert budget - sum(4 * u for u in units) / total <= kept <= budget
    if scope == "layer":
        assert all(r.achieved <= budget for r in reports.values())


def _router_logits(model, ids, path):
    """The router logits of the MoE block around ``path`` on ``ids``."""
    caught = []
    gate = model.get_submodule(path.rpartition(".")[0]).gate
    handle = gate.register_forward_hook(lambda m, args, out: caught.append(out[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return caught[0]


def test_hf_null_experts_keep_their_router_logits(hf):
    model = tiny_hf_model("qwen3_moe")
    ids = _calibration_ids()
    new, reports = slim_hf(model, ids, 0.25, allow_null=True)  # 2 blocks of 8 a layer: some null
    widths = [r.widths for r in reports.values()]
    assert all(0 in w and any(w) for w in widths)
    first = next(iter(reports))
    for path in reports:  # every expert keeps its router row; the first block's input is unchanged
        block, twin = (m.get_submodule(path.rpartition(".")[0]) for m in (model, new))
        assert torch.equal(twin.gate.weight, block.gate.weight) and twin.gate.weight.shape[0] == 4
        assert twin.experts.num_experts == 4
    assert torch.equal(_router_logits(new, ids, first), _router_logits(model, ids, first))
    with torch.no_grad():
        assert bool(torch.isfinite(new(ids).logits).all())
    _, strict = slim_hf(model, ids, 0.6, allow_null=False)  # 8 of 16 channels each is the floor
    assert all(min(r.widths) == 8 for r in strict.values())
    with pytest.raises(ValueError, match="allow_null=True or a larger budget"):
        slim_hf(model, ids, 0.25, allow_null=False)


def test_hf_save_and_load_round_trip(hf, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_hf_model("olmoe")
    ids = _calibration_ids()
    new, reports = slim_hf(model, ids, 0.25, allow_null=True)  # 2 blocks of 8 a layer: some null
    assert all(0 in r.widths for r in reports.values())
    with torch.no_grad():
        logits = new(ids).logits
    new.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=hf.NAME)
    loaded = loaded.to(DEVICE)
    assert type(loaded) is type(new)
    assert [loaded.get_submodule(p).expert_widths for p in reports] == [r.widths for r in reports.values()]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_hf_deterministic(hf):
    """The pass runs in eval mode (attention dropout off) and draws only from its own seeded
    generator: the same seed gives the same model whatever the global RNG, and the caller's model
    mode and RNG are left as they were."""
    model = tiny_hf_model("qwen3_moe").train()
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    ids = _calibration_ids(B=3)
    runs = []
    for rng_seed in (1, 2):
        torch.manual_seed(rng_seed)
        state = torch.get_rng_state()
        runs.append(slim_hf(model, ids, 0.5, allow_null=True, align=4, max_tokens=20, seed=3))
        assert torch.equal(torch.get_rng_state(), state) and model.training
    (a, ra), (b, rb) = runs
    for path in ra:
        assert ra[path].widths == rb[path].widths and ra[path].counts == rb[path].counts
        assert all(torch.equal(p, q) for p, q in zip(ra[path].scores, rb[path].scores))
        assert ra[path].tokens == 20
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    _, rc = slim_hf(model, ids, 0.5, allow_null=True, align=4, max_tokens=20, seed=4)
    assert any(rc[p].counts != ra[p].counts for p in ra)


HF_BAD = [
    ("budget-0", dict(budget=0.0), ValueError, r"budget must be a number in \(0, 1\]"),
    ("budget-negative", dict(budget=-0.5), ValueError, "budget must be"),
    ("budget-above-1", dict(budget=1.5), ValueError, "budget must be"),
    ("budget-nan", dict(budget=float("nan")), ValueError, "budget must be"),
    ("budget-string", dict(budget="0.5"), ValueError, "budget must be a number"),
    ("budget-tensor", dict(budget=torch.tensor(0.5)), ValueError, "budget must be a number"),
    ("ids-float", dict(ids=lambda t: t.float()), TypeError, "calibration_input_ids must hold integer"),
    ("ids-bool", dict(ids=lambda t: t > 3), TypeError, "calibration_input_ids must hold integer"),
    ("ids-1d", dict(ids=lambda t: t[0]), ValueError, r"calibration_input_ids must be \[B, S\]"),
    ("ids-3d", dict(ids=lambda t: t[..., None]), ValueError, r"calibration_input_ids must be \[B, S\]"),
    ("ids-hidden-states", dict(ids=lambda t: torch.randn(2, 12, 32)), TypeError, "calibration_input_ids"),
    ("ids-empty", dict(ids=lambda t: t[:, :0]), ValueError, "calibration_input_ids is empty"),
    ("ids-out-of-vocab", dict(ids=lambda t: t + 64), ValueError, r"token ids in \[0, 64\)"),
    ("ids-negative", dict(ids=lambda t: t - 100), ValueError, "calibration_input_ids must be token ids"),
    ("ids-list", dict(ids=lambda t: t.tolist()), TypeError, "calibration_input_ids must be a torch.Tensor"),
    ("not-a-model", dict(model=lambda m: torch.nn.Linear(4, 4)), TypeError, "model must be a transformers"),
    ("criterion", dict(criterion="magnitude"), ValueError, "criterion must be one of"),
    ("budget-scope", dict(budget_scope="global"), ValueError, "budget_scope must be one of"),
    ("budget-kind", dict(budget_kind="bytes"), ValueError, "budget_kind must be one of"),
    ("allocation", dict(allocation="random"), ValueError, "allocation must be one of"),
    ("align-0", dict(align=0), ValueError, "align must be an int >= 1"),
    ("max-tokens-0", dict(max_tokens=0), ValueError, "max_tokens"),
]


@pytest.mark.parametrize("name,change,exc,match", HF_BAD, ids=[b[0] for b in HF_BAD])
def test_hf_bad_arguments(hf, name, change, exc, match):
    model = tiny_hf_model("qwen3_moe")
    change = dict(change)
    model = change.pop("model", lambda m: m)(model)
    ids = change.pop("ids", lambda t: t)(_calibration_ids())
    with pytest.raises(exc, match=match):
        slim_hf(model, ids, change.pop("budget", 0.5), **change)


def test_hf_model_without_experts_and_bad_kept(hf):
    transformers = pytest.importorskip("transformers")
    dense = tiny_hf_model("qwen3_moe")
    config = dense.config
    config.mlp_only_layers = list(range(config.num_hidden_layers))
    dense = transformers.Qwen3MoeForCausalLM(config).eval()
    with pytest.raises(ValueError, match="holds no transformers experts module"):
        slim_hf(dense, _calibration_ids(), 0.5)
    model = tiny_hf_model("qwen3_moe")
    with pytest.raises(ValueError, match="not experts modules"):
        hf.to_variable_width(model, kept={"model.layers.0.mlp": [torch.arange(8)] * 4})
    bad = [torch.arange(8), torch.tensor([3, 2]), torch.arange(8), torch.arange(8)]
    with pytest.raises(ValueError, match=r"kept\[1\] must be ascending"):
        hf.to_variable_width(model, kept={"model.layers.0.mlp.experts": bad})
