"""One meta-training truncation of the library, timed; and the process that runs them for
``revision_ab.py``.

:func:`truncation` is the unit every meta-training throughput script times (``meta_train_throughput.py``,
``kernel_ab.py``). Run as a script, this file is one side of ``revision_ab.py``: with a source tree
first on ``PYTHONPATH`` it imports that tree's library, then for every line ``run`` on its stdin
runs an untimed truncation and a timed one and prints one JSON line ``{"seconds": s,
"meta_gradient_sha256": hex, "meta_gradient": [[...], ...]}`` (the values, one list per rule
weight, for the coordinator to compare the sides by); it ends at end of input. It imports nothing but the library's
public names below (and torch), so that it runs any revision of the library that has them.

    PYTHONPATH=TREE python benchmarks/truncation_worker.py [--preset NAME] [--task mnist-mlp] [--meta-batch 2] [--unroll 20] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import torch

import learnedopt
from learnedopt.meta import generator_for, make_family, num_coordinates, unroll
from learnedopt.nn import RULES, UpdateRule


def truncation(rule: UpdateRule, family, args) -> tuple[float, list[torch.Tensor]]:
    """Seconds for one truncation (``args.unroll`` steps of the library's unroll + the meta-loss's
    backward, on a meta-batch of ``args.meta_batch`` tasks drawn with ``args.seed``) and the
    meta-gradient (one tensor per rule weight)."""
    g = generator_for(args.seed, 1, 1)
    tasks = family.sample_batch(args.meta_batch, g)
    params = tasks.init_params(g)
    state = rule.init_state(num_coordinates(params), dtype=torch.float32, device="cpu")
    weights = [p for p in rule.parameters()]
    for p in weights:
        p.grad = None
    start = time.perf_counter()
    unroll(rule, tasks, params, state, args.unroll).meta_loss.backward()
    return time.perf_counter() - start, [p.grad.clone() for p in weights]


def build_rule(preset: str | None) -> UpdateRule:
    """A preset's rule, or the paper's ``CoordinateLSTM`` at its seed-0 initialisation; with
    gradients on its weights."""
    if preset:
        from learnedopt.weights import build_preset

        rule = build_preset(preset)[0]
    else:
        torch.manual_seed(0)
        rule = RULES["CoordinateLSTM"]()
    return rule.requires_grad_(True)


def gradient_sha256(grads: list[torch.Tensor]) -> str:
    """SHA-256 of the meta-gradient's bits, the weights in order."""
    digest = hashlib.sha256()
    for grad in grads:
        digest.update(grad.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def positive_int(text: str) -> int:
    """``type=`` of a count: an int of at least 1, else argparse's one-line error (the worker
    imports nothing but the library's public names, so not ``learnedopt.cli``'s twin)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=None)
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--meta-batch", type=positive_int, default=2)
    parser.add_argument("--unroll", type=positive_int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rule = build_rule(args.preset)
    family = make_family(args.task, split="meta_train")
    # the first line says which library this process imported, for the coordinator to check
    print(json.dumps({"library": learnedopt.__file__}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            raise SystemExit(f"truncation_worker: expected 'run', got {line.strip()!r}")
        truncation(rule, family, args)
        seconds, grads = truncation(rule, family, args)
        values = [grad.flatten().tolist() for grad in grads]  # float32 to JSON and back: exact
        print(json.dumps({"seconds": seconds, "meta_gradient_sha256": gradient_sha256(grads), "meta_gradient": values}), flush=True)


if __name__ == "__main__":
    main()
