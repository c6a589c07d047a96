"""vmoe as a transformers experts backend, and transformers MoE models whose experts have
different widths.

``import vmoe.hf`` registers ``"vmoe"`` in transformers' ``ExpertsInterface``, so that a model
whose experts module carries ``@use_experts_implementation`` (Qwen3-MoE, Qwen2-MoE, OLMoE,
Mixtral, DeepSeek-V3, ...) runs its experts on vmoe's kernels::

    import vmoe.hf
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="vmoe")
    model.set_experts_implementation("vmoe")      # or switch a loaded model

Such a module stores ``gate_up_proj [E, 2I, d]`` (``[E, d, 2I]`` when ``is_transposed``; or
``up_proj`` when the experts have no gate) and ``down_proj [E, d, I]`` (``[E, I, d]``). Their
``.transpose(1, 2)`` views, or the parameters themselves when transposed, are vmoe's per-expert
layout ``w1 [E, d, g*I]``, ``w2 [E, I, d]`` (:mod:`vmoe.ops.grouped_gemm`), which the kernels read
in place: nothing is copied per step, and the weight gradients are written in the parameters' own
layout, so training, ``save_pretrained`` and ``from_pretrained`` see ordinary parameters.
transformers' gate order (``gate, up = proj.chunk(2)``, then ``act_fn(gate) * up``) is vmoe's
(gate columns first, then up). The activation is read off ``act_fn``: a SiLU gate is vmoe's
``swiglu``; ungated experts take SiLU, exact GELU or ReLU². Anything else (biases, interleaved
gate/up columns, a custom gate such as gpt-oss's clamped SwiGLU, a norm after each expert,
another activation) raises :class:`UnsupportedExperts`, naming the model class and what is
missing, when the implementation is chosen (``from_pretrained(..., experts_implementation=
"vmoe")`` or ``set_experts_implementation("vmoe")``), and again on a call, never computing
something else.

Expert ids outside ``[0, E)``, such as the expert-parallel sentinel ``E``, add nothing and get a
zero routing-weight gradient, as in the built-in backends (VMOE_CHECK=1 turns them into an
error, for debugging). The routing weights are cast to the hidden states' dtype, which the
kernels take; the output has the hidden states' dtype. Under ``torch.autocast`` the experts
compute in the autocast dtype, as ``nn.Linear`` would. The kernels are ``torch.library``
operators, so ``torch.compile`` (fullgraph) and CUDA graphs work as for :class:`vmoe.MoEMLP`.

Variable widths: :func:`variable_width_class` makes the twin of a transformers causal LM class
whose experts are :class:`VariableWidthExperts` (vmoe's flat ``w1 [d, 2F]``, ``w2 [F, d]``), with
the widths in the config (``vmoe_expert_widths``) and a model type of its own
(``vmoe_<model type>``), registered with the Auto classes for Qwen3-MoE, Qwen2-MoE, OLMoE and
Mixtral. It saves and loads with ``save_pretrained`` / ``from_pretrained``; without
``import vmoe.hf`` transformers does not know the model type and refuses to load it, rather
than building uniform experts and dropping the weights. :func:`vmoe.slim.slim_hf` chooses the
widths from calibration tokens and builds the twin with :func:`to_variable_width`.

Walk-through: notebooks/10_hf.ipynb. Shape letters: see :mod:`vmoe.config`; I is the width of
every expert of a transformers experts module.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers import activations as hf_activations
from transformers import initialization as hf_init
from transformers.integrations import moe as hf_moe

from vmoe import library as ops
from vmoe import reference
from vmoe.autograd import apply_experts, autocast_inputs, expert_mlp, precompile_experts, use_triton
from vmoe.config import check_activation, check_expert_widths, check_routed_args, gate_factor
from vmoe.slim import check_kept

NAME = "vmoe"

__all__ = ["NAME", "UnsupportedExperts", "ExpertsLayout", "experts_layout", "experts_forward",
           "uniform_expert_mlp", "check_model", "experts_modules", "VariableWidthExperts",
           "variable_width_class", "to_variable_width"]


class UnsupportedExperts(ValueError):
    """A transformers experts module that vmoe's kernels cannot compute exactly."""


# --- the per-expert expert computation -------------------------------------------------------

