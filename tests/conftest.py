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


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With ``LEARNEDOPT_FAILURE_LOG`` set, append each failure's report to that file as it
    happens, so that a run killed by a time limit (a short GPU lease) keeps what it found."""
    path = os.environ.get("LEARNEDOPT_FAILURE_LOG")
    # under pytest-xdist the controller gets every worker's reports too: write them once
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
