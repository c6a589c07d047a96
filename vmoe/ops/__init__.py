"""The Triton kernels and their launchers, one module per operation: the routing metadata
(:mod:`~vmoe.ops.routing`), the fused router (:mod:`~vmoe.ops.router`), gather and combine
(:mod:`~vmoe.ops.gather_scatter`), the ragged grouped GEMMs (:mod:`~vmoe.ops.grouped_gemm`) and the
activations they fuse (:mod:`~vmoe.ops.activations`). :mod:`~vmoe.ops.utils` holds the launch path
and the device helpers they share. :mod:`vmoe.library` wraps them as PyTorch operators."""
