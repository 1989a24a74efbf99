"""How a learned optimizer's ``lr`` (the factor on its learned step) moves its final loss.

The held-out suite runs learned optimizers untuned (``lr=1``). This runs one preset or weight file
at several ``lr`` on chosen problems of the suite, on the suite's evaluation seeds, and sets the
result beside the tuned baselines of a committed suite report (same problems, same seeds):

    python benchmarks/lr_sensitivity.py --weights l2l-random --lrs 0.5 1 2 4 10 \\
        --problems quadratic-20 mnist-mlp-relu synthetic-mlp --name lr_sensitivity_l2l_random

``--loss-scales`` also runs each ``lr`` with the loss the optimizer sees multiplied by each factor
(its gradient, and its value for a rule that reads it; the curves record the loss itself): a
rule that reads the gradient's magnitude, as the default does, is not invariant to it.

Writes ``results/NAME.json`` and ``results/NAME.md``. Before any run it checks that the reference
report ran each problem for the same number of steps on the same number of seeds, with a constant
lr (this script's schedule) and, where it records them, the same MNIST files (by content).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import NO_FINITE_BASELINE, RESULTS, Distinct, fail, nan_note, path_arg, path_option, read_json, write_results  # noqa: E402

from learnedopt import LSTMOptimizer, markdown  # noqa: E402
from learnedopt.evaluation import (  # noqa: E402
    BASELINES,
    LearnedSpec,
    Problem,
    best_baseline,
    check_report_name,
    learned_from_file,
    make_problem,
    run_optimizer,
    summarize,
)
from learnedopt.evaluation.harness import data_mnist_sha256, mnist_sha256  # noqa: E402
from learnedopt.values import is_number  # noqa: E402


def check_reference(
    report: Any, path: Path, problems: Mapping[str, Problem], seeds: int, data: str | None
) -> dict[str, dict[str, Any]]:
    """Each of ``problems``' results in the suite report ``report`` (read from ``path``), after
    checking that they are comparable with this script's runs: the same step count and number of
    evaluation seeds per problem, a constant lr schedule, and the same MNIST files (by content)
    where the report records them and they are here.

    Raises:
        ValueError: a one-line message naming the first difference.
    """
    if not (isinstance(report, dict) and isinstance(report.get("problems"), dict)):
        raise ValueError(f"{path} is not a suite report (an optimizee_eval.json with 'problems')")
    config = report.get("config") or {}
    schedule = config.get("lr_schedule", "constant")  # reports from before the setting ran constant
    if schedule != "constant":
        raise ValueError(f"{path} ran an lr schedule of {schedule!r}; this script runs a constant lr")
    recorded = report.get("mnist_sha256")
    if isinstance(recorded, str):
        ours = mnist_sha256(data)
        if ours is not None and ours != recorded:
            raise ValueError(f"{path} ran on other MNIST files (SHA-256 {recorded[:12]}, these {ours[:12]})")
    tuned = {}
    for name, problem in problems.items():
        entry = report["problems"].get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("results"), dict):
            raise ValueError(f"{path} has no results for {name}; it ran {', '.join(report['problems']) or 'no problem'}")
        if entry.get("steps") != problem.steps:
            raise ValueError(f"{path} ran {name} for {entry.get('steps')} steps, not {problem.steps}")
        results = entry["results"]
        missing = [b for b in BASELINES if b not in results]
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)} results on {name}")
        for b in BASELINES:
            if not isinstance(results[b], dict) or not {"lr", "final_mean", "final_std", "kind"} <= results[b].keys() \
                    or not all(is_number(results[b][key]) for key in ("lr", "final_mean", "final_std")):  # fmt: skip
                raise ValueError(f"{path} is not a suite report: its {b} entry on {name} lacks lr, final_mean, final_std or kind "
                                 "(the first three numbers)")  # fmt: skip
            if results[b].get("runs") != seeds:
                raise ValueError(f"{path} ran {results[b].get('runs')} seeds on {name}, not {seeds}")
        if "eval_seeds" in entry and entry["eval_seeds"] != list(range(seeds)):  # a list as JSON reads one
            raise ValueError(f"{path} ran {name} on evaluation seeds {entry['eval_seeds']}, not 0..{seeds - 1}")
        tuned[name] = results
    return tuned


def run_key(lr: float, loss_scale: float) -> str:
    """A run's key in the results: ``repr(lr)``, with the loss scale where it is not 1."""
    return repr(lr) if loss_scale == 1.0 else f"{lr!r} loss_scale={loss_scale!r}"


