"""Why the meta-training LSTM step (:mod:`learnedopt.nn.lstm_step`) is written as it is: each of
its formulation choices timed against the one it replaced, at the throughput benchmark's shape
(31,820 coordinates, hidden size 20, one thread), in one run.

- pointwise forward: per-block ``sigmoid``/``tanh`` then a concatenation (before) against the
  library's :func:`~learnedopt.nn.lstm_step.cell_forward` (one sigmoid over all ``4H`` columns,
  ``tanh(z) = 2 sigmoid(2z) - 1``), both compiled with constant shapes, with their largest
  difference from a float64 evaluation;
- gate product: ``addmm`` of ``x`` then in-place ``addmm_`` of ``h`` (before) against one
  ``addmm`` of ``[x, h]`` (concatenation included), both adding the bias as the step then did;
- gate bias: added by that ``addmm`` (before), which on CPU first copies it into every row of
  the output, against added in the pointwise forward after a plain product (each side: product
  and compiled pointwise forward);
- gradients of ``x`` and ``h``: two products against one with ``[W_ih, W_hh]`` (layer 0: only
  ``h``'s, with ``W_hh`` against the same columns sliced from ``[W_ih, W_hh]``);
- weight gradients: ``d_gates^T x``, ``d_gates^T h`` and a column sum (before) against one
  product ``[x, h, 1]^T d_gates`` (concatenation included);

for layer 0 (2 inputs, the paper's preprocessed gradient) and layer 1 (20 inputs).

    python benchmarks/lstm_step_parts.py [--coordinates 31820] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_call, write_results  # noqa: E402

from learnedopt.nn.lstm_step import cell_forward  # noqa: E402


def per_block_forward(gates: Tensor, bias: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pointwise forward as the library wrote it before (same outputs as ``cell_forward``)."""
    i, f, g, o = (gates + bias).chunk(4, dim=1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c_new = f * c + i * g
    tanh_c = c_new.tanh()
    return torch.cat((i, f, g, o), dim=1), c_new, o * tanh_c, tanh_c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coordinates", type=int, default=31820)
    parser.add_argument("--hidden", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, hidden = args.coordinates, args.hidden
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    rows = []

    def add(part: str, layer: str, before, after) -> None:
        seconds = {"before": time_call(before), "after": time_call(after)}
        rows.append(dict(part=part, layer=layer, ms_before=seconds["before"] * 1e3, ms_after=seconds["after"] * 1e3,
                         speedup=seconds["before"] / seconds["after"]))
        print(rows[-1], flush=True)

    gates, gate_bias, c = randn(n, 4 * hidden), randn(4 * hidden), randn(n, hidden)
    before_fn = torch.compile(per_block_forward, dynamic=False)
    after_fn = torch.compile(cell_forward, dynamic=False)
    reference = cell_forward(gates.double(), gate_bias.double(), c.double())
    errors = {
        name: max(float((a.double() - b).abs().max()) for a, b in zip(fn(gates, gate_bias, c), reference, strict=True))
        for name, fn in (("before", before_fn), ("after", after_fn))
    }
    add("pointwise forward (compiled)", "either", lambda: before_fn(gates, gate_bias, c),
        lambda: after_fn(gates, gate_bias, c))  # fmt: skip

    d_gates, h = randn(n, 4 * hidden), randn(n, hidden)
    for layer, inputs in (("0", 2), ("1", hidden)):
        x = randn(n, inputs)
        w_ih, w_hh, bias = randn(4 * hidden, inputs), randn(4 * hidden, hidden), randn(4 * hidden)
        weight = torch.cat((w_ih, w_hh), dim=1)
        add("gate product", layer,
            lambda: torch.addmm(bias, x, w_ih.t()).addmm_(h, w_hh.t()),
            lambda: torch.addmm(bias, torch.cat((x, h), dim=1), weight.t()))  # fmt: skip
        xh, no_bias = torch.cat((x, h), dim=1), torch.zeros_like(bias)
        add("gate bias", layer,
            lambda: after_fn(torch.addmm(bias, xh, weight.t()), no_bias, c),
            lambda: after_fn(xh @ weight.t(), bias, c))  # fmt: skip
        if layer == "0":  # an unroll's layer 0 reads a detached x: only h's gradient
            add("gradient of h", layer, lambda: d_gates @ w_hh, lambda: d_gates @ weight[:, inputs:])
        else:
            add("gradients of x and h", layer,
                lambda: (d_gates @ w_ih, d_gates @ w_hh),
                lambda: d_gates @ weight)  # fmt: skip
        add("weight and bias gradients", layer,
            lambda: (d_gates.t() @ x, d_gates.t() @ h, d_gates.sum(dim=0)),
            lambda: torch.cat((x, h, x.new_ones(n, 1)), dim=1).t() @ d_gates)  # fmt: skip

    table = [
        f"Parts of one LSTM layer step at {n:,} coordinates, hidden size {hidden}, "
        f"{torch.get_num_threads()} threads, float32; median of 5 timings each, in one run. "
        "'before' is the formulation the library's step used until it was replaced by 'after'.\n",
        "| part | layer | before ms | after ms | speed-up |",
        "|---|---|---:|---:|---:|",
        *(f"| {r['part']} | {r['layer']} | {r['ms_before']:.2f} | {r['ms_after']:.2f} | {r['speedup']:.2f}x |"
          for r in rows),  # fmt: skip
        f"\nLargest absolute difference of the pointwise forward's outputs from float64: before "
        f"{errors['before']:.1e}, after {errors['after']:.1e}.",
    ]
    write_results("lstm_step_parts", {"coordinates": n, "hidden": hidden, "rows": rows, "float64_error": errors},
                  "\n".join(table))  # fmt: skip


if __name__ == "__main__":
    main()
