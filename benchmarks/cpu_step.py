"""Time one optimizer step on the CPU: the batched path, the per-tensor reference and Adam.

For each parameter count (10^4, 10^5, 10^6) and layout (one tensor, or 100 equal tensors) it
times ``LSTMOptimizer.step()`` with ``foreach=None`` (batched) and ``foreach=False``
(per-tensor reference), the batched path with the LSTM step's fused CPU kernel off
(``LEARNEDOPT_CPU_KERNEL=0``: BLAS products and compiled pointwise code, what the step ran
before that kernel), the batched path with its LSTM run as ``torch.nn.LSTM`` (oneDNN's fused
cell, what the step used before it ran :func:`learnedopt.nn.lstm_step.lstm_step`), and
``torch.optim.Adam(foreach=True)``, and reports the batched path's matrix-product GFLOP/s as a
fraction of a square ``torch.matmul`` measured in the same run. Each timing follows one untimed
step (which also compiles the LSTM step's pointwise functions).

FLOPs counted per coordinate: 2 x 4H x (inputs + H) per LSTM layer plus 2H for the head.

    python benchmarks/cpu_step.py [--sizes 10000 100000 1000000] [--layouts 1 100] [--repeats 5] [--tag NAME]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from common import Distinct, fail, matmul_gflops, positive_int, results_tag, time_call, torch_lstm, without_cpu_kernel, write_results

from learnedopt import LSTMOptimizer


def flops_per_coordinate(rule) -> int:
    cfg = rule.config
    total, inputs = 0, cfg.num_inputs
    for _ in range(cfg.num_layers):
        total += 2 * 4 * cfg.hidden_size * (inputs + cfg.hidden_size)
        inputs = cfg.hidden_size
    return total + 2 * cfg.hidden_size


def make_params(total: int, tensors: int) -> list[torch.Tensor]:
    size = total // tensors
    params = [torch.randn(size, requires_grad=True) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    return params


def time_step(make_optimizer, total: int, tensors: int, repeats: int) -> float:
    params = make_params(total, tensors)
    optimizer = make_optimizer(params)
    optimizer.step()
    return time_call(optimizer.step, repeats=repeats, min_time=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=positive_int, nargs="+", action=Distinct, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--layouts", type=positive_int, nargs="+", action=Distinct, default=[1, 100], help="tensors per model")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--tag", type=results_tag("cpu_step"), default="", help="suffix of the results file name (e.g. for another host)")
    args = parser.parse_args()
    uneven = [(total, tensors) for total in args.sizes for tensors in args.layouts if total % tensors]
    if uneven:
        total, tensors = uneven[0]
        fail(parser, f"--sizes {total} does not split into {tensors} equal tensors (--layouts); every size must be a multiple of every layout")
    warnings.simplefilter("ignore")

    peak = matmul_gflops()
    rule = LSTMOptimizer([torch.zeros(1, requires_grad=True)]).rule
    flops = flops_per_coordinate(rule)
    rows = []
    for total in args.sizes:
        for tensors in args.layouts:
            batched = time_step(lambda p: LSTMOptimizer(p), total, tensors, args.repeats)
            reference = time_step(lambda p: LSTMOptimizer(p, foreach=False), total, tensors, args.repeats)
            with without_cpu_kernel():
                products = time_step(lambda p: LSTMOptimizer(p), total, tensors, args.repeats)
            with torch_lstm():
                before = time_step(lambda p: LSTMOptimizer(p), total, tensors, args.repeats)
            adam = time_step(lambda p: torch.optim.Adam(p, foreach=True), total, tensors, args.repeats)
            gflops = flops * total / batched / 1e9
            rows.append(
                dict(
                    params=total,
                    tensors=tensors,
                    batched_ms=batched * 1e3,
                    reference_ms=reference * 1e3,
                    batched_products_ms=products * 1e3,
                    speedup_vs_products=products / batched,
                    batched_nn_lstm_ms=before * 1e3,
                    speedup_vs_nn_lstm=before / batched,
                    adam_foreach_ms=adam * 1e3,
                    speedup_vs_reference=reference / batched,
                    batched_gflops=gflops,
                    fraction_of_matmul=gflops / peak,
                    slowdown_vs_adam=batched / adam,
                )
            )
            print(rows[-1], flush=True)
    table = [
        f"Square fp32 `torch.matmul` (2048^3) in this run: **{peak:.1f} GFLOP/s**. "
        f"FLOPs per coordinate counted: {flops} (default preset: 2 layers, hidden 20).\n",
        "| params | tensors | batched ms | per-tensor ms | batched, products ms | batched, `nn.LSTM` ms | Adam(foreach) ms "
        "| batched vs per-tensor | batched vs batched products | batched vs batched `nn.LSTM` | batched GFLOP/s | of matmul | vs Adam |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r['params']:,} | {r['tensors']} | {r['batched_ms']:.2f} | {r['reference_ms']:.2f} | "
            f"{r['batched_products_ms']:.2f} | {r['batched_nn_lstm_ms']:.2f} | {r['adam_foreach_ms']:.3f} | "
            f"{r['speedup_vs_reference']:.2f}x | {r['speedup_vs_products']:.2f}x | "
            f"{r['speedup_vs_nn_lstm']:.2f}x | {r['batched_gflops']:.1f} | "
            f"{r['fraction_of_matmul']:.0%} | {r['slowdown_vs_adam']:.0f}x slower |"
        )
    write_results("cpu_step" + (f"_{args.tag}" if args.tag else ""), {"matmul_gflops": peak, "flops_per_coordinate": flops, "rows": rows}, "\n".join(table))


if __name__ == "__main__":
    main()
