"""The training study: a small byte-level GPT whose MLPs are :class:`vmoe.MoEMLP` layers
(:mod:`~vmoe.train.model`), its training loop (:mod:`~vmoe.train.loop`, ``python -m vmoe.train``)
and its pinned corpus (:mod:`~vmoe.train.data`, ``python -m vmoe.train.data``)."""
