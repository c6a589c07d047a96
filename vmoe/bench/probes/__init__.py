"""Probes: small measurements behind numbers of ``results/NOTES.md``, each a module run on its own as
``python -m vmoe.bench.probes.<name>`` (its docstring gives the arguments; the Makefile's ``probe-*``
targets run the recurring ones). Unlike :mod:`vmoe.bench`'s sweep they check nothing against the
reference beyond what each says; they answer one question each. All but ``compile`` need a GPU.

- :mod:`~vmoe.bench.probes.gemms`: each of the six grouped GEMMs of a forward and backward at the
  large configs, per ``VMOE_TMA`` mode (pointer kernels, descriptors, warp-specialized), with
  cuBLAS on the same FLOPs (``results/tma/gemms_*.csv``).
- :mod:`~vmoe.bench.probes.forward`: the expert forward at the large configs split into its launches
  (routing, up_proj, down_proj, combine with its byte floor), beside the dense stand-in's parts
  (``results/forward/``).
- :mod:`~vmoe.bench.probes.compile`: compiles the GEMM kernels for sm_90 on a CPU and reports
  registers, spills, shared memory, TMA / ``cp.async`` copies, ``wgmma`` and warp specialization.
- :mod:`~vmoe.bench.probes.scatter`: the routing's scatter kernel alone (do_bench and CUDA-graph
  time, registers, spills), against an earlier version of it, bit for bit (``results/scatter/``).
- :mod:`~vmoe.bench.probes.kernels`: a layer's training step kernel by kernel (torch.profiler GPU
  time and share) (``results/kernels/``).
- :mod:`~vmoe.bench.probes.launch`: the eager layer's host time with vmoe's direct launch path off and
  on, one kernel's launch cost each way, and a cProfile of the forward (``results/launch/``).
- :mod:`~vmoe.bench.probes.host`: a cProfile of the eager ``expert_mlp`` forward's host time.
- :mod:`~vmoe.bench.probes.null_shared`: null and shared experts at layer scope, against the same
  layer without nulls and with the shared expert as a separate cuBLAS MLP
  (``results/null_shared/``).
- :mod:`~vmoe.bench.probes.width_cost`: the experts' GPU time by width at the training study's size
  (``results/width_cost/``).
- :mod:`~vmoe.bench.probes.profiling`: what the probes share: a layer's no-grad forward and training
  step as closures, and GPU time per kernel from torch.profiler.
"""
