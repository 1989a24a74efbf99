"""Meta-training throughput: the batched unroll engine against a per-tensor implementation.

The library's unroll (:func:`learnedopt.meta.unroll.unroll`) runs the update rule once per step
on all coordinates of all tasks of a meta-batch. The baseline is the straightforward way: the same
unroll, but the rule is run separately on every parameter tensor of every task (autograd through
each call). Both compute the same meta-gradient (checked here); the script times one truncation
(forward unroll of T steps + backward) of each, in one run.

    python benchmarks/meta_train_throughput.py [--task mnist-mlp] [--meta-batch 2] [--unroll 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from learnedopt.meta import generator_for, make_family, num_coordinates, unroll  # noqa: E402
from learnedopt.nn import CoordinateLSTM, State, UpdateRule  # noqa: E402


class PerTensorRule(UpdateRule):
    """Runs ``inner`` separately on consecutive coordinate blocks of the given sizes (the baseline)."""

    kind = "PerTensor"

    def __init__(self, inner: UpdateRule, sizes: list[int]) -> None:
        torch.nn.Module.__init__(self)
        self.inner, self.sizes, self.config = inner, sizes, inner.config

    def state_spec(self):
        return self.inner.state_spec()

    def forward(self, grad, param, state: State, loss=None):
        dims = {k: len(spec.lead) for k, spec in self.inner.state_spec().items()}
        steps, states, start = [], [], 0
        while start < grad.shape[0]:
            for size in self.sizes:
                sl = slice(start, start + size)
                piece = {k: v.narrow(dims[k], start, size) for k, v in state.items()}
                step, new = self.inner(grad[sl], param[sl], piece, loss)
                steps.append(step)
                states.append(new)
                start += size
        return torch.cat(steps), {k: torch.cat([s[k] for s in states], dim=dims[k]) for k in state}


def truncation(rule: UpdateRule, family, args) -> tuple[float, list[torch.Tensor]]:
    """Seconds for one truncation (unroll + backward) and the meta-gradient."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--meta-batch", type=int, default=2)
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    family = make_family(args.task, split="meta_train")
    rule = CoordinateLSTM()
    rule.requires_grad_(True)
    g = generator_for(args.seed, 1, 1)
    params = family.sample_batch(args.meta_batch, g).init_params(g)
    sizes = [v[0].numel() for v in params.values()]
    baseline = PerTensorRule(rule, sizes)
    times = {"batched": [], "per-tensor": []}
    grads = {}
    for _ in range(args.repeats):
        for name, r in (("batched", rule), ("per-tensor", baseline)):
            seconds, grads[name] = truncation(r, family, args)
            times[name].append(seconds)
    diff = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads["batched"], grads["per-tensor"]))
    best = {k: min(v) for k, v in times.items()}
    row = dict(
        task=args.task, meta_batch=args.meta_batch, unroll=args.unroll, tensors_per_task=len(sizes),
        coordinates=sum(sizes) * args.meta_batch, batched_s=best["batched"], per_tensor_s=best["per-tensor"],
        speedup=best["per-tensor"] / best["batched"], meta_grad_rel_diff=diff, threads=torch.get_num_threads(),
    )
    print(row)
    table = (
        f"One truncation (unroll of T={args.unroll} steps + backward) of `CoordinateLSTM` meta-training on "
        f"`{args.task}`, meta-batch {args.meta_batch} ({row['coordinates']:,} coordinates in "
        f"{len(sizes) * args.meta_batch} tensors), best of {args.repeats}, {row['threads']} threads.\n\n"
        "| implementation | seconds / truncation | truncations / s |\n|---|---:|---:|\n"
        f"| batched unroll (learnedopt) | {best['batched']:.2f} | {1 / best['batched']:.3f} |\n"
        f"| per-tensor rule calls (baseline) | {best['per-tensor']:.2f} | {1 / best['per-tensor']:.3f} |\n\n"
        f"Speed-up {row['speedup']:.2f}x; largest relative meta-gradient difference {diff:.1e}."
    )
    write_results("meta_train_throughput", {"rows": [row]}, table)


if __name__ == "__main__":
    main()
