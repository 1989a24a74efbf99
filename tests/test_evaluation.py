"""The optimizer evaluation harness (learnedopt.evaluation): tuning, determinism, statistics, outputs."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
import torch.nn.functional as F
from torch import Tensor, nn

from helpers import OWN_RULE, importable_module, own_rule_module

from learnedopt import CoordinateLSTM, LSTMOptimizer, save_weights
from learnedopt.evaluation import (
    BASELINES,
    DEFAULT_LEARNED,
    FINAL_WINDOW,
    EvalConfig,
    Problem,
    QuadraticProblem,
    add_evaluate_optimizers_parser,
    best_baseline,
    evaluate_optimizers,
    format_difference,
    learned_from_file,
    make_problem,
    paired_difference,
    run_optimizer,
    seeds_below,
    select_lr,
    summarize,
    synthetic_classification,
    tune_lr,
    write_report,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: extra threads only add synchronisation cost (several times slower on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SquareProblem(Problem):
    """f(theta) = ||theta||^2, theta_0 = (1, -2, 3): SGD's factor per step is |1 - 2 lr|."""

    name, steps, description = "square", 30, "||theta||^2"

    def model(self, seed: int) -> nn.Module:
        m = nn.Module()
        m.theta = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        return m

    def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
        return model.theta.square().sum()


class TwoParameters(SquareProblem):
    """:class:`SquareProblem` over 4 steps with a second parameter, ``other`` (two ones), that
    its loss does not read."""

    steps = 4

    def model(self, seed: int) -> nn.Module:
        m = super().model(seed)
        m.other = nn.Parameter(torch.ones(2))
        return m


def tiny_problem(steps: int = 15):
    return synthetic_classification(
        "tiny", steps, features=5, hidden=4, classes=3, examples=64, batch_size=8
    )


def test_select_lr_counts_nan_as_worst_and_breaks_ties_low() -> None:
    assert select_lr({0.01: 2.0, 0.1: 1.0, 1.0: math.nan, 3.0: math.inf}) == 0.1
    assert select_lr({1.0: math.nan, 0.1: math.nan}) == 0.1
    assert select_lr({0.3: 1.0, 0.1: 1.0}) == 0.1
    assert select_lr({0.01: math.nan, 0.1: 1.0}) == 0.1  # a NaN at the smallest lr loses too
    with pytest.raises(ValueError):
        select_lr({})


def test_tune_lr_picks_the_known_best_and_diverging_lrs_lose() -> None:
    # lr 0.5 reaches the minimum in one step; lr 1 oscillates; lr 10 overflows to Inf, then NaN.
    grid = (1e-3, 1e-2, 0.1, 0.5, 1.0, 10.0)
    best, scores = tune_lr(SquareProblem(), BASELINES["SGD"], grid, seeds=[0, 1])
    assert best == 0.5
    assert scores[0.5] == 0.0
    assert scores[10.0] == math.inf
    assert scores[1.0] == pytest.approx(14.0)
    curve = run_optimizer(SquareProblem(), 0, BASELINES["SGD"], 10.0)
    assert curve.shape == (30,) and np.isnan(curve[-1])  # the run stops at the first Inf loss


def test_the_loss_that_overflows_is_recorded_as_inf_and_the_steps_after_it_as_nan() -> None:
    # SGD at lr 10 on ||theta||^2 multiplies theta by -19 per step: the loss is 14 * 361^t until
    # it overflows float32; that step's entry is the Inf measured, the rest NaN (no step was taken)
    curve = run_optimizer(SquareProblem(), 0, BASELINES["SGD"], 10.0)
    exact = 14.0 * 361.0 ** np.arange(30)
    first = int(np.argmax(exact > np.finfo(np.float32).max))
    np.testing.assert_allclose(curve[:first], exact[:first], rtol=1e-5)
    assert curve[first] == math.inf and np.isnan(curve[first + 1 :]).all()


def test_learned_optimizer_run_stops_on_nonfinite_gradient() -> None:
    class BlowsUp(SquareProblem):
        def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
            loss = super().loss(model, seed, step)
            return loss * torch.tensor(math.inf) if step == 4 else loss

    curve = run_optimizer(BlowsUp(), 0, DEFAULT_LEARNED[0].factory(), 1.0)
    assert np.isfinite(curve[:4]).all() and not np.isfinite(curve[4:]).any()


@pytest.mark.parametrize("at_step", [2, 4])  # 4: the last step, whose update no loss would see
def test_a_nonfinite_gradient_stops_baselines_and_learned_optimizers_alike(at_step: int) -> None:
    """A finite loss with a NaN gradient (d sqrt|x| at 0) at step ``at_step``: every optimizer's
    run ends there, so the NaN column counts it for all (a baseline used to apply the NaN step,
    and a NaN gradient at the last step went unseen)."""

    class NanGradient(SquareProblem):
        steps = 5

        def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
            loss = super().loss(model, seed, step)
            return loss + model.theta[0].mul(0).abs().sqrt() if step == at_step else loss

    for factory, lr in ((BASELINES["SGD"], 0.1), (BASELINES["Adam"], 0.01), (DEFAULT_LEARNED[0].factory(), 1.0)):
        curve = run_optimizer(NanGradient(), 0, factory, lr)
        assert np.isfinite(curve[:at_step]).all() and np.isnan(curve[at_step:]).all(), (factory, curve)


def test_a_nonfinite_gradient_in_any_parameter_stops_a_baseline() -> None:
    """Only the second of two parameters gets a NaN gradient (at step 1): the run stops there."""

    class NanInTheSecond(TwoParameters):
        def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
            loss = super().loss(model, seed, step) + model.other.square().sum()
            return loss + model.other[0].mul(0).abs().sqrt() if step == 1 else loss

    curve = run_optimizer(NanInTheSecond(), 0, BASELINES["SGD"], 0.1)
    assert np.isfinite(curve[:1]).all() and np.isnan(curve[1:]).all(), curve


def test_huge_finite_gradients_do_not_stop_a_baseline_but_one_nan_among_them_does() -> None:
    """Gradients of 2e25 per coordinate (a float32 2-norm overflows past about 1.8e19) are finite:
    the baseline's run goes on; a NaN in the same gradient stops it, at that step."""

    class Huge(SquareProblem):
        steps = 4

        def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
            loss = super().loss(model, seed, step) * 1e25
            return loss + model.theta[0].mul(0).abs().sqrt() if step == 2 and self.nan else loss

    huge = Huge()
    huge.nan = False
    model = huge.model(0)
    huge.loss(model, 0, 0).backward()
    assert not torch.isfinite(torch.linalg.vector_norm(model.theta.grad)) and torch.isfinite(model.theta.grad).all()
    curve = run_optimizer(huge, 0, BASELINES["SGD"], 1e-30)
    assert np.isfinite(curve).all(), curve
    huge.nan = True
    curve = run_optimizer(huge, 0, BASELINES["SGD"], 1e-30)
    assert np.isfinite(curve[:2]).all() and np.isnan(curve[2:]).all(), curve


def test_a_baseline_for_sparse_gradients_runs_and_stops_at_a_nan_in_one() -> None:
    """An ``nn.Embedding(sparse=True)`` under ``torch.optim.SparseAdam``: its sparse gradient is
    checked by its values (it failed with NotImplementedError: ``isfinite`` takes no sparse
    tensor), and a NaN among them stops the run at that step."""

    class Sparse(SquareProblem):
        steps = 4

        def model(self, seed: int) -> nn.Module:
            m = nn.Module()
            m.embedding = nn.Embedding(5, 3, sparse=True)
            return m

        def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
            rows = model.embedding(torch.tensor([1, 3, 1]))  # row 1 twice: an uncoalesced gradient
            loss = rows.square().sum()
            return loss + rows[0, 0].mul(0).abs().sqrt() if step == self.nan_at else loss

    sparse = Sparse()
    for nan_at, finite in ((None, 4), (1, 1)):
        sparse.nan_at = nan_at
        curve = run_optimizer(sparse, 0, lambda params, lr: torch.optim.SparseAdam(params, lr=lr), 0.1)
        assert np.isfinite(curve[:finite]).all() and np.isnan(curve[finite:]).all(), curve
        assert nan_at is not None or curve[-1] < curve[0]  # the steps were taken


class LrRecorder(torch.optim.SGD):
    """SGD that records its group's lr at every step."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.seen: list[float] = []

    def step(self, closure=None):
        self.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_loss_scale_scales_what_the_optimizer_sees_and_the_curve_records_the_loss() -> None:
    """SGD at lr 0.25 on 4x the loss takes the same steps as at lr 1 on the loss (powers of two:
    the same bits), and the curve holds the loss itself, not 4x it."""
    problem = SquareProblem()
    sgd = BASELINES["SGD"]
    np.testing.assert_array_equal(run_optimizer(problem, 0, sgd, 0.25, loss_scale=4.0), run_optimizer(problem, 0, sgd, 1.0))
    assert run_optimizer(problem, 0, sgd, 0.1, loss_scale=4.0)[0] == 14.0  # ||(1, -2, 3)||^2, unscaled
    for bad in (0.0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ValueError, match="loss_scale must be a positive finite number"):
            run_optimizer(problem, 0, sgd, 0.1, loss_scale=bad)


def test_cosine_schedule_scales_every_optimizers_lr_at_each_step() -> None:
    made: list[torch.optim.Optimizer] = []

    def recording(params, lr):
        made.append(LrRecorder(params, lr))
        return made[-1]

    problem = SquareProblem()
    cosine = run_optimizer(problem, 0, recording, 0.2, schedule="cosine")
    want = [0.2 * 0.5 * (1 + math.cos(math.pi * t / problem.steps)) for t in range(problem.steps)]
    assert made[-1].seen == pytest.approx(want, rel=1e-15)
    assert made[-1].seen[0] == 0.2 and made[-1].seen[-1] < 0.2 * 0.01
    # SGD on ||theta||^2 multiplies theta by (1 - 2 lr_t) at step t: the losses follow the schedule
    theta2 = 14.0 * np.cumprod([1.0] + [(1 - 2 * lr) ** 2 for lr in want[:-1]])
    np.testing.assert_allclose(cosine, theta2, rtol=1e-5)
    constant = run_optimizer(problem, 0, recording, 0.2)
    assert made[-1].seen == [0.2] * problem.steps
    np.testing.assert_array_equal(constant, run_optimizer(problem, 0, BASELINES["SGD"], 0.2))

    # a learned optimizer's lr (1.0, the factor on its learned step) follows the same factors
    learned: list[torch.optim.Optimizer] = []

    def learned_recording(params, lr):
        learned.append(LSTMOptimizer(params, lr=lr))
        real_step = learned[-1].step
        learned[-1].seen = []

        def step(*args, **kwargs):
            learned[-1].seen.append(learned[-1].param_groups[0]["lr"])
            return real_step(*args, **kwargs)

        learned[-1].step = step
        return learned[-1]

    run_optimizer(problem, 0, learned_recording, 1.0, steps=6, schedule="cosine")
    assert learned[-1].seen == pytest.approx([0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)], rel=1e-15)

    with pytest.raises(ValueError, match="unknown lr schedule 'linear'; choose from constant, cosine"):
        run_optimizer(problem, 0, BASELINES["SGD"], 0.1, schedule="linear")


def test_the_schedule_scales_every_param_group() -> None:
    made: list[torch.optim.Optimizer] = []

    def two_groups(params, lr):
        params = list(params)
        made.append(torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=lr))
        return made[-1]

    run_optimizer(TwoParameters(), 0, two_groups, 0.2, schedule="cosine")
    want = 0.2 * 0.5 * (1 + math.cos(math.pi * 3 / 4))  # the factor at the last step, t = 3 of T = 4
    assert [g["lr"] for g in made[-1].param_groups] == pytest.approx([want, want], rel=1e-15)


def test_minibatches_and_init_are_a_function_of_seed_and_step_only() -> None:
    problem = tiny_problem()
    torch.manual_seed(123)
    a = problem.minibatch(7, 3)
    torch.manual_seed(456)  # the global RNG plays no part
    b = problem.minibatch(7, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(problem.minibatch(7, 4)[0], a[0])
    assert not torch.equal(problem.minibatch(8, 3)[0], a[0])
    m1, m2 = problem.model(7), problem.model(7)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert not torch.equal(next(problem.model(8).parameters()), next(m1.parameters()))


def test_the_minibatch_sequences_of_different_seeds_do_not_overlap() -> None:
    # a seed's batch at step t + 1 must not be the next seed's batch at step t (as with generators
    # keyed by seed + step): the evaluation seeds would then see shifted copies of one sequence
    problem = tiny_problem()
    batches = {(seed, step): problem.minibatch(seed, step)[0] for seed in range(4) for step in range(4)}
    keys = list(batches)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not torch.equal(batches[a], batches[b]), (a, b)


def test_every_optimizer_sees_the_same_minibatch_sequence() -> None:
    base = tiny_problem(steps=6)
    seen: dict[str, list[Tensor]] = {}

    class Recording(type(base)):
        def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
            seen.setdefault(self.current, []).append(self.minibatch(seed, step)[0])
            return super().loss(model, seed, step)

    problem = Recording.__new__(Recording)
    problem.__dict__.update(base.__dict__)
    factories = {**BASELINES, **{s.label: s.factory() for s in DEFAULT_LEARNED}}
    for label, factory in factories.items():
        problem.current = label
        run_optimizer(problem, 3, factory, 0.01)
    reference = seen["SGD"]
    assert len(reference) == 6
    for label in factories:
        assert all(torch.equal(x, y) for x, y in zip(seen[label], reference, strict=True)), label


def test_summary_statistics_on_hand_made_curves() -> None:
    steps = FINAL_WINDOW + 2
    curves = np.array([[9.0, 9.0] + [float(v)] * FINAL_WINDOW for v in (1, 2, 3, 4, 5)])
    diverged = np.full(steps, np.nan)
    diverged[:3] = 1.0
    s = summarize(np.vstack([curves, diverged]))
    assert s["runs"] == 6 and s["nonfinite"] == 1
    assert s["final_mean"] == pytest.approx(3.0)
    assert s["final_std"] == pytest.approx(math.sqrt(2.5))  # sample std of 1..5
    assert (s["final_q1"], s["final_median"], s["final_q3"]) == pytest.approx((2.0, 3.0, 4.0))
    expected_mean = np.mean([(18 + v * FINAL_WINDOW) / steps for v in (1, 2, 3, 4, 5)])
    assert s["mean_loss"] == pytest.approx(expected_mean)
    assert s["curve_median"][0] == 9.0 and s["curve_median"][-1] == 3.0
    assert s["curve_q1"][-1] == 2.0 and s["curve_q3"][-1] == 4.0
    assert math.isnan(s["finals"][-1])
    empty = summarize(diverged[None])
    assert math.isnan(empty["final_mean"]) and empty["curve_median"] is None


def test_per_step_curve_quartiles_leave_out_the_runs_that_diverged() -> None:
    # a run that diverged at step 1 starts far above the others: its first step must not move the
    # per-step median and quartiles, which are over the finite runs only
    finite = np.array([[1.0, 0.5, 0.25], [2.0, 1.0, 0.5], [3.0, 1.5, 0.75], [4.0, 2.0, 1.0]])
    diverged = np.array([[100.0, np.nan, np.nan]])
    s = summarize(np.vstack([finite, diverged]))
    for key, q in (("curve_q1", 25), ("curve_median", 50), ("curve_q3", 75)):
        assert s[key] == pytest.approx([float(np.percentile(finite[:, t], q)) for t in range(3)], rel=1e-3), key


def test_harness_end_to_end_writes_json_md_png(tmp_path) -> None:
    config = EvalConfig(
        problems=[tiny_problem(), QuadraticProblem("quadratic-3", 3, 12)],
        seeds=2,
        tuning_seeds=1,
        lrs=(0.01, 0.1),
        stability_steps=0,
    )
    report = evaluate_optimizers(config, log=lambda _: None)
    paths = write_report(report, tmp_path)
    assert [p.name for p in paths] == [
        "optimizee_eval.json",
        "optimizee_eval.md",
        "optimizee_eval.png",
    ]
    with pytest.MonkeyPatch.context() as patch:  # matplotlib is an optional extra: the tables need none
        patch.setitem(sys.modules, "matplotlib", None)
        assert [p.name for p in write_report(report, tmp_path / "no_plots")] == ["optimizee_eval.json", "optimizee_eval.md"]
    data = json.loads(paths[0].read_text())
    # each per-step curve on one line of the JSON (a line per value would double a report's size)
    curve_lines = [line for line in paths[0].read_text().splitlines() if '"curve_median": [' in line]
    assert curve_lines and all(line.rstrip().endswith(("],", "]")) for line in curve_lines)
    assert {"command", "machine", "config", "problems", "skipped", "learned", "stability"} <= set(
        data
    )
    # the CPU by its model name where the OS gives one (platform.processor() is empty on Linux)
    from learnedopt.evaluation.report import cpu_name

    assert data["machine"]["cpu"] == cpu_name() and data["machine"]["isa"]
    assert set(data["problems"]) == {"tiny", "quadratic-3"}
    results = data["problems"]["tiny"]["results"]
    assert set(results) == {*BASELINES, *(s.label for s in DEFAULT_LEARNED)}
    for r in results.values():
        assert {
            "lr",
            "final_mean",
            "final_std",
            "final_median",
            "final_q1",
            "final_q3",
            "mean_loss",
            "nonfinite",
        } <= set(r)
        assert len(r["finals"]) == 2 and len(r["curve_median"]) == 15
        assert r["lr"] in ((0.01, 0.1) if r["kind"] == "baseline" else (1.0,))
    trained = {spec.label: data["learned"][spec.label]["header"]["trained"] for spec in DEFAULT_LEARNED}
    assert trained == {spec.label: "untrained" not in spec.label for spec in DEFAULT_LEARNED}
    md = paths[1].read_text()
    assert (
        "## tiny" in md
        and "## quadratic-3" in md
        and "| optimizer | lr | final loss mean +- std |" in md
    )
    assert "UNTRAINED" in md
    # paired counts over the 2 evaluation seeds: against tuned Adam (every row but Adam's) and
    # against the best tuned baseline, named above each table (every row but its own)
    for name, prob in report["problems"].items():
        section = md[md.index(f"## {name} ") :].split("\n## ")[0]
        best = min(BASELINES, key=lambda b: prob["results"][b]["final_mean"])
        assert f"Best tuned baseline: {best}." in section
        rows = [[c.strip() for c in line.split("|")[1:-1]] for line in section.splitlines() if line.count("|") == 10]
        rows = [r for r in rows if r[0] not in ("optimizer", "---")]
        assert len(rows) == len(BASELINES) + len(DEFAULT_LEARNED)
        assert all((r[-3] == "-") == (r[0] == "Adam") and (r[-2] == "-") == (r[0] == best) for r in rows)
        assert all(c in ("0/2", "1/2", "2/2") for r in rows for c in r[-3:-1] if c != "-")
        finals = {r[0]: prob["results"][r[0]]["finals"] for r in rows}
        assert all(r[-2] == seeds_below(finals[r[0]], finals[best]) for r in rows if r[0] != best)
        # and the paired difference from the best baseline, with its interval
        assert all((r[-1] == "-") == (r[0] == best) for r in rows)
        assert all(
            r[-1] == format_difference(paired_difference(finals[r[0]], finals[best])) for r in rows if r[0] != best
        )
    assert Image.open(paths[2]).size[0] > 100

    written = {}
    write_report(
        report,
        tmp_path / "other",
        write_results=lambda name, payload, table: written.update(name=name, table=table),
    )
    assert written["name"] == "optimizee_eval" and "## tiny" in written["table"]
    assert (tmp_path / "other" / "optimizee_eval.png").is_file()


def test_a_report_written_without_matplotlib_leaves_no_plot_of_an_earlier_report_beside_it(tmp_path: Path, capsys) -> None:
    """Without matplotlib the JSON and Markdown were rewritten and the PNG of an earlier report of
    the same --name stayed beside them, a plot of other runs read as this report's."""
    problem = TwoParameters()
    config = EvalConfig(problems=[problem], seeds=1, tuning_seeds=1, lrs=(0.1,), stability_steps=0,
                        include_default_learned=False)  # fmt: skip
    report = evaluate_optimizers(config, log=lambda _: None)
    assert (tmp_path / "optimizee_eval.png") in write_report(report, tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)
        paths = write_report(report, tmp_path)
    assert [p.name for p in paths] == ["optimizee_eval.json", "optimizee_eval.md"]
    assert not (tmp_path / "optimizee_eval.png").exists()
    assert "removed the earlier optimizee_eval.png" in capsys.readouterr().err