def check_uniform_args(x, topk_ids, topk_weights, w1, w2, activation) -> tuple[int, ...]:
    """Validate the arguments of :func:`uniform_expert_mlp`; return the widths, ``(I,) * E``."""
    check_activation(activation)
    check_routed_args(x, topk_ids, topk_weights, {"w1": w1, "w2": w2})
    g, d = gate_factor(activation), x.shape[1]
    if w1.dim() != 3 or w1.shape[0] == 0 or w1.shape[1] != d or w1.shape[2] % g or w1.shape[2] == 0:
        raise ValueError(f"w1 must be [E, d, {g}*I] = [E, {d}, {g}*I] for activation "
                         f"{activation!r}, got {tuple(w1.shape)}")
    E, f = w1.shape[0], w1.shape[2] // g
    if tuple(w2.shape) != (E, f, d):
        raise ValueError(f"w2 must be [E, I, d] = [{E}, {f}, {d}] to match w1 {tuple(w1.shape)}, "
                         f"got {tuple(w2.shape)}")
    return (f,) * E


def uniform_expert_mlp(x, topk_ids, topk_weights, w1, w2, activation="swiglu", *, impl="auto"):
    """:func:`vmoe.expert_mlp` for E experts of one width I, on per-expert weights.

    Args:
        x: ``[T, d]`` float32, float16 or bfloat16.
        topk_ids: ``[T, k]`` integers; ids outside ``[0, E)`` add nothing.
        topk_weights: ``[T, k]``, x's dtype.
        w1: ``[E, d, g*I]`` (g = 2 for swiglu: gate columns, then up); a transformers
            ``gate_up_proj [E, 2I, d]`` is ``gate_up_proj.transpose(1, 2)``.
        w2: ``[E, I, d]``; ``down_proj [E, d, I]`` is ``down_proj.transpose(1, 2)``.
            Both are read in place when dense with the experts outermost, in any order of the
            other two dimensions (:func:`vmoe.ops.grouped_gemm.per_expert_weight`); anything
            else is copied to contiguous first.
        activation: as for :func:`vmoe.expert_mlp`.
        impl: ``"auto"``, ``"triton"`` or ``"reference"`` (the naive loop, on 2-D copies).

    Returns:
        y ``[T, d]`` in x's dtype (the autocast dtype under autocast). Differentiable w.r.t. x,
        topk_weights, w1 and w2; the weight gradients have the weights' strides, so a transposed
        view of a parameter hands the parameter its gradient with no copy.

    Example::

        y = uniform_expert_mlp(x, ids, weights, experts.gate_up_proj.transpose(1, 2),
                               experts.down_proj.transpose(1, 2), "swiglu")
    """
    x, topk_weights, w1, w2 = autocast_inputs(x, topk_weights, w1, w2)
    widths = check_uniform_args(x, topk_ids, topk_weights, w1, w2, activation)
    if not use_triton(x, impl):
        E, d, gI = w1.shape
        return reference.expert_mlp_unchecked(x, topk_ids, topk_weights,
                                              w1.permute(1, 0, 2).reshape(d, E * gI),
                                              w2.reshape(-1, d), widths, activation)
    precompile_experts(x, topk_ids, topk_weights, w1, w2, widths, activation)
    return apply_experts(x, topk_weights, w1, w2, ops.routing(topk_ids, widths), widths, activation)


# --- transformers experts modules ------------------------------------------------------------

def _activation(act_fn) -> str | None:
    """vmoe's name for a transformers ``act_fn`` (a module from ``ACT2FN``, or a function), or
    None. Exact types only: a subclass may compute something else."""
    kind = type(act_fn)
    silu = (nn.SiLU, getattr(hf_activations, "SiLUActivation", nn.SiLU))
    if kind in silu or act_fn is F.silu:
        return "silu"
    # GELUActivation is the exact (erf) GELU with either of its implementations.
    if (kind is hf_activations.GELUActivation or act_fn is F.gelu
            or (kind is nn.GELU and act_fn.approximate == "none")):
        return "gelu"
    if kind is hf_activations.ReLUSquaredActivation:
        return "relu2"
    return None


@dataclass(frozen=True)
class ExpertsLayout:
    """How vmoe reads a transformers experts module: the activation, the up projection's
    parameter name, and whether the parameters are stored transposed (``[E, in, out]``)."""

    activation: str
    up_name: str
    transposed: bool

    def weights(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w1 [E, d, g*I], w2 [E, I, d])``: views of the module's parameters, no copy."""
        up, down = getattr(module, self.up_name), module.down_proj
        if self.transposed:
            return up, down
        return up.transpose(1, 2), down.transpose(1, 2)


