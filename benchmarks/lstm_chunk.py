"""Ways to run the CPU optimizer step's LSTM: one 8,192-coordinate chunk of ``CoordinateLSTM``
with the paper's configuration (2 layers, hidden 20, 2 inputs), five ways, in one run.

- the rule as it runs: :func:`learnedopt.nn.lstm_step.lstm_step` (the fused CPU LSTM layer,
  :mod:`learnedopt.kernels.lstm_layer_cpu`, where it builds; with ``LEARNEDOPT_CPU_KERNEL=0``, or
  in results recorded before that kernel, one gate product of ``[x, h]`` per layer, then
  :func:`~learnedopt.nn.lstm_step.cell_forward` compiled);
- ``nn.LSTM`` (oneDNN's fused cell, what the optimizer's no-grad step ran before);
- the same equations as separate PyTorch ops (addmm, sigmoid, tanh, ...);
- those separate ops under ``torch.compile`` (Inductor's fused C++ element-wise kernels);
- ``lstm_step``'s formulation compiled as one function (gate products included).

    python benchmarks/lstm_chunk.py [--chunk 8192] [--threads N] [--tag NAME]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import positive_int, results_tag, thread_count, time_call, torch_lstm, write_results  # noqa: E402

from learnedopt.nn import CoordinateLSTM, preprocess  # noqa: E402
from learnedopt.nn.lstm_step import cell_forward  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunk", type=positive_int, default=8192)
    parser.add_argument("--threads", type=thread_count, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tag", type=results_tag("lstm_chunk"), help="suffix of the results file name (a run that should not replace the committed one)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rule = CoordinateLSTM().requires_grad_(False)
    n = args.chunk
    g, p = torch.randn(n) * 1e-2, torch.randn(n)
    state = {k: torch.randn_like(v) for k, v in rule.init_state(n, dtype=torch.float32, device="cpu").items()}
    weights = [
        [getattr(rule.lstm, f"{w}_l{k}") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")] for k in range(2)
    ]

    def separate_ops(g, h, c):
        x = preprocess(g, 10.0)
        hs, cs = [], []
        for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
            i, f, gg, o = (torch.addmm(b_ih + b_hh, x, w_ih.t()) + h[k] @ w_hh.t()).chunk(4, 1)
            c_new = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * torch.tanh(gg)
            x = torch.sigmoid(o) * torch.tanh(c_new)
            hs.append(x)
            cs.append(c_new)
        return rule.head(x).squeeze(1) * 0.1, torch.stack(hs), torch.stack(cs)

    def step_formulation(g, h, c):
        x = preprocess(g, 10.0)
        hs, cs = [], []
        for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
            gates = torch.cat((x, h[k]), 1) @ torch.cat((w_ih, w_hh), 1).t()
            _, c_new, x, _ = cell_forward(gates, b_ih + b_hh, c[k])
            hs.append(x)
            cs.append(c_new)
        return rule.head(x).squeeze(1) * 0.1, torch.stack(hs), torch.stack(cs)

    with torch.no_grad():
        start = time.perf_counter()
        compiled = torch.compile(separate_ops, dynamic=False)
        compiled(g, state["h"], state["c"])
        compile_seconds = time.perf_counter() - start
        compiled_step = torch.compile(step_formulation, dynamic=False)
        with torch_lstm():
            fused = rule(g, p, state)[0]
        assert torch.allclose(fused, rule(g, p, state)[0], atol=1e-5)
        assert torch.allclose(fused, separate_ops(g, state["h"], state["c"])[0], atol=1e-5)
        assert torch.allclose(fused, compiled_step(g, state["h"], state["c"])[0], atol=1e-5)
        with torch_lstm():
            before = time_call(lambda: rule(g, p, state))
        timings = {
            "the rule as it runs (`lstm_step`)": time_call(lambda: rule(g, p, state)),
            "nn.LSTM (oneDNN fused cell; the optimizer's step before)": before,
            "separate PyTorch ops": time_call(lambda: separate_ops(g, state["h"], state["c"])),
            "separate ops under torch.compile": time_call(lambda: compiled(g, state["h"], state["c"])),
            "`lstm_step`'s formulation compiled as one function": time_call(
                lambda: compiled_step(g, state["h"], state["c"])
            ),
        }
    flops = 2 * 4 * 20 * (2 + 20) + 2 * 4 * 20 * (20 + 20) + 2 * 20
    rows = [dict(variant=k, ms=v * 1e3, gflops=flops * n / v / 1e9) for k, v in timings.items()]
    for r in rows:
        print(r)
    table = [
        f"One {n}-coordinate chunk of the paper-configuration CoordinateLSTM forward ({flops} FLOPs per coordinate), "
        f"{torch.get_num_threads()} threads; torch.compile took {compile_seconds:.0f} s to compile.\n",
        "| variant | ms per chunk | GFLOP/s |",
        "|---|---:|---:|",
        *(f"| {r['variant']} | {r['ms']:.2f} | {r['gflops']:.1f} |" for r in rows),
    ]
    write_results("lstm_chunk" + (f"_{args.tag}" if args.tag else ""), {"chunk": n, "compile_seconds": compile_seconds, "rows": rows}, "\n".join(table))


if __name__ == "__main__":
    main()