def test_mnist_problems_skip_with_a_reason_when_the_data_is_absent(tmp_path, monkeypatch) -> None:
    (tmp_path / "mnist").mkdir()
    monkeypatch.setenv("LEARNEDOPT_DATA", str(tmp_path))  # the default search finds no MNIST files
    config = EvalConfig(
        problems=["mnist-mlp-100", tiny_problem(3)],
        seeds=1,
        tuning_seeds=1,
        lrs=(0.1,),
        stability_steps=5,
        presets=["l2l-2016"],  # a learned optimizer, whose stability check is skipped
    )
    report = evaluate_optimizers(config, log=lambda _: None)
    assert (
        "data missing" in report["skipped"]["mnist-mlp-100"]
        and "t10k" in report["skipped"]["mnist-mlp-100"]
    )
    assert set(report["problems"]) == {"tiny"}
    assert "data missing" in report["stability"]["skipped"]
    assert report["mnist_sha256"] is None
    with pytest.raises(FileNotFoundError):
        make_problem("mnist-conv", tmp_path / "missing")
    # a folder named explicitly must hold MNIST: an error before any run, not a skipped problem
    with pytest.raises(ValueError, match="t10k"):
        evaluate_optimizers(dataclasses.replace(config, data=str(tmp_path)), log=lambda _: None)
    # every problem skipped: an empty report written as if the evaluation had run (exit code 0)
    with pytest.raises(ValueError, match=r"no problem given can run: mnist-mlp-100, mnist-conv need MNIST, not found \(.*t10k"):
        evaluate_optimizers(dataclasses.replace(config, problems=["mnist-mlp-100", "mnist-conv"]), log=lambda _: None)


def test_mnist_problem_reads_only_the_held_out_part() -> None:
    from learnedopt.data import split_indices
    from learnedopt.meta.tasks import MNIST_SPLIT, MNIST_SPLIT_SEED

    try:
        problem = make_problem("mnist-mlp-100")
    except FileNotFoundError as err:
        pytest.skip(f"MNIST not available: {err}")
    parts = split_indices(10_000, MNIST_SPLIT, seed=MNIST_SPLIT_SEED)
    assert torch.equal(problem.pool, parts["held_out"])
    assert not set(problem.pool.tolist()) & set(parts["meta_train"].tolist())
    x, y = problem.minibatch(0, 0)
    assert x.shape == (128, 784) and y.shape == (128,) and 0.0 <= x.min() and x.max() <= 1.0
    assert make_problem("mnist-conv").minibatch(0, 0)[0].shape == (128, 1, 28, 28)


def test_the_mnist_problems_read_the_data_folder_they_are_given(tmp_path: Path) -> None:
    from test_meta_unroll import write_fake_mnist

    folder = write_fake_mnist(tmp_path / "mnist", n=60, seed=7)
    raw = (folder / "t10k-images-idx3-ubyte").read_bytes()[16:]  # after the IDX header
    images = torch.tensor(np.frombuffer(raw, dtype=np.uint8).reshape(60, 784).astype(np.float32)) / 255.0
    for name in ("mnist-mlp-100", "mlp-random-held-out"):
        problem = make_problem(name, folder)
        assert torch.equal(problem.inputs, images), name


def test_bad_arguments_give_clear_errors(tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="unknown problem 'nope'; choose from .*mnist-mlp-100"):
        EvalConfig(problems=["nope"])
    with pytest.raises(ValueError, match="unknown problem"):
        make_problem("nope")
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        EvalConfig(seeds=0)
    with pytest.raises(ValueError, match="lrs"):
        EvalConfig(lrs=(0.1, -1.0))
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        EvalConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="unknown preset l2l-nope; the suite's presets are l2l-blend, "):
        EvalConfig(presets=["l2l-blend", "l2l-nope"])

    parser = argparse.ArgumentParser()
    add_evaluate_optimizers_parser(parser.add_subparsers())
    for argv, message in (
        (["--problems", "nope"], "unknown problem 'nope'"),
        (["--weights", str(tmp_path / "none.safetensors")], "weight file not found"),
        (["--weights", "l2l-blend"], "weight file not found: l2l-blend (a preset: give it to --presets)"),
        (["--reuse", str(tmp_path / "none.json")], "report to reuse not found"),
        (["--presets", "l2l-nope"], "unknown preset l2l-nope"),
    ):
        args = parser.parse_args(["optimizers", *argv, "--out", str(tmp_path)])
        assert args.func(args) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_weight_file_chooses_the_optimizer_by_kind(tmp_path) -> None:
    path = tmp_path / "rule.safetensors"
    save_weights(CoordinateLSTM(), path, trained_on="test")
    spec = learned_from_file(path)
    assert spec.optimizer is LSTMOptimizer and spec.header()["trained_on"] == "test"
    curve = run_optimizer(SquareProblem(), 0, spec.factory(), 1.0, steps=3)
    assert np.isfinite(curve).all()


def test_a_weight_file_named_like_a_preset_runs_the_file_not_the_preset(tmp_path, monkeypatch) -> None:
    """``--weights l2l-random`` naming a file ``l2l-random`` in the working directory: the optimizer
    given ``weights="l2l-random"`` builds the preset of that name, so the spec must name the file
    unmistakably, and its label must differ from the preset's (a report keys results by label)."""
    from learnedopt.evaluation.harness import check_config

    monkeypatch.chdir(tmp_path)
    # as a Path: save_weights refuses the string "l2l-random", which names the preset
    save_weights(CoordinateLSTM(), tmp_path / "l2l-random", trained_on="my file")
    (tmp_path / "sub").mkdir()
    save_weights(CoordinateLSTM(), tmp_path / "sub" / "l2l-mix", trained_on="my other file")
    spec = learned_from_file("l2l-random")
    assert spec.header()["trained_on"] == "my file"
    config = EvalConfig(problems=["quadratic-20"], weights=["l2l-random", "sub/l2l-mix"], presets=["l2l-random", "l2l-mix"])
    records = check_config(config).records
    assert len(records) == 4, list(records)
    assert [r["header"]["trained_on"] for r in records.values()][2:] == ["my file", "my other file"]


def test_weight_files_of_one_name_get_distinct_labels_and_a_repeated_path_is_refused(tmp_path) -> None:
    from learnedopt.evaluation import learned_from_files

    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "weights.safetensors")
        save_weights(CoordinateLSTM(), paths[-1], trained_on=folder)
    other = tmp_path / "other.safetensors"
    save_weights(CoordinateLSTM(), other, trained_on="other")
    specs = learned_from_files([*paths, other])
    assert [s.label for s in specs] == [f"LSTMOptimizer ({paths[0]})", f"LSTMOptimizer ({paths[1]})", "LSTMOptimizer (other.safetensors)"]
    assert [s.header()["trained_on"] for s in specs] == ["a", "b", "other"]
    with pytest.raises(ValueError, match="given more than once"):
        learned_from_files([other, other])
    with pytest.raises(ValueError, match="weight file given more than once: .*other.safetensors"):
        learned_from_files([other, tmp_path / "a" / ".." / "other.safetensors"])  # one file, two spellings


def test_a_problem_given_twice_is_refused_before_any_run() -> None:
    """A report keys its results by problem name: the second run would be lost."""
    with pytest.raises(ValueError, match="^problems given more than once: quadratic-20$"):
        EvalConfig(problems=["quadratic-20", "synthetic-mlp", "quadratic-20"])


def test_an_lr_given_twice_is_refused_before_any_run() -> None:
    """The baselines' grid ran a repeated lr twice and the report's config listed it twice."""
    with pytest.raises(ValueError, match=r"^lrs given more than once: 0.01, 1$"):
        EvalConfig(lrs=[1.0, 0.01, 0.1, 1, 0.01])
    assert list(EvalConfig.quick_config(lrs=[0.01, 0.1]).lrs) == [0.01, 0.1]


def test_workers_give_the_same_report_as_one_process() -> None:
    config = EvalConfig(
        problems=["quadratic-20", "synthetic-mlp"], seeds=2, tuning_seeds=1, lrs=(0.01, 0.1), steps=12, stability_steps=0
    )
    one = evaluate_optimizers(config, log=lambda _: None)
    two = evaluate_optimizers(config, log=lambda _: None, workers=2)
    assert list(two["problems"]) == ["quadratic-20", "synthetic-mlp"]
    for name, problem in one["problems"].items():
        for label, result in problem["results"].items():
            assert two["problems"][name]["results"][label]["finals"] == result["finals"], (name, label)
            assert two["problems"][name]["results"][label]["lr"] == result["lr"]


def test_workers_are_validated() -> None:
    config = EvalConfig(problems=[tiny_problem()], seeds=1, tuning_seeds=1, lrs=(0.1,), stability_steps=0)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        evaluate_optimizers(config, log=lambda _: None, workers=0)
    with pytest.raises(ValueError, match="given by name"):
        evaluate_optimizers(config, log=lambda _: None, workers=2)


def test_more_workers_than_jobs_start_one_process_per_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """--workers beyond the jobs starts no more processes (ProcessPoolExecutor's queue, sized by
    max_workers, overflowed a C int with an OverflowError traceback at 2**31 and beyond)."""
    import concurrent.futures

    sizes: list[int] = []

    class Inline:  # the pool, running each job at once in this process
        def __init__(self, max_workers: int, **kwargs: object) -> None:
            sizes.append(max_workers)

        def __enter__(self) -> Inline:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def submit(self, fn, *args):  # noqa: ANN001, ANN002, ANN202 - Executor.submit's own
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(fn(*args))
            return future

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Inline)
    config = EvalConfig(problems=["quadratic-20"], seeds=1, tuning_seeds=1, lrs=(0.1,), steps=5, stability_steps=0, presets=[])
    report = evaluate_optimizers(config, log=lambda _: None, workers=10**22)
    assert sizes == [1] and list(report["problems"]) == ["quadratic-20"]


def test_transformer_problem_is_seeded_causal_and_learnable() -> None:
    """The opt-in transformer problem: the same seed gives the same model; a position's logits do
    not depend on later tokens (causal attention); the minibatch labels are the inputs shifted by
    one; a few Adam steps lower its loss. It is not part of the default suite."""
    from learnedopt.evaluation import DEFAULT_PROBLEMS, EXTRA_PROBLEMS

    assert "transformer-markov" in EXTRA_PROBLEMS and "transformer-markov" not in DEFAULT_PROBLEMS
    problem = make_problem("transformer-markov").with_steps(20)
    a, b, other = problem.model(3), problem.model(3), problem.model(4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), other.parameters(), strict=True))
    x, y = problem.minibatch(0, 0)
    assert x.shape == y.shape == (32, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 16
    logits, logits_changed = a(x), a(changed)
    assert logits.shape == (32, 16, 16)
    torch.testing.assert_close(logits[..., :10], logits_changed[..., :10])
    assert not torch.allclose(logits[..., 10:], logits_changed[..., 10:])
    optimizer = torch.optim.Adam(a.parameters(), lr=0.01)
    losses = []
    for step in range(20):
        optimizer.zero_grad()
        loss = problem.loss(a, 0, step)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert max(losses[-5:]) < 0.75 * losses[0]


def test_seeded_init_refuses_a_module_it_cannot_initialise() -> None:
    """Problem models are built on the meta device and initialised from the seed; a module with
    parameters of its own and no seeded init would keep uninitialised memory, so it is refused."""
    from learnedopt.evaluation.problems import _init_default_

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.factor = nn.Parameter(torch.ones(3))

    with pytest.raises(TypeError, match="no seeded init for the parameters of Scale"):
        _init_default_(nn.Sequential(nn.Linear(3, 3), Scale()), torch.Generator().manual_seed(0))
    # layers without bias or affine parameters are initialised, not refused
    plain = nn.Sequential(nn.Linear(3, 3, bias=False), nn.LayerNorm(3, elementwise_affine=False))
    seeded = [_init_default_(copy.deepcopy(plain), torch.Generator().manual_seed(0))[0].weight for _ in range(2)]
    assert torch.equal(*seeded) and seeded[0].abs().max() <= 1 / math.sqrt(3)


def test_best_baseline_is_the_lowest_finite_mean_final_loss_among_baselines() -> None:
    nan = float("nan")

    def entry(kind: str, final: float) -> dict:
        return {"kind": kind, "final_mean": final}

    results = {"SGD": entry("baseline", 0.3), "Adam": entry("baseline", nan), "Nesterov": entry("baseline", 0.2),
               "learned": entry("learned", 0.1)}  # fmt: skip
    assert best_baseline(results) == "Nesterov"  # the learned row and the NaN baseline do not count
    assert best_baseline({"Adam": entry("baseline", nan), "learned": entry("learned", 0.1)}) is None


def hand_made_report(results: dict[str, dict], learned: dict[str, dict] | None = None) -> dict:
    """A minimal report of one problem ``p`` for ``markdown_tables``."""
    config = {"seeds": 2, "tuning_seeds": 1, "long_steps": 1000, "long_tuning_seeds": None, "lrs": [0.1, 10.0],
              "quick": False, "steps": None}  # fmt: skip
    return {
        "config": config,
        "definitions": {"tuning": "t", "final_loss": "f", "statistics": "s"},
        "learned": learned or {},
        "skipped": {},
        "seconds": 1.0,
        "problems": {"p": {"steps": 10, "seconds": 1.0, "description": "d", "results": results}},
    }


def hand_made_result(kind: str, mean: float, lr: float = 1.0, edge: bool = False) -> dict:
    """One optimizer's statistics, every seed ending at ``mean``."""
    stats = dict.fromkeys(("final_mean", "final_median", "final_q1", "final_q3", "mean_loss"), mean)
    return {"kind": kind, "lr": lr, "lr_at_grid_edge": edge, "final_std": 0.0, "nonfinite": 0, "runs": 2,
            "finals": [mean, mean], **stats}  # fmt: skip


class DivergesAtStep2(SquareProblem):
    """:class:`SquareProblem` whose loss is NaN from step 2 on: every run of every lr diverges."""

    name, steps, description = "diverges", 4, "NaN from step 2"

    def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
        loss = model.theta.square().sum()
        return loss * math.nan if step >= 2 else loss


def test_a_baseline_whose_every_lr_diverged_in_tuning_is_run_at_the_smallest_and_marked() -> None:
    """Every lr of the grid diverging on the tuning seeds is a tie at +inf, which goes to the
    smallest lr, whatever the grid's order; the table showed it as a tuned lr at the grid's edge,
    as if the tuning had chosen it, and the report's criterion did not say how ties are broken."""
    from learnedopt.evaluation import markdown_tables

    config = EvalConfig(problems=[DivergesAtStep2(), TwoParameters()], seeds=2, tuning_seeds=1, lrs=(0.3, 0.01, 0.1),
                        stability_steps=0, include_default_learned=False)  # fmt: skip
    report = evaluate_optimizers(config, log=lambda _: None)
    for label, r in report["problems"]["diverges"]["results"].items():
        assert r["lr"] == 0.01 and set(r["tuning_scores"].values()) == {math.inf} and r["nonfinite"] == 2, label
    assert "ties, every lr diverging among them, go to the smallest lr" in report["definitions"]["tuning"]
    table = markdown_tables(report)
    diverged = table[table.index("## diverges"):table.index("## square")]
    square = table[table.index("## square"):]
    assert diverged.count("| 0.01 (grid edge; every lr diverged in tuning) |") == len(BASELINES)
    assert "diverged in tuning" not in square


def test_markdown_calls_untrained_only_the_headers_that_say_so() -> None:
    from learnedopt.evaluation import markdown_tables

    learned = {
        # a weight file's header has no "trained" key
        "mine": {"header": {"kind": "CoordinateLSTM", "trained_on": "quadratic"}, "weights": "mine.safetensors"},
        "preset": {"header": {"kind": "CoordinateLSTM", "trained": False}, "weights": "l2l-2016"},
        "trained": {"header": {"kind": "CoordinateLSTM", "trained": True, "trained_on": "mlp"}, "weights": "l2l-blend"},
    }
    results = {label: hand_made_result("learned", 0.4) for label in learned}
    lines = markdown_tables(hand_made_report(results, learned)).splitlines()
    assert "- mine: weights `mine.safetensors` (trained on 'quadratic')" in lines
    assert "- preset: weights `l2l-2016` (UNTRAINED preset)" in lines
    assert "- trained: weights `l2l-blend` (trained on 'mlp')" in lines


def test_markdown_flags_a_tuned_lr_at_the_grid_edge() -> None:
    from learnedopt.evaluation import markdown_tables

    results = {"SGD": hand_made_result("baseline", 0.5, lr=10.0, edge=True),
               "Adam": hand_made_result("baseline", 0.7, lr=0.3),
               "mine": hand_made_result("learned", 0.4)}  # fmt: skip
    lines = markdown_tables(hand_made_report(results)).splitlines()
    lrs = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in lines if line.startswith("| ")}
    assert (lrs["SGD"], lrs["Adam"], lrs["mine"]) == ("10 (grid edge)", "0.3", "1 (untuned)")


