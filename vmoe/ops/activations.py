"""Activation functions and their derivatives, as Triton device functions shared by the kernels.

Only erf, exp and sigmoid are used: libdevice functions (tanh, ...) do not run in the interpreter.
The derivations are in notebooks/05_autograd.ipynb. Every function works on fp32 blocks.
"""
import triton
import triton.language as tl

from vmoe.config import ACTIVATIONS

# The constexpr codes the kernels dispatch on, one per name in vmoe.config.ACTIVATIONS.
ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
RELU2_C = tl.constexpr(ACT_CODES["relu2"])
GELU_C = tl.constexpr(ACT_CODES["gelu"])

# Globals a kernel reads must be constexpr objects.
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    """h = act(z) for the ungated activations."""
    if ACT == RELU2_C:
        # where(z < 0, 0, z), not maximum(z, 0): maximum drops a NaN, and a diverging run must
        # show its NaN, as torch.relu does.
        r = tl.where(z < 0.0, 0.0, z)
        h = r * r
    elif ACT == GELU_C:
        h = 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT2))
    else:
        h = z * _sigmoid(z)
    return h


@triton.jit
def act_bwd(z, dh, ACT: tl.constexpr):
    """dz = dh * act'(z) for the ungated activations."""
    if ACT == RELU2_C:
        dz = dh * 2.0 * tl.where(z < 0.0, 0.0, z)  # NaN in z stays NaN (see act_fwd)
    elif ACT == GELU_C:
        cdf = 0.5 * (1.0 + tl.erf(z * _INV_SQRT2))
        pdf = _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
        dz = dh * (cdf + z * pdf)
    else:
        s = _sigmoid(z)
        dz = dh * s * (1.0 + z * (1.0 - s))
    return dz


@triton.jit
def swiglu_fwd(gate, up):
    return gate * _sigmoid(gate) * up


@triton.jit
def swiglu_bwd(gate, up, dh):
    """(dgate, dup) for h = silu(gate) * up."""
    s = _sigmoid(gate)
    silu = gate * s
    dgate = dh * up * s * (1.0 + gate * (1.0 - s))
    dup = dh * silu
    return dgate, dup