def run_label(lr: float, loss_scale: float) -> str:
    """A run's column heading: ``lr 3``, or ``lr 3, loss x1e-05``."""
    return f"lr {lr:g}" if loss_scale == 1.0 else f"lr {lr:g}, loss x{loss_scale:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="l2l-random", help="an LSTMOptimizer preset or a weight file")
    # each value once (common.Distinct): the table has a column per lr given, the results one per distinct lr
    parser.add_argument("--lrs", type=float, nargs="+", action=Distinct, default=[0.5, 1.0, 2.0, 4.0, 10.0])
    parser.add_argument("--loss-scales", type=float, nargs="+", action=Distinct, default=[1.0],
                        help="factors on the loss the optimizer sees (its gradient); each runs at every lr")
    parser.add_argument("--problems", nargs="+", action=Distinct, required=True)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--reference", type=path_option, default=RESULTS / "optimizee_eval.json",
                        help="suite report whose tuned baselines are shown beside (same seeds)")
    parser.add_argument("--data", type=path_arg, default=None)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        fail(parser, f"--seeds must be >= 1, got {args.seeds}")
    bad = [lr for lr in args.lrs if not (math.isfinite(lr) and lr > 0)]
    if bad:
        fail(parser, f"--lrs must be positive and finite, got {' '.join(f'{lr:g}' for lr in bad)}")
    largest = torch.finfo(torch.float32).max
    bad = [lr for lr in args.lrs if lr > largest]
    if bad:  # the optimizer refused it when built, after the runs of every lr before it
        fail(parser, f"--lrs must be at most float32's largest value ({largest:.4g}), the dtype of the problems' parameters, "
                     f"got {' '.join(f'{lr:g}' for lr in bad)}")  # fmt: skip
    bad = [scale for scale in args.loss_scales if not (math.isfinite(scale) and scale > 0)]
    if bad:
        fail(parser, f"--loss-scales must be positive and finite, got {' '.join(f'{scale:g}' for scale in bad)}")
    tiny = torch.finfo(torch.float32).tiny
    bad = [scale for scale in args.loss_scales if not tiny <= scale <= largest]
    if bad:  # the scaled loss was Inf (every run NaN at step 0) or 0 (no run moved): no rule saw that scale
        fail(parser, f"--loss-scales must lie in float32's normal range ({tiny:.4g} to {largest:.4g}), the dtype of the problems' "
                     f"losses, got {' '.join(f'{scale:g}' for scale in bad)}")  # fmt: skip
    try:  # every input checked before any run
        check_report_name(common.RESULTS, args.name, ("json", "md"))
        spec = learned_from_file(args.weights, rules_option=None) if Path(args.weights).is_file() else LearnedSpec(args.weights, LSTMOptimizer, args.weights)
        spec.header()  # the weights load
        data_mnist_sha256(args.data)  # a --data of no MNIST, where no problem reads it, was ignored
        problems = {name: make_problem(name, args.data) for name in args.problems}
        reference = check_reference(read_json(args.reference), args.reference, problems, args.seeds, args.data)
    except (OSError, ValueError) as err:
        fail(parser, str(err))
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows: dict[str, dict] = {}
    for name, problem in problems.items():
        runs = {}
        for scale, lr in [(scale, lr) for scale in args.loss_scales for lr in args.lrs]:
            curves = np.stack([run_optimizer(problem, s, spec.factory(), lr, loss_scale=scale) for s in range(args.seeds)])
            stats = summarize(curves)
            # keyed by the lr alone at the loss's own scale, as before the option
            runs[run_key(lr, scale)] = {"lr": lr, "loss_scale": scale, **{k: stats[k] for k in ("final_mean", "final_std", "finals", "nonfinite")}}
            print(f"{name} {run_label(lr, scale)}: {stats['final_mean']:.4g}", flush=True)
        tuned = reference[name]
        best = best_baseline(tuned)
        rows[name] = {"learned": runs,
                      "tuned": {b: {k: tuned[b][k] for k in ("lr", "final_mean", "final_std")} for b in BASELINES},
                      "best_baseline": best}  # fmt: skip
    seconds = time.perf_counter() - start
    lines = [
        f"{markdown.code(spec.label)} at several `lr` (untuned default: 1)"
        + (" and loss scales (the optimizer sees the loss times the factor; curves record the loss itself)" if args.loss_scales != [1.0] else "")
        + f", mean final loss +- std over "
        f"{args.seeds} evaluation seeds of the held-out suite; tuned Adam and the best tuned baseline "
        f"from {markdown.code(args.reference.name)} on the same seeds. {seconds / 60:.1f} minutes, 1 thread.",
        "",
        markdown.row(["problem", *(run_label(r["lr"], r["loss_scale"]) for r in next(iter(rows.values()))["learned"].values()),
                      "tuned Adam (lr)", "best tuned baseline (lr)"]),
        "|---|" + "---:|" * (len(args.lrs) * len(args.loss_scales) + 2),
    ]
    for name, row in rows.items():
        cells = [f"{r['final_mean']:.3g} +- {r['final_std']:.2g}{nan_note(r['nonfinite'])}" for r in row["learned"].values()]
        adam, best = row["tuned"]["Adam"], row["tuned"].get(row["best_baseline"])
        best_cell = NO_FINITE_BASELINE if best is None else \
            f"{row['best_baseline']} {best['final_mean']:.3g} ({best['lr']:.3g})"  # fmt: skip
        lines.append(markdown.row([name, *cells, f"{adam['final_mean']:.3g} ({adam['lr']:.3g})", best_cell]))
    write_results(args.name, {"weights": args.weights, "lrs": args.lrs, "loss_scales": args.loss_scales, "seeds": args.seeds,
                              "reference": str(args.reference), "seconds": seconds, "problems": rows}, "\n".join(lines),
                  argv=None if argv is None else ["benchmarks/lr_sensitivity.py", *argv])  # the command that ran: main's argv where given  # fmt: skip
    print(f"wrote {common.RESULTS / args.name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
