"""Fused Triton kernels for the learned updates, installed as ``learnedopt.kernels``.

Not implemented yet: this placeholder tells the optimizers that no fused update exists, so
``backend="auto"`` uses the PyTorch path and ``backend="triton"`` raises a clear error.
"""

FUSED_UPDATES_AVAILABLE = False
