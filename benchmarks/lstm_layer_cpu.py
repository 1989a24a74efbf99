"""Where the fused CPU LSTM layer (:mod:`learnedopt.kernels.lstm_layer_cpu`) spends its time.

At the meta-training throughput benchmark's shape (31,820 coordinates, hidden size 20, the
paper's two layers: 2 then 20 inputs), one run times each layer's forward (saving for the
backward, and not), backward (with the input gradient, and with no input gradient at all, which
skips one of its three products), and sets each against the time its fused multiply-adds take at
the rate of a square ``torch.matmul`` measured in the same run (the products' FLOPs: ``2 x n x
4H x K`` each, ``K`` = inputs + H, the backward's input-gradient product counted at its vector
width, ``K`` rounded up to its 8 or 16 lanes). What a part takes beyond that is its pointwise work (the
sigmoids, the cell) and memory traffic.

A second table times that backward with its input-gradient product in vectors of 8 and of 16
floats (the kernel's ``XL``; the launcher picks 16 on Intel CPUs with AVX-512, else 8), the two
builds alternated call by call, best of ``--repeats`` rounds each.

    python benchmarks/lstm_layer_cpu.py [--coordinates 31820] [--threads 1] [--repeats 15] [--tag NAME]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Distinct, fail, matmul_gflops, positive_int, results_tag, thread_count, time_call, write_results  # noqa: E402

from learnedopt.kernels import lstm_layer_cpu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coordinates", type=positive_int, default=31_820)
    parser.add_argument("--hidden", type=positive_int, default=20)
    parser.add_argument("--inputs", type=positive_int, nargs="+", action=Distinct, default=[2, 20], help="each layer's inputs")
    parser.add_argument("--threads", type=thread_count, default=1)
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--tag", type=results_tag("lstm_layer_cpu"), help="suffix of the results file name (e.g. for a run on 2 threads)")
    args = parser.parse_args()
    n, hidden = args.coordinates, args.hidden
    if (4 * hidden) % 16:
        fail(parser, f"--hidden {hidden}: the kernel needs 4 x hidden a multiple of 16")
    torch.set_num_threads(args.threads)
    peak = matmul_gflops()
    g = torch.Generator().manual_seed(0)
    rows, lane_rows = [], []
    for inputs in args.inputs:
        if not lstm_layer_cpu.ready(inputs, hidden):
            fail(parser, "the kernel could not be built here (see the warning)")
        x = torch.randn(n, inputs, generator=g)
        h, c = torch.randn(n, hidden, generator=g), torch.randn(n, hidden, generator=g)
        weight = torch.randn(4 * hidden, inputs + hidden, generator=g) * 0.3
        bias = torch.randn(4 * hidden, generator=g) * 0.1
        h_out, c_out = torch.empty(n, hidden), torch.empty(n, hidden)
        grads = [torch.randn(n, hidden, generator=g) for _ in range(3)]
        grad_c, grad_h = torch.empty(n, hidden), torch.empty(n, hidden)
        head_weight, head_bias, grad_head = torch.randn(hidden, generator=g), torch.randn(1, generator=g), torch.randn(n, generator=g)
        act, tanh_c, _ = lstm_layer_cpu.lstm_layer_forward(x, h, c, weight, bias, h_out, c_out, save=True)
        width = inputs + hidden
        product = 2 * n * 4 * hidden * width / 1e9  # GFLOP of one (n, K) x (K, 4H) product
        lanes = lstm_layer_cpu._product_lanes()
        padded = 2 * n * 4 * hidden * (-(-width // lanes) * lanes) / 1e9
        parts = {
            "forward, saving for the backward": (
                lambda: lstm_layer_cpu.lstm_layer_forward(x, h, c, weight, bias, h_out, c_out, save=True), product),
            "forward, saving, with a linear head on h'": (
                lambda: lstm_layer_cpu.lstm_layer_forward(
                    x, h, c, weight, bias, h_out, c_out, save=True, head_weight=head_weight, head_bias=head_bias), product),
            "forward, no backward to come": (
                lambda: lstm_layer_cpu.lstm_layer_forward(x, h, c, weight, bias, h_out, c_out, save=False), product),
            "backward, input and h gradients": (
                lambda: lstm_layer_cpu.lstm_layer_backward(x, h, c, weight, act, tanh_c, *grads, grad_c, grad_h, need_x=True),
                product + padded),
            "backward, c and weight gradients only": (
                lambda: lstm_layer_cpu.lstm_layer_backward(x, h, c, weight, act, tanh_c, *grads, grad_c, None, need_x=False),
                product),
            "backward, input and h gradients, a head's gradient in place of the layer above's": (
                lambda: lstm_layer_cpu.lstm_layer_backward(x, h, c, weight, act, tanh_c, grads[0], None, grads[2], grad_c, grad_h,
                                                           need_x=True, grad_head=grad_head, head_weight=head_weight),
                product + padded),
        }  # fmt: skip
        for name, (fn, gflop) in parts.items():
            seconds = time_call(fn, repeats=args.repeats, min_time=0.05)
            floor = gflop / peak
            rows.append(dict(inputs=inputs, part=name, ms=seconds * 1e3, gflop=gflop, floor_ms=floor * 1e3, of_rate=floor / seconds))
            print(rows[-1], flush=True)
        builds = {lanes: built_with(lanes, inputs, hidden) for lanes in (8, 16)}
        best = {lanes: float("inf") for lanes in builds}
        backward = parts["backward, input and h gradients"][0]
        for _ in range(args.repeats):
            for lanes, library in builds.items():
                lstm_layer_cpu._libraries[inputs, hidden] = library
                start = time.perf_counter()
                backward()
                best[lanes] = min(best[lanes], time.perf_counter() - start)
        del lstm_layer_cpu._libraries[inputs, hidden]
        lane_rows.append(dict(inputs=inputs, ms_8=best[8] * 1e3, ms_16=best[16] * 1e3, speedup_8=best[16] / best[8]))
        print(lane_rows[-1], flush=True)
    table = [
        f"Each layer of the fused CPU LSTM layer at {n:,} coordinates, hidden size {hidden}, {args.threads} thread(s), "
        f"the input-gradient product in vectors of {lstm_layer_cpu._product_lanes()} floats; "
        f"a square fp32 `torch.matmul` ran at {peak:.1f} GFLOP/s in this run. 'products at that rate': the time "
        "the part's matrix products would take at it (the backward's input-gradient product at its vector width).\n",
        "| inputs | part | ms | products at that rate, ms | share of the part |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        table.append(f"| {r['inputs']} | {r['part']} | {r['ms']:.2f} | {r['floor_ms']:.2f} | {r['of_rate']:.0%} |")
    table += [
        "\nThe backward (input and h gradients) with its input-gradient product in vectors of 8 and of 16 floats, "
        f"alternated, best of {args.repeats} each:\n",
        "| inputs | 8 lanes ms | 16 lanes ms | 8 lanes faster by |",
        "|---:|---:|---:|---:|",
        *(f"| {r['inputs']} | {r['ms_8']:.2f} | {r['ms_16']:.2f} | {r['speedup_8']:.2f}x |" for r in lane_rows),
    ]
    payload = {"lanes": lstm_layer_cpu._product_lanes(), "matmul_gflops": peak, "coordinates": n, "hidden": hidden,
               "threads": args.threads, "rows": rows, "lanes_rows": lane_rows}  # fmt: skip
    write_results("lstm_layer_cpu" + (f"_{args.tag}" if args.tag else ""), payload, "\n".join(table))


def built_with(lanes: int, inputs: int, hidden: int):  # noqa: ANN201 - a ctypes library
    """The kernel for ``(inputs, hidden)`` built with ``XL = lanes``, leaving the launcher as it was."""
    pick, saved = lstm_layer_cpu._product_lanes, dict(lstm_layer_cpu._libraries)
    lstm_layer_cpu._product_lanes = lambda: lanes
    lstm_layer_cpu._libraries.clear()
    try:
        if not lstm_layer_cpu.ready(inputs, hidden):
            raise SystemExit("lstm_layer_cpu.py: the kernel could not be built here (see the warning)")
        return lstm_layer_cpu._libraries[inputs, hidden]
    finally:
        lstm_layer_cpu._product_lanes = pick
        lstm_layer_cpu._libraries.clear()
        lstm_layer_cpu._libraries.update(saved)


if __name__ == "__main__":
    main()
