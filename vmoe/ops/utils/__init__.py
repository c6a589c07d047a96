"""What the kernels share: the cached launch path (:mod:`~vmoe.ops.utils.launch`) and the device and
environment helpers (:mod:`~vmoe.ops.utils.device`)."""