def test_a_single_finite_baseline_is_the_best_tuned_baseline() -> None:
    from learnedopt.evaluation import markdown_tables

    results = {"SGD": hand_made_result("baseline", 0.5), "Adam": hand_made_result("baseline", float("nan")),
               "mine": hand_made_result("learned", 0.1)}  # fmt: skip
    assert best_baseline(results) == "SGD"
    assert best_baseline({"Adam": {"kind": "baseline", "final_mean": 2.0}}) == "Adam"
    assert "Best tuned baseline: SGD." in markdown_tables(hand_made_report(results)).splitlines()


def test_the_default_lr_grid_is_half_decades_from_1e_4_to_10() -> None:
    from learnedopt.evaluation import DEFAULT_LRS

    assert len(DEFAULT_LRS) == 11 and EvalConfig().lrs == DEFAULT_LRS
    half_decades = [1e-4, 3.162e-4, 1e-3, 3.162e-3, 1e-2, 3.162e-2, 0.1, 0.3162, 1.0, 3.162, 10.0]
    np.testing.assert_allclose(DEFAULT_LRS, half_decades, rtol=1e-4)
    assert DEFAULT_LRS[0] == pytest.approx(1e-4, rel=1e-12) and DEFAULT_LRS[-1] == pytest.approx(10.0, rel=1e-12)


def test_baselines_have_the_documented_settings() -> None:
    # "SGD; SGD + Nesterov momentum 0.9; RMSprop (alpha 0.99); Adam (0.9, 0.999); other settings torch defaults"
    params = [nn.Parameter(torch.zeros(2))]
    groups = {name: factory(params, 0.3).param_groups[0] for name, factory in BASELINES.items()}
    assert list(groups) == ["SGD", "Nesterov", "RMSprop", "Adam"] and all(g["lr"] == 0.3 for g in groups.values())
    assert isinstance(BASELINES["Nesterov"](params, 0.3), torch.optim.SGD)
    nesterov = groups["Nesterov"]
    assert (nesterov["momentum"], nesterov["nesterov"], nesterov["dampening"]) == (0.9, True, 0)
    assert (groups["SGD"]["momentum"], groups["SGD"]["nesterov"]) == (0, False)
    assert groups["RMSprop"]["alpha"] == 0.99 and groups["RMSprop"]["momentum"] == 0
    assert groups["Adam"]["betas"] == (0.9, 0.999)


def test_seeds_below_is_a_paired_count_over_seeds_where_both_runs_stayed_finite() -> None:
    nan = float("nan")
    assert seeds_below([1.0, 2.0, 3.0, nan, 0.5], [1.5, 1.0, 3.5, 0.1, nan]) == "2/3"
    assert seeds_below([], []) == "0/0"
    with pytest.raises(ValueError):
        seeds_below([1.0], [1.0, 2.0])


def test_paired_difference_is_the_mean_per_seed_difference_with_a_bootstrap_interval() -> None:
    nan = float("nan")
    # the same shift on every seed: no spread, so the interval is the point
    shift = paired_difference([0.5, 1.5, 2.5, 3.5, nan], [1.0, 2.0, 3.0, 4.0, 1.0])
    assert shift == {"mean": -0.5, "lo": -0.5, "hi": -0.5, "n": 4}
    # seeds differ by far more than the optimizers do: pairing still resolves a 0.01 gap
    rng = np.random.default_rng(3)
    base = rng.normal(1.0, 0.5, size=100)
    noise = rng.normal(0.0, 0.01, size=100)
    result = paired_difference(base - 0.01 + noise, base)
    assert result["lo"] < result["mean"] < result["hi"] < 0
    assert result["mean"] == pytest.approx(float(np.mean(noise)) - 0.01, abs=1e-12)
    # for 100 roughly normal pairs the percentile interval is close to mean +- 1.96 standard errors
    half = 1.96 * np.std(noise, ddof=1) / 10
    assert (result["hi"] - result["lo"]) / 2 == pytest.approx(half, rel=0.1)
    assert paired_difference(base - 0.01 + noise, base) == result  # seeded: reproducible
    assert paired_difference([nan], [1.0])["n"] == 0
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


def test_paired_bootstrap_resamples_every_seed() -> None:
    # two pairs, differences 0 and 1: a resample of two seeds has mean 0, 0.5 or 1 with probabilities
    # 1/4, 1/2, 1/4, so the 2.5th and 97.5th percentiles of 10,000 resamples are 0 and 1
    d = paired_difference([1.0, 3.0], [1.0, 2.0])
    assert d == {"mean": 0.5, "lo": 0.0, "hi": 1.0, "n": 2}
    # and the same with the two seeds in the other order (no seed is left out of the resampling)
    assert paired_difference([3.0, 1.0], [2.0, 1.0]) == d


def test_reuse_takes_baselines_and_presets_from_an_earlier_report_and_runs_only_weight_files(
    tmp_path, monkeypatch
) -> None:
    from dataclasses import replace

    from learnedopt.evaluation import final_loss, harness, make_problem, markdown_tables

    config = EvalConfig(problems=["quadratic-20"], seeds=2, tuning_seeds=1, lrs=(0.01, 0.1), steps=12, stability_steps=0)
    first_path = write_report(evaluate_optimizers(config, log=lambda _: None), tmp_path / "first")[0]
    first = json.loads(first_path.read_text())
    weights = tmp_path / "rule.safetensors"
    save_weights(CoordinateLSTM(), weights, trained_on="test")

    def no_tuning(*args, **kwargs):
        raise AssertionError("a reused baseline was tuned again")

    runs: list[int] = []
    real_run = harness.run_optimizer
    monkeypatch.setattr(harness, "tune_lr", no_tuning)
    monkeypatch.setattr(harness, "run_optimizer", lambda *a, **k: runs.append(a[1]) or real_run(*a, **k))
    again = evaluate_optimizers(replace(config, weights=[str(weights)], reuse=str(first_path)), log=lambda _: None)
    results = again["problems"]["quadratic-20"]["results"]
    spec = learned_from_file(weights)
    assert runs == [0, 1]  # only the weight file ran, on the two evaluation seeds
    for label, entry in first["problems"]["quadratic-20"]["results"].items():
        assert results[label] == entry, label
    problem = make_problem("quadratic-20").with_steps(12)
    assert results[spec.label]["finals"] == [final_loss(real_run(problem, s, spec.factory(), 1.0)) for s in (0, 1)]
    assert set(again["reused"]["results"]["quadratic-20"]) == {*BASELINES, *(s.label for s in DEFAULT_LEARNED)}
    assert "reused, not rerun" in markdown_tables(again)

    # a preset whose weights differ from the ones the report ran is run again
    changed = copy.deepcopy(first)
    changed["learned"]["LSTMOptimizer (l2l-mix)"]["sha256"] = "0" * 64
    changed_path = tmp_path / "changed.json"
    changed_path.write_text(json.dumps(changed))
    runs.clear()
    evaluate_optimizers(replace(config, reuse=str(changed_path)), log=lambda _: None)
    assert runs == [0, 1]

    # so is one whose tensors are the same but whose architecture constants differ (an earlier
    # release's preset with another output scale): the tensors' hash alone cannot tell them apart
    changed = copy.deepcopy(first)
    changed["learned"]["LSTMOptimizer (l2l-mix)"]["header"]["config"]["output_scale"] = 1.0
    changed_path.write_text(json.dumps(changed))
    runs.clear()
    evaluate_optimizers(replace(config, reuse=str(changed_path)), log=lambda _: None)
    assert runs == [0, 1]

    # other settings: a clear error naming the one that differs
    with pytest.raises(ValueError, match="its seeds is 2, this run's is 3"):
        evaluate_optimizers(replace(config, seeds=3, reuse=str(first_path)), log=lambda _: None)
    with pytest.raises(ValueError, match="its lrs is"):
        evaluate_optimizers(replace(config, lrs=(0.1,), reuse=str(first_path)), log=lambda _: None)
    with pytest.raises(ValueError, match="not a report of this harness"):
        evaluate_optimizers(replace(config, reuse=str(weights)), log=lambda _: None)
    with pytest.raises(ValueError, match="its lr_schedule is 'constant', this run's is 'cosine'"):
        evaluate_optimizers(replace(config, lr_schedule="cosine", reuse=str(first_path)), log=lambda _: None)
    # a report from before the schedule setting ran constant lrs: reusable by a constant run only
    older = copy.deepcopy(first)
    del older["config"]["lr_schedule"]
    older_path = tmp_path / "older.json"
    older_path.write_text(json.dumps(older))
    runs.clear()
    evaluate_optimizers(replace(config, reuse=str(older_path)), log=lambda _: None)
    assert runs == []
    # --presets: only the named presets run (here taken from the report), beside the baselines
    only = evaluate_optimizers(replace(config, presets=["l2l-blend"], reuse=str(first_path)), log=lambda _: None)
    assert list(only["learned"]) == [DEFAULT_LEARNED[0].label] and DEFAULT_LEARNED[0].weights == "l2l-blend"
    assert set(only["problems"]["quadratic-20"]["results"]) == {*BASELINES, DEFAULT_LEARNED[0].label}
    with pytest.raises(ValueError, match="its lr_schedule is 'constant'"):
        evaluate_optimizers(replace(config, lr_schedule="cosine", reuse=str(older_path)), log=lambda _: None)


def test_reuse_of_a_report_from_before_weight_hashes_compares_the_presets_headers(tmp_path: Path) -> None:
    # a report that recorded no SHA-256 of the weights: a preset is reused only if its header is
    # the one the report recorded
    from dataclasses import replace

    config = EvalConfig(problems=["quadratic-20"], seeds=1, tuning_seeds=1, lrs=(0.1,), steps=12,
                        stability_steps=0, presets=["l2l-blend", "l2l-mix"])  # fmt: skip
    report = json.loads(write_report(evaluate_optimizers(config, log=lambda _: None), tmp_path / "first")[0].read_text())
    for record in report["learned"].values():
        del record["sha256"]
    mix = "LSTMOptimizer (l2l-mix)"
    report["learned"][mix]["header"]["trained_on"] = "something else"
    older = tmp_path / "older.json"
    older.write_text(json.dumps(report))
    again = evaluate_optimizers(replace(config, reuse=str(older)), log=lambda _: None)
    assert set(again["reused"]["results"]["quadratic-20"]) == {*BASELINES, DEFAULT_LEARNED[0].label}
    assert mix not in again["reused"]["results"]["quadratic-20"]


