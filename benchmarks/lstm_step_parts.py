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

for layer 0 (2 inputs, the paper's preprocessed gradient) and layer 1 (20 inputs); and

- the whole two-layer step, forward and backward (the gradients of ``h``, ``c`` and every weight
  from a loss reading ``top``, ``h'`` and ``c'``): one autograd function per layer, the layers'
  ``h'`` and ``c'`` stacked into ``(2, n, H)`` states (before), against the library's
  :class:`~learnedopt.nn.lstm_step.LSTMStackStep` (after; its products and compiled pointwise
  functions, the fused CPU kernel off as ``LEARNEDOPT_CPU_KERNEL=0`` turns it off: that kernel is
  ``lstm_layer_cpu.py``'s), with whether the two give the same bits.

    python benchmarks/lstm_step_parts.py [--coordinates 31820] [--hidden 20] [--threads 1] [--tag NAME]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import positive_int, results_tag, thread_count, time_call, without_cpu_kernel, write_results  # noqa: E402

from learnedopt.nn.lstm_step import cell_backward, cell_forward, lstm_step  # noqa: E402


def per_block_forward(gates: Tensor, bias: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pointwise forward as the library wrote it before (same outputs as ``cell_forward``)."""
    i, f, g, o = (gates + bias).chunk(4, dim=1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c_new = f * c + i * g
    tanh_c = c_new.tanh()
    return torch.cat((i, f, g, o), dim=1), c_new, o * tanh_c, tanh_c


class PerLayerStep(torch.autograd.Function):
    """One layer of the step as the library wrote it before ``LSTMStackStep``: ``h', c'`` of one
    layer, which ``per_layer_lstm_step`` stacks; the same products and pointwise functions."""

    @staticmethod
    def forward(ctx, x, h, c, weight_ih, weight_hh, bias, forward_fn, backward_fn):
        weight = torch.cat((weight_ih, weight_hh), dim=1)
        gates = torch.cat((x, h), dim=1) @ weight.t()
        activations, c_new, h_new, tanh_c = forward_fn(gates, bias.detach(), c.detach())
        ctx.save_for_backward(x, h, c, weight, activations, tanh_c)
        ctx.backward_fn = backward_fn
        return h_new, c_new

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h, grad_c):
        x, h, c, weight, activations, tanh_c = ctx.saved_tensors
        grad_h = torch.zeros_like(tanh_c) if grad_h is None else grad_h.contiguous()
        grad_c = torch.zeros_like(tanh_c) if grad_c is None else grad_c.contiguous()
        d_gates, grad_c_prev = ctx.backward_fn(activations, c.detach(), tanh_c, grad_h, grad_c)
        inputs, hidden = x.shape[1], h.shape[1]
        grad_xh = d_gates @ weight
        grad_weight = (torch.cat((x, h, x.new_ones(x.shape[0], 1)), dim=1).t() @ d_gates).t()
        return (grad_xh[:, :inputs], grad_xh[:, inputs:], grad_c_prev, grad_weight[:, :inputs],
                grad_weight[:, inputs : inputs + hidden], grad_weight[:, -1], None, None)  # fmt: skip


def per_layer_lstm_step(lstm, x, h, c, forward_fn, backward_fn):
    """``lstm_step`` as it was: a function per layer, then the layers' states stacked."""
    hs, cs = [], []
    for layer, (h_layer, c_layer) in enumerate(zip(h.unbind(0), c.unbind(0), strict=True)):
        bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        weight_ih, weight_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
        x, c_new = PerLayerStep.apply(x, h_layer, c_layer, weight_ih, weight_hh, bias, forward_fn, backward_fn)
        hs.append(x)
        cs.append(c_new)
    return x, torch.stack(hs), torch.stack(cs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coordinates", type=positive_int, default=31820)
    parser.add_argument("--hidden", type=positive_int, default=20)
    parser.add_argument("--threads", type=thread_count, default=1)
    parser.add_argument("--tag", type=results_tag("lstm_step_parts"), help="suffix of the results file name (a run that should not replace the committed one)")
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

    # the whole two-layer step, forward and backward, as a meta-training unroll runs it (x detached)
    lstm = torch.nn.LSTM(2, hidden, 2)
    x, h, c = randn(n, 2), randn(2, n, hidden).requires_grad_(), randn(2, n, hidden).requires_grad_()
    loss_weights = [randn(n, hidden), randn(2, n, hidden), randn(2, n, hidden)]
    compiled = (torch.compile(cell_forward, dynamic=False), torch.compile(cell_backward, dynamic=False))

    def step_and_gradients(step) -> list[Tensor]:
        outputs = step(lstm, x, h, c)
        loss = sum((t * w).sum() for t, w in zip(outputs, loss_weights, strict=True))
        return [*outputs, *torch.autograd.grad(loss, [h, c, *lstm.parameters()])]

    before_step = lambda *a: per_layer_lstm_step(*a, *compiled)  # noqa: E731
    # 'after' is LSTMStackStep's products and compiled pointwise functions, not the fused CPU
    # kernel (lstm_layer_cpu) that lstm_step runs by default since (lstm_layer_cpu.py times it)
    with without_cpu_kernel():
        same_bits = all(
            torch.equal(a, b)
            for a, b in zip(step_and_gradients(before_step), step_and_gradients(lstm_step), strict=True)
        )
        add("two-layer step, forward and backward", "both",
            lambda: step_and_gradients(before_step), lambda: step_and_gradients(lstm_step))  # fmt: skip

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
        f"\nThe two-layer step's outputs and gradients are {'' if same_bits else 'not '}bitwise equal "
        "before and after.",
    ]
    write_results("lstm_step_parts" + (f"_{args.tag}" if args.tag else ""), {"coordinates": n, "hidden": hidden, "rows": rows, "float64_error": errors,
                                      "two_layer_step_same_bits": same_bits}, "\n".join(table))  # fmt: skip


if __name__ == "__main__":
    main()
