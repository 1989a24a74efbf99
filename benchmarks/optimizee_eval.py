"""Learned optimizers against tuned baselines on the held-out optimizee suite.

    python benchmarks/optimizee_eval.py [--problems ...] [--weights FILE ...] [--seeds N]
        [--tuning-seeds N] [--long-tuning-seeds N] [--lrs ...] [--stability-steps N] [--quick]

A thin wrapper around :func:`learnedopt.evaluation.evaluate_optimizers` (the same harness as
``learnedopt evaluate optimizers``) that writes ``results/optimizee_eval.{json,md,png}`` through
``common.write_results``. See :mod:`learnedopt.evaluation` for the problems and definitions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import write_results

from learnedopt.evaluation import add_arguments, run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_arguments(parser)
    # the folder at the run, where write_results writes the report (its run records beside it)
    return run_cli(parser.parse_args(), common.RESULTS, write_results=write_results, prog=parser.prog)


if __name__ == "__main__":
    sys.exit(main())