def is_experts_module(module) -> bool:
    """Whether ``module`` is a transformers experts module (``@use_experts_implementation`` puts
    these flags on it)."""
    return (isinstance(module, nn.Module) and hasattr(module, "is_transposed")
            and hasattr(module, "has_gate") and hasattr(module, "down_proj"))


def experts_modules(model) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` for every transformers experts module of ``model``, in module order."""
    return [(path, m) for path, m in model.named_modules() if is_experts_module(m)]


def experts_layout(module, where: str | None = None) -> ExpertsLayout:
    """The :class:`ExpertsLayout` of a transformers experts module, or :class:`UnsupportedExperts`
    naming the module's class (``where`` adds the model and the module's path) and every feature
    vmoe's kernels lack."""
    name = type(module).__name__
    missing = []
    if getattr(module, "has_bias", False):
        missing.append("expert biases (has_bias=True)")
    if not getattr(module, "is_concatenated", True):
        missing.append("interleaved gate/up columns (is_concatenated=False)")
    if getattr(module, "has_post_expert_norm", False):
        missing.append("a norm after each expert (has_post_expert_norm=True)")
    has_gate = getattr(module, "has_gate", True)
    act_fn = getattr(module, "act_fn", None)
    act = _activation(act_fn)
    if has_gate and getattr(type(module), "_apply_gate", None) is not hf_moe._default_apply_gate:
        missing.append(f"a custom gate ({name}._apply_gate, such as a clamped or scaled SwiGLU, "
                       "where vmoe computes act_fn(gate) * up)")
    elif act_fn is None:
        missing.append("no act_fn")
    elif has_gate and act not in ("silu", None):
        missing.append(f"a {act} gate (vmoe's gated activation is SiLU: silu(gate) * up)")
    elif act is None:
        act_name = type(act_fn).__name__ if isinstance(act_fn, nn.Module) else repr(act_fn)
        missing.append(f"the activation {act_name} (vmoe computes SiLU, exact GELU and ReLU²"
                       + (", and SiLU as a gate)" if has_gate else ")"))
    up_name = "gate_up_proj" if has_gate else "up_proj"
    up, down = getattr(module, up_name, None), getattr(module, "down_proj", None)
    transposed = getattr(module, "is_transposed", False)
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or up.dim() != 3 \
            or down.dim() != 3:
        missing.append(f"no 3-D {up_name} and down_proj parameters")
    else:
        g = 2 if has_gate else 1
        E, d_up, gI = (up.shape[0], up.shape[1], up.shape[2]) if transposed else \
            (up.shape[0], up.shape[2], up.shape[1])
        expected = (E, gI // g, d_up) if transposed else (E, d_up, gI // g)
        if gI % g or tuple(down.shape) != expected:
            missing.append(f"mismatched shapes ({up_name} {tuple(up.shape)} and down_proj "
                           f"{tuple(down.shape)}, is_transposed={transposed})")
    if missing:
        at = f"{where}: " if where else ""
        raise UnsupportedExperts(
            f"{at}experts_implementation={NAME!r} cannot compute {name}: it has "
            + "; ".join(missing) + ". Use another experts_implementation (such as 'grouped_mm' or "
            "'eager') for this model.")
    return ExpertsLayout("swiglu" if has_gate else act, up_name, transposed)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"vmoe"`` experts implementation: ``self`` is a transformers experts module,
    ``hidden_states [T, d]``, ``top_k_index [T, k]``, ``top_k_weights [T, k]``; returns ``[T, d]``
    in the hidden states' dtype."""
    layout = experts_layout(self)
    w1, w2 = layout.weights(self)
    if isinstance(top_k_weights, torch.Tensor) and isinstance(hidden_states, torch.Tensor):
        top_k_weights = top_k_weights.to(hidden_states.dtype)
    y = uniform_expert_mlp(hidden_states, top_k_index, top_k_weights, w1, w2, layout.activation)
    return y.to(hidden_states.dtype)


def check_model(model) -> None:
    """Raise :class:`UnsupportedExperts` if any experts module of ``model`` (those built from its
    own config; a sub-model with its own config is checked when its implementation is set) is
    one vmoe cannot compute."""
    config = getattr(model, "config", None)
    for path, module in model.named_modules():
        if not is_experts_module(module):
            continue
        own = getattr(module, "config", None)
        if own is not None and config is not None and own is not config \
                and type(own) is not type(config):
            continue
        experts_layout(module, where=f"{type(model).__name__}.{path}")


def _validate_on_selection() -> None:
    """Check a model's experts when ``"vmoe"`` is chosen for it. transformers validates a chosen
    experts implementation in ``PreTrainedModel.get_correct_experts_implementation`` (called by
    ``set_experts_implementation``, for the model and each sub-model, and at the start of
    ``PreTrainedModel.__init__``, before the modules exist) and has no per-backend hook, so vmoe
    wraps that method, and ``post_init`` (the end of every model's construction, where
    ``from_pretrained(..., experts_implementation="vmoe")`` is checked): for ``"vmoe"`` the
    wrappers add :func:`check_model`; for the other implementations they change nothing."""
    if getattr(PreTrainedModel.post_init, "_vmoe_checks", False):
        return
    get_correct = PreTrainedModel.get_correct_experts_implementation
    post_init = PreTrainedModel.post_init

    @functools.wraps(get_correct)
    def get_correct_experts_implementation(self, requested_experts):
        applicable = get_correct(self, requested_experts)
        if applicable == NAME:
            check_model(self)
        return applicable

    @functools.wraps(post_init)
    def post_init_and_check(self):
        post_init(self)
        if getattr(self.config, "_experts_implementation", None) == NAME:
            check_model(self)

    post_init_and_check._vmoe_checks = True
    PreTrainedModel.get_correct_experts_implementation = get_correct_experts_implementation
    PreTrainedModel.post_init = post_init_and_check


# --- variable widths -------------------------------------------------------------------------

class VariableWidthExperts(nn.Module):
    """A transformers experts module (``forward(hidden_states, top_k_index, top_k_weights)``)
    whose experts have different widths, in vmoe's flat layout: ``w1 [d, g*F]`` (expert e's gate
    columns, then its up columns, for swiglu) and ``w2 [F, d]``, computed by
    :func:`vmoe.expert_mlp`."""

    def __init__(self, hidden_size: int, expert_widths, activation: str = "swiglu"):
        super().__init__()
        self.expert_widths = check_expert_widths(expert_widths)
        self.activation = check_activation(activation)
        self.num_experts = len(self.expert_widths)
        self.hidden_dim = hidden_size
        g, F_ = gate_factor(activation), sum(self.expert_widths)
        self.w1 = nn.Parameter(torch.empty(hidden_size, g * F_))
        self.w2 = nn.Parameter(torch.empty(F_, hidden_size))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        y = expert_mlp(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype), self.w1,
                       self.w2, self.expert_widths, self.activation)
        return y.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"d={self.hidden_dim}, widths={list(self.expert_widths)}, {self.activation}"


def _layer_widths(config, n_layers: int) -> list[tuple[int, ...]]:
    """``config.vmoe_expert_widths`` as one widths tuple per MoE layer: a list of ints applies to
    every MoE layer, a list of lists gives each its own."""
    widths = getattr(config, "vmoe_expert_widths", None)
    if not widths:
        raise ValueError("a variable-width model needs config.vmoe_expert_widths: the experts' "
                         "widths (one list for every MoE layer, or one list per MoE layer)")
    if all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
        return [check_expert_widths(widths)] * n_layers
    if len(widths) != n_layers:
        raise ValueError(f"config.vmoe_expert_widths has {len(widths)} lists but the model has "
                         f"{n_layers} MoE layers")
    return [check_expert_widths(w) for w in widths]


def _install_variable_width_experts(model) -> None:
    """Replace each transformers experts module of ``model`` by a :class:`VariableWidthExperts`
    with the widths of ``model.config``."""
    found = experts_modules(model)
    for (path, module), widths in zip(found, _layer_widths(model.config, len(found))):
        layout = experts_layout(module, where=f"{type(model).__name__}.{path}")
        w1, _ = layout.weights(module)
        E, d = w1.shape[0], w1.shape[1]
        if len(widths) != E:
            raise ValueError(f"config.vmoe_expert_widths gives {len(widths)} widths for {path}, "
                             f"which has {E} experts")
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr,
                VariableWidthExperts(d, widths, layout.activation))


class _VariableWidthMixin:
    """What the variable-width twin of a transformers model class adds to it."""

    def post_init(self):
        _install_variable_width_experts(self)
        super().post_init()

    @torch.no_grad()
    def initialize_weights(self):
        # The experts sit inside the base model (a PreTrainedModel of the base class), whose own
        # _init_weights transformers applies to its subtree, so they are initialized here, as
        # transformers initializes the uniform experts they replace. transformers' init
        # functions skip a parameter loaded from a checkpoint.
        super().initialize_weights()
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, VariableWidthExperts):
                hf_init.normal_(module.w1, mean=0.0, std=std)
                hf_init.normal_(module.w2, mean=0.0, std=std)


@functools.lru_cache(maxsize=None)
def variable_width_class(base: type) -> type:
    """The variable-width twin of the transformers model class ``base`` (say
    ``Qwen3MoeForCausalLM``): the same model whose experts modules are
    :class:`VariableWidthExperts` of the widths in ``config.vmoe_expert_widths``, with a config
    class of model type ``vmoe_<base model type>``. Both are registered with ``AutoConfig`` and
    ``AutoModelForCausalLM``; the config class is the model class's ``config_class``."""
    base_config = base.config_class
    model_type = f"vmoe_{base_config.model_type}"
    config_cls = type(f"VariableWidth{base_config.__name__}", (base_config,),
                      {"model_type": model_type, "__module__": __name__,
                       "__doc__": f"{base_config.__name__} with ``vmoe_expert_widths``."})
    model_cls = type(f"VariableWidth{base.__name__}", (_VariableWidthMixin, base),
                     {"config_class": config_cls, "__module__": __name__,
                      "__doc__": f"{base.__name__} with experts of different widths (vmoe.hf)."})
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    return model_cls


def to_variable_width(model, kept: dict | None = None):
    """A variable-width copy of a transformers MoE model with uniform experts, its weights copied
    into vmoe's flat layout: every expert keeps all I channels, or, for an experts module whose
    path is a key of ``kept``, expert e keeps exactly channels ``kept[path][e]`` (ascending
    indices in ``[0, I)``, in their original order: its gate and up columns and its down rows;
    an empty one makes a null expert). Routers and every other weight are copied unchanged.
    :func:`vmoe.slim.slim_hf` builds its models with it. Leaves the global RNG as it was.

    Example::

        twin = to_variable_width(model)                                   # the same function
        slim = to_variable_width(model, {"model.layers.0.mlp.experts": [torch.arange(8)] * E})
    """
    cls = variable_width_class(type(model))
    found = experts_modules(model)
    kept = dict(kept or {})
    unknown = sorted(set(kept) - {path for path, _ in found})
    if unknown:
        raise ValueError(f"kept names {unknown}, which are not experts modules of "
                         f"{type(model).__name__} ({[path for path, _ in found]})")
    per_layer = []
    state = dict(model.state_dict())
    for path, module in found:
        layout = experts_layout(module, where=f"{type(model).__name__}.{path}")
        w1, w2 = (w.detach() for w in layout.weights(module))              # [E, d, g*I], [E, I, d]
        E, d, gI = w1.shape
        g = gate_factor(layout.activation)
        f = gI // g                                                        # I, every expert's width
        idx = check_kept(kept.get(path, [torch.arange(f)] * E), (f,) * E)
        per_layer.append([i.numel() for i in idx])
        for key in (f"{path}.{layout.up_name}", f"{path}.down_proj"):
            state.pop(key)
        # Expert e's kept gate columns, then its kept up columns, as VariableWidthExperts reads them.
        cols = [torch.cat([half * f + i for half in range(g)]).to(w1.device) for i in idx]
        state[f"{path}.w1"] = torch.cat([w1[e][:, c] for e, c in enumerate(cols)], dim=1)  # [d, g*F]
        state[f"{path}.w2"] = torch.cat([w2[e][i.to(w2.device)] for e, i in enumerate(idx)])  # [F, d]
    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version")}
    config = cls.config_class(**fields, vmoe_expert_widths=per_layer)
    with torch.random.fork_rng(devices=[]):  # the init is overwritten below; spare the caller's RNG
        out = cls(config)
    out = out.to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    out.load_state_dict(state)
    out.train(model.training)
    return out


def register() -> None:
    """Register ``"vmoe"`` with transformers' experts implementations, its check on selection,
    and the variable-width twins of the MoE causal LMs vmoe is tested with (done on import)."""
    hf_moe.ExpertsInterface.register(NAME, experts_forward)
    _validate_on_selection()
    from transformers import (
        MixtralForCausalLM,
        OlmoeForCausalLM,
        Qwen2MoeForCausalLM,
        Qwen3MoeForCausalLM,
    )
    for base in (Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, OlmoeForCausalLM, MixtralForCausalLM):
        variable_width_class(base)


register()
