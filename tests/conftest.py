"""Test configuration.

``TRITON_INTERPRET=1`` must be set before any Triton kernel module is imported (the mode is fixed
when ``@triton.jit`` runs), so that kernel tests run on CPU tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
