"""Time optimizer steps on the CPU over 1, 30 and 300 param groups of the same parameters.

Layer-wise learning rates (one param group per layer) and per-parameter groups give a learned
optimizer many small groups. For each optimizer (``LSTMOptimizer``, ``MetaLSTMOptimizer``), each
tensor size and each group count it times ``step()`` over the same ``--tensors`` parameter tensors
split evenly into that many groups (each group its own ``lr``), three ways: small groups sharing
their rule calls (``group_batch_limit``, the default), each group with its own rule calls
(``group_batch_limit = 0``, what every step did before groups shared them), and
``torch.optim.Adam(foreach=True)`` over the same groups. Each timing follows two untimed steps
(which also compile the LSTM step's pointwise functions).

    python benchmarks/param_groups.py [--tensors 300] [--sizes 10 1000] [--groups 1 30 300]
        [--optimizers lstm meta] [--repeats 5] [--tag NAME]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from common import Distinct, fail, positive_int, results_tag, time_call, write_results

from learnedopt import LSTMOptimizer, MetaLSTMOptimizer

OPTIMIZERS = {"lstm": LSTMOptimizer, "meta": MetaLSTMOptimizer}


def make_groups(tensors: int, size: int, groups: int, seed: int = 0) -> list[dict]:
    """``tensors`` parameters of ``size`` elements with gradients, in ``groups`` equal param groups
    with learning rates of 0.5 to 1."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(size, generator=generator).requires_grad_(True) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(size, generator=generator) * 1e-2
    per = tensors // groups
    return [{"params": params[k * per : (k + 1) * per], "lr": 0.5 + 0.5 * k / groups} for k in range(groups)]


def time_steps(make_optimizer, tensors: int, size: int, groups: int, repeats: int, needs_loss: bool) -> float:
    """Seconds per ``step()`` of the optimizer ``make_optimizer`` builds on fresh groups."""
    optimizer = make_optimizer(make_groups(tensors, size, groups))
    loss = torch.tensor(0.5)
    step = (lambda: optimizer.step(loss=loss)) if needs_loss else optimizer.step
    step()
    return time_call(step, repeats=repeats, min_time=0.2)


def learned(cls, limit: int | None):
    """A factory of ``cls`` with ``group_batch_limit`` ``limit`` (None: the default)."""

    def make(groups: list[dict]):
        optimizer = cls(groups)
        if limit is not None:
            optimizer.group_batch_limit = limit
        return optimizer

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=positive_int, default=300, help="parameter tensors in all")
    parser.add_argument("--sizes", type=positive_int, nargs="+", action=Distinct, default=[10, 1000], help="elements per tensor")
    parser.add_argument("--groups", type=positive_int, nargs="+", action=Distinct, default=[1, 30, 300], help="param group counts")
    parser.add_argument("--optimizers", nargs="+", action=Distinct, choices=sorted(OPTIMIZERS), default=["lstm", "meta"])
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--tag", type=results_tag("param_groups"), default="", help="suffix of the results file name (e.g. for another host)")
    args = parser.parse_args()
    uneven = [groups for groups in args.groups if args.tensors % groups]
    if uneven:
        fail(parser, f"--tensors {args.tensors} does not split into {uneven[0]} equal groups (--groups); every group count must divide it")
    warnings.simplefilter("ignore")

    rows = []
    for name in args.optimizers:
        cls = OPTIMIZERS[name]
        needs_loss = cls is MetaLSTMOptimizer
        for size in args.sizes:
            for groups in args.groups:
                shared = time_steps(learned(cls, None), args.tensors, size, groups, args.repeats, needs_loss)
                alone = time_steps(learned(cls, 0), args.tensors, size, groups, args.repeats, needs_loss)
                adam = time_steps(lambda g: torch.optim.Adam(g, foreach=True), args.tensors, size, groups, args.repeats, False)
                rows.append(
                    dict(
                        optimizer=cls.__name__,
                        tensors=args.tensors,
                        size=size,
                        groups=groups,
                        shared_steps_per_s=1 / shared,
                        per_group_steps_per_s=1 / alone,
                        adam_steps_per_s=1 / adam,
                        speedup_vs_per_group=alone / shared,
                        slowdown_vs_adam=shared / adam,
                    )
                )
                print(rows[-1], flush=True)
    threads = torch.get_num_threads()  # the script sets none: OMP_NUM_THREADS=1 for one, else torch's default
    table = [
        f"{args.tensors} parameter tensors split evenly into param groups (each its own `lr`); steps per second, "
        f"{threads} thread{'s' * (threads > 1)}. *shared*: small groups share their rule calls "
        "(`group_batch_limit`, the default); *per group*: `group_batch_limit = 0`, each group its own calls.\n",
        "| optimizer | elements per tensor | groups | shared steps/s | per group steps/s | Adam(foreach) steps/s | shared vs per group | vs Adam |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| `{r['optimizer']}` | {r['size']:,} | {r['groups']} | {r['shared_steps_per_s']:.1f} | "
            f"{r['per_group_steps_per_s']:.1f} | {r['adam_steps_per_s']:.1f} | {r['speedup_vs_per_group']:.2f}x | "
            f"{r['slowdown_vs_adam']:.1f}x slower |"
        )
    write_results("param_groups" + (f"_{args.tag}" if args.tag else ""), {"rows": rows}, "\n".join(table))


if __name__ == "__main__":
    main()
