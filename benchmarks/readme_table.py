"""The README's summary table of the held-out suite, printed from one ``optimizee_eval.json``.

Each cell is ``mean final loss / mean loss over the run`` over the evaluation seeds whose run
stayed finite, followed by ``(k NaN)`` when a NaN/Inf appeared in ``k`` of the runs; a value is
bold when it is below the same value of every tuned baseline that stayed finite, and the cell has
no NaN run. The best tuned baseline is the one with the lowest finite mean final loss. Columns are
the JSON's learned optimizers, in the order given (``LABEL=HEADER``, the label as in the JSON):

    python benchmarks/readme_table.py benchmarks/results/optimizee_eval.json \\
        "LSTMOptimizer (l2l-blend, default)=\\`l2l-blend\\` (trained, default)" ...

With ``--paired`` it prints the paired comparison instead: each cell is ``a / b``, the number of
evaluation seeds on which the optimizer's final loss is below tuned Adam's (``a``) and below the
best tuned baseline's (``b``) on the same seed (same initialisation, same minibatches), out of the
seeds where both runs stayed finite, followed by ``(k NaN)`` when the optimizer's run diverged on
``k`` seeds. With ``--difference`` each cell is the mean over seeds of the
optimizer's final loss minus the best tuned baseline's on the same seed, with a 95% paired bootstrap
interval (``learnedopt.evaluation.paired_difference``), bold when the whole interval is below 0;
``--against Adam`` takes tuned Adam as the reference instead.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NO_FINITE_BASELINE, fail, nan_note, path_arg, read_json  # noqa: E402

from learnedopt.evaluation import BASELINES, best_baseline, check_result, format_difference, paired_difference, seeds_below  # noqa: E402
from learnedopt.markdown import row as markdown_row  # noqa: E402

#: row names of the suite's problems, in the README's order
PROBLEM_NAMES: dict[str, str] = {
    "mnist-mlp-100": "MNIST MLP, 100 steps",
    "mnist-mlp-200": "MNIST MLP, 200 steps",
    "mnist-mlp-1000": "MNIST MLP, 1000 steps",
    "mnist-mlp-40": "40 hidden units",
    "mnist-mlp-20-20": "two hidden layers",
    "mnist-mlp-relu": "ReLU",
    "mnist-conv": "conv net",
    "quadratic-20": "quadratic, 20-dim (never seen)",
    "synthetic-mlp": "synthetic-data MLP (never seen)",
    "mlp-random-held-out": "`mlp-random` member with ELU (never seen)",
}


def fmt(x: float) -> str:
    """Three significant digits; two in exponent form for large or tiny values."""
    return f"{x:.2g}" if abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-4) else f"{x:.3g}"


def cell(result: Mapping[str, Any], best_final: float, best_mean: float) -> str:
    """``final / mean`` of one result, each bold when below ``best_final`` / ``best_mean`` (the
    tuned baselines' finite minimums) and no run of the result diverged; ``(k NaN)`` after it
    when ``k`` runs did."""
    final, mean, nonfinite = result["final_mean"], result["mean_loss"], result.get("nonfinite", 0)
    a = f"**{fmt(final)}**" if not nonfinite and final < best_final else fmt(final)
    b = f"**{fmt(mean)}**" if not nonfinite and mean < best_mean else fmt(mean)
    return f"{a} / {b}{nan_note(nonfinite)}"


def values(result: Mapping[str, Any]) -> str:
    """``final / mean`` of one result, unbolded, with its ``(k NaN)``."""
    return f"{fmt(result['final_mean'])} / {fmt(result['mean_loss'])}{nan_note(result.get('nonfinite', 0))}"


def finite_min(values: Iterable[float]) -> float:
    """The smallest finite value of ``values`` (NaN when there is none: nothing compares below it)."""
    return min((v for v in values if math.isfinite(v)), default=math.nan)


def table(report: Mapping[str, Any], columns: Sequence[tuple[str, str]]) -> str:
    """Markdown table: one row per problem of ``report`` (the suite's JSON), one column per
    ``(label, header)`` of ``columns``."""
    head = ["problem", "best tuned baseline (lr)", "Adam (tuned)", *(h for _, h in columns)]
    lines = [markdown_row(head), "|" + "---|" * len(head)]
    for key, problem in report["problems"].items():
        results = problem["results"]
        baselines = {k: v for k, v in results.items() if v["kind"] == "baseline"}
        best = best_baseline(results)
        best_final = finite_min(v["final_mean"] for v in baselines.values())
        best_mean = finite_min(v["mean_loss"] for v in baselines.values())
        adam = baselines["Adam"]
        best_cell = NO_FINITE_BASELINE if best is None else f"{best} {values(baselines[best])} ({fmt(baselines[best]['lr'])})"
        row = [
            PROBLEM_NAMES.get(key, key),
            best_cell,
            values(adam),
            *(cell(results[label], best_final, best_mean) for label, _ in columns),
        ]
        lines.append(markdown_row(row))
    return "\n".join(lines)


def paired_table(report: Mapping[str, Any], columns: Sequence[tuple[str, str]]) -> str:
    """Markdown table of paired counts (see the module docstring): one row per problem, one
    column per ``(label, header)``."""
    head = ["problem", "best tuned baseline", *(h for _, h in columns)]
    lines = [markdown_row(head), "|" + "---|" * len(head)]
    for key, problem in report["problems"].items():
        results = problem["results"]
        best = best_baseline(results)
        adam = results["Adam"]["finals"]
        cells = []
        for label, _ in columns:
            r = results[label]
            top = "-" if best is None else seeds_below(r["finals"], results[best]["finals"])
            cells.append(f"{seeds_below(r['finals'], adam)} / {top}{nan_note(r.get('nonfinite', 0))}")
        lines.append(markdown_row([PROBLEM_NAMES.get(key, key), best or "none", *cells]))
    return "\n".join(lines)


def difference_table(
    report: Mapping[str, Any], columns: Sequence[tuple[str, str]], against: str | None = None
) -> str:
    """Markdown table of paired differences from the best tuned baseline, or from the baseline
    labelled ``against`` (see the module docstring): one row per problem, one column per
    ``(label, header)``."""
    head = ["problem", f"{'best tuned baseline' if against is None else f'tuned {against}'} (final loss)",
            *(h for _, h in columns)]  # fmt: skip
    lines = [markdown_row(head), "|" + "---|" * len(head)]
    for key, problem in report["problems"].items():
        results = problem["results"]
        best = best_baseline(results) if against is None else against
        if best is None:
            lines.append(markdown_row([PROBLEM_NAMES.get(key, key), NO_FINITE_BASELINE, *("-" for _ in columns)]))
            continue
        cells = []
        for label, _ in columns:
            d = paired_difference(results[label]["finals"], results[best]["finals"])
            text = f"{format_difference(d)} (n={d['n']})"
            cells.append(f"**{text}**" if d["hi"] < 0 else text)
        name = f"{best} {fmt(results[best]['final_mean'])}"
        lines.append(markdown_row([PROBLEM_NAMES.get(key, key), name, *cells]))
    return "\n".join(lines)


def split_column(given: str, labels: Iterable[str]) -> tuple[str, str] | None:
    """``(label, header)`` of a ``LABEL=HEADER`` argument: split after the longest of ``labels``
    that it starts with, followed by ``=`` (a label may hold ``=``, as a weight file's name may);
    None where it starts with none."""
    fits = [label for label in labels if given.startswith(label + "=")]
    if not fits:
        return None
    label = max(fits, key=len)
    return label, given[len(label) + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=path_arg, help="an optimizee_eval.json")
    parser.add_argument("columns", nargs="+", metavar="LABEL=HEADER")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--paired", action="store_true", help="print the paired seed counts instead")
    mode.add_argument(
        "--difference", action="store_true", help="print paired differences from the best tuned baseline instead"
    )
    parser.add_argument("--against", metavar="BASELINE", help="with --difference: this baseline (e.g. Adam) instead")
    args = parser.parse_args(argv)
    try:
        report = read_json(args.report)
    except ValueError as err:
        fail(parser, str(err))
    if not (isinstance(report, dict) and isinstance(report.get("learned"), dict) and isinstance(report.get("problems"), dict)):
        fail(parser, f"{args.report} is not a suite report (an optimizee_eval.json with 'learned' and 'problems')")
    labels = set(report["learned"])
    split = [split_column(given, labels) for given in args.columns]
    bad = [given for given, c in zip(args.columns, split, strict=True) if c is None]
    if bad:
        parser.error(f"columns must be LABEL=HEADER with LABEL one of {sorted(labels)}; got {bad}")
    columns = [c for c in split if c is not None]
    if args.against and not args.difference:
        parser.error("--against needs --difference")
    if args.against and args.against not in BASELINES:
        parser.error(f"--against must be one of {sorted(BASELINES)}; got {args.against!r}")
    for name, problem in report["problems"].items():  # what the tables read: a traceback otherwise
        results = problem.get("results") if isinstance(problem, dict) else None
        if not isinstance(results, dict):
            fail(parser, f"{args.report} is not a suite report: {name} has no results")
        missing = [label for label in ("Adam", args.against, *(label for label, _ in columns)) if label and label not in results]
        if missing:
            fail(parser, f"{args.report} has no {', '.join(dict.fromkeys(missing))} result on {name}")
        for label, result in results.items():
            try:
                check_result(result)
            except ValueError as err:
                fail(parser, f"{args.report} is not a suite report: its {label} result on {name}: {err}")
    if args.difference:
        print(difference_table(report, columns, args.against))
    else:
        print((paired_table if args.paired else table)(report, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
