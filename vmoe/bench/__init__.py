"""Measurement: the benchmark harness (:mod:`~vmoe.bench.harness`, ``python -m vmoe.bench``), the
providers it compares (:mod:`~vmoe.bench.baselines`), its CSV and README tables
(:mod:`~vmoe.bench.report`) and the expert-parallel benchmark (:mod:`~vmoe.bench.parallel`)."""
