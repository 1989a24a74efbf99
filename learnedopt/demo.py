"""A short demo: the learned optimizers beside tuned baselines, first on a minibatch problem of
the kind they were meta-trained for, then on a full-batch regression, where they are weaker."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .evaluation.problems import Problem, regression_data
from .evaluation.problems import make_problem as make_suite_problem
from .evaluation.runs import BASELINES, OptimizerFactory, final_loss, run_optimizer
from .optim import LSTMOptimizer, MetaLSTMOptimizer
from .values import MAX_ELEMENTS

#: the baselines' learning rates as the held-out suite tuned them (on its tuning seeds) for the
#: demo's minibatch problems, from ``benchmarks/results/optimizee_eval_blend.json`` (a test
#: checks them against it)
TUNED_LRS: dict[str, dict[str, float]] = {
    "mnist-mlp-200": {"Nesterov": 1.0, "Adam": 10**-1.5},
    "synthetic-mlp": {"Nesterov": 10**-0.5, "Adam": 10**-1.5},
}


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


def minibatch_problem(data: str | Path | None = None) -> Problem:
    """The paper's MNIST MLP for 200 steps (the suite's ``mnist-mlp-200``) when the MNIST files
    are found (``data``, else :func:`learnedopt.data.default_data_root`'s search:
    ``LEARNEDOPT_DATA``, ``../shared/data``, ``shared/data`` beside the repository of a source checkout), else the suite's
    ``synthetic-mlp`` (an MLP on generated classification data, 200 steps). A ``data`` folder
    given explicitly must hold MNIST (FileNotFoundError otherwise)."""
    return _minibatch_problem(data)[0]


def _minibatch_problem(data: str | Path | None) -> tuple[Problem, str | None]:
    """:func:`minibatch_problem`, and why MNIST was not found where it falls back (None where it
    was): the loader's one line, which names where it looked."""
    try:
        return make_suite_problem("mnist-mlp-200", data), None
    except FileNotFoundError as err:
        if data is not None:
            raise
        return make_suite_problem("synthetic-mlp"), str(err)


def _row(name: str, losses: list[float], elapsed: float) -> str:
    early = len(losses) // 10
    return f"{name:56s} {losses[0]:9.4f} {losses[early]:9.4f} {final_loss(np.asarray(losses)):9.4f} {elapsed:6.2f}s"


def _header(steps: int) -> str:
    """The loss table's header; "final10" is the mean of the last 10 losses, as the suite reports."""
    return f"{'optimizer':56s} {'loss@0':>9s} {'loss@' + str(steps // 10):>9s} {'final10':>9s} {'time':>7s}"


def run_minibatch(problem: Problem, steps: int | None = None, seed: int = 0) -> dict[str, list[float]]:
    """Train ``problem``'s model (seed ``seed``: its init and minibatches) with each default
    learned optimizer, untuned, and with tuned Nesterov and Adam; print a loss table ("final10":
    the mean of the last 10 losses, as the suite reports)."""
    steps = problem.steps if steps is None else steps
    lrs = TUNED_LRS[problem.name]
    candidates: dict[str, tuple[OptimizerFactory, float]] = {
        "LSTMOptimizer (preset l2l-blend, default)": (lambda p, lr: LSTMOptimizer(p, lr=lr), 1.0),
        "MetaLSTMOptimizer (preset meta-lstm-adam-mnist, default)": (lambda p, lr: MetaLSTMOptimizer(p, lr=lr), 1.0),
        **{f"{name} (tuned lr={lrs[name]:.3g})": (BASELINES[name], lrs[name]) for name in ("Nesterov", "Adam")},
    }
    print(f"1. A minibatch problem, like those the rules were meta-trained on: {problem.description}, {steps} steps\n")
    for factory, lr in candidates.values():  # untimed: the first step of a learned optimizer compiles
        run_optimizer(problem, seed, factory, lr, steps=2)
    print(_header(steps))
    results = {}
    for name, (factory, lr) in candidates.items():
        start = time.perf_counter()
        results[name] = run_optimizer(problem, seed, factory, lr, steps).tolist()
        print(_row(name, results[name], time.perf_counter() - start))
    print(
        f"\nOne seed. The README's Results table has {problem.name} and nine other held-out problems over"
        "\n10 seeds each, every baseline's lr tuned on its own seeds; the learned optimizers run untuned."
    )
    return results


