"""vmoe: Mixture-of-Experts layers whose experts have different widths, in Triton.

Shape letters: T tokens, d model width, E experts, k experts per token, f_e width of expert e,
F = sum of f_e. See README.md and notebooks/.
"""
from vmoe import reference
from vmoe.autograd import expert_mlp
from vmoe.config import MoEConfig
from vmoe.layer import MoEMLP

__all__ = ["MoEConfig", "MoEMLP", "expert_mlp", "reference"]
__version__ = "0.1.0"
