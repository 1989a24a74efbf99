"""A candidate not shipped: the meta-training LSTM step's gate product fused with its pointwise
forward by Inductor's C++ GEMM template.

The library's step (:class:`learnedopt.nn.lstm_step.LSTMStackStep`), with its fused CPU kernel
off (``LEARNEDOPT_CPU_KERNEL=0``, as here: the kernel came later), runs each layer's forward as
one BLAS product of ``[x, h]`` with ``[W_ih, W_hh]`` into an ``(n, 4H)`` gates tensor, then one
compiled pointwise function over it. A kernel that keeps a row block's gates in cache from the
product to the activations would save writing and reading the gates. Inductor has one on x86
CPUs under ``max_autotune``: its C++ GEMM template with the pointwise function fused as an
epilogue. It takes a product only when the second matrix is a constant (frozen) module buffer,
except for ``bmm``, so the candidate writes the product as a batch-of-one ``bmm`` (the template
needs constant sizes too: one compiled copy per layer width, ``dynamic=False``).

This script runs one truncation (unroll of T steps + backward) of meta-training on ``mnist-mlp``
as the benchmark ``meta_train_throughput.py`` does, with the library's forward and with the
candidate's (the backward is the library's in both), alternating the two, and reports the best
and median seconds of each and the largest relative difference of their meta-gradients.

    python benchmarks/lstm_fused_gemm.py [--preset NAME] [--repeats 6] [--tag TAG]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fail, positive_int, results_tag, without_cpu_kernel, write_results  # noqa: E402

from learnedopt.meta import generator_for, make_family, num_coordinates, unroll  # noqa: E402
from learnedopt.nn import RULES, lstm_step  # noqa: E402


def fused_layer(layer_input, h, weight, bias, c, h_out, c_out):
    """:func:`learnedopt.nn.lstm_step._layer_forward` as one function for Inductor to fuse."""
    gates = torch.bmm(torch.cat((layer_input, h), dim=1)[None], weight.t()[None])[0]
    activations, c_new, h_new, tanh_c = lstm_step.cell_forward(gates, bias, c)
    h_out.copy_(h_new)
    c_out.copy_(c_new)
    return activations, tanh_c


_fused = torch.compile(
    fused_layer, dynamic=False, options={"max_autotune": True, "max_autotune_gemm_backends": "CPP"}
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="time this preset's rule instead of CoordinateLSTM's default")
    parser.add_argument("--meta-batch", type=positive_int, default=2)
    parser.add_argument("--unroll", type=positive_int, default=20)
    parser.add_argument("--repeats", type=positive_int, default=6)
    parser.add_argument("--tag", type=results_tag("lstm_fused_gemm"), default=None, help="suffix of the results file name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:  # an unknown preset, or no MNIST data: a one-line error
        if args.preset:
            from learnedopt.weights import build_preset

            rule = build_preset(args.preset)[0]
        else:
            rule = RULES["CoordinateLSTM"]()
        family = make_family("mnist-mlp", split="meta_train")
    except (OSError, ValueError) as err:
        fail(parser, str(err))
    library_layer = lstm_step._layer_forward

    def truncation(fused: bool) -> tuple[float, list[torch.Tensor]]:
        lstm_step._layer_forward = _fused if fused else library_layer
        # the step calls _layer_forward only where its fused CPU kernel (lstm_layer_cpu, on by
        # default) does not run: with it off, both sides run the forwards described above
        try:
            with without_cpu_kernel():
                g = generator_for(0, 1, 1)
                tasks = family.sample_batch(args.meta_batch, g)
                params = tasks.init_params(g)
                state = rule.init_state(num_coordinates(params), dtype=torch.float32, device="cpu")
                for p in rule.parameters():
                    p.grad = None
                start = time.perf_counter()
                unroll(rule, tasks, params, state, args.unroll).meta_loss.backward()
                return time.perf_counter() - start, [p.grad.clone() for p in rule.parameters()]
        finally:
            lstm_step._layer_forward = library_layer

    grads = {}
    for fused in (False, True):  # warm-up: compiles
        truncation(fused)
        grads[fused] = truncation(fused)[1]
    difference = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads[True], grads[False], strict=True))
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for fused in (False, True):
            seconds[fused].append(truncation(fused)[0])
    best = {k: min(v) for k, v in seconds.items()}
    median = {k: statistics.median(v) for k, v in seconds.items()}
    names = {False: "library forward (product, then compiled pointwise)", True: "product and pointwise fused (C++ GEMM template)"}
    table = [
        f"One truncation (T={args.unroll}) of `{args.preset or 'CoordinateLSTM'}` meta-training on `mnist-mlp`, meta-batch "
        f"{args.meta_batch}, 1 thread; the two forwards alternated, {args.repeats} timings each after a warm-up; "
        "the backward is the library's in both.",
        "",
        "| forward | best s | median s | speed-up of the best |",
        "|---|---:|---:|---:|",
        *(f"| {names[k]} | {best[k]:.3f} | {median[k]:.3f} | {best[False] / best[k]:.2f}x |" for k in (False, True)),
        "",
        f"Largest relative meta-gradient difference between the two: {difference:.1e}.",
    ]
    name = "lstm_fused_gemm" + (f"_{args.preset}" if args.preset else "") + (f"_{args.tag}" if args.tag else "")
    write_results(
        name,
        {"preset": args.preset, "meta_batch": args.meta_batch, "unroll": args.unroll, "seconds": {names[k]: v for k, v in seconds.items()},
         "meta_grad_rel_diff": difference},
        "\n".join(table),
    )
    print("\n".join(table))


if __name__ == "__main__":
    main()