def test_regression_problem_is_full_batch_and_a_function_of_the_seed() -> None:
    from learnedopt.demo import make_problem as demo_data
    from learnedopt.evaluation.problems import RegressionProblem, regression_data

    problem = make_problem("regression-1000")
    assert isinstance(problem, RegressionProblem) and problem.steps == 1000
    assert "regression-1000" not in EvalConfig().problems  # run only when named
    a, b = problem.model(3), problem.model(3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    x3, y3 = problem.data(3)
    assert x3.shape == (512, 16) and y3.shape == (512, 1) and not torch.equal(x3, problem.data(4)[0])
    # no minibatches: the loss of given parameters is the same at every step
    assert problem.loss(a, 3, 0).item() == problem.loss(a, 3, 999).item()
    assert torch.equal(problem.loss(a, 3, 0), F.mse_loss(a(x3), y3))
    # the demo's data is the same draw from its own seeded generator
    g = torch.Generator().manual_seed(0)
    assert all(torch.equal(u, v) for u, v in zip(demo_data(0), regression_data(g), strict=True))
    curve = run_optimizer(problem, 3, BASELINES["Adam"], 0.01, steps=200)
    assert curve[-1] < 0.2 * curve[0]


@pytest.mark.parametrize("name", ["mnist-mlp-wide", "mnist-resnet-bn", "mnist-autoencoder"])
def test_unseen_architecture_problems_are_seeded_and_learnable(tmp_path, name) -> None:
    """The opt-in problems of architectures no meta-training task has (a wide MLP, a residual
    BatchNorm convnet, an autoencoder): the same seed gives the same model and minibatches, their
    BatchNorm layers start at weight 1, bias 0 and reset running statistics, and tuned-ish Adam
    lowers the loss in a few steps."""
    from test_meta_unroll import write_fake_mnist

    from learnedopt.evaluation.problems import DEFAULT_PROBLEMS, EXTRA_PROBLEMS

    assert name in EXTRA_PROBLEMS and name not in DEFAULT_PROBLEMS
    problem = make_problem(name, write_fake_mnist(tmp_path / "mnist", n=200))
    a, b = problem.model(3), problem.model(3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(next(a.parameters()), next(problem.model(4).parameters()))
    norms = [m for m in a.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bool(norms) == (name == "mnist-resnet-bn")
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(norm.bias, torch.zeros_like(norm.bias))
        assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert torch.equal(norm.running_var, torch.ones_like(norm.running_var)) and norm.num_batches_tracked == 0
    x, y = problem.minibatch(0, 5)
    assert torch.equal(x, problem.minibatch(0, 5)[0]) and len(x) == problem.batch_size
    if name == "mnist-autoencoder":  # the loss is the reconstruction's squared error; labels unused
        assert torch.allclose(problem.loss(a, 0, 5), F.mse_loss(a(x), x))
    else:
        assert torch.allclose(problem.loss(a, 0, 5), F.cross_entropy(a(x), y))
    optimizer = torch.optim.Adam(a.parameters(), lr=0.003)
    losses = []
    for step in range(25):
        optimizer.zero_grad()
        loss = problem.loss(a, 0, step % 2)  # two minibatches, to see learning in few steps
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # the fake images are uniform noise: an autoencoder can learn little more than their mean
    assert max(losses[-4:]) < (0.95 if name == "mnist-autoencoder" else 0.8) * losses[0], losses


def test_reuse_compares_the_mnist_files_by_content_not_by_folder(tmp_path, monkeypatch) -> None:
    import shutil

    from test_meta_unroll import write_fake_mnist

    from learnedopt.evaluation import harness

    config = EvalConfig(problems=["quadratic-20"], seeds=1, tuning_seeds=1, lrs=(0.1,), steps=5, stability_steps=0,
                        data=str(write_fake_mnist(tmp_path / "a" / "mnist")), include_default_learned=False)  # fmt: skip
    first = write_report(evaluate_optimizers(config, log=lambda _: None), tmp_path / "first")[0]
    assert json.loads(first.read_text())["mnist_sha256"] == harness.mnist_sha256(config.data)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")  # the same files elsewhere, named by their root
    monkeypatch.setattr(harness, "tune_lr", lambda *a, **k: pytest.fail("a reused baseline was tuned again"))
    evaluate_optimizers(dataclasses.replace(config, data=str(tmp_path / "copy"), reuse=str(first)), log=lambda _: None)
    other = write_fake_mnist(tmp_path / "b" / "mnist", seed=2)
    with pytest.raises(ValueError, match="ran on other MNIST files"):
        evaluate_optimizers(dataclasses.replace(config, data=str(other), reuse=str(first)), log=lambda _: None)
    # a report made without MNIST read none of it (its MNIST problems and stability check were
    # skipped): it was refused as having run on "other MNIST files (SHA-256 None, ...)"
    (tmp_path / "none" / "mnist").mkdir(parents=True)
    monkeypatch.setenv("LEARNEDOPT_DATA", str(tmp_path / "none"))
    monkeypatch.setattr(harness, "tune_lr", tune_lr)
    without = write_report(evaluate_optimizers(dataclasses.replace(config, data=None), log=lambda _: None), tmp_path / "without")[0]
    assert json.loads(without.read_text())["mnist_sha256"] is None
    monkeypatch.setattr(harness, "tune_lr", lambda *a, **k: pytest.fail("a reused baseline was tuned again"))
    report = evaluate_optimizers(dataclasses.replace(config, reuse=str(without)), log=lambda _: None)
    assert report["reused"]["results"] == {"quadratic-20": list(BASELINES)}


def test_evaluate_refuses_bad_settings_before_any_run(tmp_path, capsys, monkeypatch) -> None:
    from learnedopt.cli import main
    from learnedopt.evaluation import harness

    monkeypatch.setattr(harness, "tune_lr", lambda *a, **k: pytest.fail("a run started"))
    base = ["evaluate", "optimizers", "--problems", "quadratic-20", "--seeds", "1", "--stability-steps", "0"]
    a_file = tmp_path / "a_file"
    a_file.write_text("not weights")
    (tmp_path / "odd.json").write_text('{"config": {}, "problems": {"quadratic-20": {}}}')
    (tmp_path / "md_folder" / "optimizee_eval.md").mkdir(parents=True)
    (tmp_path / "runs_file.runs").write_text("")
    for extra, message in [
        (["--out", str(a_file)], "is a file, not a folder"),
        (["--out", str(tmp_path), "--name", "sub/x"], "file name stem"),
        # these were tracebacks when the report was written, after every run (the JSON written, not the .md)
        (["--out", str(tmp_path / "md_folder")], "optimizee_eval.md is a folder, where the report's md file would be written"),
        (["--out", str(tmp_path), "--name", "x" * 250], "--name is too long: 250 bytes"),
        (["--out", str(tmp_path), "--name", "runs_file"], "runs_file.runs is a file, where this evaluation records its runs"),
        (["--out", str(tmp_path), "--threads", "-2"], "--threads must be >= 0"),
        (["--out", str(tmp_path), "--workers", "0"], "--workers must be >= 1, got 0"),
        # at 10**5 threads their stacks exhausted memory; at 2**63 torch.set_num_threads raised
        # "Overflow when unpacking long" (a few more than the CPUs, to rerun a recorded command, run)
        (["--out", str(tmp_path), "--threads", str(max(1024, os.cpu_count()) + 1)], f"--threads must be <= {max(1024, os.cpu_count())}, got"),
        (["--out", str(tmp_path), "--threads", "10000000000000000000000"], "--threads must be <= "),
        # a run's (steps,) loss curve: numpy failed allocating 22 GiB, or "Maximum allowed dimension exceeded"
        (["--out", str(tmp_path), "--stability-steps", "3000000000"], "--stability-steps must be <= 2,147,483,647 (2**31 - 1"),
        (["--out", str(tmp_path), "--weights", str(a_file)], "a_file"),
        # a folder was "weight file not found" / "report to reuse not found", though it is there
        (["--out", str(tmp_path), "--weights", str(tmp_path / "md_folder")], "md_folder is a folder, not a weight file"),
        (["--out", str(tmp_path), "--reuse", str(tmp_path / "md_folder")], "md_folder is a folder, not a report"),
        (["--out", str(tmp_path), "--reuse", str(tmp_path / "odd.json")], "cannot reuse"),
        (["--out", str(tmp_path), "--data", str(tmp_path / "missing")], "does not exist"),
        # EvalConfig's own checks name the option, not the field
        (["--out", str(tmp_path), "--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--out", str(tmp_path), "--tuning-seeds", "0"], "--tuning-seeds must be >= 1, got 0"),
        # ran and wrote the repeated lr twice (one spelling or two), as a repeated problem is refused
        (["--out", str(tmp_path), "--lrs", "0.1", "1", "1e-1"], "--lrs given more than once: 0.1"),
        # listed twice in the report's config, so a --resume naming it once was refused
        (["--out", str(tmp_path), "--rules", "mine:Rule", "other:Rule", "mine:Rule"], "--rules given more than once: mine:Rule"),
        # ran it once, but listed it twice in the report's config, as --rules did
        (["--out", str(tmp_path), "--presets", "l2l-mnist", "l2l-short", "l2l-mnist"], "--presets given more than once: l2l-mnist"),
        # said "problem given more than once", naming no option, where the other list options are named
        (["--out", str(tmp_path), "--problems", "quadratic-20", "synthetic-mlp", "quadratic-20"],
         "--problems given more than once: quadratic-20"),
        # SGD's param.add_(grad, alpha=-lr) raised "value cannot be converted to type float without overflow"
        (["--out", str(tmp_path), "--lrs", "0.1", "1e308"], "--lrs must be at most 1e+37"),
    ]:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert err.startswith("learnedopt evaluate optimizers: error: "), err

    # Ctrl-C during the runs: one line and exit code 130, not a traceback
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    from learnedopt.evaluation import cli as evaluate_cli

    monkeypatch.setattr(evaluate_cli, "evaluate_optimizers", interrupt)
    assert main([*base, "--out", str(tmp_path / "stopped")]) == 130
    assert capsys.readouterr().err.strip() == (
        "learnedopt evaluate optimizers: interrupted; no report was written (it is written once every run is done); "
        "no run had finished"
    )

    # --threads 0 keeps torch's choice: it passes the checks and the run starts
    class Started(Exception):
        pass

    def start(*args: object, **kwargs: object) -> None:
        raise Started

    monkeypatch.setattr(evaluate_cli, "evaluate_optimizers", start)
    threads = torch.get_num_threads()
    with pytest.raises(Started):
        main([*base, "--out", str(tmp_path), "--threads", "0"])
    assert torch.get_num_threads() == threads and capsys.readouterr().err == ""


def record_seeds(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Record the seed of every run the harness starts: ``tuning`` (inside ``tune_lr``) and
    ``eval`` (the harness's own runs)."""
    from learnedopt.evaluation import harness, runs

    seen: dict[str, list[int]] = {"tuning": [], "eval": []}
    real_run = runs.run_optimizer

    def recorder(kind: str):
        return lambda *a, **k: seen[kind].append(a[1]) or real_run(*a, **k)

    monkeypatch.setattr(runs, "run_optimizer", recorder("tuning"))
    monkeypatch.setattr(harness, "run_optimizer", recorder("eval"))
    return seen


def save_report(report: dict, path: Path) -> str:
    """The report's JSON as ``write_report`` writes it, without the tables and plot."""
    from learnedopt.evaluation.report import dumps_report

    path.write_text(dumps_report(report))
    return str(path)


def test_long_tuning_seeds_apply_from_exactly_long_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_seeds(monkeypatch)
    config = EvalConfig(problems=[QuadraticProblem("at", 3, 12)], seeds=1, tuning_seeds=1,
                        long_tuning_seeds=2, long_steps=12, lrs=(0.1,), stability_steps=0,
                        include_default_learned=False)  # fmt: skip
    tuned = evaluate_optimizers(config, log=lambda _: None)["problems"]["at"]["tuning_seeds"]
    assert len(tuned) == 2 and seen["tuning"] == tuned * len(BASELINES)
    below = dataclasses.replace(config, problems=[QuadraticProblem("below", 3, 11)])
    entry = evaluate_optimizers(below, log=lambda _: None)["problems"]["below"]
    assert len(entry["tuning_seeds"]) == 1


def test_lr_at_the_bottom_of_the_grid_is_flagged_as_at_its_edge() -> None:
    # lr 30 and 3000 diverge for every baseline: each picks the grid's smallest lr
    config = EvalConfig(problems=[QuadraticProblem("quadratic-3", 3, 12)], seeds=1, tuning_seeds=1,
                        lrs=(0.03, 30.0, 3000.0), stability_steps=0,
                        include_default_learned=False)  # fmt: skip
    results = evaluate_optimizers(config, log=lambda _: None)["problems"]["quadratic-3"]["results"]
    assert {label: (r["lr"], r["lr_at_grid_edge"]) for label, r in results.items()} == {
        label: (0.03, True) for label in BASELINES
    }


def test_stability_check_reports_the_first_nonfinite_step(tmp_path: Path) -> None:
    from test_meta_unroll import write_fake_mnist

    from learnedopt.evaluation import harness

    class NanAfterFourSteps(torch.optim.SGD):
        """SGD that turns the parameters NaN at its 4th step: step 4's loss is the first NaN."""

        calls = 0

        def step(self, closure=None):
            super().step(closure)
            self.calls += 1
            if self.calls == 4:
                with torch.no_grad():
                    for p in self.param_groups[0]["params"]:
                        p.fill_(math.nan)

    class Spec:
        label = "nan-after-4"

        def factory(self):
            return lambda params, lr: NanAfterFourSteps(params, lr=0.01)

    data = str(write_fake_mnist(tmp_path / "mnist"))
    config = EvalConfig(problems=["quadratic-20"], stability_steps=10, data=data)
    result = harness._stability(config, [Spec()], {}, None, lambda _: None)["results"]["nan-after-4"]
    assert result["nonfinite"] is True and result["first_nonfinite_step"] == 4
    assert math.isfinite(result["min_loss"]) and math.isnan(result["final_loss"])


def test_stability_check_counts_an_inf_loss_as_the_first_nonfinite_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stops at an Inf loss, which its curve keeps (the steps after it are NaN): that step is
    the first non-finite one."""
    from learnedopt.evaluation import harness

    class InfAtStep3(SquareProblem):
        def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
            loss = super().loss(model, seed, step)
            return loss * math.inf if step == 3 else loss

    class Spec:
        label = "sgd"

        def factory(self):
            return BASELINES["SGD"]

    monkeypatch.setattr(harness, "make_problem", lambda name, data: InfAtStep3())
    config = EvalConfig(problems=["quadratic-20"], stability_steps=8)
    lines: list[str] = []
    result = harness._stability(config, [Spec()], {}, None, lines.append)["results"]["sgd"]
    assert result["nonfinite"] is True and result["first_nonfinite_step"] == 3
    # each run is announced before it starts (minutes at the default length), then its outcome
    assert lines[0] == "stability sgd: 8 steps on the MNIST MLP ..." and lines[1].startswith("stability sgd: nonfinite=True")


def test_reuse_skips_a_problem_whose_description_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = EvalConfig(problems=["quadratic-20"], seeds=1, tuning_seeds=1, lrs=(0.1,), steps=5,
                        stability_steps=0, include_default_learned=False)  # fmt: skip
    report = evaluate_optimizers(config, log=lambda _: None)
    same = save_report(report, tmp_path / "same.json")
    report["problems"]["quadratic-20"]["description"] = "an older definition of quadratic-20"
    changed = save_report(report, tmp_path / "changed.json")
    seen = record_seeds(monkeypatch)
    rerun = evaluate_optimizers(dataclasses.replace(config, reuse=changed), log=lambda _: None)
    assert rerun["reused"]["results"] == {} and seen["eval"] == [0] * len(BASELINES)
    seen["eval"].clear()
    reused = evaluate_optimizers(dataclasses.replace(config, reuse=same), log=lambda _: None)
    assert set(reused["reused"]["results"]["quadratic-20"]) == set(BASELINES) and seen["eval"] == []


class BracketedDescription(SquareProblem):
    """:class:`SquareProblem` whose description holds a list of numbers, as text."""

    name, steps, description = "bracketed", 4, "||theta||^2, theta_0 in [1,-2,3]"


def test_the_report_json_keeps_strings_that_look_like_number_lists(tmp_path: Path) -> None:
    """dumps_report put each list of numbers on one line by a regex over the JSON text, which also
    rewrote such a list inside a string ("[1,-2,3]" became "[1, -2, 3]"): a description or label
    changed in the report, and --reuse, which compares descriptions, silently reran the problem."""
    from learnedopt.evaluation.report import dumps_report

    payload = {"description": "U[0,1]", "w[1,2].safetensors": {"finals": [1.0, 2.0]}, "s": "[1,\n 2]", "curve": [0.5, 0.25]}
    text = dumps_report(payload)
    assert json.loads(text) == payload
    assert '"curve": [0.5, 0.25]' in text and '"finals": [1.0, 2.0]' in text  # lists still on one line
    config = EvalConfig(problems=[BracketedDescription()], seeds=1, tuning_seeds=1, lrs=(0.1,),
                        stability_steps=0, include_default_learned=False)  # fmt: skip
    report = evaluate_optimizers(config, log=lambda _: None)
    saved = save_report(report, tmp_path / "report.json")
    assert json.loads(Path(saved).read_text())["problems"]["bracketed"]["description"] == BracketedDescription.description
    reused = evaluate_optimizers(dataclasses.replace(config, reuse=saved), log=lambda _: None)
    assert set(reused["reused"]["results"]["bracketed"]) == set(BASELINES)


def test_reuse_reruns_weight_files_even_when_the_report_ran_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "rule.safetensors"
    save_weights(CoordinateLSTM(), weights, trained_on="test")
    config = EvalConfig(problems=["quadratic-20"], weights=[str(weights)], seeds=2, tuning_seeds=1,
                        lrs=(0.1,), steps=5, stability_steps=0,
                        include_default_learned=False)  # fmt: skip
    first = evaluate_optimizers(config, log=lambda _: None)
    assert learned_from_file(weights).label in first["problems"]["quadratic-20"]["results"]
    seen = record_seeds(monkeypatch)
    reuse = save_report(first, tmp_path / "first.json")
    again = evaluate_optimizers(dataclasses.replace(config, reuse=reuse), log=lambda _: None)
    assert set(again["reused"]["results"]["quadratic-20"]) == set(BASELINES)
    assert seen == {"tuning": [], "eval": [0, 1]}  # only the weight file ran, on both seeds


def test_reuse_reruns_a_weight_file_named_like_a_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # as a Path: save_weights refuses the string "l2l-random", which names the preset
    save_weights(CoordinateLSTM(), tmp_path / "l2l-random", trained_on="my file")
    config = EvalConfig(problems=["quadratic-20"], weights=["l2l-random"], seeds=1, tuning_seeds=1, lrs=(0.1,),
                        steps=3, stability_steps=0, include_default_learned=False)  # fmt: skip
    reuse = save_report(evaluate_optimizers(config, log=lambda _: None), tmp_path / "first.json")
    seen = record_seeds(monkeypatch)
    again = evaluate_optimizers(dataclasses.replace(config, reuse=reuse), log=lambda _: None)
    assert set(again["reused"]["results"]["quadratic-20"]) == set(BASELINES) and seen["eval"] == [0]


def test_reuse_takes_no_stability_results_of_another_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_meta_unroll import write_fake_mnist

    from learnedopt.evaluation.harness import STABILITY_SEED

    data = str(write_fake_mnist(tmp_path / "mnist"))
    config = EvalConfig(problems=["quadratic-20"], seeds=1, tuning_seeds=1, lrs=(0.1,), steps=3,
                        stability_steps=3, presets=["l2l-blend"], data=data)  # fmt: skip
    first = save_report(evaluate_optimizers(config, log=lambda _: None), tmp_path / "first.json")
    seen = record_seeds(monkeypatch)
    same = evaluate_optimizers(dataclasses.replace(config, reuse=first), log=lambda _: None)
    assert same["reused"]["results"]["stability"] == [DEFAULT_LEARNED[0].label]
    assert seen["eval"] == []
    longer = dataclasses.replace(config, stability_steps=4, reuse=first)
    report = evaluate_optimizers(longer, log=lambda _: None)
    assert "stability" not in report["reused"]["results"] and seen["eval"] == [STABILITY_SEED]
    assert report["stability"]["steps"] == 4


def test_tuning_seeds_are_disjoint_from_evaluation_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_seeds(monkeypatch)
    config = EvalConfig(problems=[QuadraticProblem("quadratic-3", 3, 5)], seeds=3, tuning_seeds=3,
                        lrs=(0.1,), stability_steps=0, include_default_learned=False)  # fmt: skip
    entry = evaluate_optimizers(config, log=lambda _: None)["problems"]["quadratic-3"]
    assert len(set(entry["tuning_seeds"])) == 3
    assert seen["tuning"] == entry["tuning_seeds"] * len(BASELINES)
    assert seen["eval"] == entry["eval_seeds"] * len(BASELINES) == [0, 1, 2] * len(BASELINES)
    assert not set(seen["tuning"]) & set(seen["eval"])


def test_eval_config_refuses_zero_steps() -> None:
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        EvalConfig(steps=0)
    assert EvalConfig(steps=1).steps == 1


def test_loss_curve_plot_keeps_one_colour_per_optimizer_and_a_legend_of_all(tmp_path: Path, monkeypatch) -> None:
    """SGD has no finite run on the first problem: its line on the second must still have its
    own colour (not the next one of that subplot's cycle), and the legend must list it, and an
    optimizer with no finite run anywhere, marked as such."""
    import matplotlib.pyplot as plt

    from learnedopt.evaluation.report import plot_curves

    def result(kind: str, curve: list[float] | None) -> dict:
        band = None if curve is None else [0.9 * v for v in curve]
        return {"kind": kind, "curve_median": curve, "curve_q1": band, "curve_q3": band}

    curve = [1.0, 0.5, 0.25]
    report = {"problems": {
        "first": {"results": {"SGD": result("baseline", None), "Adam": result("baseline", curve),
                              "learned": result("learned", curve), "gone": result("learned", None)}},
        "second": {"results": {"SGD": result("baseline", curve), "Adam": result("baseline", curve),
                               "learned": result("learned", curve), "gone": result("learned", None)}},
    }}  # fmt: skip
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    plot_curves(report, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    (figure,) = figures
    legend = {text.get_text(): handle for text, handle in zip(figure.legends[0].get_texts(), figure.legends[0].legend_handles)}
    assert list(legend) == ["SGD", "Adam", "learned", "gone (no finite run)"]
    colours = {label: handle.get_color() for label, handle in legend.items()}
    assert len(set(map(str, colours.values()))) == 4
    for ax in figure.axes[:2]:
        for line in ax.get_lines():
            assert line.get_color() == colours[line.get_label()], (ax.get_title(), line.get_label())
            assert line.get_linestyle() == ("-" if line.get_label() in ("SGD", "Adam") else "--")
    assert [line.get_label() for line in figure.axes[1].get_lines()] == ["SGD", "Adam", "learned"]
    close(figure)


def test_loss_curve_plot_says_which_runs_it_leaves_out_and_where_none_stayed_finite(tmp_path: Path, monkeypatch) -> None:
    """The plot's quartile bands are over the finite runs only, as the tables' statistics are, but
    it did not say so: a median of 2 runs of 5 looked like one of 5, and a problem where no run
    stayed finite was an empty log axis."""
    import matplotlib.pyplot as plt

    from learnedopt.evaluation.report import plot_curves

    def result(kind: str, curve: list[float] | None, nonfinite: int) -> dict:
        return {"kind": kind, "curve_median": curve, "curve_q1": curve, "curve_q3": curve, "nonfinite": nonfinite, "runs": 5}

    curve = [1.0, 0.5, 0.25]
    report = {"problems": {
        "some": {"results": {"SGD": result("baseline", curve, 3), "Adam": result("baseline", curve, 0),
                             "learned": result("learned", None, 5)}},
        "none": {"results": {"SGD": result("baseline", None, 5), "Adam": result("baseline", None, 5),
                             "learned": result("learned", None, 5)}},
        "all": {"results": {"SGD": result("baseline", curve, 0), "Adam": result("baseline", curve, 0),
                            "learned": result("learned", curve, 0)}},
    }}  # fmt: skip
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    plot_curves(report, tmp_path / "curves.png")
    (figure,) = figures
    texts = [[t.get_text() for t in ax.texts] for ax in figure.axes[:3]]
    assert texts == [["runs with a NaN/Inf, left out: SGD 3/5, learned 5/5"], ["no run stayed finite"], []]
    close(figure)


def test_tuning_score_is_the_mean_final_loss_over_the_tuning_seeds() -> None:
    """The criterion is the mean over seeds (not the median, not one seed) of each run's final
    loss, the mean of its last FINAL_WINDOW steps; tune_lr scores each lr by it and picks the lowest."""
    from learnedopt.evaluation import tuning_score

    def ending_at(final: float) -> np.ndarray:
        return np.array([100.0] * 5 + [final] * FINAL_WINDOW)

    assert tuning_score([ending_at(1.0), ending_at(2.0), ending_at(6.0)]) == pytest.approx(3.0)
    diverged = ending_at(1.0)
    diverged[3] = math.nan  # the rest of such a run is NaN; one non-finite step is enough
    assert tuning_score([ending_at(1.0), diverged]) == math.inf  # one diverged seed of several
    problem = tiny_problem(steps=12)
    seeds = [5, 6, 7]
    best, scores = tune_lr(problem, BASELINES["SGD"], (0.01, 1.0), seeds)
    for lr, score in scores.items():
        runs = [run_optimizer(problem, s, BASELINES["SGD"], lr) for s in seeds]
        assert score == pytest.approx(np.mean([np.mean(c[-FINAL_WINDOW:]) for c in runs]), rel=1e-12)
    assert best == min(scores, key=scores.get)


def test_summary_means_are_means_over_seeds_not_medians() -> None:
    """Skewed across seeds (1, 2, 6): the means (3) and the median (2) differ."""
    s = summarize(np.array([[v] * FINAL_WINDOW for v in (1.0, 2.0, 6.0)]))
    assert (s["final_mean"], s["mean_loss"], s["final_median"]) == (3.0, 3.0, 2.0)


def test_summary_counts_a_run_that_ends_in_inf_as_nonfinite_and_leaves_it_out() -> None:
    """run_optimizer stops at an Inf loss: at the last step the curve ends in Inf, not NaN. Such a
    run is counted in ``nonfinite`` and left out of the statistics, as is a run with a NaN
    anywhere (the statistics are over the runs that stayed finite)."""
    window = [1.0] * FINAL_WINDOW
    ends_inf = np.array([1.0, *window[:-1], math.inf])
    nan_inside = np.array([math.nan, *window])
    s = summarize(np.vstack([[2.0, *window], [2.0, *[3.0] * FINAL_WINDOW], ends_inf, nan_inside]))
    assert s["nonfinite"] == 2 and s["runs"] == 4
    assert s["final_mean"] == pytest.approx(2.0) and s["final_std"] == pytest.approx(math.sqrt(2.0))


def test_eval_config_takes_numpy_lrs_and_counts_and_reports_them_as_json_numbers(tmp_path: Path) -> None:
    """``lrs=np.logspace(...)`` was refused with numpy's "truth value of an array ... is ambiguous";
    a list of np.float32 (or an np.int64 seed count) was taken, ran every run, and then failed
    writing the report ("Object of type float32 is not JSON serializable")."""
    grid = np.array([0.1, 0.3], dtype=np.float32)
    config = EvalConfig(problems=[TwoParameters()], seeds=np.int64(2), tuning_seeds=np.int64(1), lrs=grid,
                        stability_steps=0, include_default_learned=False)  # fmt: skip
    assert config.lrs == (float(grid[0]), float(grid[1])) and all(type(lr) is float for lr in config.lrs)
    assert type(config.seeds) is int and type(config.tuning_seeds) is int
    report = evaluate_optimizers(config, log=lambda _: None)
    data = json.loads(write_report(report, tmp_path)[0].read_text())
    assert data["config"]["lrs"] == [float(grid[0]), float(grid[1])] and data["config"]["seeds"] == 2
    assert data["problems"]["square"]["eval_seeds"] == [0, 1]
    with pytest.raises(ValueError, match="lrs must be"):
        EvalConfig(problems=["quadratic-20"], lrs=["0.1"])
    with pytest.raises(ValueError, match="seeds must be an integer"):
        EvalConfig(problems=["quadratic-20"], seeds=2.5)


def test_a_run_shorter_than_the_final_window_has_the_mean_of_all_its_steps_as_final_loss() -> None:
    """A problem of fewer than FINAL_WINDOW steps: each run's final loss (in the tuning and the
    statistics) is the mean of all its steps, and the report's definition says so, where it said
    "the last 10 steps" of a 4-step run."""
    from learnedopt.evaluation import final_loss, markdown_tables

    problem = TwoParameters()
    assert problem.steps < FINAL_WINDOW
    config = EvalConfig(problems=[problem], seeds=2, tuning_seeds=1, lrs=(0.1, 0.3), stability_steps=0,
                        include_default_learned=False)  # fmt: skip
    report = evaluate_optimizers(config, log=lambda _: None)
    sgd = report["problems"]["square"]["results"]["SGD"]
    curves = {lr: run_optimizer(problem, 0, BASELINES["SGD"], lr) for lr in (0.1, 0.3)}
    assert final_loss(curves[0.1]) == pytest.approx(curves[0.1].mean(), rel=1e-12)
    assert sgd["tuning_scores"] == {repr(lr): pytest.approx(c.mean(), rel=1e-12) for lr, c in curves.items()}
    assert sgd["lr"] == 0.3 and sgd["finals"][0] == pytest.approx(curves[0.3].mean(), rel=1e-12)
    assert sgd["final_mean"] == pytest.approx(sgd["mean_loss"], rel=1e-12)
    assert report["definitions"]["final_loss"].endswith("(over all its steps where it has fewer)")
    assert "(over all its steps where it has fewer)" in markdown_tables(report)


def test_the_cosine_schedule_reaches_the_tuning_and_every_run_of_the_harness() -> None:
    """With ``lr_schedule="cosine"`` the baselines are tuned and evaluated under it and the
    learned optimizers run under it: every number is that of run_optimizer(..., schedule="cosine")."""
    from learnedopt.evaluation import final_loss
    from learnedopt.evaluation.harness import TUNING_SEED_OFFSET

    problem = tiny_problem(steps=12)
    config = EvalConfig(problems=[problem], seeds=2, tuning_seeds=1, lrs=(0.1, 1.0), stability_steps=0,
                        presets=["l2l-blend"], lr_schedule="cosine")  # fmt: skip
    report = evaluate_optimizers(config, log=lambda _: None)
    results = report["problems"]["tiny"]["results"]
    assert report["definitions"]["final_loss"] == (
        f"mean training (minibatch) loss over the last {FINAL_WINDOW} steps of a run (over all its steps where it has fewer)"
    )
    assert report["definitions"]["lr_schedule"].endswith("(1 + cos(pi t / T)) / 2")
    assert report["stability"] is None  # stability_steps=0: no check ran

    def finals(factory, lr: float, seeds) -> list[float]:
        return [final_loss(run_optimizer(problem, s, factory, lr, schedule="cosine")) for s in seeds]

    for label in ("SGD", "Adam"):
        r = results[label]
        scores = {lr: finals(BASELINES[label], lr, [TUNING_SEED_OFFSET])[0] for lr in (0.1, 1.0)}
        assert r["tuning_scores"] == {repr(lr): pytest.approx(v, rel=1e-12) for lr, v in scores.items()}, label
        assert r["finals"] == finals(BASELINES[label], r["lr"], [0, 1]), label
    learned = results[DEFAULT_LEARNED[0].label]
    assert learned["finals"] == finals(DEFAULT_LEARNED[0].factory(), 1.0, [0, 1])


def test_lr_at_the_top_of_the_grid_is_flagged_as_at_its_edge() -> None:
    # SquareProblem: SGD's loss shrinks by (1 - 2 lr)^2 per step, fastest at the grid's top, 0.3;
    # 0.03 is neither edge of (0.001, 0.03, 0.3) and wins nothing here
    config = EvalConfig(problems=[SquareProblem()], seeds=1, tuning_seeds=1, lrs=(0.001, 0.03, 0.3),
                        stability_steps=0, include_default_learned=False)  # fmt: skip
    sgd = evaluate_optimizers(config, log=lambda _: None)["problems"]["square"]["results"]["SGD"]
    assert (sgd["lr"], sgd["lr_at_grid_edge"]) == (0.3, True)
    # lr 0.5 reaches the minimum in one step: inside the grid, not flagged
    inside = dataclasses.replace(config, lrs=(0.1, 0.5, 1.0))
    sgd = evaluate_optimizers(inside, log=lambda _: None)["problems"]["square"]["results"]["SGD"]
    assert (sgd["lr"], sgd["lr_at_grid_edge"]) == (0.5, False)


def test_the_grid_edge_is_the_grids_smallest_or_largest_lr_in_whatever_order_the_lrs_are_given() -> None:
    # as test_lr_at_the_top_of_the_grid_is_flagged_as_at_its_edge, with --lrs given unsorted: SGD picks
    # the largest lr, 0.3, listed in the middle; then 0.5, the largest lr but one, listed last
    config = EvalConfig(problems=[SquareProblem()], seeds=1, tuning_seeds=1, lrs=(0.001, 0.3, 0.03),
                        stability_steps=0, include_default_learned=False)  # fmt: skip
    sgd = evaluate_optimizers(config, log=lambda _: None)["problems"]["square"]["results"]["SGD"]
    assert (sgd["lr"], sgd["lr_at_grid_edge"]) == (max(config.lrs), True)
    inside = dataclasses.replace(config, lrs=(0.1, 1.0, 0.5))
    sgd = evaluate_optimizers(inside, log=lambda _: None)["problems"]["square"]["results"]["SGD"]
    assert sgd["lr"] == 0.5 and min(inside.lrs) < 0.5 < max(inside.lrs) and not sgd["lr_at_grid_edge"]


def test_stability_check_reports_the_full_length_run_and_its_lowest_loss(tmp_path: Path) -> None:
    from test_meta_unroll import write_fake_mnist

    from learnedopt.evaluation import final_loss, harness

    class Spec:
        label = "sgd"

        def factory(self):
            return BASELINES["SGD"]

    data = str(write_fake_mnist(tmp_path / "mnist"))
    config = EvalConfig(problems=["quadratic-20"], stability_steps=12, data=data)
    result = harness._stability(config, [Spec()], {}, None, lambda _: None)["results"]["sgd"]
    curve = run_optimizer(make_problem("mnist-mlp-100", data), harness.STABILITY_SEED, BASELINES["SGD"], 1.0, steps=12)
    assert result == {"nonfinite": False, "first_nonfinite_step": None, "final_loss": final_loss(curve),
                      "min_loss": float(curve.min())}  # fmt: skip
    assert curve.min() < curve.max()


def test_reuse_refuses_a_report_of_other_settings_naming_the_setting(tmp_path: Path) -> None:
    """Every setting a report's numbers depend on must match (README: seeds, tuning seeds, lr
    grid, step counts, lr schedule, MNIST files)."""
    from learnedopt.evaluation import reusable_results

    base = EvalConfig(problems=["quadratic-20"], seeds=2, tuning_seeds=1, lrs=(0.1,), steps=5, stability_steps=0,
                      include_default_learned=False)  # fmt: skip
    path = tmp_path / "report.json"
    for key, theirs in [("seeds", 3), ("tuning_seeds", 2), ("long_tuning_seeds", 4), ("long_steps", 50),
                        ("lrs", [0.1, 1.0]), ("steps", 6), ("quick", True), ("lr_schedule", "cosine")]:  # fmt: skip
        path.write_text(json.dumps({"config": {**dataclasses.asdict(base), key: theirs}, "problems": {}}))
        with pytest.raises(ValueError, match=f"its {key} is "):
            reusable_results(dataclasses.replace(base, reuse=str(path)), {})
    # the same settings: taken
    path.write_text(json.dumps({"config": dataclasses.asdict(base), "problems": {}}))
    assert reusable_results(dataclasses.replace(base, reuse=str(path)), {}).problems == {}
    # a report from before the MNIST files' SHA-256 was recorded: its data setting must match
    path.write_text(json.dumps({"config": {**dataclasses.asdict(base), "data": "elsewhere"}, "problems": {}}))
    with pytest.raises(ValueError, match="its data is 'elsewhere', this run's is None"):
        reusable_results(dataclasses.replace(base, reuse=str(path)), {})
    # a report that ran on MNIST files is not taken by a run that has none
    path.write_text(json.dumps({"config": dataclasses.asdict(base), "problems": {}, "mnist_sha256": "f" * 64}))
    with pytest.raises(ValueError, match="ran on other MNIST files"):
        reusable_results(dataclasses.replace(base, reuse=str(path)), {}, None)


def test_reuse_refuses_a_report_whose_entries_are_not_results_before_any_run(tmp_path: Path) -> None:
    """A hand-edited or cut report: a reused entry that is null, lacks a number, has a string for
    one, fewer finals than seeds or a short curve was a traceback after every other run (in the
    log line, or in the tables when the report was written); its lrs of strings a bare
    'could not convert string to float'."""
    from learnedopt.evaluation import reusable_results

    config = EvalConfig(problems=["quadratic-20"], seeds=2, tuning_seeds=1, lrs=(0.1,), steps=5, stability_steps=0,
                        include_default_learned=False)  # fmt: skip
    good = json.loads(write_report(evaluate_optimizers(config, log=lambda _: None), tmp_path / "first")[0].read_text())
    path = tmp_path / "edited.json"

    def refused(edit: Callable[[dict], object], message: str) -> None:
        report = json.loads(json.dumps(good))
        edit(report)
        path.write_text(json.dumps(report))
        with pytest.raises(ValueError, match=re.escape(f"cannot reuse {path}: {message}")):
            reusable_results(dataclasses.replace(config, reuse=str(path)), {}, good["mnist_sha256"])

    def adam(report: dict) -> dict:
        return report["problems"]["quadratic-20"]["results"]["Adam"]

    refused(lambda r: r["problems"]["quadratic-20"]["results"].update(Adam=None), "its Adam result on quadratic-20: it is a NoneType")
    refused(lambda r: adam(r).pop("final_mean"), "its Adam result on quadratic-20: its final_mean is missing")
    refused(lambda r: adam(r).update(final_std="0.1"), "its Adam result on quadratic-20: its final_std is missing or not a number")
    refused(lambda r: adam(r).update(finals=[1.0]), "its Adam result on quadratic-20: its finals are not a list of 2 numbers (one per run)")
    refused(lambda r: adam(r).update(curve_q1=[1.0]), "its Adam result on quadratic-20: its curve_median, curve_q1, curve_q3 are not lists of as many numbers")
    refused(lambda r: r["config"].update(lrs=["0.1"]), "its lrs are ['0.1'], not a list of numbers")
    # a preset's stability entry, read by the report's table
    spec = DEFAULT_LEARNED[-1]
    record = json.loads(json.dumps(spec.record()))
    path.write_text(json.dumps({**good, "config": {**good["config"], "stability_steps": 3}, "learned": {spec.label: record},
                                "stability": {"results": {spec.label: {"nonfinite": "no", "final_loss": 1.0}}}}))  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(f"its {spec.label} stability result: its nonfinite, first_nonfinite_step")):
        reusable_results(dataclasses.replace(config, reuse=str(path), stability_steps=3), {spec.label: record}, good["mnist_sha256"])
    path.write_text(json.dumps(good))  # as written: taken
    taken = reusable_results(dataclasses.replace(config, reuse=str(path)), {}, good["mnist_sha256"])
    assert set(taken.problems["quadratic-20"][2]) == set(BASELINES)


def test_reuse_skips_a_problem_whose_step_count_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A problem redefined with another step count (the description of quadratic-20 does not
    name its steps) is rerun, not taken from the report."""
    config = EvalConfig(problems=["quadratic-20"], seeds=1, tuning_seeds=1, lrs=(0.1,), steps=5, stability_steps=0,
                        include_default_learned=False)  # fmt: skip
    report = evaluate_optimizers(config, log=lambda _: None)
    report["problems"]["quadratic-20"]["steps"] = 4
    changed = save_report(report, tmp_path / "changed.json")
    seen = record_seeds(monkeypatch)
    rerun = evaluate_optimizers(dataclasses.replace(config, reuse=changed), log=lambda _: None)
    assert rerun["reused"]["results"] == {} and seen["eval"] == [0] * len(BASELINES)


def harness_problems() -> dict:
    from learnedopt.evaluation import problems

    return problems.PROBLEMS


def test_reuse_reruns_the_stability_check_of_weight_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_meta_unroll import write_fake_mnist

    from learnedopt.evaluation.harness import STABILITY_SEED

    weights = tmp_path / "rule.safetensors"
    save_weights(CoordinateLSTM(), weights, trained_on="test")
    config = EvalConfig(problems=["quadratic-20"], weights=[str(weights)], seeds=1, tuning_seeds=1, lrs=(0.1,),
                        steps=3, stability_steps=3, presets=["l2l-blend"],
                        data=str(write_fake_mnist(tmp_path / "mnist")))  # fmt: skip
    first = save_report(evaluate_optimizers(config, log=lambda _: None), tmp_path / "first.json")
    seen = record_seeds(monkeypatch)
    again = evaluate_optimizers(dataclasses.replace(config, reuse=first), log=lambda _: None)
    assert again["reused"]["results"]["stability"] == [DEFAULT_LEARNED[0].label]
    assert seen["eval"] == [0, STABILITY_SEED]  # the weight file's problem run and stability run


def test_eval_config_refuses_settings_that_would_run_nothing_or_nonsense() -> None:
    for kwargs, message in [
        ({"tuning_seeds": 0}, "tuning_seeds must be >= 1, got 0"),
        ({"long_tuning_seeds": 0}, "long_tuning_seeds must be >= 1, got 0"),
        ({"stability_steps": -1}, "stability_steps must be >= 0, got -1"),
        ({"lrs": (0.1, 0.0)}, "lrs must be a non-empty list of positive finite numbers"),
        ({"lrs": ()}, "lrs must be a non-empty list"),
        ({"lrs": (0.1, math.inf)}, "lrs must be a non-empty list of positive finite numbers"),
        # Adam's first step (about 10 lr) did not fit a float32 parameter: a RuntimeError traceback mid-run
        ({"lrs": (0.1, 1e38)}, "lrs must be at most 1e\\+37 \\(Adam's first step, about 10 lr, must fit a float32 parameter\\), got 1e\\+38"),
        # evaluation seeds 0.., tuning seeds from 1,000,000, the stability seed 2,000,000: never shared
        ({"seeds": 1_000_001}, "seeds must be <= 1000000 \\(the tuning seeds start there\\), got 1000001"),
        ({"tuning_seeds": 1_000_001}, "tuning_seeds must be <= 1000000 \\(the stability seed follows\\)"),
        ({"long_tuning_seeds": 1_000_001}, "long_tuning_seeds must be <= 1000000"),
    ]:
        with pytest.raises(ValueError, match=message):
            EvalConfig(**kwargs)


def test_quick_config_is_the_documented_smoke_run_and_explicit_settings_beat_it() -> None:
    from learnedopt.evaluation import DEFAULT_PROBLEMS

    quick = EvalConfig.quick_config()
    assert (quick.steps, quick.seeds, quick.tuning_seeds, tuple(quick.lrs), quick.stability_steps, quick.quick) == (
        20, 2, 1, (1e-3, 1e-2, 1e-1), 100, True)  # fmt: skip
    assert list(quick.problems) == [p for p in DEFAULT_PROBLEMS if p not in ("mnist-mlp-200", "mnist-mlp-1000")]
    mine = EvalConfig.quick_config(seeds=5, problems=["quadratic-20"], stability_steps=0)
    assert (mine.seeds, list(mine.problems), mine.stability_steps, mine.steps) == (5, ["quadratic-20"], 0, 20)


def test_workers_file_each_problems_results_under_its_own_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers run the longest problem first; the results must still go to the problem that
    produced them. (An in-process pool stands in for the worker processes: the order of the
    jobs, not the processes, is under test; test_workers_give_the_same_report_as_one_process runs real ones.)"""
    import concurrent.futures

    class InProcessPool:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def submit(self, fn, *args):
            future = concurrent.futures.Future()
            future.set_result(fn(*args))
            return future

    monkeypatch.setitem(harness_problems(), "short", lambda data, name: QuadraticProblem(name, 3, 5))
    monkeypatch.setitem(harness_problems(), "long", lambda data, name: QuadraticProblem(name, 3, 12))
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", InProcessPool)
    config = EvalConfig(problems=["short", "long"], seeds=1, tuning_seeds=1, lrs=(0.1,), stability_steps=0,
                        include_default_learned=False)  # fmt: skip
    report = evaluate_optimizers(config, log=lambda _: None, workers=2)
    assert {name: p["steps"] for name, p in report["problems"].items()} == {"short": 5, "long": 12}
    assert {name: len(p["results"]["SGD"]["curve_median"]) for name, p in report["problems"].items()} == {"short": 5, "long": 12}


def test_markdown_puts_each_statistic_in_its_own_column() -> None:
    """Distinct values in every field of a result, so that a column showing another field (or
    the quartiles swapped, or a paired count taken the wrong way round) shows up."""
    from learnedopt.evaluation import markdown_tables

    nan = float("nan")
    adam = {"kind": "baseline", "lr": 0.1, "lr_at_grid_edge": False, "final_mean": 1.0, "final_std": 0.1,
            "final_median": 0.9, "final_q1": 0.8, "final_q3": 1.2, "mean_loss": 3.0, "nonfinite": 1, "runs": 3,
            "finals": [1.0, 1.0, nan]}  # fmt: skip
    mine = {"kind": "learned", "lr": 1.0, "final_mean": 0.5, "final_std": 0.05, "final_median": 0.45,
            "final_q1": 0.4, "final_q3": 0.6, "mean_loss": 2.0, "nonfinite": 0, "runs": 3,
            "finals": [0.5, 1.0, 2.0]}  # fmt: skip
    report = hand_made_report({"Adam": adam, "mine": mine})
    report["config"].update(seeds=3, tuning_seeds=2, long_tuning_seeds=5)
    report["stability"] = {"problem": "P", "steps": 10, "seed": 7, "results": {
        "a": {"nonfinite": True, "first_nonfinite_step": 4, "final_loss": nan, "min_loss": 0.25},
        "b": {"nonfinite": False, "first_nonfinite_step": None, "final_loss": 0.5, "min_loss": 0.125}}}  # fmt: skip
    lines = markdown_tables(report).splitlines()
    assert "- evaluation seeds: 3 per problem (0..2); tuning seeds: 2 (problems of >= 1000 steps: 5), disjoint from the evaluation seeds" in lines
    assert "| Adam | 0.1 | 1 +- 0.1 | 0.9 [0.8, 1.2] | 3 | yes (1/3) | - | - | - |" in lines
    # against Adam on the two seeds where both are finite: 0.5 < 1.0 is below, 1.0 = 1.0 is not
    difference = format_difference(paired_difference(mine["finals"], adam["finals"]))
    assert f"| mine | 1 (untuned) | 0.5 +- 0.05 | 0.45 [0.4, 0.6] | 2 | no (0/3) | 1/2 | 1/2 | {difference} |" in lines
    assert difference == "-0.25 [-0.5, +0]"
    assert "| a | yes | 4 | nan | 0.25 |" in lines and "| b | no | - | 0.5 | 0.125 |" in lines
    assert seeds_below([1.0, 2.0], [1.0, 2.5]) == "1/2"  # a tie is not below


def test_quadratic_draws_w_y_and_theta_0_from_separate_streams() -> None:
    """W, y and theta_0 are independent draws: theta_0 shares no entry with W or y (as it would,
    drawn from a second generator seeded like theirs)."""
    model = make_problem("quadratic-20").model(3)
    theta, drawn = model.theta.detach(), torch.cat([model.weight.flatten(), model.target])
    assert not (theta[:, None] == drawn[None, :]).any()


def test_a_scaled_problem_scales_the_inputs_and_the_default_init() -> None:
    from learnedopt.evaluation import ScaledClassificationProblem

    plain = tiny_problem()
    args = ("scaled", "d", plain.steps, plain.inputs, plain.labels, plain.pool, plain.architecture, plain.batch_size)
    scaled = ScaledClassificationProblem(*args, input_scale=2.0, init_scale=0.7)
    for seed, step in ((0, 0), (3, 5)):
        (x, y), (x0, y0) = scaled.minibatch(seed, step), plain.minibatch(seed, step)
        assert torch.equal(x, 2.0 * x0) and torch.equal(y, y0)
    for p, p0 in zip(scaled.model(4).parameters(), plain.model(4).parameters(), strict=True):
        assert torch.equal(p, 0.7 * p0)
    x, y = plain.minibatch(1, 2)
    model = scaled.model(1)
    assert scaled.loss(model, 1, 2).item() == pytest.approx(F.cross_entropy(model(2.0 * x), y).item())


def test_every_evaluate_optimizers_flag_reaches_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from learnedopt.evaluation import cli as evaluate_cli
    from learnedopt.evaluation import config_from_args
    from learnedopt.evaluation.harness import check_config

    weights = tmp_path / "rule.safetensors"
    save_weights(CoordinateLSTM(), weights, trained_on="test")
    old = tmp_path / "old.json"
    old.write_text("{}")
    parser = argparse.ArgumentParser()
    add_evaluate_optimizers_parser(parser.add_subparsers())
    args = parser.parse_args(["optimizers", "--problems", "quadratic-20", "synthetic-mlp", "--weights", str(weights),
                              "--seeds", "3", "--tuning-seeds", "2", "--long-tuning-seeds", "4", "--lrs", "0.1", "1",
                              "--stability-steps", "7", "--presets", "l2l-blend", "--lr-schedule", "cosine",
                              "--data", "folder", "--reuse", str(old), "--rules", "mine:Rule", "--out", str(tmp_path)])  # fmt: skip
    config = config_from_args(args)
    assert list(config.rules) == ["mine:Rule"]
    assert (list(config.problems), list(config.weights), config.seeds, config.tuning_seeds, config.long_tuning_seeds,
            list(config.lrs), config.stability_steps, list(config.presets), config.lr_schedule, config.data,
            config.reuse, config.quick, config.steps) == (
        ["quadratic-20", "synthetic-mlp"], [str(weights)], 3, 2, 4, [0.1, 1.0], 7, ["l2l-blend"], "cosine", "folder",
        str(old), False, None)  # fmt: skip
    quick = config_from_args(parser.parse_args(["optimizers", "--quick", "--seeds", "5"]))
    assert (quick.quick, quick.steps, quick.seeds, quick.tuning_seeds) == (True, 20, 5, 1)
    # --presets with no name: none of the suite's presets, only the weight files
    none = config_from_args(parser.parse_args(["optimizers", "--problems", "quadratic-20", "--presets", "--weights", str(weights)]))
    assert list(none.presets) == [] and [spec.label for spec in check_config(none).learned] == [f"LSTMOptimizer ({weights.name})"]
    # the MNIST stability check: by default with any of the suite's problems, not for one's own alone
    stability = lambda *flags: config_from_args(parser.parse_args(["optimizers", *flags])).stability_steps  # noqa: E731
    assert stability() == stability("--problems", "quadratic-20", "mine:Problem") == 10_000
    assert stability("--problems", "mine:Problem", "pkg.other:make") == 0
    assert stability("--problems", "mine:Problem", "--stability-steps", "50") == 50
    assert stability("--problems", "mine:Problem", "--quick") == 0

    # --workers, --threads and --name reach the harness, torch and the report's files
    seen: dict = {}
    monkeypatch.setattr(evaluate_cli, "check_config", lambda config: None)
    monkeypatch.setattr(evaluate_cli, "run_settings", lambda config, setup: {})
    monkeypatch.setattr(evaluate_cli, "evaluate_optimizers", lambda config, **kw: seen.update(kw) or {"a": "report"})
    monkeypatch.setattr(evaluate_cli, "write_report", lambda report, out, name, write_results: seen.update(name=name) or [])
    args = parser.parse_args(["optimizers", "--problems", "quadratic-20", "--workers", "3", "--threads", "2",
                              "--name", "mine", "--out", str(tmp_path)])  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert args.func(args) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert (seen["workers"], seen["name"], seen["records"].folder) == (3, "mine", tmp_path / "mine.runs")
    # -1 is refused like any negative thread count (torch would raise on it after the checks)
    args = parser.parse_args(["optimizers", "--problems", "quadratic-20", "--threads", "-1", "--out", str(tmp_path)])
    assert args.func(args) == 2


def test_seeded_init_draws_from_pytorchs_default_bounds() -> None:
    """Linear and Conv2d weights and biases are U(-b, b) with b = 1/sqrt(fan_in), fan_in counting
    a conv's kernel (in_channels * kh * kw), as PyTorch's default init."""
    from learnedopt.evaluation.problems import _init_default_

    model = _init_default_(nn.Sequential(nn.Conv2d(2, 8, 3), nn.Flatten(), nn.Linear(50, 40)),
                           torch.Generator().manual_seed(0))  # fmt: skip
    for layer, fan_in in ((model[0], 2 * 3 * 3), (model[2], 50)):
        bound = 1 / math.sqrt(fan_in)
        for p in (layer.weight, layer.bias):
            assert p.abs().max() <= bound and p.abs().max() > 0.75 * bound, (layer, fan_in)
    # Embedding: N(0, 1)
    embedding = _init_default_(nn.Embedding(100, 10), torch.Generator().manual_seed(0)).weight
    assert abs(embedding.mean().item()) < 0.1 and abs(embedding.std().item() - 1) < 0.1


def test_each_suite_problem_is_what_its_name_and_the_readme_say(tmp_path: Path) -> None:
    from test_meta_unroll import write_fake_mnist

    data = write_fake_mnist(tmp_path / "mnist")
    from learnedopt.evaluation import DEFAULT_PROBLEMS

    problems = {name: make_problem(name, data) for name in DEFAULT_PROBLEMS}
    assert {name: p.steps for name, p in problems.items()} == {
        "mnist-mlp-100": 100, "mnist-mlp-200": 200, "mnist-mlp-1000": 1000, "mnist-mlp-40": 200,
        "mnist-mlp-20-20": 200, "mnist-mlp-relu": 200, "mnist-conv": 200, "quadratic-20": 100,
        "synthetic-mlp": 200, "mlp-random-held-out": 200}  # fmt: skip
    assert {name: p.batch_size for name, p in problems.items() if hasattr(p, "batch_size")} == {
        **dict.fromkeys(["mnist-mlp-100", "mnist-mlp-200", "mnist-mlp-1000", "mnist-mlp-40", "mnist-mlp-20-20",
                         "mnist-mlp-relu", "mnist-conv"], 128), "synthetic-mlp": 64, "mlp-random-held-out": 64}  # fmt: skip
    assert problems["quadratic-20"].model(0).theta.shape == (20,)

    def layers(name: str) -> list:
        model = problems[name].model(0)
        return [(m.in_features, m.out_features) if isinstance(m, nn.Linear) else type(m).__name__
                for m in model.modules() if not list(m.children())]  # fmt: skip

    assert layers("mnist-mlp-100") == [(784, 20), "Sigmoid", (20, 10)]
    assert layers("mnist-mlp-relu") == [(784, 20), "ReLU", (20, 10)]
    assert layers("mnist-mlp-40") == [(784, 40), "Sigmoid", (40, 10)]
    assert layers("mnist-mlp-20-20") == [(784, 20), "Sigmoid", (20, 20), "Sigmoid", (20, 10)]
    assert layers("synthetic-mlp") == [(16, 32), "Tanh", (32, 4)]
    assert layers("mlp-random-held-out") == [(784, 48), "ELU", (48, 24), "ELU", (24, 10)]
    assert [type(m).__name__ for m in problems["mnist-conv"].model(0) if not list(m.children())] == [
        "Conv2d", "ReLU", "Conv2d", "ReLU", "Flatten", "Linear"]  # fmt: skip


def test_minibatches_draw_from_the_whole_pool() -> None:
    problem = tiny_problem()
    drawn = torch.cat([problem.minibatch(0, step)[0] for step in range(200)])
    assert len(torch.unique(drawn, dim=0)) == len(problem.pool) == 64


def test_a_step_override_cuts_every_problem_and_leaves_the_original() -> None:
    problem = make_problem("quadratic-20")
    assert problem.with_steps(7).steps == 7 and problem.steps == 100
    config = EvalConfig(problems=["quadratic-20"], steps=4, seeds=1, tuning_seeds=1, lrs=(0.1,), stability_steps=0,
                        include_default_learned=False)  # fmt: skip
    entry = evaluate_optimizers(config, log=lambda _: None)["problems"]["quadratic-20"]
    assert entry["steps"] == 4 and all(len(r["curve_median"]) == 4 for r in entry["results"].values())


# ----------------------------------------------------------------------------- --problems module:Class
OWN_PROBLEMS = '''
import torch
import torch.nn.functional as F
from torch import nn
from learnedopt.evaluation import Problem


class LinearRegression(Problem):
    steps = 6
    description = "linear regression, 64 points in 8 dimensions"

    def __init__(self, data=None):
        self.data = data

    def model(self, seed):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return nn.Linear(8, 1)

    def loss(self, model, seed, step):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(64, 8, generator=g)
        return F.mse_loss(model(x), x @ torch.randn(8, 1, generator=g))


def not_a_problem():
    return 3


class NoSteps(LinearRegression):
    steps = 0


class HugeSteps(LinearRegression):  # numpy's "Maximum allowed dimension exceeded" at the first run
    steps = 10**20


class BoolSteps(LinearRegression):
    steps = True


class NoDescription(LinearRegression):
    description = None


class Dataless(LinearRegression):
    def __init__(self):
        self.data = "none given"


def broken():
    raise RuntimeError("never built")


class PerExample(LinearRegression):  # a traceback from the first run's loss.item() before the check
    def loss(self, model, seed, step):
        return super().loss(model, seed, step).expand(64)


class Detached(LinearRegression):  # a traceback from loss.backward()
    def loss(self, model, seed, step):
        return super().loss(model, seed, step).detach()


class NotAModule(LinearRegression):
    def model(self, seed):
        return torch.zeros(3, requires_grad=True)


class Unseeded(LinearRegression):  # each optimizer started from other parameters, silently
    def model(self, seed):
        return nn.Linear(8, 1)


class Cached(LinearRegression):  # each run went on training the model the run before it trained
    def model(self, seed):
        if not hasattr(self, "built"):
            self.built = super().model(seed)
        return self.built


class SharedMemory(LinearRegression):  # nn.Parameter(t) keeps t's memory: each run began where the last ended
    def __init__(self):
        self.theta_0 = torch.zeros(1, 8)

    def model(self, seed):
        m = super().model(seed)
        m.weight = nn.Parameter(self.theta_0)
        return m


class NameProperty(LinearRegression):  # an AttributeError traceback: the harness names it by its entry
    @property
    def name(self):
        return "mine"


class StepsProperty(LinearRegression):  # --quick ran it 30 steps and reported its 20-step cut
    @property
    def steps(self):
        return 30


class SparseGradient(LinearRegression):  # a NotImplementedError traceback at the first run's step
    def model(self, seed):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return nn.Embedding(10, 1, sparse=True)

    def loss(self, model, seed, step):
        return model(torch.tensor([1, 2, 3])).square().mean()


class NaNLoss(LinearRegression):  # every run of every optimizer stopped at step 0: a report of NaN
    def loss(self, model, seed, step):
        return super().loss(model, seed, step) * float("nan")


class NaNGradient(LinearRegression):  # the same, from the gradient: sqrt at 0
    def loss(self, model, seed, step):
        return super().loss(model, seed, step) + (model.weight * 0).sqrt().sum()


class SharedLayer(LinearRegression):  # the same, through a layer the fresh module holds
    def model(self, seed):
        if not hasattr(self, "layer"):
            self.layer = super().model(seed)
        return nn.Sequential(self.layer)


class Dropout(LinearRegression):  # dropout on the inputs: masks from torch's global RNG at every step
    def loss(self, model, seed, step):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(64, 8, generator=g)
        return F.mse_loss(model(F.dropout(x, 0.3, training=True)), x @ torch.randn(8, 1, generator=g))
'''


@pytest.fixture
def own_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module of the user's own problems; returns its module name."""
    yield from importable_module(tmp_path, monkeypatch, "own_problems", OWN_PROBLEMS)


def test_an_own_problem_named_module_colon_class_runs_as_the_suites_do(tmp_path: Path, own_problems: str) -> None:
    """``--problems module:Class``: the harness runs the user's Problem under that name, each
    optimizer's curve the same as a direct run of it, and hands ``data`` to a problem that takes it."""
    from learnedopt.evaluation.harness import _evaluate_problem, check_config

    name = f"{own_problems}:LinearRegression"
    problem = make_problem(name, data=tmp_path)
    assert problem.name == name and problem.data == str(tmp_path) and problem.steps == 6
    config = EvalConfig(problems=[name], seeds=2, tuning_seeds=1, lrs=(0.1,), stability_steps=0, presets=["l2l-blend"])
    learned = check_config(config).learned
    output = _evaluate_problem(name, config, learned, {}, None, lambda line: None)
    assert output["description"] == "linear regression, 64 points in 8 dimensions" and output["steps"] == 6
    adam = output["results"]["Adam"]
    direct = [run_optimizer(make_problem(name), seed, BASELINES["Adam"], 0.1, steps=6) for seed in (0, 1)]
    assert adam["final_mean"] == pytest.approx(float(np.mean([c[-10:].mean() for c in direct])), rel=1e-12)
    # a problem that takes no data is built without it, not refused
    assert make_problem(f"{own_problems}:Dataless", data=tmp_path).data == "none given"


@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        ("not_a_problem", "{mod}:not_a_problem() gave a int, not a learnedopt.evaluation.Problem"),
        ("NoSteps", "{mod}:NoSteps: a Problem needs steps (a positive integer, at most 2,147,483,647) and description (a string), got 0"),
        ("HugeSteps", "{mod}:HugeSteps: a Problem needs steps (a positive integer, at most 2,147,483,647) and description "
         "(a string), got 100000000000000000000"),
        ("BoolSteps", "{mod}:BoolSteps: a Problem needs steps (a positive integer, at most 2,147,483,647) and description (a string), got True"),
        ("NoDescription", "{mod}:NoDescription: a Problem needs steps (a positive integer, at most 2,147,483,647) and description (a string), "
         "got 6 and None"),
        ("Missing", "problem {mod}:Missing: module '{mod}' has no class or function 'Missing'"),
        ("broken", "problem {mod}:broken: {mod}:broken() raised RuntimeError: never built"),
        ("PerExample", "{mod}:PerExample: loss(model, seed, step) gave a tensor of shape (64,) and dtype "
         "torch.float32; it must be the minibatch's scalar floating-point loss (reduce per-example losses"),
        ("Detached", "{mod}:Detached: loss(model, 0, 0) has no gradient"),
        ("NotAModule", "{mod}:NotAModule: model(seed) must return an nn.Module, got a Tensor"),
        ("Unseeded", "{mod}:Unseeded: model(0) called again gave other initial parameters or buffers (weight, bias); they must be "
         "a function of the seed (draw them from a generator seeded by it), so that every optimizer starts alike"),
        ("Cached", "{mod}:Cached: model(0) called again gave parameters in the memory of the first call's (weight, bias); "
         "model(seed) must build a fresh module, as each run trains its own (nn.Parameter(t) keeps t's memory: clone t)"),
        ("SharedLayer", "{mod}:SharedLayer: model(0) called again gave parameters in the memory of the first call's (0.weight, 0.bias)"),
        ("SharedMemory", "{mod}:SharedMemory: model(0) called again gave parameters in the memory of the first call's (weight); "),
        ("NaNLoss", "{mod}:NaNLoss: loss(model(0), 0, 0) is nan, before any step: every optimizer's run would stop there"),
        ("NaNGradient", "{mod}:NaNGradient: the gradient of weight at seed 0, step 0 holds NaN or Inf, before any step: every "
         "optimizer's run would stop there"),
        ("NameProperty", "{mod}:NameProperty: its name cannot be set (property 'name' of 'NameProperty' object has no setter): "
         "the harness names a problem by its --problems entry; make name a plain attribute"),
        ("SparseGradient", "{mod}:SparseGradient: the gradient of weight is sparse (an nn.Embedding(sparse=True)?); Adam, "
         "RMSprop and the learned optimizers take dense gradients"),
    ],
)
def test_an_own_problem_that_cannot_be_used_is_refused_before_any_run(
    tmp_path: Path, own_problems: str, capsys, monkeypatch: pytest.MonkeyPatch, attribute: str, message: str
) -> None:
    from learnedopt.cli import main
    from learnedopt.evaluation import harness

    monkeypatch.setattr(harness, "tune_lr", lambda *a, **k: pytest.fail("a run started"))
    argv = ["evaluate", "optimizers", "--problems", f"{own_problems}:{attribute}", "--seeds", "1",
            "--stability-steps", "0", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("learnedopt evaluate optimizers: error: ") and message.format(mod=own_problems) in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- --rules module:Class
#: OWN_RULE's MomentumMLP with an optimizer class of its own, and (of another kind) with two,
#: which is refused
WITH_OPTIMIZER = OWN_RULE + """
from learnedopt.optim import LearnedOptimizer


class MomentumMLPOptimizer(LearnedOptimizer):
    rule_kind = MomentumMLP.kind
"""
WITH_TWO_OPTIMIZERS = WITH_OPTIMIZER.replace('"CliMomentumMLP"', '"CliMomentumMLP2"') + """

class Another(LearnedOptimizer):
    rule_kind = MomentumMLP.kind
"""


@pytest.fixture
def own_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module of the user's own update rules (``tests/helpers.py``'s ``OWN_RULE``,
    none registered on import), with siblings ``<name>_optimizer`` (an optimizer class of its own)
    and ``<name>_two`` (two); returns its name. The kinds a test registers are forgotten after."""
    yield from own_rule_module(tmp_path, monkeypatch, OWN_RULE, {"optimizer": WITH_OPTIMIZER, "two": WITH_TWO_OPTIMIZERS})


def _own_weights(module: str, path: Path) -> nn.Module:
    """Save ``module``'s MomentumMLP (seeded, hidden 3) as a weight file; returns the rule."""
    import importlib

    torch.manual_seed(0)
    rule = importlib.import_module(module).MomentumMLP(hidden=3)
    save_weights(rule, path, trained_on="nothing")
    return rule


def test_an_own_rules_weight_file_runs_with_rules_also_in_worker_processes(tmp_path: Path, own_rule: str) -> None:
    """``--weights FILE --rules module:Class``: the rule's class is imported and registered (in
    the worker process too: the run is in one with ``--workers 2``), the file runs in a
    LearnedOptimizer made for its kind, labelled by it, its curve that of a direct run in this
    process; the report names the rule's class."""
    from learnedopt.cli import main
    from learnedopt.evaluation.runs import final_loss, own_rule_optimizer
    from learnedopt.weights import read_header

    weights = tmp_path / "mine.safetensors"
    rule = _own_weights(own_rule, weights)
    assert read_header(weights, registered=False)["rule_class"] == f"{own_rule}:MomentumMLP"
    argv = ["evaluate", "optimizers", "--quick", "--problems", "quadratic-20", "--seeds", "2", "--lrs", "0.1",
            "--stability-steps", "0", "--presets", "l2l-blend", "--weights", str(weights),
            "--rules", f"{own_rule}:MomentumMLP", "--workers", "2", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "optimizee_eval.json").read_text())
    label = "LearnedOptimizer[MomentumMLP] (mine.safetensors)"
    assert report["learned"][label]["rule"] == f"{own_rule}:MomentumMLP"
    assert report["config"]["rules"] == [f"{own_rule}:MomentumMLP"]
    optimizer = own_rule_optimizer(type(rule))
    problem = make_problem("quadratic-20").with_steps(20)
    direct = [final_loss(run_optimizer(problem, seed, lambda p, lr: optimizer(p, weights=rule, lr=lr), 1.0)) for seed in (0, 1)]
    assert report["problems"]["quadratic-20"]["results"][label]["finals"] == direct
    md = (tmp_path / "out" / "optimizee_eval.md").read_text()
    assert f"- {label}: weights `{weights}`, your own rule `{own_rule}:MomentumMLP` (trained on 'nothing')" in md


def test_an_own_rule_runs_in_the_optimizer_class_its_module_defines(tmp_path: Path, own_rule: str) -> None:
    import importlib

    from learnedopt.evaluation.harness import check_config

    weights = tmp_path / "mine.safetensors"
    _own_weights(f"{own_rule}_optimizer", weights)
    config = EvalConfig(problems=["quadratic-20"], weights=[str(weights)], rules=[f"{own_rule}_optimizer:MomentumMLP"],
                        presets=["l2l-blend"])  # fmt: skip
    spec = check_config(config).learned[-1]
    assert spec.label == "MomentumMLPOptimizer (mine.safetensors)"
    assert spec.optimizer is importlib.import_module(f"{own_rule}_optimizer").MomentumMLPOptimizer
    assert np.isfinite(run_optimizer(SquareProblem(), 0, spec.factory(), 1.0, steps=3)).all()
    _own_weights(f"{own_rule}_two", weights)
    with pytest.raises(ValueError, match=rf"module {own_rule}_two defines 2 optimizers of rule kind 'CliMomentumMLP2' "
                                         r"\(Another, MomentumMLPOptimizer\): keep one"):  # fmt: skip
        check_config(dataclasses.replace(config, rules=[f"{own_rule}_two:MomentumMLP"]))


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([], "{weights}: its update rule kind 'CliMomentumMLP' is your own and not imported: give --rules {mod}:MomentumMLP "
         "(as the file records it)"),
        (["{mod}:Missing"], "rule {mod}:Missing: module '{mod}' has no class or function 'Missing'"),
        (["no_such_module_xyz:Rule"], "rule no_such_module_xyz:Rule: cannot import 'no_such_module_xyz'"),
        (["{mod}:NotARule"], "rule {mod}:NotARule: register_rule takes an UpdateRule subclass"),
        (["{mod}:Halved"], "rule {mod}:Halved: Halved must set its own kind"),
        (["CoordinateLSTM"], "--rules takes your own UpdateRule classes as module:Class, got 'CoordinateLSTM' (the library's "
         "rules need none)"),
    ],
    ids=["not-given", "missing-class", "missing-module", "not-a-rule", "library-kind", "not-module-class"],
)
def test_an_own_rule_that_cannot_run_is_refused_in_one_line_before_any_run(
    tmp_path: Path, own_rule: str, capsys, monkeypatch: pytest.MonkeyPatch, rules: list[str], message: str  # noqa: ANN001
) -> None:
    from learnedopt.cli import main
    from learnedopt.evaluation import harness

    monkeypatch.setattr(harness, "tune_lr", lambda *a, **k: pytest.fail("a run started"))
    weights = tmp_path / "mine.safetensors"
    _own_weights(own_rule, weights)
    given = ["--rules", *(r.format(mod=own_rule) for r in rules)] if rules else []
    argv = ["evaluate", "optimizers", "--problems", "quadratic-20", "--seeds", "1", "--stability-steps", "0",
            "--weights", str(weights), *given, "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("learnedopt evaluate optimizers: error: ") and message.format(mod=own_rule, weights=weights) in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("rule", "message"), [
    ("IntegerStep", "forward's step must be a floating (3,) tensor for 3 coordinates, got a (3,) int64 tensor"),
    ("ShortStep", "forward's step must be a floating (3,) tensor for 3 coordinates, got a (2,) float32 tensor"),
])  # fmt: skip
def test_an_own_rule_whose_forward_breaks_its_contract_is_refused_before_any_run(
    tmp_path: Path, own_rule: str, capsys, monkeypatch: pytest.MonkeyPatch, rule: str, message: str  # noqa: ANN001
) -> None:
    """An integer step was evaluated as a rule that never moves; a short one failed mid-run with a traceback."""
    import importlib

    from learnedopt.cli import main
    from learnedopt.evaluation import harness

    monkeypatch.setattr(harness, "tune_lr", lambda *a, **k: pytest.fail("a run started"))
    weights = tmp_path / "mine.safetensors"
    save_weights(getattr(importlib.import_module(own_rule), rule)(hidden=3), weights, trained_on="nothing")
    argv = ["evaluate", "optimizers", "--problems", "quadratic-20", "--seeds", "1", "--stability-steps", "0",
            "--weights", str(weights), "--rules", f"{own_rule}:{rule}", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"learnedopt evaluate optimizers: error: {weights}: its rule {own_rule}:{rule}: {message}\n", err
    assert not (tmp_path / "out").exists()


#: a rule of one's own whose step draws from torch's global RNG (dropout) at every update
DROPOUT_RULE = OWN_RULE + """

class DropoutMLP(MomentumMLP):
    kind = "CliDropoutMLP"

    def forward(self, grad, param, state, loss=None):
        step, new_state = super().forward(grad, param, state, loss)
        return torch.nn.functional.dropout(step, 0.5, training=True), new_state
"""


@pytest.fixture
def own_dropout_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module of :data:`DROPOUT_RULE` (in its own folder of ``tmp_path``, beside
    ``own_problems``'s); returns its name."""
    (tmp_path / "rule").mkdir()
    yield from own_rule_module(tmp_path / "rule", monkeypatch, DROPOUT_RULE)


def test_runs_that_draw_from_the_global_rng_are_those_of_a_run_alone(
    tmp_path: Path, own_dropout_rule: str, own_problems: str
) -> None:
    """A rule (dropout in its step) or a problem (dropout on its inputs) of one's own that draws
    from torch's global RNG: each run's draws were whatever the runs before it in its process had
    left, so --workers 2 (or a --resume, which skips the recorded runs) reported other numbers than
    one process. Each run now seeds the global RNG from its seed: the report's curves are those
    of a run alone, whatever the caller's global RNG, which the run leaves as it was."""
    import importlib

    from learnedopt.cli import main
    from learnedopt.evaluation import final_loss
    from learnedopt.evaluation.runs import own_rule_optimizer

    rule_module, problems = own_dropout_rule, own_problems
    weights = tmp_path / "dropout.safetensors"
    torch.manual_seed(0)
    rule = importlib.import_module(rule_module).DropoutMLP(hidden=3)
    save_weights(rule, weights, trained_on="nothing")
    argv = ["evaluate", "optimizers", "--quick", "--problems", "quadratic-20", f"{problems}:Dropout", "--seeds", "2",
            "--lrs", "0.1", "--stability-steps", "0", "--presets", "--weights", str(weights), "--rules", f"{rule_module}:DropoutMLP",
            "--workers", "2", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "optimizee_eval.json").read_text())["problems"]
    optimizer = own_rule_optimizer(type(rule))
    learned = "LearnedOptimizer[DropoutMLP] (dropout.safetensors)"
    for name, factory, lr, label in [
        ("quadratic-20", lambda p, lr: optimizer(p, weights=rule, lr=lr), 1.0, learned),
        (f"{problems}:Dropout", BASELINES["Adam"], 0.1, "Adam"),
        (f"{problems}:Dropout", lambda p, lr: optimizer(p, weights=rule, lr=lr), 1.0, learned),
    ]:
        problem = make_problem(name)
        problem = problem.with_steps(20) if problem.steps > 20 else problem
        torch.manual_seed(12345)  # another state of the global RNG than the workers started with
        before = torch.get_rng_state()
        direct = [final_loss(run_optimizer(problem, seed, factory, lr)) for seed in (0, 1)]
        assert results[name]["results"][label]["finals"] == direct, (name, label)
        assert torch.equal(torch.get_rng_state(), before)  # the caller's draws go on as they would have


def test_every_optimizer_on_a_seed_sees_the_same_global_rng_draws_of_its_loss() -> None:
    """A loss's draws from torch's global RNG (here its minibatch noise) are a function of the
    run's seed: alike for SGD and Adam on one seed, other on another seed."""

    class GlobalNoise(SquareProblem):
        steps = 5

        def __init__(self) -> None:
            self.draws: list[float] = []

        def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
            self.draws.append(torch.rand(()).item())
            return super().loss(model, seed, step)

    seen = []
    for factory, seed in ((BASELINES["SGD"], 0), (BASELINES["Adam"], 0), (BASELINES["SGD"], 1)):
        problem = GlobalNoise()
        run_optimizer(problem, seed, factory, 0.01)
        seen.append(problem.draws)
    assert seen[0] == seen[1] and seen[0] != seen[2]


def test_an_own_rules_weight_file_its_class_cannot_load_names_the_file_once(tmp_path: Path, own_rule: str, capsys) -> None:
    """A file whose architecture the rule's class no longer has (a config field since removed):
    the one line named the file twice ('FILE: its rule X: FILE: invalid ...')."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from learnedopt.cli import main

    weights = tmp_path / "mine.safetensors"
    _own_weights(own_rule, weights)
    with safe_open(str(weights), "pt") as file:
        header = json.loads(file.metadata()["learnedopt"])
    header["config"]["width"] = 1  # a field the class's config does not have
    save_file(load_file(str(weights)), str(weights), metadata={"learnedopt": json.dumps(header)})
    argv = ["evaluate", "optimizers", "--problems", "quadratic-20", "--seeds", "1", "--stability-steps", "0",
            "--weights", str(weights), "--rules", f"{own_rule}:MomentumMLP", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"learnedopt evaluate optimizers: error: {weights}: its rule {own_rule}:MomentumMLP: invalid CliMomentumMLP "
                   "config in header: unknown CliMomentumMLP config keys: ['width']\n"), err  # fmt: skip


def test_a_registered_rule_class_that_cannot_be_imported_by_name_is_refused(tmp_path: Path, own_rule: str) -> None:
    """A class nested in a function runs here but not in a worker process, which imports the
    rule by name: its weight file is refused, naming the class."""
    import importlib

    from learnedopt.evaluation.runs import learned_from_file
    from learnedopt.nn import register_rule

    class Nested(importlib.import_module(own_rule).MomentumMLP):
        kind = "CliNestedMomentumMLP"

    register_rule(Nested)
    weights = tmp_path / "nested.safetensors"
    save_weights(Nested(), weights)
    with pytest.raises(ValueError, match=re.escape(
        f"{weights}: its rule class {__name__}.{Nested.__qualname__} cannot be imported by name (define it at the top "
        "level of a module other than __main__)"
    )):  # fmt: skip
        learned_from_file(weights)


def test_the_rule_class_a_weight_file_records(tmp_path: Path) -> None:
    """``save_weights``'s ``rule_class``, else (older files) the ``--rule module:Class`` of
    ``meta-train``; a library kind's rule, or a class of ``__main__``, records none."""
    from learnedopt.weights import class_path, read_header, recorded_rule_class

    save_weights(CoordinateLSTM(), tmp_path / "library.safetensors")
    assert "rule_class" not in read_header(tmp_path / "library.safetensors")

    assert recorded_rule_class({"rule_class": "mine:Rule", "meta_train_config": {"rule": "other:Rule"}}) == "mine:Rule"
    assert recorded_rule_class({"meta_train_config": {"rule": "mine:Rule"}}) == "mine:Rule"
    assert recorded_rule_class({"meta_train_config": {"rule": "CoordinateLSTM"}}) is None
    assert recorded_rule_class({"rule_class": 3}) is None
    assert class_path(CoordinateLSTM) == "learnedopt.nn.coordinate_lstm:CoordinateLSTM"
    assert class_path(type("Local", (), {"__module__": "__main__"})) is None
    assert class_path(type("Outer.Inner", (), {"__qualname__": "Outer.Inner", "__module__": "mod"})) is None



@pytest.mark.parametrize("variable", ["LEARNEDOPT_COMPILE", "LEARNEDOPT_CPU_KERNEL"])
def test_a_bad_lstm_step_switch_is_refused_in_one_line_before_any_run(
    tmp_path: Path, variable: str, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read at the first learned step otherwise: a traceback minutes into the suite."""
    from learnedopt.cli import main
    from learnedopt.evaluation import harness

    monkeypatch.setattr(harness, "tune_lr", lambda *a, **k: pytest.fail("a run started"))
    monkeypatch.setenv(variable, "maybe")
    argv = ["evaluate", "optimizers", "--problems", "quadratic-20", "--seeds", "1", "--stability-steps", "0",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"learnedopt evaluate optimizers: error: {variable}='maybe': " + err.split("'maybe': ")[1]
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_report_is_written_atomically_so_a_failed_write_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    # a kill or a full disk while the report was written over a previous one (same --out and
    # --name) left it cut short: each file now goes through a temporary file and a rename
    config = EvalConfig(problems=[QuadraticProblem("quadratic-3", 3, 12)], seeds=2, tuning_seeds=1, lrs=(0.1,),
                        stability_steps=0)  # fmt: skip
    report = evaluate_optimizers(config, log=lambda _: None)
    for ext in ("json", "md", "png"):
        (tmp_path / f"optimizee_eval.{ext}").write_text(f"previous {ext}\n")

    def no_rename(src, dst):
        raise OSError("No space left on device")

    monkeypatch.setattr("learnedopt.files.os.replace", no_rename)
    with pytest.raises(OSError, match="No space left"):
        write_report(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizee_eval.json", "optimizee_eval.md", "optimizee_eval.png"]
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"optimizee_eval.{ext}").read_text() == f"previous {ext}\n"
    monkeypatch.undo()
    paths = write_report(report, tmp_path)
    assert json.loads(paths[0].read_text())["problems"].keys() == {"quadratic-3"}
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_reports_command_is_quoted_for_the_shell(tmp_path, monkeypatch) -> None:
    # joined with spaces, a --data or --out with a space in it read back as two arguments
    config = EvalConfig(problems=[QuadraticProblem("quadratic-3", 3, 12)], seeds=1, tuning_seeds=1, lrs=(0.1,),
                        stability_steps=0)  # fmt: skip
    argv = ["learnedopt", "evaluate", "optimizers", "--out", str(tmp_path / "my runs"), "--name", "it's", "--resume"]
    monkeypatch.setattr(sys, "argv", argv)
    path = write_report(evaluate_optimizers(config, log=lambda _: None), tmp_path / "my runs", name="it's")[0]
    command = json.loads(path.read_text())["command"]
    assert shlex.split(command) == ["learnedopt", *argv[1:-1]]  # --resume left out, as before
    assert f"Command: `{command}`" in path.with_suffix(".md").read_text()


def test_a_problem_whose_loss_is_not_positive_is_plotted_on_a_linear_scale(tmp_path: Path, monkeypatch) -> None:
    """A problem of one's own may have a loss <= 0 (a log-likelihood, a loss minus a constant): on
    the log y axis its curves were masked out, an empty subplot with a UserWarning; its subplot is
    linear, the others stay log."""
    import warnings

    import matplotlib.pyplot as plt

    from learnedopt.evaluation.report import plot_curves

    def result(curve: list[float]) -> dict:
        return {"kind": "baseline", "curve_median": curve, "curve_q1": curve, "curve_q3": curve}

    report = {"problems": {"positive": {"results": {"Adam": result([1.0, 0.5, 0.25])}},
                           "negative": {"results": {"Adam": result([-1.0, -2.0, -3.0])}},
                           "reaches zero": {"results": {"Adam": result([1.0, 0.5, 0.0])}}}}  # fmt: skip
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curves(report, tmp_path / "curves.png")
    (figure,) = figures
    assert [ax.get_yscale() for ax in figure.axes[:3]] == ["log", "linear", "linear"]
    close(figure)


def test_every_baseline_runs_at_the_largest_lr_the_grid_takes() -> None:
    """At :data:`~learnedopt.evaluation.harness.MAX_LR` each baseline's run diverges (a NaN or Inf
    curve) instead of failing: the bound is where a float32 update stops fitting."""
    from learnedopt.evaluation.harness import MAX_LR

    problem = make_problem("quadratic-20")
    for schedule in ("constant", "cosine"):
        for label, factory in BASELINES.items():
            curve = run_optimizer(problem, 0, factory, MAX_LR, steps=3, schedule=schedule)
            assert not np.isfinite(curve).all(), (label, schedule)
    with pytest.raises(RuntimeError, match="overflow"):  # float32's largest value / 10: what the bound keeps out
        run_optimizer(problem, 0, BASELINES["Adam"], torch.finfo(torch.float32).max / 10, steps=3)


def test_an_output_folder_where_the_runs_cannot_be_recorded_is_a_one_line_error(tmp_path, capsys, monkeypatch) -> None:
    """An existing --out whose runs folder cannot be created (read-only, or /sys, where even root's
    os.access says writable) was a PermissionError traceback; now one line and exit code 2, before any run."""
    from learnedopt.cli import main
    from learnedopt.evaluation import harness

    monkeypatch.setattr(harness, "tune_lr", lambda *a, **k: pytest.fail("a run started"))
    mkdir = Path.mkdir

    def refuse_runs_folder(self: Path, *args: object, **kwargs: object) -> None:
        if self.name.endswith(".runs"):
            raise PermissionError(1, "Operation not permitted", str(self))
        mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse_runs_folder)
    args = ["evaluate", "optimizers", "--problems", "quadratic-20", "--seeds", "1", "--stability-steps", "0", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"learnedopt evaluate optimizers: error: --out {tmp_path}: cannot create {tmp_path / 'optimizee_eval.runs'}, "
                   "where the runs are recorded (Operation not permitted)\n")  # fmt: skip


class LazyProblem(SquareProblem):
    """A seeded ``nn.LazyLinear``: its parameters exist once the first loss is computed."""

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.LazyLinear(1)

    def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
        return model(torch.ones(4, 3)).square().mean()


class SharedFrozen(SquareProblem):
    """:class:`SquareProblem` with a frozen parameter that every model shares (kept once, as a
    pretrained embedding may be): no run changes it."""

    frozen = nn.Parameter(torch.ones(2), requires_grad=False)

    def model(self, seed: int) -> nn.Module:
        m = super().model(seed)
        m.frozen = self.frozen
        return m


def test_a_problem_whose_models_share_a_frozen_parameter_passes_the_check() -> None:
    from learnedopt.evaluation.problems import check_problem

    check_problem(SharedFrozen())


def test_a_problem_of_lazy_modules_passes_the_check_and_runs() -> None:
    # a lazy module's parameters are uninitialized until its first forward: the check that model(0)
    # called twice gives the same ones must not read them (their shape is a RuntimeError)
    from learnedopt.evaluation.problems import check_problem

    check_problem(LazyProblem())
    curve = run_optimizer(LazyProblem(), 0, BASELINES["Adam"], 0.1)
    assert np.isfinite(curve).all() and curve[-1] < curve[0]


class WithFrozen(SquareProblem):
    """:class:`SquareProblem` with frozen parameters (``requires_grad=False``): an integer one
    (a count kept as a parameter) and a floating-point one, which its loss does not read."""

    def model(self, seed: int) -> nn.Module:
        m = super().model(seed)
        m.count = nn.Parameter(torch.tensor([1, 2]), requires_grad=False)
        m.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        return m


def test_a_run_optimizes_the_trainable_parameters_only() -> None:
    """The optimizer is given the parameters that require grad, as one fine-tunes a model with
    frozen parts: a frozen integer parameter failed every learned optimizer's run with a traceback
    (it needs floating-point parameters), after the baselines had run."""
    given: list[list[Tensor]] = []

    def learned(params, lr):  # noqa: ANN001, ANN202 - an OptimizerFactory
        params = list(params)
        given.append(params)
        return LSTMOptimizer(params, weights="l2l-blend", lr=lr)

    curve = run_optimizer(WithFrozen(), 0, learned, 1.0)
    assert [tuple(p.shape) for p in given[0]] == [(3,)] and all(p.requires_grad for p in given[0])
    np.testing.assert_array_equal(curve, run_optimizer(SquareProblem(), 0, learned, 1.0))
    np.testing.assert_array_equal(run_optimizer(WithFrozen(), 0, BASELINES["Adam"], 0.1),
                                  run_optimizer(SquareProblem(), 0, BASELINES["Adam"], 0.1))  # fmt: skip


def test_no_stability_check_without_a_learned_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    # --presets with no name and no --weights: the check read MNIST and reported an empty table
    # (or, without MNIST, that it was skipped for want of data)
    from learnedopt.evaluation import harness

    real = harness.make_problem
    monkeypatch.setattr(harness, "make_problem",
                        lambda name, data=None: pytest.fail("the stability check ran") if name == "mnist-mlp-100" else real(name, data))  # fmt: skip
    config = EvalConfig(problems=[QuadraticProblem("quadratic-3", 3, 12)], seeds=1, tuning_seeds=1, lrs=(0.1,),
                        stability_steps=5, presets=[])  # fmt: skip
    report = evaluate_optimizers(config, log=lambda _: None)
    assert report["stability"] is None and "Stability check" not in write_markdown(report)


def write_markdown(report: dict) -> str:
    from learnedopt.evaluation.report import markdown_tables

    return markdown_tables(report)


def test_a_difference_of_no_finite_pair_reads_as_none_not_as_nan() -> None:
    # a learned optimizer that diverged on every seed read "+nan [+nan, +nan]" in the report's
    # column and readme_table.py --difference
    nan = float("nan")
    assert format_difference(paired_difference([nan, nan], [1.0, 2.0])) == "- (no seed where both stayed finite)"
    assert format_difference(paired_difference([0.5, nan], [1.0, 2.0])) == "-0.5 [-0.5, -0.5]"


class SixMinibatches(QuadraticProblem):
    """A quadratic of 6 steps whose loss exists for those steps only (as a problem of one's own
    with that many minibatches prepared)."""

    def __init__(self) -> None:
        super().__init__("six-minibatches", 3, 6)

    def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
        if step >= 6:
            raise IndexError(f"no minibatch {step}")
        return super().loss(model, seed, step)


def test_a_step_override_never_lengthens_a_problem() -> None:
    # --quick's 20 steps ran a 6-step problem for 20 (the README says it cuts every problem): a
    # problem of one's own whose loss exists for its steps only failed with a traceback
    config = EvalConfig.quick_config(problems=[SixMinibatches(), QuadraticProblem("quadratic-30", 3, 30)], lrs=(0.1,),
                                     stability_steps=0, include_default_learned=False)  # fmt: skip
    report = evaluate_optimizers(config, log=lambda _: None)
    assert {name: entry["steps"] for name, entry in report["problems"].items()} == {"six-minibatches": 6, "quadratic-30": 20}


def test_an_own_problem_whose_steps_cannot_be_cut_is_refused_under_quick(own_problems: str) -> None:
    # a steps property: --quick ran it for its 30 steps, and the report said every problem was cut to 20
    from learnedopt.evaluation.harness import check_config

    name = f"{own_problems}:StepsProperty"
    check_config(EvalConfig(problems=[name], lrs=(0.1,), stability_steps=0))  # runs as it is
    with pytest.raises(ValueError, match=f"^{name}: its steps \\(30\\) cannot be cut to 20 \\(--quick\\): make steps a plain attribute$"):
        check_config(EvalConfig.quick_config(problems=[name], lrs=(0.1,), stability_steps=0))


def test_markdown_keeps_odd_labels_problem_names_and_paths_in_their_place() -> None:
    """A learned optimizer's label with ``|`` or a line break (from a weight file's stem), a
    problem named so (one's own ``module:Class`` problem) and a weight file path with a
    backtick: a ``|`` split its table cell and shifted the row, a line break ended the row,
    the heading or the bullet, and a backtick ended the path's code span. Now table cells
    escape ``|``, line breaks are spaces, and a code span's fence is longer than any backtick
    run inside it."""
    from learnedopt.evaluation import markdown_tables

    label = "my|rule\nv2"
    learned = {label: {"header": {"kind": "CoordinateLSTM", "trained_on": "q"}, "weights": "runs/a`b/my|rule.safetensors"}}
    report = hand_made_report({"Adam": hand_made_result("baseline", 0.5), label: hand_made_result("learned", 0.4)}, learned)
    report["problems"] = {"odd|problem\nname": report["problems"]["p"]}
    report["stability"] = {"problem": "P", "steps": 10, "seed": 7, "results": {
        label: {"nonfinite": False, "first_nonfinite_step": None, "final_loss": 0.5, "min_loss": 0.125}}}  # fmt: skip
    lines = markdown_tables(report).splitlines()
    assert "- my|rule v2: weights ``runs/a`b/my|rule.safetensors`` (trained on 'q')" in lines
    assert "## odd|problem name (10 steps, 1 s)" in lines
    rows = [line for line in lines if line.startswith("|")]
    assert len(rows) == 4 + 3, rows  # the results table (header, rule, Adam, the label), the stability table
    columns = [len(re.findall(r"(?<!\\)\|", row)) for row in rows]
    assert columns == [10] * 4 + [6] * 3, rows
    assert sum(row.startswith(r"| my\|rule v2 |") for row in rows) == 2, rows


def test_the_report_keeps_a_command_with_a_backtick_in_one_code_span(tmp_path: Path, monkeypatch) -> None:
    """A backtick in an argument (a weight file, ``--out``) ended the report's inline code of the
    command early, and the rest showed as Markdown."""
    from learnedopt.evaluation import write_report

    monkeypatch.setattr(sys, "argv", ["learnedopt", "evaluate", "optimizers", "--rules", "my`rule.safetensors"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = hand_made_report({"Adam": hand_made_result("baseline", 0.5)})
    paths = write_report(report, tmp_path)
    command = json.loads(paths[0].read_text())["command"]
    assert "`" in command and f"Command: ``{command}``  " in paths[1].read_text().splitlines()


def test_the_plot_shows_labels_and_problem_names_with_dollar_signs_as_written(tmp_path: Path, monkeypatch) -> None:
    """Matplotlib reads text between two ``$`` as math: a label ``x$\\foo$`` (a weight file
    named so) or a problem ``p$^$q`` stopped the plot with a ValueError after every run (the
    JSON and Markdown written, the command ending in a traceback), and ``a$b$c`` showed ``b``
    in italics. They are now shown as written."""
    import matplotlib.pyplot as plt

    from learnedopt.evaluation.report import plot_curves

    curve = [1.0, 0.5, 0.25]
    entry = {"kind": "learned", "curve_median": curve, "curve_q1": curve, "curve_q3": curve}
    report = {"problems": {"p$^$q": {"results": {"x$\\foo$": entry, "a$b$c": entry}}}}
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_curves(report, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    (figure,) = figures
    shown = [text for text in figure.legends[0].get_texts()] + [figure.axes[0].title]
    assert [t.get_text() for t in shown] == ["x\\$\\foo\\$", "a\\$b\\$c", "p\\$^\\$q"]
    assert [t._preprocess_math(t.get_text()) for t in shown] == [("x$\\foo$", False), ("a$b$c", False), ("p$^$q", False)]