def run_regression(steps: int = 300) -> dict[str, list[float]]:
    """Train the same 16-64-1 MLP from the same init, full-batch, with each optimizer; print a
    loss table."""
    x, y = make_problem()
    candidates: dict[str, Callable] = {
        "LSTMOptimizer (preset l2l-blend, default)": lambda p: LSTMOptimizer(p),
        "LSTMOptimizer (preset l2l-blend, default, lr=0.03)": lambda p: LSTMOptimizer(p, lr=0.03),
        "LSTMOptimizer (preset l2l-2016, untrained)": lambda p: LSTMOptimizer(p, weights="l2l-2016"),
        "LSTMOptimizer (preset l2l-mnist, meta-trained)": lambda p: LSTMOptimizer(p, weights="l2l-mnist"),
        "MetaLSTMOptimizer (preset meta-lstm-adam-mnist, default)": lambda p: MetaLSTMOptimizer(p),
        "MetaLSTMOptimizer (preset meta-lstm-adam, untrained)": lambda p: MetaLSTMOptimizer(p, weights="meta-lstm-adam"),
        "MetaLSTMOptimizer (preset meta-lstm-2017, paper)": lambda p: MetaLSTMOptimizer(p, weights="meta-lstm-2017"),
        "Adam (lr=1e-2)": lambda p: torch.optim.Adam(p, lr=1e-2),
    }
    print(f"2. A full-batch problem: a 16-64-1 tanh MLP regressing generated data, {steps} full-batch steps\n")
    for make in candidates.values():  # untimed, as above
        train(make, x, y, 2)
    print(_header(steps))
    results = {}
    for name, make in candidates.items():
        start = time.perf_counter()
        results[name] = train(make, x, y, steps)
        print(_row(name, results[name], time.perf_counter() - start))
    print(
        "\nThe rules were meta-trained on minibatch tasks only. Here the default l2l-blend leads early,"
        "\nthen stalls at a floor that Adam goes below: on 10 draws of this kind of problem run for 1000"
        "\nsteps (regression-1000), 0.011 against tuned Adam's 1.4e-5. Its lr, the factor on the learned"
        "\nstep, sets that floor: at lr=0.03 it ends there at 4.9e-5 (README: Results, 'Full-batch problems')."
    )
    return results


#: the fewest steps of either problem: the tables show the loss at a tenth of the steps and the
#: mean of the last 10
MIN_STEPS = 10
#: the most: a run's loss curve is one array (as ``evaluate optimizers`` bounds its steps)
MAX_STEPS = MAX_ELEMENTS


def steps_refused(count: int) -> str | None:
    """Why ``count`` steps are refused (the end of the message after the option's name), or None."""
    if count < MIN_STEPS:
        return (f"must be at least {MIN_STEPS}, got {count}: the tables show the loss at a tenth of the steps "
                f"and the mean of the last {MIN_STEPS}")  # fmt: skip
    if count > MAX_STEPS:
        return f"must be at most {MAX_STEPS:,} (2**31 - 1, the most elements of a loss curve), got {count}"
    return None


def run_demo(steps: int = 300, minibatch_steps: int | None = None, data: str | Path | None = None) -> dict[str, dict[str, list[float]]]:
    """Both parts: :func:`run_minibatch` on :func:`minibatch_problem` (``minibatch_steps``: its
    steps, default the problem's 200) and :func:`run_regression` (``steps``); learnedopt's own
    warnings (e.g. of untrained presets) are printed once at the end."""
    for option, count in (("steps", steps), ("minibatch_steps", minibatch_steps)):
        if count is not None and (refused := steps_refused(count)):
            raise ValueError(f"{option} {refused}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problem, missing = _minibatch_problem(data)
        if missing is not None:  # where it looked: a LEARNEDOPT_DATA set wrong, a folder without the files
            print(f"(MNIST not found: {missing}; generated data instead)\n")
        results = {"minibatch": run_minibatch(problem, minibatch_steps)}
        print()
        results["full-batch"] = run_regression(steps)
    # only learnedopt's own warnings: torch's internal deprecation notices (e.g. on importing
    # torch.utils.mkldnn under torch.compile) say nothing about the optimizers compared here
    package = Path(__file__).resolve().parent
    notes = sorted({str(w.message) for w in caught if package in Path(w.filename).resolve().parents})
    if notes:
        print("\nWarnings:")
        for note in notes:
            print(f"  - {note}")
    return results
