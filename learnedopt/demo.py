"""A short demo: train one small model with LSTMOptimizer, MetaLSTMOptimizer and Adam."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .evaluation.problems import regression_data
from .optim import LSTMOptimizer, MetaLSTMOptimizer


def make_problem(seed: int = 0, n: int = 512, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated regression data: ``y = sin(3 x @ w)`` with ``x`` ``(n, dim)``, ``y`` ``(n, 1)``
    (:func:`learnedopt.evaluation.problems.regression_data`; the evaluation suite's
    ``regression-1000`` problem draws data of the same kind for each seed)."""
    return regression_data(torch.Generator().manual_seed(seed), n, dim)


def train(make_optimizer: Callable, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 1) -> list[float]:
    """Train a 16-64-1 tanh MLP full-batch; returns the loss before each step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = make_optimizer(model.parameters())
    losses = []
    for _ in range(steps):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        losses.append(optimizer.step(closure).item())
    return losses


def run_demo(steps: int = 300) -> dict[str, list[float]]:
    """Train the same model from the same init with each optimizer and print a loss table."""
    x, y = make_problem()
    candidates: dict[str, Callable] = {
        "LSTMOptimizer (preset l2l-blend, default)": lambda p: LSTMOptimizer(p),
        "LSTMOptimizer (preset l2l-2016, untrained)": lambda p: LSTMOptimizer(p, weights="l2l-2016"),
        "LSTMOptimizer (preset l2l-mnist, meta-trained)": lambda p: LSTMOptimizer(p, weights="l2l-mnist"),
        "MetaLSTMOptimizer (preset meta-lstm-adam-mnist, default)": lambda p: MetaLSTMOptimizer(p),
        "MetaLSTMOptimizer (preset meta-lstm-adam, untrained)": lambda p: MetaLSTMOptimizer(p, weights="meta-lstm-adam"),
        "MetaLSTMOptimizer (preset meta-lstm-2017, paper)": lambda p: MetaLSTMOptimizer(p, weights="meta-lstm-2017"),
        "Adam (lr=1e-2)": lambda p: torch.optim.Adam(p, lr=1e-2),
    }
    results = {}
    print(f"Training a 16-64-1 MLP on generated data for {steps} full-batch steps\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Two steps of each first, untimed: the first step of a learned optimizer compiles its
        # update (seconds, once per process), which would otherwise land in the first row's time.
        start = time.perf_counter()
        for make in candidates.values():
            train(make, x, y, 2)
        print(f"Warm-up, untimed: two steps of each optimizer, {time.perf_counter() - start:.1f}s (mostly compiling)\n")
        print(f"{'optimizer':56s} {'loss@0':>9s} {'loss@' + str(steps // 10):>9s} {'final':>9s} {'time':>7s}")
        for name, make in candidates.items():
            start = time.perf_counter()
            losses = train(make, x, y, steps)
            elapsed = time.perf_counter() - start
            results[name] = losses
            print(f"{name:56s} {losses[0]:9.4f} {losses[steps // 10]:9.4f} {losses[-1]:9.4f} {elapsed:6.2f}s")
    print(
        "\nThis is a full-batch problem, unlike the minibatch tasks the rules were meta-trained on. The"
        "\ndefault l2l-blend leads early, then stalls at a floor that Adam goes below: on 10 draws of this"
        "\nkind of problem run for 1000 steps (regression-1000), 0.011 against tuned Adam's 1.4e-5. A smaller"
        "\nlr, the factor on the learned step, lowers that floor: 4.9e-5 at lr=0.03 (README: Results,"
        "\n'Full-batch problems')."
    )
    # only learnedopt's own warnings: torch's internal deprecation notices (e.g. on importing
    # torch.utils.mkldnn under torch.compile) say nothing about the optimizers compared here
    package = Path(__file__).resolve().parent
    notes = sorted({str(w.message) for w in caught if package in Path(w.filename).resolve().parents})
    if notes:
        print("\nWarnings:")
        for note in notes:
            print(f"  - {note}")
    return results
